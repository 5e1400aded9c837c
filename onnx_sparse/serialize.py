"""A model's protobuf bytes written out, and its size, without the whole serialization in memory.

``model.SerializeToString()`` of an inline model holds the message and its serialized bytes at
once, and protobuf's upb builds those bytes in a buffer of its own before copying them into the
Python object: twice the weights on top of the model for a moment. ``ByteSize()`` is no cheaper
(upb serializes to measure). :func:`write_message` writes the same bytes to a file piece by piece:
a ``ModelProto`` or ``GraphProto`` is written field by field, in field-number order as protobuf
does, each repeated message (a node, an initializer) serialized on its own, so what is held at once
is the message plus one piece (the largest tensor). :func:`message_size` is the size it writes.

A message with fields protobuf does not know (kept from the parse, written last by protobuf) is
serialized whole, as before.
"""

from __future__ import annotations

from typing import Any, BinaryIO

from google.protobuf import unknown_fields

from onnx_sparse.protofields import is_repeated

__all__ = ["STREAMED", "message_size", "write_message"]

#: Message types written field by field; every other message is one piece (serialized whole).
STREAMED = frozenset({"onnx.ModelProto", "onnx.GraphProto"})

_LENGTH_DELIMITED = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _streamed(msg: Any) -> bool:
    return msg.DESCRIPTOR.full_name in STREAMED and not len(unknown_fields.UnknownFieldSet(msg))


def _pieces(msg: Any) -> Any:
    """``msg``'s serialization as pieces, in order: bytes, or ``(key, header, submessage)`` for a
    submessage written field by field in its turn (``key``: where it is in ``msg``)."""
    for fd, value in sorted(msg.ListFields(), key=lambda fv: fv[0].number):
        if fd.type == fd.TYPE_MESSAGE:
            tag = _varint(fd.number << 3 | _LENGTH_DELIMITED)
            for i, item in enumerate(value if is_repeated(fd) else (value,)):
                if _streamed(item):
                    yield (fd.number, i), tag, item
                else:
                    data = item.SerializeToString()
                    yield tag + _varint(len(data))
                    yield data
        else:  # a scalar, a string or a repeated scalar: serialized alone in a message of the same type
            one = type(msg)()
            if is_repeated(fd):
                getattr(one, fd.name).extend(value)
            else:
                setattr(one, fd.name, value)
            yield one.SerializeToString()


Sizes = dict[tuple[tuple[int, int], ...], int]


def _size(msg: Any, sizes: Sizes, path: tuple[tuple[int, int], ...]) -> int:
    total = 0
    for piece in _pieces(msg):
        if isinstance(piece, tuple):
            key, tag, item = piece
            n = _size(item, sizes, (*path, key))
            sizes[(*path, key)] = n
            total += len(tag) + len(_varint(n)) + n
        else:
            total += len(piece)
    return total


def message_size(msg: Any, sizes: Sizes | None = None) -> int:
    """``msg.ByteSize()``, measured piece by piece (one piece in memory at a time). ``sizes``: filled
    with the sizes :func:`write_message` needs, so that it does not measure again."""
    if not _streamed(msg):
        return msg.ByteSize()
    if sizes is None:
        sizes = {}
    sizes[()] = _size(msg, sizes, ())
    return sizes[()]


def write_message(f: BinaryIO, msg: Any, sizes: Sizes | None = None) -> int:
    """Write ``msg.SerializeToString()`` to ``f`` piece by piece; returns the bytes written.
    ``sizes``: from :func:`message_size` ``(msg, sizes)`` when the caller measured ``msg`` unchanged."""
    if not _streamed(msg):
        data = msg.SerializeToString()
        f.write(data)
        return len(data)
    if not sizes:
        sizes = {}
        message_size(msg, sizes)
    return _write(f, msg, sizes, ())


def _write(f: BinaryIO, msg: Any, sizes: Sizes, path: tuple[tuple[int, int], ...]) -> int:
    written = 0
    for piece in _pieces(msg):
        if isinstance(piece, tuple):
            key, tag, item = piece
            head = tag + _varint(sizes[(*path, key)])
            f.write(head)
            written += len(head) + _write(f, item, sizes, (*path, key))
        else:
            f.write(piece)
            written += len(piece)
    return written
