"""Tests for onnx_sparse.prune.select (the dampings chosen by cross-validation)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from _problems import correlated, cv_folds, cv_problem, hessian_of, paired, perturbed_pairs
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_sparse.core import nm
from onnx_sparse.core.hessian import PairedStats
from onnx_sparse.prune.select import (
    DEFAULT_REFIT_GRID,
    asymmetric_cv_2_4,
    choose_damp,
    choose_refit_damp,
    ridge_cv_scores,
)
from onnx_sparse.prune.sparsegpt import asymmetric_refit, asymmetric_sparsegpt_2_4, refit_error, sparsegpt_2_4

LOGGER = "onnx_sparse.prune.select"


@pytest.mark.parametrize("confirm", [0, 2, len(DEFAULT_REFIT_GRID)])
def test_cv_damps_more_when_data_is_scarce(confirm):
    rng = np.random.default_rng(14)
    cols, mix, distort, w = cv_problem(rng)
    scarce = choose_refit_damp(w, cv_folds(rng, 4, 5, cols, mix, distort), confirm=confirm)
    plenty = choose_refit_damp(w, cv_folds(rng, 400, 5, cols, mix, distort), confirm=confirm)
    # The dense refit overfits 16 training rows of 32 columns (strict on 20 of 20 seeds tried);
    # scoring the pruned weights blurs the effect (SparseGPT's own damping), hence >= there.
    if confirm:
        assert scarce.damp >= plenty.damp
    else:
        assert scarce.damp > plenty.damp
    assert scarce.grid == DEFAULT_REFIT_GRID and len(scarce.scores) == len(DEFAULT_REFIT_GRID)
    assert plenty.damp < math.inf  # the refit pays off when data is plentiful


def test_cv_choice_generalises_better_than_the_weakest_damping():
    rng = np.random.default_rng(15)
    cols, mix, distort, w = cv_problem(rng)
    folds = cv_folds(rng, 5, 5, cols, mix, distort)
    out, stats, cv = asymmetric_cv_2_4(w, folds)
    test = paired(*perturbed_pairs(rng, 5000, cols, mix, distort))
    total = PairedStats.total(folds)
    test_err = {
        lam: refit_error(w, asymmetric_sparsegpt_2_4(w, total.pp, total.pd, refit_damp=lam)[0], test)
        for lam in DEFAULT_REFIT_GRID
    }
    chosen = refit_error(w, out, test)
    assert chosen == pytest.approx(test_err[cv.damp])
    assert cv.damp > min(DEFAULT_REFIT_GRID)
    assert chosen < test_err[min(DEFAULT_REFIT_GRID)]  # less overfitting
    assert chosen < test_err[math.inf]  # the refit still helps
    assert chosen <= 1.25 * min(test_err.values())  # close to the best in hindsight
    assert nm.is_2_4(out, 1) and not stats.fallback


def _direct_cv(w, folds, grid):
    """Held-out refit error per damping, by explicit ridge solves (the definition)."""
    used = [f for f in folds if f.n > 0]
    out = []
    for lam in grid:
        total = 0.0
        for i, held in enumerate(used):
            train = PairedStats.total([g for j, g in enumerate(used) if j != i])
            total += refit_error(w, asymmetric_refit(w, train.pp, train.pd, lam), held)
        out.append(total / sum(f.n for f in used))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 40), k=st.integers(2, 4))
def test_ridge_cv_scores_equal_direct_ridge_solves(seed, n, k):
    rng = np.random.default_rng(seed)
    cols, rows = 16, 6
    mix = rng.standard_normal((cols, cols)) * 0.5 + np.eye(cols)
    distort = np.eye(cols) + 0.3 * rng.standard_normal((cols, cols))
    w = rng.standard_normal((rows, cols))
    folds = cv_folds(rng, n, k, cols, mix, distort)
    grid = (0.0, *DEFAULT_REFIT_GRID)
    got = ridge_cv_scores(w, folds, grid, rows=None)
    np.testing.assert_allclose(got, _direct_cv(w, folds, grid), rtol=1e-7, atol=1e-7 * abs(got[-1]))


def test_ridge_cv_scores_on_a_row_subset_are_the_scaled_scores_of_those_rows():
    rng = np.random.default_rng(3)
    cols = 16
    mix = rng.standard_normal((cols, cols)) * 0.5 + np.eye(cols)
    w = rng.standard_normal((12, cols))
    folds = cv_folds(rng, 10, 3, cols, mix, np.eye(cols) + 0.2 * rng.standard_normal((cols, cols)))
    got = ridge_cv_scores(w, folds, DEFAULT_REFIT_GRID, rows=4, seed=7)
    pick = np.sort(np.random.default_rng(7).choice(12, size=4, replace=False))
    np.testing.assert_allclose(got, np.array(_direct_cv(w[pick], folds, DEFAULT_REFIT_GRID)) * 3.0, rtol=1e-7)
    # more rows than the weight has: exact
    np.testing.assert_allclose(ridge_cv_scores(w, folds, rows=100), ridge_cv_scores(w, folds, rows=None))


def test_ridge_cv_scores_held_out_folds_limit_which_folds_are_scored():
    rng = np.random.default_rng(4)
    cols = 16
    mix = rng.standard_normal((cols, cols)) * 0.5 + np.eye(cols)
    w = rng.standard_normal((6, cols))
    folds = cv_folds(rng, 10, 4, cols, mix, np.eye(cols) + 0.2 * rng.standard_normal((cols, cols)))
    got = ridge_cv_scores(w, folds, DEFAULT_REFIT_GRID, rows=None, held_out=1)
    train = PairedStats.total(folds[1:])
    want = [
        refit_error(w, asymmetric_refit(w, train.pp, train.pd, lam), folds[0]) / folds[0].n
        for lam in DEFAULT_REFIT_GRID
    ]
    np.testing.assert_allclose(got, want, rtol=1e-7)
    # the budget decides how many folds are held out: a tiny one still holds out one
    tiny = choose_refit_damp(w, folds, rows=None, unimodal=False, budget=1.0)
    np.testing.assert_allclose(tiny.scores, want, rtol=1e-7)


@pytest.mark.parametrize("seed", range(12))
def test_unimodal_search_finds_the_exhaustive_choice(seed):
    rng = np.random.default_rng(100 + seed)
    cols = 24
    mix = rng.standard_normal((cols, cols)) * 0.5 + np.eye(cols)
    distort = np.eye(cols) + rng.uniform(0.05, 0.5) * rng.standard_normal((cols, cols))
    w = rng.standard_normal((10, cols))
    folds = cv_folds(rng, int(rng.integers(4, 60)), 4, cols, mix, distort)
    full = choose_refit_damp(w, folds, rows=None, unimodal=False)
    fast = choose_refit_damp(w, folds, rows=None, unimodal=True)
    assert fast.damp == full.damp
    visited = [i for i, v in enumerate(fast.scores) if not math.isnan(v)]
    assert len(visited) < len(full.scores)
    for i in visited:
        assert fast.scores[i] == pytest.approx(full.scores[i])


def test_cv_needs_two_folds_with_rows():
    w = np.ones((2, 4))
    one = paired(np.ones((3, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="at least 2 folds"):
        choose_refit_damp(w, [one, PairedStats(4)])
    with pytest.raises(ValueError, match="grid"):
        choose_refit_damp(w, [one, one], grid=())


def test_folds_never_held_out_can_live_in_one_sum(monkeypatch) -> None:
    # A wide layer holds out fewer folds than it has (held_out_folds): the others need no
    # statistics of their own. One sum for them ("rest") gives the same choice and weights.
    from onnx_sparse.prune import select as sg

    rng = np.random.default_rng(11)
    cols, rows = 32, 24
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    distort = np.eye(cols) + 0.2 * rng.standard_normal((cols, cols))
    folds = [paired(*perturbed_pairs(rng, 60, cols, mix, distort), track_dense=False) for _ in range(4)]
    w = rng.standard_normal((rows, cols))
    monkeypatch.setattr(sg, "SELECT_BUDGET", 5 * cols**3 / 6)  # room for exactly one held-out fold
    assert sg.held_out_folds(cols, 4, sg.SELECT_BUDGET) == 1
    apart = sg.asymmetric_cv_2_4(w, folds)
    rest = PairedStats.total(folds[1:])
    one_sum = sg.asymmetric_cv_2_4(w, folds[:1], rest=rest)
    assert one_sum[2].damp == apart[2].damp
    np.testing.assert_allclose(one_sum[2].scores, apart[2].scores, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(one_sum[0], apart[0], rtol=1e-9, atol=1e-12)
    assert rest.n == sum(f.n for f in folds)  # consumed: the total was added into it
    with pytest.raises(ValueError, match="rows outside"):
        sg.ridge_cv_scores(w, folds[:1], total=folds[0])


@pytest.mark.parametrize("rest", [False, True])
@pytest.mark.parametrize("confirm", [0, 2])
def test_weights_that_read_one_input_share_its_folds_to_the_bit(monkeypatch, rest: bool, confirm: int) -> None:
    """Q, K and V read one input: their folds, training Gram matrices, factorisations and
    SparseGPT factor are made once (InputFolds) and each weight gets exactly what its own solve
    gives; each factorisation is made once instead of once per weight."""
    from onnx_sparse.prune import select as sg

    rng = np.random.default_rng(5)
    cols, mix, distort, _ = cv_problem(rng)
    folds = cv_folds(rng, 40, 4, cols, mix, distort)
    ws = [rng.standard_normal((24, cols)) * s for s in (1.0, 0.3, 3.0)]
    monkeypatch.setattr(sg, "_FLOAT32_FROM", 16)  # the float32 path with its refinement, on a small layer
    made: list[tuple[int, float]] = []
    real = sg._float32_factor

    def counting(g, ridge):
        made.append((g.shape[0], ridge))
        return real(g, ridge)

    monkeypatch.setattr(sg, "_float32_factor", counting)

    def stats() -> tuple[list[PairedStats], PairedStats | None]:
        copies = [f.copy() for f in folds]
        return (copies[:1], PairedStats.total(copies[1:])) if rest else (copies, None)

    if rest:
        monkeypatch.setattr(sg, "SELECT_BUDGET", 5 * cols**3 / 6)  # one held-out fold, as a wide layer
    alone = []
    for w in ws:
        f, r = stats()
        alone.append(sg.asymmetric_cv_2_4(w, f, confirm=confirm, rest=r))
    separate = len(made)
    made.clear()
    f, r = stats()
    shared = sg.InputFolds(f, r, 0.01, users=len(ws))
    together = [sg.asymmetric_cv_2_4(w, confirm=confirm, inputs=shared) for w in ws]
    for (w1, s1, cv1), (w2, s2, cv2) in zip(alone, together, strict=True):
        assert np.array_equal(w1, w2) and s1 == s2
        assert cv1.damp == cv2.damp
        assert np.array_equal(cv1.scores, cv2.scores, equal_nan=True)
        assert np.array_equal(cv1.pruned_scores, cv2.pruned_scores, equal_nan=True)
    assert len(made) == len(set(made)) < separate  # each factorisation once
    assert shared.factors is None and shared.refit_factors is None  # dropped after the last weight
    with pytest.raises(ValueError, match="not both"):
        sg.asymmetric_cv_2_4(ws[0], folds, inputs=shared)


@pytest.mark.parametrize("confirm", [0, 2])
def test_a_wide_input_gives_the_same_bits_while_it_frees_as_it_goes(monkeypatch, confirm: int) -> None:
    """Issue 20: on an input wider than OVERLAP_COLS the walk scores one candidate at a time (each
    holds a float32 factorisation), each fold's pq goes once it is read and the total's pq once the
    refit's right-hand sides are made. None of that may change a bit of the result."""
    from onnx_sparse.prune import select as sg

    rng = np.random.default_rng(7)
    cols, mix, distort, _ = cv_problem(rng)
    folds = cv_folds(rng, 40, 4, cols, mix, distort)
    w = rng.standard_normal((24, cols))
    monkeypatch.setattr(sg, "_FLOAT32_FROM", 16)
    monkeypatch.setattr(sg, "SELECT_BUDGET", 5 * cols**3 / 6)  # one held-out fold, as a wide layer

    def run() -> tuple[tuple[np.ndarray, object, sg.RefitCV], sg.InputFolds]:
        copies = [f.copy() for f in folds]
        inputs = sg.InputFolds(copies[:1], PairedStats.total(copies[1:]), 0.01)
        del copies
        return sg.asymmetric_cv_2_4(w, confirm=confirm, inputs=inputs), inputs

    (w1, s1, cv1), narrow = run()
    assert narrow.every.pq.shape == (cols, cols)  # kept: the input is not wide
    monkeypatch.setattr(sg, "OVERLAP_COLS", cols - 4)
    (w2, s2, cv2), wide = run()
    assert np.array_equal(w1, w2) and s1 == s2
    assert cv1.damp == cv2.damp and math.isfinite(cv1.damp)  # a refit was made, so pq was read
    assert np.array_equal(cv1.scores, cv2.scores, equal_nan=True)
    assert np.array_equal(cv1.pruned_scores, cv2.pruned_scores, equal_nan=True)
    assert wide.every.pq.size == 0  # let go
    assert (wide.used == []) == (confirm == 0)  # the pruned scores (confirm) read the whole folds


@pytest.mark.parametrize("confirm", [0, 2])
def test_a_wide_input_parks_its_totals_while_the_damping_is_chosen(monkeypatch, confirm: int) -> None:
    """Issue 20: while the damping of the only weight that reads a wide input is chosen, the total's
    pp and pq (2 x cols^2 float64, unused then) wait on disk: the arrays themselves are gone from
    memory during every scored solve, and they come back with the same bits for the refit."""
    import weakref

    from onnx_sparse.prune import select as sg

    rng = np.random.default_rng(7)
    cols, mix, distort, _ = cv_problem(rng)
    folds = cv_folds(rng, 40, 4, cols, mix, distort)
    w = rng.standard_normal((24, cols))
    monkeypatch.setattr(sg, "_FLOAT32_FROM", 16)
    monkeypatch.setattr(sg, "SELECT_BUDGET", 5 * cols**3 / 6)
    seen: list[tuple[bool, bool, tuple[str, ...]]] = []
    solve = sg._ridge_solve_scored

    def run(wide: bool) -> tuple[np.ndarray, object, sg.RefitCV]:
        monkeypatch.setattr(sg, "OVERLAP_COLS", cols - 4 if wide else cols)
        copies = [f.copy() for f in folds]
        inputs = sg.InputFolds(copies[:1], PairedStats.total(copies[1:]), 0.01)
        del copies
        every = inputs.every
        pp, pq = weakref.ref(every.pp), weakref.ref(every.pq)

        def watched(*args, **kwargs):
            seen.append((pp() is None, pq() is None, every.parked))
            return solve(*args, **kwargs)

        monkeypatch.setattr(sg, "_ridge_solve_scored", watched)
        seen.clear()
        out = sg.asymmetric_cv_2_4(w, confirm=confirm, inputs=inputs)
        assert seen and every.parked == ()
        return out

    w1, s1, cv1 = run(wide=False)
    assert set(seen) == {(False, False, ())}  # a narrow input's totals stay (SparseGPT's factor reads pp)
    w2, s2, cv2 = run(wide=True)
    assert set(seen) == {(True, True, ("pp", "pq"))}  # not in memory during any scored solve
    assert math.isfinite(cv1.damp)  # a refit was made from the totals read back
    assert np.array_equal(w1, w2) and s1 == s2
    assert cv1.damp == cv2.damp
    assert np.array_equal(cv1.scores, cv2.scores, equal_nan=True)
    assert np.array_equal(cv1.pruned_scores, cv2.pruned_scores, equal_nan=True)


def test_a_wide_input_whose_totals_cannot_be_parked_keeps_them(monkeypatch, tmp_path, caplog) -> None:
    """Issue 20: a temporary folder that cannot be written costs memory, not the prune."""
    from onnx_sparse.prune import select as sg

    rng = np.random.default_rng(7)
    cols, mix, distort, _ = cv_problem(rng)
    folds = cv_folds(rng, 40, 4, cols, mix, distort)
    w = rng.standard_normal((24, cols))
    monkeypatch.setattr(sg, "SELECT_BUDGET", 5 * cols**3 / 6)
    monkeypatch.setattr(sg, "OVERLAP_COLS", cols - 4)

    def run() -> tuple[np.ndarray, object, sg.RefitCV]:
        copies = [f.copy() for f in folds]
        return sg.asymmetric_cv_2_4(w, copies[:1], rest=PairedStats.total(copies[1:]))

    w1, s1, cv1 = run()
    monkeypatch.setenv("ONNX_SPARSE_SPILL_DIR", str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        w2, s2, cv2 = run()
    assert "stays in memory" in caplog.text
    assert np.array_equal(w1, w2) and s1 == s2 and cv1 == cv2


STARVED_GRID = (0.01, 0.1, 1.0)


def starved_folds(rng: np.random.Generator, per_fold: int, k: int, cols: int) -> list[np.ndarray]:
    mix = np.random.default_rng(3).standard_normal((cols, cols)) * 0.5 + np.eye(cols)
    return [rng.standard_normal((per_fold, cols)) @ mix for _ in range(k)]


def naive_damp_scores(w: np.ndarray, folds: list[np.ndarray], grid) -> list[float]:
    """The definition, written out: SparseGPT on the other folds' rows, error on the held-out one."""
    scores = [0.0] * len(grid)
    for i, xf in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != i])
        h, stats = hessian_of(train)
        for k, d in enumerate(grid):
            new, _ = sparsegpt_2_4(w, h, damp=d, dead=stats.dead)
            scores[k] += float(np.sum((xf @ (w - new).T) ** 2))
    held = sum(len(f) for f in folds)
    return [v / held for v in scores]


def test_choose_damp_matches_the_definition_when_nothing_is_left_out():
    rng = np.random.default_rng(21)
    cols = 32
    folds = starved_folds(rng, 6, 3, cols)
    folds[0][:, 5] = 0.0  # a column alive only in the other folds
    folds[1][:, 7] = folds[2][:, 7] = 0.0  # a column dead when fold 0 is held out
    w = rng.standard_normal((12, cols))
    xtx = sum(f.T @ f for f in folds)
    damp, scores = choose_damp(w, xtx, folds, STARVED_GRID, budget=None)
    want = naive_damp_scores(w, folds, STARVED_GRID)
    np.testing.assert_allclose(scores, want, rtol=1e-7)
    assert damp == STARVED_GRID[int(np.argmin(want))]


def test_choose_damp_damps_more_when_rows_are_scarce():
    rng = np.random.default_rng(22)
    cols = 64
    w = rng.standard_normal((16, cols))
    scarce = starved_folds(rng, 8, 3, cols)  # 16 training rows for 64 inputs
    plenty = starved_folds(rng, 400, 3, cols)
    d_scarce, _ = choose_damp(w, sum(f.T @ f for f in scarce), scarce, STARVED_GRID)
    d_plenty, _ = choose_damp(w, sum(f.T @ f for f in plenty), plenty, STARVED_GRID)
    assert d_scarce > d_plenty


def test_choose_damp_on_a_budget_walks_a_subset_of_rows_and_one_fold(caplog):
    rng = np.random.default_rng(23)
    cols = 64
    folds = starved_folds(rng, 10, 3, cols)
    w = rng.standard_normal((300, cols))
    xtx = sum(f.T @ f for f in folds)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        first = choose_damp(w, xtx, folds, STARVED_GRID, rows=40, budget=1.0)
    assert "1 of 3 folds held out, 40 of 300 rows walked" in caplog.text
    assert first == choose_damp(w, xtx, folds, STARVED_GRID, rows=40, budget=1.0)  # seeded: the same subset
    assert first[0] in STARVED_GRID and all(np.isfinite(first[1]))
    # the subset's scores estimate the full ones (same fold, scaled to every row)
    full = choose_damp(w, xtx, folds, STARVED_GRID, rows=300, budget=1.0)[1]
    np.testing.assert_allclose(first[1], full, rtol=0.5)


def test_choose_damp_rejects_bad_input():
    w = np.ones((4, 8))
    x = np.ones((3, 8))
    with pytest.raises(ValueError, match="at least 2 folds"):
        choose_damp(w, x.T @ x, [x, np.zeros((0, 8))], STARVED_GRID)
    with pytest.raises(ValueError, match="grid is empty"):
        choose_damp(w, 2 * x.T @ x, [x, x], ())


@pytest.mark.parametrize("ridge", [1e-6, 1e-3, 1.0])
def test_scored_ridge_solve_matches_float64(ridge, monkeypatch):
    from onnx_sparse.prune import select as sg

    monkeypatch.setattr(sg, "_FLOAT32_FROM", 1)
    rng = np.random.default_rng(31)
    x = correlated(rng, 300, 64)
    g = x.T @ x
    rhs = rng.standard_normal((64, 16))
    want = sg._ridge_solve(g, rhs, ridge * float(np.mean(np.diag(g))))
    got = sg._ridge_solve_scored(g, rhs, ridge * float(np.mean(np.diag(g))))
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12 * np.abs(want).max())


def test_scored_ridge_solve_falls_back_to_float64_when_ill_conditioned(monkeypatch):
    from onnx_sparse.prune import select as sg

    monkeypatch.setattr(sg, "_FLOAT32_FROM", 1)
    rng = np.random.default_rng(32)
    q, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    g = (q * np.logspace(0, 12, 48)) @ q.T  # condition 1e12: float32 alone is useless here
    g = (g + g.T) / 2
    rhs = rng.standard_normal((48, 4))
    calls = []
    real = sg._ridge_solve
    monkeypatch.setattr(sg, "_ridge_solve", lambda *a: calls.append(1) or real(*a))
    got = sg._ridge_solve_scored(g, rhs, 1e-2)
    assert calls  # fell back
    np.testing.assert_allclose(got, real(g, rhs, 1e-2), rtol=1e-9)


def test_cv_scores_do_not_depend_on_the_float32_solve(monkeypatch):
    from onnx_sparse.prune import select as sg

    rng = np.random.default_rng(33)
    cols, mix, distort, w = cv_problem(rng)
    folds = cv_folds(rng, 40, 4, cols, mix, distort)
    plain = ridge_cv_scores(w, folds)
    monkeypatch.setattr(sg, "_FLOAT32_FROM", 1)
    mixed = ridge_cv_scores(w, folds)
    np.testing.assert_allclose(mixed, plain, rtol=1e-9)


def test_confirm_scores_the_pruned_refit_as_its_definition():
    # confirm = the whole grid: every candidate scored by the held-out error of the refit that
    # SparseGPT pruned on the other folds, written out here with the public functions
    rng = np.random.default_rng(21)
    cols, mix, distort, w = cv_problem(rng, cols=16)
    folds = cv_folds(rng, 30, 3, cols, mix, distort)
    grid = (1e-2, 1.0, math.inf)
    cv = choose_refit_damp(w, folds, grid, confirm=len(grid), rows=None, budget=None, blocksize=8, damp=0.02)
    rows = sum(f.n for f in folds)
    want = []
    for lam in grid:
        err = 0.0
        for i, held in enumerate(folds):
            train = PairedStats.total([f for j, f in enumerate(folds) if j != i])
            cand, _ = asymmetric_sparsegpt_2_4(w, train.pp, train.pd, lam, blocksize=8, damp=0.02)
            err += refit_error(w, cand, held)
        want.append(err / rows)
    np.testing.assert_allclose(cv.pruned_scores, want, rtol=1e-9)
    assert cv.damp == grid[int(np.argmin(want))]
    # a shortlist of 2: the dense scores' two best are re-scored, the third is not
    short = choose_refit_damp(w, folds, grid, confirm=2, rows=None, budget=None, blocksize=8, damp=0.02, unimodal=False)
    scored = [i for i, v in enumerate(short.pruned_scores) if not math.isnan(v)]
    assert scored == sorted(np.argsort(short.scores, kind="stable")[:2].tolist())
    np.testing.assert_allclose([short.pruned_scores[i] for i in scored], [want[i] for i in scored], rtol=1e-9)
    with pytest.raises(ValueError, match="confirm"):
        choose_refit_damp(w, folds, grid, confirm=-1)


class _TableCV:
    """A stand-in for the folds' cross-validation: scores from a table, each damping asked for recorded."""

    def __init__(self, table: dict[float, float]) -> None:
        self.table = table
        self.asked: list[float] = []
        self.prepared = [None] * 4  # as many folds as there are workers or more: no scoring ahead
        self.a = np.zeros((1, 8))

    def ridge(self, lams):
        self.asked.extend(lams)
        return [self.table[lam] for lam in lams]


@pytest.mark.parametrize("best", [1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf])
def test_unimodal_walk_starts_at_refit_start_and_ends_at_the_minimum(best):
    from onnx_sparse.prune.select import REFIT_START, _ridge_scores

    grid = DEFAULT_REFIT_GRID
    # unimodal in log damping, its minimum at ``best``
    where = {lam: (math.log10(lam) if math.isfinite(lam) else 2.0) for lam in grid}
    table = {lam: (where[lam] - where[best]) ** 2 for lam in grid}
    cv = _TableCV(table)
    scores = _ridge_scores(cv, grid, unimodal=True)  # type: ignore[arg-type]
    finite = [lam for lam in cv.asked if math.isfinite(lam)]
    assert finite[0] == REFIT_START
    assert len(finite) == len(set(finite))  # each candidate factorised once
    assert grid[min(range(len(grid)), key=lambda i: math.inf if math.isnan(scores[i]) else scores[i])] == best
    # from 1.0 a minimum at 0.1, 1 or 10 (or no refit) costs 3 factorisations, one at 1e-2 or 1e-3 four
    assert len(finite) == (4 if best < 0.1 else 3)
