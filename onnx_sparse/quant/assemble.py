"""Write the INT8 Q/DQ graph ourselves: which tensors get a Q/DQ pair, and the stored INT8 weights.

For every layer that goes INT8 (a Conv/Gemm/MatMul with a float32 weight initializer):

* **Input**: its activation goes through ``QuantizeLinear -> DequantizeLinear`` (int8, zero point 0,
  one scale per tensor); layers reading the same tensor share the pair. Only INT8 layers read the
  dequantized value when the tensor is not itself some INT8 layer's output: a LayerNorm output
  that also feeds a residual Add keeps feeding it in float (TensorRT computes it in float too).
* **Weight**: stored as int8 behind a per-output-channel ``DequantizeLinear``. The integers are
  given (the joint walk's, :func:`quantize_weight` checks they are exact) or rounded here; a 0
  stays exactly 0, so a 2:4 pattern survives by construction.
* **Output**: quantized again at the end of the pointwise chain TensorRT fuses into the layer's
  epilogue (bias ``Add``/``Mul`` with a constant, Relu, Clip, LeakyRelu, BatchNormalization;
  :data:`onnx_sparse.graph.rules.INT8_EPILOGUE_OPS`); every consumer then reads the dequantized
  value, as it would from an INT8-out kernel. A layer output that is a graph output keeps its
  name on the dequantized value.

The rescaling nodes of :mod:`onnx_sparse.quant.smooth` are recognised: an input rescale (``1/v``)
may end an epilogue, an output restore (``v``) never does.

onnxruntime's QDQ quantizer places pairs much the same way but re-derives every weight's scale
and integers from the float values and routes every consumer through the dequantized tensor;
writing the graph here keeps the walk's integers and the float paths exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnx_sparse.graph import rules

__all__ = [
    "Int8Layer",
    "find_layers",
    "quantize_weight",
    "write_qdq",
    "dequantized_readers",
    "SMOOTH_IN",
    "SMOOTH_OUT",
    "weight_axes",
    "index_graph",
]

#: Name prefixes of the rescaling Mul nodes :mod:`onnx_sparse.quant.smooth` inserts.
SMOOTH_IN = "onnx_sparse_smooth_in/"
SMOOTH_OUT = "onnx_sparse_smooth_out/"


@dataclass(frozen=True)
class Int8Layer:
    """One layer that goes INT8.

    Attributes:
        node: The node's name.
        op: Conv, Gemm or MatMul.
        act: Its activation input; ``act_axis`` the channel axis of that tensor.
        weight: Its float32 weight initializer; ``w_out_axis`` / ``w_in_axis`` its output- and
            input-channel axes (the scales run along ``w_out_axis``).
        output: Where its output is quantized (end of the epilogue chain); ``out_axis`` the channel axis.
    """

    node: str
    op: str
    act: str
    act_axis: int
    weight: str
    w_out_axis: int
    w_in_axis: int
    output: str
    out_axis: int


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(onnx.helper.get_attribute_value(a))
    return default


def weight_axes(node: onnx.NodeProto) -> tuple[int, int, int] | None:
    """``(weight input index, output-channel axis, input-channel axis)`` of a Conv/Gemm/MatMul's stored weight."""
    if node.op_type == "Conv":
        return 1, 0, 1
    if node.op_type == "MatMul":
        return 1, 1, 0
    if node.op_type == "Gemm":
        return (1, 0, 1) if _attr(node, "transB", 0) else (1, 1, 0)
    return None


def index_graph(
    model: onnx.ModelProto,
) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]], dict[str, TensorProto]]:
    """``(producer of each value, consumers of each value, initializers by name)`` of the main graph."""
    producers = {o: n for n in model.graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    return producers, consumers, {t.name: t for t in model.graph.initializer}


def _output_point(
    node: onnx.NodeProto,
    consumers: Mapping[str, list[onnx.NodeProto]],
    inits: Mapping[str, TensorProto],
    outputs: set[str],
) -> str:
    name = node.output[0]
    for _ in range(16):
        if name in outputs:
            break
        users = consumers.get(name, [])
        if len(users) != 1:
            break
        user = users[0]
        if user.op_type not in rules.INT8_EPILOGUE_OPS or user.name.startswith(SMOOTH_OUT):
            break
        others = [i for i in user.input if i and i != name]
        if user.op_type in ("Add", "Mul") and len(others) != 1:
            break
        if not all(i in inits for i in others):
            break
        name = user.output[0]
    return name


def find_layers(
    model: onnx.ModelProto,
    nodes: Iterable[str],
    index: tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]], dict[str, TensorProto]] | None = None,
) -> list[Int8Layer]:
    """The :class:`Int8Layer` of each named node (main graph; the weight must be a float32 initializer).
    ``index``: :func:`index_graph` of ``model``, when the caller has it."""
    wanted = set(nodes)
    _, consumers, inits = index_graph(model) if index is None else index
    outputs = {o.name for o in model.graph.output}
    out = []
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        axes = weight_axes(node)
        assert axes is not None, node.op_type
        w_index, w_out, w_in = axes
        w = node.input[w_index]
        assert w in inits and inits[w].data_type == TensorProto.FLOAT, (
            f"{node.name}: weight {w} is not a float32 initializer"
        )
        channel_last = -1
        act_axis = 1 if node.op_type == "Conv" else channel_last
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            act_axis = 0
        out_axis = 1 if node.op_type == "Conv" else channel_last
        out.append(
            Int8Layer(
                node.name,
                node.op_type,
                node.input[0],
                act_axis,
                w,
                w_out,
                w_in,
                _output_point(node, consumers, inits, outputs),
                out_axis,
            )  # fmt: skip
        )
    return out


def quantize_weight(w: np.ndarray, axis: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 values, float32 scales along axis)`` of a float weight.

    With ``scale`` (the joint walk's, one per channel along ``axis``), the weight must already lie
    on that grid, and its integers are taken exactly; otherwise (no scale, or the weight moved off
    the grid since, e.g. a head refit) the scales are chosen per channel
    (:func:`~onnx_sparse.prune.sparsegpt.int8_scales`) and the weight rounded. Zeros stay 0.
    """
    from onnx_sparse.prune.sparsegpt import INT8_MAX, int8_scales  # lazy: scipy behind it, for every CLI start

    a = np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0)
    mat = a.reshape(a.shape[0], -1)
    if scale is not None and scale.shape == (mat.shape[0],) and np.all(scale > 0):
        s = np.asarray(scale, dtype=np.float32).astype(np.float64)
        q = mat / s[:, None]
        ints = np.rint(q)
        if np.all(np.abs(q - ints) < 1e-3) and np.all(np.abs(ints) <= INT8_MAX):
            return np.moveaxis(ints.reshape(a.shape), 0, axis).astype(np.int8), s.astype(np.float32)
    s = int8_scales(mat)
    ints = np.clip(np.rint(mat / s[:, None]), -INT8_MAX, INT8_MAX)
    return np.moveaxis(ints.reshape(a.shape), 0, axis).astype(np.int8), s.astype(np.float32)


class _Names:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.used = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for n in g.node:
            self.used.update(n.input)
            self.used.update(n.output)
            self.used.add(n.name)

    def fresh(self, stem: str) -> str:
        name, k = stem, 1
        while name in self.used:
            name, k = f"{stem}_{k}", k + 1
        self.used.add(name)
        return name


def dequantized_readers(layers: Iterable[Int8Layer]) -> dict[str, frozenset[str] | None]:
    """Every tensor the Q/DQ of ``layers`` quantizes -> the nodes that read its dequantized value:
    None (every consumer) for a layer's output point, else the INT8 layers that read it (the
    module docstring's rule; a float reader of such a tensor keeps reading it in float)."""
    layers = list(layers)
    out: dict[str, frozenset[str] | None] = dict.fromkeys((x.output for x in layers), None)
    acts: dict[str, set[str]] = {}
    for x in layers:
        if x.act not in out:
            acts.setdefault(x.act, set()).add(x.node)
    out.update((t, frozenset(nodes)) for t, nodes in acts.items())
    return out


def write_qdq(
    model: onnx.ModelProto,
    layers: Iterable[Int8Layer],
    act_scales: Mapping[str, float],
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> onnx.ModelProto:
    """A copy of ``model`` with the Q/DQ of ``layers`` written in (see the module docstring).

    Args:
        act_scales: Scale of every activation to quantize (each layer's ``act`` and ``output``).
        weights: Per weight initializer, ``(int8 values, float32 scales)`` (:func:`quantize_weight`).
    """
    layers = list(layers)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = _Names(out)
    producers, _, inits = index_graph(out)
    outputs = {o.name for o in g.output}
    reads_dq = dequantized_readers(layers)  # tensor -> nodes that read its dequantized value (None: every consumer)
    out_points = {t for t, who in reads_dq.items() if who is None}
    quantized = sorted(reads_dq)
    dq_name: dict[str, str] = {}
    pairs: dict[str, list[onnx.NodeProto]] = {}
    new_inits: list[TensorProto] = []
    renamed_output: dict[str, str] = {}
    for t in quantized:
        scale = names.fresh(f"{t}_scale")
        zp = names.fresh(f"{t}_zero_point")
        new_inits += [numpy_helper.from_array(np.array(act_scales[t], dtype=np.float32), scale),
                      numpy_helper.from_array(np.array(0, dtype=np.int8), zp)]  # fmt: skip
        src = t
        if t in outputs:  # the graph output keeps its name, on the dequantized value
            src = names.fresh(f"{t}_float")
            renamed_output[t] = src
            dq_out = t
        else:
            dq_out = names.fresh(f"{t}_dequantized")
        q_out = names.fresh(f"{t}_quantized")
        pairs[t] = [
            onnx.helper.make_node("QuantizeLinear", [src, scale, zp], [q_out], name=names.fresh(f"{t}_QuantizeLinear")),
            onnx.helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out], name=names.fresh(f"{t}_DequantizeLinear")),
        ]  # fmt: skip
        dq_name[t] = dq_out
    # rewire: an output point is read dequantized by every consumer, another tensor by its INT8 layers only
    for node in g.node:
        for k, i in enumerate(node.input):
            if i in out_points and i not in outputs:
                node.input[k] = dq_name[i]
            elif i not in out_points and i in reads_dq and node.name in (reads_dq[i] or ()):
                node.input[k] = dq_name[i]
        for k, o in enumerate(node.output):
            if o in renamed_output:
                node.output[k] = renamed_output[o]
    # weights: int8 initializer behind a per-channel DequantizeLinear that gives the old name
    w_nodes = []
    done: set[str] = set()
    for x in layers:
        if x.weight in done:
            continue
        done.add(x.weight)
        ints, scales = weights[x.weight]
        qn, sn, zn = (
            names.fresh(f"{x.weight}_quantized"),
            names.fresh(f"{x.weight}_scale"),
            names.fresh(f"{x.weight}_zero_point"),
        )
        new_inits += [numpy_helper.from_array(ints.astype(np.int8), qn), numpy_helper.from_array(scales.astype(np.float32), sn),
                      numpy_helper.from_array(np.zeros(scales.shape, np.int8), zn)]  # fmt: skip
        w_nodes.append(
            onnx.helper.make_node("DequantizeLinear", [qn, sn, zn], [x.weight], name=names.fresh(f"{x.weight}_DequantizeLinear"), axis=x.w_out_axis)
        )  # fmt: skip
    # the float weights go in place (the others keep their order): re-adding the kept ones would copy
    # every one of them a second time (MiniLM's 47 MB embedding table, per candidate model)
    for k in reversed([k for k, t in enumerate(g.initializer) if t.name in done]):
        del g.initializer[k]
    g.initializer.extend(new_inits)
    # order: weight DQs first, then every node followed by the Q/DQ of what it produces
    order: list[onnx.NodeProto] = list(w_nodes)
    graph_inputs = {i.name for i in g.input}
    for t in quantized:
        if t in graph_inputs or (t not in producers and t in inits):
            order += pairs[t]
    for node in g.node:
        order.append(node)
        for o in node.output:
            original = next((k for k, v in renamed_output.items() if v == o), o)
            if original in pairs and original not in graph_inputs:
                order += pairs[original]
    del g.node[:]
    g.node.extend(order)
    return out
