"""Wanda 2:4 pruning: weight magnitude times input activation norm (Sun et al., 2023).

For a weight matrix ``W[rows, cols]`` (groups of 4 along ``cols``, the reduction axis) and
calibration activations ``X[n, cols]``, the score of ``W[i, j]`` is ``|W[i, j]| * ||X[:, j]||_2``
and each group of 4 keeps its 2 best scores. The kept weights are not changed.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from onnx_sparse.core import nm

__all__ = ["wanda_scores", "wanda_2_4"]

Array = npt.NDArray


def wanda_scores(w: Array, col_norm: npt.ArrayLike) -> Array:
    """``|W_ij| * ||X_j||_2`` in float64, shape of ``w``.

    Args:
        w: Weight matrix ``[rows, cols]``.
        col_norm: Per-column activation norm ``[cols]`` (``RunningStats.col_norm``).

    Raises:
        ValueError: On a shape mismatch or a negative or non-finite norm.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a weight matrix [rows, cols], got shape {w.shape}")
    norm = np.asarray(col_norm, dtype=np.float64)
    if norm.shape != (w.shape[1],):
        raise ValueError(f"col_norm has shape {norm.shape}; the weight {w.shape} needs ({w.shape[1]},)")
    if not np.all(np.isfinite(norm)) or np.any(norm < 0):
        raise ValueError("col_norm must be finite and non-negative")
    return nm.magnitude_scores(w).astype(np.float64) * norm[None, :]


def wanda_2_4(w: Array, col_norm: npt.ArrayLike) -> Array:
    """Prune ``w`` to 2:4 along ``cols``, keeping the 2 best Wanda scores of each group of 4.

    Ties (e.g. equal norms and equal magnitudes, or a column that never fired) go to the
    lower column index, as in :func:`onnx_sparse.core.nm.keep_top2`. Entries already zero
    are never kept in place of a non-zero one.

    Args:
        w: Weight matrix ``[rows, cols]``, ``cols % 4 == 0``; not modified.
        col_norm: Per-column activation norm ``[cols]``.

    Returns:
        A new array of ``w``'s dtype and shape.
    """
    return nm.prune_2_4(w, 1, scores=wanda_scores(w, col_norm))
