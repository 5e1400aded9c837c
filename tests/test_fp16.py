"""The fp16 pass for TensorRT 11: zeros kept, Q/DQ weights untouched, IO/opsets/metadata/functions kept."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.core.nm import is_2_4, prune_2_4
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.passes.fp16 import Fp16Pass, has_qdq, is_fp16, to_fp16

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def conv_matmul_model(conv_w: np.ndarray | None = None, fc_w: np.ndarray | None = None) -> onnx.ModelProto:
    """x[2,8,6,6] -> Conv(16,8,3,3)+bias -> Relu -> GlobalAveragePool -> Flatten -> MatMul(16,12) -> Add -> y.

    Also: an unnamed Relu, a model-local function (local.Act = Relu) applied to the result,
    metadata_props, a second opset domain for the function.
    """
    rng = np.random.default_rng(0)
    conv_w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2 if conv_w is None else conv_w
    fc_w = rng.standard_normal((16, 12)).astype(np.float32) * 0.3 if fc_w is None else fc_w
    inits = [
        numpy_helper.from_array(conv_w, "conv.weight"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "conv.bias"),
        numpy_helper.from_array(fc_w, "fc.weight"),
        numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),  # unnamed on purpose
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc.weight"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "fc.bias"], ["a"], name="fc_bias"),
        helper.make_node("Act", ["a"], ["y"], name="act", domain="local"),
    ]
    fn = helper.make_function(
        "local", "Act", ["X"], ["Y"], [helper.make_node("Relu", ["X"], ["Y"])], [helper.make_opsetid("", 17)]
    )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [2, 8, 6, 6])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 12])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[fn]
    )
    model.ir_version = 8
    helper.set_model_props(model, {"source": "test", "onnx_sparse.note": "kept"})
    onnx.checker.check_model(model, full_check=True)
    return model


def qdq_model(opset: int) -> onnx.ModelProto:
    """Q/DQ activation + int8 per-channel weight (zero point 0) -> Conv."""
    rng = np.random.default_rng(1)
    wq = prune_2_4(rng.integers(-127, 128, (16, 8, 3, 3)).astype(np.int8), axis=1)
    inits = [
        numpy_helper.from_array(wq, "w_q"),
        numpy_helper.from_array(rng.uniform(0.001, 0.01, 16).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(16, np.int8), "w_zp"),
        numpy_helper.from_array(np.float32(0.02), "x_scale"),
        numpy_helper.from_array(np.int8(0), "x_zp"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w", axis=0),
        helper.make_node("Conv", ["xd", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [1, 8, 5, 5])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 16, 5, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 19 else 9
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).standard_normal((2, 8, 6, 6)).astype(np.float32)}


def test_converts_and_runs_close_to_fp32(feed) -> None:
    model = conv_matmul_model()
    before = model.SerializeToString(deterministic=True)
    out = to_fp16(model)
    assert model.SerializeToString(deterministic=True) == before, "the input model was modified"
    onnx.checker.check_model(out, full_check=True)
    assert init(out, "conv.weight").dtype == np.float16 and init(out, "fc.weight").dtype == np.float16
    (ref,) = run(model, feed)
    (got,) = run(out, feed)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2)


def test_keeps_io_types_opsets_metadata_functions_and_names() -> None:
    model = conv_matmul_model()
    out = to_fp16(model)
    assert [i.type.tensor_type.elem_type for i in out.graph.input] == [FLOAT]
    assert [o.type.tensor_type.elem_type for o in out.graph.output] == [FLOAT]
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert list(out.opset_import) == list(model.opset_import)
    assert list(out.metadata_props) == list(model.metadata_props)
    assert list(out.functions) == list(model.functions)
    assert out.ir_version == model.ir_version
    ops = {n.name: n.op_type for n in out.graph.node if n.op_type != "Cast"}
    assert ops == {"conv": "Conv", "": "Relu", "pool": "GlobalAveragePool", "flatten": "Flatten", "fc": "MatMul",
                   "fc_bias": "Add", "act": "Act"}  # fmt: skip
    cast_names = [n.name for n in out.graph.node if n.op_type == "Cast"]
    assert len(cast_names) == len(set(cast_names)) == 2


def test_keep_io_types_false_makes_io_fp16(feed) -> None:
    out = to_fp16(conv_matmul_model(), keep_io_types=False)
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.input[0].type.tensor_type.elem_type == HALF
    assert out.graph.output[0].type.tensor_type.elem_type == HALF
    (got,) = run(out, {"x": feed["x"].astype(np.float16)})
    assert got.dtype == np.float16


def test_2_4_zeros_survive_exactly() -> None:
    rng = np.random.default_rng(3)
    conv_w = prune_2_4(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), axis=1)
    fc_w = prune_2_4(rng.standard_normal((16, 12)).astype(np.float32), axis=0)
    # Values that would flush to 0 in a plain fp16 cast, values beyond the converter's default
    # 1e4 clamp, and a negative zero, all in kept positions.
    kept = np.flatnonzero(conv_w)
    conv_w.flat[kept[0]] = 1e-9
    conv_w.flat[kept[1]] = -1e-30
    conv_w.flat[kept[2]] = 2e4
    conv_w.flat[np.flatnonzero(conv_w == 0)[0]] = -0.0
    assert is_2_4(conv_w, 1) and is_2_4(fc_w, 0)
    out = to_fp16(conv_matmul_model(conv_w, fc_w))
    w16 = init(out, "conv.weight")
    f16 = init(out, "fc.weight")
    np.testing.assert_array_equal(w16 == 0, conv_w == 0)  # same zeros, no new ones
    np.testing.assert_array_equal(f16 == 0, fc_w == 0)
    assert is_2_4(w16, 1) and is_2_4(f16, 0)
    assert w16.flat[kept[0]] > 0 and w16.flat[kept[1]] < 0  # tiny values kept, sign kept
    assert w16.flat[kept[2]] == np.float16(2e4)  # representable: not clamped to 1e4
    assert np.signbit(w16.flat[np.flatnonzero(conv_w == 0)[0]])


def test_plain_cast_would_only_add_zeros() -> None:
    # Why 2:4 cannot break: an fp16 cast maps 0 to 0; the only change to the zero pattern is
    # underflow, which adds zeros (at most 2 non-zeros per group stays true).
    w = prune_2_4(np.random.default_rng(4).standard_normal((8, 16)).astype(np.float32) * 1e-8, axis=1)
    cast = w.astype(np.float16)
    assert np.all((w == 0) <= (cast == 0))
    assert is_2_4(cast, 1)


def test_already_fp16_is_returned_unchanged(caplog) -> None:
    once = to_fp16(conv_matmul_model())
    assert is_fp16(once)
    with caplog.at_level(logging.INFO, logger="onnx_sparse"):
        twice = to_fp16(once)
    assert twice.SerializeToString(deterministic=True) == once.SerializeToString(deterministic=True)
    assert twice is not once
    assert "already" in caplog.text
    assert not is_fp16(conv_matmul_model())


def test_qdq_before_opset_19_keeps_fp32_scales(caplog) -> None:
    model = qdq_model(13)
    assert has_qdq(model)
    with caplog.at_level(logging.WARNING, logger="onnx_sparse"):
        out = to_fp16(model)
    assert "opset 13" in caplog.text
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_array_equal(init(out, "w_q"), init(model, "w_q"))  # int8 weight untouched
    assert init(out, "w_q").dtype == np.int8 and init(out, "w_zp").dtype == np.int8
    assert init(out, "w_scale").dtype == np.float32 and init(out, "x_scale").dtype == np.float32
    assert init(out, "b").dtype == np.float16
    x = np.random.default_rng(5).standard_normal((1, 8, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=2e-2, atol=5e-2)


def test_qdq_from_opset_19_uses_fp16_scales_without_casts() -> None:
    model = qdq_model(19)
    out = to_fp16(model)
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_array_equal(init(out, "w_q"), init(model, "w_q"))
    assert init(out, "w_scale").dtype == np.float16
    np.testing.assert_array_equal(init(out, "w_scale"), init(model, "w_scale").astype(np.float16))
    # DequantizeLinear feeds the Conv directly: nothing in between that could stop Q/DQ fusion.
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    producer = {o: n for n in out.graph.node for o in n.output}
    assert producer[conv.input[1]].op_type == "DequantizeLinear"
    assert producer[conv.input[0]].op_type == "DequantizeLinear"
    x = np.random.default_rng(5).standard_normal((1, 8, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=5e-2, atol=1e-1)


def test_external_data_is_refused(tmp_path) -> None:
    model = conv_matmul_model()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    lazy = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(OnnxSparseError, match="external data"):
        to_fp16(lazy)


def test_fp16_pass_reads_external_data(tmp_path, feed) -> None:
    from onnx_sparse.io import load_model

    model = conv_matmul_model()
    onnx.save(conv_matmul_model(), tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    result = Fp16Pass()(load_model(tmp_path / "m.onnx"))
    assert result.modified
    out = result.model.model
    assert all(not t.external_data for t in out.graph.initializer)
    np.testing.assert_allclose(run(out, feed)[0], run(model, feed)[0], rtol=2e-2, atol=2e-2)
    again = Fp16Pass()(out)
    assert not again.modified


def test_prune_then_fp16_on_external_data(tmp_path) -> None:
    # PrunePass keeps new values of external tensors pending; Fp16Pass must convert those.
    from onnx_sparse.io import load_model
    from onnx_sparse.passes.base import Sequential
    from onnx_sparse.passes.prune import PrunePass

    onnx.save(conv_matmul_model(), tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    result = Sequential([PrunePass(), Fp16Pass()])(load_model(tmp_path / "m.onnx"))
    out = result.model.model
    assert is_2_4(init(out, "conv.weight"), 1) and is_2_4(init(out, "fc.weight"), 0)
    assert init(out, "conv.weight").dtype == np.float16
