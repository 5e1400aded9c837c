"""Keep captured activations in memory up to a budget, beyond it in memory-mapped files.

The staged capture (:mod:`onnx_sparse.calib.capture`) holds a *frontier* of activations for
the whole calibration set between stages: for an encoder that is one residual stream, but a
detector fed hundreds of large images can need many GB. :class:`Spill` keeps arrays in memory
while their total stays under a budget and writes the rest to memory-mapped files, so a large
calibration set costs disk and page cache rather than failing for memory. A spilled array's
pages leave this process's resident set once written (they come back from the page cache, or
the file, when the next capture stage reads them).

The files are anonymous: each is created in a private temporary folder, mapped, and unlinked
at once (the mapping stays valid until the array is dropped), so nothing is left on disk even
if the process is killed. The folder is the system's temporary folder (``TMPDIR``) unless
``ONNX_SPARSE_SPILL_DIR`` names another.

Budget: ``ONNX_SPARSE_SPILL_MB`` (megabytes) if set, else a quarter of the memory available
when the run starts (``MemAvailable`` on Linux; 2 GiB where that cannot be read), at most
:data:`MAX_BUDGET`: the frontier is held while a layer's statistics are gathered and solved,
and for a wide layer those alone are GBs (``asym`` at 8,192 inputs: four 512 MB matrices), so
memory in use stays the weights plus a fixed amount rather than growing with the machine.

:func:`trim_heap` (from :mod:`onnx_sparse.core.heap`) gives the C heap's free pages back to the system between stages.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading

import numpy as np

from onnx_sparse.core.heap import trim_heap

__all__ = ["Spill", "default_budget", "trim_heap", "MAX_BUDGET"]

logger = logging.getLogger(__name__)

_FALLBACK = 2 << 30
#: Most bytes of activations the default budget keeps in memory (see the module docstring).
MAX_BUDGET = 256 << 20


def default_budget() -> int:
    """Bytes of activations kept in memory before spilling (see the module docstring)."""
    env = os.environ.get("ONNX_SPARSE_SPILL_MB", "").strip()
    if env:
        try:
            return max(0, int(float(env) * (1 << 20)))
        except ValueError:
            logger.warning("ONNX_SPARSE_SPILL_MB=%r is not a number; using the default", env)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(MAX_BUDGET, int(line.split()[1]) * 1024 // 4)
    except (OSError, ValueError, IndexError):
        pass
    return min(MAX_BUDGET, _FALLBACK)


class Spill:
    """Where captured arrays live: memory up to ``budget`` bytes, then memory-mapped files.

    Args:
        budget: Bytes kept in memory (None: :func:`default_budget`).

    Attributes:
        in_memory: Bytes currently held in memory through :meth:`keep`.
        spilled: Bytes written to files so far (cumulative).
    """

    def __init__(self, budget: int | None = None) -> None:
        self.budget = default_budget() if budget is None else max(0, int(budget))
        self.in_memory = 0
        self.spilled = 0
        self._dir: str | None = None
        self._warned = False
        self._lock = threading.Lock()  # the pruned and the dense model's captures run in threads of their own

    def keep(self, value: np.ndarray) -> np.ndarray:
        """``value`` itself while the budget allows, else a read-only memory-mapped copy of it."""
        with self._lock:
            if value.dtype.hasobject or self.in_memory + value.nbytes <= self.budget or value.nbytes == 0:
                self.in_memory += value.nbytes
                return value
        return self._to_file(value)

    def release(self, value: np.ndarray) -> None:
        """Forget ``value``'s bytes (it was dropped by the caller)."""
        if not isinstance(value, np.memmap):
            with self._lock:
                self.in_memory = max(0, self.in_memory - value.nbytes)

    def _to_file(self, value: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._spill(value)

    def _spill(self, value: np.ndarray) -> np.ndarray:
        if self._dir is None or not os.path.isdir(self._dir):
            base = os.environ.get("ONNX_SPARSE_SPILL_DIR") or None
            self._dir = tempfile.mkdtemp(prefix="onnx-sparse-spill-", dir=base)
        if not self._warned:
            logger.info(
                "captured activations exceed %.0f MB: spilling the rest to memory-mapped files in %s "
                "(ONNX_SPARSE_SPILL_MB sets the budget)",
                self.budget / 1e6,
                self._dir,
            )
            self._warned = True
        fd, path = tempfile.mkstemp(suffix=".act", dir=self._dir)
        try:
            # written with write(2), not through a mapping: the kernel copies the bytes into the page
            # cache without a page fault per 4 KB of this process (rec's best recipe: ~0.5M faults)
            _write_all(fd, np.ascontiguousarray(value))
            mapped = np.memmap(path, dtype=value.dtype, mode="r", shape=value.shape)
        finally:
            os.close(fd)
            os.unlink(path)  # anonymous from now on: the mapping keeps the pages
        # never touched through the mapping: none of its pages is in this process until it is read
        self.spilled += value.nbytes
        return mapped

    def close(self) -> None:
        """Remove the private folder (its files are already unlinked)."""
        if self._dir is not None:
            try:
                os.rmdir(self._dir)
            except OSError:
                pass
            self._dir = None


def _write_all(fd: int, value: np.ndarray) -> None:
    """Write a C-contiguous array's bytes to ``fd`` (write(2) may take fewer bytes than asked)."""
    view = value.reshape(-1).view(np.uint8).data if value.size else memoryview(b"")
    while len(view):
        view = view[os.write(fd, view) :]
