"""How close two outputs are (numpy only): the one definition compare, the sensitivity ranking, the
``--target-cosine`` search and the INT8 fidelity search all judge outputs by.

An output may hold inf or NaN on purpose (masked logits: ``-inf`` where a class or position is
masked). An element both models give as the same inf, or as NaN, is agreement and leaves the
figures; an element inf or NaN in one model and not the same in the other is a mismatch, which
makes the pair as far apart as the figure goes (cosine -1, relative L2 inf). The figures are
taken over the elements finite in both.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["cosine", "rel_l2", "finite_pair"]


def finite_pair(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """``a`` and ``b`` flattened in float64, reduced to the elements finite in both, and how many
    elements are inf or NaN in one and not the same in the other (0 when both are all finite: then
    the arrays are returned whole, no element dropped)."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    fx, fy = np.isfinite(x), np.isfinite(y)
    if fx.all() and fy.all():
        return x, y, 0
    both = fx & fy
    same = ~fx & ~fy & ((x == y) | (np.isnan(x) & np.isnan(y)))
    return x[both], y[both], int(np.count_nonzero(~both & ~same))


def cosine(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Cosine of ``a`` and ``b`` flattened, in float64; 1 when both are zero, 0 when only one is; -1 when
    an element is inf or NaN in one and not the same in the other (module docstring)."""
    x, y, mismatched = finite_pair(a, b)
    if mismatched:
        return -1.0
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0 and ny == 0:
        return 1.0
    if nx == 0 or ny == 0:
        return 0.0
    return float(x @ y / (nx * ny))


def rel_l2(reference: npt.ArrayLike, candidate: npt.ArrayLike) -> float:
    """``||candidate - reference|| / ||reference||`` over the elements finite in both; 0 when both are
    zero, inf when only the reference is, or when an element's finiteness differs (module docstring)."""
    x, y, mismatched = finite_pair(reference, candidate)
    if mismatched:
        return math.inf
    n = float(np.linalg.norm(x))
    d = float(np.linalg.norm(y - x))
    return d / n if n else (0.0 if d == 0 else math.inf)
