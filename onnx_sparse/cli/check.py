"""``onnx-sparse check MODEL``: exit 0 only if every eligible layer already follows 2:4."""

from __future__ import annotations

import argparse
import logging

from onnx_sparse.analysis import layer_records, select_sites
from onnx_sparse.cli.base import Tool
from onnx_sparse.cli.common import (
    add_model_arg,
    add_selection_args,
    add_table_args,
    preflight,
    selection_kwargs,
    table_width,
)
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.report import fmt_share, format_table

logger = logging.getLogger(__name__)


class CheckTool(Tool):
    name = "check"
    help = "Exit 0 only if every eligible layer's weight already satisfies 2:4; list the violators otherwise."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_arg(parser)
        add_selection_args(parser)
        add_table_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        (mf,) = preflight(args, models=[args.model])
        sites = [s for s in select_sites(find_weight_sites(mf.model), **selection_kwargs(args)) if s.eligible]
        records = layer_records(mf, sites)
        bad = [r for r in records if not r["sparse_2of4"]]
        if not records:
            logger.warning("no eligible layers to check")
            return 0
        if bad:
            rows = [r | {"violating": fmt_share(r["violating_fraction"])} for r in bad]
            cols = [
                ("node", "node"),
                ("op", "op"),
                ("weight", "weight"),
                ("axis", "axis"),
                ("violating", "groups > 2 of 4"),
            ]
            logger.error(
                "%d of %d eligible layers are not 2:4:\n%s",
                len(bad),
                len(records),
                format_table(rows, cols, width=table_width(args), keep=("node",), optional=("weight", "axis", "op")),
            )
            return 1
        logger.info("all %d eligible layers are 2:4", len(records))
        return 0


TOOL = CheckTool()
