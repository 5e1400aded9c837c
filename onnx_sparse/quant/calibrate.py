"""Activation statistics for INT8 and the choice of each activation's scale.

One onnxruntime run per calibration feed, with every tensor of interest exposed as an extra
output, gives per tensor (channels along one axis): the largest ``|x|`` per channel and a seeded
sample of rows ``[n, channels]`` (a few rows per feed, the same ones on every machine); for a
tensor the model reads only through a global max pool (:mod:`onnx_sparse.quant.pooling`), the
rows are what the pool reads of it: each sample's largest value per channel. That is
enough for the smoothing choice (:mod:`onnx_sparse.quant.smooth`) and for the scale of each
activation (:func:`choose_scale`).

Scales are per tensor and symmetric (zero point 0), what TensorRT takes for activations. A
scale is chosen by the error it causes downstream, not by a fixed percentile: each candidate
clip (a share of the largest ``|x|``) is scored by the squared quantization error of the sampled
rows, each channel weighted by how much the layers that read the tensor amplify it (the squared
norm of their weight columns for that channel), so clipping a rare outlier that the next layer
barely reads is cheap and rounding every small value of a channel it reads strongly is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnx_sparse.calib.data import require_finite, sample_number
from onnx_sparse.quant.pooling import max_pooled

__all__ = [
    "TensorStats",
    "collect",
    "collect_split",
    "collect_split_outputs",
    "choose_scale",
    "fake_quant",
    "CLIP_RATIOS",
    "ROWS_PER_TENSOR",
]

#: Candidate clips of an activation, as shares of its largest ``|x|``.
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
#: Rows sampled per tensor over the whole calibration set.
ROWS_PER_TENSOR = 1024
#: Calibration feeds the statistics read at most (evenly spread; half as many held-out ones).
MAX_FEEDS = 32
_QMAX = 127
_BLOCK = 1 << 17  # elements per block of :func:`rounding_error` (512 KB of float32)


@dataclass
class TensorStats:
    """What the calibration saw of one tensor (channels along ``axis``).

    Attributes:
        axis: The channel axis (last for MatMul/Gemm activations, 1 for Conv).
        amax: Largest ``|x|`` per channel ``[C]`` (float64).
        rows: Sampled rows ``[n, C]`` (float32), channels last.
        ndim: The tensor's rank (0: not known).
    """

    axis: int
    amax: np.ndarray
    rows: np.ndarray
    ndim: int = 0

    @property
    def absmax(self) -> float:
        return float(self.amax.max()) if self.amax.size else 0.0


def fake_quant(x: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` through a symmetric INT8 Q/DQ with ``scale`` (in ``x``'s float dtype); into ``out`` if given
    (an array of ``x``'s shape and dtype, ``x`` itself included), else a new array."""
    x = np.asarray(x)
    if out is None:
        out = np.empty_like(x)
    if scale <= 0:
        out[...] = 0
        return out
    np.multiply(x, x.dtype.type(1.0 / scale), out=out)
    np.rint(out, out=out)
    np.clip(out, -128, _QMAX, out=out)
    out *= x.dtype.type(scale)
    return out


def collect(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    axes: Mapping[str, int],
    rows_per_tensor: int = ROWS_PER_TENSOR,
    seed: int = 0,
    threads: int | None = None,
    serialized: Any = None,
) -> dict[str, TensorStats]:
    """Statistics of the tensors ``axes`` (name -> channel axis) over ``feeds`` (one run per feed).

    Tensors that are not float or have no element are left out of the result. ``serialized``:
    :func:`onnx_sparse.runtime.model_bytes` ``(model)`` (or its serialized bytes), when the caller
    has it (it is not made again). ``threads``: onnxruntime's intra-op threads (None: one, and the
    feeds run side by side in worker threads instead).
    """
    return collect_split(model, feeds, (), axes, rows_per_tensor, seed, threads, serialized)[0]


def collect_split(
    model: onnx.ModelProto,
    fit: Sequence[Mapping[str, np.ndarray]],
    held: Sequence[Mapping[str, np.ndarray]],
    axes: Mapping[str, int],
    rows_per_tensor: int = ROWS_PER_TENSOR,
    seed: int = 0,
    threads: int | None = None,
    serialized: Any = None,
) -> tuple[dict[str, TensorStats], dict[str, TensorStats]]:
    """:func:`collect` over ``fit`` and over ``held`` (one session, one run per feed)."""
    fit_stats, held_stats, _ = collect_split_outputs(
        model, fit, held, axes, (), rows_per_tensor, seed, threads, serialized
    )
    return fit_stats, held_stats


def collect_split_outputs(
    model: onnx.ModelProto,
    fit: Sequence[Mapping[str, np.ndarray]],
    held: Sequence[Mapping[str, np.ndarray]],
    axes: Mapping[str, int],
    outputs: Sequence[str],
    rows_per_tensor: int = ROWS_PER_TENSOR,
    seed: int = 0,
    threads: int | None = None,
    serialized: Any = None,
) -> tuple[dict[str, TensorStats], dict[str, TensorStats], list[list[np.ndarray]]]:
    """:func:`collect_split`, and the values of ``outputs`` (graph outputs) on each held-out feed it ran,
    in the order of the feeds (the held-out feeds are read in full when there are at most ``MAX_FEEDS // 2``)."""
    from onnx_sparse import runtime

    head = runtime.model_bytes(model) if serialized is None else serialized  # large weights read in place
    pooled = max_pooled(model, axes)
    probe = runtime.with_outputs(model, axes, head)  # the tensors as extra outputs (no model copy)
    # one intra-op thread (feeds run side by side instead, see _stats), not spinning between runs
    session = runtime.session(probe, what="the INT8 calibration", threads=threads or 1, spin=False)
    fit, held = _spread(fit, MAX_FEEDS), _spread(held, MAX_FEEDS // 2)
    fit_stats, _ = _stats(session, fit, axes, rows_per_tensor, seed, pooled)
    held_stats, values = _stats(session, held, axes, rows_per_tensor, seed + 1, pooled, outputs)
    return fit_stats, held_stats, values


def _spread(feeds: Sequence[Mapping[str, np.ndarray]], most: int) -> Sequence[Mapping[str, np.ndarray]]:
    """At most ``most`` feeds, evenly spread over the list (all of them when there are fewer)."""
    if len(feeds) <= most:
        return feeds
    return [feeds[(i * len(feeds)) // most] for i in range(most)]


def _stats(
    session: object,
    feeds: Sequence[Mapping[str, np.ndarray]],
    axes: Mapping[str, int],
    rows_per_tensor: int,
    seed: int,
    pooled: set[str],
    outputs: Sequence[str] = (),
) -> tuple[dict[str, TensorStats], list[list[np.ndarray]]]:
    """The statistics of ``axes`` over ``feeds``, and each feed's values of ``outputs``."""
    from onnx_sparse import runtime
    from onnx_sparse.core import blas

    names = list(axes)
    fetch = list(dict.fromkeys([*names, *outputs]))  # the tensors' indices k (the row samples' seeds) come first
    per_feed = max(1, -(-rows_per_tensor // max(1, len(feeds))))

    def feed_stats(
        item: tuple[int, Mapping[str, np.ndarray]],
    ) -> tuple[dict[str, tuple[int, np.ndarray, np.ndarray]], list[np.ndarray]]:
        """One feed's run: per float tensor its rank, largest ``|x|`` per channel and sampled rows."""
        i, feed = item
        number = sample_number(feed, i)
        got = runtime.run(session, fetch, feed, where=f"calibration sample {number}")
        values = got[: len(names)]
        kept = [got[fetch.index(o)] for o in outputs]
        out = {}
        for k, (name, value) in enumerate(zip(names, values, strict=True)):
            a = np.asarray(value)
            if a.dtype.kind != "f" or a.size == 0:
                continue
            ndim = a.ndim
            if a.ndim == 0:
                a = a.reshape(1)
            axis = axes[name] % a.ndim
            others = tuple(d for d in range(a.ndim) if d != axis)
            # max |x| as max(max x, -min x): the same values without an |a| copy of the whole tensor (+0.0: no -0)
            m = np.maximum(a.max(axis=others), -a.min(axis=others)).astype(np.float64) + 0.0
            require_finite((m,), name, number)
            if name in pooled and axis == 1 and a.ndim >= 3:  # what the pool reads: each sample's channel maxima
                out[name] = (ndim, m, np.asarray(a.max(axis=tuple(range(2, a.ndim))), dtype=np.float32))
                continue
            view = np.moveaxis(a, axis, -1)  # no copy: rows are gathered from it
            n = int(np.prod(view.shape[:-1]))
            if per_feed >= n:  # every row (what the sorted sample of all n would be), without drawing it
                out[name] = (ndim, m, np.asarray(view.reshape(n, view.shape[-1]), dtype=np.float32))
                continue
            rng = np.random.default_rng([seed, i, k])
            pick = np.sort(rng.choice(n, size=per_feed, replace=False))
            out[name] = (ndim, m, np.asarray(view[np.unravel_index(pick, view.shape[:-1])], dtype=np.float32))
        return out, kept

    amax: dict[str, np.ndarray] = {}
    ndim: dict[str, int] = {}
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    # each feed's run (onnxruntime on one intra-op thread, without the GIL) and its statistics in a worker,
    # side by side; what a feed gives depends on that feed alone, and is gathered here in the feeds' order
    kept: list[list[np.ndarray]] = []
    for got, values in blas.parallel_map(feed_stats, list(enumerate(feeds))):
        kept.append(values)
        for name, (dims, m, r) in got.items():
            ndim[name] = dims
            amax[name] = m if name not in amax else np.maximum(amax[name], m)
            rows[name].append(r)
    stats = {
        n: TensorStats(axes[n], amax[n], np.concatenate(rows[n]) if rows[n] else np.zeros((0, amax[n].size)), ndim[n])
        for n in names
        if n in amax
    }
    return stats, kept


def choose_scale(stats: TensorStats, weight: np.ndarray | None = None, ratios: Sequence[float] = CLIP_RATIOS) -> float:
    """The per-tensor scale (largest ``|x|`` times one of ``ratios``, over 127) with the smallest
    channel-weighted squared error on the sampled rows (``weight``: per channel, e.g. the squared
    column norms of the layers that read the tensor; None: all 1). Ties keep the larger range."""
    top = stats.absmax
    if top <= 0:
        return 1.0
    x = np.asarray(stats.rows, dtype=np.float32)
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    w = (w / max(float(w.max()), 1e-30)).astype(np.float32)
    best, best_err = top / _QMAX, np.inf
    buffer = np.empty_like(x)  # one for every clip's error
    for r in ratios:
        s = top * r / _QMAX
        d = rounding_error(x, s, buffer)
        err = float(np.sum(np.square(d, out=d).sum(axis=0) * w)) if x.size else 0.0
        if err < best_err * (1 - 1e-9):
            best, best_err = s, err
    return float(np.float32(best))


def rounding_error(x: np.ndarray, scale: float, out: np.ndarray) -> np.ndarray:
    """``fake_quant(x, scale) - x`` for rows ``x`` ``[n, ...]``, written into ``out`` (same shape and dtype;
    the same values), a block of rows at a time: each element's steps run on data still in the cache,
    and no new array is made (a fresh array of a few MB is a fresh mapping, a page fault per 4 KB)."""
    step = max(1, _BLOCK // max(1, int(np.prod(x.shape[1:], dtype=np.int64))))
    for i in range(0, len(x), step):
        xi, oi = x[i : i + step], out[i : i + step]
        fake_quant(xi, scale, out=oi)
        oi -= xi
    return out
