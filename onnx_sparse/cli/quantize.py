"""``onnx-sparse quantize MODEL -o OUT``: INT8 Q/DQ for sparse INT8 TensorRT engines.

Calibration data as for ``prune`` (``--load-inputs``, ``--data-loader-script``, or seeded
random data with a loud warning). See :mod:`onnx_sparse.quant.static` for the settings.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnx_sparse.cli.base import Tool
from onnx_sparse.cli.common import add_data_args, add_model_arg, load_feeds, preflight, script_path
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.report import format_table, write_json

__all__ = ["QuantizeTool", "add_quantize_args", "quantize_options", "report_layers", "TOOL"]

logger = logging.getLogger(__name__)


def add_quantize_args(parser: argparse.ArgumentParser) -> None:
    """The quantization options (shared with ``prune --int8``)."""
    from onnx_sparse.quant import CALIBRATION_METHODS, LAYER_SETS

    group = parser.add_argument_group("INT8 quantization")
    group.add_argument(
        "--act-calibration",
        choices=CALIBRATION_METHODS,
        default=None,
        help="How activation scales are set from the calibration data: search (default: the clip with the "
        "smallest error in the layers that read the tensor), minmax, or percentile (see --act-percentile).",
    )
    group.add_argument(
        "--int8-layers",
        choices=LAYER_SETS,
        default=None,
        help="eligible (default): quantize the 2:4-eligible layers and leave the rest in float; "
        "all: every Conv/Gemm/MatMul with a weight (more INT8, less accuracy).",
    )
    group.add_argument(
        "--int8-max-error",
        type=float,
        metavar="E",
        help="Leave float every layer whose INT8 input or output loses more than this relative L2 error on the "
        "calibration data (e.g. 0.05), then quantize again; the table shows each layer's error.",
    )
    group.add_argument(
        "--int8-target-cosine",
        type=float,
        metavar="X",
        help="Fidelity target of the automatic mixed precision: the INT8 model's worst float output keeps this "
        "cosine to the FP32 model on held-out calibration feeds (every 4th, see --holdout), by leaving the most "
        "harmful layers float (each loses its sparse INT8 kernel; the table says which and what it cost). "
        "Default 0.99; -1 keeps every layer INT8.",
    )
    group.add_argument(
        "--int8-smooth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Per-channel outlier rescaling of the quantized tensors (SmoothQuant into the reading layers, output "
        "equalisation into the producing layer), chosen on held-out calibration feeds (default: on).",
    )
    group.add_argument(
        "--act-percentile",
        type=float,
        default=None,
        metavar="P",
        help="With --act-calibration percentile: the share of values the range covers (default 99.999).",
    )


def quantize_options(args: argparse.Namespace, selection: dict[str, Any] | None = None) -> Any:
    """The options of ``onnx-sparse quantize``: flags given on the command line over the defaults."""
    from onnx_sparse.quant import QuantizeOptions

    sel = selection or {}
    given = {"calibration": args.act_calibration, "percentile": args.act_percentile, "layers": args.int8_layers,
             "max_error": args.int8_max_error, "target_cosine": args.int8_target_cosine, "smooth": args.int8_smooth,
             "holdout": getattr(args, "holdout", None), "seed": getattr(args, "seed", None)}  # fmt: skip
    off = given["target_cosine"] is not None and given["target_cosine"] <= -1  # -1: every layer stays INT8
    given = {k: v for k, v in given.items() if v is not None}
    if off:
        given["target_cosine"] = None
    return QuantizeOptions(
        **given,
        include=tuple(sel.get("include", ())),
        exclude=tuple(sel.get("exclude", ())),
        ops=tuple(sel.get("ops", ())),
    )


def report_layers(layers: Sequence[Any]) -> None:
    """Log the per-layer INT8 table and a summary line."""
    rows = []
    for layer in layers:
        if layer.sparse_int8:
            state = "sparse INT8 possible"
        elif not layer.quantized:
            state = f"float: {layer.reason}"
        elif layer.int8 is None:
            state = "INT8 (not analysed)"
        elif layer.int8.possible:
            state = "INT8 (not 2:4)" if layer.eligible else "INT8 (not 2:4 eligible)"
        else:
            state = f"INT8 weight; not INT8: {layer.int8.reason}"
        err = layer.error
        error = None if err is None else "/".join("-" if e is None else f"{e:.1%}" for e in (err.input, err.output))
        rows.append({"node": layer.node, "op": layer.op, "state": state, "error": error})
    if rows:
        cols = [("node", "node"), ("op", "op"), ("state", "INT8 state"), ("error", "INT8 error in/out")]
        logger.info("%s", format_table(rows, cols))
    lost = [x for x in layers if x.eligible and not x.quantized and x.reason.startswith("mixed precision")]
    for x in lost:
        logger.info("lost its sparse INT8 kernel: %s (%s)", x.node, x.reason)
    sparse = sum(1 for layer in layers if layer.sparse_int8)
    eligible = sum(1 for layer in layers if layer.eligible)
    logger.info(
        "%d of %d layers INT8; %d of %d 2:4-eligible layers sparse INT8 possible (INT8 in, weight, out)",
        sum(1 for layer in layers if layer.quantized), len(layers), sparse, eligible,
    )  # fmt: skip


class QuantizeTool(Tool):
    name = "quantize"
    help = "Quantize a (pruned) model to INT8 Q/DQ so TensorRT can run its 2:4 layers with sparse INT8 kernels."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_arg(parser)
        parser.add_argument("-o", "--output", metavar="PATH", help="Where to write the Q/DQ model.")
        parser.add_argument("--in-place", action="store_true", help="Overwrite the input model (only with this flag).")
        parser.add_argument("--report", metavar="PATH", help="Write a JSON report (per layer).")
        parser.add_argument(
            "--no-verify", action="store_true", help="Skip the onnx.checker and onnxruntime checks of the output."
        )
        from onnx_sparse.cli.common import add_selection_args

        add_selection_args(parser)
        data = parser.add_argument_group("Calibration data (as for prune)")
        add_data_args(data)
        add_quantize_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from onnx_sparse.calib.data import RANDOM_DATA_WARNING
        from onnx_sparse.cli.common import selection_kwargs
        from onnx_sparse.quant import quantize_file

        if args.output is None and not args.in_place:
            raise OnnxSparseError("no output path", hint="pass -o OUT, or --in-place to overwrite the input")
        out = Path(args.output) if args.output else Path(args.model)
        (mf,) = preflight(
            args, models=[args.model], json_reads=[("--load-inputs", p) for p in args.load_inputs],
            reads=[("--data-loader-script", script_path(args.data_loader_script))],
            writes=[("--report", args.report)], model_output=out, in_place=args.in_place,
        )  # fmt: skip
        options = quantize_options(args, selection_kwargs(args))
        if args.min_channels:
            logger.warning("--min-channels is ignored by quantize")
        feeds, real = load_feeds(args, mf.model, args.calib_samples)
        result = quantize_file(args.model, out, feeds, options, in_place=args.in_place, verify=not args.no_verify)
        report_layers(result.layers)
        logger.info("wrote %s", out)
        if args.report:
            write_json(
                args.report,
                {"model": str(args.model), "output": str(out), "calibration": {"random": not real, "samples": len(feeds)},
                 "layers": [layer.to_json() for layer in result.layers]},
            )  # fmt: skip
            logger.info("wrote %s", args.report)
        if not real:
            logger.warning("%s", RANDOM_DATA_WARNING)
        return 0


TOOL = QuantizeTool()
