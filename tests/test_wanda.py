"""Tests for onnx_sparse.prune.wanda."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnx_sparse.core import nm
from onnx_sparse.prune.wanda import wanda_2_4, wanda_scores

weights = st.tuples(st.integers(1, 6), st.integers(1, 5)).flatmap(
    lambda rc: arrays(
        np.float32,
        (rc[0], 4 * rc[1]),
        elements=st.floats(-100, 100, width=32, allow_nan=False, allow_subnormal=False),
    )
)


@settings(max_examples=60, deadline=None)
@given(w=weights, norm=st.floats(0.01, 100))
def test_uniform_norms_equal_magnitude(w, norm):
    out = wanda_2_4(w, np.full(w.shape[1], norm))
    np.testing.assert_array_equal(out, nm.prune_2_4(w, 1))


@settings(max_examples=60, deadline=None)
@given(w=weights, seed=st.integers(0, 1000))
def test_result_is_2_4_and_keeps_values(w, seed):
    norm = np.random.default_rng(seed).uniform(0, 3, w.shape[1])
    before = w.copy()
    out = wanda_2_4(w, norm)
    np.testing.assert_array_equal(w, before)  # input untouched
    assert out.dtype == w.dtype and out.shape == w.shape
    assert nm.is_2_4(out, 1)
    kept = out != 0
    np.testing.assert_array_equal(out[kept], w[kept])


def test_scores_are_magnitude_times_norm():
    w = np.array([[1.0, -2.0, 3.0, -4.0]], dtype=np.float32)
    norm = np.array([4.0, 1.0, 0.5, 2.0])
    np.testing.assert_allclose(wanda_scores(w, norm), [[4.0, 2.0, 1.5, 8.0]])


def test_activation_norm_changes_the_choice():
    w = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(wanda_2_4(w, np.ones(4)), [[0, 0, 3, 4]])
    np.testing.assert_array_equal(wanda_2_4(w, [10.0, 1.0, 1.0, 1.0]), [[1, 0, 0, 4]])


def test_ties_go_to_the_lower_index():
    w = np.ones((3, 8), dtype=np.float32)
    out = wanda_2_4(w, np.ones(8))
    np.testing.assert_array_equal(out, np.tile([1, 1, 0, 0], (3, 2)))
    # A column that never fired ties at 0 with the others of its kind.
    dead = wanda_2_4(np.ones((1, 4), np.float32), [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(dead, [[1, 0, 0, 1]])


def test_zero_weight_never_kept_over_a_nonzero_one():
    w = np.array([[0.0, 0.0, 1e-6, 5.0]], dtype=np.float32)
    np.testing.assert_array_equal(wanda_2_4(w, [1e6, 1e6, 1e-3, 1e-3]), w)


def test_already_2_4_is_unchanged():
    w = np.array([[0.0, 3.0, 0.0, -1.0, 2.0, 0.0, 0.0, 7.0]], dtype=np.float16)
    out = wanda_2_4(w, np.arange(1.0, 9.0))
    np.testing.assert_array_equal(out, w)
    assert out.dtype == np.float16


def test_rejects_bad_shapes_and_norms():
    w = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="col_norm"):
        wanda_2_4(w, np.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        wanda_2_4(w, -np.ones(8))
    with pytest.raises(ValueError, match="matrix"):
        wanda_2_4(np.ones(8, np.float32), np.ones(8))
    with pytest.raises(ValueError, match="multiple of 4"):
        wanda_2_4(np.ones((2, 6), np.float32), np.ones(6))
