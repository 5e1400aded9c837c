"""Asymmetric SparseGPT with the joint INT8 walk: the refit of :func:`~onnx_sparse.prune.select.asymmetric_cv_2_4`
(damping chosen by cross-validation) followed by :func:`~onnx_sparse.prune.sparsegpt.prune_with_factor`
with ``int8=True``, so the pruned layer's kept weights come out on their INT8 grids and the rounding
error was compensated by the walk.

The cross-validation scores the dense refit exactly as the FP32 prune does (the choice of the damping
does not depend on the quantization); only the final walk differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_sparse.core import blas
from onnx_sparse.core.hessian import PairedStats
from onnx_sparse.prune.select import DEFAULT_REFIT_GRID, SELECT_BUDGET, RefitCV, choose_refit_damp
from onnx_sparse.prune.sparsegpt import SparseGPTStats, _refit, inverse_factor, prune_with_factor

__all__ = ["asymmetric_cv_int8"]


def asymmetric_cv_int8(
    w: np.ndarray,
    folds: Sequence[PairedStats],
    blocksize: int = 128,
    damp: float = 0.01,
    rest: PairedStats | None = None,
    grid: Sequence[float] = DEFAULT_REFIT_GRID,
    col_scale: np.ndarray | None = None,
) -> tuple[np.ndarray, SparseGPTStats, RefitCV]:
    """:func:`~onnx_sparse.prune.select.asymmetric_cv_2_4` with the joint INT8 walk (``rest`` is consumed the same way;
    ``col_scale``: see :func:`~onnx_sparse.prune.sparsegpt.prune_with_factor`).

    Returns:
        ``(new weight in w's dtype, SparseGPT stats with the per-row scales, cross-validation outcome)``.
    """
    used = [f for f in folds if f.n > 0]
    if rest is None:
        every = PairedStats.total(used)
    else:
        every = rest
        for f in used:
            every.add_(f)
    factor = blas.Background(inverse_factor, every.pp, w.shape[1], damp)
    cv = choose_refit_damp(
        w, used, grid, blocksize=blocksize, damp=damp, total=every, budget=SELECT_BUDGET if rest is None else None
    )
    refit = _refit(w.astype(np.float64), every.pp, every.pq, cv.damp)
    out, stats = prune_with_factor(refit, factor.result(), blocksize, int8=True, col_scale=col_scale)
    return out.astype(w.dtype), stats, cv
