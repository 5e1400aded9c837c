"""Cosine similarity of two arrays (numpy only): the one definition compare, the sensitivity
ranking and the INT8 fidelity search all judge outputs by."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["cosine"]


def cosine(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Cosine of ``a`` and ``b`` flattened, in float64; 1 when both are zero, 0 when only one is."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0 and ny == 0:
        return 1.0
    if nx == 0 or ny == 0:
        return 0.0
    return float(x @ y / (nx * ny))
