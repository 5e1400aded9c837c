"""Arrays set aside on disk while a step that does not read them runs, then read back whole.

A wide layer's solve holds several ``cols^2`` float64 matrices (0.54 GB each at 8,192 inputs),
not all of them needed at every moment: ``asym``'s total statistics, for instance, are read to
prepare the cross-validation and again by the final refit, but not while the damping is chosen.
:class:`Parked` writes such an array to an anonymous file and lets go of it; :meth:`Parked.take`
reads the same bytes back into a new array. What is parked costs disk and page cache, not this
process's resident set.

The file is created in ``ONNX_SPARSE_SPILL_DIR`` or the system's temporary folder and unlinked
at once (as the capture's spilled activations are, :mod:`onnx_sparse.calib.spill`): nothing is
left on disk even if the process is killed, and its space is returned when it is read back.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np

__all__ = ["Parked"]


class Parked:
    """One array's bytes in an unlinked temporary file until :meth:`take` reads them back.

    The caller drops its own references to the array after parking it (that is what frees the
    memory); this object holds only the file.
    """

    def __init__(self, value: np.ndarray) -> None:
        data = np.ascontiguousarray(value)
        self.dtype = data.dtype
        self.shape = data.shape
        self.nbytes = data.nbytes
        folder = os.environ.get("ONNX_SPARSE_SPILL_DIR") or None
        fd, path = tempfile.mkstemp(prefix="onnx-sparse-parked-", dir=folder)
        os.unlink(path)
        self._file: io.FileIO | None = io.FileIO(fd, "r+", closefd=True)
        try:
            view = data.reshape(-1).view(np.uint8).data
            done = 0
            while done < len(view):
                done += self._file.write(view[done:]) or 0
        except BaseException:
            self._file.close()
            self._file = None
            raise

    def take(self) -> np.ndarray:
        """The parked array (a new one, the same bytes); the file is closed and its space returned.
        Only once."""
        if self._file is None:
            raise RuntimeError("this array was already taken back")
        out = np.empty(self.shape, dtype=self.dtype)
        view = out.reshape(-1).view(np.uint8).data
        try:
            self._file.seek(0)
            done = 0
            while done < len(view):
                n = self._file.readinto(view[done:])
                if not n:
                    raise OSError(f"parked array: read {done} of {len(view)} bytes back")
                done += n
        finally:
            self._file.close()
            self._file = None
        return out
