"""``onnx-sparse build MODEL``: build a TensorRT engine with SPARSE_WEIGHTS and hold TensorRT to our prediction.

Builds with Polygraphy (:mod:`onnx_sparse.handoff.trt`), times it, optionally builds and times
the dense engine too (same model, same precision, no SPARSE_WEIGHTS), reads the builder's
``(Sparsity)`` lines and prints one row per weight node: our verdict against TensorRT's
eligible and picked lists, with every disagreement flagged. Needs TensorRT and a GPU.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from onnx_sparse.cli.base import Tool
from onnx_sparse.cli.common import add_model_arg, add_table_args, preflight, table_width
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph.names import display_name

logger = logging.getLogger(__name__)


class BuildTool(Tool):
    name = "build"
    help = (
        "Build a TensorRT engine with SPARSE_WEIGHTS (and optionally the dense one), time it, and compare "
        "TensorRT's sparse-eligible/picked layers with our prediction."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_arg(parser)
        add_table_args(parser)
        parser.add_argument("--dense-too", action="store_true", help="Also build and time the engine without sparsity.")
        parser.add_argument("--save-engine", metavar="PATH", help="Save the sparse engine.")
        parser.add_argument(
            "--iterations", type=int, default=50, metavar="N", help="Timed inferences per engine (default 50)."
        )
        parser.add_argument(
            "--fp16",
            action="store_true",
            help="fp16 engine: the FP16 builder flag on TensorRT < 11 (plus INT8 for Q/DQ models); "
            "on TensorRT >= 11 (no precision flags) the model is converted to fp16 first.",
        )
        parser.add_argument(
            "--int8",
            action="store_true",
            help="INT8 engine from an explicitly quantized (Q/DQ) model, e.g. from `onnx-sparse quantize` or "
            "`prune --int8`: the INT8 flag on TensorRT < 11, nothing on 11 (strongly typed). Never TensorRT's "
            "implicit INT8 calibration.",
        )
        parser.add_argument("--save-log", metavar="PATH", help="Write the sparse build's full builder log.")
        parser.add_argument("--report", metavar="PATH", help="Write latencies and the per-node table as JSON.")

    def run(self, args: argparse.Namespace) -> int:
        from onnx_sparse.handoff.trt import require_trt

        version = require_trt()  # first: without TensorRT this is the one error to show
        preflight(
            args, models=[args.model],
            writes=[("--save-engine", args.save_engine), ("--save-log", args.save_log), ("--report", args.report)],
        )  # fmt: skip
        from onnx_sparse.graph.locate import find_weight_sites
        from onnx_sparse.handoff.trt import build_engine, engine_layers, plan_precision, time_engine
        from onnx_sparse.handoff.trtlog import parse_trt_log
        from onnx_sparse.handoff.verdict import disagreements, format_verdict, reconcile
        from onnx_sparse.io import load_model
        from onnx_sparse.report import write_json

        if args.iterations < 1:
            raise OnnxSparseError(f"--iterations must be at least 1, got {args.iterations}")
        with tempfile.TemporaryDirectory(prefix="onnx-sparse-build-") as workdir:
            plan = plan_precision(args.model, args.fp16, workdir, int8=args.int8, version=version)
            logger.info("%s", plan.note)
            built_model = load_model(plan.path).model
            sites = find_weight_sites(built_model)
            node_names = [display_name(n, i) for i, n in enumerate(built_model.graph.node)]
            if not any(s.eligible for s in sites):
                logger.warning("no eligible weight in %s: TensorRT has nothing to run sparse", args.model)

            typed = plan.strongly_typed or None
            sparse = build_engine(
                plan.path, sparse=True, fp16=plan.fp16, int8=plan.int8, save_path=args.save_engine, strongly_typed=typed
            )
            try:
                layers = engine_layers(sparse.engine)
            except Exception as exc:  # the inspector is a second source; its failure must not stop the report
                logger.warning("could not read the engine's layer information: %s", exc)
                layers = []
            if args.save_log:
                Path(args.save_log).write_text(sparse.log + "\n")
                logger.info("wrote the builder log to %s", args.save_log)
            sparse_ms = time_engine(sparse.engine, iterations=args.iterations)
            logger.info("sparse engine: median %.3f ms over %d runs", sparse_ms, args.iterations)
            dense_ms = None
            if args.dense_too:
                dense = build_engine(
                    plan.path, sparse=False, fp16=plan.fp16, int8=plan.int8, strongly_typed=typed, detailed=False
                )
                dense_ms = time_engine(dense.engine, iterations=args.iterations)
                logger.info("dense engine:  median %.3f ms over %d runs", dense_ms, args.iterations)
                logger.info("sparse speedup: %.3fx (dense / sparse latency)", dense_ms / sparse_ms)

        parsed = parse_trt_log(sparse.log)
        if parsed.eligible_counts or parsed.picked_counts:
            logger.info(
                "TensorRT: %d layer(s) eligible for sparse tactics, %d chose them (%d report(s) in the log)",
                parsed.eligible_count, parsed.picked_count, max(len(parsed.eligible_counts), len(parsed.picked_counts)),
            )  # fmt: skip
        if not parsed.found:
            logger.warning(
                "the builder log has no (Sparsity) lines: TensorRT's verdict is unknown (TensorRT %s may log them "
                "at another level; rerun with -vv to see the log)",
                version,
            )
        rows = reconcile(sites, parsed, node_names, engine_layers=layers)
        logger.info("per node: our prediction vs. TensorRT\n%s", format_verdict(rows, width=table_width(args)))
        bad = disagreements(rows)
        if bad:
            logger.warning("%d disagreement(s) between our prediction and TensorRT (rows marked !)", len(bad))
        else:
            logger.info("TensorRT agrees with our prediction on every node")
        if args.report:
            write_json(
                args.report,
                {
                    "model": str(args.model),
                    "tensorrt": version,
                    "precision": plan.note,
                    "sparse_ms": sparse_ms,
                    "dense_ms": dense_ms,
                    "speedup": None if dense_ms is None else dense_ms / sparse_ms,
                    "trt_eligible": parsed.eligible,
                    "trt_picked": parsed.picked,
                    "trt_eligible_count": parsed.eligible_count,
                    "trt_picked_count": parsed.picked_count,
                    "engine_layers": [
                        {"name": x.name, "tactic": x.tactic, "sparse_weights": x.sparse_weights} for x in layers
                    ],
                    "nodes": [r.to_json() for r in rows],
                },
            )
            logger.info("wrote %s", args.report)
        return 0


TOOL = BuildTool()
