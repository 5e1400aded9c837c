"""A read-only copy of an inline model that reads its large weights from the model's own file.

``asym`` keeps the dense model beside the one it prunes: for an inline model a deep copy of the
protobuf is a second copy of every weight, held for the whole run. The loaded file already
holds those bytes, each initializer's ``raw_data`` at some offset of it, so the copy can refer to
them as external data of that very file (a memory map, as for a model with external data: the
staged capture's sessions map it, :func:`onnx_sparse.io.read_tensor` maps it). Only tensors
whose bytes in memory are still the file's bytes are referred to (checked byte for byte, and
the file pinned to the version checked here, as every data file is); tensors changed since the
load, small ones, and ones holding float32 subnormals (which :func:`~onnx_sparse.calib.capture.flush_piece`
flushes only in memory) are copied as before.

:func:`raw_data_offsets` finds the offsets by walking the file's protobuf wire format (the main
graph's initializers only), never parsing or reading the tensors' data.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from onnx_sparse.core.subnormal import count_subnormals
from onnx_sparse.external import file_identity, file_version, tensor_dtype
from onnx_sparse.protofields import copy_fields

__all__ = ["MIN_BYTES", "MIN_TOTAL", "raw_data_offsets", "file_refs"]

logger = logging.getLogger(__name__)

#: Initializers from this size on are referred to in the file; smaller ones are copied.
MIN_BYTES = 1 << 16
#: ... and only when those come to this much together: below it the copy is cheap in memory, and
#: checking the bytes (about 1 ms per MB) costs more time than copying them.
MIN_TOTAL = 128 << 20

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW_DATA = 7, 5, 8, 9
_TYPED = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


class _Malformed(Exception):
    pass


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap | bytes, pos: int, end: int):
    """``(field number, wire type, start, end)`` of each field in ``buf[pos:end]``: for a
    length-delimited field, its payload's span; for the others, the span of the value."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos, end)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            nxt = pos + length
        elif wire == 5:
            nxt = pos + 4
        else:  # groups: not in ONNX
            raise _Malformed
        if nxt > end:
            raise _Malformed
        yield number, wire, pos, nxt
        pos = nxt


def raw_data_offsets(buf: mmap.mmap | bytes) -> list[tuple[str, int, int] | None] | None:
    """Per main-graph initializer of the serialized model ``buf``, in order: ``(name, offset,
    length)`` of its ``raw_data`` in ``buf``, or None when it has none. None when the layout is one
    this does not follow (more than one graph field, a field repeated in a tensor: protobuf would
    merge them) or the bytes are not a model."""
    try:
        graphs = [(s, e) for n, w, s, e in _fields(buf, 0, len(buf)) if n == _MODEL_GRAPH and w == 2]
        if len(graphs) != 1:
            return None
        out: list[tuple[str, int, int] | None] = []
        for n, w, s, e in _fields(buf, *graphs[0]):
            if n != _GRAPH_INITIALIZER or w != 2:
                continue
            names, raws = [], []
            for tn, tw, ts, te in _fields(buf, s, e):
                if tn == _TENSOR_NAME and tw == 2:
                    names.append(bytes(buf[ts:te]).decode("utf-8", "replace"))
                elif tn == _TENSOR_RAW_DATA and tw == 2:
                    raws.append((ts, te - ts))
            if len(names) > 1 or len(raws) > 1:
                return None
            out.append((names[0] if names else "", *raws[0]) if raws else None)
        return out
    except _Malformed:
        return None


def _same(t: TensorProto, data: mmap.mmap, offset: int, length: int) -> bool:
    """Whether ``t``'s raw bytes are ``data[offset:offset+length]`` and hold no float32 subnormal.
    The file's pages read for it leave this process's resident set again."""
    raw = t.raw_data  # a copy of this one tensor's bytes (each read of the field copies)
    same = len(raw) == length and raw == data[offset : offset + length]
    if hasattr(data, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        start = offset - offset % mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):
            data.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
    if not same:
        return False
    return not (t.data_type == TensorProto.FLOAT and count_subnormals(np.frombuffer(raw, dtype=tensor_dtype(t))))


def file_refs(model: onnx.ModelProto, path: Path, base_dir: Path, ident: tuple[int, int] | None):
    """A copy of ``model`` (loaded from ``path``, whose folder is ``base_dir`` and identity
    ``ident``) whose large inline main-graph initializers that still hold the file's bytes are
    external references into the file; with the file's :func:`file_version` (for the copy's
    ``data_ids``). None when no tensor qualifies or the file is not the one loaded."""
    file = base_dir / Path(os.path.realpath(path)).name
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    with contextlib.ExitStack() as stack:
        stack.enter_context(os.fdopen(fd, "rb"))
        st = os.fstat(fd)
        if ident is None or file_identity(st) != ident or st.st_size == 0:
            return None
        data = stack.enter_context(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
        spans = raw_data_offsets(data)
        inits = model.graph.initializer
        if spans is None or len(spans) != len(inits):
            return None
        candidates = {
            k: span[1:]
            for k, (t, span) in enumerate(zip(inits, spans, strict=True))
            if span is not None
            and span[0] == t.name
            and span[2] >= MIN_BYTES
            and t.data_location != TensorProto.EXTERNAL
            and not len(t.external_data)
            and not any(len(getattr(t, f)) for f in _TYPED)
            and not t.HasField("segment")
        }
        if sum(length for _, length in candidates.values()) < MIN_TOTAL:
            return None
        refs = {k: span for k, span in candidates.items() if _same(inits[k], data, *span)}
    if not refs:
        return None
    copy = onnx.ModelProto()
    copy_fields(model, copy, "graph")
    copy_fields(model.graph, copy.graph, "initializer")
    for k, t in enumerate(inits):
        if k not in refs:
            copy.graph.initializer.append(t)
            continue
        offset, length = refs[k]
        stub = copy.graph.initializer.add()
        copy_fields(t, stub, "raw_data")
        stub.data_location = TensorProto.EXTERNAL
        for key, value in (("location", file.name), ("offset", str(offset)), ("length", str(length))):
            stub.external_data.add(key=key, value=value)
    logger.debug("read-only copy: %d tensor(s) read from %s", len(refs), file)
    return copy, {file: file_version(st)}
