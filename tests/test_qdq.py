"""Per-layer INT8 state (onnx_sparse.graph.qdq) and the INT8-aware likely-sparse-kernel hint."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import case_path
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.analysis import int8_cell, layer_records, summarize
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.io import ModelFile


def _qdq_matmul(
    k: int = 16,
    n: int = 16,
    *,
    act_type: int = TensorProto.INT8,
    act_zp: int = 0,
    w_axis: int = 1,
    after: str = "q",  # q: QuantizeLinear on the output; relu_q: Relu then Q; softmax; output; q_and_softmax
    float_weight: bool = False,
) -> onnx.ModelProto:
    np_act = np.int8 if act_type == TensorProto.INT8 else np.uint8
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(act_zp, np_act), "zp"),
        numpy_helper.from_array(np.array(0, np.int8), "ozp"),
        numpy_helper.from_array(np.full(n if w_axis == 1 else k, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(n if w_axis == 1 else k, np.int8), "wzp"),
    ]
    w = np.random.default_rng(0).integers(-100, 100, (k, n)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="xd"),
    ]
    if float_weight:
        inits.append(numpy_helper.from_array(w.astype(np.float32) * 0.01, "w"))
        nodes.append(helper.make_node("QuantizeLinear", ["w", "ws", "wzp"], ["wq"], axis=w_axis, name="wq"))
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=w_axis, name="wd"))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=w_axis, name="wd"))
    nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["mm"], name="mm"))
    last = "mm"
    if after == "relu_q":
        nodes.append(helper.make_node("Relu", ["mm"], ["r"], name="relu"))
        last = "r"
    if after in ("q", "relu_q"):
        nodes.append(helper.make_node("QuantizeLinear", [last, "s", "ozp"], ["yq"], name="yq"))
        nodes.append(helper.make_node("DequantizeLinear", ["yq", "s", "ozp"], ["y"], name="yd"))
    elif after == "softmax":
        nodes.append(helper.make_node("Softmax", ["mm"], ["y"], name="sm"))
    elif after == "q_and_softmax":  # fan-out: one consumer quantizes, the other reads the float output
        nodes.append(helper.make_node("QuantizeLinear", ["mm", "s", "ozp"], ["yq"], name="yq"))
        nodes.append(helper.make_node("DequantizeLinear", ["yq", "s", "ozp"], ["yd"], name="yd"))
        nodes.append(helper.make_node("Softmax", ["mm"], ["sm"], name="sm"))
        nodes.append(helper.make_node("Add", ["yd", "sm"], ["y"], name="join"))
    else:
        nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model


def _site(model: onnx.ModelProto):
    (s,) = find_weight_sites(model)
    assert s.int8 is not None
    return s


def test_int8_in_weight_out() -> None:
    s = _site(_qdq_matmul())
    assert s.int8.possible and s.int8.quantized and s.int8.reason == ""


def test_output_through_a_fused_relu_still_counts() -> None:
    assert _site(_qdq_matmul(after="relu_q")).int8.possible


def test_output_counts_as_int8_only_when_every_consumer_quantizes() -> None:
    """Fan-out: a QuantizeLinear on one branch does not make the output INT8 while a Softmax reads it in float.

    TensorRT must keep the float value for the Softmax, so the layer dequantizes in its epilogue and
    no sparse INT8 kernel runs; saying "possible" here would be the wrong promise.
    """
    io = _site(_qdq_matmul(after="q_and_softmax")).int8
    assert io.quantized and not io.possible and io.missing == ["output"]
    assert io.output == "feeds QuantizeLinear, Softmax in float, not a QuantizeLinear"


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"after": "softmax"}, "output", "Softmax"),
        ({"after": "output"}, "output", "model output"),
        ({"act_type": TensorProto.UINT8}, "input", "uint8"),
        ({"act_zp": 3}, "input", "zero point"),
        ({"w_axis": 0}, "weight", "input-channel axis"),
        ({"float_weight": True}, "weight", "run time"),
    ],
    ids=["softmax-after", "model-output", "uint8-input", "input-zero-point", "scales-on-k", "weight-qdq-at-run-time"],
)
def test_what_is_not_int8_and_why(kwargs: dict, field: str, words: str) -> None:
    io = _site(_qdq_matmul(**kwargs)).int8
    assert not io.possible and io.missing == [field]
    assert words in getattr(io, field)


def test_float_model_is_not_quantized_at_all() -> None:
    sites = find_weight_sites(onnx.load(case_path("mlp.onnx")))
    assert all(x.int8 is not None and not x.int8.quantized and not x.int8.possible for x in sites)


def test_case_model_qdq_conv_has_float_output() -> None:
    (s,) = find_weight_sites(onnx.load(case_path("qdq_conv.onnx")))
    assert s.int8 is not None and s.int8.missing == ["output"]


@pytest.mark.parametrize(("width", "int8", "likely"), [(256, True, True), (128, True, False)])
def test_likely_hint_uses_the_int8_floor_when_int8(width: int, int8: bool, likely: bool) -> None:
    """Sparse INT8 possible: the 256-channel floor; the same layer in float would need 4096 (test_locate)."""
    s = _site(_qdq_matmul(width, width))
    assert s.eligible and s.int8.possible is int8 and s.likely_sparse_kernel is likely


def test_likely_hint_not_int8_out_uses_the_fp16_floor() -> None:
    s = _site(_qdq_matmul(256, 256, after="softmax"))
    assert s.eligible and not s.int8.possible and not s.likely_sparse_kernel


def test_records_and_column() -> None:
    model = _qdq_matmul(after="softmax")
    (r,) = layer_records(ModelFile(model))
    assert (r["int8_input"], r["int8_weight"], r["int8_output"]) == (True, True, False)
    assert r["sparse_int8_possible"] is False and "Softmax" in r["int8_missing"]
    assert int8_cell(r) == "no: out"
    (r,) = layer_records(ModelFile(_qdq_matmul()))
    assert int8_cell(r) == "no: out" if not r["eligible"] else int8_cell(r) == "yes"
    assert summarize([r])["sparse_int8_possible_layers"] == (1 if r["eligible"] else 0)
    (r,) = layer_records(ModelFile(onnx.load(case_path("conv_bn_folded.onnx"))))[:1]
    assert int8_cell(r) is None and r["sparse_int8_possible"] is False


def test_inspect_shows_int8(run_cli, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_qdq_matmul(after="softmax"), path)
    rc, text = run_cli(["inspect", path])
    assert rc == 0 and "no: out" in text and "0 of 1 eligible layers sparse INT8 possible" in text


def test_external_data_is_never_read(tmp_path) -> None:
    """Scales and weights stored as external data: the analysis reads dims only (no base folder needed)."""
    model = _qdq_matmul()
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              size_threshold=0, location="m.onnx.data")  # fmt: skip
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    inline = {t.name: t for t in _qdq_matmul().graph.initializer}  # onnx.save moved the first copy out
    for t in loaded.graph.initializer:
        if t.name in ("zp", "ozp", "wzp"):  # zero points are read (values matter); they are tiny, kept inline
            t.CopyFrom(inline[t.name])
    (s,) = find_weight_sites(loaded)
    assert s.int8 is not None and s.int8.possible


# --------------------------------------------------------------------------- edges the mutation run found unpinned


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def test_zero_point_in_a_constant_node_is_read() -> None:
    """Exporters store scales and zero points in Constant nodes too: a non-zero one there still counts."""
    model = _qdq_matmul(act_zp=3)
    zp = next(t for t in model.graph.initializer if t.name == "zp")
    model.graph.initializer.remove(zp)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["zp"], name="zp_c", value=zp))
    io = _site(model).int8
    assert io.missing == ["input"] and "zero point" in io.input


def test_int8_graph_input_behind_a_dequantize_counts() -> None:
    """The activation is an int8 model input read by a DequantizeLinear (no QuantizeLinear in the model)."""
    model = _qdq_matmul()
    model.graph.node.remove(_node(model, "xq"))
    _node(model, "xd").input[0] = "x"
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT8
    assert _site(model).int8.possible


def test_weight_through_an_identity_and_default_scale_axis() -> None:
    """An Identity between the weight's DequantizeLinear and the layer is looked through; a DequantizeLinear
    without an axis attribute has per-channel scales on axis 1, the output channels of a MatMul weight."""
    model = _qdq_matmul()
    wd = _node(model, "wd")
    del wd.attribute[:]  # default axis 1
    wd.output[0] = "wd0"
    model.graph.node.insert(
        list(model.graph.node).index(wd) + 1, helper.make_node("Identity", ["wd0"], ["wd"], name="wid")
    )
    io = _site(model).int8
    assert io.weight == "" and io.possible


def test_two_scales_along_the_input_channels_are_refused() -> None:
    io = _site(_qdq_matmul(k=2, n=16, w_axis=0)).int8
    assert "scales run along the input-channel axis 0" in io.weight


def test_layer_touched_only_by_its_output_quantizer_is_quantized() -> None:
    """Float input and weight, output quantized to uint8: the INT8 column must not be empty for it."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
        helper.make_node("QuantizeLinear", ["mm", "s", "zp"], ["yq"], name="yq"),
        helper.make_node("DequantizeLinear", ["yq", "s", "zp"], ["y"], name="yd"),
    ]
    inits = [
        numpy_helper.from_array(np.ones((16, 16), np.float32), "w"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)  # fmt: skip
    io = _site(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])).int8
    assert io.quantized and io.missing == ["input", "weight", "output"] and "uint8" in io.output


def _without_zero_points(model: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    for n in model.graph.node:
        if n.name in names:
            del n.input[2:]
    return model


def test_quantize_without_zero_point_defaults_to_uint8() -> None:
    """ONNX's QuantizeLinear without a zero point (and no output_dtype) makes uint8: not INT8 for TensorRT."""
    io = _site(_without_zero_points(_qdq_matmul(), "xq", "xd")).int8
    assert io.missing == ["input"] and io.input == "quantized to uint8, not int8"


def test_quantize_output_dtype_int8_without_zero_point_counts() -> None:
    """Opset 21: ``output_dtype=INT8`` on a QuantizeLinear with no zero point input is int8."""
    model = _without_zero_points(_qdq_matmul(), "xq", "xd", "yq", "yd")
    for n in model.graph.node:
        if n.name in ("xq", "yq"):
            n.attribute.append(helper.make_attribute("output_dtype", TensorProto.INT8))
    model.opset_import[0].version = 21
    assert _site(model).int8.possible


def test_dequantize_of_a_computed_value_has_an_unknown_type_not_a_crash() -> None:
    """A DequantizeLinear whose input is neither a constant, a graph input nor a QuantizeLinear."""
    model = _qdq_matmul()
    _node(model, "xd").input[0] = "xc"
    model.graph.node.insert(1, helper.make_node("Identity", ["xq"], ["xc"], name="xc"))
    io = _site(model).int8
    assert io.missing == ["input"] and "unknown" in io.input


def test_graph_index_constants() -> None:
    from onnx_sparse.graph.qdq import GraphIndex

    model = _qdq_matmul()
    index = GraphIndex(model)
    assert index.constant("zp") == 0 and index.constant("x") is None and index.constant("nope") is None
    ext = next(t for t in model.graph.initializer if t.name == "ws")
    ext.data_location = TensorProto.EXTERNAL  # stored outside: never read here
    assert GraphIndex(model).constant("ws") is None and GraphIndex(model).size("ws") == 16


@pytest.mark.parametrize(
    ("only", "field", "words"),
    [
        ("input", "", ""),
        ("weight", "", ""),
        ("weight_uint8", "weight", "uint8"),
        ("weight_runtime", "weight", "run time"),
        ("weight_on_k", "weight", "input-channel axis"),
    ],
)
def test_one_quantized_part_makes_the_layer_quantized(only: str, field: str, words: str) -> None:
    """The INT8 column is empty only for a layer no Q/DQ touches: one quantized part is enough to show it."""
    model = _qdq_matmul(w_axis=0 if only == "weight_on_k" else 1, float_weight=only == "weight_runtime", after="output")
    if only == "input":  # float weight: read the stored int8 weight as float data
        _node(model, "mm").input[1] = "wf"
        model.graph.initializer.append(numpy_helper.from_array(np.ones((16, 16), np.float32), "wf"))
    else:  # float input
        _node(model, "mm").input[0] = "x"
        if only == "weight_uint8":
            w = next(t for t in model.graph.initializer if t.name == "w")
            w.CopyFrom(numpy_helper.from_array(np.ones((16, 16), np.uint8), "w"))
            wzp = next(t for t in model.graph.initializer if t.name == "wzp")
            wzp.CopyFrom(numpy_helper.from_array(np.zeros(16, np.uint8), "wzp"))
    io = _site(model).int8
    assert io.quantized and not io.possible
    if field:
        assert words in getattr(io, field)


def test_unused_output_of_a_float_layer_is_not_quantized() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"), helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                              [numpy_helper.from_array(np.ones((16, 16), np.float32), "w")])  # fmt: skip
    io = _site(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])).int8
    assert io.output == "unused" and not io.quantized


def test_weight_scales_without_a_zero_point_and_per_tensor() -> None:
    on_k = _without_zero_points(_qdq_matmul(w_axis=0), "wd")
    assert "input-channel axis 0" in _site(on_k).int8.weight  # no zero point input: scales still checked
    assert _site(_without_zero_points(_qdq_matmul(), "wd")).int8.weight == ""  # int8 data, zero point 0 by default
    per_tensor = _qdq_matmul(w_axis=0)
    ws = next(t for t in per_tensor.graph.initializer if t.name == "ws")
    ws.CopyFrom(numpy_helper.from_array(np.array(0.01, np.float32), "ws"))
    wzp = next(t for t in per_tensor.graph.initializer if t.name == "wzp")
    wzp.CopyFrom(numpy_helper.from_array(np.array(0, np.int8), "wzp"))
    assert _site(per_tensor).int8.weight == ""  # one scale: its axis attribute means nothing


def _epilogue_model(add_inputs: list[str], float_layer: bool = False) -> onnx.ModelProto:
    """x -> [Q/DQ] -> MatMul -> Add(add_inputs) -> QuantizeLinear int8 -> DequantizeLinear -> y."""
    model = _qdq_matmul(after="output")
    mm = _node(model, "mm")
    mm.output[0] = "mm"
    if float_layer:
        mm.input[:] = ["x", "wf"]
        model.graph.initializer.append(numpy_helper.from_array(np.ones((16, 16), np.float32), "wf"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(16, np.float32), "bias"))
    model.graph.node.extend([
        helper.make_node("Add", add_inputs, ["sum"], name="add"),
        helper.make_node("QuantizeLinear", ["sum", "s", "ozp"], ["yq"], name="yq"),
        helper.make_node("DequantizeLinear", ["yq", "s", "ozp"], ["y"], name="yd"),
    ])  # fmt: skip
    return model


def test_bias_add_is_fused_whichever_side_the_bias_is_on() -> None:
    assert _site(_epilogue_model(["mm", "bias"])).int8.possible
    assert _site(_epilogue_model(["bias", "mm"])).int8.possible


def test_residual_add_of_another_activation_is_not_an_epilogue() -> None:
    """Adding another activation (a residual, named here to sort before the layer's output) is not a bias."""
    model = _epilogue_model(["mm", "a_res"])
    model.graph.input.append(helper.make_tensor_value_info("a_res", TensorProto.FLOAT, ["N", 16]))
    io = _site(model).int8
    assert io.missing == ["output"] and io.output == "feeds Add in float, not a QuantizeLinear"


def test_float_layer_with_an_int8_output_quantizer_is_quantized() -> None:
    io = _site(_epilogue_model(["mm", "bias"], float_layer=True)).int8
    assert io.quantized and io.output == "" and io.missing == ["input", "weight"]
