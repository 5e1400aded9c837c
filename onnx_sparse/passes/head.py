"""Find the pruned layers that feed a returned softmax, and refit them by KL divergence.

Used by :class:`~onnx_sparse.passes.calibrated.CalibratedPrunePass` with
``refit_head=True`` (CLI ``--refit-head``), after every layer has been fitted the usual way;
the refit itself is :func:`onnx_sparse.prune.head.refit_softmax_head`.

A pruned MatMul or Gemm is a *softmax head* when, on every calibration sample, one of the
model's outputs equals ``softmax(z)`` (or ``log_softmax(z)``) over the last axis, where ``z``
is the layer's output after its bias. This is checked on the numbers, not on the graph's
spelling, so a softmax exported as ``ReduceMax``/``Sub``/``Exp``/``ReduceSum``/``Div`` (as
jax2tf writes it), followed by an ``Identity``, counts too. A cheap graph test comes first:
the layer's output must reach a graph output within :data:`MAX_DEPTH` nodes without passing
through another MatMul, Gemm or Conv.

``z - x W^T`` must be the same on every row the refit uses (a constant bias; anything else,
such as a residual, is not a head). The rows of every 4th calibration sample are held out to choose
the refit's stopping step (every 4th row when there are fewer than 4 samples).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_sparse.calib.capture import StagedRunner, run_model
from onnx_sparse.calib.layers import LayerView
from onnx_sparse.graph.locate import WeightSite
from onnx_sparse.graph.weights import read_weight, zero_value
from onnx_sparse.io import ModelFile
from onnx_sparse.passes.bias_write import matmul_bias_add, shift_bias
from onnx_sparse.prune.head import HeadFit, refit_softmax_head, softmax

__all__ = [
    "HeadLayer", "head_candidates", "softmax_heads", "head_tensors", "refit_heads", "MAX_DEPTH", "WORK_PER_STEP",
    "MIN_ROWS", "MAX_STEPS", "MIN_STEPS", "WORK_TOTAL",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: Most nodes between a head's output and the graph output it feeds.
MAX_DEPTH = 16
#: Multiply-adds one refit step may spend on its rows (``rows x classes x features``): a
#: seeded subset of the rows is used beyond that, but never fewer than :data:`MIN_ROWS`.
#: (PP-OCRv4 rec's head, 6,625 classes x 120 features, keeps 1,024 rows per step.)
WORK_PER_STEP = 250_000_000
MIN_ROWS = 1024
#: Most refit steps (the held-out KL stops most refits earlier), and most multiply-adds over
#: all steps together: a head that costs more per step gets fewer steps, never fewer than
#: :data:`MIN_STEPS` (rec's head: 154 steps; magika's: 718; a small head: all 5,000).
MAX_STEPS = 5000
MIN_STEPS = 100
WORK_TOTAL = 125_000_000_000
_STOP = {"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "QLinearConv"}


@dataclass
class HeadLayer:
    """A candidate head: its (only) site, its view, and the dense stored weight (a copy, made
    only for the candidates :func:`softmax_heads` keeps: before any weight is rewritten)."""

    site: WeightSite
    sharers: list[WeightSite]
    view: LayerView
    dense: np.ndarray | None = None


def _reaches_output(readers: Mapping[str, list[onnx.NodeProto]], outputs: set[str], start: str) -> bool:
    frontier, seen = [start], {start}
    for _ in range(MAX_DEPTH + 1):
        if any(t in outputs for t in frontier):
            return True
        nxt = []
        for t in frontier:
            for n in readers.get(t, []):
                if n.op_type in _STOP:
                    continue
                for o in n.output:
                    if o and o not in seen:
                        seen.add(o)
                        nxt.append(o)
        frontier = nxt
    return False


def head_candidates(mf: ModelFile, groups: Sequence[tuple[Sequence[WeightSite], LayerView | None]]) -> list[HeadLayer]:
    """The calibratable MatMul/Gemm layers whose output can reach a graph output (graph test only)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in mf.model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in mf.model.graph.output}
    out = []
    for sites, view in groups:
        if view is None or len(sites) != 1 or view.kind not in ("matmul", "gemm") or view.mask_only:
            continue
        site = sites[0]
        node = site.node_proto
        if node is None or not _reaches_output(readers, outputs, node.output[0]):
            continue
        out.append(HeadLayer(site, list(sites), view))
    return out


def _softmax_output(
    z: list[np.ndarray],
    outs: Sequence[Mapping[str, np.ndarray]],
    names: Sequence[str],
    keeps: Sequence[np.ndarray | None],
) -> tuple[str, bool] | None:
    """The graph output that is ``softmax(z)`` (False) or ``log_softmax(z)`` (True) on every
    sample (on the rows ``keeps`` marks, where a padding mask applies)."""
    for name in names:
        for log in (False, True):
            ok = True
            for zi, oi, keep in zip(z, outs, keeps, strict=True):
                o = np.asarray(oi[name])
                if o.shape != zi.shape or o.dtype.kind != "f":
                    ok = False
                    break
                s = softmax(zi)
                want = np.log(np.maximum(s, 1e-30)) if log else s
                if keep is not None:
                    o = o.reshape(-1, o.shape[-1])[keep]
                    want = want.reshape(-1, want.shape[-1])[keep]
                tol = 1e-3 if log else 1e-4
                if not _close(o, want, tol):
                    ok = False
                    break
            if ok:
                return name, log
    return None


def _close(o: np.ndarray, want: np.ndarray, atol: float) -> bool:
    """``np.allclose(o, want, atol=atol, rtol=1e-3)`` in float64, in fewer passes over the (classes wide)
    rows where every difference is within the bound (then it holds for allclose too: the bound is
    finite only where ``want`` is); anything else is left to allclose itself."""
    with np.errstate(invalid="ignore"):  # (inf - inf: left to allclose)
        diff = o.astype(np.float64)
        diff -= want
        np.abs(diff, out=diff)
        bound = np.abs(want)
        bound *= 1e-3
        bound += atol
        if bool(np.all(diff <= bound)):
            return True
    return bool(np.allclose(o.astype(np.float64), want, atol=atol, rtol=1e-3))


def _logits_names(runner: StagedRunner, mf: ModelFile, layers: Sequence[HeadLayer]) -> dict[int, str]:
    """Each layer's logits name (:func:`_logits_name`), by ``id`` of the layer."""
    return {id(layer): _logits_name(runner, mf, layer) for layer in layers}


def _logits_name(runner: StagedRunner, mf: ModelFile, layer: HeadLayer) -> str:
    node = layer.site.node_proto
    assert node is not None
    if layer.site.op == "MatMul":
        found = matmul_bias_add(runner, mf, node)
        if found is not None:
            return found[0].output[0]
    return node.output[0]


@dataclass(frozen=True)
class HeadResult:
    layer: HeadLayer
    fit: HeadFit | None
    new_stored: np.ndarray | None
    note: str


def refit_heads(
    mf: ModelFile,
    layers: Sequence[HeadLayer],
    feeds: Sequence[Mapping[str, np.ndarray]],
    dense_outputs: Sequence[Mapping[str, np.ndarray]],
    *,
    threads: int | None = None,
    seed: int = 0,
    row_mask: str | None = None,
    pruned: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> list[HeadResult]:
    """Refit every softmax head among ``layers`` in ``mf`` (already pruned); returns one result each.

    ``dense_outputs`` are the dense model's graph outputs on ``feeds``. Heads whose refit
    improves the held-out KL divergence get their new weight and bias written into ``mf``.
    ``row_mask`` names a graph input whose zeros mark padding (as for the layer-wise fits):
    rows of a ``[batch, seq, features]`` head input at those positions are left out.
    ``pruned``: per sample, the values of :func:`head_tensors` in the pruned model when the
    caller has them (the staged capture computes them at the end for the cost of the nodes
    after the last pruned layer); None runs the whole pruned model.
    """
    if not layers:
        return []
    runner = StagedRunner(mf, feeds, threads=threads)
    if pruned is None:
        logits, outs = _run_heads(mf, layers, runner, feeds, threads)
    else:
        logits = _logits_names(runner, mf, layers)
        outs = [{**feed, **out} for feed, out in zip(feeds, pruned, strict=True)]
    graph_outputs = [o.name for o in mf.model.graph.output]
    results = []
    for layer in layers:
        results.append(
            _refit_one(layer, logits[id(layer)], outs, dense_outputs, graph_outputs, runner, mf, seed, row_mask)
        )
    runner.commit()
    return results


def softmax_heads(
    mf: ModelFile,
    layers: Sequence[HeadLayer],
    feed: Mapping[str, np.ndarray],
    *,
    threads: int | None = None,
    row_mask: str | None = None,
) -> list[HeadLayer]:
    """The candidates among ``layers`` that feed a returned softmax on one calibration sample.

    A cheap screen before the refit's work over every sample (the dense model's outputs, the
    pruned model's values at the end of the capture): a layer that is not a softmax head on one
    sample is not one on all of them, so most models (encoders, detectors) skip it all.
    """
    if not layers:
        return []
    runner = StagedRunner(mf, [feed], threads=threads)
    logits, outs = _run_heads(mf, layers, runner, [feed], threads, prepack=False)
    graph_outputs = [o.name for o in mf.model.graph.output]
    heads = [layer for layer in layers if _softmax_of(layer, logits[id(layer)], outs, graph_outputs, row_mask)]
    for layer in heads:  # what the refit starts from and the record compares with
        layer.dense = np.array(read_weight(layer.site, mf, mmap=False))
    return heads


def head_tensors(mf: ModelFile, layers: Sequence[HeadLayer], feed: Mapping[str, np.ndarray]) -> list[str]:
    """What the refit reads from the pruned model: the graph outputs, then every head's input
    and logits (its output after the bias) that is not a graph input. A bias ``Add`` that bias
    correction inserts later takes over the MatMul's output name, so the names hold after it."""
    runner = StagedRunner(mf, [feed])
    logits = _logits_names(runner, mf, layers)
    return _head_tensors(mf, layers, logits, feed)


def _head_tensors(
    mf: ModelFile, layers: Sequence[HeadLayer], logits: Mapping[int, str], feed: Mapping[str, np.ndarray]
) -> list[str]:
    names = [o.name for o in mf.model.graph.output]
    for layer in layers:
        for name in (layer.site.activation, logits[id(layer)]):
            if name not in names and name not in feed:
                names.append(name)
    return names


def _run_heads(
    mf: ModelFile,
    layers: Sequence[HeadLayer],
    runner: StagedRunner,
    feeds: Sequence[Mapping[str, np.ndarray]],
    threads: int | None,
    *,
    prepack: bool = True,
) -> tuple[dict[int, str], list[dict[str, np.ndarray]]]:
    """Every layer's logits name (by ``id``) and, per sample, the model's outputs with every
    head's input and logits (and the feed itself: a head may read a graph input directly).
    ``prepack``: False for a single run (the screen): no pre-packed copy of the weights."""
    logits = _logits_names(runner, mf, layers)
    graph_outputs = [o.name for o in mf.model.graph.output]
    extra = [n for n in _head_tensors(mf, layers, logits, feeds[0]) if n not in graph_outputs]
    # the session reads the model's weights in place (no copy of the model, none serialized) and
    # makes no pre-packed copy of them for the screen's one run
    runs = run_model(mf, feeds, threads, outputs=extra, prepack=prepack)
    outs = [{**feed, **out} for feed, out in zip(feeds, runs, strict=True)]
    return logits, outs


def _softmax_of(
    layer: HeadLayer,
    z_name: str,
    outs: Sequence[Mapping[str, np.ndarray]],
    graph_outputs: Sequence[str],
    row_mask: str | None,
) -> tuple[str, bool, list[np.ndarray], list[np.ndarray | None]] | None:
    """The graph output that is the softmax (or log-softmax) of the layer's logits on every
    sample of ``outs`` (:func:`_softmax_output`), with the logits and the rows it was checked on."""
    site, view = layer.site, layer.view
    z = [np.asarray(o[z_name]) for o in outs]
    keeps = [
        np.asarray(o[row_mask]).reshape(-1) != 0
        if row_mask is not None and view.masks_rows(np.asarray(o[site.activation]), o[row_mask])
        else None
        for o in outs
    ]
    found = _softmax_output(z, outs, [n for n in graph_outputs if n != z_name], keeps)
    return None if found is None else (found[0], found[1], z, keeps)


def _gather_rows(columns: Sequence[Sequence[np.ndarray]], budget: int, seed: int) -> list[np.ndarray]:
    """Each of ``columns`` (per sample, arrays with the same rows) joined over the samples, or, when
    they hold more than ``budget`` rows, only a seeded choice of ``budget`` rows in their order:
    the same arrays as joining everything and then taking the choice, without the join."""
    counts = [len(part) for part in columns[0]]
    offsets = np.cumsum([0, *counts])
    total = int(offsets[-1])
    if total <= budget:
        return [np.concatenate(parts) for parts in columns]
    pick = np.sort(np.random.default_rng(seed).choice(total, budget, replace=False))
    owner = np.searchsorted(offsets, pick, side="right") - 1
    local = [pick[owner == i] - offsets[i] for i in range(len(counts))]
    return [np.concatenate([part[rows] for part, rows in zip(parts, local, strict=True)]) for parts in columns]


def _refit_one(
    layer: HeadLayer,
    z_name: str,
    outs: Sequence[Mapping[str, np.ndarray]],
    dense_outputs: Sequence[Mapping[str, np.ndarray]],
    graph_outputs: Sequence[str],
    runner: StagedRunner,
    mf: ModelFile,
    seed: int,
    row_mask: str | None,
) -> HeadResult:
    site, view = layer.site, layer.view
    found = _softmax_of(layer, z_name, outs, graph_outputs, row_mask)
    if found is None:
        return HeadResult(layer, None, None, "no model output is a softmax of its output")
    out_name, log, z, keeps = found
    classes = view.rows_per_group
    xs, zs, ps, fold = [], [], [], []
    for i, o in enumerate(outs):
        raw = np.asarray(o[site.activation])
        x = view.fc_input(raw).reshape(-1, view.cols)
        zi = z[i].reshape(-1, z[i].shape[-1])
        if zi.shape != (x.shape[0], classes):
            return HeadResult(layer, None, None, f"its output {z[i].shape} does not line up with its input rows")
        p = np.asarray(dense_outputs[i][out_name]).reshape(-1, classes)
        keep = keeps[i]
        if keep is not None:
            x, zi, p = x[keep], zi[keep], p[keep]
        xs.append(x)
        zs.append(zi)
        ps.append(p)
        fold.append(np.full(x.shape[0], i))
    # the rows the refit uses, chosen first: only they are gathered (not every sample's logits and
    # probabilities, classes wide, joined first), and the float64 copies and checks below touch only them
    budget = max(MIN_ROWS, WORK_PER_STEP // max(1, classes * view.cols))
    x_all, z_all, p_all, feed_of = _gather_rows([xs, zs, ps, fold], budget, seed)
    x_all, z_all, p_all = x_all.astype(np.float64), z_all.astype(np.float64), p_all.astype(np.float64)
    if log:
        p_all = np.exp(p_all)
    stored = np.array(read_weight(site, mf, mmap=False))
    (w,) = view.matrices(stored)
    w_eff = view.alpha * w
    resid = z_all - x_all @ w_eff.T
    b_eff = resid.mean(axis=0)
    if not np.allclose(resid, b_eff, atol=1e-4 * (1.0 + float(np.abs(z_all).max())), rtol=1e-4):
        return HeadResult(layer, None, None, "what is added to its output is not a constant bias")
    held = feed_of % 4 == 3 if len(outs) >= 4 else np.arange(x_all.shape[0]) % 4 == 3
    if held.all() or not held.any():
        return HeadResult(layer, None, None, "too few rows to hold some out")
    per_step = max(1, x_all.shape[0] * classes * view.cols)
    steps = int(max(MIN_STEPS, min(MAX_STEPS, WORK_TOTAL // per_step)))
    w_new, b_new, info = refit_softmax_head(w_eff, b_eff, x_all, p_all, held, steps=steps)
    if not info.improved:
        return HeadResult(layer, info, None, "no step improved the held-out KL divergence: layer-wise fit kept")
    new_stored = view.to_stored([w_new / view.alpha], stored, zero_value(site))
    shift = (b_new - b_eff) / view.alpha
    dtype = np.dtype(np.float32) if z[0].dtype.kind != "f" else z[0].dtype
    why = shift_bias(site, view, shift, runner, mf, dtype) if np.any(shift) else ""
    if why:
        return HeadResult(layer, info, None, f"layer-wise fit kept: {why}")
    return HeadResult(layer, info, new_stored, "")
