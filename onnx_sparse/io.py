"""Reading and writing ONNX models: external data, large models, atomic output.

Models are loaded without their external data; tensor values are read on demand
(:func:`read_tensor`, memory-mapped for external data) and replaced one by one
(:func:`write_tensor`), so a model larger than 2 GB is never held in memory twice.
:func:`save_model` writes into a temporary folder beside the output, verifies the result
(``onnx.checker`` and an onnxruntime session) and only then moves it into place; on any
error nothing is left behind. Tensors that were external stay external (in one data file
named after the output), tensors that were inline stay inline, and nothing else in the
model is touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from onnx_sparse.errors import OnnxSparseError, first_line

__all__ = [
    "ModelFile",
    "load_model",
    "iter_tensors",
    "tensor_dtype",
    "read_tensor",
    "write_tensor",
    "save_model",
    "verify_model",
    "finalize_inline",
]

logger = logging.getLogger(__name__)

_PROTOBUF_LIMIT = 2**31 - 1
_ALIGN = 4096
_COPY_CHUNK = 64 << 20


@dataclass
class ModelFile:
    """A model and the folder its external data paths are relative to (None: all inline).

    New values for external tensors are kept aside (``pending``) until :func:`save_model`
    streams them into the output's data file, so a large model's weights are never copied
    into the protobuf.
    """

    model: onnx.ModelProto
    base_dir: Path | None = None
    path: Path | None = None
    pending: dict[int, tuple[TensorProto, np.ndarray]] = field(default_factory=dict, repr=False)

    def read(self, t: TensorProto, mmap: bool = True) -> np.ndarray:
        """The current value of ``t`` (a pending new value, or what is stored)."""
        if id(t) in self.pending:
            return self.pending[id(t)][1]
        return read_tensor(t, self.base_dir, mmap=mmap)

    def write(self, t: TensorProto, value: np.ndarray) -> None:
        """Replace the value of ``t``: inline tensors at once, external ones at save time."""
        _check_value(t, value)
        if t.data_location == TensorProto.EXTERNAL:
            value = np.ascontiguousarray(value)
            value.flags.writeable = False
            self.pending[id(t)] = (t, value)
        else:
            write_tensor(t, value)

    def flush_pending(self) -> None:
        """Move pending values into the protobuf (as inline data marked "was external")."""
        for t, value in self.pending.values():
            write_tensor(t, value)
        self.pending.clear()


def load_model(path: str | os.PathLike[str]) -> ModelFile:
    """Load ``path`` without its external data, checking that every external file is there.

    Raises:
        OnnxSparseError: not a file, not an ONNX model, truncated, or missing external data.
    """
    p = Path(path)
    if not p.exists():
        raise OnnxSparseError(f"{p}: no such file", hint="check the model path")
    if not p.is_file():
        raise OnnxSparseError(f"{p}: not a file", hint="pass the .onnx file, not a folder")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise OnnxSparseError(
            f"{p}: not a valid ONNX model ({type(exc).__name__}: {exc})".replace("\n", " "),
            hint="the file may be truncated or not an ONNX protobuf",
        ) from exc
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise OnnxSparseError(
            f"{p}: not a valid ONNX model (no IR version or no graph)",
            hint="the file may be truncated or not an ONNX protobuf",
        )
    mf = ModelFile(model=model, base_dir=p.resolve().parent, path=p)
    for t in iter_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            _external_range(t, mf.base_dir)  # raises on missing or short files
    return mf


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto holding data: initializers and tensor attributes, in all graphs,
    subgraphs and model-local functions."""

    def from_nodes(nodes) -> Iterator[TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for g in attr.graphs:
                    yield from from_graph(g)

    def from_graph(graph: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from graph.initializer
        for sp in graph.sparse_initializer:
            yield sp.values
        yield from from_nodes(graph.node)

    yield from from_graph(model.graph)
    for fn in model.functions:
        yield from from_nodes(fn.node)


def tensor_dtype(t: TensorProto) -> np.dtype:
    """The numpy dtype of a tensor (ml_dtypes types for bfloat16 and float8)."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, ValueError, TypeError) as exc:
        name = TensorProto.DataType.Name(t.data_type) if t.data_type in TensorProto.DataType.values() else t.data_type
        raise OnnxSparseError(f"tensor {t.name!r}: unsupported data type {name}") from exc


def _shape(t: TensorProto) -> tuple[int, ...]:
    return tuple(int(d) for d in t.dims)


# 4-bit types are stored two elements per byte; numpy (ml_dtypes) holds one per byte.
_PACKED_4BIT = frozenset(
    getattr(TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, name)
)


def _nbytes(t: TensorProto) -> int:
    count = int(np.prod(_shape(t), dtype=np.int64))
    return (count + 1) // 2 if t.data_type in _PACKED_4BIT else count * tensor_dtype(t).itemsize


def _external_range(t: TensorProto, base_dir: Path | None) -> tuple[Path, int, int]:
    info = {e.key: e.value for e in t.external_data}
    if "location" not in info:
        raise OnnxSparseError(f"tensor {t.name!r}: external data without a location")
    if base_dir is None:
        raise OnnxSparseError(
            f"tensor {t.name!r} refers to external data {info['location']!r} but the model was not loaded from a file",
            hint="load the model with onnx_sparse.io.load_model(path)",
        )
    file = base_dir / info["location"]
    offset = int(info.get("offset", 0))
    nbytes = _nbytes(t)
    length = int(info.get("length", nbytes))
    if not file.is_file():
        raise OnnxSparseError(
            f"tensor {t.name!r}: external data file {file} is missing",
            hint="copy the model's .data file next to the .onnx file",
        )
    size = file.stat().st_size
    if offset + length > size or length < nbytes:
        raise OnnxSparseError(
            f"tensor {t.name!r}: external data file {file} is too short (needs {offset + nbytes} bytes, has {size})",
            hint="the data file may be truncated",
        )
    return file, offset, nbytes


def read_tensor(t: TensorProto, base_dir: Path | None = None, mmap: bool = True) -> np.ndarray:
    """The value of ``t`` as a read-only numpy array (memory-mapped when external and ``mmap``)."""
    dtype = tensor_dtype(t)
    shape = _shape(t)
    if t.data_type in _PACKED_4BIT:
        return _read_packed(t, base_dir)
    if t.data_location == TensorProto.EXTERNAL:
        file, offset, nbytes = _external_range(t, base_dir)
        count = nbytes // dtype.itemsize
        arr: np.ndarray
        if mmap and count:
            arr = np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=(count,))
        else:
            arr = np.fromfile(file, dtype=dtype, count=count, offset=offset)
            arr.flags.writeable = False
        return arr.reshape(shape)
    if t.raw_data:
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(shape)
    arr = numpy_helper.to_array(t)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    arr.flags.writeable = False
    return arr


def _read_packed(t: TensorProto, base_dir: Path | None) -> np.ndarray:
    """A 4-bit tensor, unpacked by onnx (one element per byte)."""
    if t.data_location == TensorProto.EXTERNAL:
        file, offset, nbytes = _external_range(t, base_dir)
        inline = TensorProto()
        inline.CopyFrom(t)
        inline.ClearField("external_data")
        inline.data_location = TensorProto.DEFAULT
        inline.raw_data = np.fromfile(file, dtype=np.uint8, count=nbytes, offset=offset).tobytes()
        t = inline
    arr = numpy_helper.to_array(t)
    arr.flags.writeable = False
    return arr


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def write_tensor(t: TensorProto, value: np.ndarray) -> None:
    """Replace the data of ``t`` with ``value`` (same shape and dtype), stored as raw bytes.

    A tensor that was external keeps its ``external_data`` entries as a marker, so
    :func:`save_model` writes it to the new data file; :func:`finalize_inline` turns it
    into a plain inline tensor for in-memory use.
    """
    _check_value(t, value)
    for name in _TYPED_FIELDS:
        t.ClearField(name)
    if t.data_type in _PACKED_4BIT:
        t.raw_data = numpy_helper.from_array(np.ascontiguousarray(value)).raw_data  # packs two per byte
    else:
        t.raw_data = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
    if t.data_location == TensorProto.EXTERNAL:
        t.data_location = TensorProto.DEFAULT


def _check_value(t: TensorProto, value: np.ndarray) -> None:
    if value.shape != _shape(t):
        raise ValueError(f"tensor {t.name!r}: new value has shape {value.shape}, expected {_shape(t)}")
    if value.dtype != tensor_dtype(t):
        raise ValueError(f"tensor {t.name!r}: new value has dtype {value.dtype}, expected {tensor_dtype(t)}")


def _is_pending_external(t: TensorProto) -> bool:
    return t.data_location != TensorProto.EXTERNAL and len(t.external_data) > 0


def finalize_inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the "was external" markers left by :func:`write_tensor` (in-memory use only)."""
    for t in iter_tensors(model):
        if _is_pending_external(t):
            t.ClearField("external_data")
    return model


def _uses_external(model: onnx.ModelProto) -> bool:
    return any(len(t.external_data) > 0 for t in iter_tensors(model))


def _copy_range(src: Path, offset: int, length: int, dst) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise OnnxSparseError(f"external data file {src} ended early")
            dst.write(chunk)
            left -= len(chunk)


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("external_data")
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key = key
        entry.value = value
    t.data_location = TensorProto.EXTERNAL


def _write_external(mf: ModelFile, folder: Path, data_name: str, externalize_all: bool) -> None:
    model = mf.model
    with open(folder / data_name, "wb") as out:
        for t in iter_tensors(model):
            pos = out.tell()
            if pos % _ALIGN:
                out.write(b"\0" * (_ALIGN - pos % _ALIGN))
                pos = out.tell()
            if id(t) in mf.pending:
                value = mf.pending[id(t)][1]
                out.write(value.view(np.uint8).reshape(-1).data)
                _set_external(t, data_name, pos, value.nbytes)
            elif t.data_location == TensorProto.EXTERNAL:
                src, offset, nbytes = _external_range(t, mf.base_dir)
                _copy_range(src, offset, nbytes, out)
                _set_external(t, data_name, pos, nbytes)
            elif _is_pending_external(t) or (externalize_all and len(t.raw_data) >= 1024):
                if not t.raw_data:
                    t.raw_data = read_tensor(t).tobytes()
                    for name in _TYPED_FIELDS:
                        t.ClearField(name)
                data = t.raw_data
                out.write(data)
                t.ClearField("raw_data")
                _set_external(t, data_name, pos, len(data))


def save_model(
    mf: ModelFile,
    path: str | os.PathLike[str],
    *,
    external: bool | None = None,
    verify: bool = True,
    reference: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``mf`` to ``path`` atomically (temporary folder beside it, verify, then rename).

    Args:
        mf: the model; after saving, its external data entries point at the new file.
        path: output .onnx path. External data (if any) goes to ``<name>.data`` beside it.
        external: force external data on/off; default: external if the model had external
            data or is too large for one protobuf (2 GB).
        verify: run ``onnx.checker`` and open an onnxruntime session on the output first.
        reference: the input model, used to tell whether onnxruntime failing on the output is
            our doing (it is not if onnxruntime cannot load the input either).

    Raises:
        OnnxSparseError: the output could not be written or did not verify.
    """
    out = Path(path)
    folder = out.resolve().parent
    if not folder.is_dir():
        raise OnnxSparseError(f"{out}: output folder does not exist")
    if external is None:
        external = _uses_external(mf.model) or mf.model.ByteSize() > _PROTOBUF_LIMIT - (64 << 20)
    data_name = out.name + ".data"
    if external and _reads_from(mf, folder / data_name) and not (mf.path and Path(mf.path).resolve() == out.resolve()):
        # Replacing it would leave the input model pointing at the output's data.
        raise OnnxSparseError(
            f"{out}: its data file {folder / data_name} is the input model's external data file",
            hint="write the output under another name or into another folder",
        )
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-sparse-", dir=folder))
    try:
        if external:
            _write_external(mf, tmp, data_name, externalize_all=not _uses_external(mf.model))
            mf.pending.clear()
        else:
            mf.flush_pending()
            for t in iter_tensors(mf.model):
                if t.data_location == TensorProto.EXTERNAL:
                    write_tensor(t, np.array(read_tensor(t, mf.base_dir, mmap=False)))
            finalize_inline(mf.model)
        with open(tmp / out.name, "wb") as f:
            f.write(mf.model.SerializeToString())
        if external:
            mf.base_dir = folder  # entries now name data_name, which lands in folder
        if verify:
            verify_model(tmp / out.name, reference=reference)
        if external:
            os.replace(tmp / data_name, folder / data_name)
        os.replace(tmp / out.name, out)
        mf.path = out
    except OSError as exc:
        raise OnnxSparseError(f"{out}: could not write the model ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.debug("wrote %s%s", out, f" (+ {data_name})" if external else "")
    return out


def _reads_from(mf: ModelFile, file: Path) -> bool:
    """Whether any external tensor of ``mf`` is stored in ``file``."""
    if mf.base_dir is None:
        return False
    target = file.resolve()
    for t in iter_tensors(mf.model):
        if t.data_location == TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            if location is not None and (mf.base_dir / location).resolve() == target:
                return True
    return False


def verify_model(path: str | os.PathLike[str], reference: str | os.PathLike[str] | None = None) -> None:
    """Check ``path`` with ``onnx.checker`` and open it in onnxruntime (CPU).

    If onnxruntime cannot open ``reference`` either (e.g. custom operators), the onnxruntime
    failure is logged as a warning instead of raised.

    Raises:
        OnnxSparseError: the model does not pass the checker or onnxruntime rejects it.
    """
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise OnnxSparseError(
            f"output does not pass onnx.checker: {str(exc).splitlines()[0]}",
            hint="this is a bug in onnx-sparse; please report it with the model",
        ) from exc
    error = _ort_open_error(path)
    if error is None:
        return
    if reference is not None and _ort_open_error(reference) is not None:
        logger.warning("onnxruntime cannot open the input model either (%s); skipped that check", error)
        return
    raise OnnxSparseError(
        f"onnxruntime cannot open the output: {error}",
        hint="this is a bug in onnx-sparse; please report it with the model",
    )


def _ort_open_error(path: str | os.PathLike[str]) -> str | None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    # Opening is the check; packing weights for fast kernels would only cost time and memory.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        return first_line(exc)
    return None
