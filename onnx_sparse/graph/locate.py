"""Find every weight TensorRT could run with 2:4 sparse math, and the axis its groups run on.

This module owns the axis rule. For each Conv, ConvTranspose, Gemm and MatMul node (main
graph, If/Loop/Scan subgraphs with outer-scope weights, model-local functions) it traces the
weight input back to the tensor that stores it (an initializer or a ``Constant`` node),
through ``Identity``, ``Cast``, ``DequantizeLinear``, ``QuantizeLinear``, ``Transpose``
(consumer axis ``a`` is input axis ``perm[a]``) and the pure reshapes ``Reshape``,
``Flatten``, ``Squeeze``, ``Unsqueeze`` (only where the axis keeps its length and its
position in memory). The result is one frozen :class:`WeightSite` per weight-bearing node,
with the eligibility verdict from :mod:`onnx_sparse.graph.rules`.

Node names: a node's own name, or ``<OpType>_<i>`` when it has none, where ``i`` is its
position in its graph's node list. Nodes inside a subgraph are prefixed with the owning
node's name and the attribute (``If_3/then_branch/``), nodes of a model-local function with
``<domain>.<function>/``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph import qdq, rules
from onnx_sparse.graph.names import display_name
from onnx_sparse.io import read_tensor

__all__ = ["WeightSite", "Quant", "find_weight_sites", "LOOK_THROUGH"]

logger = logging.getLogger(__name__)

# Ops a weight may pass through between its stored tensor and its consumer.
_SAME_SHAPE = ("Identity", "Cast", "DequantizeLinear", "QuantizeLinear")
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
LOOK_THROUGH = _SAME_SHAPE + ("Transpose",) + _RESHAPES
_MAX_CHAIN = 16


@dataclass(frozen=True)
class Quant:
    """The DequantizeLinear (or Q->DQ pair) a weight goes through."""

    node: str
    zero_point: np.ndarray | None = field(compare=False, repr=False)
    direct: bool  # DequantizeLinear reads the stored tensor itself (through Identity at most)


@dataclass(frozen=True)
class WeightSite:
    """One weight-bearing node, its stored weight and the verdict.

    Attributes:
        node: display name of the consumer node (see module docstring).
        op: its op type.
        scope: "" for the main graph, else the subgraph/function prefix.
        input_index: which input of the node is the weight.
        activation: name of the node's data input (what multiplies the weight).
        bias: name of the bias input, or None.
        weight: name of the stored tensor (initializer name or Constant output).
        source: "initializer", "outer_initializer", "constant", or "" when not found.
        path: ops between the stored tensor and the node, from the tensor outwards.
        shape: stored tensor shape; consumer_shape: shape the node sees.
        dtype: stored dtype name (numpy / ml_dtypes name).
        axis: axis of the STORED tensor along which groups of 4 run (None if not traceable).
        consumer_axis: the same axis in the node's view of the weight.
        eligible / reason: TensorRT verdict; reason is "" when eligible.
        likely_sparse_kernel: rough guide whether TensorRT would pick a sparse kernel.
        params: weight element count; macs: per-sample MACs where shapes are known.
        attributes: the node's attributes (group, strides, transB, ...).
        quant: the DequantizeLinear on the path, if any.
        int8: whether input, weight and output are INT8 (main graph only; None elsewhere).
        tensor: the stored TensorProto (for reading and writing the weight).
    """

    node: str
    op: str
    scope: str
    input_index: int
    activation: str
    bias: str | None
    weight: str
    source: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    consumer_shape: tuple[int, ...]
    dtype: str
    axis: int | None
    consumer_axis: int | None
    eligible: bool
    reason: str
    likely_sparse_kernel: bool
    params: int
    macs: int | None
    attributes: Mapping[str, Any] = field(compare=False, repr=False)
    quant: Quant | None = field(default=None, compare=False)
    int8: qdq.Int8IO | None = field(default=None, compare=False)
    tensor: TensorProto | None = field(default=None, compare=False, repr=False)
    node_proto: onnx.NodeProto | None = field(default=None, compare=False, repr=False)

    @property
    def group(self) -> int:
        return int(self.attributes.get("group", 1))

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.consumer_shape[2:]) if self.op in ("Conv", "ConvTranspose") else ()


# --------------------------------------------------------------------------- scopes


class _Scope:
    """One graph or function body: who produces and who consumes each name."""

    def __init__(self, nodes, prefix: str, parent: _Scope | None, initializers=(), inputs=(), outputs=()):
        self.nodes = list(nodes)
        self.prefix = prefix
        self.parent = parent
        self.initializers: dict[str, TensorProto] = {t.name: t for t in initializers}
        self.inputs = set(inputs)
        self.outputs = set(outputs)
        self.producers: dict[str, onnx.NodeProto] = {}
        self.names: dict[int, str] = {}
        for i, node in enumerate(self.nodes):
            self.names[id(node)] = display_name(node, i, prefix)
            for out in node.output:
                if out:
                    self.producers[out] = node

    def resolve(self, name: str) -> tuple[str, Any, _Scope] | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.producers:
                return "node", scope.producers[name], scope
            if name in scope.inputs:
                return "input", None, scope
            if name in scope.initializers:
                kind = "initializer" if scope is self else "outer_initializer"
                return kind, scope.initializers[name], scope
            scope = scope.parent
        return None


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name; one whose type is not what the operator's schema says (a
    corrupt or hand-edited model) is a clear error rather than a wrong value downstream."""
    out: dict[str, Any] = {}
    expected = _schema_attribute_types(node.op_type, node.domain)
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            continue
        want = expected.get(a.name)
        known = a.type in onnx.AttributeProto.AttributeType.values() and a.type != onnx.AttributeProto.UNDEFINED
        if not known or (want is not None and a.type != want):
            got = onnx.AttributeProto.AttributeType.Name(a.type) if known else f"{a.type} (undefined)"
            raise OnnxSparseError(
                f"node {node.name or node.op_type!r}: attribute {a.name!r} has type {got}"
                + (f", {node.op_type} needs {onnx.AttributeProto.AttributeType.Name(want)}" if want else ""),
                hint="the model is invalid (onnx.checker rejects it)",
            )
        out[a.name] = onnx.helper.get_attribute_value(a)
    return out


@functools.cache
def _schema_attribute_types(op_type: str, domain: str) -> Mapping[str, int]:
    """Attribute name -> AttributeProto type for a standard operator (empty when unknown)."""
    if domain not in ("", "ai.onnx"):
        return {}
    try:
        schema = onnx.defs.get_schema(op_type, domain="")
    except onnx.defs.SchemaError:
        return {}
    return {name: int(attr.type) for name, attr in schema.attributes.items()}  # type: ignore[call-overload]


def _walk_scopes(model: onnx.ModelProto) -> Iterator[_Scope]:
    def graph_scope(g: onnx.GraphProto, prefix: str, parent: _Scope | None) -> Iterator[_Scope]:
        scope = _Scope(
            g.node,
            prefix,
            parent,
            g.initializer,
            [i.name for i in g.input if i.name not in {t.name for t in g.initializer}],
            [o.name for o in g.output],
        )
        yield scope
        for node in g.node:
            for a in node.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for k, sub in enumerate(subs):
                    label = a.name if len(subs) == 1 else f"{a.name}[{k}]"
                    yield from graph_scope(sub, f"{scope.names[id(node)]}/{label}/", scope)

    yield from graph_scope(model.graph, "", None)
    for fn in model.functions:
        prefix = f"{fn.domain}.{fn.name}/"
        fscope = _Scope(fn.node, prefix, None, (), fn.input, fn.output)
        yield fscope
        for node in fn.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from graph_scope(a.g, f"{fscope.names[id(node)]}/{a.name}/", fscope)


# --------------------------------------------------------------------------- tracing


@dataclass
class _Trace:
    chain: list[onnx.NodeProto]  # consumer side first
    tensor: TensorProto | None = None
    source: str = ""
    weight: str = ""
    owner: _Scope | None = None
    failure: str = ""


def _small_values(t: TensorProto | None) -> np.ndarray | None:
    """The value of a small constant stored in the protobuf (shapes, axes, zero points); None when
    there is none or it is external data (read only through io, with the model's folder)."""
    if t is None or t.data_location == TensorProto.EXTERNAL:
        return None
    return read_tensor(t)


def _const_tensor(scope: _Scope, name: str) -> TensorProto | None:
    """A constant input (initializer or Constant node), for shapes, axes and zero points."""
    if not name:
        return None
    found = scope.resolve(name)
    if found is None:
        return None
    kind, obj, _ = found
    if kind in ("initializer", "outer_initializer"):
        return obj
    if kind == "node" and obj.op_type == "Constant":
        for a in obj.attribute:
            if a.name == "value":
                return a.t
    return None


def _trace(scope: _Scope, name: str) -> _Trace:
    tr = _Trace(chain=[])
    cur, cur_scope = name, scope
    for _ in range(_MAX_CHAIN):
        found = cur_scope.resolve(cur)
        if found is None:
            tr.failure = f"weight tensor {cur!r} is not defined in the graph"
            return tr
        kind, obj, owner = found
        if kind in ("initializer", "outer_initializer"):
            tr.tensor, tr.source, tr.weight, tr.owner = (
                obj,
                kind if owner is scope else "outer_initializer",
                cur,
                owner,
            )
            return tr
        if kind == "input":
            where = (
                "a function input"
                if owner.parent is None and owner.prefix and not owner.initializers
                else "a graph input"
            )
            tr.failure = f"weight is computed at run time ({cur!r} is {where})"
            return tr
        node = obj
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is None:
                tr.failure = "Constant weight without a tensor value"
                return tr
            tr.tensor, tr.source, tr.weight, tr.owner = value.t, "constant", cur, owner
            return tr
        if node.op_type in LOOK_THROUGH and node.domain in ("", "ai.onnx"):
            tr.chain.append(node)
            cur, cur_scope = node.input[0], owner
            continue
        tr.failure = f"weight is computed at run time (by {node.op_type} {owner.names[id(node)]})"
        return tr
    tr.failure = "weight path is too long to trace"
    return tr


def _reshape_target(node: onnx.NodeProto, scope: _Scope, in_shape: tuple[int, ...]) -> tuple[int, ...] | str:
    op = node.op_type
    attrs = _attrs(node)
    if op == "Flatten":
        axis = attrs.get("axis", 1) % (len(in_shape) + 1) if in_shape else 0
        return (int(np.prod(in_shape[:axis])), int(np.prod(in_shape[axis:])))
    if op in ("Squeeze", "Unsqueeze"):
        if "axes" in attrs:
            axes = list(attrs["axes"])
        elif len(node.input) > 1 and node.input[1]:
            t = _const_tensor(scope, node.input[1])
            values = _small_values(t)
            if values is None:
                return f"{op} axes are computed at run time or stored outside the model"
            axes = [int(v) for v in values.ravel()]
        elif op == "Squeeze":
            return tuple(d for d in in_shape if d != 1)
        else:
            return "Unsqueeze without axes"
        if op == "Squeeze":
            dropped = {a % len(in_shape) for a in axes}
            return tuple(d for i, d in enumerate(in_shape) if i not in dropped)
        rank = len(in_shape) + len(axes)
        inserted = {a % rank for a in axes}
        it = iter(in_shape)
        return tuple(1 if i in inserted else next(it) for i in range(rank))
    # Reshape
    values = _small_values(_const_tensor(scope, node.input[1]) if len(node.input) > 1 else None)
    if values is None:
        return "Reshape target shape is computed at run time or stored outside the model"
    target = [int(v) for v in values.ravel()]
    if not attrs.get("allowzero", 0):
        target = [in_shape[i] if v == 0 and i < len(in_shape) else v for i, v in enumerate(target)]
    if target.count(-1) == 1:
        known = int(np.prod([v for v in target if v != -1]))
        target[target.index(-1)] = int(np.prod(in_shape)) // known if known else 0
    if int(np.prod(target)) != int(np.prod(in_shape)):
        return f"Reshape from {in_shape} to {tuple(target)} does not match"
    return tuple(target)


def _map_reshape_axis(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> int | None:
    """The input axis holding output axis ``axis`` at the same memory stride, if any."""
    length = out_shape[axis]
    outer = int(np.prod(out_shape[:axis]))
    for j, d in enumerate(in_shape):
        if d == length and int(np.prod(in_shape[:j])) == outer:
            return j
    return None


def _map_axis(tr: _Trace, consumer_axis: int) -> tuple[int | None, tuple[int, ...], str]:
    """Map the consumer-side axis back to the stored tensor; also return the consumer-side shape."""
    assert tr.tensor is not None and tr.owner is not None
    shapes = [tuple(int(d) for d in tr.tensor.dims)]
    # Forward: shapes after each op, from the stored tensor to the consumer.
    for node in reversed(tr.chain):
        cur = shapes[-1]
        if node.op_type == "Transpose":
            perm = _attrs(node).get("perm", list(range(len(cur)))[::-1])
            shapes.append(tuple(cur[p] for p in perm))
        elif node.op_type in _RESHAPES:
            res = _reshape_target(node, tr.owner, cur)
            if isinstance(res, str):
                return None, (), res
            shapes.append(res)
        else:
            shapes.append(cur)
    consumer_shape = shapes[-1]
    if not -len(consumer_shape) <= consumer_axis < len(consumer_shape):
        return None, consumer_shape, f"weight of rank {len(consumer_shape)}"
    axis = consumer_axis % len(consumer_shape)
    # Backward: from the consumer to the stored tensor.
    for k, node in enumerate(tr.chain):
        out_shape = shapes[len(shapes) - 1 - k]
        in_shape = shapes[len(shapes) - 2 - k]
        if node.op_type == "Transpose":
            perm = _attrs(node).get("perm", list(range(len(in_shape)))[::-1])
            axis = int(perm[axis])
        elif node.op_type in _RESHAPES:
            mapped = _map_reshape_axis(in_shape, out_shape, axis)
            if mapped is None:
                return (
                    None,
                    consumer_shape,
                    (f"{node.op_type} {in_shape}->{out_shape} does not keep the reduction axis intact"),
                )
            axis = mapped
    return axis, consumer_shape, ""


def _quant(tr: _Trace) -> tuple[Quant | None, str]:
    """The DequantizeLinear on the path, its zero point, and a reason if it is unsupported."""
    assert tr.owner is not None
    dq = next((n for n in tr.chain if n.op_type == "DequantizeLinear"), None)
    if dq is None:
        return None, ""
    if _attrs(dq).get("block_size", 0):
        return None, "blocked quantization (block_size) is not supported"
    zps = []
    for n in tr.chain:
        if n.op_type in ("DequantizeLinear", "QuantizeLinear") and len(n.input) > 2 and n.input[2]:
            zp_values = _small_values(_const_tensor(tr.owner, n.input[2]))
            if zp_values is None:
                return None, f"{n.op_type} zero point is computed at run time or stored outside the model"
            zps.append(zp_values)
        if n.op_type in ("DequantizeLinear", "QuantizeLinear") and len(n.input) > 1:
            if _const_tensor(tr.owner, n.input[1]) is None:
                return None, f"{n.op_type} scale is computed at run time"
    idx = tr.chain.index(dq)
    direct = all(n.op_type == "Identity" for n in tr.chain[idx + 1 :])
    zp = None
    if zps:
        zp = np.concatenate([np.asarray(z, dtype=np.float32).ravel() for z in zps])
    return Quant(node=tr.owner.names[id(dq)], zero_point=zp, direct=direct), ""


# --------------------------------------------------------------------------- shapes / MACs


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large main-graph initializers carry dims but no data.

    Shape inference needs shapes, not weights; serializing hundreds of MB of weights
    for it would dominate the run time of ``inspect`` and ``prune`` on large models.
    """
    skel = onnx.ModelProto(ir_version=model.ir_version)
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    g, src = skel.graph, model.graph
    g.name = src.name
    for part in ("node", "input", "output", "value_info"):
        getattr(g, part).extend(getattr(src, part))
    inits = src.initializer
    small = [t for t in inits if t.data_location != TensorProto.EXTERNAL and len(t.raw_data) < 4096]
    big = [t for t in inits if not (t.data_location != TensorProto.EXTERNAL and len(t.raw_data) < 4096)]
    g.initializer.extend(small)
    for t in big:
        stub = g.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
    return skel


def _value_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Per-sample static shapes of main-graph values (symbolic dims count as 1)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=False)
    except Exception as exc:  # shape inference is best effort
        logger.debug("shape inference failed: %s", exc)
        inferred = model
    shapes: dict[str, tuple[int, ...]] = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = []
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1)
        shapes[vi.name] = tuple(dims)
    return shapes


def _macs(op: str, node: onnx.NodeProto, consumer_shape, out_shape, axis_len: int) -> int | None:
    if out_shape is None or not consumer_shape:
        return None
    n_out = int(np.prod(out_shape))
    if op == "Conv":
        return n_out * int(np.prod(consumer_shape[1:]))
    if op == "ConvTranspose":
        return None
    return n_out * axis_len


# --------------------------------------------------------------------------- main entry


def find_weight_sites(model: onnx.ModelProto, macs: bool = True) -> list[WeightSite]:
    """Every Conv/ConvTranspose/Gemm/MatMul weight in ``model`` with its axis and verdict.

    Pure analysis: reads tensor shapes and small constants (zero points, reshape targets),
    never the weights themselves, and changes nothing. ``macs=False`` skips shape
    inference (``WeightSite.macs`` is then None).
    """
    shapes = _value_shapes(model) if macs else {}
    pending: list[dict[str, Any]] = []
    # who uses each stored tensor / chain value: (owner scope id, name) -> [(scope, node, idx)]
    uses: dict[tuple[int, str], list[tuple[_Scope, onnx.NodeProto, int]]] = {}
    outputs: set[tuple[int, str]] = set()
    scopes = list(_walk_scopes(model))
    for scope in scopes:
        for o in scope.outputs:
            found = scope.resolve(o)
            if found:
                outputs.add((id(found[2]), o))
        for node in scope.nodes:
            for idx, name in enumerate(node.input):
                found = scope.resolve(name) if name else None
                if found:
                    uses.setdefault((id(found[2]), name), []).append((scope, node, idx))
    for scope in scopes:
        for node in scope.nodes:
            if node.op_type not in rules.WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            pending.append(_site_fields(scope, node, shapes))

    # Sharing: every consumer of a stored tensor must agree on its axis, and nothing else may use it.
    by_source: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for f in pending:
        if f["_owner"] is not None:
            by_source.setdefault((id(f["_owner"]), f["weight"]), []).append(f)
    for key, group in by_source.items():
        _apply_sharing(key, group, uses, outputs)

    sites = []
    index = qdq.GraphIndex(model)
    for f in pending:
        if not f["scope"] and f["node_proto"] is not None and f["node_proto"].input:
            node = f["node_proto"]
            f["int8"] = qdq.int8_io(index, node, f["activation"], node.input[f["input_index"]], f["axis"])
        feat: tuple[int, int] | None = f["_features"]
        f = {k: v for k, v in f.items() if not k.startswith("_")}
        f["eligible"] = not f["reason"]
        int8 = f["int8"] is not None and f["int8"].possible
        f["likely_sparse_kernel"] = (
            f["eligible"] and feat is not None and rules.likely_sparse_kernel(feat[0], feat[1], int8=int8)
        )
        sites.append(WeightSite(**f))
    return sites


def _site_fields(scope: _Scope, node: onnx.NodeProto, shapes) -> dict[str, Any]:
    op = node.op_type
    attrs = _attrs(node)
    name = scope.names[id(node)]
    widx = 1
    if op == "Gemm" and len(node.input) > 1:
        # A constant A (and computed B) makes A the weight.
        a_tr, b_tr = _trace(scope, node.input[0]), _trace(scope, node.input[1])
        if b_tr.failure and not a_tr.failure:
            widx = 0
    wname = node.input[widx] if len(node.input) > widx else ""
    bias = node.input[2] if len(node.input) > 2 and node.input[2] and op in ("Conv", "Gemm", "ConvTranspose") else None
    activation = node.input[1 - widx] if len(node.input) > 1 else ""
    tr = _trace(scope, wname) if wname else _Trace(chain=[], failure="node has no weight input")
    consumer_axis = rules.reduction_axis(op, widx, attrs)
    f: dict[str, Any] = dict(
        node=name,
        op=op,
        scope=scope.prefix.rstrip("/"),
        input_index=widx,
        activation=activation,
        bias=bias,
        weight=tr.weight or wname,
        source=tr.source,
        path=tuple(n.op_type for n in reversed(tr.chain)),
        shape=tuple(int(d) for d in tr.tensor.dims) if tr.tensor is not None else (),
        consumer_shape=(),
        dtype="",
        axis=None,
        consumer_axis=consumer_axis,
        reason="",
        likely_sparse_kernel=False,
        params=int(np.prod(tr.tensor.dims)) if tr.tensor is not None else 0,
        macs=None,
        attributes=MappingProxyType(attrs),
        quant=None,
        int8=None,
        tensor=tr.tensor,
        node_proto=node,
        _owner=tr.owner,
        _chain=tr.chain,
        _scope=scope,
        _features=None,
    )

    def verdict() -> str:
        reason = rules.op_rule(op)
        if tr.failure:
            return reason or tr.failure
        assert tr.tensor is not None
        try:
            dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tr.tensor.data_type))
            # numpy holds strings as "object": name them as ONNX does.
            f["dtype"] = onnx.TensorProto.DataType.Name(tr.tensor.data_type).lower() if dt.kind == "O" else dt.name
        except (KeyError, ValueError, TypeError):
            f["dtype"] = onnx.TensorProto.DataType.Name(tr.tensor.data_type).lower()
        axis, consumer_shape, why = _map_axis(tr, consumer_axis if consumer_axis is not None else 0)
        if op == "MatMul" and len(consumer_shape) > 2 and not why:
            # A batched weight [..., K, N] reduces along its second-to-last axis, not the batch axis.
            f["consumer_axis"] = len(consumer_shape) - 2
            axis, consumer_shape, why = _map_axis(tr, f["consumer_axis"])
        f["consumer_shape"] = consumer_shape
        if why:
            return reason or why
        f["axis"] = axis
        out_shape = shapes.get(node.output[0]) if not scope.prefix else None
        axis_len = consumer_shape[f["consumer_axis"]] if f["consumer_axis"] is not None else 0
        f["macs"] = _macs(op, node, consumer_shape, out_shape, axis_len)
        if reason:
            return reason
        reason = rules.rank_rule(op, len(consumer_shape))
        if reason:
            return reason
        quant, why = _quant(tr)
        f["quant"] = quant
        if why:
            return why
        reason = rules.dtype_rule(f["dtype"], quant is not None)
        if reason:
            return reason
        if quant is not None:
            reason = rules.zero_point_rule(quant.zero_point, f["dtype"])
            if reason:
                return reason
        group = int(attrs.get("group", 1))
        reason = rules.channels_rule(op, axis_len, group)
        if reason:
            return reason
        if op == "Conv":
            in_feat = axis_len * int(np.prod(consumer_shape[2:]))
            out_feat = consumer_shape[0]
        else:
            in_feat = axis_len
            out_feat = (
                consumer_shape[1 - consumer_axis] if len(consumer_shape) == 2 and consumer_axis is not None else 0
            )
        f["_features"] = (in_feat, out_feat)
        return ""

    f["reason"] = verdict()
    return f


def _apply_sharing(key, group: list[dict[str, Any]], uses, outputs) -> None:
    # Nodes on the weight paths and the weight inputs of the consumers are expected uses.
    chain_ids = {id(n) for f in group for n in f["_chain"]}
    consumer_inputs = {(id(f["node_proto"]), f["input_index"]) for f in group}
    foreign: list[str] = []
    frontier = [key]
    seen = set()
    while frontier:
        k = frontier.pop()
        if k in seen:
            continue
        seen.add(k)
        if k in outputs:
            foreign.append(f"graph output {k[1]!r}")
        for scope, n, idx in uses.get(k, []):
            if (id(n), idx) in consumer_inputs:
                continue
            if id(n) in chain_ids and idx == 0:
                frontier.append((id(scope), n.output[0]))
                continue
            if id(n) in chain_ids:
                continue  # scale / zero point / shape inputs of a chain op
            foreign.append(f"{n.op_type} {scope.names[id(n)]}")
    if foreign:
        for f in group:
            if not f["reason"]:
                f["reason"] = f"weight also feeds {foreign[0]}, which pruning would change"
        return
    axes = {f["node"]: f["axis"] for f in group if f["axis"] is not None}
    if len(set(axes.values())) > 1:
        for f in group:
            others = [n for n, a in axes.items() if a != f["axis"] and n != f["node"]]
            if not f["reason"] and others:
                f["reason"] = f"shared with {', '.join(others)} on another axis"
    # One ineligible consumer makes the shared weight ineligible for all (we cannot prune half a tensor).
    bad = [f for f in group if f["reason"]]
    if bad and len(group) > 1:
        for f in group:
            if not f["reason"]:
                f["reason"] = f"shared with {bad[0]['node']}, which is not eligible ({bad[0]['reason']})"
