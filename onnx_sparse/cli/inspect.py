"""``onnx-sparse inspect MODEL``: which layers TensorRT could run 2:4 sparse, and are they already?"""

from __future__ import annotations

import argparse
import logging

from onnx_sparse.analysis import int8_cell, layer_records, select_sites, summarize
from onnx_sparse.cli.base import Tool
from onnx_sparse.cli.common import add_model_arg, add_selection_args, selection_kwargs
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.io import load_model
from onnx_sparse.report import fmt_count, fmt_share, format_table, write_json

logger = logging.getLogger(__name__)

COLUMNS = [
    ("node", "node"),
    ("op", "op"),
    ("weight", "weight"),
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


def table_rows(records):
    rows = []
    for r in records:
        verdict = (
            ("yes" + (" (likely sparse kernel)" if r["likely_sparse_kernel"] else ""))
            if r["eligible"]
            else ("no: " + r["reason"])
        )
        rows.append(
            r
            | {
                "verdict": verdict,
                "violating": None if r["violating_fraction"] is None else fmt_share(r["violating_fraction"]),
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


class InspectTool(Tool):
    name = "inspect"
    help = "Show every Conv/Gemm/MatMul weight, whether TensorRT can run it 2:4 sparse and whether it already is."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_arg(parser)
        add_selection_args(parser)
        parser.add_argument("--json", metavar="PATH", help="Also write the records as JSON.")

    def run(self, args: argparse.Namespace) -> int:
        mf = load_model(args.model)
        sites = select_sites(find_weight_sites(mf.model), **selection_kwargs(args))
        records = layer_records(mf, sites)
        summary = summarize(records)
        if records:
            logger.info("%s", format_table(table_rows(records), COLUMNS))
        else:
            logger.info("no Conv, ConvTranspose, Gemm or MatMul layers found")
        logger.info("%s", summary_line(summary))
        if summary["int8_layers"]:
            logger.info(
                "%d of %d eligible layers sparse INT8 possible (INT8 input, weight and output)",
                summary["sparse_int8_possible_layers"], summary["eligible_layers"],
            )  # fmt: skip
        if args.json:
            write_json(args.json, {"model": str(args.model), "layers": records, "summary": summary})
            logger.info("wrote %s", args.json)
        return 0


TOOL = InspectTool()
