"""Running calibration statistics for one-shot pruning (numpy only: no graph, I/O or logging).

Conventions shared with :mod:`onnx_sparse.prune`:

* A fully-connected or convolution weight is handled as a matrix ``W[rows, cols]`` with
  ``rows = out_features`` and ``cols = in_features``; groups of 4 run along ``cols``
  (axis 1), which is the reduction axis.
* Activations are rows ``X[n, cols]``; the layer computes ``Y = X @ W.T``.
* A convolution becomes a matrix product through :func:`im2col`, whose columns are ordered
  ``kernel_position * C_per_group + c`` (channel fastest). :func:`conv_weight_to_matrix` uses
  the same order, so 4 consecutive matrix columns are 4 input channels at one kernel
  position: the TensorRT 2:4 rule for convolutions.

Memory: the im2col matrix of a large feature map can be much larger than the map itself.
:func:`iter_im2col` yields it in chunks of at most ``chunk_rows`` rows, and the accumulators
accept ``max_rows``: an update with more rows than that keeps a uniform random subset
(seeded, reproducible) and scales its sums by ``rows seen / rows kept``, so every sum stays
an unbiased estimate of the sum over all rows and ``n`` still counts every row seen.

Accumulators of disjoint data add up (``a + b``), so a caller that wants K-fold
cross-validation keeps one accumulator per fold and sums the ones it trains on.

Precision: the sums are kept in float64. The products of one update run in the precision of
its rows: float32 (or narrower) activations, which is what onnxruntime gives, are multiplied
in float32 (the BLAS product is about twice as fast and its relative error, about
``sqrt(rows) * 6e-8`` per entry for an update of ``rows`` rows, stays far below the sampling
noise of a calibration set); float64 rows are multiplied in float64. Column sums and sums of
squares are always reduced in float64. The products run in fixed blocks side by side
(:func:`onnx_sparse.core.blas.add_gram`), so the sums do not depend on the number of cores. :class:`PairedStats` accumulates ``Xp^T (Xd - Xp)``
rather than ``Xp^T Xd``, so the difference the asymmetric refit needs does not come from
subtracting two large, nearly equal float32 products.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from onnx_sparse.core import blas
from onnx_sparse.core.park import Parked

__all__ = [
    "RunningStats",
    "RunningMean",
    "PairedStats",
    "im2col",
    "iter_im2col",
    "im2col_rows",
    "Alloc",
    "conv_output_shape",
    "conv_weight_to_matrix",
    "matrix_to_conv_weight",
]

Array = npt.NDArray


def _as_rows(x: npt.ArrayLike, cols: int, name: str = "x") -> Array:
    """View ``x`` (any shape whose last axis is ``cols``) as rows ``[n, cols]`` in its product
    precision: float32 for float32 or narrower floats, float64 otherwise (see the module docstring)."""
    a = np.asarray(x)
    if a.ndim == 0 or a.shape[-1] != cols:
        raise ValueError(f"{name} has shape {a.shape}; expected a last axis of length {cols}")
    work = np.float32 if a.dtype.kind == "f" and a.dtype.itemsize <= 4 or a.dtype.name == "bfloat16" else np.float64
    return a.reshape(-1, cols).astype(work, copy=False)


def _sample_rows(rng: np.random.Generator, n: int, max_rows: int | None) -> tuple[Array | None, float]:
    """Indices of a uniform subset of ``n`` rows (None: keep all) and the scale ``n / kept``."""
    if max_rows is None or n <= max_rows:
        return None, 1.0
    idx = np.sort(rng.choice(n, size=max_rows, replace=False))
    return idx, n / max_rows


def _accumulate(acc: Array, part: Array, scale: float) -> None:
    """``acc += scale * part`` in ``acc``'s precision (no scaled temporary when ``scale`` is 1)."""
    if scale == 1.0:
        acc += part
    else:
        acc += scale * part.astype(np.float64, copy=False)


def _check_max_rows(max_rows: int | None) -> None:
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be positive or None, got {max_rows}")


def _same_order(work: Array, *rows: Array) -> bool:
    """Whether ``work`` has the layout ``rows[1] - rows[0]`` would get: all C-ordered, or all
    Fortran-ordered (and not also C-ordered)."""
    arrays = (work, *rows)
    if all(r.flags.c_contiguous for r in arrays):
        return True
    return all(r.flags.f_contiguous and not r.flags.c_contiguous for r in arrays)


_S = TypeVar("_S", "RunningStats", "PairedStats")


def _total(parts: Sequence[_S]) -> _S:
    """Sum of accumulators of one kind, as a new object."""
    if not parts:
        raise ValueError("no statistics to add")
    out = parts[0].copy()
    for p in parts[1:]:
        out = out + p
    return out


class RunningStats:
    """Per-column statistics of activation rows ``X[n, cols]``, accumulated batch by batch.

    Inputs may be any float dtype; everything is accumulated in float64.

    Attributes:
        cols: Number of columns (input features of the layer).
        n: Number of rows seen (including rows dropped by ``max_rows`` sampling).
        sum: Per-column sum of ``x`` (``[cols]``).
        sq: Per-column sum of ``x**2`` (``[cols]``), the squared Wanda norm.
        xtx: ``X^T X`` (``[cols, cols]``), only when ``track_xtx`` (it is quadratic in cols).
    """

    def __init__(self, cols: int, *, track_xtx: bool = False, max_rows: int | None = None, seed: int = 0) -> None:
        """Start empty.

        Args:
            cols: Number of columns of every update.
            track_xtx: Also accumulate ``X^T X`` (needed by SparseGPT, not by Wanda).
            max_rows: Per-update row budget; larger updates are subsampled uniformly
                (see the module docstring). None keeps every row.
            seed: Seed of the sampling RNG (used only with ``max_rows``).
        """
        if cols < 1:
            raise ValueError(f"cols must be positive, got {cols}")
        _check_max_rows(max_rows)
        self.cols = cols
        self.max_rows = max_rows
        self.n = 0
        self.sum = np.zeros(cols, dtype=np.float64)
        self.sq = np.zeros(cols, dtype=np.float64)
        self.xtx: Array | None = np.zeros((cols, cols), dtype=np.float64) if track_xtx else None
        self._rng = np.random.default_rng(seed)

    @property
    def track_xtx(self) -> bool:
        """Whether ``X^T X`` is accumulated."""
        return self.xtx is not None

    def update(self, x: npt.ArrayLike) -> None:
        """Add rows: ``x`` of shape ``[..., cols]`` (leading axes are flattened into rows)."""
        rows = _as_rows(x, self.cols)
        n = rows.shape[0]
        if n == 0:
            return
        idx, scale = _sample_rows(self._rng, n, self.max_rows)
        if idx is not None:
            rows = rows[idx]
        self.n += n
        _accumulate(self.sum, rows.sum(axis=0, dtype=np.float64), scale)
        _accumulate(self.sq, np.einsum("ij,ij->j", rows, rows, dtype=np.float64), scale)
        if self.xtx is not None:
            blas.add_gram(self.xtx, rows, None, scale)

    def update_chunks(self, chunks: Iterable[npt.ArrayLike]) -> None:
        """Call :meth:`update` on each chunk (e.g. one group's output of :func:`iter_im2col`)."""
        for chunk in chunks:
            self.update(chunk)

    def __add__(self, other: RunningStats) -> RunningStats:
        """Statistics of both (disjoint) data sets; the result keeps ``self``'s settings."""
        if not isinstance(other, RunningStats):
            return NotImplemented
        if other.cols != self.cols:
            raise ValueError(f"cannot add statistics of {self.cols} and {other.cols} columns")
        out = RunningStats(self.cols, track_xtx=False, max_rows=self.max_rows)
        out.n = self.n + other.n
        out.sum = self.sum + other.sum
        out.sq = self.sq + other.sq
        if self.xtx is not None and other.xtx is not None:
            out.xtx = self.xtx + other.xtx
        return out

    def copy(self) -> RunningStats:
        """An independent copy (the sampling RNG restarts from seed 0)."""
        out = RunningStats(self.cols, max_rows=self.max_rows)
        out.n = self.n
        out.sum = self.sum.copy()
        out.sq = self.sq.copy()
        out.xtx = None if self.xtx is None else self.xtx.copy()
        return out

    @staticmethod
    def total(parts: Sequence[RunningStats]) -> RunningStats:
        """Sum of several accumulators (e.g. all folds but one); never one of the inputs itself."""
        return _total(parts)

    @property
    def mean(self) -> Array:
        """``E[x]`` per column (zeros before any update)."""
        return self.sum / self.n if self.n else np.zeros(self.cols)

    @property
    def col_norm(self) -> Array:
        """``||X_j||_2`` per column: the Wanda activation norm."""
        return np.sqrt(self.sq)

    @property
    def dead(self) -> Array:
        """Boolean mask of columns that were exactly zero on every row seen."""
        return self.sq == 0

    def hessian(self, damp: float = 0.01) -> Array:
        """SparseGPT's layer Hessian ``H = 2/n X^T X``, made positive definite.

        Dead columns (zero diagonal, see :attr:`dead`) get 1 on the diagonal, then
        ``lambda = damp * mean(diag(H))`` is added to the whole diagonal (SparseGPT's order).

        Args:
            damp: Relative damping; 0 adds nothing (dead columns are still set to 1).

        Returns:
            A new ``[cols, cols]`` float64 matrix.

        Raises:
            ValueError: When ``X^T X`` is not tracked or no rows were seen.
        """
        if self.xtx is None:
            raise ValueError("X^T X is not tracked: create RunningStats(..., track_xtx=True)")
        if self.n == 0:
            raise ValueError("no rows seen: cannot form a Hessian")
        h = self.xtx * (2.0 / self.n)
        idx = np.arange(self.cols)
        diag = h[idx, idx]
        diag[diag == 0] = 1.0
        h[idx, idx] = diag + damp * float(np.mean(diag))
        return h


class RunningMean:
    """Per-column mean of activation rows, summed in float64 (what bias correction needs: no
    squares, no products).

    Attributes:
        cols: Number of columns.
        n: Number of rows seen.
        sum: Per-column sum (``[cols]``).
    """

    def __init__(self, cols: int) -> None:
        if cols < 1:
            raise ValueError(f"cols must be positive, got {cols}")
        self.cols = cols
        self.n = 0
        self.sum = np.zeros(cols, dtype=np.float64)

    def update(self, x: npt.ArrayLike) -> None:
        """Add rows: ``x`` of shape ``[..., cols]``."""
        rows = _as_rows(x, self.cols)
        self.n += rows.shape[0]
        self.sum += rows.sum(axis=0, dtype=np.float64)

    @property
    def mean(self) -> Array:
        """``E[x]`` per column (zeros before any update)."""
        return self.sum / self.n if self.n else np.zeros(self.cols)


class PairedStats:
    """Gram matrices of paired activations for asymmetric reconstruction.

    Each row pairs ``x_pruned`` (what the layer sees in the partly pruned model) with
    ``x_dense`` (what it sees in the dense model, for the same calibration sample and
    position). Accumulated in float64:

    * ``pp = Xp^T Xp`` (``[cols, cols]``),
    * ``pq = Xp^T (Xd - Xp)`` (``[cols, cols]``): what the refit needs, accumulated directly
      (``pd = Xp^T Xd = pp + pq`` is a property),
    * ``dd = Xd^T Xd`` only when ``track_dense`` (needed only for absolute errors),
    * ``n``, the number of rows seen.

    ``max_rows`` sampling picks the same rows of both inputs.

    **Projected** (``project=W``, the dense weights ``[out, cols]`` of every layer that reads these
    rows, stacked): the refit reads ``pq`` only as ``pq W^T``, so ``pqw = Xp^T ((Xd - Xp) W^T)``
    (``[cols, out]``) is accumulated instead of ``pq`` (empty then): ``2 n cols out`` multiply-adds
    instead of ``n cols^2``, fewer when ``2 out < cols`` (a conv's 864 im2col columns feeding 24
    outputs), and ``cols x out`` floats held instead of ``cols^2``. :meth:`pq_times` reads either.
    """

    def __init__(
        self,
        cols: int,
        *,
        track_dense: bool = False,
        max_rows: int | None = None,
        seed: int = 0,
        project: Array | None = None,
    ) -> None:
        """Start empty; the arguments are as for :class:`RunningStats`, and ``project`` above."""
        if cols < 1:
            raise ValueError(f"cols must be positive, got {cols}")
        _check_max_rows(max_rows)
        if project is not None and (project.ndim != 2 or project.shape[1] != cols):
            raise ValueError(f"project must be a weight [out, {cols}], got shape {project.shape}")
        self.cols = cols
        self.max_rows = max_rows
        self.n = 0
        self.pp = np.zeros((cols, cols), dtype=np.float64)
        self.project = project
        self.pq = np.zeros((0, 0) if project is not None else (cols, cols), dtype=np.float64)
        self.pqw: Array | None = None if project is None else np.zeros((cols, project.shape[0]), dtype=np.float64)
        self._wt: dict[np.dtype, Array] = {}  # project^T in the rows' dtype, made once
        self.dd: Array | None = np.zeros((cols, cols), dtype=np.float64) if track_dense else None
        self._rng = np.random.default_rng(seed)
        self._parked: dict[str, Parked] = {}

    def update(self, x_pruned: npt.ArrayLike, x_dense: npt.ArrayLike, work: Array | None = None) -> None:
        """Add paired rows ``[..., cols]`` (equal shapes; row ``i`` of each forms a pair).

        ``work``: an array the caller reuses for ``x_dense - x_pruned`` (used where it has their
        shape, dtype and layout, C- or Fortran-ordered; see :func:`~onnx_sparse.core.blas.add_gram`)."""
        xp = _as_rows(x_pruned, self.cols, "x_pruned")
        xd = _as_rows(x_dense, self.cols, "x_dense")
        if xp.dtype != xd.dtype:
            xp, xd = xp.astype(np.float64), xd.astype(np.float64)
        if xp.shape != xd.shape:
            raise ValueError(f"x_pruned has {xp.shape[0]} rows but x_dense has {xd.shape[0]}")
        n = xp.shape[0]
        if n == 0:
            return
        idx, scale = _sample_rows(self._rng, n, self.max_rows)
        if idx is not None:
            xp, xd = xp[idx], xd[idx]
        self.n += n
        blas.add_gram(self.pp, xp, None, scale)
        if work is not None and not (work.shape == xp.shape and work.dtype == xp.dtype and _same_order(work, xp, xd)):
            work = None  # (xd - xp is laid out like them, and products of other layouts may round differently)
        if self.pqw is not None:
            assert self.project is not None
            wt = self._wt.get(xp.dtype)
            if wt is None:
                wt = self._wt[xp.dtype] = np.ascontiguousarray(self.project.T, dtype=xp.dtype)
            diff = np.subtract(xd, xp, out=work) if work is not None else xd - xp
            blas.add_gram(self.pqw, xp, blas.matmul_rows(diff, wt), scale)
        else:
            blas.add_gram(self.pq, xp, xd, scale, minus_a=True, work=work)  # xd - xp, taken piece by piece
        if self.dd is not None:
            blas.add_gram(self.dd, xd, None, scale)

    def __add__(self, other: PairedStats) -> PairedStats:
        """Statistics of both (disjoint) data sets; the result keeps ``self``'s settings."""
        if not isinstance(other, PairedStats):
            return NotImplemented
        if other.cols != self.cols:
            raise ValueError(f"cannot add statistics of {self.cols} and {other.cols} columns")
        if (self.pqw is None) != (other.pqw is None):
            raise ValueError("cannot add projected and plain statistics")
        out = PairedStats(self.cols, max_rows=self.max_rows, project=self.project)
        out.n = self.n + other.n
        out.pp = self.pp + other.pp
        out.pq = self.pq + other.pq
        if self.pqw is not None and other.pqw is not None:
            out.pqw = self.pqw + other.pqw
        if self.dd is not None and other.dd is not None:
            out.dd = self.dd + other.dd
        return out

    def add_(self, other: PairedStats) -> None:
        """Add ``other``'s statistics (disjoint rows) into these, in place (no new matrices)."""
        if other.cols != self.cols:
            raise ValueError(f"cannot add statistics of {self.cols} and {other.cols} columns")
        if (self.pqw is None) != (other.pqw is None):
            raise ValueError("cannot add projected and plain statistics")
        self.n += other.n
        self.pp += other.pp
        self.pq += other.pq
        if self.pqw is not None and other.pqw is not None:
            self.pqw += other.pqw
        if self.dd is not None:
            if other.dd is None:
                self.dd = None
            else:
                self.dd += other.dd

    def release_pq(self) -> None:
        """Let go of ``pq`` for good (``cols^2`` float64), when what is read from it has been made
        (an empty array takes its place: a later use fails on its shape rather than reading stale
        values). The asymmetric refit of the only weight that reads a wide input does this."""
        self.pq = np.zeros((0, 0))

    def park(self, *names: str) -> None:
        """Set ``pp`` and/or ``pq`` aside on disk (:class:`~onnx_sparse.core.park.Parked`) until
        :meth:`unpark`: an empty array takes each one's place meanwhile (a use fails on its shape).
        The asymmetric refit of the only weight that reads a wide input parks its totals while the
        damping is chosen, which reads neither."""
        for name in names:
            if name not in ("pp", "pq") or name in self._parked:
                raise ValueError(f"cannot park {name!r} (parked: {sorted(self._parked)})")
            self._parked[name] = Parked(getattr(self, name))
            setattr(self, name, np.zeros((0, 0)))

    def unpark(self) -> None:
        """Read back what :meth:`park` set aside (the same bits)."""
        while self._parked:
            name, parked = self._parked.popitem()
            setattr(self, name, parked.take())

    @property
    def parked(self) -> tuple[str, ...]:
        """The matrices now set aside by :meth:`park`."""
        return tuple(sorted(self._parked))

    @property
    def pd(self) -> Array:
        """``Xp^T Xd`` (a new array: ``pp + pq``; not of projected statistics)."""
        if self.pqw is not None:
            raise ValueError("projected statistics hold pq W^T, not pq")
        return self.pp + self.pq

    def pq_times(self, w: Array, offset: int = 0, rows: Array | None = None) -> Array:
        """``pq @ w[rows].T`` (``[cols, len(rows)]``, float64; ``rows`` None: all).

        Projected statistics give their own columns for it: ``w`` must be the weight stacked at
        ``offset`` in ``project`` (its rows ``offset .. offset + len(w)``)."""
        if self.pqw is None:
            return self.pq @ (w if rows is None else w[rows]).T
        assert self.project is not None
        if w.shape[1] != self.cols or offset + w.shape[0] > self.project.shape[0]:
            raise ValueError(f"weight {w.shape} at {offset} is not in the projection {self.project.shape}")
        if rows is None:
            return self.pqw[:, offset : offset + w.shape[0]]
        idx = np.arange(w.shape[0])[rows]  # (an index past the weight's rows fails here)
        return self.pqw[:, offset + idx]

    @staticmethod
    def total(parts: Sequence[PairedStats]) -> PairedStats:
        """Sum of several accumulators (e.g. all folds but one); never one of the inputs itself."""
        return _total(parts)

    def copy(self) -> PairedStats:
        """An independent copy (the sampling RNG restarts from seed 0)."""
        out = PairedStats(self.cols, max_rows=self.max_rows, project=self.project)
        out.n = self.n
        out.pp = self.pp.copy()
        out.pq = self.pq.copy()
        out.pqw = None if self.pqw is None else self.pqw.copy()
        out.dd = None if self.dd is None else self.dd.copy()
        return out


# --------------------------------------------------------------------------------------
# Convolution as a matrix product
# --------------------------------------------------------------------------------------


def _conv_params(
    spatial: int,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None,
    pads: Sequence[int] | None,
    dilations: Sequence[int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    k = tuple(int(v) for v in kernel_shape)
    s = tuple(int(v) for v in strides) if strides is not None else (1,) * spatial
    p = tuple(int(v) for v in pads) if pads is not None else (0,) * (2 * spatial)
    d = tuple(int(v) for v in dilations) if dilations is not None else (1,) * spatial
    if len(k) != spatial or len(s) != spatial or len(d) != spatial or len(p) != 2 * spatial:
        raise ValueError(
            f"{spatial} spatial axes need kernel_shape/strides/dilations of length {spatial} and pads of "
            f"length {2 * spatial}; got kernel_shape={k}, strides={s}, pads={p}, dilations={d}"
        )
    if min(k + s + d) < 1 or min(p) < 0:
        raise ValueError(f"invalid conv parameters: kernel_shape={k}, strides={s}, pads={p}, dilations={d}")
    return k, s, p, d


def conv_output_shape(
    input_spatial: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """Spatial output shape of an ONNX Conv (explicit pads, ``[x1_begin, x2_begin, ..., x1_end, ...]``)."""
    spatial = len(input_spatial)
    k, s, p, d = _conv_params(spatial, kernel_shape, strides, pads, dilations)
    out = []
    for i in range(spatial):
        span = d[i] * (k[i] - 1) + 1
        padded = int(input_spatial[i]) + p[i] + p[i + spatial]
        if padded < span:
            raise ValueError(f"spatial axis {i}: padded size {padded} is smaller than the kernel span {span}")
        out.append((padded - span) // s[i] + 1)
    return tuple(out)


def _check_group(channels: int, group: int, what: str) -> int:
    if group < 1 or channels % group:
        raise ValueError(f"{what} {channels} is not divisible by group={group}")
    return channels // group


class _Im2col:
    """What :func:`iter_im2col` and :func:`im2col_rows` both derive from the input and the conv's
    attributes (checked): the padded widths, the kernel positions and the chunk step."""

    def __init__(
        self,
        x: npt.ArrayLike,
        kernel_shape: Sequence[int],
        strides: Sequence[int] | None,
        pads: Sequence[int] | None,
        dilations: Sequence[int] | None,
        group: int,
        chunk_rows: int | None,
    ) -> None:
        a = np.asarray(x)
        if a.ndim < 3:
            raise ValueError(f"im2col needs an input [N, C, *spatial] (1 to 3 spatial axes), got {a.shape}")
        self.a, self.spatial = a, a.ndim - 2
        k, self.s, self.p, self.d = _conv_params(self.spatial, kernel_shape, strides, pads, dilations)
        self.n_batch, self.channels = a.shape[:2]
        self.cg = _check_group(self.channels, group, "input channels")
        self.out_shape = conv_output_shape(a.shape[2:], k, self.s, self.p, self.d)
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive or None, got {chunk_rows}")
        self.line = math.prod(self.out_shape[1:])  # rows per position on the first spatial axis
        self.step = self.out_shape[0] if chunk_rows is None else max(1, chunk_rows // max(self.line, 1))
        self.width = [(0, 0), (0, 0)] + [(self.p[i], self.p[i + self.spatial]) for i in range(self.spatial)]
        self.offsets = list(itertools.product(*(range(v) for v in k)))  # row-major kernel positions


#: Makes an uninitialised C-ordered array of a shape and dtype (``alloc(shape, dtype)``): how
#: :func:`iter_im2col` and :func:`im2col_rows` let a caller supply, and reuse, the arrays of tens
#: of MB they fill for every chunk (a new array that large is a fresh mapping: a page fault per
#: 4 KB, every time).
Alloc = Callable[[tuple[int, ...], np.dtype], Array]


def _made(alloc: Alloc | None, shape: tuple[int, ...], dtype: np.dtype) -> Array | None:
    """``alloc(shape, dtype)``, checked to be what ``np.stack`` would make (None without ``alloc``)."""
    if alloc is None:
        return None
    out = alloc(shape, dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"alloc gave {out.shape} {out.dtype}, not a C-ordered {shape} {dtype}")
    return out


def iter_im2col(
    x: npt.ArrayLike,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    chunk_rows: int | None = None,
    alloc: Alloc | None = None,
) -> Iterator[list[Array]]:
    """Yield :func:`im2col` in chunks of output positions, each chunk a list per group.

    Rows come in the order of :func:`im2col` (batch, then output positions row-major). A
    chunk covers one batch item and a slab of the first output spatial axis, sized so that
    it has at most ``chunk_rows`` rows (at least one output line, so a chunk can exceed
    ``chunk_rows`` when a single line of positions does). None yields one chunk per item.

    Args:
        x: Input ``[N, C, *spatial]`` (1-D NCW, 2-D NCHW or 3-D NCDHW).
        kernel_shape: Kernel spatial shape.
        strides: Per spatial axis (default 1).
        pads: ONNX order ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`` (default 0).
        dilations: Per spatial axis (default 1).
        group: Number of convolution groups; ``C % group == 0``.
        chunk_rows: Row budget of a chunk.
        alloc: Where the array behind each chunk is made (:data:`Alloc`; None: new arrays).

    Yields:
        A list of ``group`` arrays ``[rows, prod(kernel) * C/group]`` (dtype of ``x``); with one
        group, a view of the chunk's patches laid out position-fastest (Fortran order).
    """
    g = _Im2col(x, kernel_shape, strides, pads, dilations, group, chunk_rows)
    a, spatial, channels, cg, out_shape, offsets = g.a, g.spatial, g.channels, g.cg, g.out_shape, g.offsets
    s, p, d, width, step = g.s, g.p, g.d, g.width, g.step
    for b in range(g.n_batch):
        xp = np.pad(a[b : b + 1], width) if any(p) else a[b : b + 1]
        for o0 in range(0, out_shape[0], step):
            o1 = min(o0 + step, out_shape[0])
            lengths = (o1 - o0,) + out_shape[1:]
            patches = []
            for off in offsets:
                index = [slice(None), slice(None)]
                for i in range(spatial):
                    start = off[i] * d[i] + (o0 * s[i] if i == 0 else 0)
                    index.append(slice(start, start + s[i] * (lengths[i] - 1) + 1, s[i]))
                patches.append(xp[tuple(index)])  # [1, C, *lengths]
            # [kpos, 1, C, *lengths] -> [1, *lengths, kpos, C]
            stack = np.stack(patches, out=_made(alloc, (len(patches), *patches[0].shape), a.dtype))
            stack = np.moveaxis(stack, (0, 2), (-2, -1))
            rows = stack.reshape(-1, len(offsets), channels)
            width_g = len(offsets) * cg
            yield [rows[:, :, g * cg : (g + 1) * cg].reshape(rows.shape[0], width_g) for g in range(group)]


def im2col_rows(
    x: npt.ArrayLike,
    kernel_shape: Sequence[int],
    rows: npt.ArrayLike,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    chunk_rows: int | None = None,
    alloc: Alloc | None = None,
    temp: Alloc | None = None,
) -> Iterator[list[Array]]:
    """:func:`iter_im2col` restricted to the rows ``rows`` (sorted indices into :func:`im2col`'s
    rows): the same chunks (each holding the selected rows of the chunk :func:`iter_im2col` would
    yield; chunks with none are skipped), with the same values in the same order.

    The rows are gathered directly, so a subsample of a large feature map (the calibration's row
    budget) costs its own rows, not the whole matrix: the input is padded and put channels-last
    once, and each kernel position is one gather of whole channel vectors.

    ``alloc`` makes the array behind each chunk and ``temp`` the channels-last input, which is
    needed only until the generator ends (:data:`Alloc`; None: new arrays). Either way the
    values and the layout of what is yielded are the same.
    """
    g = _Im2col(x, kernel_shape, strides, pads, dilations, group, chunk_rows)
    a, spatial, n_batch, cg, out_shape = g.a, g.spatial, g.n_batch, g.cg, g.out_shape
    s, p, d, offsets, line, step = g.s, g.p, g.d, g.offsets, g.line, g.step
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    per_item = math.prod(out_shape)
    if idx.size and (idx.min() < 0 or idx.max() >= n_batch * per_item):
        raise ValueError(f"row indices must be in [0, {n_batch * per_item})")
    if not idx.size:
        return
    # [N, *padded, C] in one array: the input put channels-last into a zeroed frame (np.pad and then
    # a channels-last copy made two arrays of a whole input, each a fresh mapping of tens of MB)
    inner = np.moveaxis(a, 1, -1)
    if any(p):
        size = [a.shape[2 + i] + p[i] + p[i + spatial] for i in range(spatial)]
        if temp is None:
            last = np.zeros((n_batch, *size, a.shape[1]), dtype=a.dtype)
        else:
            last = temp((n_batch, *size, a.shape[1]), a.dtype)
            last.fill(0)
        last[(slice(None), *(slice(p[i], p[i] + a.shape[2 + i]) for i in range(spatial)))] = inner
    elif temp is None:
        last = np.ascontiguousarray(inner)
    else:
        last = temp(inner.shape, a.dtype)
        np.copyto(last, inner)
    width_g = len(offsets) * cg
    # iter_im2col's chunks: per batch item, slabs of `step` positions of the first output axis
    bounds = [b * per_item + o0 * line for b in range(n_batch) for o0 in range(0, out_shape[0], step)] + [
        n_batch * per_item
    ]
    cuts = np.searchsorted(idx, bounds)
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        if hi == lo:
            continue
        part = idx[lo:hi]
        b, *pos = np.unravel_index(part, (n_batch, *out_shape))
        base = [pos[i] * s[i] for i in range(spatial)]
        gathered = np.stack(
            [last[(b, *(base[i] + off[i] * d[i] for i in range(spatial)))] for off in offsets],
            axis=1,
            out=_made(alloc, (part.size, len(offsets), a.shape[1]), a.dtype),
        )  # [rows, kpos, C]
        if group == 1:
            yield [gathered.reshape(part.size, width_g)]
        else:
            yield [gathered[:, :, g * cg : (g + 1) * cg].reshape(part.size, width_g) for g in range(group)]


def im2col(
    x: npt.ArrayLike,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
) -> list[Array]:
    """Unfold a convolution input into rows, one matrix per group.

    Row ``(b, o)`` holds the receptive field of batch item ``b`` at output position ``o``
    (row-major over output positions); column ``kpos * C_per_group + c`` holds channel ``c``
    of the group at kernel position ``kpos`` (row-major over the kernel). Then for every
    group ``g``, ``im2col(x)[g] @ conv_weight_to_matrix(w, group)[g].T`` is the conv output
    ``[N * prod(out), K/group]`` of that group (bias excluded).

    Args:
        x: Input ``[N, C, *spatial]`` (1-D NCW, 2-D NCHW or 3-D NCDHW).
        kernel_shape: Kernel spatial shape.
        strides: Per spatial axis (default 1).
        pads: ONNX order ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`` (default 0).
        dilations: Per spatial axis (default 1).
        group: Number of convolution groups.

    Returns:
        ``group`` arrays ``[N * prod(out_spatial), prod(kernel) * C/group]``. For large inputs
        use :func:`iter_im2col`, which bounds the memory.
    """
    chunks = list(iter_im2col(x, kernel_shape, strides, pads, dilations, group))
    return [np.concatenate([c[g] for c in chunks]) for g in range(group)]


def conv_weight_to_matrix(w: npt.ArrayLike, group: int = 1) -> list[Array]:
    """Conv weight ``[K, C/group, *kernel]`` to one matrix ``[K/group, prod(kernel) * C/group]`` per group.

    Columns follow :func:`im2col`: ``kpos * C_per_group + c``, so groups of 4 columns are 4
    input channels at one kernel position. Returns new arrays.
    """
    a = np.asarray(w)
    if a.ndim < 3:
        raise ValueError(f"conv weight needs shape [K, C/group, *kernel], got {a.shape}")
    kg = _check_group(a.shape[0], group, "output channels")
    moved = np.moveaxis(a, 1, -1)  # [K, *kernel, C/g]
    flat = moved.reshape(a.shape[0], -1)
    return [flat[g * kg : (g + 1) * kg].copy() for g in range(group)]


def matrix_to_conv_weight(
    matrices: Sequence[npt.ArrayLike], kernel_shape: Sequence[int], channels_per_group: int
) -> Array:
    """Inverse of :func:`conv_weight_to_matrix`: per-group matrices back to ``[K, C/group, *kernel]``."""
    k = tuple(int(v) for v in kernel_shape)
    width = math.prod(k) * channels_per_group
    mats = [np.asarray(m) for m in matrices]
    if not mats:
        raise ValueError("no matrices given")
    for m in mats:
        if m.ndim != 2 or m.shape[1] != width:
            raise ValueError(
                f"matrix of shape {m.shape} does not match kernel {k} with {channels_per_group} channels "
                f"per group (expected {width} columns)"
            )
    flat = np.concatenate(mats, axis=0)
    return np.moveaxis(flat.reshape((flat.shape[0],) + k + (channels_per_group,)), -1, 1).copy()
