"""Our prediction per node against what TensorRT's builder said, with every disagreement named.

Pure: takes the weight sites (:func:`onnx_sparse.graph.locate.find_weight_sites`), the parsed
builder log (:func:`onnx_sparse.handoff.trtlog.parse_trt_log`) and the model's node names, and
returns rows; no TensorRT needed. One row per weight-bearing node, in graph order, then one
row per eligible/picked TensorRT layer that maps to none of them.

Disagreements (``flags``):

* we call a node eligible, TensorRT did not list it (e.g. MatMuls Myelin took, NVIDIA/TensorRT#2271);
* TensorRT lists a node as eligible that we ruled out (our reason is quoted);
* we expected a sparse kernel and TensorRT ran dense (it times both and keeps the faster,
  NVIDIA/TensorRT#2169), or the other way round;
* TensorRT picked a sparse kernel for a layer it did not list as eligible (a cut log?);
* an eligible or picked layer whose ONNX nodes we cannot find, or that holds no weight we know.

A second source, where given: the engine inspector's per-layer ``TacticName`` (and
``HasSparseWeights``), which names the kernel each layer runs. Its layers are mapped to nodes the
same way; a tactic whose name says ``sparse`` is a sparse kernel. Where the log cannot tell per
node (no lines, or TensorRT 10/11 counts without names), TensorRT's eligible/chose columns come
from the inspector; where both tell and disagree on "chose", that is flagged too.

Where the log has no ``(Sparsity)`` lines at all (built without SPARSE_WEIGHTS, or the log
level hid them), the TensorRT columns are unknown and nothing is flagged. Nodes TensorRT
names only as part of a Myelin ``{ForeignNode[A...B]}`` range are marked "in range": TensorRT
does not say which nodes of the region it means, so they are not flagged either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from onnx_sparse.handoff.trtlog import SparsityLog, layer_nodes

__all__ = ["VerdictRow", "reconcile", "format_verdict", "disagreements"]

RANGE = "in range"


@dataclass(frozen=True)
class VerdictRow:
    """One node (or one unmatched TensorRT layer) and the two verdicts.

    Attributes:
        node: ONNX node name ("" for a TensorRT layer we could not map to a weight node).
        op: its op type ("" when unknown).
        eligible: our eligibility prediction (None for unmatched layers).
        likely_sparse: whether we expect TensorRT to pick a sparse kernel.
        reason: why we ruled the node out ("" when eligible).
        trt_eligible: TensorRT listed it as eligible; None when the log cannot tell.
        trt_picked: TensorRT picked a sparse kernel; None when the log cannot tell.
        in_range: TensorRT named it only as part of a ``{ForeignNode[A...B]}`` range.
        layers: the TensorRT layer names that contain this node.
        flags: every disagreement, one sentence each.
        sparse_int8: our view: sparse INT8 possible (INT8 input, weight, output); None if unknown.
        tactic: the engine inspector's tactic name(s) for the layer(s) holding this node.
        tactic_sparse: whether that tactic is a sparse kernel (None without the inspector).
    """

    node: str
    op: str
    eligible: bool | None
    likely_sparse: bool | None
    reason: str
    trt_eligible: bool | None
    trt_picked: bool | None
    in_range: bool = False
    layers: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    sparse_int8: bool | None = None
    tactic: str = ""
    tactic_sparse: bool | None = None

    @property
    def agrees(self) -> bool:
        return not self.flags

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op": self.op,
            "eligible": self.eligible,
            "likely_sparse_kernel": self.likely_sparse,
            "reason": self.reason,
            "trt_eligible": self.trt_eligible,
            "trt_picked": self.trt_picked,
            "in_range": self.in_range,
            "layers": list(self.layers),
            "flags": list(self.flags),
            "sparse_int8_possible": self.sparse_int8,
            "tactic": self.tactic,
            "tactic_sparse": self.tactic_sparse,
        }


@dataclass
class _Node:
    name: str
    op: str
    eligible: bool
    likely: bool
    reasons: list[str]
    int8: bool | None = None


def _site_nodes(sites: Iterable[Any]) -> tuple[dict[str, _Node], dict[str, str], dict[str, str]]:
    """Per node: merged verdict; raw name -> display name aliases; first output -> node."""
    nodes: dict[str, _Node] = {}
    aliases: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for s in sites:
        n = nodes.get(s.node)
        if n is None:
            n = nodes[s.node] = _Node(s.node, s.op, False, False, [])
        n.eligible |= bool(s.eligible)
        n.likely |= bool(getattr(s, "likely_sparse_kernel", False))
        io = getattr(s, "int8", None)
        if io is not None:
            n.int8 = bool(n.int8) or bool(s.eligible and io.possible)
        if not s.eligible and s.reason and s.reason not in n.reasons:
            n.reasons.append(s.reason)
        proto = getattr(s, "node_proto", None)
        if proto is not None:
            if proto.name and proto.name != s.node:
                aliases.setdefault(proto.name, s.node)
            if len(proto.output) and proto.output[0]:
                outputs.setdefault(proto.output[0], s.node)
    return nodes, aliases, outputs


def _map(
    layers: Sequence[str], names: list[str], outputs: Mapping[str, str], aliases: Mapping[str, str]
) -> tuple[dict[str, list[str]], dict[str, set[str]], list[tuple[str, list[str]]]]:
    """node -> layers naming it; node -> layers that reach it only through a range; layer -> nodes."""
    found_by: dict[str, list[str]] = {}
    ranged: dict[str, set[str]] = {}
    per_layer: list[tuple[str, list[str]]] = []
    for layer in layers:
        named, in_range = layer_nodes(layer, names, outputs)
        named = [aliases.get(n, n) for n in named]
        in_range = [aliases.get(n, n) for n in in_range if aliases.get(n, n) not in named]
        per_layer.append((layer, named + in_range))
        for node in named + in_range:
            found_by.setdefault(node, [])
            if layer not in found_by[node]:
                found_by[node].append(layer)
        for node in in_range:
            ranged.setdefault(node, set()).add(layer)
    return found_by, ranged, per_layer


def reconcile(
    sites: Iterable[Any],
    trt_log_result: SparsityLog,
    node_names: Sequence[str],
    outputs: Mapping[str, str] | None = None,
    engine_layers: Sequence[Any] = (),
) -> list[VerdictRow]:
    """Set our per-node prediction against TensorRT's eligible/picked lists.

    Args:
        sites: weight sites (anything with ``node``, ``op``, ``eligible``, ``reason``,
            ``likely_sparse_kernel``; ``node_proto`` is used when present to resolve TensorRT's
            names for unnamed nodes, ``node_of_<output>``).
        trt_log_result: the parsed builder log.
        node_names: every node name of the model that was built, in graph order.
        outputs: optional tensor name -> producing node name, for tensor-named layers.
        engine_layers: the engine inspector's layers (:class:`onnx_sparse.handoff.trt.EngineLayer`:
            ``name``, ``tactic``, ``sparse_weights``, ``sparse_tactic``), if TensorRT was there.

    Returns:
        Rows in graph order (nodes not in ``node_names`` last), then unmatched layers.
    """
    nodes, aliases, site_outputs = _site_nodes(sites)
    all_outputs = {**site_outputs, **(outputs or {})}
    names = list(node_names) + [a for a in aliases if a not in set(node_names)]
    names += [n for n in nodes if n not in set(names)]
    log = trt_log_result
    elig_map, elig_range, elig_layers = _map(log.eligible, names, all_outputs, aliases)
    pick_map, pick_range, pick_layers = _map(log.picked, names, all_outputs, aliases)

    by_name = {layer.name: layer for layer in engine_layers}
    insp_map, _, _ = _map(list(by_name), names, all_outputs, aliases)

    order = {n: i for i, n in enumerate(names)}
    rows: list[VerdictRow] = []
    for name in sorted(nodes, key=lambda n: order.get(n, len(order))):
        n = nodes[name]
        layers = tuple(dict.fromkeys(elig_map.get(name, []) + pick_map.get(name, [])))
        trt_e: bool | None = (name in elig_map) if log.eligible_known else None
        trt_p: bool | None = (name in pick_map) if log.picked_known else None
        held = [by_name[x] for x in insp_map.get(name, [])]
        tactic = " | ".join(dict.fromkeys(x.tactic for x in held if x.tactic))
        tactic_sparse: bool | None = any(x.sparse_tactic for x in held) if tactic else None
        if trt_p is None and tactic_sparse is not None:
            trt_p = tactic_sparse
        if trt_e is None and any(x.sparse_weights is not None for x in held):
            trt_e = any(bool(x.sparse_weights) for x in held)
        only_range = (name in elig_map and set(elig_map[name]) <= elig_range.get(name, set())) or (
            name in pick_map and set(pick_map[name]) <= pick_range.get(name, set())
        )
        flags: list[str] = []
        reason = "; ".join(n.reasons)
        if not only_range:
            if trt_e is not None and n.eligible and not trt_e:
                flags.append("we call it eligible; TensorRT did not list it as eligible")
            if trt_e and not n.eligible:
                flags.append(f"TensorRT lists it as eligible; we ruled it out: {reason or 'no reason given'}")
            if n.likely and trt_p is False and trt_e is not False:
                flags.append("we expected a sparse kernel; TensorRT ran it dense (dense timed faster)")
            if trt_p and not n.likely:
                flags.append("TensorRT picked a sparse kernel where we expected dense")
            if trt_p and trt_e is False:
                flags.append("TensorRT picked a sparse kernel for a layer it did not list as eligible")
            if log.picked_known and tactic_sparse is not None and (name in pick_map) != tactic_sparse:
                flags.append("the builder log and the engine's tactic disagree on whether it runs sparse")
        rows.append(
            VerdictRow(
                node=name,
                op=n.op,
                eligible=n.eligible,
                likely_sparse=n.likely,
                reason=reason,
                trt_eligible=trt_e,
                trt_picked=trt_p,
                in_range=only_range,
                layers=layers,
                flags=tuple(flags),
                sparse_int8=n.int8,
                tactic=tactic,
                tactic_sparse=tactic_sparse,
            )
        )

    # TensorRT layers that name no weight node we know.
    seen: set[str] = set()
    for kind, per_layer in (("eligible", elig_layers), ("picked", pick_layers)):
        for layer, found in per_layer:
            if layer in seen or any(f in nodes for f in found):
                continue
            seen.add(layer)
            if found:
                flag = f"TensorRT {kind} layer maps to {', '.join(found)}, which hold no weight we know of"
            else:
                flag = f"TensorRT {kind} layer matches no ONNX node"
            rows.append(
                VerdictRow(
                    node="",
                    op="",
                    eligible=None,
                    likely_sparse=None,
                    reason="",
                    trt_eligible=True if layer in log.eligible else (False if log.eligible_seen else None),
                    trt_picked=True if layer in log.picked else (False if log.picked_seen else None),
                    layers=(layer,),
                    flags=(flag,),
                )
            )
    return rows


def disagreements(rows: Iterable[VerdictRow]) -> list[VerdictRow]:
    """The rows with at least one flag."""
    return [r for r in rows if r.flags]


def _yn(v: bool | None, in_range: bool = False) -> str:
    if in_range and v:
        return RANGE
    return "?" if v is None else ("yes" if v else "no")


def format_verdict(rows: Sequence[VerdictRow], width: int | None = None) -> str:
    """A text table: node, op, our verdict, TensorRT's, and a ``!`` on every disagreement.

    ``width``: as :func:`onnx_sparse.report.format_table` (None: the terminal's, 0: no limit)."""
    from onnx_sparse.report import format_table

    table = [
        {
            "flag": "!" if r.flags else "",
            "node": r.node or "-",
            "op": r.op or "-",
            "ours": _yn(r.eligible),
            "int8": _yn(r.sparse_int8),
            "likely": _yn(r.likely_sparse),
            "trt_eligible": _yn(r.trt_eligible, r.in_range),
            "trt_picked": _yn(r.trt_picked, r.in_range),
            "layer": " | ".join(r.layers) or "-",
            "tactic": r.tactic or "-",
            "note": "; ".join(r.flags) or r.reason,
        }
        for r in rows
    ]
    cols = [("flag", ""), ("node", "node"), ("op", "op"), ("ours", "eligible (ours)"), ("int8", "sparse INT8 (ours)"),
            ("likely", "sparse kernel (ours)"), ("trt_eligible", "TRT eligible"), ("trt_picked", "TRT chose"),
            ("layer", "TRT layer"), ("tactic", "tactic"), ("note", "disagreement / reason")]  # fmt: skip
    return format_table(table, cols, width=width, keep=("node",), optional=("layer",))
