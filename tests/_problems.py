"""Small reconstruction problems shared by tests/test_sparsegpt.py and tests/test_select.py."""

from __future__ import annotations

import numpy as np

from onnx_sparse.core.hessian import PairedStats, RunningStats


def correlated(rng: np.random.Generator, n: int, cols: int) -> np.ndarray:
    """Rows with strongly correlated, unevenly scaled columns."""
    mix = rng.standard_normal((cols, cols)) * 0.5 + np.eye(cols)
    return (rng.standard_normal((n, cols)) @ mix) * rng.uniform(0.2, 3.0, cols)


def hessian_of(x: np.ndarray) -> tuple[np.ndarray, RunningStats]:
    s = RunningStats(x.shape[1], track_xtx=True)
    s.update(x)
    return s.hessian(damp=0.0), s


def perturbed_pairs(rng, n, cols, mix, distort, noise=0.3):
    """Dense-model inputs and the pruned model's distorted, noisy version of them."""
    xd = rng.standard_normal((n, cols)) @ mix
    xp = xd @ distort.T + noise * rng.standard_normal((n, cols))
    return xp, xd


def paired(xp, xd, track_dense=True):
    s = PairedStats(xp.shape[1], track_dense=track_dense)
    s.update(xp, xd)
    return s


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
