"""Tests for onnx_sparse.prune.sparsegpt (SparseGPT 2:4 and asymmetric reconstruction).

Run as a script for a timing benchmark: ``python tests/test_sparsegpt.py``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnx_sparse.core import nm
from onnx_sparse.core.hessian import PairedStats, RunningStats
from onnx_sparse.prune.sparsegpt import (
    DEFAULT_REFIT_GRID,
    asymmetric_cv_2_4,
    asymmetric_refit,
    asymmetric_sparsegpt_2_4,
    choose_damp,
    choose_refit_damp,
    refit_error,
    ridge_cv_scores,
    sparsegpt_2_4,
    upper_cholesky_inverse,
)
from onnx_sparse.prune.wanda import wanda_2_4

LOGGER = "onnx_sparse.prune.sparsegpt"


def correlated(rng: np.random.Generator, n: int, cols: int) -> np.ndarray:
    """Rows with strongly correlated, unevenly scaled columns."""
    mix = rng.standard_normal((cols, cols)) * 0.5 + np.eye(cols)
    return (rng.standard_normal((n, cols)) @ mix) * rng.uniform(0.2, 3.0, cols)


def hessian_of(x: np.ndarray) -> tuple[np.ndarray, RunningStats]:
    s = RunningStats(x.shape[1], track_xtx=True)
    s.update(x)
    return s.hessian(damp=0.0), s


def out_err(x: np.ndarray, w: np.ndarray, w2: np.ndarray) -> float:
    return float(np.linalg.norm(x @ w.T - x @ w2.astype(np.float64).T))


weights = st.tuples(st.integers(1, 6), st.integers(1, 6)).flatmap(
    lambda rc: arrays(
        np.float32,
        (rc[0], 4 * rc[1]),
        elements=st.floats(-10, 10, width=32, allow_nan=False, allow_subnormal=False),
    )
)


# --------------------------------------------------------------------------------------
# SparseGPT
# --------------------------------------------------------------------------------------


def test_upper_cholesky_inverse():
    x = correlated(np.random.default_rng(0), 100, 12)
    h = x.T @ x + np.eye(12)
    u = upper_cholesky_inverse(h)
    np.testing.assert_array_equal(u, np.triu(u))
    assert np.all(np.diag(u) > 0)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=1e-9, atol=1e-12)
    with pytest.raises(np.linalg.LinAlgError):
        upper_cholesky_inverse(-np.eye(3))


@settings(max_examples=60, deadline=None)
@given(w=weights, blocksize=st.sampled_from([4, 8, 128]), scale=st.floats(0.1, 10))
def test_identity_hessian_equals_magnitude(w, blocksize, scale):
    out, stats = sparsegpt_2_4(w, scale * np.eye(w.shape[1]), blocksize=blocksize)
    np.testing.assert_array_equal(out, nm.prune_2_4(w, 1))
    assert not stats.fallback and stats.retries == 0


@settings(max_examples=60, deadline=None)
@given(
    w=weights,
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    blocksize=st.sampled_from([4, 8, 12, 128]),
)
def test_result_is_exactly_2_4_with_input_dtype(w, seed, dtype, blocksize):
    w = w.astype(dtype)
    before = w.copy()
    x = correlated(np.random.default_rng(seed), 3 * w.shape[1], w.shape[1])
    out, stats = sparsegpt_2_4(w, hessian_of(x)[0], blocksize=blocksize)
    np.testing.assert_array_equal(w, before)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert nm.is_2_4(out, 1)
    assert np.all(nm.nonzero_per_group(out, 1) <= 2)
    assert stats.loss >= 0 and not stats.fallback


def test_pruned_positions_are_exact_zeros_and_half_the_weights_go():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    out, _ = sparsegpt_2_4(w, hessian_of(correlated(rng, 200, 32))[0])
    assert np.count_nonzero(out) == w.size // 2
    assert not np.any(np.signbit(out[out == 0]))  # +0.0, not crumbs or -0.0


def test_beats_magnitude_and_wanda_on_correlated_inputs():
    rng = np.random.default_rng(2)
    rows, cols = 48, 64
    w = rng.standard_normal((rows, cols))
    x = correlated(rng, 1000, cols)
    h, stats = hessian_of(x)
    sgpt, _ = sparsegpt_2_4(w, h)
    mag = nm.prune_2_4(w, 1)
    wanda = wanda_2_4(w, stats.col_norm)
    e_sgpt, e_mag, e_wanda = out_err(x, w, sgpt), out_err(x, w, mag), out_err(x, w, wanda)
    assert e_sgpt < e_wanda < e_mag
    assert e_sgpt < 0.9 * e_wanda


def test_loss_is_the_obs_estimate_of_the_output_error():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((20, 32))
    x = correlated(rng, 300, 32)
    h, _ = hessian_of(x)
    for damp in (0.01, 1e-10):
        out, stats = sparsegpt_2_4(w, h, damp=damp)
        dw = w - out
        hd = h + damp * np.mean(np.diag(h)) * np.eye(32)
        np.testing.assert_allclose(stats.loss, 0.5 * np.einsum("ij,ij->", dw @ hd, dw), rtol=1e-9)
    # Undamped, it is the mean squared output error per row.
    np.testing.assert_allclose(stats.loss, np.sum((x @ dw.T) ** 2) / 300, rtol=1e-6)


def _column_walk(w, h, damp=0.01):
    """SparseGPT's walk one column at a time with eager updates (the textbook form)."""
    u = upper_cholesky_inverse(h + damp * np.mean(np.diag(h)) * np.eye(h.shape[0]))
    w = w.astype(np.float64).copy()
    prune = None
    for j in range(w.shape[1]):
        if j % 4 == 0:
            prune = ~nm.keep_top2((w[:, j : j + 4] / np.diag(u)[j : j + 4]) ** 2, 1)
        q = np.where(prune[:, j % 4], 0.0, w[:, j])
        e = (w[:, j] - q) / u[j, j]
        w[:, j] = q
        w[:, j + 1 :] -= np.outer(e, u[j, j + 1 :])
    return w


@pytest.mark.parametrize("blocksize", [4, 12, 128])
def test_grouped_walk_equals_the_column_by_column_walk(blocksize):
    rng = np.random.default_rng(21)
    x = correlated(rng, 300, 40)
    h = x.T @ x
    w = rng.standard_normal((7, 40))
    got, _ = sparsegpt_2_4(w, h, blocksize=blocksize)
    np.testing.assert_allclose(got, _column_walk(w, h), rtol=1e-9, atol=1e-9)


def test_blocksize_does_not_change_the_result():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((10, 40))
    h, _ = hessian_of(correlated(rng, 200, 40))
    ref, _ = sparsegpt_2_4(w, h, blocksize=128)
    for bs in (4, 8, 12, 36):
        np.testing.assert_allclose(sparsegpt_2_4(w, h, blocksize=bs)[0], ref, rtol=1e-10, atol=1e-12)


def test_diagonal_hessian_equals_wanda_with_damped_norms():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((30, 24))
    d = rng.uniform(0.1, 5, 24)
    out, _ = sparsegpt_2_4(w, np.diag(d), damp=0.01)
    expected = wanda_2_4(w, np.sqrt(d + 0.01 * d.mean()))
    np.testing.assert_array_equal(out, expected)  # no off-diagonal: nothing propagates


def test_dead_columns_are_zeroed_and_reported():
    rng = np.random.default_rng(6)
    x = correlated(rng, 200, 16)
    x[:, [1, 9]] = 0.0
    s = RunningStats(16, track_xtx=True)
    s.update(x)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    raw = s.xtx * (2 / s.n)  # zero diagonal at the dead columns
    out, stats = sparsegpt_2_4(w, raw)
    assert stats.dead_columns == 2
    assert np.all(out[:, [1, 9]] == 0)
    assert nm.is_2_4(out, 1)
    # RunningStats.hessian() already put 1 on their diagonal: pass the mask instead.
    out2, stats2 = sparsegpt_2_4(w, s.hessian(damp=0.0), dead=s.dead)
    assert stats2.dead_columns == 2
    np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-6)
    # Dead inputs never contribute, so zeroing their weights costs nothing.
    assert out_err(x, w.astype(np.float64), out) < out_err(x, w.astype(np.float64), nm.prune_2_4(w, 1))


def test_cholesky_failure_retries_with_more_damping(caplog):
    rng = np.random.default_rng(7)
    x = correlated(rng, 100, 16)
    h = x.T @ x / 100
    # Smallest eigenvalue -2% of the mean diagonal: 1% damping is not enough, 10% is.
    h -= (np.linalg.eigvalsh(h)[0] + 0.02 * np.mean(np.diag(h))) * np.eye(16)
    w = rng.standard_normal((6, 16))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out, stats = sparsegpt_2_4(w, h, damp=0.01)
    assert stats.retries == 1 and stats.damp == pytest.approx(0.1) and not stats.fallback
    assert "retrying" in caplog.text
    assert nm.is_2_4(out, 1)


@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_hopeless_hessian_falls_back_to_magnitude(caplog, bad):
    w = np.random.default_rng(8).standard_normal((5, 8)).astype(np.float32)
    h = -np.eye(8) if bad == "negative" else np.full((8, 8), np.nan)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out, stats = sparsegpt_2_4(w, h)
    assert stats.fallback and stats.loss == 0.0
    assert "falling back to magnitude" in caplog.text
    np.testing.assert_array_equal(out, nm.prune_2_4(w, 1))
    assert out.dtype == np.float32


def test_rejects_bad_arguments():
    w = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_2_4(w, np.eye(8), blocksize=6)
    with pytest.raises(ValueError, match="H has shape"):
        sparsegpt_2_4(w, np.eye(4))
    with pytest.raises(ValueError, match="multiple of 4"):
        sparsegpt_2_4(np.ones((2, 6)), np.eye(6))
    with pytest.raises(ValueError, match="floating"):
        sparsegpt_2_4(np.ones((2, 8), np.int8), np.eye(8))
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_2_4(np.full((2, 8), np.nan), np.eye(8))
    with pytest.raises(ValueError, match="damp"):
        sparsegpt_2_4(w, np.eye(8), damp=-1.0)


# --------------------------------------------------------------------------------------
# Asymmetric reconstruction
# --------------------------------------------------------------------------------------


def perturbed_pairs(rng, n, cols, mix, distort, noise=0.3):
    """Dense-model inputs and the pruned model's distorted, noisy version of them."""
    xd = rng.standard_normal((n, cols)) @ mix
    xp = xd @ distort.T + noise * rng.standard_normal((n, cols))
    return xp, xd


def paired(xp, xd, track_dense=True):
    s = PairedStats(xp.shape[1], track_dense=track_dense)
    s.update(xp, xd)
    return s


def test_refit_recovers_an_exact_linear_distortion():
    rng = np.random.default_rng(9)
    cols = 12
    a = np.eye(cols) + 0.3 * rng.standard_normal((cols, cols))
    xp = rng.standard_normal((200, cols))
    xd = xp @ a.T  # x_dense = A x_pruned, so W' = W A reproduces the dense output
    s = paired(xp, xd)
    w = rng.standard_normal((5, cols))
    np.testing.assert_allclose(asymmetric_refit(w, s.pp, s.pd, damp=0.0), w @ a, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(asymmetric_refit(w, s.pp, s.pd, damp=1e-8), w @ a, rtol=1e-5, atol=1e-6)


def test_refit_is_identity_without_perturbation_or_with_infinite_damping():
    rng = np.random.default_rng(10)
    x = correlated(rng, 50, 8)
    w = rng.standard_normal((3, 8)).astype(np.float32)
    s = paired(x, x)
    for damp in (0.0, 0.01, 10.0):
        np.testing.assert_allclose(asymmetric_refit(w, s.pp, s.pd, damp), w, rtol=1e-6, atol=1e-6)
    xp, xd = perturbed_pairs(rng, 50, 8, np.eye(8), np.eye(8) * 1.5)
    s2 = paired(xp, xd)
    out = asymmetric_refit(w, s2.pp, s2.pd, math.inf)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, w.astype(np.float64))


def test_refit_minimises_the_ridge_objective():
    rng = np.random.default_rng(11)
    cols = 8
    xp, xd = perturbed_pairs(rng, 30, cols, np.eye(cols), np.eye(cols) + 0.2 * rng.standard_normal((8, 8)))
    s = paired(xp, xd)
    w = rng.standard_normal((4, cols))
    damp = 0.3
    lam = damp * np.mean(np.diag(s.pp))
    best = asymmetric_refit(w, s.pp, s.pd, damp)

    def objective(v):
        return np.sum((xd @ w.T - xp @ v.T) ** 2) + lam * np.sum((v - w) ** 2)

    for _ in range(20):
        assert objective(best) < objective(best + 1e-3 * rng.standard_normal(best.shape))
    # A dead pruned-model column keeps its dense weight.
    xp[:, 3] = 0.0
    s = paired(xp, xd)
    np.testing.assert_allclose(asymmetric_refit(w, s.pp, s.pd, damp)[:, 3], w[:, 3])


def test_refit_error_matches_direct_computation():
    rng = np.random.default_rng(12)
    xp, xd = perturbed_pairs(rng, 40, 8, np.eye(8), 0.9 * np.eye(8))
    w, w2 = rng.standard_normal((3, 8)), rng.standard_normal((3, 8))
    direct = np.sum((xd @ w.T - xp @ w2.T) ** 2)
    np.testing.assert_allclose(refit_error(w, w2, paired(xp, xd)), direct, rtol=1e-10)
    without_dd = refit_error(w, w2, paired(xp, xd, track_dense=False))
    np.testing.assert_allclose(without_dd, direct - np.sum((xd @ w.T) ** 2), rtol=1e-9)


def test_asymmetric_beats_plain_sparsegpt_on_perturbed_inputs():
    rng = np.random.default_rng(13)
    rows, cols = 32, 48
    mix = rng.standard_normal((cols, cols)) * 0.5 + np.eye(cols)
    distort = np.eye(cols) + 0.15 * rng.standard_normal((cols, cols))
    xp, xd = perturbed_pairs(rng, 2000, cols, mix, distort)
    s = paired(xp, xd)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    asym, stats = asymmetric_sparsegpt_2_4(w, s.pp, s.pd, refit_damp=0.01)
    plain, _ = sparsegpt_2_4(w, s.pp)  # SparseGPT on what the layer sees in the pruned model
    assert asym.dtype == np.float32 and nm.is_2_4(asym, 1) and not stats.fallback
    w64 = w.astype(np.float64)
    target = xd @ w64.T
    e_asym = np.linalg.norm(target - xp @ asym.astype(np.float64).T)
    e_plain = np.linalg.norm(target - xp @ plain.astype(np.float64).T)
    assert e_asym < 0.8 * e_plain
    # refit_damp = inf is plain SparseGPT.
    inf_out, _ = asymmetric_sparsegpt_2_4(w, s.pp, s.pd, refit_damp=math.inf)
    np.testing.assert_array_equal(inf_out, plain)


def cv_folds(rng, n_per_fold, k, cols, mix, distort):
    folds = []
    for _ in range(k):
        folds.append(paired(*perturbed_pairs(rng, n_per_fold, cols, mix, distort), track_dense=False))
    return folds


def cv_problem(rng, cols=32):
    """Columns, the mixing of the pruned input, the dense input's distortion and a weight."""
    mix = rng.standard_normal((cols, cols)) * 0.5 + np.eye(cols)
    distort = np.eye(cols) + 0.2 * rng.standard_normal((cols, cols))
    return cols, mix, distort, rng.standard_normal((24, cols))


@pytest.mark.parametrize("prune", [True, False])
def test_cv_damps_more_when_data_is_scarce(prune):
    rng = np.random.default_rng(14)
    cols, mix, distort, w = cv_problem(rng)
    scarce = choose_refit_damp(w, cv_folds(rng, 4, 5, cols, mix, distort), prune=prune)
    plenty = choose_refit_damp(w, cv_folds(rng, 400, 5, cols, mix, distort), prune=prune)
    # The dense refit overfits 16 training rows of 32 columns (strict on 20 of 20 seeds tried);
    # scoring the pruned weights blurs the effect (SparseGPT's own damping), hence >= there.
    if prune:
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


def _benchmark() -> None:
    """Print SparseGPT timing on a [1536, 384] weight (a transformer MLP size)."""
    import time

    rng = np.random.default_rng(0)
    w = rng.standard_normal((1536, 384)).astype(np.float32)
    h, _ = hessian_of(correlated(rng, 4096, 384))
    sparsegpt_2_4(w, h)  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        sparsegpt_2_4(w, h)
        times.append(time.perf_counter() - t0)
    print(f"sparsegpt_2_4 [1536, 384], H 384x384: best {min(times) * 1e3:.1f} ms of 5")


if __name__ == "__main__":
    _benchmark()


def test_row_chunks_give_the_same_weights_whatever_the_workers(monkeypatch) -> None:
    # Rows are independent given U: the walk and the refit solve run in fixed pieces of rows,
    # side by side. The pieces do not depend on the cores, so neither does the result.
    from onnx_sparse.prune import sparsegpt as sg

    rng = np.random.default_rng(5)
    cols, rows = 64, 3 * sg.ROW_CHUNK + 7
    x = rng.standard_normal((500, cols))
    w = rng.standard_normal((rows, cols))
    h = 2.0 / len(x) * (x.T @ x)
    outs = []
    for threads in ("1", "2"):
        monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", threads)
        outs.append(sparsegpt_2_4(w, h))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert outs[0][1].loss == outs[1][1].loss
    # and the pieces agree with the whole walk done at once (up to rounding)
    factor = sg.inverse_factor(h, cols)
    whole, loss = sg._obs_prune(np.ascontiguousarray(w.T), factor.u, 128)
    np.testing.assert_allclose(outs[0][0], whole.T, rtol=1e-10, atol=1e-12)
    assert np.isclose(outs[0][1].loss, loss, rtol=1e-10)
    # the refit solves its many right-hand sides in pieces too
    s = PairedStats(cols)
    s.update(x, x + 0.1 * rng.standard_normal(x.shape))
    a = sg.asymmetric_refit(w, s.pp, s.pd, 0.01)
    g = s.pp + 0.01 * np.mean(np.diag(s.pp)) * np.eye(cols)
    np.testing.assert_allclose(a, w + np.linalg.solve(g, s.pq @ w.T).T, rtol=1e-8, atol=1e-10)


def test_folds_never_held_out_can_live_in_one_sum(monkeypatch) -> None:
    # A wide layer holds out fewer folds than it has (held_out_folds): the others need no
    # statistics of their own. One sum for them ("rest") gives the same choice and weights.
    from onnx_sparse.prune import sparsegpt as sg

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


# --------------------------------------------------------------------------------------
# choose_damp: SparseGPT's damping for row-starved layers


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


# --------------------------------------------------------------------------------------
# the cross-validation's mixed-precision solve


@pytest.mark.parametrize("ridge", [1e-6, 1e-3, 1.0])
def test_scored_ridge_solve_matches_float64(ridge, monkeypatch):
    from onnx_sparse.prune import sparsegpt as sg

    monkeypatch.setattr(sg, "_FLOAT32_FROM", 1)
    rng = np.random.default_rng(31)
    x = correlated(rng, 300, 64)
    g = x.T @ x
    rhs = rng.standard_normal((64, 16))
    want = sg._ridge_solve(g, rhs, ridge * float(np.mean(np.diag(g))))
    got = sg._ridge_solve_scored(g, rhs, ridge * float(np.mean(np.diag(g))))
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12 * np.abs(want).max())


def test_scored_ridge_solve_falls_back_to_float64_when_ill_conditioned(monkeypatch):
    from onnx_sparse.prune import sparsegpt as sg

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
    from onnx_sparse.prune import sparsegpt as sg

    rng = np.random.default_rng(33)
    cols, mix, distort, w = cv_problem(rng)
    folds = cv_folds(rng, 40, 4, cols, mix, distort)
    plain = ridge_cv_scores(w, folds)
    monkeypatch.setattr(sg, "_FLOAT32_FROM", 1)
    mixed = ridge_cv_scores(w, folds)
    np.testing.assert_allclose(mixed, plain, rtol=1e-9)
