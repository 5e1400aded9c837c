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

import contextlib
import hashlib
import logging
import mmap as mmap_module
import os
import queue
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from onnx_sparse import atomic
from onnx_sparse.core.heap import trim_heap
from onnx_sparse.errors import OnnxSparseError, first_line
from onnx_sparse.external import (
    PACKED_4BIT,
    ExternalRef,
    check_inline,
    check_tensor,
    external_location,
    external_ref,
    file_identity,
    file_version,
    open_data,
    opened_path,
    stored_nbytes,
    tensor_dtype,
)
from onnx_sparse.guard import output_path
from onnx_sparse.protofields import is_repeated
from onnx_sparse.serialize import Sizes, message_size, write_message

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
    "data_files",
    "data_file_name",
    "clean_orphans",
    "release_pages",
    "model_problem",
    "check_input_model",
]

logger = logging.getLogger(__name__)

_PROTOBUF_LIMIT = 2**31 - 1
_ALIGN = 4096
_COPY_CHUNK = 64 << 20


#: New values of external tensors from this size on wait for the save on disk (:class:`_Scratch`).
SCRATCH_FROM = 64 << 10


class _Scratch:
    """New values of external tensors, on disk until the save: one unlinked temporary file,
    appended to, each value handed back as a read-only memory map of its bytes.

    A prune rewrites every weight of a large model; held in memory until the save, the new
    values would be a second copy of the weights. Here they cost disk and page cache: a mapped
    value's pages stay in the process's resident set once read, until the reader gives them back
    (:meth:`ModelFile.release`: the capture's session copies, the 2:4 checks, the save). The
    file lives in ``ONNX_SPARSE_SPILL_DIR`` or the system's temporary folder, and is unlinked at
    once, so nothing is left behind even when the process is killed.
    """

    def __init__(self) -> None:
        folder = os.environ.get("ONNX_SPARSE_SPILL_DIR") or None
        fd, path = tempfile.mkstemp(prefix="onnx-sparse-values-", dir=folder)
        os.unlink(path)
        self._file = os.fdopen(fd, "w+b")
        self._end = 0
        self._lock = threading.Lock()

    def put(self, value: np.ndarray) -> np.ndarray:
        """``value``'s bytes appended to the file; returns a read-only memory map of them."""
        data = np.ascontiguousarray(value)
        with self._lock:
            pos = self._end + (-self._end % _ALIGN)
            self._end = pos + data.nbytes
        view = memoryview(data.reshape(-1).view(np.uint8).data)
        done = 0
        while done < len(view):
            done += os.pwrite(self._file.fileno(), view[done:], pos + done)
        mapped = np.memmap(self._file, dtype=data.dtype, mode="r", offset=pos, shape=data.shape)
        return mapped


def release_pages(value: np.ndarray) -> None:
    """Drop ``value``'s pages from this process's resident set when it is a memory map of a file
    (they are read again from the file when touched), so streaming a mapped value costs no memory."""
    mm = getattr(value, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap_module, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap_module.MADV_DONTNEED)


@dataclass
class ModelFile:
    """A model and the folder its external data paths are relative to (None: all inline).

    New values for external tensors are kept aside (``pending``) until :func:`save_model`
    streams them into the output's data file, so a large model's weights are never copied
    into the protobuf; values from :data:`SCRATCH_FROM` bytes wait on disk (:class:`_Scratch`),
    so they are not a second copy of the weights in memory either.
    """

    model: onnx.ModelProto
    base_dir: Path | None = None
    path: Path | None = None
    pending: dict[int, tuple[TensorProto, np.ndarray]] = field(default_factory=dict, repr=False)
    #: (device, inode) of the model file that was read (None: not loaded from a file).
    ident: tuple[int, int] | None = None
    #: the data files checked at load, with their :func:`~onnx_sparse.external.file_version`:
    #: a later read must find the same file, unchanged.
    data_ids: dict[Path, tuple[int, ...]] = field(default_factory=dict, repr=False)
    #: where large pending values wait for the save (made on the first one)
    scratch: _Scratch | None = field(default=None, repr=False)

    def read(self, t: TensorProto, mmap: bool = True) -> np.ndarray:
        """The current value of ``t`` (a pending new value, or what is stored)."""
        if id(t) in self.pending:
            return self.pending[id(t)][1]
        return read_tensor(t, self.base_dir, mmap=mmap, pinned=self.data_ids)

    def release(self, t: TensorProto | None) -> None:
        """Give back the resident pages of ``t``'s new value when it waits on disk (read again from
        the file if touched): a reader of many weights (a session copy, a check) calls it after
        each, so the rewritten weights do not pile up in memory before the save."""
        if t is not None and id(t) in self.pending:
            release_pages(self.pending[id(t)][1])

    def ref(self, t: TensorProto) -> ExternalRef:
        """Where the stored bytes of external ``t`` are, checked against what was checked at load."""
        return _pinned_ref(t, self.base_dir, self.data_ids)

    def write(self, t: TensorProto, value: np.ndarray) -> None:
        """Replace the value of ``t``: inline tensors at once, external ones at save time."""
        _check_value(t, value)
        if t.data_location == TensorProto.EXTERNAL:
            value = np.ascontiguousarray(value)
            if value.nbytes >= SCRATCH_FROM:
                if self.scratch is None:
                    self.scratch = _Scratch()
                try:
                    value = self.scratch.put(value)
                except OSError as exc:
                    raise OnnxSparseError(
                        f"cannot keep the new value of {t.name!r} on disk until the save ({exc.strerror or exc})",
                        hint="set ONNX_SPARSE_SPILL_DIR to a folder with free space",
                    ) from exc
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

    The model file is opened once and the opened file is what is checked (a regular file)
    and read; its identity (device, inode) and the identities of its data files are kept in
    the :class:`ModelFile`, and every later read of a data file checks the file it opens
    against them (:func:`onnx_sparse.external.open_data`).

    Raises:
        OnnxSparseError: not a file, not an ONNX model, truncated, or missing external data.
    """
    p = Path(path)
    try:  # O_NONBLOCK: a FIFO named as the model must not hang the open
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise OnnxSparseError(f"{p}: no such file", hint="check the model path") from None
    except IsADirectoryError:
        raise OnnxSparseError(f"{p}: not a file", hint="pass the .onnx file, not a folder") from None
    except OSError as exc:
        raise OnnxSparseError(f"{p}: cannot open ({exc.strerror or exc})", hint="check the model path") from None
    st = os.fstat(fd)  # the opened file is what is checked and read
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OnnxSparseError(f"{p}: not a file", hint="pass the .onnx file, not a folder")
        raise OnnxSparseError(f"{p}: not a regular file", hint="pass the .onnx file itself")
    with os.fdopen(fd, "rb") as f:
        where = opened_path(fd) or Path(os.path.realpath(p))
        try:
            model = onnx.load_model(f, format=_format(p), load_external_data=False)
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
    bad = _non_utf8_field(model, "model")
    if bad is not None:
        raise OnnxSparseError(
            f"{p}: not a valid ONNX model (text field {bad} is not UTF-8)", hint="the file is corrupt"
        )
    mf = ModelFile(model=model, base_dir=where.parent, path=p, ident=file_identity(st))
    for t in iter_tensors(model):
        ref = check_tensor(t, mf.base_dir)  # foreign, missing, short or inconsistent data: one clear error
        if ref is not None:
            mf.data_ids.setdefault(ref.file, ref.version)
    return mf


def _format(path: Path) -> str:
    """onnx's serialization format for ``path``'s extension (what ``onnx.load`` would pick)."""
    return onnx.serialization.registry.get_format_from_file_extension(path.suffix) or "protobuf"


def _non_utf8_field(msg, where: str) -> str | None:
    """The first string field of ``msg`` that protobuf could not decode as UTF-8 (proto2 hands
    those over as bytes, which nothing downstream expects), or None."""
    # Field by field from the descriptor, not ListFields(): that would copy every bytes field
    # (all the raw weight data) into Python objects just to skip it.
    for fd in msg.DESCRIPTOR.fields:
        if fd.type not in (fd.TYPE_STRING, fd.TYPE_MESSAGE):
            continue
        repeated = is_repeated(fd)
        if repeated:
            values = getattr(msg, fd.name)
        elif msg.HasField(fd.name):
            values = [getattr(msg, fd.name)]
        else:
            continue
        for i, v in enumerate(values):
            name = f"{where}.{fd.name}" + (f"[{i}]" if repeated else "")
            if fd.type == fd.TYPE_STRING:
                if isinstance(v, bytes):
                    return name
            else:
                found = _non_utf8_field(v, name)
                if found is not None:
                    return found
    return None


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


def _shape(t: TensorProto) -> tuple[int, ...]:
    return tuple(int(d) for d in t.dims)


def _pinned_ref(t: TensorProto, base_dir: Path | None, pinned: dict[Path, tuple[int, ...]] | None) -> ExternalRef:
    """:func:`external_ref`, and the same file (identity) as when the model was loaded, if known."""
    ref = external_ref(t, base_dir)
    if pinned and pinned.get(ref.file, ref.version) != ref.version:
        raise OnnxSparseError(
            f"tensor {t.name!r}: external data file {ref.file} was replaced after the model was loaded",
            hint="do not modify a model's files while onnx-sparse reads them",
        )
    return ref


def read_tensor(
    t: TensorProto,
    base_dir: Path | None = None,
    mmap: bool = True,
    pinned: dict[Path, tuple[int, ...]] | None = None,
) -> np.ndarray:
    """The value of ``t`` as a read-only numpy array (memory-mapped when external and ``mmap``).

    External data is read from the file :func:`onnx_sparse.external.open_data` opened and
    checked (and, with ``pinned``, the file of that name checked when the model was loaded).
    """
    dtype = tensor_dtype(t)
    shape = _shape(t)
    if t.data_type in PACKED_4BIT:
        return _read_packed(t, base_dir, pinned)
    if t.data_location == TensorProto.EXTERNAL:
        ref = _pinned_ref(t, base_dir, pinned)
        count = ref.length // dtype.itemsize
        arr: np.ndarray
        with open_data(ref, t.name) as f:
            if mmap and count:
                arr = np.memmap(f, dtype=dtype, mode="r", offset=ref.offset, shape=(count,))
            else:
                f.seek(ref.offset)
                arr = np.fromfile(f, dtype=dtype, count=count)
                arr.flags.writeable = False
        return arr.reshape(shape)
    check_inline(t)
    if t.raw_data:
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(shape)
    arr = _typed_to_array(t)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    arr.flags.writeable = False
    return arr


def _read_packed(t: TensorProto, base_dir: Path | None, pinned: dict[Path, tuple[int, ...]] | None) -> np.ndarray:
    """A 4-bit tensor, unpacked by onnx (one element per byte)."""
    if t.data_location == TensorProto.EXTERNAL:
        ref = _pinned_ref(t, base_dir, pinned)
        inline = TensorProto()
        inline.CopyFrom(t)
        inline.ClearField("external_data")
        inline.data_location = TensorProto.DEFAULT
        with open_data(ref, t.name) as f:
            f.seek(ref.offset)
            inline.raw_data = f.read(ref.length)
        t = inline
    else:
        check_inline(t)
    arr = _typed_to_array(t)
    arr.flags.writeable = False
    return arr


def _typed_to_array(t: TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` on an inline tensor, with a corrupt one as a clear error."""
    try:
        return numpy_helper.to_array(t)
    except (ValueError, TypeError) as exc:
        raise OnnxSparseError(
            f"tensor {t.name!r}: its data does not match dtype x shape {list(t.dims)} ({first_line(exc)})",
            hint="the model file is corrupt or truncated",
        ) from exc


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
    if t.data_type in PACKED_4BIT:
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


class _HashingWriter:
    """A binary file that hashes what is written to it (the data file's name is its hash).

    The SHA-256 runs in a second thread, piece by piece in write order, while this thread
    writes the same pieces: hashlib and the file write both release the GIL, so on two
    cores the hash costs no wall time (it is about as fast as the write; blake2b, measured
    on the same machine, is slower than SHA-256 with the CPU's SHA instructions). The pieces
    are views of the data being written, never copies.
    """

    _PIECE = 16 << 20

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=4)  # bounds pieces held for the hash
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hash_pieces, name="onnx-sparse-hash", daemon=True)
        self._thread.start()
        self._closed = False

    def _hash_pieces(self) -> None:
        while (piece := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._hash.update(piece)
                except BaseException as exc:  # re-raised by close()
                    self._error = exc

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self._PIECE):
            piece = view[start : start + self._PIECE]
            self._queue.put(piece)
            self._f.write(piece)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> str:
        """Close the file and return the first 16 hex digits of the SHA-256 of what was written."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
            self._f.close()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()[:16]


def _copy_range(ref: ExternalRef, tensor: str, dst: _HashingWriter) -> None:
    with open_data(ref, tensor) as f:
        f.seek(ref.offset)
        left = ref.length
        while left:
            chunk = f.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise OnnxSparseError(f"external data file {ref.file} ended early (changed while reading?)")
            dst.write(chunk)
            left -= len(chunk)


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("external_data")
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key = key
        entry.value = value
    t.data_location = TensorProto.EXTERNAL


def data_file_name(model_name: str, digest: str) -> str:
    """The name of a saved model's data file: ``<model name>.<content hash>.data``.

    A fresh name per content means a new data file never replaces the one an existing model
    reads, and the same content always gets the same name (pruning twice gives identical files).
    """
    return f"{model_name}.{digest}.data"


def _place_data_file(new: Path, target: Path) -> bool:
    """Move the data file ``new`` to ``target`` unless that name is taken; True when it was moved.

    The name carries 64 bits of the content's SHA-256 (:func:`data_file_name`): a file already
    there under that name holds the same bytes (then it is kept as it is) or is a crafted
    collision (about 2**32 work), a file some other model may read, which is never replaced: the
    bytes are compared, and a different file is an error. The move itself cannot replace a file
    that appears meanwhile (a hard link is refused where the name exists; on a file system without
    hard links, the name is checked just before the rename).
    """
    try:
        os.link(new, target)
        return True
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system
        if not os.path.lexists(target):
            os.replace(new, target)
            return True
    if not _same_bytes(new, target):
        raise OnnxSparseError(
            f"{target}: a different file with this name is already there; it was left as it is "
            "(onnx-sparse names its data files after their content, so this one holds other bytes)",
            hint="move that file away, or write the model under another name",
        )
    return False


def _same_bytes(ours: Path, other: Path) -> bool:
    """True when ``other`` is a regular file (not a link) holding exactly the bytes of ``ours``."""
    try:
        fd = os.open(other, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as b, open(ours, "rb") as a:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != os.fstat(a.fileno()).st_size:
            return False
        while chunk := a.read(_COMPARE_CHUNK):
            if b.read(len(chunk)) != chunk:
                return False
        return not b.read(1)


_COMPARE_CHUNK = 8 << 20


def _our_data_file(model_name: str) -> re.Pattern[str]:
    return re.compile(re.escape(model_name) + r"(\.[0-9a-f]{16})?\.data")


def _write_external(mf: ModelFile, folder: Path, model_name: str, externalize_all: bool) -> str:
    """Write every external (and pending) tensor into one data file in ``folder``; returns its name."""
    model = mf.model
    partial = folder / "data.partial"
    out = _HashingWriter(partial)
    placed: list[tuple[TensorProto, int, int]] = []
    try:
        for t in iter_tensors(model):
            pos = out.tell()
            if pos % _ALIGN:
                out.write(b"\0" * (_ALIGN - pos % _ALIGN))
                pos = out.tell()
            if id(t) in mf.pending:
                value = mf.pending[id(t)][1]
                flat = value.reshape(-1).view(np.uint8)
                for start in range(0, flat.size, _COPY_CHUNK):
                    out.write(flat[start : start + _COPY_CHUNK].data)
                    release_pages(value)  # a value waiting on disk is streamed, never resident whole
                placed.append((t, pos, value.nbytes))
            elif t.data_location == TensorProto.EXTERNAL:
                ref = mf.ref(t)
                _copy_range(ref, t.name, out)
                placed.append((t, pos, ref.length))
            elif _is_pending_external(t) or (externalize_all and len(t.raw_data) >= 1024):
                if not t.raw_data:
                    t.raw_data = read_tensor(t).tobytes()  # typed fields: inline, no file read
                    for name in _TYPED_FIELDS:
                        t.ClearField(name)
                data = t.raw_data
                out.write(data)
                t.ClearField("raw_data")
                placed.append((t, pos, len(data)))
    finally:
        digest = out.close()
    data_name = data_file_name(model_name, digest)
    os.replace(partial, folder / data_name)
    for t, pos, length in placed:
        _set_external(t, data_name, pos, length)
    return data_name


def data_files(mf: ModelFile) -> set[Path]:
    """The resolved external data files ``mf`` reads (each checked by the external-data rules)."""
    return {
        external_ref(t, mf.base_dir).file for t in iter_tensors(mf.model) if t.data_location == TensorProto.EXTERNAL
    }


def _old_data_files(out: Path) -> set[Path]:
    """Data files in ``out``'s folder named after ``out`` that the model now at ``out`` reads.

    These are ours to remove once a new model has replaced ``out`` (files with other names may
    belong to someone else and are left alone).
    """
    if not out.is_file():
        return set()
    try:
        old = onnx.load(str(out), load_external_data=False)
    except Exception:  # whatever is there, it is not a model we can read: nothing to clean
        return set()
    ours = _our_data_file(out.name)
    found = set()
    for t in iter_tensors(old):
        location = external_location(t)
        if location is not None and ours.fullmatch(location):
            found.add(out.parent / location)
    return found


def save_model(
    mf: ModelFile,
    path: str | os.PathLike[str],
    *,
    external: bool | None = None,
    verify: bool = True,
    reference: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``mf`` to ``path`` atomically and crash-safely.

    Everything is written into a temporary folder beside the output and verified there. Then
    the data file (named after its content, :func:`data_file_name`) is moved beside the output,
    the model is renamed over ``path`` last, and only then is the data file the old model at
    ``path`` used removed. Killed at any moment, ``path`` is either the complete old model with
    its data or the complete new one; a model on disk never reads a data file that is not its own.

    Args:
        mf: the model; after saving, its external data entries point at the new file.
        path: output .onnx path. External data (if any) goes to ``<name>.<hash>.data`` beside it.
        external: force external data on/off; default: external if the model had external
            data or is too large for one protobuf (2 GB).
        verify: run ``onnx.checker`` and open an onnxruntime session on the output first.
        reference: the input model, used to tell whether onnxruntime failing on the output is
            our doing (it is not if onnxruntime cannot load the input either).

    Raises:
        OnnxSparseError: the output could not be written or did not verify.
    """
    out = Path(path)
    final = output_path(out, "-o")  # the same resolved path the guard compared
    folder = final.parent
    sizes: Sizes = {}  # measured once, for the choice and the write when the message stays as it is
    if external is None:
        external = _uses_external(mf.model) or message_size(mf.model, sizes) > _PROTOBUF_LIMIT - (64 << 20)
    in_place = mf.path is not None and final.exists() and _same_file(Path(mf.path), final)
    keep = set() if in_place else data_files(mf)  # never remove what another input still reads
    atomic.clean_stale(folder)
    tmp = atomic.temp_dir(folder)
    data_name = None
    placed = None  # a data file we moved beside the output that no model reads yet
    try:
        if external:
            sizes.clear()  # the message changes: measured again for the write
            data_name = _write_external(mf, tmp, final.name, externalize_all=not _uses_external(mf.model))
            mf.pending.clear()
        else:
            if mf.pending or _uses_external(mf.model):
                sizes.clear()  # the message changes below: measured again for the write
            mf.flush_pending()
            for t in iter_tensors(mf.model):
                if t.data_location == TensorProto.EXTERNAL:
                    write_tensor(t, np.array(mf.read(t, mmap=False)))
            finalize_inline(mf.model)
        with open(tmp / final.name, "wb") as f:  # piece by piece: never the message and all its bytes at once
            write_message(f, mf.model, sizes)
        if external:
            mf.base_dir = folder  # entries now name data_name, which lands in folder
        if verify:
            verify_model(tmp / final.name, reference=reference)
        stale = _old_data_files(final)
        if data_name is not None:
            if _place_data_file(tmp / data_name, folder / data_name):  # else: the same bytes are there already
                placed = folder / data_name
            stale.discard(folder / data_name)
        os.replace(tmp / final.name, final)
        placed = None
        mf.path = final
        mf.ident = file_identity(final.stat())
        mf.data_ids = {folder / data_name: file_version((folder / data_name).stat())} if data_name else {}
        for old in stale:
            if not any(old.exists() and _same_file(old, k) for k in keep):
                with contextlib.suppress(OSError):
                    old.unlink()
        clean_orphans(folder, keep, model_name=final.name)
    except OSError as exc:
        raise OnnxSparseError(f"{out}: could not write the model ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if placed is not None:
            with contextlib.suppress(OSError):
                placed.unlink()
    logger.debug("wrote %s%s", out, f" (+ {data_name})" if data_name else "")
    return out


def clean_orphans(
    folder: Path, keep: set[Path] | frozenset[Path] = frozenset(), model_name: str | None = None
) -> list[Path]:
    """Remove data files named like ours that no model in ``folder`` reads: ``<name>.onnx.<16 hex>.data``,
    and ``<model_name>.<16 hex>.data`` for the model just written whatever its suffix (a file
    with another name is not taken for ours).

    A run killed between placing its data file and renaming its model leaves such a file. It
    is removed only when it is provably nobody's: no other onnx-sparse run may be writing into
    the folder (a temporary of a live or foreign run means one might be about to rename its
    model over a data file it just placed), and no model in the folder (``*.onnx`` and the file
    the data file is named after) refers to it. Files in ``keep`` (data an input of this run
    reads) are never removed. The candidates are listed before the temporaries are looked at:
    a run that places its data file later is not a candidate, and one that placed it earlier
    still has its temporary there until its model is renamed.

    Returns:
        The files removed.
    """
    try:
        own = re.compile(re.escape(model_name) + _HASHED) if model_name else _ONNX_DATA_FILE
        candidates = [
            Path(e.path)
            for e in os.scandir(folder)
            if (_ONNX_DATA_FILE.fullmatch(e.name) or own.fullmatch(e.name)) and e.is_file(follow_symlinks=False)
        ]
    except OSError:
        return []
    # The usual case, cheaply: each data file is read by the model it is named after.
    candidates = [c for c in candidates if os.path.realpath(c) not in _reads(_namesake(c))]
    if not candidates or atomic.others_writing(folder):
        return []
    used: set[str] = set()
    for entry in os.scandir(folder):
        if entry.name.endswith(".onnx") or any(c.name.startswith(entry.name + ".") for c in candidates):
            used |= _reads(Path(entry.path))
    removed = []
    for c in candidates:
        if os.path.realpath(c) in used or any(_same_file(c, k) for k in keep):
            continue
        with contextlib.suppress(OSError):
            c.unlink()
            removed.append(c)
            logger.info("removed %s: no model in its folder reads it (left by an interrupted run)", c)
    return removed


_HASHED = r"\.[0-9a-f]{16}\.data"
_ONNX_DATA_FILE = re.compile(r".+\.onnx" + _HASHED)


def _namesake(data_file: Path) -> Path:
    """The model a data file ``<model>.<16 hex>.data`` is named after."""
    return data_file.with_name(data_file.name[: -len(".0123456789abcdef.data")])


def _reads(model_path: Path) -> set[str]:
    """The resolved data files the model at ``model_path`` names (empty if it is no model we can read)."""
    try:
        if not model_path.is_file():
            return set()
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # not a model (or unreadable): it reads nothing
        return set()
    folder = model_path.parent
    return {os.path.realpath(folder / loc) for t in iter_tensors(model) if (loc := external_location(t)) is not None}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def model_problem(model: ModelFile | onnx.ModelProto | str | os.PathLike[str]) -> str | None:
    """What ``onnx.checker`` (full check, shape inference included) finds wrong with a model,
    or None if it passes.

    The check runs on the model as loaded (a path is loaded with :func:`load_model` first),
    not on the file again: the file is read once, and its external data is judged by this
    project's rules (:mod:`onnx_sparse.external`, checked at load) rather than by the checker's
    own file lookups, so ``inspect`` and ``prune`` accept and refuse the same data files. A
    loaded model never holds its external data, so it is always under protobuf's 2 GB.
    """
    if isinstance(model, ModelFile):
        proto = model.model
    elif isinstance(model, onnx.ModelProto):
        proto = model
    else:
        try:
            proto = load_model(model).model
        except OnnxSparseError as exc:
            return exc.message
    try:
        _check_structure(proto)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return first_line(exc)
    except (OSError, RuntimeError, ValueError) as exc:  # malformed beyond the checker's words
        return f"{type(exc).__name__}: {first_line(exc)}"
    return None


#: Inline tensors at least this large are checked as placeholders (see :func:`_check_structure`).
_CHECK_INLINE_BYTES = 1 << 16


def _check_structure(proto: onnx.ModelProto) -> None:
    """``onnx.checker`` (full check) on a loaded model, without the checker's own data-file lookups
    and without its copies of the weights.

    Given a model in memory, the checker looks up external data files relative to the current
    directory, and serializes the model and parses it again (twice with shape inference): for
    an inline model that is three more copies of its weights at once. Given a path, it refuses
    any symlinked data file, which this project's rules allow inside the model's folder. So the
    model is checked as a copy whose external entries, and whose inline tensors of 64 KiB or
    more (their size checked against dtype x shape first: one that does not match stays inline
    for the checker to report), all name one empty file in a private temporary folder: the
    checker sees every structural fact (names, types, dims, the external entries' form) and
    shape inference runs as on the real file, which never reads external data either (the
    small tensors a shape may come from stay inline).
    """
    with tempfile.TemporaryDirectory(prefix="onnx-sparse-check-") as folder:
        (Path(folder) / "data").touch()
        (Path(folder) / "model.onnx").write_bytes(_placeholder_copy(proto))
        trim_heap()  # the copy's weights: freed, returned
        try:
            onnx.checker.check_model(str(Path(folder) / "model.onnx"), full_check=True)
        finally:
            trim_heap()  # the checker's parse and inference copies


def _placeholder_copy(proto: onnx.ModelProto) -> bytes:
    """``proto`` serialized with its external and large inline tensors as entries naming ``data``
    (:func:`_check_structure`). The copy made here holds the weights once, and only until this
    returns (nothing outside keeps a reference into it)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for t in iter_tensors(copy):
        if t.data_location == TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = "data"
        elif (size := len(t.raw_data)) >= _CHECK_INLINE_BYTES and _raw_size_ok(t, size):
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value="data")
    return copy.SerializeToString()


def _raw_size_ok(t: TensorProto, size: int) -> bool:
    """Whether ``size``, the length of ``t``'s raw_data (read once by the caller: each read of
    the field is a copy of the bytes), is what dtype x shape needs."""
    try:
        return size == stored_nbytes(t)
    except OnnxSparseError:  # a dtype without a fixed size: left to the checker
        return False


def check_input_model(model: ModelFile | onnx.ModelProto | str | os.PathLike[str]) -> None:
    """Refuse an input model that onnx.checker rejects, before any work is done on it
    (see :func:`model_problem`).

    Raises:
        OnnxSparseError: "the input model is invalid: ..." with the checker's first line.
    """
    problem = model_problem(model)
    if problem is not None:
        raise OnnxSparseError(
            f"the input model is invalid: {problem}",
            hint="fix or re-export the model; `onnx-sparse inspect` shows the same verdict",
        )


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
    from onnx_sparse import runtime

    try:
        # Opening is the check; packing weights for fast kernels would only cost time and memory.
        runtime.session(str(path), what="the output", optimize=False, prepack=False)
    except OnnxSparseError as exc:
        return first_line(exc.__cause__) if exc.__cause__ is not None else exc.message
    return None
