"""The one place that decides where a tensor's bytes are and whether they may be read.

Every read of tensor data goes through :func:`external_ref` (external data) or
:func:`check_inline` (data inside the protobuf), so every command and the Python API refuse
the same things with the same one-line error naming the tensor:

* a location that is absolute, or that resolves (symlinks followed) outside the model's
  folder, or that is not a regular file (the onnx CVE-2024-27318 class: a model must not
  make us read, and copy into an output, a file it does not own); a symlink that stays
  inside the folder is followed like any path;
* an ``offset`` or ``length`` that is not a plain non-negative decimal integer, a range past
  the end of the file, or a ``length`` other than what dtype x shape needs;
* a negative dimension; element counts are Python integers, so absurd shapes never wrap;
* inline ``raw_data`` whose size is not what dtype x shape needs.

Nothing here allocates the tensor: the checks use sizes only.

The check is of the file that is read, not only of its path: :func:`external_ref` records the
version of the regular file it found inside the folder (device, inode, size, modification
and change times: a file put in its place differs even where the inode number is reused), and
:func:`open_data` opens the file once, then checks the opened file (``fstat``: the same
version, still regular; on Linux also where the kernel says the opened file is) before a byte
is read. A link or file swapped in between the check and the read is refused.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto

from onnx_sparse.errors import OnnxSparseError

__all__ = [
    "ExternalRef",
    "element_count",
    "stored_nbytes",
    "tensor_dtype",
    "external_ref",
    "external_location",
    "open_data",
    "opened_path",
    "file_identity",
    "file_version",
    "check_inline",
    "check_tensor",
    "PACKED_4BIT",
]

# 4-bit types are stored two elements per byte; numpy (ml_dtypes) holds one per byte.
PACKED_4BIT = frozenset(
    getattr(TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, name)
)

_DECIMAL = re.compile(r"[0-9]{1,20}")
_HINT_FOREIGN = "external data must be a regular file inside the model's folder; copy the data beside the model"


@dataclass(frozen=True)
class ExternalRef:
    """Where an external tensor's bytes are: ``length`` bytes of ``file`` from ``offset``.

    ``version`` is :func:`file_version` of the regular file the checks found inside the
    model's folder (``root``); :func:`open_data` reads only from that file, unchanged.
    """

    file: Path
    offset: int
    length: int
    version: tuple[int, ...]
    root: Path


def file_identity(st: os.stat_result) -> tuple[int, int]:
    """A file's identity: (device, inode), the same for every path and link to it."""
    return (st.st_dev, st.st_ino)


def file_version(st: os.stat_result) -> tuple[int, ...]:
    """A file's identity and state: (device, inode, size, mtime, ctime in ns). Another file put in
    its place differs even when it reuses the inode number; so does the file once changed."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _label(t: TensorProto) -> str:
    return f"tensor {t.name!r}"


def tensor_dtype(t: TensorProto) -> np.dtype:
    """The numpy dtype of a tensor (ml_dtypes types for bfloat16 and float8)."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, ValueError, TypeError) as exc:
        name = TensorProto.DataType.Name(t.data_type) if t.data_type in TensorProto.DataType.values() else t.data_type
        raise OnnxSparseError(f"{_label(t)}: unsupported data type {name}") from exc


def element_count(t: TensorProto) -> int:
    """The number of elements dtype x shape declares (a Python int: never overflows).

    Raises:
        OnnxSparseError: a dimension is negative.
    """
    count = 1
    for d in t.dims:
        if d < 0:
            raise OnnxSparseError(
                f"{_label(t)}: negative dimension {d} in shape {list(t.dims)}",
                hint="the model file is corrupt or was written by a broken exporter",
            )
        count *= int(d)
    return count


def stored_nbytes(t: TensorProto) -> int:
    """Bytes the tensor's data takes when stored raw (4-bit types packed two per byte)."""
    count = element_count(t)
    if t.data_type in PACKED_4BIT:
        return (count + 1) // 2
    return count * tensor_dtype(t).itemsize


def external_location(t: TensorProto) -> str | None:
    """The ``location`` entry of ``t``'s external data (None if it has none)."""
    return next((e.value for e in t.external_data if e.key == "location"), None)


def _parse_int(t: TensorProto, key: str, value: str, location: str) -> int:
    if not _DECIMAL.fullmatch(value):
        raise OnnxSparseError(
            f"{_label(t)}: external data {location!r} has {key} {value!r}, not a non-negative integer",
            hint="the model file is corrupt or hand-edited",
        )
    return int(value)


def _is_under(root: Path, file: Path) -> bool:
    return file != root and root in file.parents


def _inside(base: Path, location: str, t: TensorProto) -> tuple[Path, Path, os.stat_result]:
    """``base/location`` resolved (with the resolved ``base`` and the file's status), refused
    unless it is a regular file inside ``base``."""
    if not location or "\0" in location:
        raise OnnxSparseError(f"{_label(t)}: external data has an empty or invalid location {location!r}")
    if os.path.isabs(location) or Path(location).drive or location.startswith(("/", "\\")):
        raise OnnxSparseError(
            f"{_label(t)}: external data location {location!r} is an absolute path", hint=_HINT_FOREIGN
        )
    root = Path(os.path.realpath(base))
    file = Path(os.path.realpath(root / location))
    if not _is_under(root, file):
        raise OnnxSparseError(
            f"{_label(t)}: external data location {location!r} points outside the model's folder", hint=_HINT_FOREIGN
        )
    try:
        st = file.stat(follow_symlinks=False)  # resolved: a link here now was swapped in after realpath
    except OSError:
        raise OnnxSparseError(
            f"{_label(t)}: external data file {root / location} is missing",
            hint="copy the model's .data file next to the .onnx file",
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise OnnxSparseError(
            f"{_label(t)}: external data location {location!r} is not a regular file", hint=_HINT_FOREIGN
        )
    return file, root, st


def external_ref(t: TensorProto, base_dir: Path | None) -> ExternalRef:
    """Resolve and check the external data of ``t`` (see the module docstring for the rules).

    Raises:
        OnnxSparseError: with the tensor and the location, for anything the rules refuse.
    """
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location")
    if location is None:
        raise OnnxSparseError(f"{_label(t)}: external data without a location")
    if base_dir is None:
        raise OnnxSparseError(
            f"{_label(t)} refers to external data {location!r} but the model was not loaded from a file",
            hint="load the model with onnx_sparse.io.load_model(path)",
        )
    file, root, st = _inside(base_dir, location, t)
    offset = _parse_int(t, "offset", info.get("offset", "0"), location)
    nbytes = stored_nbytes(t)
    length = _parse_int(t, "length", info["length"], location) if "length" in info else nbytes
    if length != nbytes:
        raise OnnxSparseError(
            f"{_label(t)}: external data {location!r} has length {length} but dtype x shape "
            f"{list(t.dims)} needs {nbytes} bytes",
            hint="the model file is corrupt or hand-edited",
        )
    ref = ExternalRef(file, offset, nbytes, file_version(st), root)
    _check_size(ref, st.st_size, t.name)
    return ref


def _check_size(ref: ExternalRef, size: int, tensor: str) -> None:
    if ref.offset + ref.length > size:
        raise OnnxSparseError(
            f"tensor {tensor!r}: external data file {ref.file} is too short "
            f"(needs {ref.offset + ref.length} bytes from offset {ref.offset}, has {size})",
            hint="the data file may be truncated",
        )


def opened_path(fd: int) -> Path | None:
    """Where the kernel says the file open on ``fd`` is (Linux ``/proc``), or None elsewhere."""
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return Path(where) if where.startswith("/") else None


def open_data(ref: ExternalRef, tensor: str = "") -> BinaryIO:
    """Open the data file of ``ref`` once and check the opened file before anything is read.

    The opened file must be the regular file the checks of :func:`external_ref` found, unchanged
    (:func:`file_version`), and (where the kernel says, on Linux) inside the model's folder. A
    path swapped for a link or another file in between is refused.

    Raises:
        OnnxSparseError: the file changed between the check and the read.
    """
    changed = OnnxSparseError(
        f"tensor {tensor!r}: external data file {ref.file} changed between its check and the read "
        "(replaced, or swapped for a link)",
        hint="do not modify a model's files while onnx-sparse reads them",
    )
    try:  # O_NONBLOCK: a FIFO swapped in must not hang the open (no effect on regular files)
        fd = os.open(ref.file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError:
        raise changed from None
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or file_version(st) != ref.version:
            raise changed
        where = opened_path(fd)
        if where is not None and not _is_under(ref.root, where):
            raise changed
        _check_size(ref, st.st_size, tensor)
    except BaseException:
        f.close()
        raise
    return f


def check_inline(t: TensorProto) -> None:
    """Refuse an inline tensor whose stored data cannot hold dtype x shape.

    Checks the dims (non-negative) and, where the data is ``raw_data``, its exact size.
    Typed fields (``float_data`` ...) are checked when they are read.
    """
    count = element_count(t)
    if not t.raw_data:
        return
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        raise OnnxSparseError(
            f"{_label(t)}: a {TensorProto.DataType.Name(t.data_type)} tensor cannot hold raw_data",
            hint="the model file is corrupt",
        )
    try:
        nbytes = stored_nbytes(t)
    except OnnxSparseError:
        return  # an unsupported dtype is reported where the tensor is used
    if len(t.raw_data) != nbytes:
        raise OnnxSparseError(
            f"{_label(t)}: raw_data holds {len(t.raw_data)} bytes but dtype x shape {list(t.dims)} "
            f"({count} elements) needs {nbytes}",
            hint="the model file is corrupt or truncated",
        )


def check_tensor(t: TensorProto, base_dir: Path | None) -> ExternalRef | None:
    """Every rule above for one tensor of a model being loaded (data type known to onnx,
    external data inside the model's folder and consistent, inline data the right size);
    returns where an external tensor's bytes are (None for inline data)."""
    if t.data_type not in TensorProto.DataType.values():
        raise OnnxSparseError(f"{_label(t)}: unknown data type {t.data_type}", hint="the model file is corrupt")
    if t.data_location == TensorProto.EXTERNAL:
        return external_ref(t, base_dir)
    check_inline(t)
    return None
