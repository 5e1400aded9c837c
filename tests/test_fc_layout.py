"""FcLayoutPass: each documented case, hit and no-op, checked numerically with onnxruntime."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import without_provenance
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.analysis import layout
from onnx_sparse.api import prune
from onnx_sparse.cli.main import main
from onnx_sparse.core import nm
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.graph.weights import zero_value
from onnx_sparse.io import ModelFile, load_model, read_tensor, save_model
from onnx_sparse.passes.fc_layout import FcLayoutPass, LayoutRecord

FLOAT = TensorProto.FLOAT
C, K = 8, 16  # C_in (reduction, multiple of 4), K_out


def _w(shape: Sequence[int], seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.RandomState(seed).standard_normal(shape).astype(dtype)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _vi(name: str, shape: Sequence[int | str], elem: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    inits: Sequence[TensorProto] = (),
    value_info: Sequence[onnx.ValueInfoProto] = (),
    opset: int = 21,
    ir: int = 10,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    model.producer_name = "test_fc_layout"
    helper.set_model_props(model, {"owner": "tests"})
    return model


# --------------------------------------------------------------------------- models


def mm_2d() -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc", doc_string="the fc layer")
    node.metadata_props.add(key="origin", value="torch.nn.Linear")
    return _model([node], [_vi("X", ["N", C])], [_vi("Y", ["N", K])], [_init("W", _w((C, K)))])


def mm_3d() -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="proj")
    return _model([node], [_vi("X", ["B", "T", C])], [_vi("Y", ["B", "T", K])], [_init("W", _w((C, K), 1))])


def mm_unknown_rank() -> onnx.ModelProto:
    # a Reshape to a run-time shape of unknown length: shape inference cannot tell the rank
    nodes = [
        helper.make_node("Reshape", ["X", "shape"], ["Xr"], name="reshape"),
        helper.make_node("MatMul", ["Xr", "W"], ["Y"], name="fc"),
    ]
    inputs = [_vi("X", ["N", C]), _vi("shape", ["R"], TensorProto.INT64)]
    return _model(nodes, inputs, [_vi("Y", ["M", K])], [_init("W", _w((C, K), 2))])


def gemm_transb0() -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["X", "W", "b"], ["Y"], name="gemm", alpha=0.5, beta=2.0, transB=0)
    inits = [_init("W", _w((C, K), 3)), _init("b", _w((K,), 4))]
    return _model([node], [_vi("X", ["N", C])], [_vi("Y", ["N", K])], inits)


def gemm_no_transb_attr() -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["X", "W"], ["Y"], name="gemm")
    return _model([node], [_vi("X", ["N", C])], [_vi("Y", ["N", K])], [_init("W", _w((C, K), 5))])


def shared_two_matmuls() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["Y1"], name="fc_a"),
        helper.make_node("MatMul", ["X3", "W"], ["Y2"], name="fc_b"),
        helper.make_node("MatMul", ["X", "W"], ["Y3"], name="fc_c"),
    ]
    inputs = [_vi("X", ["N", C]), _vi("X3", ["B", "T", C])]
    outputs = [_vi("Y1", ["N", K]), _vi("Y2", ["B", "T", K]), _vi("Y3", ["N", K])]
    return _model(nodes, inputs, outputs, [_init("W", _w((C, K), 6))])


def constant_node() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Constant", [], ["Wc"], name="w_const", value=_init("Wc", _w((C, K), 7))),
        helper.make_node("MatMul", ["X", "Wc"], ["Y"], name="fc"),
    ]
    return _model(nodes, [_vi("X", ["N", C])], [_vi("Y", ["N", K])])


def fp16_cast() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["W16"], ["W32"], name="cast", to=FLOAT),
        helper.make_node("MatMul", ["X", "W32"], ["Y"], name="fc"),
    ]
    # value_info for the stored tensor and the value on its path: both must follow the transpose.
    vis = [_vi("W16", [C, K], TensorProto.FLOAT16), _vi("W32", [C, K])]
    return _model(nodes, [_vi("X", ["N", C])], [_vi("Y", ["N", K])], [_init("W16", _w((C, K), 8, np.float16))], vis)


def _int8(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(-127, 128, size=(C, K)).astype(np.int8)


def dq_per_tensor() -> onnx.ModelProto:
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["W"], name="dq"),
        helper.make_node("MatMul", ["X3", "W"], ["Y"], name="fc"),
    ]
    inits = [_init("Wq", _int8(9)), _init("s", np.array(0.02, np.float32)), _init("zp", np.array(0, np.int8))]
    return _model(nodes, [_vi("X3", ["B", "T", C])], [_vi("Y", ["B", "T", K])], inits)


def _dq_per_axis(axis: int | None) -> onnx.ModelProto:
    attrs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["W"], name="dq", **attrs),
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc"),
    ]
    scale = (np.arange(K, dtype=np.float32) + 1) / 100
    inits = [_init("Wq", _int8(10)), _init("s", scale), _init("zp", np.zeros(K, np.int8))]
    return _model(nodes, [_vi("X", ["N", C])], [_vi("Y", ["N", K])], inits)


def dq_per_axis() -> onnx.ModelProto:
    return _dq_per_axis(1)


def dq_per_axis_default() -> onnx.ModelProto:
    return _dq_per_axis(None)


def dq_per_axis_negative() -> onnx.ModelProto:
    return _dq_per_axis(-1)


def qdq_float_per_axis() -> onnx.ModelProto:
    scale = np.full(K, 0.02, np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["Wf", "s", "zp"], ["Wq"], name="q", axis=1),
        helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["W"], name="dq", axis=1),
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc"),
    ]
    inits = [_init("Wf", _w((C, K), 11)), _init("s", scale), _init("zp", np.zeros(K, np.int8))]
    return _model(nodes, [_vi("X", ["N", C])], [_vi("Y", ["N", K])], inits)


def identity_path_3d() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Identity", ["W"], ["Wi"], name="id"),
        helper.make_node("MatMul", ["X", "Wi"], ["Y"], name="fc"),
    ]
    return _model(nodes, [_vi("X", [2, 3, C])], [_vi("Y", [2, 3, K])], [_init("W", _w((C, K), 12))])


def opset10_matmul() -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")
    return _model([node], [_vi("X", ["N", C])], [_vi("Y", ["N", K])], [_init("W", _w((C, K), 13))], opset=10, ir=5)


def unnamed_nodes() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["X3", "W1"], ["H"]),
        helper.make_node("Relu", ["H"], ["R"]),
        helper.make_node("MatMul", ["R", "W2"], ["Y"]),
    ]
    inits = [_init("W1", _w((C, K), 14)), _init("W2", _w((K, C), 15))]
    return _model(nodes, [_vi("X3", ["B", "T", C])], [_vi("Y", ["B", "T", C])], inits)


# Converted: (model builder, per-node expectation {node name: op type after}).
CONVERTED: dict[str, tuple[Callable[[], onnx.ModelProto], dict[str, str]]] = {
    "mm_2d": (mm_2d, {"fc": "Gemm"}),
    "mm_3d": (mm_3d, {"proj": "MatMul"}),
    "mm_unknown_rank": (mm_unknown_rank, {"fc": "MatMul"}),
    "gemm_transb0": (gemm_transb0, {"gemm": "Gemm"}),
    "gemm_no_transb_attr": (gemm_no_transb_attr, {"gemm": "Gemm"}),
    "shared_two_matmuls": (shared_two_matmuls, {"fc_a": "Gemm", "fc_b": "MatMul", "fc_c": "Gemm"}),
    "constant_node": (constant_node, {"fc": "Gemm"}),
    "fp16_cast": (fp16_cast, {"fc": "Gemm"}),
    "dq_per_tensor": (dq_per_tensor, {"fc": "MatMul"}),
    "dq_per_axis": (dq_per_axis, {"fc": "Gemm"}),
    "dq_per_axis_default": (dq_per_axis_default, {"fc": "Gemm"}),
    "dq_per_axis_negative": (dq_per_axis_negative, {"fc": "Gemm"}),
    "qdq_float_per_axis": (qdq_float_per_axis, {"fc": "Gemm"}),
    "identity_path_3d": (identity_path_3d, {"fc": "MatMul"}),
    "opset10_matmul": (opset10_matmul, {"fc": "MatMul"}),
    "unnamed_nodes": (unnamed_nodes, {}),
}


# --------------------------------------------------------------------------- helpers


def _feed(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    feed = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        if vi.name in {t.name for t in model.graph.initializer}:
            continue
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else 3 for d in tt.shape.dim]
        else:
            shape = [3, C]
        if tt.elem_type == TensorProto.BOOL:
            feed[vi.name] = np.ones(shape, bool)
            continue
        if tt.elem_type == TensorProto.INT64:  # a run-time Reshape target: keep the input 2-D
            feed[vi.name] = np.array([3, C], np.int64)
            continue
        feed[vi.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feed


def _run(model: onnx.ModelProto | str | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    # no graph optimizations: compare the graphs as written (onnxruntime would otherwise fuse
    # DequantizeLinear+MatMul into a dynamically quantized kernel, which is not exact)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _assert_same_outputs(before, after, feed) -> None:
    for a, b in zip(_run(before, feed), _run(after, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def _assert_untouched_meta(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    assert after.ir_version == before.ir_version
    assert list(after.opset_import) == list(before.opset_import)
    assert list(without_provenance(after).metadata_props) == list(before.metadata_props)
    assert after.producer_name == before.producer_name


def _fc_sites(model: onnx.ModelProto):
    return [s for s in find_weight_sites(model) if s.op in ("MatMul", "Gemm")]


def _nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node if n.name}


# --------------------------------------------------------------------------- converted cases


@pytest.mark.parametrize("case", sorted(CONVERTED))
def test_converted_case(case: str) -> None:
    build, expect = CONVERTED[case]
    model = build()
    before_bytes = model.SerializeToString(deterministic=True)
    assert any(s.eligible and s.axis == 0 for s in _fc_sites(model)), "fixture should start reduction-first"

    result = FcLayoutPass()(model)
    out = result.model.model

    assert model.SerializeToString(deterministic=True) == before_bytes, "input must not change"
    assert result.modified
    assert result.records and all(isinstance(r, LayoutRecord) for r in result.records)
    onnx.checker.check_model(out, full_check=True)
    _assert_untouched_meta(model, out)
    _assert_same_outputs(model, out, _feed(model))
    for name, op in expect.items():
        assert _nodes(out)[name].op_type == op
    for r in result.records:
        assert r.new_shape == r.old_shape[::-1]
    # every eligible FC weight is now [K_out, C_in]: groups along stored axis 1
    sites = _fc_sites(out)
    assert sites
    for s in sites:
        assert s.eligible, s.reason
        assert s.axis == 1 and layout(s) == "channel", (s.node, s.axis)
    # idempotent: a second run changes nothing, byte for byte
    again = FcLayoutPass()(out)
    assert not again.modified and not again.records
    assert again.model.model.SerializeToString(deterministic=True) == out.SerializeToString(deterministic=True)


def test_matmul_2d_becomes_gemm_keeping_name_doc_and_metadata() -> None:
    model = mm_2d()
    out = FcLayoutPass()(model).model.model
    (node,) = out.graph.node
    assert (node.op_type, node.name, list(node.input), list(node.output)) == ("Gemm", "fc", ["X", "W"], ["Y"])
    assert helper.get_attribute_value(node.attribute[0]) == 1 and node.attribute[0].name == "transB"
    assert node.doc_string == "the fc layer"
    assert [(p.key, p.value) for p in node.metadata_props] == [("origin", "torch.nn.Linear")]
    (w,) = out.graph.initializer
    assert w.name == "W" and list(w.dims) == [K, C]
    np.testing.assert_array_equal(numpy_helper.to_array(w), numpy_helper.to_array(model.graph.initializer[0]).T)


def test_matmul_3d_gets_transpose_inserted_before_it() -> None:
    out = FcLayoutPass()(mm_3d()).model.model
    assert [n.op_type for n in out.graph.node] == ["Transpose", "MatMul"]
    t, mm = out.graph.node
    assert t.name == "proj/fc_layout_transpose" and list(t.input) == ["W"]
    assert helper.get_attribute_value(t.attribute[0]) == [1, 0]
    assert mm.input[1] == t.output[0] and mm.name == "proj"


def test_gemm_transb_attribute_and_bias_alpha_beta_kept() -> None:
    out = FcLayoutPass()(gemm_transb0()).model.model
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs == {"alpha": 0.5, "beta": 2.0, "transB": 1}
    assert list(out.graph.node[0].input) == ["X", "W", "b"]


def test_shared_weight_transposed_once() -> None:
    model = shared_two_matmuls()
    result = FcLayoutPass()(model)
    (record,) = result.records
    assert record.nodes == ("fc_a", "fc_b", "fc_c") and record.weight == "W"
    (w,) = result.model.model.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(w), numpy_helper.to_array(model.graph.initializer[0]).T)


def test_constant_node_value_transposed() -> None:
    out = FcLayoutPass()(constant_node()).model.model
    const = out.graph.node[0]
    assert const.op_type == "Constant" and list(const.attribute[0].t.dims) == [K, C]


def test_fp16_cast_and_value_info_follow() -> None:
    result = FcLayoutPass()(fp16_cast())
    out = result.model.model
    assert out.graph.initializer[0].data_type == TensorProto.FLOAT16
    dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in out.graph.value_info}
    assert dims == {"W16": [K, C], "W32": [K, C]}
    assert any("value_info" in c for c in result.records[0].changes)


@pytest.mark.parametrize(
    ("build", "axes"),
    [
        (dq_per_axis, {"dq": 0}),
        (dq_per_axis_default, {"dq": 0}),
        (dq_per_axis_negative, {"dq": 0}),
        (qdq_float_per_axis, {"q": 0, "dq": 0}),
    ],
)
def test_per_axis_quant_axis_remapped(build, axes) -> None:
    out = FcLayoutPass()(build()).model.model
    for name, axis in axes.items():
        attrs = {a.name: helper.get_attribute_value(a) for a in _nodes(out)[name].attribute}
        assert attrs["axis"] == axis


def test_per_tensor_dq_untouched() -> None:
    model = dq_per_tensor()
    out = FcLayoutPass()(model).model.model
    assert _nodes(out)["dq"] == _nodes(model)["dq"]


def test_opset10_falls_back_to_transpose() -> None:
    out = FcLayoutPass()(opset10_matmul()).model.model
    assert [n.op_type for n in out.graph.node] == ["Transpose", "MatMul"]


def test_record_fields() -> None:
    (record,) = FcLayoutPass()(mm_2d()).records
    assert record.nodes == ("fc",) and record.weight == "W"
    assert record.old_shape == (C, K) and record.new_shape == (K, C)
    assert record.changes == ("fc: MatMul -> Gemm(transB=1)",)
    assert record.to_json()["new_shape"] == (K, C)


def test_unique_transpose_names() -> None:
    model = mm_3d()
    # the name the Transpose output would get is already taken
    model.graph.node.append(helper.make_node("Identity", ["Y"], ["proj/fc_layout_transpose_output"], name="taken"))
    model.graph.output.append(_vi("proj/fc_layout_transpose_output", ["B", "T", K]))
    out = FcLayoutPass()(model).model.model
    t = out.graph.node[0]
    assert t.op_type == "Transpose" and t.output[0] == "proj/fc_layout_transpose_output_1"
    onnx.checker.check_model(out, full_check=True)


# --------------------------------------------------------------------------- left as they are


def not_div4() -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")
    return _model([node], [_vi("X", ["N", 6])], [_vi("Y", ["N", K])], [_init("W", _w((6, K), 20))])


def already_channel_gemm() -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["X", "W"], ["Y"], name="gemm", transB=1)
    return _model([node], [_vi("X", ["N", C])], [_vi("Y", ["N", K])], [_init("W", _w((K, C), 21))])


def transpose_path() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Transpose", ["Wt"], ["W"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc"),
    ]
    return _model(nodes, [_vi("X", ["N", C])], [_vi("Y", ["N", K])], [_init("Wt", _w((K, C), 22))])


def reshape_path() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Reshape", ["W3", "shape"], ["W"], name="r"),
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc"),
    ]
    inits = [_init("W3", _w((1, C, K), 23)), _init("shape", np.array([C, K], np.int64))]
    return _model(nodes, [_vi("X", ["N", C])], [_vi("Y", ["N", K])], inits)


def shared_with_ineligible() -> onnx.ModelProto:
    # the same weight feeds an Add: not all of its uses would follow the transpose
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc"),
        helper.make_node("Add", ["W", "W"], ["Z"], name="add"),
    ]
    outputs = [_vi("Y", ["N", K]), _vi("Z", [C, K])]
    return _model(nodes, [_vi("X", ["N", C])], outputs, [_init("W", _w((C, K), 24))])


def shared_with_subgraph() -> onnx.ModelProto:
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Yt"], name="fc_then")], "then", [], [_vi("Yt", ["N", K])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["Y"], ["Ye"], name="id_else")], "else", [], [_vi("Ye", ["N", K])]
    )
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc"),
        helper.make_node("If", ["cond"], ["Z"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    inputs = [_vi("X", ["N", C]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    return _model(nodes, inputs, [_vi("Z", ["N", K])], [_init("W", _w((C, K), 25))])


def initializer_is_graph_input() -> onnx.ModelProto:
    model = mm_2d()
    model.graph.input.append(_vi("W", [C, K]))
    return model


def gemm_constant_a() -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["A", "X"], ["Y"], name="gemm")
    return _model([node], [_vi("X", [C, "N"])], [_vi("Y", [K, "N"])], [_init("A", _w((K, C), 26))])


UNTOUCHED = {
    "not_div4": not_div4,
    "already_channel_gemm": already_channel_gemm,
    "transpose_path": transpose_path,
    "reshape_path": reshape_path,
    "shared_with_ineligible": shared_with_ineligible,
    "shared_with_subgraph": shared_with_subgraph,
    "initializer_is_graph_input": initializer_is_graph_input,
    "gemm_constant_a": gemm_constant_a,
}


@pytest.mark.parametrize("case", sorted(UNTOUCHED))
def test_left_as_is(case: str) -> None:
    model = UNTOUCHED[case]()
    onnx.checker.check_model(model, full_check=True)
    result = FcLayoutPass()(model)
    assert not result.modified and not result.records
    assert result.model.model.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)


def test_reshape_path_is_eligible_but_skipped() -> None:
    (site,) = _fc_sites(reshape_path())
    assert site.eligible and site.path == ("Reshape",)


def test_subgraph_shared_weight_is_eligible_but_skipped() -> None:
    assert all(s.eligible for s in _fc_sites(shared_with_subgraph()))


def test_mixed_model_converts_only_the_eligible() -> None:
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["H"], name="fc1"),
        helper.make_node("MatMul", ["X6", "W6"], ["H6"], name="fc_bad"),
        helper.make_node("Add", ["H", "H6"], ["Y"], name="add"),
    ]
    inputs = [_vi("X", ["N", C]), _vi("X6", ["N", 6])]
    model = _model(nodes, inputs, [_vi("Y", ["N", K])], [_init("W", _w((C, K), 30)), _init("W6", _w((6, K), 31))])
    result = FcLayoutPass()(model)
    out = result.model.model
    assert [r.weight for r in result.records] == ["W"]
    assert _nodes(out)["fc_bad"] == _nodes(model)["fc_bad"]
    assert out.graph.initializer[1] == model.graph.initializer[1]
    _assert_same_outputs(model, out, _feed(model))


def test_skip_reason_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="onnx_sparse.passes.fc_layout"):
        FcLayoutPass()(reshape_path())
    assert "left fc (weight W3) as it is: stored shape (1, 8, 16) is not what the node sees" in caplog.text


FIXTURES = sorted((Path(__file__).resolve().parent.parent / "models").glob("*.onnx"))


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_case_models_keep_their_outputs(path: Path) -> None:
    model = onnx.load(str(path))
    result = FcLayoutPass()(model)
    out = result.model.model
    onnx.checker.check_model(out, full_check=True)
    _assert_untouched_meta(model, out)
    _assert_same_outputs(model, out, _feed(model))
    converted = {r.weight for r in result.records}
    for s in _fc_sites(out):
        if s.weight in converted:
            assert s.axis == 1 and layout(s) == "channel"
    assert not FcLayoutPass()(out).modified


# --------------------------------------------------------------------------- files, pruning, CLI


def _mlp() -> onnx.ModelProto:
    """2-D MatMul, 3-D MatMul (shared weight), Gemm transB=0, DQ per-axis, ineligible K=6."""
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H1"], name="fc1"),
        helper.make_node("Relu", ["H1"], ["R1"], name="relu"),
        helper.make_node("Gemm", ["R1", "W2", "b2"], ["H2"], name="fc2", transB=0, alpha=0.5),
        helper.make_node("DequantizeLinear", ["W3q", "s3"], ["W3"], name="dq", axis=1),
        helper.make_node("MatMul", ["H2", "W3"], ["Y"], name="fc3"),
        helper.make_node("MatMul", ["X3", "W1"], ["Y3"], name="fc1_seq"),
        helper.make_node("MatMul", ["X6", "W6"], ["Y6"], name="fc_bad"),
    ]
    inits = [
        _init("W1", _w((C, K), 40)),
        _init("W2", _w((K, 32), 41)),
        _init("b2", _w((32,), 42)),
        _init("W3q", np.random.RandomState(43).randint(-127, 128, size=(32, 8)).astype(np.int8)),
        _init("s3", np.full(8, 0.01, np.float32)),
        _init("W6", _w((6, K), 44)),
    ]
    inputs = [_vi("X", ["N", C]), _vi("X3", ["B", "T", C]), _vi("X6", ["N", 6])]
    outputs = [_vi("Y", ["N", 8]), _vi("Y3", ["B", "T", K]), _vi("Y6", ["N", K])]
    return _model(nodes, inputs, outputs, inits)


def _assert_pruned_channel_layout(model: onnx.ModelProto, base_dir: Path | None = None) -> None:
    sites = _fc_sites(model)
    eligible = [s for s in sites if s.eligible]
    assert {s.node for s in eligible} == {"fc1", "fc2", "fc3", "fc1_seq"}
    for s in eligible:
        assert s.axis == 1 and layout(s) == "channel", (s.node, s.axis)
        assert s.tensor is not None
        assert nm.is_2_4(read_tensor(s.tensor, base_dir), s.axis, zero_value(s)), s.node
    (bad,) = [s for s in sites if not s.eligible]
    assert bad.node == "fc_bad"


def test_prune_with_fc_layout() -> None:
    model = _mlp()
    before = model.SerializeToString(deterministic=True)
    out = prune(model, fc_layout=True)
    assert model.SerializeToString(deterministic=True) == before
    onnx.checker.check_model(out, full_check=True)
    _assert_untouched_meta(model, out)
    _assert_pruned_channel_layout(out)
    feed = _feed(model)
    outs = _run(out, feed)
    assert all(np.all(np.isfinite(o)) for o in outs)
    # fc_bad is neither transposed nor pruned: its output is exact
    np.testing.assert_array_equal(outs[2], _run(model, feed)[2])


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)  # fmt: skip
    return path


def test_external_data_file_round_trip(tmp_path: Path) -> None:
    src = _save_external(_mlp(), tmp_path / "mlp.onnx")
    mf = load_model(src)
    assert any(t.data_location == TensorProto.EXTERNAL for t in mf.model.graph.initializer)
    result = FcLayoutPass()(mf)
    assert {r.weight for r in result.records} == {"W1", "W2", "W3q"}
    dst = save_model(result.model, tmp_path / "mlp.fc.onnx")
    locations = {
        e.value
        for t in onnx.load(dst, load_external_data=False).graph.initializer
        for e in t.external_data
        if e.key == "location"
    }
    assert [(tmp_path / loc).is_file() for loc in locations] == [True]
    onnx.checker.check_model(str(dst), full_check=True)
    _assert_same_outputs(src, dst, _feed(_mlp()))
    # idempotent on the saved file too
    again = FcLayoutPass()(load_model(dst))
    assert not again.modified


def test_in_memory_model_file_without_base_dir() -> None:
    result = FcLayoutPass()(ModelFile(model=_mlp()))
    assert len(result.records) == 3


def test_cli_prune_fc_layout(tmp_path: Path) -> None:
    src = _save_external(_mlp(), tmp_path / "mlp.onnx")
    dst = tmp_path / "mlp.sparse.onnx"
    assert main(["prune", str(src), "-o", str(dst), "--fc-layout"]) == 0
    out = onnx.load(str(dst), load_external_data=False)
    _assert_untouched_meta(_mlp(), out)
    _assert_pruned_channel_layout(out, tmp_path)
    outs = _run(dst, _feed(_mlp()))
    assert all(np.all(np.isfinite(o)) for o in outs)
