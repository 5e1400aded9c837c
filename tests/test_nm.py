"""Tests for onnx_sparse.core.nm: the 2:4 math every mask, check and statistic goes through."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnx_sparse.core import nm

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))

_float_elements = st.one_of(
    st.floats(-1000, 1000, width=32, allow_nan=False),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0]),  # ties and zeros
)


@st.composite
def shapes_and_axis(draw) -> tuple[tuple[int, ...], int]:
    """Rank 1 to 4; one random axis of length 4, 8 or 12; the others 1 to 5."""
    rank = draw(st.integers(1, 4))
    axis = draw(st.integers(0, rank - 1))
    shape = [draw(st.integers(1, 5)) for _ in range(rank)]
    shape[axis] = 4 * draw(st.integers(1, 3))
    if draw(st.booleans()):
        axis -= rank  # negative axes are accepted too
    return tuple(shape), axis


@st.composite
def weights(draw) -> tuple[np.ndarray, int, int]:
    """(w, axis, zero): float32/float16/bfloat16 with zero 0, or int8 with a zero point."""
    shape, axis = draw(shapes_and_axis())
    kind = draw(st.sampled_from(["float32", "float16", "bfloat16", "int8"]))
    if kind == "int8":
        zero = draw(st.integers(-10, 10))
        elements = st.one_of(st.integers(-128, 127), st.sampled_from([zero, zero + 1, zero - 1, 0]))
        w = draw(arrays(np.int8, shape, elements=elements))
        return w, axis, zero
    w32 = draw(arrays(np.float32, shape, elements=_float_elements))
    return w32.astype(np.dtype(kind) if kind != "bfloat16" else ml_dtypes.bfloat16), axis, 0


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def _magnitude(w: np.ndarray, zero: int) -> np.ndarray:
    return np.abs(w.astype(np.float64) - zero)


def _groups_last(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` with the groups of 4 along ``axis`` as rows of a 2-D array (independent of nm)."""
    return np.moveaxis(a, axis, -1).reshape(-1, 4)


# --------------------------------------------------------------------------- prune_2_4 properties


@settings(max_examples=300, deadline=None)
@given(case=weights())
def test_prune_gives_2_4_along_the_axis(case):
    w, axis, zero = case
    out = nm.prune_2_4(w, axis, zero=zero)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert nm.is_2_4(out, axis, zero)
    nonzero = (_groups_last(out, axis) != np.asarray(zero).astype(w.dtype)).sum(axis=1)
    assert np.all(nonzero <= 2)


@settings(max_examples=300, deadline=None)
@given(case=weights())
def test_kept_values_are_bit_identical_and_dropped_ones_are_zero(case):
    w, axis, zero = case
    before = w.copy()
    out = nm.prune_2_4(w, axis, zero=zero)
    np.testing.assert_array_equal(_bits(w), _bits(before))  # input untouched
    same = _bits(out) == _bits(w)
    # Every entry is either the original, bit for bit, or the zero value (the zero point for int8).
    assert np.all(same | (_bits(out) == _bits(np.full_like(w, zero))))
    # Exactly min(2, nonzero count) originals survive in each group.
    wg, og = _groups_last(w, axis), _groups_last(out, axis)
    z = np.asarray(zero).astype(w.dtype)
    assert np.array_equal((og != z).sum(axis=1), np.minimum((wg != z).sum(axis=1), 2))


@settings(max_examples=300, deadline=None)
@given(case=weights())
def test_kept_two_are_the_largest_magnitudes(case):
    w, axis, zero = case
    out = nm.prune_2_4(w, axis, zero=zero)
    mag = _groups_last(_magnitude(w, zero), axis)
    z = np.asarray(zero).astype(w.dtype)
    kept = (_groups_last(_bits(out) == _bits(w), axis)) & (_groups_last(w, axis) != z)
    dropped = _groups_last(_bits(out) != _bits(w), axis)
    for g in range(mag.shape[0]):
        if dropped[g].any():
            assert mag[g][kept[g]].min() >= mag[g][dropped[g]].max(), (w, axis, g)


@settings(max_examples=300, deadline=None)
@given(case=weights())
def test_pruning_twice_equals_pruning_once(case):
    w, axis, zero = case
    once = nm.prune_2_4(w, axis, zero=zero)
    twice = nm.prune_2_4(once, axis, zero=zero)
    np.testing.assert_array_equal(_bits(twice), _bits(once))


@settings(max_examples=200, deadline=None)
@given(case=weights())
def test_prune_with_explicit_magnitude_scores_matches_default(case):
    w, axis, zero = case
    scores = nm.magnitude_scores(w, zero)
    np.testing.assert_array_equal(
        _bits(nm.prune_2_4(w, axis, scores=scores, zero=zero)), _bits(nm.prune_2_4(w, axis, zero=zero))
    )


def test_already_zero_entries_never_push_out_nonzero_ones():
    w = np.array([0.0, 3.0, 0.0, 1.0], dtype=np.float32)
    scores = np.array([9.0, 0.0, 9.0, 0.0])  # scores favour the zeros
    np.testing.assert_array_equal(nm.prune_2_4(w, 0, scores=scores), w)


def test_prune_does_not_touch_an_already_sparse_tensor():
    w = np.array([[0.0, -0.0, 5.0, 1.0], [2.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    out = nm.prune_2_4(w, 1)
    np.testing.assert_array_equal(_bits(out), _bits(w))  # -0.0 stays -0.0


def test_prune_hand_example():
    w = np.array([[1.0, -4.0, 3.0, 2.0, 0.5, 0.25, -8.0, 7.0]], dtype=np.float32)
    np.testing.assert_array_equal(nm.prune_2_4(w, 1), [[0, -4, 3, 0, 0, 0, -8, 7]])
    # Along axis 0 of the transpose: the same groups.
    np.testing.assert_array_equal(nm.prune_2_4(w.T.copy(), 0), np.array([[0, -4, 3, 0, 0, 0, -8, 7]]).T)


def test_prune_groups_run_along_the_given_axis_only():
    w = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(nm.prune_2_4(w, 1), np.where(np.arange(4) >= 2, w, 0))
    np.testing.assert_array_equal(nm.prune_2_4(w, 0), np.where(np.arange(4)[:, None] >= 2, w, 0))


# --------------------------------------------------------------------------- zero point


def test_int8_pruned_entries_hold_the_zero_point_and_dequantize_to_zero():
    q = np.array([[10, 3, -7, 4], [5, 6, 2, 3]], dtype=np.int8)
    zp, scale = np.int8(3), np.float32(0.1)
    out = nm.prune_2_4(q, 1, zero=zp)
    # |q - 3| = [7, 0, 10, 1] and [2, 3, 1, 0]: keep 10,-7 and 5,6; the rest become 3.
    np.testing.assert_array_equal(out, [[10, 3, -7, 3], [5, 6, 3, 3]])
    deq = (out.astype(np.float32) - zp) * scale
    assert nm.is_2_4(deq, 1)
    assert nm.is_2_4(out, 1, zero=zp) and not nm.is_2_4(out, 1)  # zero 0 would count the 3s


def test_zero_point_may_be_an_array_that_broadcasts():
    q = np.array([[1, 2, 3, 4], [9, 9, 9, 9]], dtype=np.int8)
    zp = np.array([[0], [9]], dtype=np.int8)  # per row
    assert nm.violating_fraction(q, 1, zp) == 0.5
    out = nm.prune_2_4(q, 1, zero=zp)
    np.testing.assert_array_equal(out, [[0, 0, 3, 4], [9, 9, 9, 9]])


# --------------------------------------------------------------------------- grouped / check_axis


@settings(max_examples=200, deadline=None)
@given(sa=shapes_and_axis())
def test_grouped_is_a_view_and_round_trips(sa):
    shape, axis = sa
    a = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    g = nm.grouped(a, axis)
    ax = axis % len(shape)
    assert np.shares_memory(g, a)
    assert g.shape == shape[:ax] + (shape[ax] // 4, 4) + shape[ax + 1 :]
    np.testing.assert_array_equal(g.reshape(shape), a)
    # Member j of group k is entry 4k + j along the axis.
    for k in range(shape[ax] // 4):
        for j in range(4):
            lhs = g[(slice(None),) * ax + (k, j)]
            rhs = a[(slice(None),) * ax + (4 * k + j,)]
            np.testing.assert_array_equal(lhs, rhs)


def test_grouped_rejects_bad_axes():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        nm.grouped(np.zeros((3, 6)), 1)
    with pytest.raises(ValueError, match="out of range"):
        nm.grouped(np.zeros((4, 4)), 2)
    assert nm.check_axis((8, 3), -2) == 0


# --------------------------------------------------------------------------- keep_top2


def test_keep_top2_ties_go_to_the_lower_index():
    ones = np.ones((2, 8))
    np.testing.assert_array_equal(nm.keep_top2(ones, 1), np.tile([True, True, False, False], (2, 2)))
    np.testing.assert_array_equal(nm.keep_top2(np.array([1.0, 2.0, 2.0, 2.0]), 0), [False, True, True, False])
    np.testing.assert_array_equal(nm.keep_top2(np.array([3.0, 1.0, 3.0, 3.0]), 0), [True, False, True, False])


@settings(max_examples=300, deadline=None)
@given(sa=shapes_and_axis(), data=st.data())
def test_keep_top2_matches_a_stable_sort(sa, data):
    shape, axis = sa
    scores = data.draw(arrays(np.float64, shape, elements=st.integers(-3, 3).map(float)))  # many ties
    keep = nm.keep_top2(scores, axis)
    assert keep.shape == scores.shape and keep.dtype == bool
    rows, kept = _groups_last(scores, axis), _groups_last(keep, axis)
    for r, k in zip(rows, kept, strict=True):
        best = sorted(range(4), key=lambda i, r=r: (-r[i], i))[:2]
        assert sorted(np.flatnonzero(k).tolist()) == sorted(best)


# --------------------------------------------------------------------------- is_2_4 / violating_fraction


def test_is_2_4_hit_and_no_op():
    assert nm.is_2_4(np.array([0, 1, 0, 2, 3, 0, 0, 0], dtype=np.float32), 0)
    assert not nm.is_2_4(np.array([0, 1, 0, 2, 3, 5, 4, 0], dtype=np.float32), 0)
    assert nm.is_2_4(np.array([-0.0, 1.0, -0.0, 2.0], dtype=np.float32), 0)  # -0.0 is zero
    # The pattern depends on the axis: 2:4 by rows, not by columns.
    w = np.array([[1, 1, 0, 0]] * 4, dtype=np.float32)
    assert nm.is_2_4(w, 1) and not nm.is_2_4(w, 0)


def test_violating_fraction_hand_example():
    w = np.array(
        [
            [1, 1, 1, 0, 1, 1, 0, 0],  # 3 nonzero -> violates; 2 -> fine
            [1, 1, 1, 1, 0, 0, 0, 0],  # 4 -> violates; 0 -> fine
        ],
        dtype=np.float32,
    )
    assert nm.violating_fraction(w, 1) == 0.5
    assert nm.violating_fraction(nm.prune_2_4(w, 1), 1) == 0.0
    assert nm.violating_fraction(np.ones((4, 3), np.float32), 0) == 1.0
    np.testing.assert_array_equal(nm.nonzero_per_group(w, 1), [[3, 2], [4, 0]])


@settings(max_examples=200, deadline=None)
@given(case=weights())
def test_violating_fraction_counts_groups_with_more_than_two(case):
    w, axis, zero = case
    counts = (_groups_last(w, axis) != np.asarray(zero).astype(w.dtype)).sum(axis=1)
    assert nm.violating_fraction(w, axis, zero) == pytest.approx(float(np.mean(counts > 2)))
    assert nm.is_2_4(w, axis, zero) == bool(np.all(counts <= 2))


# --------------------------------------------------------------------------- retained_magnitude / apply_keep


def test_retained_magnitude():
    w = np.array([1.0, -2.0, 3.0, -4.0], dtype=np.float32)
    out = nm.prune_2_4(w, 0)
    assert nm.retained_magnitude(w, out) == pytest.approx(7 / 10)
    assert nm.retained_magnitude(w, w) == 1.0
    assert nm.retained_magnitude(np.zeros(4, np.float32), np.zeros(4, np.float32)) == 1.0
    q = np.array([5, 1, 3, 3], dtype=np.int8)  # |q - 3| = 2, 2, 0, 0
    assert nm.retained_magnitude(q, nm.prune_2_4(q, 0, zero=3), zero=3) == 1.0


def test_apply_keep_copies_existing_zeros_as_they_are():
    w = np.array([-0.0, 2.0, 3.0, 4.0], dtype=np.float32)
    out = nm.apply_keep(w, np.array([False, False, True, True]))
    np.testing.assert_array_equal(_bits(out), _bits(np.array([-0.0, 0.0, 3.0, 4.0], dtype=np.float32)))
    assert out is not w and w[1] == 2.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_float_dtypes_keep_their_dtype(dtype):
    w = np.array([[0.1, -0.7, 0.3, 0.2]], dtype=np.float32).astype(dtype)
    out = nm.prune_2_4(w, 1)
    assert out.dtype == dtype
    np.testing.assert_array_equal(
        out.astype(np.float32), np.array([[0, -0.7, 0.3, 0]], np.float32).astype(dtype).astype(np.float32)
    )


# --------------------------------------------------------------------------- blocks / scores / empty (mutation survivors)


def _block_rows(shape: tuple[int, ...], axis: int | None, elements: int) -> list[tuple[int, int]]:
    return [(sl[0].start, min(sl[0].stop, shape[0])) for sl in nm.blocks(shape, axis, elements)]


def test_blocks_cover_axis_0_in_pieces_of_about_the_given_size():
    assert list(nm.blocks(())) == [()]  # a scalar is one block
    assert _block_rows((10, 3), None, 6) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]  # 6 elements = 2 rows
    assert _block_rows((5, 100), None, 6) == [(i, i + 1) for i in range(5)]  # at least one row per block


@pytest.mark.parametrize("axis", [0, -2])
def test_blocks_along_the_group_axis_hold_whole_groups(axis):
    """Groups of 4 run along axis 0: a block must not cut one (5 rows per block would), whatever the axis sign."""
    rows = _block_rows((24, 3), axis, 15)
    assert rows == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24)]
    assert _block_rows((24, 3), 1, 15) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]  # other axis: not needed


def test_magnitude_scores_default_and_float_zero():
    w = np.array([-3.0, 0.5, 2.0, -0.25], np.float32)
    np.testing.assert_array_equal(nm.magnitude_scores(w), np.abs(w))  # wanda scores with the default
    np.testing.assert_array_equal(nm.magnitude_scores(w, 0.5), np.abs(w - 0.5))
    assert nm.magnitude_scores(w.astype(np.float64)).dtype == np.float64


def test_scores_rank_at_their_own_precision_not_the_weights():
    """Wanda's float64 scores on a float32 weight: two scores closer than float32 can tell apart still rank.

    Rounded to float32 they would tie and the tie would go to the lower index, keeping the wrong
    entry (a different pruned model from the same scores)."""
    w = np.ones((1, 4), np.float32)
    scores = np.array([[3.0, 1.0, 1.0 + 1e-9, 0.5]])  # 1.0 and 1.0 + 1e-9 are the same float32
    assert np.float32(scores[0, 1]) == np.float32(scores[0, 2])
    assert (nm.prune_2_4(w, 1, scores=scores) != 0).tolist() == [[True, False, True, False]]
    assert nm.keep_top2(scores, 1).tolist() == [[True, False, True, False]]


def test_violating_fraction_of_an_empty_weight_is_zero():
    assert nm.violating_fraction(np.zeros((0, 4), np.float32), 1) == 0.0


def test_prune_stats_hand_example():
    """What `prune` reports per tensor: groups, groups changed, 2:4 before/after, retained |w|."""
    w = np.array([[1.0, -2.0, 3.0, -4.0], [0.0, 0.0, 5.0, 6.0]], np.float32)
    out = nm.prune_2_4(w, 1)
    assert nm.prune_stats(w, out, 1) == nm.PruneStats(2, 1, False, True, pytest.approx(18 / 21))
    assert nm.prune_stats(w, w, -1) == nm.PruneStats(2, 0, False, False, 1.0)  # not pruned: still not 2:4
    assert nm.prune_stats(out, out, 1) == nm.PruneStats(2, 0, True, True, 1.0)
    assert nm.prune_stats(w, out, None) == nm.PruneStats(0, 0, False, False, pytest.approx(18 / 21))  # no axis


# --------------------------------------------------------------------------- the kernel against a plain reference


def _reference_prune(w: np.ndarray, axis: int, zero, scores: np.ndarray | None = None) -> np.ndarray:
    """2:4 pruning written out group by group, in plain Python (independent of nm's vectorized kernel).

    Pair (i, j), i < j: j beats i when its score is strictly greater (a tie or a NaN goes to i);
    a member is kept when at most one member beats it; an entry equal to the zero is copied as it is.
    """
    z = np.broadcast_to(np.asarray(zero).astype(w.dtype), w.shape)
    if scores is None:
        s = nm.magnitude_scores(w, zero).astype(np.float64)
    else:
        s = np.where(w == z, -np.inf, scores.astype(np.float64))
    out = w.copy()
    wg, sg, zg, og = (np.moveaxis(a, axis, -1).reshape(-1, 4) for a in (w, s, z, out))
    for g in range(wg.shape[0]):
        for i in range(4):
            beaten = sum(sg[g, j] > sg[g, i] for j in range(i + 1, 4)) + sum(
                not (sg[g, i] > sg[g, j]) for j in range(i)
            )
            if beaten >= 2 and not wg[g, i] == zg[g, i]:
                og[g, i] = zg[g, i]
    return np.moveaxis(og.reshape(np.moveaxis(out, axis, -1).shape), -1, axis)


_wild_elements = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan]),
)


@st.composite
def wild_weights(draw) -> tuple[np.ndarray, int, object]:
    """Like :func:`weights`, plus NaN/inf, float64, a per-row zero point and tensors of many blocks."""
    shape, axis = draw(shapes_and_axis())
    shape = (draw(st.integers(1, 9)),) + shape  # more rows along axis 0: several blocks
    axis = axis + 1 if axis >= 0 else axis
    kind = draw(st.sampled_from(["float32", "float64", "float16", "bfloat16", "int8", "int8-rows"]))
    if kind.startswith("int8"):
        w = draw(arrays(np.int8, shape, elements=st.one_of(st.integers(-128, 127), st.sampled_from([0, 1, 3]))))
        if kind == "int8":
            return w, axis, draw(st.integers(-10, 10))
        zero = draw(arrays(np.int8, (shape[0],) + (1,) * (len(shape) - 1), elements=st.sampled_from([0, 1, 3])))
        return w, axis, zero
    w32 = draw(arrays(np.float32, shape, elements=_wild_elements))
    with np.errstate(over="ignore"):  # large float32 values become inf in float16: wanted
        return w32.astype(ml_dtypes.bfloat16 if kind == "bfloat16" else np.dtype(kind)), axis, 0


@settings(max_examples=300, deadline=None)
@given(case=wild_weights(), block=st.sampled_from([1, 8, 24, 1 << 20]))
def test_prune_matches_the_reference_across_blocks(case, block):
    w, axis, zero = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nm, "BLOCK_ELEMENTS", block)
        out = nm.prune_2_4(w, axis, zero=zero)
    np.testing.assert_array_equal(_bits(out), _bits(_reference_prune(w, axis, zero)))


@settings(max_examples=200, deadline=None)
@given(case=wild_weights(), block=st.sampled_from([1, 8, 1 << 20]), data=st.data())
def test_prune_with_scores_matches_the_reference_across_blocks(case, block, data):
    w, axis, zero = case
    scores = data.draw(arrays(np.float32, w.shape, elements=st.integers(-3, 3).map(float)))  # many ties
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nm, "BLOCK_ELEMENTS", block)
        out = nm.prune_2_4(w, axis, scores=scores, zero=zero)
    np.testing.assert_array_equal(_bits(out), _bits(_reference_prune(w, axis, zero, scores)))


def _same_stats(a: nm.PruneStats, b: nm.PruneStats) -> bool:
    """Field by field, a NaN retained magnitude (a NaN weight) equal to a NaN."""
    ra, rb = a.retained_magnitude, b.retained_magnitude
    counts = (a.groups, a.groups_changed, a.was_2_4, a.is_2_4) == (b.groups, b.groups_changed, b.was_2_4, b.is_2_4)
    return counts and (ra == rb or (np.isnan(ra) and np.isnan(rb)))


@settings(max_examples=300, deadline=None)
@given(case=wild_weights(), block=st.sampled_from([1, 8, 24, 1 << 20]), in_place=st.booleans())
def test_prune_2_4_stats_is_prune_2_4_and_prune_stats_in_one_pass(case, block, in_place):
    w, axis, zero = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nm, "BLOCK_ELEMENTS", block)
        expected = nm.prune_2_4(w, axis, zero=zero)
        expected_stats = nm.prune_stats(w, expected, axis, zero)
        mine = w.copy()
        out, stats = nm.prune_2_4_stats(mine, axis, zero, out=mine if in_place else None)
    np.testing.assert_array_equal(_bits(out), _bits(expected))
    assert (out is mine) == in_place
    if not in_place:
        np.testing.assert_array_equal(_bits(mine), _bits(w))  # the input untouched
    assert _same_stats(stats, expected_stats), (stats, expected_stats)


def test_prune_2_4_stats_hand_example():
    w = np.array([[1.0, -2.0, 3.0, -4.0], [0.0, 0.0, 5.0, 6.0], [-0.0, 7.0, 0.0, 0.0]], np.float32)
    out, stats = nm.prune_2_4_stats(w, 1)
    np.testing.assert_array_equal(
        _bits(out), _bits(np.array([[0, 0, 3, -4], [0, 0, 5, 6], [-0.0, 7, 0, 0]], np.float32))
    )
    assert stats == nm.PruneStats(3, 1, False, True, pytest.approx(25 / 28))
    again, stats = nm.prune_2_4_stats(out, 1, out=out)  # in place, already 2:4: nothing changes
    assert stats == nm.PruneStats(3, 0, True, True, 1.0) and again is out


@pytest.mark.parametrize(
    "out",
    [
        np.empty((4, 4), np.float64),  # dtype
        np.empty((4, 8), np.float32),  # shape
        np.empty((8, 8), np.float32)[::2, ::2],  # not contiguous
        np.zeros((4, 4), np.float32).T.copy(order="F"),  # Fortran order
    ],
    ids=["dtype", "shape", "strided", "fortran"],
)
def test_prune_refuses_an_out_it_cannot_write_in_order(out):
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    with pytest.raises(ValueError, match="out must be"):
        nm.prune_2_4(w, 1, out=out)


def test_prune_refuses_a_read_only_out():
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    out = np.zeros_like(w)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be"):
        nm.prune_2_4(w, 1, out=out)


@settings(max_examples=200, deadline=None)
@given(sa=shapes_and_axis(), data=st.data())
def test_keep_top2_with_nan_and_inf_matches_the_pairwise_rule(sa, data):
    shape, axis = sa
    scores = data.draw(arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0, 2.0, np.inf, -np.inf, np.nan])))
    keep = nm.keep_top2(scores, axis)
    w = np.ones(shape, np.float32)  # nothing is zero: the kept entries are exactly the 2 winners
    np.testing.assert_array_equal(keep, _reference_prune(w, axis, 0, scores) != 0)
