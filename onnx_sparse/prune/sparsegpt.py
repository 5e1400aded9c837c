"""SparseGPT 2:4 pruning (Frantar & Alistarh, 2023) and asymmetric reconstruction, in numpy.

Conventions: a weight is a matrix ``W[rows, cols]`` (``rows`` outputs, ``cols`` inputs,
groups of 4 along ``cols``, the reduction axis); activations are rows ``X[n, cols]`` and the
layer computes ``Y = X @ W.T``. ``H`` is ``[cols, cols]``, normally ``2/n X^T X``
(:meth:`onnx_sparse.core.hessian.RunningStats.hessian`); any positive multiple gives the
same result, since the damping is relative to ``mean(diag(H))``.

SparseGPT (optimal brain surgeon, one column at a time):

* Minimise ``tr(dW H dW^T)``, i.e. ``||X W^T - X W'^T||^2``, subject to the 2:4 mask.
* Let ``U`` be the upper Cholesky factor of ``H^{-1}`` (``H^{-1} = U^T U``). Walking the
  columns left to right, when column ``j`` is fixed to ``q_j`` (kept value or 0), the
  optimal update of the columns still free is ``W[:, j:] -= e U[j, j:]`` with
  ``e = (w_j - q_j) / U[j, j]``; the squared output error grows by ``e^2 / 2`` in units of ``H``.
* At the first column of every group of 4, each row prunes the 2 of the next 4 weights
  (as updated so far) with the smallest ``w^2 / U[j, j]^2``.
* Updates are lazy: inside a block of ``blocksize`` columns they are applied column by
  column, and the block's accumulated errors reach the later columns in one product.

Joint sparsification and INT8 quantization (the SparseGPT paper's joint variant, OBC's pinned
zeros): with a per-row scale ``s`` (:func:`int8_scales`), every kept weight is rounded onto
its symmetric grid ``s * clip(round(w / s), -127, 127)`` as the walk fixes it, so ``q_j`` is
either 0 (pruned) or a grid value, and the update of the free columns carries the pruning
and the rounding error together. Pruned weights are exactly 0, which the grid holds (zero
point 0), so quantizing never moves a pruned zero.

Asymmetric reconstruction: when the layer's input in the partly pruned model
(``Xp``) differs from its input in the dense model (``Xd``), first refit the dense weights
to reproduce the dense output from the pruned input (:func:`asymmetric_refit`), then run
SparseGPT on the refit weights with ``H ~ Xp^T Xp`` (:func:`asymmetric_sparsegpt_2_4`).
Choosing the dampings by cross-validation is :mod:`onnx_sparse.prune.select`'s job.

Linear algebra: LAPACK through numpy and scipy (``scipy.linalg``: ``cho_factor``/``cho_solve``
for the positive definite solves, ``lapack.dtrtri`` for the triangular inverse), which numpy
alone does not offer; a general solve (LU) costs about three times as much.

All functions are pure: inputs are never modified; everything is computed in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.linalg

from onnx_sparse.core import blas, nm
from onnx_sparse.core.hessian import PairedStats

__all__ = [
    "SparseGPTStats",
    "upper_cholesky_inverse",
    "InverseFactor",
    "inverse_factor",
    "prune_with_factor",
    "sparsegpt_2_4",
    "asymmetric_refit",
    "asymmetric_sparsegpt_2_4",
    "refit_error",
    "ROW_CHUNK",
    "INT8_MAX",
    "int8_scales",
    "int8_round",
]

logger = logging.getLogger(__name__)

Array = npt.NDArray


_DAMP_GROWTH = 10.0
_MAX_RETRIES = 6


#: Symmetric INT8 weights use ``[-127, 127]`` (zero point 0; TensorRT's and onnxruntime's symmetric range).
INT8_MAX = 127
#: Clip ratios tried per row by :func:`int8_scales` (share of the row's largest ``|w|``).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def int8_round(w: Array, scale: Array) -> Array:
    """``w`` on its per-row grid: ``scale * clip(round(w / scale), -127, 127)`` (``scale`` ``[rows, 1]``
    or broadcastable; zeros stay exactly 0)."""
    return np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX) * scale


def int8_scales(w: Array, ratios: tuple[float, ...] = CLIP_RATIOS) -> Array:
    """Per-row symmetric INT8 scales of ``w[rows, cols]`` (float64 ``[rows]``), float32-representable.

    Each row tries the clip ratios of its largest ``|w|`` and keeps the one with the smallest
    squared rounding error (ties: the larger range); an all-zero row gets scale 1.
    """
    w = np.asarray(w)
    # max |w| per row as max(max w, -min w): no |w| copy (a -0 top is not > 0, as a +0 is not)
    top = np.maximum(w.max(axis=1), -w.min(axis=1)).astype(np.float64) if w.size else np.zeros(w.shape[0])
    best = np.where(top > 0, top / INT8_MAX, 1.0)
    err = np.full(w.shape[0], np.inf)
    # each clip's squared rounding error, (w - int8_round(w, s))^2, in one buffer laid out as that
    # expression's result would be (the row sums then add the same values in the same order)
    buf = np.empty_like(w, dtype=np.float64) if ratios and w.size else None
    for r in ratios:
        s = np.where(top > 0, top * r / INT8_MAX, 1.0)
        if buf is None:
            e = np.zeros(w.shape[0])
        else:
            np.divide(w, s[:, None], out=buf)
            np.rint(buf, out=buf)
            np.clip(buf, -INT8_MAX, INT8_MAX, out=buf)
            buf *= s[:, None]
            np.subtract(w, buf, out=buf)
            e = np.sum(np.square(buf, out=buf), axis=1)
        better = e < err * (1 - 1e-12)
        best, err = np.where(better, s, best), np.where(better, e, err)
    best = best.astype(np.float32).astype(np.float64)
    return np.where(best > 0, best, 1.0)  # a row too small for a float32 scale rounds to 0 on scale 1


@dataclass(frozen=True)
class SparseGPTStats:
    """What :func:`sparsegpt_2_4` did.

    Attributes:
        loss: Sum over pruned weights of ``e^2 / 2`` (``e = (w - q) / U[j, j]``): the OBS
            estimate of the added ``tr(dW H dW^T) / 2``; with ``H = 2/n X^T X`` that is the mean
            over rows of ``||(W - W') x||^2`` (damping aside). 0 after the magnitude fallback.
        damp: Relative damping that was finally used (``lambda = damp * mean(diag(H))``).
        retries: How many times the damping was raised because Cholesky failed.
        fallback: True when every damping failed and plain magnitude pruning was used.
        dead_columns: Columns with a zero Hessian diagonal, whose weights were set to 0.
        scale: With ``int8``: the per-row INT8 scales the kept weights were rounded onto
            (float64 ``[rows]``, float32-representable), else None.
    """

    loss: float
    damp: float
    retries: int
    fallback: bool
    dead_columns: int
    scale: Array | None = None


def _check_weight(w: Array) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a weight matrix [rows, cols], got shape {w.shape}")
    if w.dtype.kind in "biuO":
        raise ValueError(f"expected a floating-point weight, got dtype {w.dtype}")
    nm.check_axis(w.shape, 1)


def _check_square(h: Array, cols: int, name: str) -> None:
    if h.shape != (cols, cols):
        raise ValueError(f"{name} has shape {h.shape}; a weight with {cols} columns needs ({cols}, {cols})")


@blas.deterministic
def upper_cholesky_inverse(h: npt.ArrayLike) -> Array:
    """Upper-triangular ``U`` with ``U^T U = H^{-1}`` (positive diagonal), from one Cholesky.

    With ``J`` the reversal permutation and ``J H J = L L^T`` (lower ``L``),
    ``H^{-1} = (J L^{-T} J)(J L^{-1} J)`` and ``J L^{-1} J`` is upper triangular with a
    positive diagonal, hence the Cholesky factor sought.

    Raises:
        numpy.linalg.LinAlgError: When ``H`` is not (numerically) positive definite.
    """
    a = np.array(np.asarray(h, dtype=np.float64)[::-1, ::-1], order="C")
    return np.ascontiguousarray(_factor_of_reversed(a))


def _factor_of_reversed(a: Array) -> Array:
    """:func:`upper_cholesky_inverse` from ``a = J H J`` (C-ordered; overwritten), in place.

    ``a.T`` is the same symmetric matrix in Fortran order, so LAPACK factorises it and then
    inverts the triangular factor without a copy; the result is returned as a reversed view.
    """
    lower, info = scipy.linalg.lapack.dpotrf(a.T, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the matrix is not positive definite (LAPACK info {info})")
    # the inverse of a triangular matrix is triangular: LAPACK trtri, about a third of a Cholesky
    inv, info = scipy.linalg.lapack.dtrtri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular inverse failed (LAPACK info {info})")
    u = inv[::-1, ::-1]
    if not np.all(np.isfinite(u)) or not np.all(np.diag(u) > 0):
        raise np.linalg.LinAlgError("inverse Cholesky factor is not finite")
    return u


def _obs_prune(
    wt: Array, u: Array, blocksize: int, scale: Array | None = None, col: Array | None = None
) -> tuple[Array, float]:
    """SparseGPT's column walk on the transposed weight ``wt[cols, rows]`` (modified in place).

    One step per group of 4 columns: the mask is chosen at the group's first column, so the
    group's 4 errors follow from a 4-step triangular recurrence (vectorised over rows); they
    reach the rest of the block in one product of rank 4 and the later blocks in one product
    per block. With ``scale`` (``[rows]``), every kept weight is rounded onto its row's INT8
    grid as it is fixed (step ``scale / col[j]`` in column ``j`` when ``col`` is given), and its
    rounding error is propagated like a pruned weight's.
    Returns the pruned transposed weight and the OBS loss.
    """
    cols = wt.shape[0]
    gs = nm.GROUP_SIZE
    out = np.empty_like(wt)
    loss = 0.0
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        w1 = wt[b0:b1]  # a view: updates land in wt
        u1 = np.ascontiguousarray(u[b0:b1, b0:b1])  # u may be a reversed view (see inverse_factor)
        d = np.diag(u1)
        err = np.empty_like(w1)
        for i in range(0, b1 - b0, gs):
            g = w1[i : i + gs]  # [4, rows], already updated by every earlier column
            prune = ~nm.keep_top2((g / d[i : i + gs, None]).T ** 2, 1).T
            e = err[i : i + gs]
            for k in range(gs):
                # column i+k after the updates of columns i..i+k-1 of this group
                wk = g[k] - u1[i : i + k, i + k] @ e[:k] if k else g[k]
                step = None if scale is None else (scale if col is None else scale / col[b0 + i + k])
                qk = np.where(prune[k], 0.0, wk if step is None else int8_round(wk, step))
                e[k] = (wk - qk) / d[i + k]
                out[b0 + i + k] = qk
            loss += 0.5 * float(np.einsum("ij,ij->", e, e))
            if i + gs < b1 - b0:
                w1[i + gs :] -= u1[i : i + gs, i + gs :].T @ e
        if b1 < cols:
            wt[b1:] -= np.ascontiguousarray(u[b0:b1, b1:]).T @ err
    return out, loss


@blas.deterministic
def sparsegpt_2_4(
    w: Array,
    h: npt.ArrayLike,
    blocksize: int = 128,
    damp: float = 0.01,
    dead: npt.ArrayLike | None = None,
    int8: bool = False,
    col_scale: Array | None = None,
) -> tuple[Array, SparseGPTStats]:
    """Prune ``w`` to 2:4 along ``cols`` with SparseGPT, updating the kept weights (and, with
    ``int8``, rounding them onto per-row INT8 grids: :func:`prune_with_factor`).

    Steps (float64): columns that are dead (zero diagonal of ``H``, or flagged in ``dead``)
    get weight 0 and diagonal 1; ``lambda = damp * mean(diag(H))`` is added to the diagonal;
    ``U`` is the upper Cholesky factor of ``H^{-1}``; then the column walk of the module
    docstring. If Cholesky fails, the damping is multiplied by 10 (up to 6 times, each with a
    warning); if it still fails, the weights are pruned by magnitude (warning).

    Args:
        w: Weight matrix ``[rows, cols]``, floating point, ``cols % 4 == 0``; not modified.
        h: ``[cols, cols]`` Hessian, e.g. ``RunningStats.hessian(damp=0.0)`` (damping is
            applied here; passing an already damped H just damps it more).
        blocksize: Columns per lazy-update block; a positive multiple of 4.
        damp: Relative damping.
        dead: Optional boolean ``[cols]`` mask of columns known to be dead (e.g.
            ``RunningStats.dead``, needed when ``H`` already has 1 on their diagonal).

    Returns:
        ``(new weight, stats)``: same shape and dtype as ``w``, exact zeros at pruned
        positions, 2:4 along axis 1.
    """
    _check_weight(w)
    factor = inverse_factor(h, w.shape[1], damp=damp, dead=dead)
    return prune_with_factor(w, factor, blocksize, int8=int8, col_scale=col_scale)


@dataclass(frozen=True)
class InverseFactor:
    """What SparseGPT needs from ``H``, independent of the weight: :func:`inverse_factor`.

    Attributes:
        u: Upper Cholesky factor of the damped ``H^{-1}`` (None: every damping failed).
        dead: Boolean ``[cols]`` mask of the dead columns.
        damp: The relative damping finally used.
        retries: How many times the damping was raised.
    """

    u: Array | None
    dead: Array
    damp: float
    retries: int


@blas.deterministic
def inverse_factor(h: npt.ArrayLike, cols: int, damp: float = 0.01, dead: npt.ArrayLike | None = None) -> InverseFactor:
    """Dead columns, damping and the upper Cholesky factor of ``H^{-1}`` (see :func:`sparsegpt_2_4`).

    Separate from the column walk so that it can be computed while something else runs (the
    refit's cross-validation) and shared by weights that read the same input.
    """
    src = np.asarray(h, dtype=np.float64)
    _check_square(src, cols, "H")
    if not damp >= 0:
        raise ValueError(f"damp must be non-negative, got {damp}")
    dead_mask = np.diag(src) == 0
    if dead is not None:
        dead_mask |= np.asarray(dead, dtype=bool).reshape(cols)
    ridx = cols - 1 - np.flatnonzero(dead_mask)  # dead columns in the reversed order

    def reversed_copy() -> Array:
        # the one private copy: J H J, dead columns set to the identity (the factor works on it in place)
        a = np.array(src[::-1, ::-1], order="C")
        a[ridx, :] = 0.0
        a[:, ridx] = 0.0
        a[ridx, ridx] = 1.0
        return a

    a = reversed_copy()
    diag = np.diag(a).copy()
    mean = float(np.mean(diag))
    rel = float(damp)
    u = None
    retries = 0
    while True:
        try:
            if retries:
                a = reversed_copy()  # the failed attempt overwrote it
            a.flat[:: cols + 1] = diag + rel * mean
            if not np.all(np.isfinite(a)):
                raise np.linalg.LinAlgError("H holds NaN or infinite values")
            u = _factor_of_reversed(a)
            break
        except np.linalg.LinAlgError as exc:
            if retries == _MAX_RETRIES:
                logger.warning(
                    "SparseGPT: Cholesky failed for a weight with %d columns up to damping %g (%s); "
                    "falling back to magnitude pruning",
                    cols,
                    rel,
                    exc,
                )
                break
            new_rel = max(rel * _DAMP_GROWTH, 1e-4)
            logger.warning(
                "SparseGPT: Cholesky failed for a weight with %d columns with damping %g (%s); retrying with %g",
                cols,
                rel,
                exc,
                new_rel,
            )
            rel = new_rel
            retries += 1
    return InverseFactor(u=u, dead=dead_mask, damp=rel, retries=retries)


@blas.deterministic
def prune_with_factor(
    w: Array, factor: InverseFactor, blocksize: int = 128, int8: bool = False, col_scale: Array | None = None
) -> tuple[Array, SparseGPTStats]:
    """SparseGPT's column walk on ``w`` with a factor from :func:`inverse_factor` (of ``w``'s input).

    With ``int8`` the walk is the joint one (module docstring): a first plain walk gives the
    pruned weights whose rows set the scales (:func:`int8_scales`), a second walk from ``w``
    rounds every kept weight onto those grids as it fixes it. The scales are in the stats;
    ``result / scale`` is then integral in ``[-127, 127]`` (in float64; the caller's dtype
    rounds it).

    ``col_scale`` (``[cols]``, positive): the weight will be stored as ``W * col_scale`` (its input
    channels rescaled for outliers, :mod:`onnx_sparse.quant.smooth`), so that is the matrix whose rows
    get the grids: here column ``j`` is rounded with step ``scale / col_scale[j]``. The walk itself,
    its damping and its masks stay those of ``w``, exactly as without INT8.
    """
    _check_weight(w)
    if factor.dead.shape != (w.shape[1],):
        raise ValueError(f"the factor is for {factor.dead.shape[0]} columns; the weight has {w.shape[1]}")
    if blocksize < 1 or blocksize % nm.GROUP_SIZE:
        raise ValueError(f"blocksize must be a positive multiple of {nm.GROUP_SIZE}, got {blocksize}")
    w64 = w.astype(np.float64)
    if not np.all(np.isfinite(w64)):
        raise ValueError("the weight holds NaN or infinite values")
    dead_mask = factor.dead
    w64[:, dead_mask] = 0.0
    u = factor.u
    if u is None:
        out = nm.prune_2_4(w64, 1)
        loss = 0.0
    else:
        out, loss = _walk(w64, u, blocksize, None, dead_mask)
    scale = None
    if int8:
        col = None if col_scale is None else np.asarray(col_scale, dtype=np.float64).reshape(w.shape[1])
        scale = int8_scales(out if col is None else out * col)
        if u is None:
            out = int8_round(out, scale[:, None] if col is None else scale[:, None] / col)
        else:
            out, loss = _walk(w64, u, blocksize, scale, dead_mask, col)
    stats = SparseGPTStats(
        loss=loss,
        damp=factor.damp,
        retries=factor.retries,
        fallback=u is None,
        dead_columns=int(dead_mask.sum()),
        scale=scale,
    )
    return out.astype(w.dtype), stats


def _walk(
    w64: Array, u: Array, blocksize: int, scale: Array | None, dead: Array, col: Array | None = None
) -> tuple[Array, float]:
    """The column walk over fixed chunks of rows, side by side (rows are independent given U; the
    same chunks on every machine, so the result does not depend on the number of cores)."""
    chunks = _row_chunks(w64.shape[0])
    parts = blas.parallel_map(
        lambda r: _obs_prune(np.ascontiguousarray(w64[r].T), u, blocksize, None if scale is None else scale[r], col),
        chunks,
    )
    out = np.concatenate([p.T for p, _ in parts]) if len(parts) > 1 else parts[0][0].T
    out[:, dead] = 0.0  # dead columns: exact zeros where rounding left crumbs
    return out, float(sum(v for _, v in parts))


# --------------------------------------------------------------------------------------
# Asymmetric reconstruction
# --------------------------------------------------------------------------------------


@blas.deterministic
def asymmetric_refit(w: Array, pp: npt.ArrayLike, pd: npt.ArrayLike, damp: float = 0.01) -> Array:
    """Dense weights that map the pruned-model input to the dense-model output.

    Solves, with ``Xp``/``Xd`` the layer's inputs in the pruned/dense model (paired rows)::

        W' = argmin ||Xd W^T - Xp W'^T||_F^2 + lambda ||W' - W||_F^2
           = W (pd^T + lambda I) (pp + lambda I)^{-1}

    where ``pp = Xp^T Xp``, ``pd = Xp^T Xd`` and ``lambda = damp * mean(diag(pp))``. The ridge
    pulls towards the dense ``W``, not towards 0: ``damp = inf`` returns ``W`` itself and a
    dead input column keeps its weight. ``damp = 0`` gives the least-squares solution closest
    to ``W`` (pseudo-inverse), well defined even when ``pp`` is singular.

    Args:
        w: Dense weight ``[rows, cols]``; not modified.
        pp: ``Xp^T Xp`` (``[cols, cols]``, e.g. ``PairedStats.pp``); any common scale of
            ``pp`` and ``pd`` gives the same result.
        pd: ``Xp^T Xd`` (``[cols, cols]``, e.g. ``PairedStats.pd``).
        damp: Relative ridge damping, ``>= 0`` (``inf`` allowed).

    Returns:
        The refit weight, float64 ``[rows, cols]`` (dense: prune it afterwards).
    """
    if w.ndim != 2:
        raise ValueError(f"expected a weight matrix [rows, cols], got shape {w.shape}")
    cols = w.shape[1]
    g = np.asarray(pp, dtype=np.float64)
    c = np.asarray(pd, dtype=np.float64)
    _check_square(g, cols, "pp")
    _check_square(c, cols, "pd")
    if not damp >= 0:
        raise ValueError(f"damp must be non-negative, got {damp}")
    return _refit(w.astype(np.float64), g, c - g, damp)


def _refit(
    w64: Array,
    pp: Array,
    pq: Array | None,
    damp: float,
    factors: dict[float, Any] | None = None,
    rhs_made: Callable[[], None] | None = None,
    *,
    rhs_of: Callable[[], Array] | None = None,
) -> Array:
    """:func:`asymmetric_refit` from ``pp`` and ``pq = pd - pp`` (``Xp^T (Xd - Xp)``).

    ``factors``: factorisations of ``pp + ridge I`` by ridge, kept for the weights that read the
    same input (:func:`_ridge_solve`). ``rhs_made``: called once ``pq`` is read for the last time
    (before the solve), so that a caller that owns it can let it go. ``rhs_of`` (with ``pq`` None):
    gives the right-hand side ``pq W^T`` (``[cols, rows]``) itself, for statistics that hold it
    rather than ``pq`` (:class:`~onnx_sparse.core.hessian.PairedStats` ``project``)."""
    scale = float(np.mean(np.diag(pp)))
    if math.isinf(damp) or scale <= 0:
        return w64
    if pq is None:
        if rhs_of is None:
            raise ValueError("the refit needs pq or its right-hand side")
        rhs = rhs_of()
    else:
        # W'^T = W^T + (pp + lambda I)^{-1} (pd - pp) W^T: the same solution, written as a
        # correction of W so that damp = 0 can use the minimum-norm correction.
        rhs = _in_pieces(lambda r: pq @ w64[r].T, w64.shape[0])
        if rhs_made is not None:
            del pq
            rhs_made()
    if not np.any(rhs):  # the same input in both models: nothing to refit
        return w64
    return w64 + _ridge_solve(pp, rhs, damp * scale, factors).T


#: Rows (or right-hand sides) per independent piece of a solve that is split across workers.
ROW_CHUNK = 256


def _row_chunks(n: int) -> list[slice]:
    """Fixed pieces of ``n`` rows: one when ``n <= 2 * ROW_CHUNK``, else ``ROW_CHUNK`` each."""
    if n <= 2 * ROW_CHUNK:
        return [slice(0, n)]
    return [slice(i, min(i + ROW_CHUNK, n)) for i in range(0, n, ROW_CHUNK)]


def _in_pieces(fn: Callable[[slice], Array], n: int) -> Array:
    """``fn`` over the fixed pieces of ``n`` (:func:`_row_chunks`), side by side, its results
    joined along axis 1 (one piece: ``fn`` of the whole, no copy)."""
    pieces = _row_chunks(n)
    if len(pieces) == 1:
        return fn(pieces[0])
    return np.concatenate(blas.parallel_map(fn, pieces), axis=1)


def _ridge_factor(g: np.ndarray, ridge: float) -> Any:
    """The Cholesky factorisation of ``g + ridge I`` (``ridge > 0``) for :func:`_ridge_solve`."""
    a = g.copy()
    a.flat[:: g.shape[0] + 1] += ridge
    # a is symmetric: its Fortran view a.T is the same matrix, factorised in place (no copy)
    return scipy.linalg.cho_factor(a.T, check_finite=False, overwrite_a=True)


def _ridge_solve(g: np.ndarray, rhs: np.ndarray, ridge: float, factors: dict[float, Any] | None = None) -> np.ndarray:
    """``(g + ridge I)^{-1} rhs`` by Cholesky; ``ridge == 0``: the minimum-norm least-squares solution.

    One factorisation (taken from, or kept in, ``factors`` by ridge when given: weights that read
    the same input share it); many right-hand sides are solved in fixed pieces side by side.
    """
    if ridge == 0:
        return np.linalg.lstsq(g, rhs, rcond=None)[0]
    factor = factors.get(ridge) if factors is not None else None
    if factor is None:
        factor = _ridge_factor(g, ridge)
        if factors is not None:
            factors[ridge] = factor
    return _in_pieces(lambda c: scipy.linalg.cho_solve(factor, rhs[:, c], check_finite=False), rhs.shape[1])


@blas.deterministic
def asymmetric_sparsegpt_2_4(
    w: Array,
    pp: npt.ArrayLike,
    pd: npt.ArrayLike,
    refit_damp: float = 0.01,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[Array, SparseGPTStats]:
    """Refit ``w`` to the dense output (:func:`asymmetric_refit`), then prune it with SparseGPT.

    Why two steps: with ``W'`` the least-squares refit, ``Xp^T (Xd W^T - Xp W'^T) = 0``, so
    for any ``W''`` ::

        ||Xd W^T - Xp W''^T||^2 = ||Xd W^T - Xp W'^T||^2 + ||Xp (W' - W'')^T||^2

    and the second term is what SparseGPT minimises with ``H ~ Xp^T Xp = pp`` (the ridge
    makes this approximate). Dead columns of ``pp`` are zeroed by SparseGPT.

    Args:
        w: Dense weight ``[rows, cols]``; not modified.
        pp: ``Xp^T Xp``.
        pd: ``Xp^T Xd``.
        refit_damp: Relative ridge damping of the refit (``inf``: plain SparseGPT on ``pp``).
        blocksize: SparseGPT block size.
        damp: SparseGPT relative damping.

    Returns:
        ``(new weight, stats)`` as :func:`sparsegpt_2_4`, in ``w``'s dtype.
    """
    refit = asymmetric_refit(w, pp, pd, refit_damp)
    out, stats = sparsegpt_2_4(refit, pp, blocksize=blocksize, damp=damp)
    return out.astype(w.dtype), stats


@blas.deterministic
def refit_error(w_target: Array, w_candidate: Array, stats: PairedStats) -> float:
    """``sum ||W x_dense - W' x_pruned||^2`` over the rows of ``stats``, from its Gram matrices.

    ``= tr(W dd W^T) - 2 tr(W' pd W^T) + tr(W' pp W'^T)``; without ``dd`` (``track_dense=False``)
    the first term, which does not depend on ``W'``, is left out.
    """
    if stats.pqw is not None:
        raise ValueError("refit_error needs pq: not of projected statistics")
    a = np.asarray(w_target, dtype=np.float64)
    b = np.asarray(w_candidate, dtype=np.float64)
    err = float(np.einsum("ij,ij->", b @ stats.pp, b)) - 2.0 * float(np.einsum("ij,ij->", b @ stats.pd, a))
    if stats.dd is not None:
        err += float(np.einsum("ij,ij->", a @ stats.dd, a))
    return err
