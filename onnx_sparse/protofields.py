"""Field-level helpers for protobuf messages (ONNX's), for code that must not read what it skips.

Reading a ``bytes`` field of a message (a tensor's ``raw_data``) copies its bytes into a Python
object, and ``ListFields()`` reads every set field: code that copies a message around its weights
goes field by field from the descriptor instead (:func:`copy_fields`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_repeated", "copy_fields"]


def is_repeated(fd: Any) -> bool:
    """Whether field descriptor ``fd`` is a repeated field (``is_repeated`` from protobuf 6.31, ``label`` before)."""
    return bool(fd.is_repeated) if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def copy_fields(src: Any, dst: Any, skip: str) -> None:
    """Every set field of message ``src`` but ``skip`` copied into ``dst`` (of the same type),
    without reading ``skip``."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name == skip:
            continue
        if is_repeated(fd):
            values = getattr(src, fd.name)
            if len(values):
                getattr(dst, fd.name).extend(values)
        elif src.HasField(fd.name):
            if fd.type == fd.TYPE_MESSAGE:
                getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
            else:
                setattr(dst, fd.name, getattr(src, fd.name))
