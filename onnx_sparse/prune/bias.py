"""Bias correction after pruning: keep each output's mean on the calibration data.

With ``y = W x + b`` and the pruned ``y' = W' x + b'``, choosing ``b' = b + (W - W') E[x]``
makes ``E[y'] = E[y]`` exactly, where ``E[x]`` is the mean input over the calibration rows
(``RunningStats.mean``). The weights keep their 2:4 pattern; only the bias changes.

For a convolution, ``x`` is the im2col row of the layer (so that zero padding is
accounted for): pass one matrix and one mean per group
(:func:`onnx_sparse.core.hessian.conv_weight_to_matrix` and a ``RunningStats`` per group of
:func:`onnx_sparse.core.hessian.im2col`); the output channels of the groups are concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["bias_shift", "bias_correction"]

Array = npt.NDArray


def bias_shift(w_dense: npt.ArrayLike, w_sparse: npt.ArrayLike, mean_x: npt.ArrayLike) -> Array:
    """``(W - W') @ E[x]`` in float64 for one matrix ``[rows, cols]`` and ``E[x]`` of shape ``[cols]``."""
    a = np.asarray(w_dense, dtype=np.float64)
    b = np.asarray(w_sparse, dtype=np.float64)
    m = np.asarray(mean_x, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"dense weight {a.shape} and sparse weight {b.shape} must be equal-shaped matrices")
    if m.shape != (a.shape[1],):
        raise ValueError(f"mean_x has shape {m.shape}; a weight {a.shape} needs ({a.shape[1]},)")
    return (a - b) @ m


def bias_correction(
    w_dense: npt.ArrayLike | Sequence[npt.ArrayLike],
    w_sparse: npt.ArrayLike | Sequence[npt.ArrayLike],
    mean_x: npt.ArrayLike | Sequence[npt.ArrayLike],
    bias: npt.ArrayLike | None = None,
) -> Array:
    """New bias ``b + (W - W') @ E[x]`` that keeps the mean output on the calibration data.

    Args:
        w_dense: Dense weight ``[rows, cols]``, or a list (or tuple) of per-group conv matrices.
        w_sparse: Pruned weight of the same shape, or a list of the same shapes.
        mean_x: ``E[x]`` ``[cols]``, or a list with one mean per group.
        bias: Current bias ``[rows]`` (``[K]`` for a conv: all groups); None means zero.

    Returns:
        A new bias: dtype of ``bias``, or of the dense weight when there is none.
    """
    if not isinstance(w_dense, (list, tuple)):
        shifts = [bias_shift(w_dense, w_sparse, mean_x)]
        dtype = np.asarray(w_dense).dtype
    else:
        dense, sparse, means = list(w_dense), list(w_sparse), list(mean_x)  # type: ignore[arg-type]
        if not dense or not len(dense) == len(sparse) == len(means):
            raise ValueError(
                f"per-group lists must be non-empty and equally long: {len(dense)} dense, "
                f"{len(sparse)} sparse, {len(means)} means"
            )
        shifts = [bias_shift(d, s, m) for d, s, m in zip(dense, sparse, means, strict=True)]
        dtype = np.asarray(dense[0]).dtype
    shift = np.concatenate(shifts)
    if bias is None:
        return shift.astype(np.float32 if dtype.kind in "biu" else dtype)
    b = np.asarray(bias)
    if b.shape != shift.shape:
        raise ValueError(f"bias has shape {b.shape}; the weight has {shift.shape[0]} outputs")
    return (b.astype(np.float64) + shift).astype(b.dtype)
