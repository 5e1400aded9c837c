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
    "prune_2_4_stats",
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


def _members(g: Array, axis: int) -> list[Array]:
    """The 4 members of every group of the grouped view ``g`` (views, each with the group axis removed)."""
    return [_member(g, axis, i) for i in range(GROUP_SIZE)]


# The six pairs (i, j), i < j, of a group's members, in the order the kernels compare them.
_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _top2_member(beats: list[Array], i: int, count: Array, out: Array) -> Array:
    """``out`` = "member ``i`` is among the 2 highest of its group", from the six pairwise results.

    ``beats[k]`` (uint8 0/1) says member j beats member i for pair ``_PAIRS[k] == (i, j)``; a tie
    (or a NaN) goes to the lower index. A member is kept when at most one other member beats it
    (its rank is below 2); ``count`` is scratch of the same shape (uint8).
    """
    b01, b02, b03, b12, b13, b23 = beats
    if i == 0:  # beaten by 1, 2, 3: b01 + b02 + b03 <= 1
        np.add(b01, b02, out=count)
        count += b03
        return np.less(count, 2, out=out)
    if i == 1:  # beaten by 0 (1 - b01), 2 (b12), 3 (b13): at most one
        np.add(b12, b13, out=count)
        return np.less_equal(count, b01, out=out)
    if i == 2:  # beaten by 0 (1 - b02), 1 (1 - b12), 3 (b23): at most one
        np.add(b02, b12, out=count)
        return np.less(b23, count, out=out)
    # beaten by 0, 1, 2 (3 - b03 - b13 - b23): at most one
    np.add(b03, b13, out=count)
    count += b23
    return np.greater_equal(count, 2, out=out)


def _beats(members: list[Array], cmp: list[Array]) -> list[Array]:
    """The six pairwise comparisons of a group's score members (into ``cmp``), as uint8 views."""
    return [np.greater(members[j], members[i], out=cmp[k]).view(np.uint8) for k, (i, j) in enumerate(_PAIRS)]


def keep_top2(scores: Array, axis: int) -> Array:
    """Boolean mask (shape of ``scores``) that keeps the 2 highest scores in each group of 4.

    Ties go to the lower index, so the result is deterministic. Implemented with the six
    pairwise comparisons of a group, vectorized over all groups (no sort, no Python loop
    over groups).
    """
    axis = check_axis(scores.shape, axis)
    members = _members(grouped(scores, axis), axis)
    shape = members[0].shape
    beats = _beats(members, [np.empty(shape, dtype=bool) for _ in _PAIRS])
    count = np.empty(shape, dtype=np.uint8)
    keep = np.empty(grouped(scores, axis).shape, dtype=bool)
    for i, kept in enumerate(_members(keep, axis)):
        _top2_member(beats, i, count, kept)
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


def prune_2_4(
    w: Array, axis: int, scores: Array | None = None, zero: Array | float | int = 0, *, out: Array | None = None
) -> Array:
    """Prune ``w`` to 2:4 along ``axis``: keep the 2 best ``scores`` (default ``|w - zero|``) per group.

    Entries that are already zero never count as kept at the cost of a non-zero one, so a
    tensor that already follows 2:4 comes back bit-identical. Works block by block (see
    :data:`BLOCK_ELEMENTS`), so scratch memory stays small for any tensor size.

    Args:
        out: where to write the result (a writable C-contiguous array of ``w``'s shape and
            dtype; it may be ``w`` itself, which is then pruned in place). Default: a new array.
    """
    return _prune(w, axis, scores, zero, out, None)


def prune_2_4_stats(
    w: Array, axis: int, zero: Array | float | int = 0, *, out: Array | None = None
) -> tuple[Array, PruneStats]:
    """:func:`prune_2_4` by magnitude and :func:`prune_stats` of the result, in one pass over ``w``.

    The statistics are the same as ``prune_stats(w, result, axis, zero)``; "is 2:4" is counted on
    the written result itself. With ``out=w`` the weight is pruned in place (the statistics of
    the original are taken block by block before each block is overwritten).
    """
    tally = _Tally()
    result = _prune(w, axis, None, zero, out, tally)
    return result, tally.stats(w.size)


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
    for sl in blocks(original.shape, axis, BLOCK_ELEMENTS):
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


_ABS_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class _Tally:
    """What :func:`prune_stats` reports, gathered block by block while pruning."""

    def __init__(self) -> None:
        self.total = self.kept = 0.0
        self.changed = 0
        self.was = self.now = True

    def stats(self, size: int) -> PruneStats:
        total = self.total
        return PruneStats(size // GROUP_SIZE, self.changed, self.was, self.now, self.kept / total if total else 1.0)


def _magnitude_into(w: Array, zero: Array, out: Array) -> Array:
    """``out[...] = magnitude_scores(w, zero)``, without a temporary for the common float dtypes."""
    if w.dtype in _ABS_DTYPES and not np.any(zero != 0):
        return np.abs(w, out=out)
    out[...] = magnitude_scores(w, zero)
    return out


def _prune(
    w: Array, axis: int, scores: Array | None, zero: Array | float | int, out: Array | None, tally: _Tally | None
) -> Array:
    """The one 2:4 kernel behind :func:`prune_2_4` and :func:`prune_2_4_stats`.

    Per block of whole groups: the scores, the six pairwise comparisons of each group, and for
    each member its keep mask, turned into an all-ones/all-zeros bit mask that selects ``w`` or
    the zero (exact for every dtype, ``-0.0`` kept). All scratch is allocated once for the first
    (largest) block and reused, so the kernel touches little fresh memory.
    """
    axis = check_axis(w.shape, axis)
    if out is None:
        out = np.empty(w.shape, dtype=w.dtype)
    elif out.shape != w.shape or out.dtype != w.dtype or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous {w.dtype}{w.shape} array")
    assert tally is None or scores is None, "statistics are gathered for magnitude pruning only"
    z = _zero_like(w, zero)
    bits = np.dtype(f"u{w.dtype.itemsize}")
    score_dtype = np.dtype(np.float64 if scores is not None or w.dtype == np.float64 else np.float32)
    score_bits = np.dtype(f"u{score_dtype.itemsize}")
    zeros = _zero_view(w, zero)
    z_is_zero_bits = not np.any(z.view(bits) != 0)
    buf: dict[str, Array] = {}
    for sl in blocks(w.shape, axis, BLOCK_ELEMENTS):
        wb, ob = w[sl], out[sl]
        if not wb.size:
            continue
        if not buf:  # the first block is the largest
            n, m = wb.size, wb.size // GROUP_SIZE
            buf = {"s": np.empty(n, score_dtype), "count": np.empty(m, np.uint8), "keep": np.empty(m, bool),
                   "zero": np.empty(m, bool), "mask": np.empty(m, bits), "all": np.empty(m, bool),
                   "zeros": np.empty(m, np.uint8), "cmp": np.empty((len(_PAIRS), m), bool)}  # fmt: skip
            if score_bits != bits:
                buf["smask"] = np.empty(m, score_bits)
        s = buf["s"][: wb.size].reshape(wb.shape)
        zb = z if z.ndim == 0 else np.ascontiguousarray(zeros[sl])
        if scores is None:
            _magnitude_into(wb, zb, s)
        else:  # an entry that is already zero must never push out a non-zero one
            np.copyto(s, scores[sl], casting="unsafe")
            np.copyto(s, -np.inf, where=wb == zb)
        if tally is not None:
            tally.total += float(s.sum(dtype=np.float64))
        ms = _members(grouped(s, axis), axis)
        mw = _members(grouped(wb, axis), axis)
        mo = _members(grouped(ob, axis), axis)
        mz = [zb] * GROUP_SIZE if z.ndim == 0 else _members(grouped(zb, axis), axis)
        shape, m = ms[0].shape, ms[0].size

        v = {name: a[:m].reshape(shape) for name, a in buf.items() if name not in ("s", "cmp")}
        beats = _beats(ms, [c[:m].reshape(shape) for c in buf["cmp"]])
        count, keep, is_zero, mask = v["count"], v["keep"], v["zero"], v["mask"]
        for i in range(GROUP_SIZE):
            _top2_member(beats, i, count, keep)
            if scores is None:
                np.equal(ms[i], 0, out=is_zero)  # |w - zero| == 0 exactly when w == zero
            else:
                np.equal(mw[i], mz[i], out=is_zero)
            keep |= is_zero  # an entry equal to the zero is copied as it is (-0.0 stays -0.0)
            np.negative(keep.view(np.uint8), out=mask, dtype=bits)  # 1 -> all ones, 0 -> 0
            if tally is not None:  # from the original, before ``ob`` (possibly ``wb``) is written
                if i == 0:
                    np.copyto(v["all"], keep)
                    np.copyto(v["zeros"], is_zero.view(np.uint8))
                else:
                    np.logical_and(v["all"], keep, out=v["all"])
                    np.add(v["zeros"], is_zero.view(np.uint8), out=v["zeros"])
                smask = (
                    mask if score_bits == bits else np.negative(keep.view(np.uint8), out=v["smask"], dtype=score_bits)
                )
                sb = ms[i].view(score_bits)
                np.bitwise_and(sb, smask, out=sb)  # the kept magnitudes, 0 where dropped
            np.bitwise_and(mw[i].view(bits), mask, out=mo[i].view(bits))
            if not z_is_zero_bits:
                np.invert(mask, out=mask)
                mask &= mz[i].view(bits)
                ob_bits = mo[i].view(bits)
                np.bitwise_or(ob_bits, mask, out=ob_bits)
        if tally is not None:
            tally.kept += float(s.sum(dtype=np.float64))
            tally.changed += m - int(np.count_nonzero(v["all"]))
            tally.was = tally.was and not np.any(v["zeros"] < KEEP)  # fewer than 2 zeros: over 2 non-zero
            # 2:4 counted on what was written, not on the masks.
            nonzero = v["count"]
            for i in range(GROUP_SIZE):
                np.not_equal(mo[i], mz[i], out=is_zero)
                if i == 0:
                    np.copyto(nonzero, is_zero.view(np.uint8))
                else:
                    np.add(nonzero, is_zero.view(np.uint8), out=nonzero)
            tally.now = tally.now and not np.any(nonzero > KEEP)
    return out
