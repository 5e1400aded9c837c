"""Tests for onnx_sparse.core.hessian: running statistics, im2col and conv weight layouts."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_sparse.core import nm
from onnx_sparse.core.hessian import (
    PairedStats,
    RunningStats,
    conv_output_shape,
    conv_weight_to_matrix,
    im2col,
    im2col_rows,
    iter_im2col,
    matrix_to_conv_weight,
)


def naive_conv(x, w, strides, pads, dilations, group):
    """ONNX Conv (no bias) by explicit loops over every output element; tiny inputs only."""
    n_batch, channels = x.shape[:2]
    spatial = x.ndim - 2
    k_out = w.shape[0]
    kernel = w.shape[2:]
    cg, kg = channels // group, k_out // group
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)])
    out_shape = conv_output_shape(x.shape[2:], kernel, strides, pads, dilations)
    y = np.zeros((n_batch, k_out) + out_shape)
    for b, k in itertools.product(range(n_batch), range(k_out)):
        g = k // kg
        for o in itertools.product(*(range(v) for v in out_shape)):
            acc = 0.0
            for c in range(cg):
                for kk in itertools.product(*(range(v) for v in kernel)):
                    pos = tuple(o[i] * strides[i] + kk[i] * dilations[i] for i in range(spatial))
                    acc += w[(k, c) + kk] * xp[(b, g * cg + c) + pos]
            y[(b, k) + o] = acc
    return y


def conv_by_im2col(x, w, strides, pads, dilations, group):
    """Conv through im2col and conv_weight_to_matrix, reshaped back to [N, K, *out]."""
    kernel = w.shape[2:]
    cols = im2col(x, kernel, strides, pads, dilations, group)
    mats = conv_weight_to_matrix(w, group)
    y = np.concatenate([c @ m.T for c, m in zip(cols, mats, strict=True)], axis=1)  # [N*O, K]
    out_shape = conv_output_shape(x.shape[2:], kernel, strides, pads, dilations)
    return np.moveaxis(y.reshape((x.shape[0],) + out_shape + (w.shape[0],)), -1, 1)


CASES = [
    # (x shape, w shape, strides, pads, dilations, group)
    ((2, 4, 7), (3, 4, 3), (1,), (0, 0), (1,), 1),
    ((1, 4, 9), (4, 2, 3), (2,), (1, 2), (2,), 2),
    ((2, 3, 5, 6), (2, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((1, 8, 6, 7), (6, 4, 2, 3), (2, 1), (0, 1, 2, 0), (1, 2), 2),
    ((1, 6, 5, 5), (6, 1, 3, 3), (1, 2), (1, 1, 1, 1), (1, 1), 6),  # depthwise
    ((2, 4, 4, 4), (4, 4, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # 1x1
    ((1, 2, 4, 3, 4), (2, 2, 2, 1, 3), (1, 1, 2), (1, 0, 1, 0, 1, 1), (1, 1, 1), 1),  # 3-D
]


@pytest.mark.parametrize("xs, ws, strides, pads, dilations, group", CASES)
def test_im2col_matches_naive_conv(xs, ws, strides, pads, dilations, group):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs)
    w = rng.standard_normal(ws)
    expected = naive_conv(x, w, strides, pads, dilations, group)
    got = conv_by_im2col(x, w, strides, pads, dilations, group)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    cg=st.integers(1, 3),
    kg=st.integers(1, 2),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    s=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    d=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    p=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    extra=st.tuples(st.integers(0, 3), st.integers(0, 3)),
)
def test_im2col_matches_naive_conv_2d_property(n, group, cg, kg, k, s, d, p, extra):
    # Smallest spatial size that fits the dilated kernel, plus a little.
    hw = tuple(max(1, d[i] * (k[i] - 1) + 1 - p[i] - p[i + 2]) + extra[i] for i in range(2))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, cg * group) + hw)
    w = rng.standard_normal((kg * group, cg) + k)
    np.testing.assert_allclose(
        conv_by_im2col(x, w, s, p, d, group), naive_conv(x, w, s, p, d, group), rtol=1e-12, atol=1e-12
    )


def test_im2col_columns_put_channels_fastest():
    # With a kernel exactly the size of the (unpadded) input there is one output position
    # and every input element appears once; its column must be kpos * C + c.
    c, kh, kw = 5, 2, 3
    x = np.arange(c * kh * kw, dtype=np.float64).reshape(1, c, kh, kw)
    (cols,) = im2col(x, (kh, kw))
    assert cols.shape == (1, kh * kw * c)
    for (i, j), ch in itertools.product(itertools.product(range(kh), range(kw)), range(c)):
        kpos = i * kw + j
        assert cols[0, kpos * c + ch] == x[0, ch, i, j]


def test_im2col_group_columns_are_the_group_channels():
    x = np.arange(8, dtype=np.float64).reshape(1, 8, 1, 1)  # value = channel index
    cols = im2col(x, (1, 1), group=2)
    np.testing.assert_array_equal(cols[0], [[0, 1, 2, 3]])
    np.testing.assert_array_equal(cols[1], [[4, 5, 6, 7]])


def test_im2col_rows_follow_batch_then_positions():
    x = np.arange(2 * 1 * 2 * 3, dtype=np.float64).reshape(2, 1, 2, 3)
    (cols,) = im2col(x, (1, 1))
    np.testing.assert_array_equal(cols[:, 0], x.reshape(-1))


def test_im2col_keeps_dtype():
    x = np.ones((1, 4, 3, 3), dtype=np.float32)
    assert im2col(x, (3, 3), pads=(1, 1, 1, 1))[0].dtype == np.float32


@pytest.mark.parametrize("chunk_rows", [None, 1, 5, 7, 12, 1000])
def test_iter_im2col_chunks_concatenate_to_im2col(chunk_rows):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 6, 5))
    args = ((3, 3), (1, 2), (1, 0, 1, 2), (1, 1), 2)
    full = im2col(x, *args)
    chunks = list(iter_im2col(x, *args, chunk_rows=chunk_rows))
    for g in range(2):
        np.testing.assert_array_equal(np.concatenate([c[g] for c in chunks]), full[g])
    line = conv_output_shape(x.shape[2:], *args[:4])[1]
    if chunk_rows is not None and chunk_rows >= line:
        assert all(c[0].shape[0] <= chunk_rows for c in chunks)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    s=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    d=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    p=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    share=st.floats(0.0, 1.0),
    chunk=st.sampled_from([None, 1, 3, 50]),
    seed=st.integers(0, 100),
)
def test_im2col_rows_are_those_rows_of_im2col(n, group, k, s, d, p, share, chunk, seed):
    rng = np.random.default_rng(seed)
    hw = tuple(d[i] * (k[i] - 1) + 1 + 3 for i in range(2))
    x = rng.standard_normal((n, 2 * group) + hw).astype(np.float32)
    full = im2col(x, k, s, p, d, group)
    total = full[0].shape[0]
    rows = np.sort(rng.choice(total, size=int(share * total), replace=False))
    chunks = list(im2col_rows(x, k, rows, s, p, d, group, chunk))
    if not rows.size:
        assert chunks == []
        return
    # the chunks of iter_im2col, each holding its selected rows (the chunking decides how the
    # statistics batch their rows, so it must not change with the path)
    want, offset = [], 0
    for c in iter_im2col(x, k, s, p, d, group, chunk):
        n = c[0].shape[0]
        local = rows[(rows >= offset) & (rows < offset + n)] - offset
        if local.size:
            want.append([m[local] for m in c])
        offset += n
    assert len(chunks) == len(want)
    for got, ref in zip(chunks, want, strict=True):
        assert all(a.dtype == x.dtype and np.array_equal(a, b) for a, b in zip(got, ref, strict=True))
    for g in range(group):
        assert np.array_equal(np.concatenate([c[g] for c in chunks]), full[g][rows])


def test_im2col_rows_one_and_three_spatial_axes():
    rng = np.random.default_rng(4)
    for shape, k in (((2, 3, 9), (3,)), ((1, 2, 4, 5, 6), (2, 3, 2))):
        x = rng.standard_normal(shape)
        full = im2col(x, k, pads=(1,) * (2 * len(k)))
        rows = np.arange(0, full[0].shape[0], 3)
        (got,) = [np.concatenate(c) for c in zip(*im2col_rows(x, k, rows, pads=(1,) * (2 * len(k))), strict=True)]
        assert np.array_equal(got, full[0][rows])
    with pytest.raises(ValueError, match="row indices"):
        list(im2col_rows(rng.standard_normal((1, 2, 3, 3)), (1, 1), [9]))


def test_im2col_rejects_bad_arguments():
    x = np.zeros((1, 6, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        im2col(x, (3, 3), group=4)
    with pytest.raises(ValueError, match="pads"):
        im2col(x, (3, 3), pads=(1, 1))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        im2col(x, (5, 5))
    with pytest.raises(ValueError, match="spatial"):
        im2col(np.zeros((4, 4)), (1,))


def test_conv_output_shape():
    assert conv_output_shape((224, 224), (7, 7), (2, 2), (3, 3, 3, 3)) == (112, 112)
    assert conv_output_shape((10,), (3,), dilations=(2,)) == (6,)


def test_conv_weight_matrix_column_order():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4, 2, 3))
    mats = conv_weight_to_matrix(w, group=2)
    assert [m.shape for m in mats] == [(3, 24), (3, 24)]
    for k, c, i, j in itertools.product(range(6), range(4), range(2), range(3)):
        assert mats[k // 3][k % 3, (i * 3 + j) * 4 + c] == w[k, c, i, j]


@settings(max_examples=30, deadline=None)
@given(
    group=st.integers(1, 3),
    kg=st.integers(1, 3),
    cg=st.integers(1, 5),
    kernel=st.lists(st.integers(1, 3), min_size=1, max_size=3),
)
def test_conv_weight_matrix_round_trip(group, kg, cg, kernel):
    w = np.random.default_rng(4).standard_normal((kg * group, cg) + tuple(kernel)).astype(np.float32)
    mats = conv_weight_to_matrix(w, group)
    back = matrix_to_conv_weight(mats, kernel, cg)
    assert back.dtype == w.dtype
    np.testing.assert_array_equal(back, w)


@settings(max_examples=30, deadline=None)
@given(cg4=st.integers(1, 3), kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), group=st.integers(1, 2))
def test_matrix_2_4_is_conv_2_4_along_channels(cg4, kernel, group):
    # 2:4 along matrix columns is 2:4 along input channels at each kernel position (TensorRT's rule).
    cg = 4 * cg4
    w = np.random.default_rng(5).standard_normal((2 * group, cg) + kernel)
    pruned = [nm.prune_2_4(m, 1) for m in conv_weight_to_matrix(w, group)]
    back = matrix_to_conv_weight(pruned, kernel, cg)
    assert nm.is_2_4(back, 1)
    assert nm.retained_magnitude(w, back) > 0.5


def test_matrix_to_conv_weight_rejects_wrong_width():
    with pytest.raises(ValueError, match="expected 12 columns"):
        matrix_to_conv_weight([np.zeros((2, 10))], (3,), 4)
    with pytest.raises(ValueError, match="divisible"):
        conv_weight_to_matrix(np.zeros((3, 2, 1, 1)), 2)


# --------------------------------------------------------------------------------------
# RunningStats / PairedStats
# --------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    cols=st.integers(1, 9),
    cuts=st.lists(st.integers(0, 40), max_size=4),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_running_stats_batches_equal_one_shot(n, cols, cuts, dtype):
    x = np.random.default_rng(6).standard_normal((n, cols)).astype(dtype)
    whole = RunningStats(cols, track_xtx=True)
    whole.update(x)
    parts = RunningStats(cols, track_xtx=True)
    bounds = [0] + sorted(min(c, n) for c in cuts) + [n]
    for a, b in itertools.pairwise(bounds):
        parts.update(x[a:b])
    x64 = x.astype(np.float64)
    assert whole.n == parts.n == n
    # sums are reduced in float64 whatever the input; X^T X is multiplied in the rows' own
    # precision (float32 products for float32 rows), then summed in float64
    tol = 1e-12 if dtype == np.float64 else 1e-6 * n
    np.testing.assert_allclose(parts.sum, whole.sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(parts.sq, whole.sq, rtol=1e-12)
    np.testing.assert_allclose(parts.xtx, whole.xtx, rtol=tol, atol=tol)
    np.testing.assert_allclose(whole.mean, x64.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(whole.col_norm, np.linalg.norm(x64, axis=0), rtol=1e-12)
    np.testing.assert_allclose(whole.xtx, x64.T @ x64, rtol=tol, atol=tol)
    assert whole.xtx.dtype == np.float64


def test_paired_stats_keep_the_difference_exact():
    # Xp^T (Xd - Xp) is accumulated directly: the float32 products of two nearly equal inputs
    # must not lose the small difference the refit is made of (pd - pp would cancel).
    rng = np.random.default_rng(9)
    xp = rng.standard_normal((4096, 64)).astype(np.float32) * 100
    xd = xp + np.float32(1e-3) * rng.standard_normal(xp.shape).astype(np.float32)
    s = PairedStats(64)
    for a in range(0, 4096, 1000):
        s.update(xp[a : a + 1000], xd[a : a + 1000])
    x64, d64 = xp.astype(np.float64), xd.astype(np.float64)
    exact = x64.T @ (d64 - x64)
    assert np.linalg.norm(s.pq - exact) / np.linalg.norm(exact) < 1e-4
    ref = x64.T @ d64
    assert np.linalg.norm(s.pd - ref) / np.linalg.norm(ref) < 1e-6


def test_running_stats_flattens_leading_axes_and_skips_empty():
    x = np.random.default_rng(7).standard_normal((2, 3, 4))
    s = RunningStats(4)
    s.update(x)
    s.update(np.zeros((0, 4)))
    assert s.n == 6
    np.testing.assert_allclose(s.mean, x.reshape(-1, 4).mean(axis=0))
    assert s.xtx is None and not s.track_xtx
    with pytest.raises(ValueError, match="last axis"):
        s.update(np.zeros((2, 5)))


def test_running_stats_accepts_im2col_chunks():
    x = np.random.default_rng(8).standard_normal((2, 4, 6, 6)).astype(np.float32)
    args = ((3, 3), (1, 1), (1, 1, 1, 1))
    (full,) = im2col(x, *args)
    one = RunningStats(full.shape[1], track_xtx=True)
    one.update(full)
    chunked = RunningStats(full.shape[1], track_xtx=True)
    chunked.update_chunks(c[0] for c in iter_im2col(x, *args, chunk_rows=10))
    assert chunked.n == one.n == 2 * 36
    # float32 rows: float32 products (chunked and whole differ by product rounding only)
    np.testing.assert_allclose(chunked.xtx, one.xtx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked.sq, one.sq, rtol=1e-12)


def test_hessian_formula_dead_columns_and_damping():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((50, 6))
    x[:, 2] = 0.0
    s = RunningStats(6, track_xtx=True)
    s.update(x)
    np.testing.assert_array_equal(s.dead, [False, False, True, False, False, False])
    h0 = 2.0 / 50 * x.T @ x
    h0[2, 2] = 1.0
    np.testing.assert_allclose(s.hessian(damp=0.0), h0, rtol=1e-12)
    lam = 0.05 * np.mean(np.diag(h0))
    np.testing.assert_allclose(s.hessian(damp=0.05), h0 + lam * np.eye(6), rtol=1e-12)
    assert np.all(np.linalg.eigvalsh(s.hessian()) > 0)
    assert s.xtx[2, 2] == 0.0  # the accumulator itself is untouched


def test_hessian_needs_xtx_and_rows():
    with pytest.raises(ValueError, match="track_xtx"):
        RunningStats(4).hessian()
    with pytest.raises(ValueError, match="no rows"):
        RunningStats(4, track_xtx=True).hessian()
    np.testing.assert_array_equal(RunningStats(3).mean, np.zeros(3))


def test_max_rows_sampling_is_seeded_and_scaled():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1000, 5))
    a = RunningStats(5, track_xtx=True, max_rows=100, seed=1)
    b = RunningStats(5, track_xtx=True, max_rows=100, seed=1)
    c = RunningStats(5, track_xtx=True, max_rows=100, seed=2)
    for s in (a, b, c):
        s.update(x)
    assert a.n == 1000  # every row seen is counted
    np.testing.assert_array_equal(a.xtx, b.xtx)
    assert not np.array_equal(a.xtx, c.xtx)
    # Scaled sums estimate the full sums: close on average, exact for constant rows.
    np.testing.assert_allclose(a.sq / 1000, 1.0, atol=0.3)
    const = RunningStats(2, max_rows=3)
    const.update(np.full((30, 2), 2.0))
    np.testing.assert_allclose(const.sum, [60.0, 60.0])
    np.testing.assert_allclose(const.mean, [2.0, 2.0])


def test_max_rows_no_op_when_update_fits():
    x = np.random.default_rng(11).standard_normal((20, 3))
    a, b = RunningStats(3, track_xtx=True, max_rows=20), RunningStats(3, track_xtx=True)
    a.update(x)
    b.update(x)
    np.testing.assert_array_equal(a.xtx, b.xtx)
    with pytest.raises(ValueError, match="max_rows"):
        RunningStats(3, max_rows=0)


def test_running_stats_add_and_total_equal_union():
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((10, 4)), rng.standard_normal((7, 4))
    a, b, ab = (RunningStats(4, track_xtx=True) for _ in range(3))
    a.update(x)
    b.update(y)
    ab.update(np.concatenate([x, y]))
    for s in (a + b, RunningStats.total([a, b])):
        assert s.n == 17
        np.testing.assert_allclose(s.xtx, ab.xtx, rtol=1e-12)
        np.testing.assert_allclose(s.mean, ab.mean, rtol=1e-12)
    single = RunningStats.total([a])
    assert single is not a
    single.update(y)
    assert a.n == 10
    with pytest.raises(ValueError, match="columns"):
        _ = a + RunningStats(5)


def test_paired_stats_grams_sampling_and_total():
    rng = np.random.default_rng(13)
    xd = rng.standard_normal((30, 4))
    xp = xd + 0.1 * rng.standard_normal((30, 4))
    s = PairedStats(4, track_dense=True)
    s.update(xp[:12], xd[:12])
    s.update(xp[12:], xd[12:])
    assert s.n == 30
    np.testing.assert_allclose(s.pp, xp.T @ xp, rtol=1e-12)
    np.testing.assert_allclose(s.pd, xp.T @ xd, rtol=1e-12)
    np.testing.assert_allclose(s.dd, xd.T @ xd, rtol=1e-12)
    # Sampling takes the same rows of both inputs.
    same = PairedStats(4, max_rows=5, seed=3)
    same.update(xd, xd)
    np.testing.assert_array_equal(same.pp, same.pd)
    assert same.n == 30
    parts = [PairedStats(4) for _ in range(3)]
    for i, p in enumerate(parts):
        p.update(xp[i::3], xd[i::3])
    tot = PairedStats.total(parts)
    np.testing.assert_allclose(tot.pd, xp.T @ xd, rtol=1e-12)
    assert tot.n == 30 and tot.dd is None
    with pytest.raises(ValueError, match="rows"):
        s.update(xp, xd[:5])
    with pytest.raises(ValueError, match="no statistics"):
        PairedStats.total([])


def test_hessian_of_im2col_is_positive_definite_with_padding():
    # Zero padding makes border columns partly zero, never dead.
    x = np.random.default_rng(14).standard_normal((1, 4, 5, 5))
    (cols,) = im2col(x, (3, 3), pads=(1, 1, 1, 1))
    s = RunningStats(cols.shape[1], track_xtx=True)
    s.update(cols)
    assert not s.dead.any()
    assert math.isfinite(float(np.linalg.slogdet(s.hessian())[1]))
