"""The INT8 steps' onnxruntime sessions run on one intra-op thread, with the feeds side by side in
worker threads (:mod:`onnx_sparse.quant.calibrate`, :mod:`onnx_sparse.quant.error`): the values,
and so the model and its report, are the same whatever the number of workers, and a value taken
once and reused is the value computed again."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from conftest import case_path

from onnx_sparse import api, runtime
from onnx_sparse.calib.data import model_inputs
from onnx_sparse.quant import QuantizeOptions, quantize
from onnx_sparse.quant.assemble import find_layers
from onnx_sparse.quant.calibrate import collect, collect_split
from onnx_sparse.quant.error import Int8Probe
from onnx_sparse.quant.static import _channel_axes, _main_layers, candidates, prepare


def _feeds(model: onnx.ModelProto, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for spec in model_inputs(model):
            shape = [d if isinstance(d, int) else 3 for d in spec.shape or ()]
            feed[spec.name] = (rng.standard_normal(shape) * rng.uniform(0.5, 4.0)).astype(spec.dtype)
        out.append(feed)
    return out


@pytest.fixture(scope="module")
def mlp() -> onnx.ModelProto:
    return api.prune(onnx.load(case_path("mlp.onnx")))


def _workers(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", str(n))


def _same_stats(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].axis == b[name].axis and a[name].ndim == b[name].ndim
        assert a[name].amax.tobytes() == b[name].amax.tobytes()
        assert a[name].rows.dtype == b[name].rows.dtype and a[name].rows.tobytes() == b[name].rows.tobytes()


@pytest.mark.parametrize("rows", [4, 1024])  # rows drawn from each feed / every row of each feed
def test_calibration_statistics_do_not_depend_on_the_workers(
    mlp: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    model = prepare(mlp)
    nodes, _ = candidates(model, QuantizeOptions())
    axes = _channel_axes(find_layers(model, nodes))
    fit, held = _feeds(model, 9), _feeds(model, 4, seed=1)
    got = []
    for n in (1, 2, 3):
        _workers(monkeypatch, n)
        got.append(collect_split(model, fit, held, axes, rows_per_tensor=rows))
    for other in got[1:]:
        _same_stats(got[0][0], other[0])
        _same_stats(got[0][1], other[1])
    if rows >= 1024:  # every row of every feed, in the feeds' order: the first feed's rows lead
        first = collect(model, fit[:1], axes, rows_per_tensor=rows)
        for name, st in got[0][0].items():
            assert len(st.rows) > len(first[name].rows)
            assert st.rows[: len(first[name].rows)].tobytes() == first[name].rows.tobytes()


def test_probe_runs_and_errors_do_not_depend_on_the_workers(
    mlp: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    feeds = _feeds(mlp, 10)
    q = quantize(mlp, feeds, QuantizeOptions(target_cosine=None)).model.model
    names = [o.name for o in q.graph.output]
    layers = _main_layers(q)
    _workers(monkeypatch, 1)
    one = Int8Probe(q)
    runs = [one.run(names, f, where="a test feed") for f in feeds]
    errors = one.errors(layers, feeds)
    assert sum(e.worst > 0 for e in errors.values()) >= 3  # bmm, two activations, is not INT8
    for n in (1, 2, 3):
        _workers(monkeypatch, n)
        probe = Int8Probe(q)
        many = probe.run_many(names, feeds, where="a test feed")
        assert [[a.tobytes() for a in r] for r in many] == [[a.tobytes() for a in r] for r in runs]
        assert probe.errors(layers, feeds) == errors
        # sums taken by runs on some of the feeds (errors_later) are the sums errors() computes itself
        reused = Int8Probe(q)
        reused.errors_later(feeds[:8])
        reused.run_many(names, feeds[3:12:2], where="a test feed")
        assert reused._sums and set(reused._sums) <= {id(f) for f in feeds[:8]}
        assert reused.errors(layers, feeds) == errors


def test_int8_sessions_use_one_intra_op_thread(mlp: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every session of the INT8 steps is opened with one intra-op thread (onnxruntime's default is
    one per core, which made the fidelity and the report's errors depend on the machine)."""
    seen: list[tuple[str, Any]] = []
    opened = runtime.session

    def spy(model: Any, **kwargs: Any) -> Any:
        seen.append((kwargs.get("what", ""), kwargs.get("threads")))
        return opened(model, **kwargs)

    monkeypatch.setattr(runtime, "session", spy)
    for smooth in (True, False):  # without the rescaling, finish opens the FP32 reference itself
        quantize(mlp, _feeds(mlp, 8), QuantizeOptions(target_cosine=1.0, holdout=0.5, smooth=smooth))
    whats = {w for w, _ in seen}
    assert {"the INT8 calibration", "the FP32 reference", "the INT8 candidate"} <= whats
    assert all(t == 1 for _, t in seen), seen


def test_quantize_gives_the_same_model_and_report_with_one_or_two_workers(
    mlp: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    feeds = _feeds(mlp, 12)
    out = []
    for n in (1, 2):
        _workers(monkeypatch, n)
        r = quantize(mlp, feeds, QuantizeOptions(target_cosine=1.0, holdout=0.5))
        out.append((r.model.model.SerializeToString(), [x.to_json() for x in r.layers], r.fallback))
    assert out[0] == out[1]


def _smoothing_case() -> onnx.ModelProto:
    """LayerNorm (an outlier channel in gamma) -> MatMul (INT8) and a residual Add; the MatMul's output
    times outlier channels (a Mul, which cannot take 1/v) -> MatMul (INT8) and a float Neg: the
    rescaling folds into the LayerNorm (a restore for the residual) and rescales the Mul's output by an
    explicit Mul."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    c = 16
    gamma = rng.uniform(0.5, 1.5, c)
    gamma[3] = 60.0
    s = rng.uniform(0.5, 1.5, c)
    s[[5, 11]] = 80.0
    inits = {
        "gamma": gamma,
        "beta": rng.normal(size=c) * 0.1,
        "W1": rng.normal(size=(c, c)),
        "s": s,
        "W2": rng.normal(size=(c, 8)),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "W1"], ["h"], name="mm1"),
        helper.make_node("Add", ["ln", "x"], ["res"], name="residual"),
        helper.make_node("Mul", ["h", "s"], ["t"], name="outliers"),
        helper.make_node("MatMul", ["t", "W2"], ["y"], name="mm2"),
        helper.make_node("Neg", ["t"], ["z"], name="neg"),
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [2, 5, c])],
        [
            vi("y", TensorProto.FLOAT, [2, 5, 8]),
            vi("res", TensorProto.FLOAT, [2, 5, c]),
            vi("z", TensorProto.FLOAT, [2, 5, c]),
        ],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_smooth_collect_statistics_are_the_rescaled_models() -> None:
    """smooth_collect's statistics of the rescaled copy (derived, not taken again) are what a fresh run of
    that copy gives: amax and every row divided by v where it was rescaled (folded or an explicit Mul),
    the same elsewhere; and the copy and choices are smooth_model's."""
    from onnx_sparse.calib.data import split_holdout
    from onnx_sparse.quant.static import smooth_collect, smooth_model

    model = prepare(_smoothing_case())
    nodes = sorted(x.node for x in find_layers(model, ["mm1", "mm2"]))
    fit, held = split_holdout(_feeds(model, 12), 0.25)
    out, choices, stats, reference = smooth_collect(model, nodes, fit, held)
    ref, ref_choices = smooth_model(model, nodes, fit, held)
    assert out.SerializeToString() == ref.SerializeToString()
    assert [(c.tensor, c.how) for c in choices] == [(c.tensor, c.how) for c in ref_choices]
    chosen = {c.tensor for c in choices if c.v is not None}
    assert {"ln", "t"} <= chosen  # a fold and an explicit Mul: the derivation is tested on both
    axes = _channel_axes(find_layers(out, nodes))
    assert "t" in axes and any(t != "t" and t.startswith("t") for t in axes)  # the Mul's output, and its input
    fresh = collect(out, fit, axes)
    assert list(stats) == list(fresh) and set(fresh) == set(axes)
    for name in fresh:
        assert stats[name].axis == fresh[name].axis and stats[name].ndim == fresh[name].ndim
        np.testing.assert_allclose(stats[name].amax, fresh[name].amax, rtol=1e-5)
        assert stats[name].rows.shape == fresh[name].rows.shape  # every row of these small feeds
        np.testing.assert_allclose(stats[name].rows, fresh[name].rows, rtol=1e-4, atol=1e-6 * fresh[name].absmax)
    # the FP32 reference: the graph outputs on each held-out feed, in order (the rescaled copy's, to rounding)
    session = runtime.session(runtime.model_bytes(out), what="the rescaled copy", threads=1)
    names = [o.name for o in out.graph.output]
    assert len(reference) == len(held) > 0
    for got, feed in zip(reference, held, strict=True):
        for a, b in zip(got, runtime.run(session, names, feed, where="a held-out feed"), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def _count_runs(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[str]]:
    """Record, from now on, how many feeds each set of statistics runs and what each session is opened for."""
    from onnx_sparse.quant import calibrate

    runs: list[int] = []
    taken = calibrate._stats

    def counted(session: Any, feeds: Any, *args: Any) -> Any:
        runs.append(len(feeds))
        return taken(session, feeds, *args)

    opened: list[str] = []
    session = runtime.session

    def recorded(*args: Any, **kwargs: Any) -> Any:
        opened.append(kwargs.get("what", ""))
        return session(*args, **kwargs)

    monkeypatch.setattr(calibrate, "_stats", counted)
    monkeypatch.setattr(runtime, "session", recorded)
    return runs, opened


@pytest.mark.parametrize("joint", [False, True])
def test_prune_int8_takes_the_statistics_once(monkeypatch: pytest.MonkeyPatch, joint: bool) -> None:
    """prune --int8 (no joint walk) chooses the rescaling on the pruned model and finish reads those
    statistics and takes the held-out runs' outputs as its FP32 reference: one run per fitting and
    held-out feed, not a dense set, then a pruned one and the reference; the joint walk needs the
    rescaling before the prune (a dense set, then the pruned model's, and the reference)."""
    from onnx_sparse.calib.data import split_holdout
    from onnx_sparse.recipe import Recipe

    dense = onnx.load(case_path("mlp.onnx"))
    feeds = _feeds(dense, 12)
    fit, held = split_holdout(feeds, QuantizeOptions().holdout)
    runs, opened = _count_runs(monkeypatch)
    api.prune(dense, Recipe(int8=True, int8_joint=joint), calibration=feeds)
    assert sum(runs) == (2 * len(fit) + len(held) if joint else len(fit) + len(held))
    # the held-out runs of the statistics give the search its FP32 reference: no session of its own
    assert ("the FP32 reference" in opened) == joint


@pytest.mark.parametrize("smooth", [True, False])
def test_quantize_takes_the_statistics_once(monkeypatch: pytest.MonkeyPatch, smooth: bool) -> None:
    """quantize with the rescaling chooses it and takes finish's statistics and FP32 reference from one set
    of runs (one per fitting and held-out feed), as prune --int8 does: no second set of statistics and
    no reference session of its own; without the rescaling, finish takes them itself."""
    from onnx_sparse.calib.data import split_holdout

    dense = onnx.load(case_path("mlp.onnx"))
    feeds = _feeds(dense, 12)
    fit, held = split_holdout(feeds, QuantizeOptions().holdout)
    runs, opened = _count_runs(monkeypatch)
    quantize(dense, feeds, QuantizeOptions(smooth=smooth))
    assert sum(runs) == (len(fit) + len(held) if smooth else len(fit))
    assert ("the FP32 reference" in opened) == (not smooth)
