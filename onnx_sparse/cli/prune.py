"""``onnx-sparse prune MODEL -o OUT``: prune every eligible layer to 2:4, atomically and verified."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from onnx_sparse.api import prune_file
from onnx_sparse.cli.base import Tool
from onnx_sparse.cli.common import add_model_arg, add_selection_args, selection_kwargs
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.passes.prune import totals
from onnx_sparse.report import format_table, write_json

logger = logging.getLogger(__name__)


class PruneTool(Tool):
    name = "prune"
    help = "Prune every eligible Conv/Gemm/MatMul weight to the 2:4 pattern TensorRT needs."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_arg(parser)
        parser.add_argument("-o", "--output", metavar="PATH", help="Where to write the pruned model.")
        parser.add_argument("--in-place", action="store_true", help="Overwrite the input model (only with this flag).")
        add_selection_args(parser)
        parser.add_argument(
            "--fc-layout",
            action="store_true",
            help="First store fully-connected weights as [K_out, C_in] (MatMul -> Gemm transB=1), "
            "so groups of 4 run along the contiguous axis.",
        )
        parser.add_argument("--annotate", action="store_true", help="Write the verdict and result into the nodes.")
        parser.add_argument("--report", metavar="PATH", help="Write a JSON report (per layer and totals).")
        parser.add_argument(
            "--no-verify",
            action="store_true",
            help="Skip the onnx.checker and onnxruntime checks of the output (not recommended).",
        )

    def run(self, args: argparse.Namespace) -> int:
        if args.output is None and not args.in_place:
            raise OnnxSparseError("no output path", hint="pass -o OUT, or --in-place to overwrite the input")
        out = Path(args.output) if args.output else Path(args.model)
        result = prune_file(
            args.model,
            out,
            in_place=args.in_place,
            verify=not args.no_verify,
            fc_layout=args.fc_layout,
            annotate=args.annotate,
            **selection_kwargs(args),
        )
        records = [r for r in result.records if hasattr(r, "retained_magnitude")]
        if records:
            rows = [
                {
                    "nodes": ",".join(r.nodes),
                    "weight": r.weight,
                    "axis": r.axis,
                    "changed": f"{r.groups_changed}/{r.groups}",
                    "retained": r.retained_magnitude,
                }
                for r in records
            ]
            cols = [("nodes", "node(s)"), ("weight", "weight"), ("axis", "axis"), ("changed", "groups changed"),
                    ("retained", "retained |w|")]  # fmt: skip
            logger.info("%s", format_table(rows, cols))
        else:
            logger.warning("no eligible layers selected: nothing to prune")
        logger.info("wrote %s%s", out, "" if result.modified else " (no weight changed)")
        if args.report:
            write_json(
                args.report,
                {"model": str(args.model), "output": str(out), "layers": [r.to_json() for r in records],
                 "totals": totals(records)},
            )  # fmt: skip
            logger.info("wrote %s", args.report)
        return 0


TOOL = PruneTool()
