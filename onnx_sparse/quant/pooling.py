"""Tensors that the model only reads through a global max pool.

A classifier that max-pools a conv's output over time or space (``Conv -> bias -> GELU ->
GlobalMaxPool``) reads one value per sample and channel: the largest. Its INT8 scale must keep
those values, but a clip chosen on rows sampled at every position clips exactly them, since the
maxima are the rare outliers of the whole map (on magika's conv output the error-optimal clip on
positions was a quarter of the pooled maxima and cost 0.02 of top-1 agreement). For such a
tensor the calibration's rows are its pooled values instead (:mod:`onnx_sparse.quant.calibrate`).

The rule, judged on the main graph: every path from the tensor runs through elementwise ops and
slicing/squeezing only, and ends in a ``GlobalMaxPool``. The elementwise ops must be increasing
on large positive values, where the maxima are: no ``Neg``/``Reciprocal``, a constant operand of
``Mul``/``Div`` or a constant exponent of ``Pow`` positive, the tensor not the subtrahend of
``Sub`` nor the divisor of ``Div``; operands computed from the tensor itself (a decomposed GELU's
``x * x``) are allowed. A tensor read by a subgraph, a graph
output on the way, or any other reader: not pooled.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from onnx_sparse.calib.capture import node_reads

__all__ = ["max_pooled", "POOL_OPS"]

#: Ops whose output is the per-channel maximum over every position.
POOL_OPS = frozenset({"GlobalMaxPool"})
_UNARY = frozenset(
    {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "Clip", "HardSigmoid", "HardSwish", "Softplus",
     "Elu", "Selu", "Celu", "Mish", "Identity", "Slice", "Squeeze", "Unsqueeze"}
)  # fmt: skip
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
_MAX_NODES = 64  # a longer chain is not an activation between a layer and its pool


def max_pooled(model: onnx.ModelProto, names: Iterable[str]) -> set[str]:
    """The ``names`` whose every reader leads, by the module's rule, to a global max pool."""
    g = model.graph
    nodes = list(g.node)  # in order: an op's operands computed from the tensor come before it
    reads = [node_reads(n) for n in nodes]  # a node whose subgraph reads a value is one of its readers
    first: dict[str, int] = {}
    for k, names_read in enumerate(reads):
        for i in names_read:
            first.setdefault(i, k)
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer if _small(t)}
    for n in nodes:
        if n.op_type == "Constant" and n.output:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None and _small(value):
                constants[n.output[0]] = onnx.numpy_helper.to_array(value)
    const_names = {t.name for t in g.initializer} | {n.output[0] for n in nodes if n.op_type == "Constant"}
    outputs = {o.name for o in g.output}
    return {t for t in names if t in first and _pooled(t, nodes, reads, first, constants, const_names, outputs)}


def _small(t: onnx.TensorProto) -> bool:
    return int(np.prod(t.dims, dtype=np.int64)) <= 4096 and not t.external_data


def _pooled(
    tensor: str,
    nodes: list[onnx.NodeProto],
    reads: list[list[str]],
    first: dict[str, int],
    constants: dict[str, np.ndarray],
    const_names: set[str],
    outputs: set[str],
) -> bool:
    region = {tensor}
    touched = 0
    pooled = False
    for k in range(first[tensor], len(nodes)):
        if not any(i in region for i in reads[k]):
            continue
        node = nodes[k]
        touched += 1
        if touched > _MAX_NODES:
            return False
        if node.op_type in POOL_OPS:
            pooled = True
            continue
        if not _keeps_order(node, region, constants, const_names):
            return False
        region.update(o for o in node.output if o)
    # every value of the region is read (a dead end or a graph output is a reader we cannot judge)
    return pooled and not (region & outputs) and all(v in first for v in region)


def _keeps_order(
    node: onnx.NodeProto, region: set[str], constants: dict[str, np.ndarray], const_names: set[str]
) -> bool:
    if any(a.HasField("g") or a.graphs for a in node.attribute):
        return False  # an If / Loop / Scan, or any op reading the tensor from a subgraph
    if node.op_type in _UNARY:
        # the data input is the region's; the rest (Slice's starts, Clip's bounds) constants
        return node.input[0] in region and all(i in const_names for i in node.input[1:] if i)
    if node.op_type not in _BINARY or len(node.input) != 2:
        return False
    a, b = node.input
    for pos, (mine, other) in enumerate(((a, b), (b, a))):
        if mine not in region:
            continue
        if other in region:
            continue
        if other not in const_names:
            return False
        if node.op_type == "Sub" and pos == 1:  # c - x: the largest x becomes the smallest
            return False
        if node.op_type == "Div" and pos == 1:  # c / x
            return False
        if node.op_type in ("Mul", "Div"):
            c = constants.get(other)
            if c is None or not np.all(c > 0):
                return False
        if node.op_type == "Pow" and (pos == 1 or not np.all(constants.get(other, np.zeros(1)) > 0)):
            return False  # c ** x, or x ** c with c <= 0
    return True
