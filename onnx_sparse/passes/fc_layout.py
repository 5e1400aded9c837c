"""Store fully-connected weights as ``[K_out, C_in]``, so groups of 4 run along the contiguous axis.

MatMul stores its constant weight as ``[C_in, K_out]``: the groups of 4 run down the
columns (stored axis 0). Conv and TensorRT's fully-connected kernels keep the reduction
axis last (``[K_out, C_in]``, stored axis 1), which is also what
:func:`onnx_sparse.analysis.layout` calls ``channel``. This pass rewrites the main graph's
eligible fully-connected weights into that layout, editing the ModelProto at the protobuf
level so that everything else stays byte-identical:

* MatMul with a 2-D activation -> Gemm ``transB=1`` (same node name, output, doc_string
  and metadata_props), fed by the transposed constant. Needs opset >= 11 (optional Gemm
  bias); below that, or for bfloat16 before opset 13, it takes the next case.
* MatMul with a higher-rank (or unknown-rank) activation -> stays a MatMul, fed by a new
  ``Transpose(perm=[1, 0])`` of the ``[K_out, C_in]`` constant, inserted right before it
  (TensorRT folds it into the weight).
* Gemm ``transB=0`` -> ``transB=1``.

The transposed weight is written through the stored tensor (initializer or ``Constant``
node, through ``Identity``, ``Cast``, ``DequantizeLinear`` and ``QuantizeLinear``); the
stored name stays, its dims are swapped, and a per-axis Q/DQ on the path gets its ``axis``
remapped (1 -> 0). ``value_info`` entries of the stored tensor and of the values on its
path are swapped too. A weight shared by several nodes is transposed once.

Left as they are (with a logged reason): ineligible sites, sites outside the main graph,
paths through Transpose or a reshape, Gemm weights on input A, weights that are also a
graph input or are read anywhere else (including inside a subgraph), and shared weights
whose consumers would not all be converted. Running the pass on its own output changes
nothing: converted weights are traced with stored axis 1.

Note: a Transpose inserted before an unnamed node shifts the ``<OpType>_<i>`` display
names (:mod:`onnx_sparse.graph.locate`) of the unnamed nodes after it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from onnx_sparse.analysis import layout
from onnx_sparse.graph.locate import WeightSite, find_weight_sites
from onnx_sparse.io import ModelFile
from onnx_sparse.passes.base import Pass, PassResult, unique_name

__all__ = ["LayoutRecord", "FcLayoutPass"]

logger = logging.getLogger(__name__)

# Ops the pass rewrites through: same shape in and out, so every value on the path is transposed too.
_PATH_OPS = ("Identity", "Cast", "DequantizeLinear", "QuantizeLinear")
_QUANT_OPS = ("DequantizeLinear", "QuantizeLinear")
_GEMM_MIN_OPSET = 11  # Gemm's bias C is optional from opset 11
_GEMM_BF16_OPSET = 13
_SUFFIX = "/fc_layout_transpose"


@dataclass(frozen=True)
class LayoutRecord:
    """What the pass did to one stored weight (shared by ``nodes``)."""

    nodes: tuple[str, ...]
    weight: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    changes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Plan:
    """One consumer of a weight and how it will be rewritten."""

    site: WeightSite
    node: onnx.NodeProto
    chain: list[onnx.NodeProto]  # consumer side first
    action: str  # "gemm", "transpose" or "transB"


# --------------------------------------------------------------------------- graph facts


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto.Tensor]:
    """Main-graph value types after shape inference (best effort: failures leave ranks unknown)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # shape inference is best effort
        logger.debug("shape inference failed: %s", exc)
        inferred = model
    g = inferred.graph
    out: dict[str, onnx.TypeProto.Tensor] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi.type.tensor_type
    return out


def _rank(types: dict[str, onnx.TypeProto.Tensor], name: str) -> int | None:
    tt = types.get(name)
    if tt is None or not tt.HasField("shape"):
        return None
    return len(tt.shape.dim)


def _subgraph_inputs(graph: onnx.GraphProto) -> Iterator[str]:
    """Every name a node inside a subgraph of ``graph`` reads (conservatively, shadowing ignored)."""
    for node in graph.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                for n in sub.node:
                    yield from n.input
                yield from _subgraph_inputs(sub)


def _all_names(model: onnx.ModelProto) -> set[str]:
    """Node names and value names anywhere in the main graph and its subgraphs."""
    names: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in g.input)
        names.update(v.name for v in g.output)
        names.update(v.name for v in g.value_info)
        for n in g.node:
            names.add(n.name)
            names.update(n.input)
            names.update(n.output)
            for a in n.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    visit(sub)

    visit(model.graph)
    return names


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def _const_dims(graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto], name: str) -> list[int] | None:
    for t in graph.initializer:
        if t.name == name:
            return list(t.dims)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        value = _attr(node, "value")
        if value is not None:
            return list(value.t.dims)
    return None


# --------------------------------------------------------------------------- planning


class _Graph:
    """Main-graph lookups: producers, uses, names read by subgraphs, graph outputs and inputs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.graph = g
        self.producers: dict[str, onnx.NodeProto] = {o: n for n in g.node for o in n.output if o}
        self.uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in g.node:
            for i, name in enumerate(n.input):
                if name:
                    self.uses.setdefault(name, []).append((n, i))
        self.subgraph_reads = set(_subgraph_inputs(g))
        self.outputs = {o.name for o in g.output}
        self.inputs = {i.name for i in g.input}

    def chain(self, site: WeightSite, node: onnx.NodeProto) -> list[onnx.NodeProto] | str:
        """The path nodes from ``node``'s weight input back to the stored tensor, or why not."""
        cur = node.input[site.input_index]
        chain: list[onnx.NodeProto] = []
        while cur != site.weight:
            producer = self.producers.get(cur)
            if producer is None or producer.op_type not in _PATH_OPS or len(chain) > 16:
                return f"cannot follow the weight path at {cur!r}"
            chain.append(producer)
            cur = producer.input[0]
        return chain


def _site_verdict(site: WeightSite, opset: int, types) -> str:
    """The action for one site ("gemm", "transpose", "transB"), or "skip: <reason>"."""
    if not site.eligible:
        return f"skip: not eligible ({site.reason})"
    if site.scope:
        return "skip: not in the main graph"
    if site.source not in ("initializer", "constant"):
        return f"skip: weight source {site.source or 'unknown'}"
    if site.input_index != 1:
        return "skip: the weight is Gemm input A"
    if len(site.shape) != 2 or site.consumer_shape != site.shape:
        return f"skip: stored shape {site.shape} is not what the node sees ({site.consumer_shape})"
    if site.axis == 1:
        return "skip: already [K_out, C_in]"
    if any(op not in _PATH_OPS for op in site.path):
        return f"skip: weight path {'->'.join(site.path)} changes the layout"
    if site.axis != 0 or site.consumer_axis != 0:
        return f"skip: groups run on stored axis {site.axis}"
    if site.op == "Gemm":
        return "transB"
    act = types.get(site.activation)
    bf16 = act is not None and act.elem_type == TensorProto.BFLOAT16
    if _rank(types, site.activation) == 2 and opset >= _GEMM_MIN_OPSET and not (bf16 and opset < _GEMM_BF16_OPSET):
        return "gemm"
    return "transpose"


def _foreign_use(graph: _Graph, weight: str, plans: Sequence[_Plan]) -> str:
    """A use of the stored tensor or a value on its path other than the plans' own, if any."""
    chain_ids = {id(n) for p in plans for n in p.chain}
    consumer_inputs = {(id(p.node), p.site.input_index) for p in plans}
    frontier, seen = [weight], set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in graph.outputs:
            return f"{name!r} is a graph output"
        if name in graph.inputs:
            return f"{name!r} is also a graph input"
        if name in graph.subgraph_reads:
            return f"{name!r} is read inside a subgraph"
        for node, idx in graph.uses.get(name, []):
            if (id(node), idx) in consumer_inputs:
                continue
            if id(node) in chain_ids and idx == 0:
                frontier.extend(o for o in node.output if o)
                continue
            return f"{name!r} also feeds {node.op_type} {node.name or '(unnamed)'}"
    return ""


# --------------------------------------------------------------------------- rewriting


def _swap_value_info(graph: onnx.GraphProto, names: set[str]) -> list[str]:
    """Swap the two dims of rank-2 value_info entries named in ``names``."""
    changed = []
    for vi in graph.value_info:
        if vi.name not in names or not vi.type.HasField("tensor_type"):
            continue
        shape = vi.type.tensor_type.shape
        if vi.type.tensor_type.HasField("shape") and len(shape.dim) == 2:
            first, second = onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension()
            first.CopyFrom(shape.dim[1])
            second.CopyFrom(shape.dim[0])
            shape.dim[0].CopyFrom(first)
            shape.dim[1].CopyFrom(second)
            changed.append(vi.name)
    return changed


def _remap_quant_axis(node: onnx.NodeProto, graph: onnx.GraphProto, producers) -> str:
    """Per-axis Q/DQ: the axis of a 2-D tensor moves from ``a`` to ``1 - a``. Returns a change note."""
    if len(node.input) < 2:
        return ""
    scale = _const_dims(graph, producers, node.input[1])
    assert scale is not None, f"{node.op_type} {node.name}: scale is not a constant"  # locate rules it out
    if not scale:  # per-tensor (scalar scale): axis unused
        return ""
    attr = _attr(node, "axis")
    old = int(attr.i) if attr is not None else 1
    new = 1 - old % 2
    if attr is None:
        node.attribute.append(onnx.helper.make_attribute("axis", new))
    else:
        attr.i = new
    return f"{node.op_type} {node.name or '(unnamed)'}: axis {old} -> {new}"


def _insert(nodes, index: int, node: onnx.NodeProto) -> None:
    try:
        nodes.insert(index, node)
    except AttributeError:  # older protobuf: no insert on repeated message fields
        tail = []
        for n in nodes[index:]:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            tail.append(copy)
        del nodes[index:]
        nodes.add().CopyFrom(node)
        nodes.extend(tail)


class FcLayoutPass(Pass):
    """Store eligible fully-connected weights as ``[K_out, C_in]`` (functional).

    Cases (see the module docstring): MatMul + 2-D activation -> Gemm ``transB=1``;
    MatMul + higher/unknown-rank activation -> MatMul fed by ``Transpose(perm=[1, 0])``;
    Gemm ``transB=0`` -> ``transB=1``; shared weight (all consumers converted) ->
    transposed once; already ``[K_out, C_in]``, ineligible, or not safely rewritable ->
    untouched (``modified`` False when nothing changed). Records: one :class:`LayoutRecord`
    per transposed weight.
    """

    in_place = False

    def call(self, mf: ModelFile) -> PassResult:
        model = mf.model
        sites = [s for s in find_weight_sites(model) if s.op in ("MatMul", "Gemm")]
        opset = _opset(model)
        types = _value_types(model)
        graph = _Graph(model)

        groups: dict[tuple[str, str], list[WeightSite]] = {}
        for s in sites:
            if s.tensor is not None:
                groups.setdefault((s.scope, s.weight), []).append(s)

        records: list[LayoutRecord] = []
        inserts: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (before this node, insert)
        taken = _all_names(model)
        for (_, weight), group in groups.items():
            plans, why = self._plan(group, graph, opset, types)
            if why:
                # Worth telling: an eligible weight still stored [C_in, K_out]. The rest is expected.
                level = logging.INFO if any(s.eligible and layout(s) != "channel" for s in group) else logging.DEBUG
                logger.log(level, "fc-layout: left %s (weight %s) as it is: %s",
                           ", ".join(s.node for s in group), weight, why)  # fmt: skip
                continue
            records.append(self._apply(mf, plans, graph, taken, inserts))

        # Insert the Transposes last, from the back, so earlier indices stay valid.
        if inserts:
            position = {id(n): i for i, n in enumerate(model.graph.node)}
            for before, node in sorted(inserts, key=lambda x: position[id(x[0])], reverse=True):
                _insert(model.graph.node, position[id(before)], node)
        for r in records:
            logger.info("fc-layout: %s %s -> %s (%s)", r.weight, r.old_shape, r.new_shape, "; ".join(r.changes))
        return PassResult(mf, bool(records), records)

    def _plan(self, group: list[WeightSite], graph: _Graph, opset: int, types) -> tuple[list[_Plan], str]:
        plans = []
        for s in group:
            verdict = _site_verdict(s, opset, types)
            if verdict.startswith("skip: "):
                reason = verdict[len("skip: ") :]
                return [], reason if len(group) == 1 else f"shared with {s.node}: {reason}"
            assert s.node_proto is not None
            chain = graph.chain(s, s.node_proto)
            if isinstance(chain, str):
                return [], chain
            plans.append(_Plan(s, s.node_proto, chain, verdict))
        foreign = _foreign_use(graph, group[0].weight, plans)
        if foreign:
            return [], foreign
        return plans, ""

    def _apply(self, mf: ModelFile, plans: list[_Plan], graph: _Graph, taken: set[str], inserts) -> LayoutRecord:
        site = plans[0].site
        t = site.tensor
        assert t is not None
        old = tuple(int(d) for d in t.dims)
        new_shape = (old[1], old[0])
        value = np.ascontiguousarray(mf.read(t).T)
        del t.dims[:]
        t.dims.extend(new_shape)  # mf.write checks the value against the new dims
        mf.write(t, value)
        del value

        changes: list[str] = []
        chain_nodes = list({id(n): n for p in plans for n in p.chain}.values())
        for n in chain_nodes:
            if n.op_type in _QUANT_OPS:
                note = _remap_quant_axis(n, graph.graph, graph.producers)
                if note:
                    changes.append(note)
        names = {site.weight} | {o for n in chain_nodes for o in n.output if o}
        for name in _swap_value_info(graph.graph, names):
            changes.append(f"value_info {name}: dims swapped")
        for p in plans:
            node = p.node
            if p.action == "gemm":
                node.op_type = "Gemm"
                node.attribute.append(onnx.helper.make_attribute("transB", 1))
                changes.append(f"{p.site.node}: MatMul -> Gemm(transB=1)")
            elif p.action == "transB":
                attr = _attr(node, "transB")
                if attr is None:
                    node.attribute.append(onnx.helper.make_attribute("transB", 1))
                else:
                    attr.i = 1
                changes.append(f"{p.site.node}: Gemm transB 0 -> 1")
            else:
                out = unique_name(taken, p.site.node + _SUFFIX + "_output")
                tnode = onnx.helper.make_node(
                    "Transpose", [node.input[p.site.input_index]], [out], name=unique_name(taken, p.site.node + _SUFFIX),
                    perm=[1, 0],
                )  # fmt: skip
                node.input[p.site.input_index] = out
                inserts.append((node, tnode))
                changes.append(f"{p.site.node}: MatMul fed by Transpose {tnode.name}")
        return LayoutRecord(
            nodes=tuple(p.site.node for p in plans),
            weight=site.weight,
            old_shape=old,
            new_shape=new_shape,
            changes=tuple(changes),
        )

    def ensures(self, result: PassResult) -> None:
        done = {r.weight for r in result.records}
        if not done:
            return
        for s in find_weight_sites(result.model.model):
            if not s.scope and s.weight in done and (s.axis != 1 or layout(s) != "channel"):
                raise AssertionError(
                    f"{s.node}: weight {s.weight} is not [K_out, C_in] after fc-layout (axis {s.axis})"
                )
