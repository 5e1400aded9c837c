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

Asymmetric reconstruction: when the layer's input in the partly pruned model
(``Xp``) differs from its input in the dense model (``Xd``), first refit the dense weights
to reproduce the dense output from the pruned input (:func:`asymmetric_refit`), then run
SparseGPT on the refit weights with ``H ~ Xp^T Xp`` (:func:`asymmetric_sparsegpt_2_4`). The
ridge damping of the refit can be chosen by K-fold cross-validation over per-fold
:class:`~onnx_sparse.core.hessian.PairedStats` (:func:`choose_refit_damp`,
:func:`asymmetric_cv_2_4`): the held-out error of the dense refit for each candidate comes
from one Cholesky factorisation per fold and candidate (:func:`ridge_cv_scores`), and
SparseGPT runs once, on the chosen refit.

Linear algebra: LAPACK through numpy and scipy (``scipy.linalg``: ``cho_factor``/``cho_solve``
for the positive definite solves, ``lapack.dtrtri`` for the triangular inverse), which numpy
alone does not offer; a general solve (LU) costs about three times as much.

All functions are pure: inputs are never modified; everything is computed in float64, except
the factorisations that only score cross-validation candidates on wide layers (float32, refined
to float64 accuracy: :func:`_ridge_solve_scored`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.linalg

from onnx_sparse.core import blas, nm
from onnx_sparse.core.hessian import PairedStats

__all__ = [
    "SparseGPTStats",
    "RefitCV",
    "DEFAULT_REFIT_GRID",
    "upper_cholesky_inverse",
    "InverseFactor",
    "inverse_factor",
    "prune_with_factor",
    "sparsegpt_2_4",
    "asymmetric_refit",
    "asymmetric_sparsegpt_2_4",
    "refit_error",
    "choose_refit_damp",
    "ridge_cv_scores",
    "SELECT_ROWS",
    "asymmetric_cv_2_4",
    "choose_damp",
]

logger = logging.getLogger(__name__)

Array = npt.NDArray

#: Relative ridge dampings tried by :func:`choose_refit_damp`; ``inf`` means "no refit".
DEFAULT_REFIT_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)

_DAMP_GROWTH = 10.0
_MAX_RETRIES = 6


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
    """

    loss: float
    damp: float
    retries: int
    fallback: bool
    dead_columns: int


@dataclass(frozen=True)
class RefitCV:
    """Outcome of :func:`choose_refit_damp`.

    Attributes:
        damp: The chosen relative ridge damping (``inf``: no refit).
        grid: The candidates, in the order tried.
        scores: Held-out squared output error per candidate, summed over folds and divided
            by the number of held-out rows (``nan``: not evaluated by the unimodal search). Without ``dd`` (``PairedStats(track_dense=False)``)
            the constant ``tr(W Xd^T Xd W^T)`` is left out, so only differences are meaningful.
    """

    damp: float
    grid: tuple[float, ...]
    scores: tuple[float, ...]


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


def _obs_prune(wt: Array, u: Array, blocksize: int) -> tuple[Array, float]:
    """SparseGPT's column walk on the transposed weight ``wt[cols, rows]`` (modified in place).

    One step per group of 4 columns: the mask is chosen at the group's first column, so the
    group's 4 errors follow from a 4-step triangular recurrence (vectorised over rows); they
    reach the rest of the block in one product of rank 4 and the later blocks in one product
    per block. Returns the pruned transposed weight and the OBS loss.
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
                e[k] = np.where(prune[k], wk, 0.0) / d[i + k]
                out[b0 + i + k] = np.where(prune[k], 0.0, wk)
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
) -> tuple[Array, SparseGPTStats]:
    """Prune ``w`` to 2:4 along ``cols`` with SparseGPT, updating the kept weights.

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
    return prune_with_factor(w, factor, blocksize)


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
def prune_with_factor(w: Array, factor: InverseFactor, blocksize: int = 128) -> tuple[Array, SparseGPTStats]:
    """SparseGPT's column walk on ``w`` with a factor from :func:`inverse_factor` (of ``w``'s input)."""
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
        # rows are independent given U: fixed chunks of rows, side by side (the same chunks on
        # every machine, so the result does not depend on the number of cores)
        parts = blas.parallel_map(
            lambda r: _obs_prune(np.ascontiguousarray(w64[r].T), u, blocksize), _row_chunks(w64.shape[0])
        )
        out = np.concatenate([p.T for p, _ in parts]) if len(parts) > 1 else parts[0][0].T
        loss = float(sum(v for _, v in parts))
        out[:, dead_mask] = 0.0  # exact zeros where rounding left crumbs
    stats = SparseGPTStats(
        loss=loss, damp=factor.damp, retries=factor.retries, fallback=u is None, dead_columns=int(dead_mask.sum())
    )
    return out.astype(w.dtype), stats


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


def _refit(w64: Array, pp: Array, pq: Array, damp: float) -> Array:
    """:func:`asymmetric_refit` from ``pp`` and ``pq = pd - pp`` (``Xp^T (Xd - Xp)``)."""
    scale = float(np.mean(np.diag(pp)))
    if math.isinf(damp) or scale <= 0:
        return w64
    # W'^T = W^T + (pp + lambda I)^{-1} (pd - pp) W^T: the same solution, written as a
    # correction of W so that damp = 0 can use the minimum-norm correction.
    rhs = _in_pieces(lambda r: pq @ w64[r].T, w64.shape[0])
    if not np.any(rhs):  # the same input in both models: nothing to refit
        return w64
    return w64 + _ridge_solve(pp, rhs, damp * scale).T


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


def _ridge_solve(g: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """``(g + ridge I)^{-1} rhs`` by Cholesky; ``ridge == 0``: the minimum-norm least-squares solution.

    One factorisation; many right-hand sides are solved in fixed pieces side by side.
    """
    if ridge == 0:
        return np.linalg.lstsq(g, rhs, rcond=None)[0]
    a = g.copy()
    a.flat[:: g.shape[0] + 1] += ridge
    # a is symmetric: its Fortran view a.T is the same matrix, factorised in place (no copy)
    factor = scipy.linalg.cho_factor(a.T, check_finite=False, overwrite_a=True)
    return _in_pieces(lambda c: scipy.linalg.cho_solve(factor, rhs[:, c], check_finite=False), rhs.shape[1])


#: Largest relative size of the refinement step of :func:`_ridge_solve_scored` for the float32
#: factorisation to be trusted; beyond it (an ill-conditioned ``g + ridge I``) the solve is
#: redone in float64.
_REFINE_TOL = 1e-3
#: Columns from which :func:`_ridge_solve_scored` factorises in float32 (below it the
#: factorisation is too cheap for the refinement to pay: plain float64).
_FLOAT32_FROM = 1024


def _ridge_solve_scored(g: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """``(g + ridge I)^{-1} rhs`` for scoring a candidate (``ridge > 0``): the Cholesky
    factorisation in float32 (about 1.6x faster), then one step of iterative refinement against
    the float64 matrix, which brings the error from ``eps32 * cond`` to about its square; when
    that step is not small (or float32 cannot factorise the matrix), plain float64.

    Only the cross-validation scores use it: the weights come from :func:`_ridge_solve`.
    """
    if g.shape[0] < _FLOAT32_FROM:
        return _ridge_solve(g, rhs, ridge)
    a = g.astype(np.float32)
    a.flat[:: g.shape[0] + 1] += np.float32(ridge)
    try:
        factor = scipy.linalg.cho_factor(a.T, check_finite=False, overwrite_a=True)
    except np.linalg.LinAlgError:
        return _ridge_solve(g, rhs, ridge)
    x = scipy.linalg.cho_solve(factor, rhs.astype(np.float32), check_finite=False).astype(np.float64)
    resid = rhs - g @ x - ridge * x
    step = scipy.linalg.cho_solve(factor, resid.astype(np.float32), check_finite=False)
    size = float(np.linalg.norm(step)) / max(float(np.linalg.norm(x)), 1e-300)
    if not np.isfinite(size) or size > _REFINE_TOL:
        return _ridge_solve(g, rhs, ridge)
    x += step
    return x


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
    a = np.asarray(w_target, dtype=np.float64)
    b = np.asarray(w_candidate, dtype=np.float64)
    err = float(np.einsum("ij,ij->", b @ stats.pp, b)) - 2.0 * float(np.einsum("ij,ij->", b @ stats.pd, a))
    if stats.dd is not None:
        err += float(np.einsum("ij,ij->", a @ stats.dd, a))
    return err


#: Output rows (rows of ``W``) that :func:`ridge_cv_scores` scores by default: the held-out
#: error is a sum of independent per-row ridge problems, so a seeded subset of rows estimates
#: it (scaled up) at a fraction of the cost of the solves.
SELECT_ROWS = 128
#: Work budget of :func:`choose_refit_damp` per weight, in multiply-adds of the Cholesky
#: factorisations (``cols^3 / 6`` each, about 5 candidates per held-out fold): folds are held
#: out in turn while the budget allows, at least one. 5e9 keeps all 4 folds up to about 1,140
#: columns, 3 up to 1,250, 2 up to 1,450 and holds out one fold of wider layers (MiniLM's and BERT's
#: FFN-down projections); on the project's real models the choice scored as well as with all
#: 4 folds (tools/eval_real.py; the closing note of the change has the table).
SELECT_BUDGET = 5e9


def held_out_folds(cols: int, folds: int, budget: float = SELECT_BUDGET) -> int:
    """How many of ``folds`` folds :func:`choose_refit_damp` holds out in turn for a weight with
    ``cols`` input columns: as many as ``budget`` allows, at least one (see :data:`SELECT_BUDGET`).

    A caller that knows this before it collects statistics needs to keep only these folds
    apart, and every other row in one sum (``rest`` of :func:`asymmetric_cv_2_4`).
    """
    return max(1, min(folds, int(budget // (5 * cols**3 / 6))))


def _check_folds(used: Sequence[PairedStats], total: PairedStats | None) -> None:
    if total is None:
        if len(used) < 2:
            raise ValueError(f"cross-validation needs at least 2 folds with rows, got {len(used)}")
    elif not used or any(total.n <= f.n for f in used):
        raise ValueError("cross-validation needs a fold with rows and rows outside each fold")


@blas.deterministic
def ridge_cv_scores(
    w: Array,
    folds: Sequence[PairedStats],
    grid: Sequence[float] = DEFAULT_REFIT_GRID,
    rows: int | None = SELECT_ROWS,
    seed: int = 0,
    unimodal: bool = False,
    held_out: int | None = None,
    total: PairedStats | None = None,
) -> tuple[float, ...]:
    """Held-out error of the dense ridge refit (:func:`asymmetric_refit`) for every damping.

    For each fold ``f`` (train: the sum of the other folds' statistics, ``G = pp``, ``C = pd``;
    held out: ``P = pp_f``, ``Pd = pd_f``), with ``W' = W + D^T`` and
    ``D = (G + lambda I)^{-1} (C - G) W^T``::

        err(W') = err(W) + 2 tr(D^T (P - Pd) W^T) + tr(D^T P D)

    so one Cholesky factorisation of ``G + lambda I`` per fold and damping gives the score
    (in float32 with one float64 refinement step on wide layers, :func:`_ridge_solve_scored`)
    (no SparseGPT run, no ``dd``: the constant ``tr(W dd W^T)`` is left out as in
    :func:`refit_error`). ``inf`` scores ``W`` itself; ``0`` uses the minimum-norm least
    squares solution. A damping whose factorisation fails scores ``inf``.

    Args:
        w: Dense weight ``[rows, cols]``.
        folds: Per-fold statistics (folds with no rows are ignored; at least 2 needed).
        grid: Relative dampings (``lambda = damp * mean(diag(G))``).
        rows: Score only this many output rows, a seeded uniform subset, scaled by
            ``rows(W) / rows`` (None: all rows, exact).
        seed: Seed of that subset.
        unimodal: Assume the score is unimodal in the damping: start at the middle finite
            candidate and walk towards the better neighbour until neither is better (about 3
            of 5 candidates factorised instead of all); candidates not visited score ``nan``.
        held_out: Hold out only the first this many folds in turn (each trained on all the
            other folds); None: every fold.
        total: The statistics of every row when the caller has them: the sum of ``folds``,
            or more (rows of folds that are never held out); then one fold is enough.

    Returns:
        Per damping, the held-out error summed over folds and divided by the held-out rows.
    """
    used = [f for f in folds if f.n > 0]
    _check_folds(used, total)
    if not grid:
        raise ValueError("the damping grid is empty")
    a = np.asarray(w, dtype=np.float64)
    factor = 1.0
    if rows is not None and rows < a.shape[0]:
        pick = np.sort(np.random.default_rng(seed).choice(a.shape[0], size=rows, replace=False))
        factor = a.shape[0] / rows
        a = a[pick]
    at = np.ascontiguousarray(a.T)  # [cols, k]
    every = PairedStats.total(used) if total is None else total
    tested = used if held_out is None else used[: max(1, held_out)]
    every_r = every.pq @ at

    def prepare(held: PairedStats) -> tuple[PairedStats, Array, Array, Array, float, float]:
        g = every.pp - held.pp
        hq = held.pq @ at
        r = every_r - hq  # the right-hand side (C - G) W^T
        e = -hq  # (P - Pd) W^T
        base = float(np.einsum("ij,ij->", -(held.pp @ at) - 2.0 * hq, at))
        # r = 0 (the layer sees the same input in both models, e.g. the first layer): W' = W
        scale = float(np.mean(np.diag(g))) if np.any(r) else 0.0
        return held, g, r, e, base, scale

    # folds are independent: prepared and scored side by side
    prepared = blas.parallel_map(prepare, tested)
    n_rows = sum(f.n for f in tested)

    def fold_score(task: tuple[tuple[PairedStats, Array, Array, Array, float, float], float]) -> float:
        (held, g, r, e, base, scale), lam = task
        if math.isinf(lam) or scale <= 0:
            return base
        try:
            d = _ridge_solve_scored(g, r, lam * scale)
        except np.linalg.LinAlgError:
            return math.inf
        return base + 2.0 * float(np.einsum("ij,ij->", d, e)) + float(np.einsum("ij,ij->", held.pp @ d, d))

    def scores(lams: Sequence[float]) -> list[float]:
        per = blas.parallel_map(fold_score, [(p, lam) for lam in lams for p in prepared])
        k = len(prepared)
        return [sum(per[j * k : (j + 1) * k]) * factor / n_rows for j in range(len(lams))]

    if not unimodal:
        return tuple(scores([float(lam) for lam in grid]))
    # Descend from the middle of the finite grid (in order of damping) until neither
    # neighbour is better; candidates not visited score nan. With fewer folds than worker
    # threads, the next candidates of the walk are scored ahead, side by side (the walk, and
    # so the choice, is the same; only idle cores do the extra work).
    spare = len(prepared) < blas.workers()
    out = [math.nan] * len(grid)
    for i, lam in enumerate(grid):
        if math.isinf(lam):
            out[i] = scores([math.inf])[0]
    finite = sorted((i for i, lam in enumerate(grid) if not math.isinf(lam)), key=lambda i: grid[i])

    def visit(positions: Sequence[int]) -> None:
        todo = [finite[p] for p in positions if 0 <= p < len(finite) and math.isnan(out[finite[p]])]
        for i, v in zip(todo, scores([float(grid[i]) for i in todo]), strict=True):
            out[i] = v

    walked = {i for i, lam in enumerate(grid) if math.isinf(lam)}
    if finite:
        pos = (len(finite) - 1) // 2
        visit([pos, pos - 1, pos + 1] if spare else [pos])
        walked.add(finite[pos])
        step = 0
        while True:
            moved = False
            for nxt in [pos - 1, pos + 1] if step == 0 else [pos + step]:
                if 0 <= nxt < len(finite):
                    visit([nxt, nxt + (nxt - pos)] if spare and step else [nxt])
                    i = finite[nxt]
                    walked.add(i)
                    if out[i] < out[finite[pos]]:
                        step, pos, moved = nxt - pos, nxt, True
                        break
            if not moved:
                break
    # what was scored ahead but not reached by the walk does not take part in the choice
    out = [v if i in walked else math.nan for i, v in enumerate(out)]
    return tuple(out)


@blas.deterministic
def choose_refit_damp(
    w: Array,
    folds: Sequence[PairedStats],
    grid: Sequence[float] = DEFAULT_REFIT_GRID,
    prune: bool = False,
    blocksize: int = 128,
    damp: float = 0.01,
    rows: int | None = SELECT_ROWS,
    unimodal: bool = True,
    budget: float | None = SELECT_BUDGET,
    total: PairedStats | None = None,
) -> RefitCV:
    """Choose the refit ridge damping by K-fold cross-validation.

    Default (``prune=False``): :func:`ridge_cv_scores`, the held-out error of the dense refit
    for every candidate, from one Cholesky factorisation per fold and candidate. With
    ``prune``, each candidate and fold runs the refit AND SparseGPT on the other folds and
    scores the pruned weights (what is deployed): about as many SparseGPT runs as folds x
    candidates, kept for comparison. The candidate with the smallest total held-out error per
    row wins; ties go to the larger damping.

    Folds should split by calibration sample (an image, a sentence), not by row: rows of one
    sample (pixels, tokens) are correlated and would leak between folds. Folds with no rows
    are ignored.

    Args:
        w: Dense weight ``[rows, cols]``.
        folds: One :class:`PairedStats` per fold, at least 2 with rows.
        grid: Candidate relative dampings (``inf`` = no refit).
        prune: Score the pruned weights rather than the dense refit (slow).
        blocksize: SparseGPT block size (with ``prune``).
        damp: SparseGPT relative damping (with ``prune``).
        rows: Output rows scored without ``prune`` (see :func:`ridge_cv_scores`).
        unimodal: Without ``prune``, factorise only the candidates a descent from the middle
            of the grid visits (see :func:`ridge_cv_scores`; the others score ``nan``).
        budget: Without ``prune``, hold out folds in turn only while ``folds x 5 x cols^3 / 6``
            multiply-adds stay within this (at least one fold; None: every fold).
        total: The statistics of every row, when the caller has them (see :func:`ridge_cv_scores`).

    Returns:
        The chosen damping with every candidate's score.
    """
    used = [f for f in folds if f.n > 0]
    _check_folds(used, total if not prune else None)
    if not grid:
        raise ValueError("the damping grid is empty")
    if not prune:
        held = None if budget is None else held_out_folds(np.shape(w)[1], len(used), budget)
        scores = list(ridge_cv_scores(w, used, grid, rows=rows, unimodal=unimodal, held_out=held, total=total))
    else:
        rows_total = sum(f.n for f in used)
        trains = [PairedStats.total([g for j, g in enumerate(used) if j != i]) for i in range(len(used))]
        scores = []
        for lam in grid:
            err = 0.0
            for out_fold, train in zip(used, trains, strict=True):
                cand, _ = asymmetric_sparsegpt_2_4(w, train.pp, train.pd, lam, blocksize, damp)
                err += refit_error(w, cand, out_fold)
            scores.append(err / rows_total)
    best = min(range(len(grid)), key=lambda i: (math.inf if math.isnan(scores[i]) else scores[i], -float(grid[i])))
    logger.debug("refit damping by %d-fold CV: %s -> %g", len(used), dict(zip(grid, scores, strict=True)), grid[best])
    return RefitCV(damp=float(grid[best]), grid=tuple(float(g) for g in grid), scores=tuple(scores))


@blas.deterministic
def asymmetric_cv_2_4(
    w: Array,
    folds: Sequence[PairedStats],
    grid: Sequence[float] = DEFAULT_REFIT_GRID,
    prune_in_cv: bool = False,
    blocksize: int = 128,
    damp: float = 0.01,
    rest: PairedStats | None = None,
) -> tuple[Array, SparseGPTStats, RefitCV]:
    """Asymmetric SparseGPT with the refit damping chosen by :func:`choose_refit_damp`.

    After the choice, the final weights are fit on all folds together.

    Args:
        rest: The rows of folds that are never held out, in one sum (``folds`` are then the
            ones held out in turn, e.g. :func:`held_out_folds` of them): four matrices
            instead of two per fold. It is **consumed**: the total is added into it in place.

    Returns:
        ``(new weight in w's dtype, SparseGPT stats, cross-validation outcome)``.
    """
    _check_weight(w)
    if rest is not None and prune_in_cv:
        raise ValueError("prune_in_cv needs every fold apart (no rest)")
    used = [f for f in folds if f.n > 0]
    if rest is None:
        every = PairedStats.total(used)
    else:
        every = rest
        for f in used:
            every.add_(f)
    # SparseGPT's factor depends on pp only, not on the refit: computed while the damping is chosen
    factor = blas.Background(inverse_factor, every.pp, w.shape[1], damp)
    cv = choose_refit_damp(
        w, used, grid, prune=prune_in_cv, blocksize=blocksize, damp=damp, total=every,
        budget=SELECT_BUDGET if rest is None else None,
    )  # fmt: skip
    refit = _refit(w.astype(np.float64), every.pp, every.pq, cv.damp)
    out, stats = prune_with_factor(refit, factor.result(), blocksize)
    return out.astype(w.dtype), stats, cv


# --------------------------------------------------------------------------------------
# Damping of row-starved layers
# --------------------------------------------------------------------------------------


@blas.deterministic
def choose_damp(
    w: Array,
    xtx: npt.ArrayLike,
    folds: Sequence[npt.ArrayLike],
    grid: Sequence[float],
    blocksize: int = 128,
    rows: int = SELECT_ROWS,
    budget: float | None = SELECT_BUDGET,
    seed: int = 0,
) -> tuple[float, tuple[float, ...]]:
    """SparseGPT's damping by cross-validation over folds of calibration rows.

    For a layer that saw fewer rows than it has inputs (``X^T X`` is singular and the usual
    damping lets SparseGPT's update overfit). For each held-out fold ``f`` and candidate
    damping, SparseGPT runs on the other folds' ``X^T X`` and scores the held-out output error
    ``||X_f (W - W')^T||^2``; the smallest total wins (ties: the larger damping). What keeps it
    cheap on a wide layer:

    * the training ``X^T X`` is the total minus the held-out fold's (no product of the
      training rows);
    * SparseGPT's rows are independent given its factor, so only a seeded subset of the output
      rows is walked: as many as ``budget`` multiply-adds allow for the walks, at least
      ``rows`` (all of a small layer's);
    * folds are held out in turn only while ``budget`` allows (:func:`held_out_folds`);
    * the candidates of a fold run side by side (one factorisation each).

    Args:
        w: Dense weight ``[rows, cols]``.
        xtx: ``X^T X`` of the rows of every fold together (e.g. ``RunningStats.xtx``).
        folds: Each fold's rows ``[n_f, cols]``, split by calibration sample; at least 2
            folds with rows.
        grid: Candidate relative dampings (``lambda = damp * mean(diag(H))``).
        blocksize: SparseGPT block size.
        rows: The fewest output rows walked (fewer only when ``w`` has fewer).
        budget: Multiply-adds per weight for the walks of one held-out fold, and the budget of
            :func:`held_out_folds`; None: every row and every fold.
        seed: Seed of the row subset.

    Returns:
        ``(chosen damping, per candidate the held-out error per held-out row)``.
    """
    _check_weight(w)
    cols = w.shape[1]
    used = [x.reshape(-1, cols) for x in (np.asarray(f) for f in folds) if x.size]
    if len(used) < 2:
        raise ValueError(f"cross-validation needs at least 2 folds with rows, got {len(used)}")
    if not grid:
        raise ValueError("the damping grid is empty")
    total = np.asarray(xtx, dtype=np.float64)
    _check_square(total, cols, "xtx")
    a = w.astype(np.float64)
    walked = a.shape[0] if budget is None else max(rows, int(budget // (len(grid) * cols * cols)))
    if walked < a.shape[0]:
        a = a[np.sort(np.random.default_rng(seed).choice(a.shape[0], size=walked, replace=False))]
    held = len(used) if budget is None else held_out_folds(cols, len(used), budget)
    n_all = sum(len(f) for f in used)
    alive = [np.any(f != 0, axis=0) for f in used]  # per fold, the columns with a nonzero value
    scores = np.zeros(len(grid))
    for i in range(held):
        xf = used[i].astype(np.float64)
        # columns that are zero on every training row are dead there (weights set to 0)
        dead = ~np.any([v for j, v in enumerate(alive) if j != i], axis=0)
        h = total - xf.T @ xf
        h *= 2.0 / (n_all - xf.shape[0])

        def score(damp: float, h: Array = h, xf: Array = xf, dead: Array = dead) -> float:
            new, _ = prune_with_factor(a, inverse_factor(h, cols, damp=damp, dead=dead), blocksize)
            return float(np.sum(np.square(xf @ (a - new).T)))

        scores += blas.parallel_map(score, [float(d) for d in grid])
        del h
    scores *= w.shape[0] / a.shape[0] / sum(len(used[i]) for i in range(held))
    best = min(range(len(grid)), key=lambda k: (scores[k], -grid[k]))
    logger.debug(
        "damping by CV (%d of %d folds held out, %d of %d rows walked): %s -> %g",
        held, len(used), a.shape[0], w.shape[0], dict(zip(grid, scores.tolist(), strict=True)), grid[best],
    )  # fmt: skip
    return float(grid[best]), tuple(float(s) for s in scores)
