"""Tests for onnx_sparse.graph.locate: every weight traced to its stored tensor and axis, with the verdict."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import CASE_MODELS, EXPECTED, case_path
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.graph.locate import WeightSite, find_weight_sites

F = TensorProto.FLOAT


def _sites(model: onnx.ModelProto) -> dict[str, WeightSite]:
    sites = find_weight_sites(model)
    by_node = {s.node: s for s in sites}
    assert len(by_node) == len(sites), "node names are not unique"
    return by_node


def _model(nodes, inits, inputs, outputs, opset: int = 17, ir: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _w(*shape: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[w == 0] = 0.5
    return w.astype(dtype)


def _vi(name: str, shape, elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


# --------------------------------------------------------------------------- the case models


@pytest.mark.parametrize("name", CASE_MODELS)
def test_case_model_verdicts(name: str) -> None:
    sites = _sites(onnx.load(case_path(name)))
    expected = {e.node: e for e in EXPECTED[name]}
    assert set(sites) == set(expected)
    for node, e in expected.items():
        s = sites[node]
        got = (s.op, s.eligible, s.weight, s.shape, s.axis, s.dtype, s.source)
        assert got == (e.op, e.eligible, e.weight, e.shape, e.axis, e.dtype, e.source), node
        if e.eligible:
            assert s.reason == "", node
        else:
            assert e.reason in s.reason, f"{node}: {s.reason!r} lacks {e.reason!r}"
            assert not s.likely_sparse_kernel


@pytest.mark.parametrize("name", CASE_MODELS)
def test_find_weight_sites_changes_nothing(name: str) -> None:
    model = onnx.load(case_path(name))
    before = model.SerializeToString(deterministic=True)
    find_weight_sites(model)
    assert model.SerializeToString(deterministic=True) == before


def test_constant_node_weights_are_found() -> None:
    model = onnx.load(case_path("constant_nodes.onnx"))
    assert len(model.graph.initializer) == 0
    sites = _sites(model)
    assert {s.source for s in sites.values()} == {"constant"}
    assert all(s.eligible and s.tensor is not None for s in sites.values())
    # The site's tensor IS the Constant node's value (so pruning writes into the node).
    const = next(n for n in model.graph.node if n.name == "const_conv_weight")
    assert sites["conv"].tensor.SerializeToString() == const.attribute[0].t.SerializeToString()


def test_int8_behind_dequantize_linear() -> None:
    s = _sites(onnx.load(case_path("qdq_conv.onnx")))["conv"]
    assert s.eligible and s.dtype == "int8" and s.path == ("DequantizeLinear",)
    assert s.quant is not None and s.quant.node == "conv_weight_dequant" and s.quant.direct
    assert np.all(s.quant.zero_point == 0)


def test_int8_with_nonzero_zero_point_is_not_eligible() -> None:
    s = _sites(onnx.load(case_path("qdq_conv_zp.onnx")))["conv"]
    assert not s.eligible and "non-zero zero point" in s.reason
    assert s.axis == 1  # traced all the same


def test_paths_through_cast_and_quantize() -> None:
    assert _sites(onnx.load(case_path("fp16_cast.onnx")))["conv"].path == ("Cast",)
    s = _sites(onnx.load(case_path("q_float_conv.onnx")))["conv"]
    assert s.path == ("QuantizeLinear", "DequantizeLinear") and s.dtype == "float32"
    assert s.quant is not None and not s.quant.direct  # a float weight: its zero stays 0


@pytest.mark.parametrize(("node", "perm"), [("conv_a", [2, 0, 1]), ("conv_b", [1, 2, 0]), ("fc", [1, 0])])
def test_transpose_maps_the_axis_through_perm(node: str, perm: list[int]) -> None:
    model = onnx.load(case_path("transpose_120.onnx"))
    s = _sites(model)[node]
    assert s.path == ("Transpose",)
    assert s.consumer_shape == tuple(s.shape[p] for p in perm)
    assert s.axis == perm[s.consumer_axis]
    if perm != [1, 0]:
        # Polygraphy maps with perm.index(axis): a different axis here, of a length that is not even the
        # reduction length, so a wrong mapping would prune silently along the wrong axis.
        assert perm.index(s.consumer_axis) != s.axis
        assert s.shape[s.axis] == s.consumer_shape[s.consumer_axis] == 16
        assert s.shape[perm.index(s.consumer_axis)] != 16


def test_polygraphy_maps_transposed_axes_differently() -> None:
    """Polygraphy's own tracing (perm.index) picks another stored axis for the non-self-inverse perms."""
    sparse_tool = pytest.importorskip("polygraphy.tools.sparse")
    model = onnx.load(case_path("transpose_120.onnx"))
    pruner = sparse_tool.SparsityPruner(model)
    if not hasattr(pruner, "_walk_nodes"):
        pytest.skip("Polygraphy's SparsityPruner changed")
    pruner._walk_nodes()
    theirs = {name: info.axis for name, info in pruner.prune_infos.items()}
    ours = {s.weight: s.axis for s in find_weight_sites(model)}
    assert ours == {"conva.weight": 0, "convb.weight": 2, "fc.weight": 1}
    assert theirs["conva.weight"] != ours["conva.weight"] and theirs["convb.weight"] != ours["convb.weight"]
    assert theirs["fc.weight"] == ours["fc.weight"]  # [1, 0] is its own inverse


def test_rank3_matmul_weight_is_not_eligible() -> None:
    s = _sites(onnx.load(case_path("mlp.onnx")))["bmm"]
    assert not s.eligible and "rank 3" in s.reason
    # Its reduction axis is K (second to last), not the batch axis: [2,16,8] x [2,M,16] -> 16 MACs per output.
    assert s.consumer_axis == 1 and s.axis == 1
    assert s.macs == 2 * 1 * 8 * 16


def test_gemm_constant_a_is_the_weight() -> None:
    s = _sites(onnx.load(case_path("gemm_const_a.onnx")))["gemm_a"]
    assert s.input_index == 0 and s.activation == "x" and s.attributes["transA"] == 1
    assert s.consumer_axis == 0 and s.axis == 0 and s.eligible


def test_shared_weight_agree_and_conflict() -> None:
    agree = _sites(onnx.load(case_path("shared_agree.onnx")))
    assert agree["mm1"].tensor is not None
    assert agree["mm1"].tensor.SerializeToString() == agree["mm2"].tensor.SerializeToString()
    conflict = _sites(onnx.load(case_path("shared_conflict.onnx")))
    assert "gemm" in conflict["mm"].reason and "another axis" in conflict["mm"].reason
    assert "mm" in conflict["gemm"].reason.replace("gemm", "")


def test_if_subgraph_outer_scope_weights() -> None:
    sites = _sites(onnx.load(case_path("if_subgraph.onnx")))
    outer = [s for s in sites.values() if s.weight == "outer.weight"]
    assert len(outer) == 2 and all(s.eligible and s.source == "outer_initializer" for s in outer)
    assert {s.scope for s in sites.values()} == {"if/then_branch", "if/else_branch"}


def test_conv_transpose_is_reported_not_eligible() -> None:
    s = _sites(onnx.load(case_path("conv_transpose.onnx")))["deconv"]
    assert s.op == "ConvTranspose" and not s.eligible and s.axis == 0


def test_depthwise_and_grouped() -> None:
    sites = _sites(onnx.load(case_path("grouped_depthwise.onnx")))
    assert sites["gconv"].group == 2 and sites["gconv"].eligible
    assert sites["dwconv"].group == 12 and "depthwise" in sites["dwconv"].reason
    assert "C/group=6" in sites["g6conv"].reason


def test_generated_names_for_unnamed_nodes() -> None:
    sites = _sites(onnx.load(case_path("mlp.onnx")))
    assert {"Gemm_1", "Gemm_3"} <= set(sites)
    assert sites["Gemm_1"].weight == "fc1.weight" and sites["Gemm_3"].weight == "fc2.weight"
    # Inside a subgraph the owner's generated name is the prefix.
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["o"])], "then", [], [_vi("o", ["N", 8])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["o2"])], "else", [], [_vi("o2", ["N", 8])])
    model = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
        [numpy_helper.from_array(_w(8, 8), "w")],
        [_vi("c", [], TensorProto.BOOL), _vi("x", ["N", 8])],
        [_vi("y", ["N", 8])],
    )
    assert set(_sites(model)) == {"If_0/then_branch/MatMul_0"}


def test_function_body_names_are_prefixed() -> None:
    sites = _sites(onnx.load(case_path("custom_domain.onnx")))
    s = sites["local.Proj/proj_mm"]
    assert s.scope == "local.Proj" and s.source == "constant"


# --------------------------------------------------------------------------- in-test graphs


def test_weight_also_used_by_a_non_weight_op_is_not_eligible() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("Add", ["w", "x2"], ["z"], name="add"),
    ]
    model = _model(
        nodes,
        [numpy_helper.from_array(_w(16, 16), "w")],
        [_vi("x", ["N", 16]), _vi("x2", [16, 16])],
        [_vi("y", ["N", 16]), _vi("z", [16, 16])],
    )
    s = _sites(model)["mm"]
    assert not s.eligible and "Add add" in s.reason
    # No-op: without the Add the same weight is eligible.
    del model.graph.node[1]
    del model.graph.output[1]
    assert _sites(model)["mm"].eligible


def test_foreign_use_behind_a_cast_is_found() -> None:
    nodes = [
        helper.make_node("Cast", ["w"], ["w32"], name="cast", to=F),
        helper.make_node("MatMul", ["x", "w32"], ["y"], name="mm"),
        helper.make_node("Relu", ["w32"], ["z"], name="relu"),
    ]
    model = _model(
        nodes,
        [numpy_helper.from_array(_w(16, 8, dtype=np.float16), "w")],
        [_vi("x", ["N", 16])],
        [_vi("y", ["N", 8]), _vi("z", [16, 8])],
    )
    s = _sites(model)["mm"]
    assert not s.eligible and "Relu relu" in s.reason


def test_weight_that_is_a_graph_output_is_not_eligible() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [numpy_helper.from_array(_w(16, 8), "w")],
        [_vi("x", ["N", 16])],
        [_vi("y", ["N", 8]), _vi("w", [16, 8])],
    )
    s = _sites(model)["mm"]
    assert not s.eligible and "graph output" in s.reason


def test_weight_computed_at_run_time_is_not_eligible() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [],
        [_vi("x", ["N", 16]), _vi("w", [16, 8])],
        [_vi("y", ["N", 8])],
    )
    s = _sites(model)["mm"]
    assert not s.eligible and "computed at run time" in s.reason and s.tensor is None


def _reshape_model(stored: tuple[int, ...], op: str, consumer: str, **kw) -> onnx.ModelProto:
    """stored weight -> ``op`` -> Conv (consumer="conv", 3x3 or 1x1) or MatMul (consumer="mm")."""
    inits = [numpy_helper.from_array(_w(*stored), "w")]
    inputs = ["w"]
    attrs = {}
    if op == "Reshape":
        inits.append(numpy_helper.from_array(np.array(kw["shape"], dtype=np.int64), "shape"))
        inputs.append("shape")
    elif op in ("Unsqueeze", "Squeeze"):
        inits.append(numpy_helper.from_array(np.array(kw["axes"], dtype=np.int64), "axes"))
        inputs.append("axes")
    elif op == "Flatten":
        attrs["axis"] = kw["axis"]
    nodes = [helper.make_node(op, inputs, ["wv"], name="view", **attrs)]
    if consumer == "conv":
        c = kw["c"]
        nodes.append(helper.make_node("Conv", ["x", "wv"], ["y"], name="conv"))
        return _model(nodes, inits, [_vi("x", ["N", c, 8, 8])], [_vi("y", None)])
    nodes.append(helper.make_node("MatMul", ["x", "wv"], ["y"], name="mm"))
    return _model(nodes, inits, [_vi("x", ["N", kw["k"]])], [_vi("y", None)])


@pytest.mark.parametrize(
    ("stored", "op", "consumer", "kw", "consumer_shape", "axis"),
    [
        ((8, 16, 9), "Reshape", "conv", {"shape": [8, 16, 3, 3], "c": 16}, (8, 16, 3, 3), 1),
        ((8, 16), "Unsqueeze", "conv", {"axes": [2, 3], "c": 16}, (8, 16, 1, 1), 1),
        ((1, 16, 8), "Flatten", "mm", {"axis": 2, "k": 16}, (16, 8), 1),
        ((1, 16, 8), "Squeeze", "mm", {"axes": [0], "k": 16}, (16, 8), 1),
        ((16, 2, 4), "Reshape", "mm", {"shape": [0, -1], "k": 16}, (16, 8), 0),
    ],
)
def test_reshape_that_keeps_the_axis_is_looked_through(stored, op, consumer, kw, consumer_shape, axis) -> None:
    (s,) = find_weight_sites(_reshape_model(stored, op, consumer, **kw))
    assert s.eligible, s.reason
    assert s.path == (op,) and s.shape == stored and s.consumer_shape == consumer_shape and s.axis == axis


@pytest.mark.parametrize(
    ("stored", "op", "consumer", "kw"),
    [
        ((8, 16 * 9), "Reshape", "conv", {"shape": [8, 16, 3, 3], "c": 16}),  # C and the kernel share one axis
        ((4, 4, 8), "Reshape", "mm", {"shape": [16, 8], "k": 16}),  # K is split over two stored axes
    ],
)
def test_reshape_that_splits_the_axis_is_not_eligible(stored, op, consumer, kw) -> None:
    (s,) = find_weight_sites(_reshape_model(stored, op, consumer, **kw))
    assert not s.eligible and s.axis is None
    assert "does not keep the reduction axis intact" in s.reason and "Reshape" in s.reason


def test_reshape_with_a_computed_shape_is_not_eligible() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"], name="shape"),
        helper.make_node("Reshape", ["w", "xs"], ["wv"], name="view"),
        helper.make_node("MatMul", ["x", "wv"], ["y"], name="mm"),
    ]
    model = _model(nodes, [numpy_helper.from_array(_w(16, 16), "w")], [_vi("x", [16, 16])], [_vi("y", None)])
    s = _sites(model)["mm"]
    assert not s.eligible and "computed at run time" in s.reason


# --------------------------------------------------------------------------- likely sparse kernel


def _matmul_model(k: int, n: int) -> onnx.ModelProto:
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [numpy_helper.from_array(_w(k, n), "w")],
        [_vi("x", ["N", k])],
        [_vi("y", ["N", n])],
    )


def _conv_model(k: int, c: int, r: int) -> onnx.ModelProto:
    return _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [numpy_helper.from_array(_w(k, c, r, r), "w")],
        [_vi("x", ["N", c, 8, 8])],
        [_vi("y", None)],
    )


@pytest.mark.parametrize(
    ("model", "likely"),
    [
        (_matmul_model(4096, 4096), True),  # float model: FP16 rule, >= 4096 both sides
        (_matmul_model(512, 512), False),  # FP16 at 512: measured no faster than dense
        (_matmul_model(384, 1536), False),  # MiniLM's FFN width
        (_matmul_model(64, 64), False),
        (_conv_model(256, 32, 3), False),  # 288 in, 256 out: below the FP16 floor
    ],
    ids=["mm4096x4096", "mm512x512", "mm384x1536", "mm64x64", "conv3x3_c32_k256"],
)
def test_likely_sparse_kernel(model: onnx.ModelProto, likely: bool) -> None:
    """Float models run in FP16: the hint uses the measured FP16 floor (INT8 cases: test_qdq.py)."""
    (s,) = find_weight_sites(model)
    assert s.eligible and s.likely_sparse_kernel is likely
    assert s.int8 is not None and not s.int8.possible and not s.int8.quantized


def test_likely_sparse_kernel_is_false_when_not_eligible() -> None:
    (s,) = find_weight_sites(_matmul_model(510, 512))
    assert not s.eligible and not s.likely_sparse_kernel


# --------------------------------------------------------------------------- edges the mutation run found unpinned


def test_kernel_shape_and_group_of_a_site() -> None:
    sites = _sites(onnx.load(case_path("grouped_depthwise.onnx")))
    assert sites["gconv"].kernel_shape == (3, 3) and sites["gconv"].group > 1
    assert _sites(onnx.load(case_path("mlp.onnx")))["fc0"].kernel_shape == ()


@pytest.mark.parametrize("value", [1.5, "two", [1, 2]], ids=["float", "string", "ints"])
def test_attribute_of_the_wrong_type_is_a_clear_error(value) -> None:
    """Conv's group is an INT; any other attribute type (below or above INT in ONNX's enum) is refused."""
    from onnx_sparse.errors import OnnxSparseError

    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    node.attribute.append(helper.make_attribute("group", value))
    model = _model([node], [numpy_helper.from_array(_w(8, 8, 1, 1), "w")], [_vi("x", ["N", 8, 4, 4])], [_vi("y", None)])
    with pytest.raises(OnnxSparseError, match="attribute 'group' has type .*, Conv needs INT"):
        find_weight_sites(model)


def test_gemm_with_two_constant_inputs_takes_b_as_the_weight() -> None:
    nodes = [helper.make_node("Gemm", ["a", "b"], ["y"], name="gemm")]
    inits = [numpy_helper.from_array(_w(4, 8), "a"), numpy_helper.from_array(_w(8, 16, seed=1), "b")]
    s = _sites(_model(nodes, inits, [], [_vi("y", [4, 16])]))["gemm"]
    assert (s.input_index, s.weight, s.activation) == (1, "b", "a")


def test_gemm_with_two_computed_inputs_blames_b() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu_a"),
        helper.make_node("Relu", ["z"], ["b"], name="relu_b"),
        helper.make_node("Gemm", ["a", "b"], ["y"], name="gemm"),
    ]
    s = _sites(_model(nodes, [], [_vi("x", [4, 8]), _vi("z", [8, 16])], [_vi("y", [4, 16])]))["gemm"]
    assert s.input_index == 1 and not s.eligible and "relu_b" in s.reason


def test_shared_weight_on_two_axes_names_the_other_layer() -> None:
    conflict = _sites(onnx.load(case_path("shared_conflict.onnx")))
    assert conflict["mm"].reason == "shared with gemm on another axis"
    assert conflict["gemm"].reason == "shared with mm on another axis"


def test_layers_inside_subgraphs_get_no_int8_answer() -> None:
    """Only the main graph is analysed for INT8 (graph/qdq.py): a subgraph's layer has int8 None."""
    sites = find_weight_sites(onnx.load(case_path("if_subgraph.onnx")))
    assert sites and all(s.int8 is None for s in sites)


@pytest.mark.parametrize(
    ("op", "extra", "consumer_shape"),
    [
        ("Flatten", {}, (16, 8)),  # default axis 1: (16, 2, 4) -> (16, 8)
        ("Squeeze", {}, (16, 8)),  # no axes input: every 1 dropped
        ("Squeeze", {"axes": [-2]}, (16, 8)),  # a negative axis
    ],
    ids=["flatten-default-axis", "squeeze-no-axes", "squeeze-negative-axis"],
)
def test_view_defaults_are_looked_through(op: str, extra: dict, consumer_shape: tuple[int, ...]) -> None:
    stored = (16, 2, 4) if op == "Flatten" else (16, 1, 8)
    inits = [numpy_helper.from_array(_w(*stored), "w")]
    inputs = ["w"]
    if "axes" in extra:
        inits.append(numpy_helper.from_array(np.array(extra["axes"], np.int64), "axes"))
        inputs.append("axes")
    nodes = [
        helper.make_node(op, inputs, ["wv"], name="view"),
        helper.make_node("MatMul", ["x", "wv"], ["y"], name="mm"),
    ]
    (s,) = find_weight_sites(_model(nodes, inits, [_vi("x", ["N", 16])], [_vi("y", None)]))
    assert s.eligible, s.reason
    assert s.consumer_shape == consumer_shape and s.axis == 0


def test_reshape_target_from_a_constant_node() -> None:
    """Exporters often store a Reshape's target shape in a Constant node rather than an initializer."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [16, 8])
    nodes = [
        helper.make_node("Constant", [], ["shape"], name="shape_c", value=shape),
        helper.make_node("Reshape", ["w", "shape"], ["wv"], name="view"),
        helper.make_node("MatMul", ["x", "wv"], ["y"], name="mm"),
    ]
    s = _sites(_model(nodes, [numpy_helper.from_array(_w(16, 2, 4), "w")], [_vi("x", ["N", 16])], [_vi("y", None)]))
    assert s["mm"].eligible, s["mm"].reason
    assert s["mm"].consumer_shape == (16, 8) and s["mm"].path == ("Reshape",)


def test_subgraph_inside_a_function_is_searched() -> None:
    """A MatMul in the then-branch of an If inside a model-local function is a site too."""
    branch_w = numpy_helper.from_array(_w(16, 16), "bw")
    then_g = helper.make_graph(
        [helper.make_node("Constant", [], ["bw"], name="bw_c", value=branch_w),
         helper.make_node("MatMul", ["fx", "bw"], ["t"], name="then_mm")],
        "then", [], [_vi("t", None)],
    )  # fmt: skip
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["fx"], ["e"], name="else_id")], "else", [], [_vi("e", None)]
    )
    fn = helper.make_function(
        "local", "Branch", ["fx", "c"], ["fy"],
        [helper.make_node("If", ["c"], ["fy"], name="if", then_branch=then_g, else_branch=else_g)],
        [helper.make_opsetid("", 17)],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Branch", ["x", "c"], ["y"], domain="local", name="call")],
        "g", [_vi("x", ["N", 16]), _vi("c", [], TensorProto.BOOL)], [_vi("y", None)],
    )  # fmt: skip
    model = helper.make_model(graph, functions=[fn],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])  # fmt: skip
    sites = _sites(model)
    (name,) = sites
    assert name == "local.Branch/if/then_branch/then_mm" and sites[name].eligible


def test_macs_through_an_inline_reshape_of_the_activation() -> None:
    """Shape inference keeps small inline constants (a Reshape's target): the layer's MACs are known."""
    nodes = [
        helper.make_node("Reshape", ["x", "shp"], ["xr"], name="r"),
        helper.make_node("MatMul", ["xr", "w"], ["y"], name="mm"),
    ]
    inits = [numpy_helper.from_array(np.array([-1, 16], np.int64), "shp"), numpy_helper.from_array(_w(16, 8), "w")]
    s = _sites(_model(nodes, inits, [_vi("x", [2, 4, 16])], [_vi("y", None)]))["mm"]
    assert s.macs == 8 * 16 * 8


def test_undefined_weight_dtype_is_a_reason_not_a_crash() -> None:
    w = numpy_helper.from_array(_w(16, 8), "w")
    w.data_type = TensorProto.UNDEFINED
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    s = _sites(_model(nodes, [w], [_vi("x", ["N", 16])], [_vi("y", None)]))["mm"]
    assert not s.eligible and s.dtype == "undefined" and "weight dtype undefined is not supported" in s.reason
