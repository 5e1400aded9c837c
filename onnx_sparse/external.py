"""The one place that decides where a tensor's bytes are and whether they may be read.

Every read of tensor data goes through :func:`external_ref` (external data) or
:func:`check_inline` (data inside the protobuf), so every command and the Python API refuse
the same things with the same one-line error naming the tensor:

* a location that is absolute, or that resolves (symlinks followed) outside the model's
  folder, or that is not a regular file (the onnx CVE-2024-27318 class: a model must not
  make us read, and copy into an output, a file it does not own);
* an ``offset`` or ``length`` that is not a plain non-negative decimal integer, a range past
  the end of the file, or a ``length`` other than what dtype x shape needs;
* a negative dimension; element counts are Python integers, so absurd shapes never wrap;
* inline ``raw_data`` whose size is not what dtype x shape needs.

Nothing here allocates the tensor: the checks use sizes only.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

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
    """Where an external tensor's bytes are: ``length`` bytes of ``file`` from ``offset``."""

    file: Path
    offset: int
    length: int


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


def _inside(base: Path, location: str, t: TensorProto) -> Path:
    """``base/location`` resolved, refused unless it is a regular file inside ``base``."""
    if not location or "\0" in location:
        raise OnnxSparseError(f"{_label(t)}: external data has an empty or invalid location {location!r}")
    if os.path.isabs(location) or Path(location).drive or location.startswith(("/", "\\")):
        raise OnnxSparseError(
            f"{_label(t)}: external data location {location!r} is an absolute path", hint=_HINT_FOREIGN
        )
    root = Path(os.path.realpath(base))
    file = Path(os.path.realpath(root / location))
    if file == root or root not in file.parents:
        raise OnnxSparseError(
            f"{_label(t)}: external data location {location!r} points outside the model's folder", hint=_HINT_FOREIGN
        )
    try:
        st = file.stat()
    except OSError:
        raise OnnxSparseError(
            f"{_label(t)}: external data file {root / location} is missing",
            hint="copy the model's .data file next to the .onnx file",
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise OnnxSparseError(
            f"{_label(t)}: external data location {location!r} is not a regular file", hint=_HINT_FOREIGN
        )
    return file


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
    file = _inside(base_dir, location, t)
    offset = _parse_int(t, "offset", info.get("offset", "0"), location)
    nbytes = stored_nbytes(t)
    length = _parse_int(t, "length", info["length"], location) if "length" in info else nbytes
    if length != nbytes:
        raise OnnxSparseError(
            f"{_label(t)}: external data {location!r} has length {length} but dtype x shape "
            f"{list(t.dims)} needs {nbytes} bytes",
            hint="the model file is corrupt or hand-edited",
        )
    size = file.stat().st_size
    if offset + nbytes > size:
        raise OnnxSparseError(
            f"{_label(t)}: external data file {file} is too short "
            f"(needs {offset + nbytes} bytes from offset {offset}, has {size})",
            hint="the data file may be truncated",
        )
    return ExternalRef(file, offset, nbytes)


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


def check_tensor(t: TensorProto, base_dir: Path | None) -> None:
    """Every rule above for one tensor of a model being loaded (data type known to onnx,
    external data inside the model's folder and consistent, inline data the right size)."""
    if t.data_type not in TensorProto.DataType.values():
        raise OnnxSparseError(f"{_label(t)}: unknown data type {t.data_type}", hint="the model file is corrupt")
    if t.data_location == TensorProto.EXTERNAL:
        external_ref(t, base_dir)
    else:
        check_inline(t)
