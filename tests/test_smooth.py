"""Tests for onnx_sparse.quant.smooth: per-channel rescaling leaves the float model's outputs unchanged
(within float tolerance), folds where it can, keeps zeros zero, and is chosen where it pays."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.core import nm
from onnx_sparse.quant.assemble import SMOOTH_IN, SMOOTH_OUT, find_layers
from onnx_sparse.quant.calibrate import TensorStats
from onnx_sparse.quant.smooth import amax_seen, choose, rescale


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _vi(name: str, shape: list) -> onnx.ValueInfoProto:
    if not shape:  # unknown shape
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _v(rng: np.random.Generator, c: int) -> np.ndarray:
    return np.exp(rng.normal(scale=1.5, size=c))


def _same(before: onnx.ModelProto, after: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    for a, b in zip(_run(before, feed), _run(after, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5 * float(np.abs(a).max()))


def test_layernorm_fold_with_a_residual_reader_restored() -> None:
    """LayerNorm -> {MatMul (INT8), residual Add}: gamma/beta take 1/v, the MatMul's input rows v,
    the residual reads an explicit Mul(v) restore; the outputs do not move."""
    rng = np.random.default_rng(0)
    c = 8
    w = nm.prune_2_4(rng.normal(size=(c, 12)), 0)  # MatMul B [K, N], 2:4 along K
    inits = {"gamma": rng.normal(size=c), "beta": rng.normal(size=c), "W": w}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "W"], ["y"], name="mm"),
        helper.make_node("Add", ["ln", "x"], ["res"], name="residual"),
    ]
    m = _model(nodes, [_vi("x", [2, 5, c])], [_vi("y", [2, 5, 12]), _vi("res", [2, 5, c])], inits)
    after = onnx.ModelProto()
    after.CopyFrom(m)
    how = rescale(after, "ln", -1, _v(rng, c), find_layers(after, ["mm"]))
    assert how.startswith("folded into") and "gamma" in how and "beta" in how
    assert any(n.name.startswith(SMOOTH_OUT) for n in after.graph.node)
    assert not any(n.name.startswith(SMOOTH_IN) for n in after.graph.node)
    new_w = numpy_helper.to_array(next(t for t in after.graph.initializer if t.name == "W"))
    assert np.array_equal(new_w == 0, w == 0) and nm.is_2_4(new_w, 0)
    _same(m, after, {"x": rng.normal(size=(2, 5, c)).astype(np.float32)})


def test_output_equalisation_of_a_graph_output_keeps_its_name() -> None:
    """MatMul -> Add(bias) -> graph output: the weight's output columns and the bias take 1/v and a
    Mul(v) restore gives the graph output under its own name."""
    rng = np.random.default_rng(1)
    inits = {"W": rng.normal(size=(8, 6)), "b": rng.normal(size=6)}
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm_out"], name="mm"),
        helper.make_node("Add", ["mm_out", "b"], ["y"], name="bias"),
    ]
    m = _model(nodes, [_vi("x", [3, 8])], [_vi("y", [3, 6])], inits)
    after = onnx.ModelProto()
    after.CopyFrom(m)
    how = rescale(after, "y", -1, _v(rng, 6), [])
    assert "W" in how and "b" in how
    assert [o.name for o in after.graph.output] == ["y"]
    onnx.checker.check_model(after)
    _same(m, after, {"x": rng.normal(size=(3, 8)).astype(np.float32)})


def test_conv_relu_conv_folds_through_relu_without_a_mul() -> None:
    rng = np.random.default_rng(2)
    inits = {
        "W1": rng.normal(size=(8, 4, 3, 3)),
        "b1": rng.normal(size=8),
        "W2": nm.prune_2_4(rng.normal(size=(4, 8, 1, 1)), 1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["y"], name="conv2"),
    ]
    m = _model(nodes, [_vi("x", [1, 4, 6, 6])], [_vi("y", [1, 4, 6, 6])], inits)
    after = onnx.ModelProto()
    after.CopyFrom(m)
    how = rescale(after, "r1", 1, _v(rng, 8), find_layers(after, ["conv2"]))
    assert "W1" in how and "b1" in how
    assert len(after.graph.node) == 3  # no Mul anywhere
    _same(m, after, {"x": rng.normal(size=(1, 4, 6, 6)).astype(np.float32)})


def test_explicit_mul_when_the_producer_cannot_fold() -> None:
    """Tanh -> MatMul (and Tanh -> a float reader): Mul(1/v) feeds only the INT8 layer."""
    rng = np.random.default_rng(3)
    inits = {"W": rng.normal(size=(8, 4))}
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("MatMul", ["t", "W"], ["y"], name="mm"),
        helper.make_node("Neg", ["t"], ["z"]),
    ]
    m = _model(nodes, [_vi("x", [5, 8])], [_vi("y", [5, 4]), _vi("z", [5, 8])], inits)
    after = onnx.ModelProto()
    after.CopyFrom(m)
    assert rescale(after, "t", -1, _v(rng, 8), find_layers(after, ["mm"])) == "explicit Mul"
    mul = next(n for n in after.graph.node if n.name.startswith(SMOOTH_IN))
    assert next(n for n in after.graph.node if n.op_type == "Neg").input[0] == "t"
    assert next(n for n in after.graph.node if n.name == "mm").input[0] == mul.output[0]
    _same(m, after, {"x": rng.normal(size=(5, 8)).astype(np.float32)})


def _stats(x: np.ndarray) -> TensorStats:
    return TensorStats(-1, np.abs(x).max(axis=0).astype(np.float64), x.astype(np.float32))


def test_choice_smooths_an_outlier_channel_and_leaves_a_flat_tensor_alone() -> None:
    rng = np.random.default_rng(4)
    w = rng.normal(size=(16, 32))
    flat = rng.normal(size=(512, 16))
    spiky = flat.copy()
    spiky[:, 3] *= 60.0
    keep = choose("x", _stats(flat[:256]), _stats(flat[256:]), [(w, 1, 0)], producer_int8=False)
    assert keep.v is None and keep.how == "none"
    smooth = choose("x", _stats(spiky[:256]), _stats(spiky[256:]), [(w, 1, 0)], producer_int8=False)
    assert smooth.v is not None and smooth.error_after < 0.5 * smooth.error_before
    assert smooth.v[3] == pytest.approx(smooth.v.max())


def test_a_channel_never_seen_active_is_not_magnified() -> None:
    """A channel that is 0 on every calibration row (a ReLU channel only some inputs wake) gets the ``v``
    of a median channel: when an input wakes it with a value of an ordinary channel's size, that value
    divided by ``v`` still lies inside the range the calibration rows set. SmoothQuant's ``v`` from a
    range of 0 magnified it 10^4 times (PP-OCRv4 det on a low-contrast photo: 2,500 times the range)."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(16, 32))
    x = rng.normal(size=(512, 16))
    x[:, 3] *= 60.0  # an outlier channel: the rescaling pays
    x[:, 7] = 0.0  # never active in calibration
    c = choose("x", _stats(x[:256]), _stats(x[256:]), [(w, 1, 0)], producer_int8=False)
    assert c.v is not None and c.how.startswith("smooth")
    calibrated_range = float(np.max(np.abs(x / c.v)))
    awake = float(np.median(np.abs(x).max(axis=0)[np.arange(16) != 7]))  # an ordinary channel's largest value
    assert awake / c.v[7] <= calibrated_range
    live = np.arange(16) != 7
    assert c.v[7] >= np.min(c.v[live])


def test_amax_seen_keeps_live_channels_and_lifts_dead_ones_to_the_median() -> None:
    amax = np.array([0.0, 1e-6, 0.5, 1.0, 2.0, 40.0])
    seen = amax_seen(amax)
    assert np.array_equal(seen[2:], amax[2:])  # live channels, the outlier too, unchanged
    assert np.all(seen[:2] == np.median(amax[amax > 0]))
    assert np.all(amax_seen(np.zeros(3)) > 0)  # an all-zero tensor: no division by 0 downstream


def test_conv1d_tensors_get_a_v_shaped_for_their_rank() -> None:
    """Rank-3 (N, C, T) Conv1d activations: the explicit Mul(1/v) on a Tanh output and the restoring
    Mul(v) of a folded Conv1d output both broadcast over C, not over T (silero-vad's decoder: a
    [C, 1, 1] v broadcast a [1, 128, 8] tensor to nonsense and onnxruntime refused it)."""
    rng = np.random.default_rng(7)
    c, t = 8, 5  # T != C and T != 1: a wrong broadcast fails or changes the output
    inits = {
        "W1": rng.normal(size=(c, 4, 3)),
        "b1": rng.normal(size=c),
        "W2": nm.prune_2_4(rng.normal(size=(4, c, 1)), 1),
    }
    nodes = [
        helper.make_node("Tanh", ["x"], ["h"]),
        helper.make_node("Conv", ["h", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1]),
        helper.make_node("Conv", ["c1", "W2"], ["y"], name="conv2"),
        helper.make_node("Neg", ["h"], ["z"]),
    ]
    m = _model(nodes, [_vi("x", [1, 4, t])], [_vi("y", [1, 4, t]), _vi("z", [1, 4, t]), _vi("c1", [1, c, t])], inits)
    feed = {"x": rng.normal(size=(1, 4, t)).astype(np.float32)}
    after = onnx.ModelProto()
    after.CopyFrom(m)
    # a folded rescale of conv1's output, which is also a graph output: restored by Mul(v) of shape [C, 1]
    assert "W1" in rescale(after, "c1", 1, _v(rng, c), find_layers(after, ["conv2"]), ndim=3)
    # an explicit Mul(1/v) on the Tanh output conv1 reads: shape [4, 1]
    assert rescale(after, "h", 1, _v(rng, 4), find_layers(after, ["conv1"]), ndim=3) == "explicit Mul"
    muls = [n for n in after.graph.node if n.op_type == "Mul"]
    assert any(n.name.startswith(SMOOTH_IN) for n in muls) and any(n.name.startswith(SMOOTH_OUT) for n in muls)
    inits_after = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    assert sorted(inits_after[n.input[1]].shape for n in muls) == [(4, 1), (c, 1)]
    _same(m, after, feed)
