"""``onnx-sparse inspect MODEL``: which layers TensorRT could run 2:4 sparse, and are they already?"""

from __future__ import annotations

import argparse
import json
import logging

from onnx_sparse.analysis import int8_cell, layer_records, select_sites, summarize
from onnx_sparse.cli.base import Tool
from onnx_sparse.cli.common import (
    add_model_arg,
    add_selection_args,
    add_table_args,
    preflight,
    selection_kwargs,
    table_width,
)
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.io import model_problem
from onnx_sparse.recipe import Recipe, read_provenance
from onnx_sparse.report import fmt_count, fmt_share, format_table, write_json

logger = logging.getLogger(__name__)

COLUMNS = [
    ("node", "node"),
    ("op", "op"),
    ("source_s", "source"),
    ("shape", "shape"),
    ("verdict", "eligible"),
    ("sparse_s", "2:4"),
    ("int8", "INT8"),
    ("macs_s", "MACs"),
    ("notes", "annotations"),
]
"""What fits a terminal (a column empty in every row, e.g. INT8 on a float model, is left out); ``--wide`` (and -v) prints :data:`WIDE_COLUMNS`."""

WIDE_COLUMNS = [
    ("node", "node"),
    ("op", "op"),
    ("weight", "weight"),
    ("source_s", "source"),
    ("shape", "shape"),
    ("axis", "axis"),
    ("layout", "layout"),
    ("verdict", "eligible / reason"),
    ("sparse_2of4", "2:4"),
    ("int8", "INT8"),
    ("violating", "violating"),
    ("params_s", "params"),
    ("macs_s", "MACs"),
    ("notes", "annotations"),
]

_SOURCES = {"initializer": "init", "outer_initializer": "outer init", "constant": "Constant"}
_PATH_OPS = {"DequantizeLinear": "DQ", "QuantizeLinear": "Q"}


def source_text(source: str, path: list[str] | tuple[str, ...]) -> str:
    """Where a weight comes from, tensor first: ``init``, ``Constant``, ``init>DQ>Transpose``, ``init>Cast``
    (``-`` when the weight is not a stored tensor)."""
    if not source:
        return "-"
    return ">".join([_SOURCES.get(source, source), *(_PATH_OPS.get(op, op) for op in path)])


def table_rows(records):
    rows = []
    for r in records:
        verdict = (
            ("yes" + (" (large)" if r["likely_sparse_kernel"] else "")) if r["eligible"] else ("no: " + r["reason"])
        )
        rows.append(
            r
            | {
                "verdict": verdict,
                "violating": None if r["violating_fraction"] is None else fmt_share(r["violating_fraction"]),
                "source_s": source_text(r["source"], r["path"]),
                "sparse_s": None
                if r["sparse_2of4"] is None
                else ("yes" if r["sparse_2of4"] else f"no ({100 * (r['violating_fraction'] or 0):.0f}%)"),
                "params_s": fmt_count(r["params"]),
                "macs_s": fmt_count(r["macs"]),
                "int8": int8_cell(r),
                "notes": ",".join(f"{k}={v}" for k, v in sorted(r["annotations"].items()) if k != "reason") or None,
            }
        )
    return rows


def summary_line(s: dict) -> str:
    macs = "" if s["eligible_macs_share"] is None else f", {fmt_share(s['eligible_macs_share'])} of MACs"
    return (
        f"{s['eligible_layers']} of {s['layers']} layers eligible ({fmt_share(s['eligible_params_share'])} of "
        f"parameters{macs}); {s['sparse_layers']} of {s['eligible_layers']} eligible layers already 2:4 "
        f"({fmt_share(s['sparse_params_share'])} of eligible parameters)"
    )


def provenance_line(made: dict) -> str:
    """How the model was pruned, from its metadata (:func:`onnx_sparse.recipe.read_provenance`):
    the method and every setting that differs from its default (the full recipe is in --json)."""
    recipe = made.get("recipe")
    if isinstance(recipe, dict):
        try:
            defaults = Recipe(method=recipe.get("method")).resolve(has_data=True).to_dict()
        except OnnxSparseError:  # a method this version does not know
            defaults = Recipe().to_dict()
        shown = {k: v for k, v in recipe.items() if k == "method" or (k != "format" and defaults.get(k, v) != v)}
        text = " ".join(f"{k}={json.dumps(v)}" for k, v in shown.items())
    else:
        text = str(recipe)
    calib = made.get("calibration")
    data = (
        f"calibration data: {calib.get('samples')} samples, {str(calib.get('digest'))[:19]}"
        if isinstance(calib, dict)
        else "no calibration data"
    )
    return f"made by onnx-sparse {made.get('version')} with recipe {text}; {data}"


class InspectTool(Tool):
    name = "inspect"
    help = "Show every Conv/Gemm/MatMul weight, whether TensorRT can run it 2:4 sparse and whether it already is."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_arg(parser)
        add_selection_args(parser)
        parser.add_argument("--json", metavar="PATH", help="Also write the records as JSON.")
        add_table_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        (mf,) = preflight(args, models=[args.model], writes=[("--json", args.json)])
        sites = select_sites(find_weight_sites(mf.model), **selection_kwargs(args))
        records = layer_records(mf, sites)
        summary = summarize(records)
        if records:
            width = table_width(args)
            logger.info(
                "%s",
                format_table(
                    table_rows(records),
                    WIDE_COLUMNS if width == 0 else COLUMNS,
                    width=width,
                    keep=("node",),
                    optional=("macs_s", "shape", "op"),
                ),
            )
        else:
            logger.info("no Conv, ConvTranspose, Gemm or MatMul layers found")
        logger.info("%s", summary_line(summary))
        if summary["int8_layers"]:
            logger.info(
                "%d of %d eligible layers sparse INT8 possible (INT8 input, weight and output)",
                summary["sparse_int8_possible_layers"], summary["eligible_layers"],
            )  # fmt: skip
        made = read_provenance({p.key: p.value for p in mf.model.metadata_props})
        if made is not None:
            logger.info("%s", provenance_line(made))
        problem = model_problem(mf)  # the model as loaded, not the file again
        if problem is None:
            logger.info("onnx.checker (full check): the model is valid")
        else:
            logger.warning("onnx.checker (full check): the model is invalid: %s", problem)
        if args.json:
            doc = {"model": str(args.model), "layers": records, "summary": summary, "checker": problem or "valid"}
            if made is not None:
                doc["made_by"] = made
            write_json(args.json, doc)
            logger.info("wrote %s", args.json)
        return 0


TOOL = InspectTool()
