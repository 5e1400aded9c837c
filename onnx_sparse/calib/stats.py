"""The statistics one stored tensor needs during calibrated pruning, fed sample by sample.

:class:`LayerStats` buffers a layer's input rows (pruned model, and for ``asym`` the dense
model's too) and feeds them in large batches to the accumulators each method reads:
``X^T X`` (SparseGPT), column norms (Wanda), per-fold paired statistics (``asym``), column
means (bias correction), and the raw rows of a row-starved layer for its damping
cross-validation. The engine that captures and solves is
:mod:`onnx_sparse.passes.calibrated`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np

from onnx_sparse.calib.layers import LayerView
from onnx_sparse.core import blas
from onnx_sparse.core.hessian import Alloc, PairedStats, RunningMean, RunningStats
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.prune.select import held_out_folds

__all__ = ["LayerStats", "Scratch", "RowPool", "STARVED_ROWS_PER_COL", "CV_FOLDS"]

#: SparseGPT layers that saw fewer rows than columns (an FC head fed a small batch, a
#: squeeze-excitation conv that sees one row per image) have a singular ``X^T X``, and the
#: usual 1% damping lets the weight update overfit the calibration rows: their damping is
#: chosen by cross-validation over the calibration samples (:data:`CV_FOLDS` folds).
STARVED_ROWS_PER_COL = 1
#: Folds of that cross-validation (at most the number of samples).
CV_FOLDS = 3

#: Rows are buffered up to this many values (rows x columns) before they reach the
#: accumulators: a few large ``X^T X`` products are much faster than many small ones.
_FLUSH_VALUES = 1 << 22


class Scratch:
    """Buffers that a capture stage's statistics reuse instead of new arrays on every sample or
    flush: the rows a flush joins and the paired difference ``Xd - Xp`` (:meth:`take`), the
    arrays behind a layer's im2col chunks, lent until its next flush (:meth:`pool`), and the
    arrays an im2col passes through (:meth:`take` too).

    Those are tens of MB each; a new array that large is mapped fresh by the C library and costs
    a page fault per 4 KB every time (det's ``asym``: a million faults, 8 s of system time of 30).
    The values written, and the layouts of the arrays the sums read, are the same. Share one
    between the statistics of a capture stage (their flushes run one after the other) and
    :meth:`clear` it once the stage's rows are in.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}
        self._pools: dict[int, RowPool] = {}

    def take(self, key: str, shape: tuple[int, ...], dtype: np.dtype, order: str = "C") -> np.ndarray:
        """An uninitialised ``shape`` array of ``dtype`` in ``order`` ("C" or "F") for ``key``
        (valid until the next take of ``key``)."""
        need = math.prod(shape)
        buf = self._bufs.get(key)
        if buf is None or buf.dtype != dtype or buf.size < need:
            self._bufs.pop(key, None)  # the old one goes before the larger one is made
            buf = self._bufs[key] = np.empty(need, dtype=dtype)
        if order == "F":
            return buf[:need].reshape(shape[::-1]).T
        return buf[:need].reshape(shape)

    def pool(self, owner: int) -> RowPool:
        """The :class:`RowPool` of the statistics ``owner`` (their key)."""
        return self._pools.setdefault(owner, RowPool())

    def clear(self) -> None:
        """Let go of the buffers."""
        self._bufs.clear()
        self._pools.clear()


class RowPool:
    """Arrays lent to one layer's row producers (:meth:`LayerView.rows`) until the rows they hold
    have been fed to the accumulators (:meth:`reclaim`, at each flush), then lent again."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lent: list[np.ndarray] = []

    def lend(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised C-ordered ``shape`` array of ``dtype``, lent until :meth:`reclaim`."""
        dtype = np.dtype(dtype)
        need = math.prod(shape) * dtype.itemsize
        sizes = [b.nbytes for b in self._free]
        fits = [i for i, size in enumerate(sizes) if size >= need]
        if fits:
            buf = self._free.pop(min(fits, key=sizes.__getitem__))
        else:
            if self._free:  # the largest free one goes before a new one is made: no more than lent at once
                del self._free[max(range(len(sizes)), key=sizes.__getitem__)]
            buf = np.empty(need, dtype=np.uint8)
        self._lent.append(buf)
        return buf[:need].view(dtype).reshape(shape)

    def reclaim(self) -> None:
        """Everything lent may be lent again (what was made in it must no longer be read)."""
        self._free.extend(self._lent)
        self._lent = []


class LayerStats:
    """The statistics one stored tensor needs, fed sample by sample (rows buffered, see flush).

    Attributes (one entry per conv group; ``None`` when the method does not need them):
        stats: :class:`RunningStats` of the pruned-model input (``X^T X`` for SparseGPT).
        paired: Per group, one :class:`PairedStats` per cross-validation fold that is held out
            (``asym``; :func:`~onnx_sparse.prune.select.held_out_folds`), then, when that is
            fewer than the folds, one for all the other rows.
        mean_p / mean_d: Per member node and group, the mean input in the pruned / dense model.
        rows: Rows seen (after subsampling).
        scratch: Where flushes join rows (:class:`Scratch`; None: new arrays each time).
        project: ``asym``: per group, the dense weights ``[out, cols]`` of every layer that reads
            this input, stacked: the paired statistics then hold ``pq W^T`` instead of ``pq``
            (:class:`~onnx_sparse.core.hessian.PairedStats`); None: ``pq``.
        offsets: With ``project``: each reading layer's (group key's) first row in the stack.
    """

    def __init__(
        self,
        key: int,
        view: LayerView,
        members: int,
        method: str,
        samples: int,
        folds: int,
        max_rows: int | None,
        seed: int,
        means: bool,
        scratch: Scratch | None = None,
        project: list[np.ndarray] | None = None,
        offsets: dict[int, int] | None = None,
    ) -> None:
        self.key = key
        self.project = project
        self.offsets = offsets or {}
        self.scratch = scratch
        self.view = view
        self.method = method
        self.max_rows = max_rows
        self.seed = seed
        self.folds = max(1, min(folds, samples))
        g, c = view.groups, view.cols
        self.rows = 0
        self.masked = 0  # samples whose padding rows were left out
        self.x_dtype: np.dtype | None = None
        self.stats = (
            [RunningStats(c, track_xtx=method == "sparsegpt") for _ in range(g)]
            if method in ("wanda", "sparsegpt")
            else None
        )
        # asym: the folds the refit's cross-validation holds out in turn, each apart, and every
        # other row in one sum (the last entry) when the layer is too wide to hold out them all
        self.held = held_out_folds(c, self.folds)
        slots = self.folds if self.held == self.folds else self.held + 1
        self.paired = (
            [[PairedStats(c, project=None if project is None else project[k]) for _ in range(slots)] for k in range(g)]
            if method == "asym"
            else None
        )
        self.mean_p = [[RunningMean(c) for _ in range(g)] for _ in range(members)] if means else None
        self.mean_d = (
            [[RunningMean(c) for _ in range(g)] for _ in range(members)] if means and method == "asym" else None
        )
        self._buf: list[tuple[int, int, list[np.ndarray], list[np.ndarray] | None]] = []
        self._buf_rows = 0
        # asym splits a flush by fold: flush folds times later, so each fold's product stays large
        self._flush_rows = max(256, _FLUSH_VALUES // c) * (self.folds if self.paired is not None else 1)
        # Rows kept (tagged by fold) while the layer is row-starved, for cross-validated damping.
        self.cv_folds = max(1, min(CV_FOLDS, samples))
        self.raw: list[tuple[int, list[np.ndarray]]] | None = (
            [] if method == "sparsegpt" and self.cv_folds > 1 else None
        )

    def update(
        self, member: int, sample: int, xp: np.ndarray, xd: np.ndarray | None, keep: np.ndarray | None = None
    ) -> None:
        """Add one sample's input rows (``keep``: its padding mask, see :meth:`LayerView.rows`)."""
        self.x_dtype = xp.dtype
        seq = [self.seed, self.key, member, sample]
        if keep is not None and self.view.masks_rows(xp, keep):
            self.masked += 1
        else:
            keep = None
        # the chunks are made in arrays lent until the next flush, unless the rows are kept longer
        # (a row-starved layer's raw rows)
        scratch = self.scratch if self.raw is None else None
        alloc = scratch.pool(self.key).lend if scratch is not None else None

        def temp(side: str) -> Alloc | None:
            # (one statistics' generators are spent before the next one's update: keys shared by all)
            return None if scratch is None else functools.partial(scratch.take, f"rows-{side}")

        chunks_p = self.view.rows(xp, np.random.default_rng(seq), self.max_rows, keep, alloc, temp("p"))
        if xd is None:
            pairs: Iterable[tuple[list[np.ndarray], list[np.ndarray] | None]] = ((c, None) for c in chunks_p)
        else:
            if xd.shape != xp.shape:
                raise OnnxSparseError(
                    f"{self.view.site.node}: the dense and pruned models give inputs of different shapes "
                    f"({xd.shape} vs {xp.shape}) for sample {sample}"
                )
            chunks_d = self.view.rows(xd, np.random.default_rng(seq), self.max_rows, keep, alloc, temp("d"))
            pairs = zip(chunks_p, chunks_d, strict=True)
        fold = min(sample % self.folds, self.held)  # folds past the held-out ones share the last slot
        for cp, cd in pairs:
            n = cp[0].shape[0]
            if not n:
                continue
            self.rows += n
            if self.raw is not None:
                self.raw.append((sample % self.cv_folds, cp))
                if self.rows >= STARVED_ROWS_PER_COL * self.view.cols:
                    self.raw = None
            self._buf.append((member, fold, cp, cd))
            self._buf_rows += n
            if self._buf_rows >= self._flush_rows:
                self.flush()

    def flush(self) -> None:
        """Feed the buffered rows to the accumulators (sums are exact whatever the batching)."""
        buf, self._buf, self._buf_rows = self._buf, [], 0
        if not buf:
            return

        scratch = self.scratch

        def cat(parts: list[np.ndarray], key: str) -> np.ndarray:
            if len(parts) == 1:
                return parts[0]
            # np.concatenate lays its result out like its inputs (im2col's chunks are position-fastest,
            # gathered rows C-ordered), and sums of other layouts may round differently: the scratch
            # stands in only for a result whose layout is certain, C-ordered or Fortran-ordered
            order = _order(parts)
            if scratch is None or order is None:
                return np.concatenate(parts)
            shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
            return np.concatenate(parts, out=scratch.take(key, shape, parts[0].dtype, order))

        def work(like: np.ndarray) -> np.ndarray | None:  # only a wide product makes the difference whole
            order = _order([like])
            if scratch is None or order is None or like.shape[1] < blas.GRAM_WIDE:
                return None
            return scratch.take("diff", like.shape, like.dtype, order)

        # one member (the usual case): the means come from the rows joined for the products
        # (no second join, no second pass over the rows)
        shared = len({e[0] for e in buf}) == 1 and (self.stats is not None or self.paired is not None)
        m0 = buf[0][0]
        for g in range(self.view.groups):
            if self.stats is not None:
                xp = cat([e[2][g] for e in buf], "p")
                self.stats[g].update(xp)
                if shared and self.mean_p is not None:
                    self.mean_p[m0][g].update(xp)
            if self.paired is not None:
                for f in sorted({e[1] for e in buf}):
                    sel = [e for e in buf if e[1] == f]
                    xp, xd = cat([e[2][g] for e in sel], "p"), cat([e[3][g] for e in sel], "d")  # type: ignore[index]
                    self.paired[g][f].update(xp, xd, work(xp))
                    if shared and self.mean_p is not None:
                        self.mean_p[m0][g].update(xp)
                    if shared and self.mean_d is not None:
                        self.mean_d[m0][g].update(xd)
            if shared:
                continue
            for m in sorted({e[0] for e in buf}):
                sel = [e for e in buf if e[0] == m]
                if self.mean_p is not None:
                    self.mean_p[m][g].update(cat([e[2][g] for e in sel], "p"))
                if self.mean_d is not None:
                    self.mean_d[m][g].update(cat([e[3][g] for e in sel], "d"))  # type: ignore[index]
        del buf
        if scratch is not None:
            scratch.pool(self.key).reclaim()  # the rows are in: their arrays may be lent again


def _order(parts: list[np.ndarray]) -> str | None:
    """The layout np.concatenate gives ``parts`` (2-D, one dtype) when it is certain: "C" when all
    are C-ordered, "F" when all are Fortran-ordered and none also C-ordered; else None."""
    if any(p.ndim != 2 or p.dtype != parts[0].dtype for p in parts):
        return None
    if all(p.flags.c_contiguous for p in parts):
        return "C"
    if all(p.flags.f_contiguous and not p.flags.c_contiguous for p in parts):
        return "F"
    return None
