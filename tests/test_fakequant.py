"""``prune --int8 --int8-fit-quantized``: the calibration computes and fits on what the INT8 model will see
(:mod:`onnx_sparse.calib.fakequant`, the capture's rounding, :func:`onnx_sparse.quant.capture_rounding`)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from conftest import case_path
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse import Recipe, api, runtime
from onnx_sparse.calib.capture import StagedRunner
from onnx_sparse.calib.fakequant import FakeQuant, QuantPoint
from onnx_sparse.io import ModelFile


def _relu_model(rank: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * rank)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * rank)
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    layout=st.sampled_from([(4, 1), (3, -1), (2, -1)]),
    per_channel=st.booleans(),
    spread=st.floats(1e-3, 1e3),
)
def test_the_pieces_round_exactly_as_numpy_does(
    seed: int, layout: tuple[int, int], per_channel: bool, spread: float
) -> None:
    """The rounding written into a piece (Mul, Round, Clip, Mul) and the one applied to a layer's own
    input give the same bits, per tensor and per channel, on either channel axis, ties and clipping
    included (values far outside the range, and exact halves of a step)."""
    rank, axis = layout
    rng = np.random.default_rng(seed)
    shape = [2, 5, 3, 4][:rank] if axis == 1 else [2, 3, 5][:rank]
    channels = shape[axis]
    scale = rng.uniform(0.01, 1.0, size=channels if per_channel else ()).astype(np.float32) * np.float32(spread / 100)
    x = (rng.standard_normal(shape) * spread).astype(np.float32)
    x.flat[:4] = np.float32(0.5) * np.asarray(scale).ravel()[0]  # a tie (half a step) where the scale allows it
    fq = FakeQuant({"x": QuantPoint(np.asarray(scale, np.float32), axis, rank, None)})
    nodes, consts = fq.rewrite(list(_relu_model(rank).graph.node), {"x", "y"})
    g = helper.make_graph(nodes, "g", _relu_model(rank).graph.input, _relu_model(rank).graph.output, consts)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    (got,) = runtime.session(model, optimize=False).run(None, {"x": x})
    want = np.maximum(fq.apply("x", x), 0)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    q = np.asarray(fq.apply("x", x)) * fq.points["x"].inverse
    assert np.allclose(q, np.rint(q), atol=1e-3) and q.min() >= -128 - 1e-3 and q.max() <= 127 + 1e-3


def _chain() -> onnx.ModelProto:
    """x -> MatMul(w1) -> h -> Relu -> r -> MatMul(w2) -> y, and r -> Neg -> z (a reader left float)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        helper.make_node("Neg", ["r"], ["z"], name="neg"),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 8]) for n in ("x", "y", "z")]
    g = helper.make_graph(nodes, "g", io[:1], io[1:], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_the_capture_computes_downstream_through_the_rounding() -> None:
    """With a rounding of ``h`` (every reader) and of ``r`` (read rounded by mm2 only), the values the
    runner hands out are unrounded, and what follows them was computed from the rounded ones."""
    model = _chain()
    feeds = [{"x": np.random.default_rng(i).standard_normal((16, 8)).astype(np.float32)} for i in range(3)]
    fq = FakeQuant({
        "h": QuantPoint(np.array(0.05, np.float32), -1, 2, None),
        "r": QuantPoint(np.linspace(0.02, 0.09, 8).astype(np.float32), -1, 2, frozenset({"mm2"})),
    })  # fmt: skip
    w2 = numpy_helper.to_array(model.graph.initializer[1])
    for _, values in StagedRunner(ModelFile(model), feeds, fake_quant=fq).iter_stage(["h", "r", "y", "z"]):
        h, r, y, z = (values[k] for k in ("h", "r", "y", "z"))
        assert np.array_equal(r, np.maximum(fq.apply("h", h), 0))  # Relu read the rounded h
        assert not np.array_equal(r, np.maximum(h, 0))
        assert np.array_equal(z, -r)  # Neg is not one of r's rounded readers
        assert np.allclose(y, fq.apply("r", r) @ w2, rtol=1e-5, atol=1e-5)  # mm2 is
        assert not np.allclose(y, r @ w2, rtol=1e-5, atol=1e-5)
    # without a rounding the same runner gives the float model
    for _, values in StagedRunner(ModelFile(model), feeds).iter_stage(["h", "r"]):
        assert np.array_equal(values["r"], np.maximum(values["h"], 0))


def _feeds(model: onnx.ModelProto, n: int = 8) -> list[dict[str, np.ndarray]]:
    from onnx_sparse.calib.data import model_inputs

    rng = np.random.default_rng(0)
    return [
        {s.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in s.shape or ()]).astype(s.dtype)
         for s in model_inputs(model)}
        for _ in range(n)
    ]  # fmt: skip


def test_each_layer_is_fitted_on_its_input_as_the_int8_model_rounds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``int8_fit_quantized`` every INT8 layer's statistics are gathered on inputs that lie on its
    input's INT8 grid (and only then); the model that comes out is a valid sparse INT8 model, not the
    one the plain recipe gives, and the same bytes on a second run."""
    from onnx_sparse.calib import stats as stats_module
    from onnx_sparse.passes import calibrated
    from onnx_sparse.quant import static

    seen: list[np.ndarray] = []
    made: list[FakeQuant] = []
    update = stats_module.LayerStats.update

    def recording_update(self, m, i, x, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(np.array(x))
        return update(self, m, i, x, *args, **kwargs)

    rounding = static.capture_rounding

    def keep(*args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(rounding(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(calibrated.LayerStats, "update", recording_update)
    monkeypatch.setattr(static, "capture_rounding", keep)
    import onnx_sparse.quant as quant_package

    monkeypatch.setattr(quant_package, "capture_rounding", keep)
    model = onnx.load(case_path("mlp.onnx"))
    feeds = _feeds(model)
    out = api.prune(model, Recipe(int8=True, int8_fit_quantized=True), calibration=feeds)
    onnx.checker.check_model(out, full_check=True)
    (fq,) = made
    assert {"x", "fc0_out", "relu1_out"} <= set(fq.points)

    def on_grid(x: np.ndarray) -> bool:
        for p in fq.points.values():
            if p.scale.ndim == 0 or p.scale.size == x.shape[-1]:
                q = x * p.inverse
                if np.allclose(q, np.rint(q), atol=1e-3):
                    return True
        return False

    assert seen and all(on_grid(x) for x in seen)
    seen.clear()
    plain = api.prune(model, Recipe(int8=True), calibration=feeds)
    assert seen and not any(on_grid(x) for x in seen)
    assert plain.SerializeToString() != out.SerializeToString()
    again = api.prune(model, Recipe(int8=True, int8_fit_quantized=True), calibration=feeds)
    digest = [hashlib.sha256(m.SerializeToString()).hexdigest() for m in (out, again)]
    assert digest[0] == digest[1]


def test_a_rescaled_tensor_is_rounded_with_one_scale_times_its_rescaling() -> None:
    """Where the outlier rescaling divides a tensor by ``v`` after the prune, the capture rounds the
    unscaled tensor with ``s * v`` per channel (one ``s``): the rounding of the rescaled model."""
    from onnx_sparse.quant import QuantizeOptions, apply_rescaling, candidates, capture_rounding, prepare
    from onnx_sparse.quant.smooth import Rescale

    model = prepare(api.prune(onnx.load(case_path("mlp.onnx"))))
    options = QuantizeOptions()
    nodes, _ = candidates(model, options)
    v = np.linspace(0.5, 2.0, 64)
    choices = [Rescale("x", v, "test", 0.0, 0.0)]
    smoothed = apply_rescaling(model, nodes, choices, {})
    fq = capture_rounding(model, smoothed, nodes, choices, _feeds(model), options)
    p = fq.points["x"]
    assert p.scale.shape == (64,) and p.readers == frozenset({"fc0"})
    s = p.scale / v
    assert np.allclose(s, s[0], rtol=1e-6)
    assert all(q.scale.ndim == 0 for name, q in fq.points.items() if name != "x")
    x = _feeds(model)[0]["x"]
    assert np.allclose(fq.apply("x", x), (np.rint(x / v / s[0]).clip(-128, 127) * s[0] * v), atol=1e-5)
