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
    quantize(mlp, _feeds(mlp, 8), QuantizeOptions(target_cosine=1.0, holdout=0.5))
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
