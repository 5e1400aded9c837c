"""2:4 structured-sparsity math on numpy arrays (no graph, I/O or logging).

Every mask, check and statistic in onnx-sparse goes through this module. A weight is
viewed in groups of ``GROUP_SIZE`` consecutive entries along one axis (the reduction
axis, decided once in :mod:`onnx_sparse.graph.locate`); the 2:4 pattern holds when
each group has at most ``KEEP`` entries that differ from the tensor's zero value.

The "zero" of a tensor is 0 for float tensors and the zero point for quantized
tensors stored behind DequantizeLinear, so that a pruned entry dequantizes to exactly 0.
It may be a scalar or an array that broadcasts against the tensor.

Nothing here modifies its inputs: weights may be shared by several graph copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "GROUP_SIZE",
    "KEEP",
    "BLOCK_ELEMENTS",
    "blocks",
    "PruneStats",
    "prune_stats",
    "check_axis",
    "grouped",
    "keep_top2",
    "magnitude_scores",
    "nonzero_per_group",
    "is_2_4",
    "violating_fraction",
    "apply_keep",
    "prune_2_4",
    "retained_magnitude",
]

GROUP_SIZE = 4
KEEP = 2
# Large tensors are processed in blocks of about this many elements along axis 0: the
# scratch arrays stay small (memory stays near the size of the weights themselves) and
# cache-friendly. Blocks never cut a group of 4.
BLOCK_ELEMENTS = 1 << 20

Array = npt.NDArray


def check_axis(shape: tuple[int, ...], axis: int) -> int:
    """Return ``axis`` normalised to ``[0, ndim)``; raise ValueError if it cannot hold groups of 4."""
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for shape {tuple(shape)}")
    axis %= ndim
    if shape[axis] % GROUP_SIZE:
        raise ValueError(f"axis {axis} of shape {tuple(shape)} has length {shape[axis]}, not a multiple of 4")
    return axis


def grouped(a: Array, axis: int) -> Array:
    """View ``a`` with ``axis`` split into ``(n_groups, 4)``; the group members are on axis ``axis + 1``.

    For a C-contiguous array this is a view (no copy), whatever the axis.
    """
    axis = check_axis(a.shape, axis)
    shape = a.shape[:axis] + (a.shape[axis] // GROUP_SIZE, GROUP_SIZE) + a.shape[axis + 1 :]
    return np.ascontiguousarray(a).reshape(shape)


def blocks(
    shape: tuple[int, ...], axis: int | None = None, elements: int = BLOCK_ELEMENTS
) -> Iterator[tuple[slice, ...]]:
    """Index tuples that split ``shape`` along axis 0 into blocks of about ``elements``.

    When the groups of 4 run along axis 0 (``axis == 0``), each block holds whole groups.
    """
    if not shape:
        yield ()
        return
    row = int(np.prod(shape[1:], dtype=np.int64)) or 1
    step = max(1, elements // row)
    if axis is not None and axis % len(shape) == 0:
        step = max(GROUP_SIZE, step - step % GROUP_SIZE)
    for start in range(0, shape[0], step):
        yield (slice(start, start + step),)


def _zero_view(w: Array, zero: Array | float | int) -> Array:
    return np.broadcast_to(_zero_like(w, zero), w.shape)


def _member(g: Array, axis: int, i: int) -> Array:
    return g[(slice(None),) * (axis + 1) + (i,)]


def keep_top2(scores: Array, axis: int) -> Array:
    """Boolean mask (shape of ``scores``) that keeps the 2 highest scores in each group of 4.

    Ties go to the lower index, so the result is deterministic. Implemented with the six
    pairwise comparisons of a group, vectorized over all groups (no sort, no Python loop
    over groups).
    """
    axis = check_axis(scores.shape, axis)
    g = grouped(scores, axis)
    members = [_member(g, axis, i) for i in range(GROUP_SIZE)]
    rank = [np.zeros(members[0].shape, dtype=np.uint8) for _ in range(GROUP_SIZE)]
    for i in range(GROUP_SIZE):
        for j in range(i + 1, GROUP_SIZE):
            # The lower index i outranks j on a tie.
            j_wins = members[j] > members[i]
            rank[i] += j_wins
            rank[j] += ~j_wins
    keep = np.stack([r < KEEP for r in rank], axis=axis + 1)
    return keep.reshape(scores.shape)


def magnitude_scores(w: Array, zero: Array | float | int = 0) -> Array:
    """``|w - zero|`` as float32 (float64 for float64 input), for any float, bfloat16, fp8 or int dtype."""
    if np.issubdtype(w.dtype, np.integer):
        return np.abs(w.astype(np.int32) - np.asarray(zero, dtype=np.int32)).astype(np.float32)
    out_dtype = np.float64 if w.dtype == np.float64 else np.float32
    if np.any(np.asarray(zero) != 0):
        return np.abs(w.astype(out_dtype) - np.asarray(zero).astype(out_dtype))
    return np.abs(w).astype(out_dtype, copy=False)


def _zero_like(w: Array, zero: Array | float | int) -> Array:
    return np.asarray(zero).astype(w.dtype)


def nonzero_per_group(w: Array, axis: int, zero: Array | float | int = 0) -> Array:
    """Number of entries different from ``zero`` in each group of 4 (group axis removed)."""
    axis = check_axis(w.shape, axis)
    nz = w != _zero_like(w, zero)
    return grouped(nz, axis).sum(axis=axis + 1, dtype=np.uint8)


def is_2_4(w: Array, axis: int, zero: Array | float | int = 0) -> bool:
    """True when every group of 4 along ``axis`` holds at most 2 entries different from ``zero``."""
    return bool(np.all(nonzero_per_group(w, axis, zero) <= KEEP))


def violating_fraction(w: Array, axis: int, zero: Array | float | int = 0) -> float:
    """Share of groups of 4 along ``axis`` with more than 2 entries different from ``zero``."""
    counts = nonzero_per_group(w, axis, zero)
    return float(np.mean(counts > KEEP)) if counts.size else 0.0


def apply_keep(w: Array, keep: Array, zero: Array | float | int = 0) -> Array:
    """New array: ``w`` where ``keep`` (or where ``w`` already equals ``zero``), else ``zero``.

    Entries already equal to zero are copied as they are (``-0.0`` stays ``-0.0``), so
    applying a mask to an already pruned tensor reproduces it bit for bit. Works on the
    bit patterns (an AND with an all-ones/all-zeros mask), which is several times faster
    than ``np.where`` on large tensors and exact for every dtype.
    """
    z = _zero_like(w, zero)
    bits = np.dtype(f"u{w.dtype.itemsize}")
    m = (keep | (w == z)).astype(bits)
    np.negative(m, out=m)  # 1 -> all ones, 0 -> 0
    out = np.ascontiguousarray(w).view(bits) & m
    if np.any(z.view(bits) != 0):
        out |= np.broadcast_to(z, w.shape).view(bits) & ~m
    return out.view(w.dtype)


def prune_2_4(w: Array, axis: int, scores: Array | None = None, zero: Array | float | int = 0) -> Array:
    """Prune ``w`` to 2:4 along ``axis``: keep the 2 best ``scores`` (default ``|w - zero|``) per group.

    Entries that are already zero never count as kept at the cost of a non-zero one, so a
    tensor that already follows 2:4 comes back bit-identical. Works block by block (see
    :data:`BLOCK_ELEMENTS`), so scratch memory stays small for any tensor size.
    """
    axis = check_axis(w.shape, axis)
    out = np.empty_like(w)
    zeros = _zero_view(w, zero)
    for sl in blocks(w.shape, axis):
        wb, zb = w[sl], zeros[sl]
        if scores is None:
            sb = magnitude_scores(wb, zb)
        else:
            # An entry that is already zero must never push out a non-zero one.
            sb = np.where(wb == zb, -np.inf, scores[sl].astype(np.float64))
        out[sl] = apply_keep(wb, keep_top2(sb, axis), zb)
    return out


def retained_magnitude(original: Array, pruned: Array, zero: Array | float | int = 0) -> float:
    """Sum of kept ``|w|`` over sum of ``|w|`` (1.0 for an all-zero tensor)."""
    return prune_stats(original, pruned, None, zero).retained_magnitude


@dataclass(frozen=True)
class PruneStats:
    """What pruning did to one tensor (see :func:`prune_stats`)."""

    groups: int
    groups_changed: int
    was_2_4: bool
    is_2_4: bool
    retained_magnitude: float


def prune_stats(original: Array, pruned: Array, axis: int | None, zero: Array | float | int = 0) -> PruneStats:
    """Compare a tensor before and after pruning, block by block, in one pass.

    ``groups_changed`` counts groups with any bit changed; ``was_2_4`` / ``is_2_4`` tell
    whether the pattern held before / holds after (None ``axis``: group figures are 0/False).
    """
    assert original.shape == pruned.shape and original.dtype == pruned.dtype
    bits = np.dtype(f"u{original.dtype.itemsize}")
    zeros = _zero_view(original, zero)
    total = kept = 0.0
    changed = 0
    was = now = axis is not None
    for sl in blocks(original.shape, axis):
        ob, pb, zb = original[sl], pruned[sl], zeros[sl]
        total += float(magnitude_scores(ob, zb).sum(dtype=np.float64))
        kept += float(magnitude_scores(pb, zb).sum(dtype=np.float64))
        if axis is None:
            continue
        differs = np.ascontiguousarray(pb).view(bits) != np.ascontiguousarray(ob).view(bits)
        changed += int(grouped(differs, axis).any(axis=axis % ob.ndim + 1).sum())
        was = was and bool(np.all(nonzero_per_group(ob, axis, zb) <= KEEP))
        now = now and bool(np.all(nonzero_per_group(pb, axis, zb) <= KEEP))
    groups = original.size // GROUP_SIZE if axis is not None else 0
    return PruneStats(groups, changed, was, now, kept / total if total else 1.0)
