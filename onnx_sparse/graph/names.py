"""How a node is named in every table, report and selection: the one naming rule."""

from __future__ import annotations

import onnx

__all__ = ["display_name"]


def display_name(node: onnx.NodeProto, index: int, prefix: str = "") -> str:
    """``prefix`` + the node's own name, or ``<OpType>_<index>`` (its position in its graph) when it has none."""
    return prefix + (node.name or f"{node.op_type}_{index}")
