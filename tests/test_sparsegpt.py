"""Tests for onnx_sparse.prune.sparsegpt (SparseGPT 2:4 and asymmetric reconstruction).

Run as a script for a timing benchmark: ``python tests/test_sparsegpt.py``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from _problems import correlated, hessian_of, paired, perturbed_pairs
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnx_sparse.core import nm
from onnx_sparse.core.hessian import PairedStats, RunningStats
from onnx_sparse.prune.sparsegpt import (
    asymmetric_refit,
    asymmetric_sparsegpt_2_4,
    refit_error,
    sparsegpt_2_4,
    upper_cholesky_inverse,
)
from onnx_sparse.prune.wanda import wanda_2_4

LOGGER = "onnx_sparse.prune.sparsegpt"


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


# --------------------------------------------------------------------------------------
# choose_damp: SparseGPT's damping for row-starved layers


# --------------------------------------------------------------------------------------
# the cross-validation's mixed-precision solve


# ----------------------------------------------------------------------------- joint 2:4 + INT8 walk


def _reference_joint(w: np.ndarray, h: np.ndarray, scale: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """The joint walk written out the slow way: one column at a time, the full inverse Hessian,
    no blocks or lazy updates. At each group's first column every row prunes the 2 of 4 with the
    smallest w^2 / d^2; each fixed weight is 0 (pruned) or its grid value; the error goes to every
    later column through the OBS update."""
    w = w.astype(np.float64).copy()
    cols = w.shape[1]
    hd = h + damp * np.mean(np.diag(h)) * np.eye(cols)
    u = np.linalg.cholesky(np.linalg.inv(hd)).T  # upper, U^T U = H^-1
    out = np.zeros_like(w)
    prune = np.zeros_like(w, dtype=bool)
    for j in range(cols):
        if j % 4 == 0:
            score = (w[:, j : j + 4] / np.diag(u)[j : j + 4]) ** 2
            order = np.argsort(score, axis=1, kind="stable")
            prune[:, j : j + 4] = False
            np.put_along_axis(prune[:, j : j + 4], order[:, :2], True, axis=1)
        q = np.where(prune[:, j], 0.0, np.clip(np.rint(w[:, j] / scale), -127, 127) * scale)
        e = (w[:, j] - q) / u[j, j]
        out[:, j] = q
        w[:, j + 1 :] -= np.outer(e, u[j, j + 1 :])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_walk_matches_the_written_out_reference(seed: int) -> None:
    """Zeros pinned (2:4), every kept weight an integer multiple of its row's scale in [-127, 127],
    and the same weights as the slow reference given the same scales."""
    from onnx_sparse.prune.sparsegpt import inverse_factor, prune_with_factor

    rng = np.random.default_rng(seed)
    x = correlated(rng, 200, 16)
    w = rng.normal(size=(6, 16))
    h = x.T @ x
    out, stats = prune_with_factor(w, inverse_factor(h, 16), blocksize=8, int8=True)
    assert stats.scale is not None and stats.scale.shape == (6,)
    assert nm.is_2_4(out, 1)
    ints = out / stats.scale[:, None]
    assert np.allclose(ints, np.rint(ints), atol=1e-9) and np.abs(np.rint(ints)).max() <= 127
    assert np.all(stats.scale == stats.scale.astype(np.float32))
    ref = _reference_joint(w, h, stats.scale)
    assert np.allclose(out, ref, atol=1e-9)


def test_joint_walk_propagates_the_rounding_error() -> None:
    """Rounding inside the walk (its error pushed into the columns not yet fixed) loses less output
    than pruning first and rounding the result afterwards with the same scales."""
    from onnx_sparse.prune.sparsegpt import int8_round

    wins, joint_total, after_total = 0, 0.0, 0.0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x = correlated(rng, 400, 32)
        w = rng.normal(size=(8, 32)) * np.r_[np.ones(31), 40.0]  # one large column: coarse grids
        h, _ = hessian_of(x)
        joint, stats = sparsegpt_2_4(w, h, int8=True)
        plain, _ = sparsegpt_2_4(w, h)
        after = int8_round(plain, stats.scale[:, None])
        assert nm.is_2_4(joint, 1)
        wins += out_err(x, w, joint) < out_err(x, w, after)
        joint_total += out_err(x, w, joint)
        after_total += out_err(x, w, after)
    assert wins >= 4 and joint_total < after_total


def test_int8_scales_clip_search_and_grid() -> None:
    from onnx_sparse.prune.sparsegpt import int8_round, int8_scales

    w = np.array([[0.0, 1.0, -2.0, 0.5], [0.0, 0.0, 0.0, 0.0], [100.0, 0.01, 0.02, -0.03]])
    s = int8_scales(w)
    assert s[1] == 1.0 and s[0] == np.float32(2.0 / 127)
    q = int8_round(w, s[:, None])
    assert q[1].tolist() == [0.0] * 4 and q[0, 0] == 0.0
    assert np.all(np.abs(q / s[:, None]) <= 127 + 1e-9)
    # the clip search never does worse than max/127 on the squared rounding error
    rng = np.random.default_rng(0)
    m = rng.standard_t(2, size=(20, 64))
    e_search = np.sum((m - int8_round(m, int8_scales(m)[:, None])) ** 2, axis=1)
    e_max = np.sum((m - int8_round(m, int8_scales(m, (1.0,))[:, None])) ** 2, axis=1)
    assert np.all(e_search <= e_max + 1e-12)


def test_joint_walk_with_column_scaling_rounds_on_the_stored_grid() -> None:
    """With ``col_scale`` the walk and its mask are those of ``w``; ``out * col_scale`` (what is stored
    after the input channels are rescaled) has integer multiples of the row scales."""
    from onnx_sparse.prune.sparsegpt import inverse_factor, prune_with_factor

    rng = np.random.default_rng(5)
    x = correlated(rng, 300, 16)
    w = rng.normal(size=(5, 16))
    v = np.exp(rng.normal(scale=1.0, size=16))
    factor = inverse_factor(x.T @ x, 16)
    plain, _ = prune_with_factor(w, factor)
    out, stats = prune_with_factor(w, factor, int8=True, col_scale=v)
    assert nm.is_2_4(out, 1)
    ints = out * v / stats.scale[:, None]
    assert np.allclose(ints, np.rint(ints), atol=1e-9) and np.abs(np.rint(ints)).max() <= 127
    assert np.array_equal(out == 0, plain == 0) or np.mean((out == 0) == (plain == 0)) > 0.9


def test_int8_scales_are_those_of_the_plain_clip_loop() -> None:
    """int8_scales (one buffer for every clip, max |w| without an |w| copy) gives, bit for bit, the
    scales of the plain loop over the clips with new arrays, on C- and F-ordered float32/float64
    rows, rows of zeros and of negative zeros, and no clip to try."""
    from onnx_sparse.prune.sparsegpt import CLIP_RATIOS, INT8_MAX, int8_round, int8_scales

    def plain(w: np.ndarray, ratios: tuple[float, ...] = CLIP_RATIOS) -> np.ndarray:
        top = np.abs(np.asarray(w, dtype=np.float64)).max(axis=1)
        best, err = np.where(top > 0, top / INT8_MAX, 1.0), np.full(w.shape[0], np.inf)
        for r in ratios:
            s = np.where(top > 0, top * r / INT8_MAX, 1.0)
            e = np.sum((w - int8_round(w, s[:, None])) ** 2, axis=1)
            better = e < err * (1 - 1e-12)
            best, err = np.where(better, s, best), np.where(better, e, err)
        best = best.astype(np.float32).astype(np.float64)
        return np.where(best > 0, best, 1.0)

    rng = np.random.default_rng(5)
    w = rng.standard_normal((67, 45)) * rng.exponential(1.0, (67, 1))
    w[w < -1.5] = 0.0
    w[3], w[9] = 0.0, -0.0
    for m in (w, w.astype(np.float32), np.asfortranarray(w), w.T, w[::2, 1:]):
        for ratios in (CLIP_RATIOS, (1.0,), ()):
            assert int8_scales(m, ratios).tobytes() == plain(m, ratios).tobytes()
