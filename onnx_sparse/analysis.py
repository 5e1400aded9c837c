"""What ``inspect`` and ``check`` report: one record per weight-bearing node, and a summary."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from onnx_sparse.graph.locate import WeightSite, find_weight_sites
from onnx_sparse.graph.weights import weight_stats
from onnx_sparse.io import ModelFile
from onnx_sparse.passes.annotate import read_annotations
from onnx_sparse.recipe import compile_patterns

__all__ = ["layout", "layer_records", "summarize", "select_sites", "int8_fields", "int8_cell"]

logger = logging.getLogger(__name__)


def layout(site: WeightSite) -> str:
    """How the stored weight is laid out relative to its groups of 4.

    ``channel`` ([K_out, C_in]: groups along the contiguous last axis, the layout of Conv
    and TensorRT's fully-connected kernels), ``reduction-first`` ([C_in, K_out]: the usual
    MatMul layout), ``conv``, or ``-`` when not traced.
    """
    if site.axis is None or not site.shape:
        return "-"
    if site.op in ("Conv", "ConvTranspose"):
        return "conv"
    if len(site.shape) == 2:
        return "channel" if site.axis == 1 else "reduction-first"
    return "-"


def select_sites(
    sites: Sequence[WeightSite],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    ops: Sequence[str] = (),
    min_channels: int = 0,
) -> list[WeightSite]:
    """Sites whose node name matches an ``include`` regex (all if none) and no ``exclude``
    regex, whose op is in ``ops`` (all if empty), and whose reduction axis and output
    channels are both at least ``min_channels``."""
    inc = compile_patterns(include, "--include")
    exc = compile_patterns(exclude, "--exclude")
    out = []
    for s in sites:
        if inc and not any(p.search(s.node) for p in inc):
            continue
        if any(p.search(s.node) for p in exc):
            continue
        if ops and s.op not in ops:
            continue
        if min_channels and s.axis is not None and s.consumer_shape:
            cin = s.consumer_shape[s.consumer_axis or 0]
            cout = s.consumer_shape[0] if s.op == "Conv" else s.consumer_shape[1 - (s.consumer_axis or 0)]
            if min(cin, cout) < min_channels:
                continue
        out.append(s)
    return out


def layer_records(mf: ModelFile, sites: Sequence[WeightSite] | None = None) -> list[dict[str, Any]]:
    """One JSON-ready record per site, with the weight's current 2:4 state."""
    sites = find_weight_sites(mf.model) if sites is None else sites
    notes = read_annotations(mf.model)
    records = []
    for s in sites:
        stats = weight_stats(s, mf) if s.tensor is not None else None
        records.append(
            {
                "node": s.node,
                "op": s.op,
                "weight": s.weight,
                "source": s.source,
                "path": list(s.path),
                "shape": list(s.shape),
                "dtype": s.dtype,
                "axis": s.axis,
                "layout": layout(s),
                "eligible": s.eligible,
                "reason": s.reason,
                "likely_sparse_kernel": s.likely_sparse_kernel,
                **int8_fields(s),
                "sparse_2of4": None if stats is None else stats.sparse_2of4,
                "violating_fraction": None if stats is None else stats.violating_fraction,
                "zero_fraction": None if stats is None else stats.zero_fraction,
                "params": s.params,
                "macs": s.macs,
                "annotations": notes.get(s.node, {}),
            }
        )
    return records


def int8_fields(site: WeightSite) -> dict[str, Any]:
    """The INT8 record fields: is each of input, weight, output INT8, and is sparse INT8 possible.

    ``None`` values where the layer was not analysed (subgraphs and functions).
    """
    io = site.int8
    if io is None:
        return {"int8_input": None, "int8_weight": None, "int8_output": None, "int8_missing": None,
                "sparse_int8_possible": None}  # fmt: skip
    return {
        "int8_input": not io.input,
        "int8_weight": not io.weight,
        "int8_output": not io.output,
        "int8_missing": io.reason,
        "sparse_int8_possible": bool(site.eligible and io.possible),
    }


def int8_cell(record: dict[str, Any]) -> str | None:
    """The compact INT8 column: ``yes`` (sparse INT8 possible), ``no: in,out`` (which are not INT8),
    or None for a float layer no Q/DQ touches (and layers not analysed)."""
    if record.get("int8_input") is None:
        return None
    short = {"int8_input": "in", "int8_weight": "w", "int8_output": "out"}
    missing = [v for k, v in short.items() if not record[k]]
    if len(missing) == 3:
        return None
    if not missing:
        return "yes" if record["eligible"] else "int8"
    return "no: " + ",".join(missing)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals: eligible layers, eligible share of parameters and MACs, share already 2:4."""
    eligible = [r for r in records if r["eligible"]]
    params = sum(r["params"] for r in records)
    e_params = sum(r["params"] for r in eligible)
    macs_known = all(r["macs"] is not None for r in records)
    macs = sum(r["macs"] or 0 for r in records)
    e_macs = sum(r["macs"] or 0 for r in eligible)
    sparse = [r for r in eligible if r["sparse_2of4"]]
    return {
        "layers": len(records),
        "eligible_layers": len(eligible),
        "sparse_layers": len(sparse),
        "params": params,
        "eligible_params": e_params,
        "eligible_params_share": e_params / params if params else 0.0,
        "macs": macs if macs_known else None,
        "eligible_macs": e_macs if macs_known else None,
        "eligible_macs_share": (e_macs / macs if macs else 0.0) if macs_known else None,
        "sparse_eligible_share": len(sparse) / len(eligible) if eligible else 0.0,
        "sparse_params_share": sum(r["params"] for r in sparse) / e_params if e_params else 0.0,
        "int8_layers": sum(1 for r in records if int8_cell(r) is not None),
        "sparse_int8_possible_layers": sum(1 for r in eligible if r.get("sparse_int8_possible")),
    }
