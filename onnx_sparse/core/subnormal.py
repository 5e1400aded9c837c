"""Float32 subnormals flushed to zero: the one rule for the weights this package writes.

A float32 subnormal (magnitude below 1.18e-38, exponent bits all zero, mantissa not) costs a
microcode assist in every multiply that reads it on x86 CPUs unless the thread runs with
flush-to-zero/denormals-are-zero, which onnxruntime does not by default: a 480x480 1x1
convolution holding 2,880 of them ran 16x slower in a calibration capture. Its contribution to
any product is below 1.2e-38 times the other factor, so a weight this package writes stores a
zero of the same sign instead (what the CPU's own flush-to-zero gives).

The rule is applied to values, never through the CPU's control register: setting FTZ/DAZ in a
thread (onnxruntime's ``session.set_denormal_as_zero`` does so in the thread that creates the
session, and leaves it set) would change every later numpy result in that thread.
"""

from __future__ import annotations

import numpy as np

__all__ = ["subnormal_mask", "count_subnormals", "flush_subnormals"]

_MAGNITUDE = np.uint32(0x7FFFFFFF)
_SIGN = np.uint32(0x80000000)
_SMALLEST_NORMAL_BITS = np.uint32(0x00800000)


def subnormal_mask(a: np.ndarray) -> np.ndarray:
    """Where the float32 array ``a`` holds a subnormal (by its bits: no float arithmetic)."""
    assert a.dtype == np.float32, a.dtype
    magnitude = np.asarray(np.asarray(a).view(np.uint32) & _MAGNITUDE)
    return np.asarray((magnitude != 0) & (magnitude < _SMALLEST_NORMAL_BITS))


def count_subnormals(a: np.ndarray) -> int:
    """How many float32 subnormals ``a`` holds (0 for any other dtype)."""
    if a.dtype != np.float32 or not a.size:
        return 0
    return int(np.count_nonzero(subnormal_mask(a)))


def flush_subnormals(a: np.ndarray) -> np.ndarray:
    """``a`` with every float32 subnormal replaced by a zero of the same sign.

    Every other bit pattern (normal numbers, +-0, +-inf, NaNs with their payloads) is kept as it
    is. ``a`` itself is returned when it holds no subnormal or is not float32 (float16, bfloat16,
    integers: left alone); otherwise a new array (``a`` is never modified).
    """
    if a.dtype != np.float32 or not a.size:
        return a
    mask = subnormal_mask(a)
    if not mask.any():
        return a
    out = np.array(a, copy=True)
    bits = out.view(np.uint32)
    bits[mask] &= _SIGN
    return out
