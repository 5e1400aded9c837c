"""Is a layer INT8 in, INT8 weight and INT8 out? What TensorRT needs before a sparse INT8 kernel can run.

TensorRT picks a sparse INT8 GEMM/convolution only when the layer's input, its weight and its
output are all INT8 in the explicitly quantized (Q/DQ) network: an input that comes from a
DequantizeLinear of INT8 data, an INT8 weight behind a DequantizeLinear (symmetric, scales per
output channel or per tensor), and an output that is quantized again (QuantizeLinear to INT8),
directly or after the pointwise ops TensorRT fuses into the layer's epilogue
(:data:`onnx_sparse.graph.rules.INT8_EPILOGUE_OPS`). Otherwise the layer dequantizes in its
epilogue and the dense kernel wins. The rules themselves live in :mod:`onnx_sparse.graph.rules`
(:func:`~onnx_sparse.graph.rules.int8_tensor_rule`); this module walks the graph.

Only the main graph is analysed; layers inside subgraphs and functions get no answer (None).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnx_sparse.graph import rules
from onnx_sparse.graph.names import display_name

__all__ = ["Int8IO", "GraphIndex", "int8_io"]

# Ops TensorRT moves Q/DQ across without changing values (shape-only), looked through on the input side.
_SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity")


@dataclass(frozen=True)
class Int8IO:
    """Whether a layer's input, weight and output are INT8; each field is "" when it is, else why not."""

    input: str
    weight: str
    output: str
    quantized: bool  # any Q/DQ touches the layer at all

    @property
    def possible(self) -> bool:
        """Sparse INT8 possible: input, weight and output are all INT8."""
        return not (self.input or self.weight or self.output)

    @property
    def missing(self) -> list[str]:
        """Which of input/weight/output are not INT8."""
        return [k for k in ("input", "weight", "output") if getattr(self, k)]

    @property
    def reason(self) -> str:
        """One line: why sparse INT8 is not possible ("" when it is)."""
        return "; ".join(f"{k}: {getattr(self, k)}" for k in self.missing)


class GraphIndex:
    """Producers, consumers, constants and outputs of the main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.constants: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self.outputs = {o.name for o in g.output}
        self.inputs = {i.name: i for i in g.input}
        self.names: dict[int, str] = {}
        for i, node in enumerate(g.node):
            self.names[id(node)] = display_name(node, i)
            for out in node.output:
                if out:
                    self.producers[out] = node
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value" and node.output:
                        self.constants[node.output[0]] = a.t
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> np.ndarray | None:
        """A small constant's value (zero points); None if absent or stored as external data."""
        t = self.constants.get(name)
        if t is None or t.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)

    def size(self, name: str) -> int | None:
        """A constant's element count, from its dims (never reads the data)."""
        t = self.constants.get(name)
        return None if t is None else int(np.prod(t.dims))

    def elem_type(self, name: str) -> int | None:
        """The element type of a stored tensor or graph input, if known."""
        if name in self.constants:
            return int(self.constants[name].data_type)
        vi = self.inputs.get(name)
        if vi is not None and vi.type.HasField("tensor_type"):
            return int(vi.type.tensor_type.elem_type)
        return None


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(onnx.helper.get_attribute_value(a))
    return default


def _q_type(index: GraphIndex, node: onnx.NodeProto) -> tuple[int | None, np.ndarray | None]:
    """The quantized element type and zero point of a QuantizeLinear/DequantizeLinear."""
    zp = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "QuantizeLinear":
        if len(node.input) > 2 and node.input[2]:
            zp_t = index.elem_type(node.input[2])
            return zp_t, zp
        out_dtype = _attr(node, "output_dtype", 0)
        return (out_dtype or TensorProto.UINT8), zp
    # DequantizeLinear: the type of what it reads
    x = node.input[0]
    producer = index.producers.get(x)
    if producer is not None and producer.op_type == "QuantizeLinear":
        return _q_type(index, producer)[0], zp
    return index.elem_type(x), zp


def _dq_rule(index: GraphIndex, dq: onnx.NodeProto) -> str | None:
    elem, zp = _q_type(index, dq)
    return rules.int8_tensor_rule(elem, zp)


def _input_reason(index: GraphIndex, name: str) -> tuple[str, bool]:
    seen = 0
    node = index.producers.get(name)
    while node is not None and node.op_type in _SHAPE_ONLY and seen < 16:
        node, seen = index.producers.get(node.input[0]), seen + 1
    if node is None or node.op_type != "DequantizeLinear":
        return "not from a DequantizeLinear", False
    return _dq_rule(index, node) or "", True


def _weight_reason(index: GraphIndex, name: str, reduction_axis: int | None) -> tuple[str, bool]:
    node = index.producers.get(name)
    seen = 0
    while node is not None and node.op_type in ("Identity",) and seen < 16:
        node, seen = index.producers.get(node.input[0]), seen + 1
    if node is None or node.op_type != "DequantizeLinear":
        return "not stored quantized (no DequantizeLinear)", False
    why = _dq_rule(index, node)
    if why:
        return why, True
    if node.input[0] not in index.constants:
        return "quantized at run time (QuantizeLinear on a float weight), not stored INT8", True
    scales = index.size(node.input[1]) if len(node.input) > 1 else None
    if scales is not None and scales > 1 and reduction_axis is not None:
        rank = len(index.constants[node.input[0]].dims)
        axis = _attr(node, "axis", 1) % max(rank, 1)
        if axis == reduction_axis:
            return f"scales run along the input-channel axis {axis}, not the output channels", True
    return "", True


def _output_reason(index: GraphIndex, name: str) -> tuple[str, bool]:
    seen = 0
    while seen < 16:
        if name in index.outputs:
            return "is a model output (not quantized)", False
        users = index.consumers.get(name, [])
        if not users:
            return "unused", False
        qs = [u for u in users if u.op_type == "QuantizeLinear"]
        if len(qs) == len(users):
            for q in qs:
                why = rules.int8_tensor_rule(*_q_type(index, q))
                if why:
                    return why, True
            return "", True
        if len(users) == 1 and users[0].op_type in rules.INT8_EPILOGUE_OPS:
            user = users[0]
            others = [i for i in user.input[1:] if i and i != name]
            if user.input[0] != name and user.op_type not in ("Add", "Mul"):
                break
            if all(i in index.constants for i in others):
                name, seen = user.output[0], seen + 1
                continue
        break
    kinds = sorted({u.op_type for u in index.consumers.get(name, [])})
    return f"feeds {', '.join(kinds) or 'nothing'} in float, not a QuantizeLinear", bool(
        {"QuantizeLinear"} & set(kinds)
    )


def int8_io(
    index: GraphIndex, node: onnx.NodeProto, activation: str, weight_input: str, reduction_axis: int | None
) -> Int8IO:
    """The INT8 state of one main-graph Conv/Gemm/MatMul node.

    Args:
        index: the graph's :class:`GraphIndex`.
        node: the layer.
        activation: the name of its data input.
        weight_input: the name of its weight input (as the node sees it).
        reduction_axis: the reduction axis of the stored weight (to check the scale axis).
    """
    i, qi = _input_reason(index, activation) if activation else ("no data input", False)
    w, qw = _weight_reason(index, weight_input, reduction_axis)
    o, qo = _output_reason(index, node.output[0]) if node.output else ("no output", False)
    return Int8IO(input=i, weight=w, output=o, quantized=qi or qw or qo)


def has_qdq(nodes: Iterable[onnx.NodeProto]) -> bool:
    """Whether any QuantizeLinear/DequantizeLinear is among ``nodes``."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes)
