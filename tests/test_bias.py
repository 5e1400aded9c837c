"""Tests for onnx_sparse.prune.bias."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_sparse.core import nm
from onnx_sparse.core.hessian import (
    RunningStats,
    conv_output_shape,
    conv_weight_to_matrix,
    im2col,
    matrix_to_conv_weight,
)
from onnx_sparse.prune.bias import bias_correction, bias_shift


def test_fc_mean_output_matches_on_calibration_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)) + rng.uniform(-2, 2, 16)  # non-zero mean inputs
    w = rng.standard_normal((8, 16)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    ws = nm.prune_2_4(w, 1)
    s = RunningStats(16)
    s.update(x)
    b2 = bias_correction(w, ws, s.mean, b)
    assert b2.dtype == np.float32 and b2.shape == (8,)
    dense_mean = (x @ w.astype(np.float64).T + b).mean(axis=0)
    before = (x @ ws.astype(np.float64).T + b).mean(axis=0)
    after = (x @ ws.astype(np.float64).T + b2).mean(axis=0)
    assert np.abs(before - dense_mean).max() > 0.1
    np.testing.assert_allclose(after, dense_mean, rtol=1e-5, atol=1e-5)


def test_exact_in_float64_and_without_bias():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((100, 8)) + 1.0
    w = rng.standard_normal((4, 8))
    ws = nm.prune_2_4(w, 1)
    b2 = bias_correction(w, ws, x.mean(axis=0))
    assert b2.dtype == np.float64
    np.testing.assert_allclose((x @ ws.T + b2).mean(axis=0), (x @ w.T).mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b2, bias_shift(w, ws, x.mean(axis=0)))


def test_no_change_when_weights_equal_or_inputs_centered():
    w = np.arange(8.0, dtype=np.float32).reshape(2, 4)
    b = np.array([1.0, -1.0], dtype=np.float16)
    out = bias_correction(w, w.copy(), np.ones(4), b)
    np.testing.assert_array_equal(out, b)
    assert out.dtype == np.float16 and out is not b
    np.testing.assert_array_equal(bias_correction(w, nm.prune_2_4(w, 1), np.zeros(4), b), b)


def test_conv_per_group_mean_output_matches():
    rng = np.random.default_rng(2)
    group, cg, kg, kernel = 2, 4, 3, (3, 3)
    strides, pads = (1, 2), (1, 1, 0, 1)
    x = rng.standard_normal((3, group * cg, 7, 6)) + 0.5
    w = rng.standard_normal((group * kg, cg) + kernel)
    b = rng.standard_normal(group * kg)

    dense_mats = conv_weight_to_matrix(w, group)
    sparse_mats = [nm.prune_2_4(m, 1) for m in dense_mats]
    cols = im2col(x, kernel, strides, pads, group=group)
    means = []
    for c in cols:
        s = RunningStats(c.shape[1])
        s.update(c)
        means.append(s.mean)
    b2 = bias_correction(dense_mats, sparse_mats, means, b)

    def conv_mean(mats, bias):
        y = np.concatenate([c @ m.T for c, m in zip(cols, mats, strict=True)], axis=1) + bias
        return y.mean(axis=0)

    np.testing.assert_allclose(conv_mean(sparse_mats, b2), conv_mean(dense_mats, b), rtol=1e-12, atol=1e-12)
    # Padding matters: the per-column im2col mean is not the per-channel input mean.
    out = conv_output_shape(x.shape[2:], kernel, strides, pads)
    assert cols[0].shape[0] == 3 * out[0] * out[1]
    ws = matrix_to_conv_weight(sparse_mats, kernel, cg)
    assert nm.is_2_4(ws, 1)


def test_tuple_of_groups_and_length_checks():
    w = np.ones((2, 4))
    out = bias_correction((w, w), (np.zeros((2, 4)), w), (np.ones(4), np.ones(4)))
    np.testing.assert_array_equal(out, [4, 4, 0, 0])
    with pytest.raises(ValueError, match="equally long"):
        bias_correction([w, w], [w], [np.ones(4), np.ones(4)])
    with pytest.raises(ValueError, match="bias has shape"):
        bias_correction(w, w, np.ones(4), np.zeros(3))
    with pytest.raises(ValueError, match="mean_x"):
        bias_correction(w, w, np.ones(3))
    with pytest.raises(ValueError, match="equal-shaped"):
        bias_correction(w, np.ones((2, 8)), np.ones(4))
