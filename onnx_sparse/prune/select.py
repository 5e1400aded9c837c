"""Model selection for the reconstruction: the dampings chosen by cross-validation.

Two choices are made per layer on held-out calibration samples (folds split by sample: rows
of one image or sentence are correlated and would leak between folds):

* **The refit's ridge damping** (``asym``): the held-out error of the dense refit for each
  candidate comes from one Cholesky factorisation per fold and candidate
  (:func:`ridge_cv_scores`, :func:`choose_refit_damp`), and SparseGPT then runs once, on the
  chosen refit (:func:`asymmetric_cv_2_4`).
* **SparseGPT's damping of a row-starved layer** (fewer calibration rows than inputs, so
  ``X^T X`` is singular and the usual damping overfits): each candidate runs SparseGPT on the
  other folds and scores the held-out output error (:func:`choose_damp`).

Both keep the work bounded on wide layers: a seeded subset of output rows is scored, and
folds are held out only while a budget of multiply-adds allows (:func:`held_out_folds`).
The factorisations that only score candidates on wide layers run in float32, refined to
float64 accuracy (:func:`_ridge_solve_scored`); every weight that is returned comes from
:mod:`onnx_sparse.prune.sparsegpt` in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.linalg

from onnx_sparse.core import blas
from onnx_sparse.core.hessian import PairedStats
from onnx_sparse.prune.sparsegpt import (
    InverseFactor,
    SparseGPTStats,
    _check_square,
    _check_weight,
    _refit,
    _ridge_solve,
    inverse_factor,
    prune_with_factor,
    refit_error,
)

__all__ = [
    "RefitCV",
    "InputFolds",
    "OVERLAP_COLS",
    "DEFAULT_REFIT_GRID",
    "SELECT_ROWS",
    "SELECT_BUDGET",
    "held_out_folds",
    "ridge_cv_scores",
    "choose_refit_damp",
    "asymmetric_cv_2_4",
    "choose_damp",
]

logger = logging.getLogger(__name__)

Array = npt.NDArray

#: Relative ridge dampings tried by :func:`choose_refit_damp`; ``inf`` means "no refit".
DEFAULT_REFIT_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)
#: Where the unimodal search over the grid starts: the finite candidate nearest this (in log
#: scale; the smaller on a tie). Where the scores are unimodal the walk ends at the same
#: candidate from any start, so the start decides only how many candidates are factorised.
#: The wide layers, whose factorisations cost the most (cols^3), mostly choose 1.0 (BERT-shaped
#: encoders, MiniLM-L3, magika) and the narrow ones the small dampings (PP-OCR cls, rec): from
#: 1.0 the search factorises 16-25% fewer cols^3 on the wide models than from the grid's middle
#: (0.1), with the same choice on every layer of the five real models and BERT-base.
REFIT_START = 1.0


@dataclass(frozen=True)
class RefitCV:
    """Outcome of :func:`choose_refit_damp`.

    Attributes:
        damp: The chosen relative ridge damping (``inf``: no refit).
        grid: The candidates, in the order tried.
        scores: Held-out squared output error per candidate, summed over folds and divided
            by the number of held-out rows (``nan``: not evaluated by the unimodal search). Without ``dd`` (``PairedStats(track_dense=False)``)
            the constant ``tr(W Xd^T Xd W^T)`` is left out, so only differences are meaningful.
        pruned_scores: The same for the pruned refit, for the candidates ``confirm`` shortlisted
            (``nan`` for the others; empty when none were).
    """

    damp: float
    grid: tuple[float, ...]
    scores: tuple[float, ...]
    pruned_scores: tuple[float, ...] = ()


#: Largest relative size of the refinement step of :func:`_ridge_solve_scored` for the float32
#: factorisation to be trusted; beyond it (an ill-conditioned ``g + ridge I``) the solve is
#: redone in float64.
_REFINE_TOL = 1e-3
#: Columns from which :func:`_ridge_solve_scored` factorises in float32 (below it the
#: factorisation is too cheap for the refinement to pay: plain float64).
_FLOAT32_FROM = 1024


def _float32_factor(g: np.ndarray, ridge: float) -> Any:
    """The float32 Cholesky factorisation of ``g + ridge I`` (None: float32 cannot factorise it)."""
    a = g.astype(np.float32)
    a.flat[:: g.shape[0] + 1] += np.float32(ridge)
    try:
        return scipy.linalg.cho_factor(a.T, check_finite=False, overwrite_a=True)
    except np.linalg.LinAlgError:
        return None


def _ridge_solve_scored(
    g: np.ndarray, rhs: np.ndarray, ridge: float, factors: dict[tuple[str, float], Any] | None = None
) -> np.ndarray:
    """``(g + ridge I)^{-1} rhs`` for scoring a candidate (``ridge > 0``): the Cholesky
    factorisation in float32 (about 1.6x faster), then one step of iterative refinement against
    the float64 matrix, which brings the error from ``eps32 * cond`` to about its square; when
    that step is not small (or float32 cannot factorise the matrix), plain float64.

    Only the cross-validation scores use it: the weights come from :func:`_ridge_solve`.
    ``factors``: the factorisations of ``g + ridge I`` made so far, shared by the weights that
    read the same input (the same factorisation, so the same numbers, as when each makes its own).
    """
    f64: dict[float, Any] | None = None
    if factors is not None:
        f64 = {r: f for (kind, r), f in factors.items() if kind == "64"}
    if g.shape[0] < _FLOAT32_FROM:
        return _solve64(g, rhs, ridge, factors, f64)
    key = ("32", ridge)
    if factors is not None and key in factors:
        factor = factors[key]
    else:
        factor = _float32_factor(g, ridge)
        if factors is not None:
            factors[key] = factor
    if factor is None:
        return _solve64(g, rhs, ridge, factors, f64)
    x = scipy.linalg.cho_solve(factor, rhs.astype(np.float32), check_finite=False).astype(np.float64)
    resid = rhs - g @ x - ridge * x
    step = scipy.linalg.cho_solve(factor, resid.astype(np.float32), check_finite=False)
    size = float(np.linalg.norm(step)) / max(float(np.linalg.norm(x)), 1e-300)
    if not np.isfinite(size) or size > _REFINE_TOL:
        # the float32 factorisation (cols^2 float32, unless kept in factors) goes before the float64 one is made
        del factor
        return _solve64(g, rhs, ridge, factors, f64)
    x += step
    return x


def _solve64(
    g: np.ndarray,
    rhs: np.ndarray,
    ridge: float,
    factors: dict[tuple[str, float], Any] | None,
    f64: dict[float, Any] | None,
) -> np.ndarray:
    """:func:`_ridge_solve` in float64, its factorisation kept in ``factors`` (as ``("64", ridge)``)."""
    out = _ridge_solve(g, rhs, ridge, f64)
    if factors is not None and f64 is not None and ridge in f64:
        factors[("64", ridge)] = f64[ridge]
    return out


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


#: Up to this many input columns, SparseGPT's factor of ``pp`` is made in the background while the
#: refit damping is chosen (:func:`asymmetric_cv_2_4`); a wider layer makes it after the choice, so
#: that its copy of ``H`` (``cols^2`` float64: 0.5 GB at 8,192) is not held together with the
#: cross-validation's matrices. (The choice keeps both cores busy on such a layer anyway.)
OVERLAP_COLS = 4096


class InputFolds:
    """One input's cross-validation folds, prepared once for every weight that reads it.

    Layers that read the same tensor (Q, K and V; gate and up) have the same paired statistics,
    so the same total, the same training Gram matrix per held-out fold and the same
    factorisations of it per candidate damping, and the same SparseGPT factor: this holds
    them, so that each is computed once while each weight's own work (its right-hand sides,
    its scores, its damping, its column walk) stays its own. What is shared is the very
    computation each weight would make, so the results are the same bits as without sharing.

    Args:
        folds: Per-fold statistics (folds with no rows are ignored).
        rest: The rows of folds that are never held out, in one sum (see
            :func:`asymmetric_cv_2_4`); it is **consumed**: the total is added into it in place.
        damp: SparseGPT's relative damping (its factor of the total ``pp`` is made in the
            background while the first weight's damping is chosen).
        users: How many weights will use this; the cross-validation's matrices are dropped
            after the last one's choice, and factorisations are kept only when more than one
            weight will use them (one weight alone needs each only once).

    Attributes:
        parks: The total's ``pp`` and ``pq`` are set aside on disk while the damping is chosen
            (:meth:`PairedStats.park <onnx_sparse.core.hessian.PairedStats.park>`), which reads
            neither once the folds are prepared: an input wider than :data:`OVERLAP_COLS` (no
            background factor reads ``pp`` then) that one weight reads. At 8,192 inputs that is
            1.07 GB less held beside the folds' matrices and factorisations.
    """

    def __init__(self, folds: Sequence[PairedStats], rest: PairedStats | None, damp: float, users: int = 1) -> None:
        used = [f for f in folds if f.n > 0]
        if rest is None:
            every = PairedStats.total(used)
        else:
            every = rest
            for f in used:
                every.add_(f)
        self.used = used
        self.every = every
        self.budgeted = rest is None  # the folds' budget applies when every fold is kept apart
        self.parks = every.cols > OVERLAP_COLS and users == 1
        self.damp = damp
        self.users = users
        self._left = users
        self._unprepared = users
        self._factor: blas.Background[InverseFactor] | None = None
        self._grams: dict[int, Array] = {}
        self.factors: dict[int, dict[tuple[str, float], Any]] | None = {} if users > 1 else None
        self.refit_factors: dict[float, Any] | None = {} if users > 1 else None
        self.fold_factors: dict[int, InverseFactor] | None = {} if users > 1 else None

    def train_gram(self, k: int, held_pp: Array) -> Array:
        """``pp`` of every row but held-out fold ``k``'s (kept for the other weights when shared)."""
        g = self._grams.get(k)
        if g is None:
            g = self.every.pp - held_pp
            if self.users > 1:
                self._grams[k] = g
        return g

    def prepared(self, keep: bool) -> bool:
        """One weight prepares its folds: for the last, unless ``keep`` (the pruned scores of
        ``confirm`` read the whole folds), the folds' own statistics are let go (each held-out fold's
        ``pp`` stays with the preparations; its ``pq`` is no longer needed: half of them). True when
        they were: the caller then holds the only references to the folds it prepares, and drops
        each fold's ``pq`` before it makes that fold's training Gram matrix."""
        self._unprepared -= 1
        if not keep and self._unprepared <= 0:
            self.used.clear()  # in place: the callers' references to this list see it empty too
            return True
        return False

    def fold_factors_of(self, k: int) -> dict[tuple[str, float], Any] | None:
        """The ridge factorisations of fold ``k``'s training Gram matrix made so far (None: not kept)."""
        if self.factors is None:
            return None
        return self.factors.setdefault(k, {})

    def start(self) -> None:
        """Start SparseGPT's factor of the total ``pp`` in the background (it depends on ``pp``
        only, not on the refit: it is made while the damping is chosen). Needs a
        :func:`~onnx_sparse.core.blas.single_threaded` block around the caller."""
        if self._factor is None:
            self._factor = blas.Background(inverse_factor, self.every.pp, self.every.cols, self.damp)

    def factor(self) -> InverseFactor:
        """SparseGPT's factor of the total ``pp``."""
        self.start()
        assert self._factor is not None
        return self._factor.result()

    def chose(self) -> None:
        """One weight's damping is chosen: after the last, the cross-validation's matrices go."""
        self._left -= 1
        if self._left <= 0:
            self._grams.clear()
            self.factors = None
            self.fold_factors = None

    def done(self) -> None:
        """One weight is finished: after the last, the refit's factorisations go too."""
        if self._left <= 0:
            self.refit_factors = None


def _park(stats: PairedStats, name: str) -> None:
    """``stats.park(name)``, or nothing but a warning where the scratch file cannot be written
    (a full or read-only temporary folder): the matrix then stays in memory, as before parking."""
    try:
        stats.park(name)
    except OSError as exc:
        logger.warning("could not set %s aside on disk (%s); it stays in memory", name, exc)


class _FoldCV:
    """One weight's cross-validation over folds of paired statistics: the folds prepared once,
    scored by the dense refit (:meth:`ridge`) and, for a shortlist, by the pruned refit
    (:meth:`pruned`), which reuses the refit solves of :meth:`ridge`.

    For each held-out fold ``f`` (train: every row but the fold's, ``G = pp``, ``C = pd``;
    held out: ``P = pp_f``, ``Pd = pd_f``), with ``W' = W + D^T`` and
    ``D = (G + lambda I)^{-1} (C - G) W^T``::

        err(W') = err(W) + 2 tr(D^T (P - Pd) W^T) + tr(D^T P D)

    so one Cholesky factorisation of ``G + lambda I`` per fold and damping scores the dense refit
    (no ``dd``: the constant ``tr(W dd W^T)`` is left out as in :func:`refit_error`).
    """

    def __init__(
        self,
        w: Array,
        used: Sequence[PairedStats],
        rows: int | None,
        seed: int,
        held_out: int | None,
        total: PairedStats | None,
        inputs: InputFolds | None = None,
        keep_folds: bool = True,
        offset: int | None = None,
    ) -> None:
        """``used``: with ``inputs`` and not ``keep_folds``, a list that is consumed (emptied), so that
        each fold's statistics go as soon as its preparation has read them (see
        :meth:`InputFolds.prepared`). ``offset``: where ``w`` is stacked in projected statistics
        (:class:`~onnx_sparse.core.hessian.PairedStats`)."""
        self.inputs = inputs
        a = np.asarray(w, dtype=np.float64)
        self.factor = 1.0
        pick = None
        if rows is not None and rows < a.shape[0]:
            pick = np.sort(np.random.default_rng(seed).choice(a.shape[0], size=rows, replace=False))
            self.factor = a.shape[0] / rows
            a = a[pick]
        self.a = a
        at = np.ascontiguousarray(a.T)  # [cols, k]
        every = PairedStats.total(used) if total is None else total

        def pq_at(stats: PairedStats) -> Array:  # pq W^T on the scored rows
            if stats.pqw is None:
                return stats.pq @ at
            if offset is None:
                raise ValueError("projected statistics need the weight's offset")
            return stats.pq_times(np.asarray(w), offset, pick)

        tested: list[PairedStats | None] = list(used) if held_out is None else list(used[: max(1, held_out)])
        self.n_rows = sum(f.n for f in tested if f is not None)
        every_r = pq_at(every)
        # a wide input's totals wait on disk while the damping is chosen (InputFolds.parks):
        # pq once read here, pp once the training Gram matrices are made from it
        park = inputs is not None and inputs.parks
        if park and every.pqw is None:
            _park(every, "pq")
        # the last weight to prepare these folds (and no pruned scores): each fold's statistics go as
        # soon as they are read, its pq (cols^2 float64) before its training Gram matrix is made
        release = inputs is not None and inputs.prepared(keep=keep_folds)
        if release and isinstance(used, list):
            used.clear()

        def prepare(k: int) -> tuple[Array, Array, Array, Array, float, float]:
            held = tested[k]
            assert held is not None
            held_pp = held.pp
            hq = pq_at(held)
            base = float(np.einsum("ij,ij->", -(held_pp @ at) - 2.0 * hq, at))
            if release:
                tested[k] = held = None  # the fold's pq goes here (its pp stays, for the scores)
            g = every.pp - held_pp if inputs is None else inputs.train_gram(k, held_pp)
            r = every_r - hq  # the right-hand side (C - G) W^T
            e = -hq  # (P - Pd) W^T
            # r = 0 (the layer sees the same input in both models, e.g. the first layer): W' = W
            scale = float(np.mean(np.diag(g))) if np.any(r) else 0.0
            return held_pp, g, r, e, base, scale

        # folds are independent: prepared and scored side by side
        self.prepared = blas.parallel_map(prepare, range(len(tested)))
        if park:
            _park(every, "pp")
        # the dense scores need each held-out fold's pp only; the pruned ones (pruned()) the whole fold
        self.tested = tested if keep_folds else None
        self._solves: dict[tuple[int, float], Array | None] = {}

    def _solve(self, k: int, lam: float) -> Array | None:
        """``D`` of fold ``k`` and damping ``lam`` (None: no refit, ``W`` itself); kept for :meth:`pruned`.
        Raises LinAlgError when the factorisation fails."""
        key = (k, lam)
        if key not in self._solves:
            _, g, r, _, _, scale = self.prepared[k]
            if math.isinf(lam) or scale <= 0:
                self._solves[key] = None
            else:
                shared = self.inputs.fold_factors_of(k) if self.inputs is not None else None
                self._solves[key] = _ridge_solve_scored(g, r, lam * scale, shared)
        return self._solves[key]

    def _per_fold(self, fn: Callable[[int, float], float], lams: Sequence[float]) -> list[float]:
        k = len(self.prepared)
        per = blas.parallel_map(lambda task: fn(*task), [(j, lam) for lam in lams for j in range(k)])
        return [sum(per[i * k : (i + 1) * k]) * self.factor / self.n_rows for i in range(len(lams))]

    def ridge(self, lams: Sequence[float]) -> list[float]:
        """Held-out error of the dense refit per damping (``inf`` for a failed factorisation)."""

        def score(k: int, lam: float) -> float:
            held_pp, _, _, e, base, _ = self.prepared[k]
            try:
                d = self._solve(k, lam)
            except np.linalg.LinAlgError:
                return math.inf
            if d is None:
                return base
            return base + 2.0 * float(np.einsum("ij,ij->", d, e)) + float(np.einsum("ij,ij->", held_pp @ d, d))

        return self._per_fold(score, lams)

    def pruned(self, lams: Sequence[float], damp: float, blocksize: int) -> list[float]:
        """Held-out error of the refit pruned by SparseGPT (what is deployed) per damping: the
        same rows and folds as :meth:`ridge`; per fold, SparseGPT's factor of ``G`` (shared with
        the other layers that read the same input) and one column walk over the candidates'
        refits stacked."""
        cols = self.a.shape[1]
        tested = self.tested
        assert tested is not None, "made without its folds (keep_folds=False)"
        kept = self.inputs.fold_factors if self.inputs is not None else None

        def fold_factor(k: int) -> InverseFactor:
            if kept is not None and k in kept and kept[k].damp == damp:
                return kept[k]
            f = inverse_factor(self.prepared[k][1], cols, damp=damp)
            if kept is not None:
                kept[k] = f
            return f

        k_rows = self.a.shape[0]

        def fold(k: int) -> list[float]:
            # the candidates' refits stacked: rows are independent given the factor, so one walk
            refits: list[Array] = []
            ok: list[bool] = []
            for lam in lams:
                try:
                    d = self._solve(k, lam)
                except np.linalg.LinAlgError:
                    ok.append(False)
                    continue
                ok.append(True)
                refits.append(self.a if d is None else self.a + d.T)
            if not refits:
                return [math.inf] * len(lams)
            cand, _ = prune_with_factor(np.concatenate(refits), fold_factor(k), blocksize)
            held = tested[k]
            assert held is not None  # kept whole for these scores (keep_folds)
            errs = iter([refit_error(self.a, cand[i * k_rows : (i + 1) * k_rows], held) for i in range(len(refits))])
            return [next(errs) if good else math.inf for good in ok]

        per = blas.parallel_map(fold, range(len(self.prepared)))
        return [sum(p[i] for p in per) * self.factor / self.n_rows for i in range(len(lams))]


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

    One Cholesky factorisation per fold and damping gives the score (see :class:`_FoldCV`; in
    float32 with one float64 refinement step on wide layers, :func:`_ridge_solve_scored`); no
    SparseGPT run. ``inf`` scores ``W`` itself; ``0`` uses the minimum-norm least squares
    solution. A damping whose factorisation fails scores ``inf``.

    Args:
        w: Dense weight ``[rows, cols]``.
        folds: Per-fold statistics (folds with no rows are ignored; at least 2 needed).
        grid: Relative dampings (``lambda = damp * mean(diag(G))``).
        rows: Score only this many output rows, a seeded uniform subset, scaled by
            ``rows(W) / rows`` (None: all rows, exact).
        seed: Seed of that subset.
        unimodal: Assume the score is unimodal in the damping: start at the finite candidate
            nearest :data:`REFIT_START` and walk towards the better neighbour until neither is
            better (about 3 of 5 candidates factorised instead of all); candidates not visited
            score ``nan``.
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
    return _ridge_scores(_FoldCV(w, used, rows, seed, held_out, total), grid, unimodal)


def _ridge_scores(cv: _FoldCV, grid: Sequence[float], unimodal: bool) -> tuple[float, ...]:
    if not unimodal:
        return tuple(cv.ridge([float(lam) for lam in grid]))
    # Descend from the finite candidate nearest REFIT_START (in order of damping) until neither
    # neighbour is better; candidates not visited score nan. With fewer folds than worker
    # threads, the next candidates of the walk are scored ahead, side by side (the walk, and
    # so the choice, is the same; only idle cores do the extra work). Not on a layer wider than
    # OVERLAP_COLS: each candidate scored at once holds a float32 factorisation (cols^2: 0.27 GB at
    # 8,192 inputs) beside the folds' matrices, so there the walk scores one candidate at a time.
    spare = len(cv.prepared) < blas.workers() and cv.a.shape[1] <= OVERLAP_COLS
    out = [math.nan] * len(grid)
    for i, lam in enumerate(grid):
        if math.isinf(lam):
            out[i] = cv.ridge([math.inf])[0]
    finite = sorted((i for i, lam in enumerate(grid) if not math.isinf(lam)), key=lambda i: grid[i])

    def visit(positions: Sequence[int]) -> None:
        todo = [finite[p] for p in positions if 0 <= p < len(finite) and math.isnan(out[finite[p]])]
        for i, v in zip(todo, cv.ridge([float(grid[i]) for i in todo]), strict=True):
            out[i] = v

    walked = {i for i, lam in enumerate(grid) if math.isinf(lam)}
    if finite:
        pos = _start(grid, finite)
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
    return tuple(v if i in walked else math.nan for i, v in enumerate(out))


def _start(grid: Sequence[float], finite: Sequence[int]) -> int:
    """The position in ``finite`` (indices of ``grid``'s finite candidates, by damping) nearest
    :data:`REFIT_START` in log scale, the smaller damping on a tie; a damping <= 0 counts as the
    farthest below."""

    def distance(p: int) -> tuple[float, int]:
        lam = float(grid[finite[p]])
        return (abs(math.log(lam / REFIT_START)) if lam > 0 else math.inf, p)

    return min(range(len(finite)), key=distance)


def _best(grid: Sequence[float], scores: Sequence[float]) -> int:
    """The smallest score (``nan``: not scored); ties go to the larger damping."""
    return min(range(len(grid)), key=lambda i: (math.inf if math.isnan(scores[i]) else scores[i], -float(grid[i])))


@blas.deterministic
def choose_refit_damp(
    w: Array,
    folds: Sequence[PairedStats],
    grid: Sequence[float] = DEFAULT_REFIT_GRID,
    confirm: int = 0,
    blocksize: int = 128,
    damp: float = 0.01,
    rows: int | None = SELECT_ROWS,
    unimodal: bool = True,
    budget: float | None = SELECT_BUDGET,
    total: PairedStats | None = None,
    seed: int = 0,
    inputs: InputFolds | None = None,
    offset: int | None = None,
) -> RefitCV:
    """Choose the refit ridge damping by K-fold cross-validation.

    Every candidate is scored by the held-out error of the **dense** refit
    (:func:`ridge_cv_scores`: one Cholesky factorisation per fold and candidate, a descent over
    the grid). With ``confirm = k``, the ``k`` candidates with the best dense scores are then
    scored again by the held-out error of the **pruned** refit, what is deployed (the refit
    solves are reused; one SparseGPT factor per fold, a column walk per candidate and fold on
    the same row subset), and that score decides. The candidate with the smallest held-out
    error wins; ties go to the larger damping.

    Folds should split by calibration sample (an image, a sentence), not by row: rows of one
    sample (pixels, tokens) are correlated and would leak between folds. Folds with no rows
    are ignored.

    Args:
        w: Dense weight ``[rows, cols]``.
        folds: One :class:`PairedStats` per fold, at least 2 with rows (or 1 with ``total``).
        grid: Candidate relative dampings (``inf`` = no refit).
        confirm: How many of the best candidates the pruned refit decides between (0: the
            dense score alone; ``len(grid)``: every candidate, no descent).
        blocksize: SparseGPT block size (with ``confirm``).
        damp: SparseGPT relative damping (with ``confirm``).
        rows: Output rows scored (see :func:`ridge_cv_scores`; None: all).
        unimodal: Factorise only the candidates a descent from :data:`REFIT_START` visits
            (see :func:`ridge_cv_scores`; the others score ``nan``).
        budget: Hold out folds in turn only while ``folds x 5 x cols^3 / 6`` multiply-adds stay
            within this (at least one fold; None: every fold).
        total: The statistics of every row, when the caller has them (see :func:`ridge_cv_scores`).
        seed: Seed of the row subset.
        inputs: The folds prepared for every weight that reads the same input (``folds`` and
            ``total`` are then its ``used`` and ``every``): their Gram matrices and
            factorisations are made once (:class:`InputFolds`).
        offset: Where ``w`` is stacked in projected statistics (``PairedStats(project=...)``;
            they cannot score the pruned refit: ``confirm`` must be 0).

    Returns:
        The chosen damping with every candidate's scores.
    """
    used = [f for f in folds if f.n > 0]
    _check_folds(used, total)
    if not grid:
        raise ValueError("the damping grid is empty")
    if confirm < 0:
        raise ValueError(f"confirm must be non-negative, got {confirm}")
    held = None if budget is None else held_out_folds(np.shape(w)[1], len(used), budget)
    n_folds = len(used)
    cv: _FoldCV | None = None
    try:
        # with inputs, the folds' own statistics may go once every weight is prepared (_FoldCV
        # consumes used), and a wide input's totals wait on disk meanwhile (InputFolds.parks)
        cv = _FoldCV(
            w, used, rows, seed, held, total, inputs, keep_folds=bool(confirm) or inputs is None, offset=offset
        )
        del used
        scores = _ridge_scores(cv, grid, unimodal and confirm < len(grid))
        best = _best(grid, scores)
        pruned = [math.nan] * len(grid)
        if confirm:
            ranked = sorted(
                (i for i in range(len(grid)) if not math.isnan(scores[i])), key=lambda i: (scores[i], -grid[i])
            )
            short = ranked[:confirm]
            for i, v in zip(short, cv.pruned([float(grid[i]) for i in short], damp, blocksize), strict=True):
                pruned[i] = v
            best = _best(grid, pruned)
    finally:
        cv = None  # the folds' matrices and factorisations go before the parked totals come back
        if inputs is not None:
            inputs.every.unpark()  # the same bits
    logger.debug(
        "refit damping by %d-fold CV: %s, pruned %s -> %g",
        n_folds, dict(zip(grid, scores, strict=True)), dict(zip(grid, pruned, strict=True)), grid[best],
    )  # fmt: skip
    return RefitCV(
        damp=float(grid[best]),
        grid=tuple(float(g) for g in grid),
        scores=tuple(scores),
        pruned_scores=tuple(pruned),
    )


@blas.deterministic
def asymmetric_cv_2_4(
    w: Array,
    folds: Sequence[PairedStats] = (),
    grid: Sequence[float] = DEFAULT_REFIT_GRID,
    confirm: int = 0,
    blocksize: int = 128,
    damp: float = 0.01,
    rest: PairedStats | None = None,
    inputs: InputFolds | None = None,
    int8: bool = False,
    col_scale: Array | None = None,
    offset: int | None = None,
) -> tuple[Array, SparseGPTStats, RefitCV]:
    """Asymmetric SparseGPT with the refit damping chosen by :func:`choose_refit_damp`.

    After the choice, the final weights are fit on all folds together.

    Args:
        confirm: See :func:`choose_refit_damp`.
        rest: The rows of folds that are never held out, in one sum (``folds`` are then the
            ones held out in turn, e.g. :func:`held_out_folds` of them): four matrices
            instead of two per fold. It is **consumed**: the total is added into it in place.
        inputs: ``folds`` and ``rest`` prepared once for every weight that reads the same
            input (:class:`InputFolds`, made with the same ``damp``); ``folds`` and ``rest``
            are then not given.
        int8: SparseGPT's joint INT8 walk, ``col_scale`` its per-column grids
            (:func:`~onnx_sparse.prune.sparsegpt.prune_with_factor`).
        offset: Where ``w`` is stacked in the inputs' projected statistics (``PairedStats(project=...)``,
            which hold ``pq W^T`` instead of ``pq``); needed with them.

    Returns:
        ``(new weight in w's dtype, SparseGPT stats, cross-validation outcome)``.
    """
    _check_weight(w)
    if inputs is None:
        inputs = InputFolds(folds, rest, damp)
    elif folds or rest is not None:
        raise ValueError("pass either inputs or folds and rest, not both")
    if inputs.damp != damp:
        raise ValueError(f"the inputs' SparseGPT factor is for damping {inputs.damp}, not {damp}")
    every = inputs.every
    # SparseGPT's factor (a copy of H) is made while the damping is chosen, except on a layer so wide
    # that it would be held together with the cross-validation's matrices: then after the choice
    overlap = every.cols <= OVERLAP_COLS
    if overlap:
        inputs.start()
    try:
        cv = choose_refit_damp(
            w, inputs.used, grid, confirm=confirm, blocksize=blocksize, damp=damp, total=every,
            budget=SELECT_BUDGET if inputs.budgeted else None, inputs=inputs, offset=offset,
        )  # fmt: skip
    finally:
        inputs.chose()
    if not overlap:
        inputs.start()
    # the only weight that reads a wide input: its pq (cols^2 float64) goes once the refit's right-hand
    # sides are made, before the ridge factorisation takes its copy of pp
    release = every.release_pq if not overlap and inputs.users == 1 else None
    try:
        projected = every.pqw is not None
        if projected and offset is None:
            raise ValueError("projected statistics need the weight's offset")
        refit = _refit(
            w.astype(np.float64), every.pp, None if projected else every.pq, cv.damp, inputs.refit_factors, release,
            rhs_of=(lambda: every.pq_times(w, offset or 0)) if projected else None,
        )  # fmt: skip
    finally:
        inputs.done()
    out, stats = prune_with_factor(refit, inputs.factor(), blocksize, int8=int8, col_scale=col_scale)
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
