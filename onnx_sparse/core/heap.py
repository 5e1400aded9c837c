"""Give the C heap's free pages back to the system.

glibc's malloc keeps what is freed in its arenas for reuse; after a phase that allocated and
freed a lot (a capture stage's activations, onnx.checker's copies of an inline model) those
pages stay in the resident set and are counted again under the next phase's own allocations.
:func:`trim_heap` returns them (``malloc_trim``; a no-op where the C library has none).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

__all__ = ["trim_heap"]

_malloc_trim: Any = None


def trim_heap() -> None:
    """Give the free pages of the C heap back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). Never fails."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                _malloc_trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                pass
    if _malloc_trim:
        _malloc_trim(0)
