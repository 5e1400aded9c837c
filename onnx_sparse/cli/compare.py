"""``onnx-sparse compare DENSE SPARSE``: run both models on the same inputs and check their outputs.

Options follow ``polygraphy run``: the same names, the same syntax (``--atol 1e-3 out:1e-2``,
``--input-shapes x:[1,3,224,224]``, ``--data-loader-script file.py:func``) and the same
parsing (Polygraphy's own helpers). Exit status 1 when an output fails.
"""

from __future__ import annotations

import argparse
import logging
import numbers
from typing import Any

from onnx_sparse.cli.base import Tool
from onnx_sparse.cli.common import preflight, script_path
from onnx_sparse.errors import OnnxSparseError

logger = logging.getLogger(__name__)

_STATS = ("max", "mean", "median", "elemwise", "quantile")


def _fmt(x: float | None, spec: str = ".6g") -> str | None:
    return None if x is None else format(x, spec)


def _parse_dict(values: list[str] | None, what: str, number: bool = True) -> dict[str, Any] | None:
    """Polygraphy's ``[name:]value`` list syntax (``""`` is the default key)."""
    if values is None:
        return None
    from polygraphy.exception import PolygraphyException
    from polygraphy.tools.args import util as args_util

    try:
        parsed = args_util.parse_arglist_to_dict(values)
    except PolygraphyException as exc:
        raise OnnxSparseError(f"{what}: {exc}") from exc
    for name, value in parsed.items():
        if number and (not isinstance(value, numbers.Number) or isinstance(value, bool)):
            raise OnnxSparseError(f"{what}: {value!r} is not a number (for {name or 'all outputs'})")
    return parsed


def _parse_val_range(values: list[str] | None) -> dict[str, tuple] | None:
    if values is None:
        return None
    from polygraphy.exception import PolygraphyException
    from polygraphy.tools.args import util as args_util

    try:
        parsed = args_util.parse_arglist_to_dict(values, cast_to=lambda x: tuple(args_util.cast(x)))
    except PolygraphyException as exc:
        raise OnnxSparseError(f"--val-range: {exc}") from exc
    for name, rng in parsed.items():
        if len(rng) != 2 or not all(isinstance(v, numbers.Number) for v in rng):
            raise OnnxSparseError(
                f"--val-range: expected [min,max] for {name or 'all inputs'}, got {rng}",
                hint="for example --val-range [0,1] input_ids:[0,30522]",
            )
    return parsed


def _parse_shapes(values: list[str] | None) -> dict[str, tuple] | None:
    if values is None:
        return None
    from polygraphy.exception import PolygraphyException
    from polygraphy.tools.args import util as args_util

    try:
        meta = args_util.parse_meta(values, includes_dtype=False)
    except PolygraphyException as exc:
        raise OnnxSparseError(f"--input-shapes: {exc}") from exc
    shapes = {}
    for name, m in meta.items():
        if m.shape is None:
            raise OnnxSparseError(f"--input-shapes: no shape for {name!r}", hint="for example x:[1,3,224,224]")
        shapes[name] = tuple(m.shape)
    return shapes


class CompareTool(Tool):
    name = "compare"
    help = (
        "Run the dense and the sparse model on the same inputs (ONNX-Runtime or TensorRT via Polygraphy) "
        "and check the outputs: Polygraphy's tolerances plus cosine, relative L2, max error, top-1."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "models",
            nargs="*",
            metavar="MODEL",
            help="DENSE SPARSE: the two ONNX models; or just SPARSE with --load-outputs DENSE.json; "
            "or none with --load-outputs holding both runs. Put options after the models.",
        )
        backend = parser.add_argument_group("Backend").add_mutually_exclusive_group()
        backend.add_argument(
            "--onnxrt",
            dest="backend",
            action="store_const",
            const="onnxrt",
            default="onnxrt",
            help="Run with ONNX-Runtime (default).",
        )
        backend.add_argument(
            "--trt",
            dest="backend",
            action="store_const",
            const="trt",
            help="Run TensorRT engines (the sparse one built with SPARSE_WEIGHTS); needs TensorRT and a GPU.",
        )
        parser.add_argument(
            "--fp16",
            action="store_true",
            help="With --trt: fp16 engines (FP16 flag on TensorRT < 11; fp16 model conversion on 11).",
        )
        parser.add_argument(
            "--providers",
            nargs="+",
            metavar="PROVIDER",
            help="ONNX-Runtime execution providers, as in polygraphy (default: cpu).",
        )

        data = parser.add_argument_group("Data loader (as polygraphy run)")
        custom = data.add_mutually_exclusive_group()
        custom.add_argument(
            "--load-inputs",
            "--load-input-data",
            dest="load_inputs",
            nargs="+",
            metavar="PATH",
            default=[],
            help="Inputs saved by --save-inputs (Polygraphy JSON file, or per-iteration folder).",
        )
        custom.add_argument(
            "--data-loader-script",
            metavar="SCRIPT[:FUNC]",
            help="A Python script whose function (default load_data) yields feed dicts.",
        )
        data.add_argument("--seed", type=int, help="Seed for the random inputs.")
        data.add_argument(
            "--val-range",
            nargs="+",
            metavar="[NAME:][MIN,MAX]",
            help="Range of the random inputs, e.g. --val-range [0,1] input_ids:[0,30522].",
        )
        data.add_argument(
            "--input-shapes",
            "--inputs",
            dest="input_shapes",
            nargs="+",
            metavar="NAME:SHAPE",
            help="Shapes of dynamic inputs, e.g. --input-shapes image:[1,3,224,224].",
        )
        data.add_argument(
            "--iterations", "--iters", dest="iterations", type=int, help="Number of random input sets (default 1)."
        )
        data.add_argument("--save-inputs", metavar="PATH", help="Save the inputs used (Polygraphy JSON).")

        acc = parser.add_argument_group("Accuracy (as polygraphy run, plus --min-cosine)")
        acc.add_argument(
            "--atol", "--abs-tol", dest="atol", nargs="+", metavar="[NAME:]ATOL", help="Absolute tolerance(s)."
        )
        acc.add_argument(
            "--rtol",
            "--rel-tol",
            dest="rtol",
            nargs="+",
            metavar="[NAME:]RTOL",
            help="Relative tolerance(s), relative to the dense output.",
        )
        acc.add_argument(
            "--check-error-stat",
            nargs="+",
            metavar="[NAME:]STAT",
            help=f"Error statistic to check: {', '.join(_STATS)} (default elemwise).",
        )
        acc.add_argument(
            "--min-cosine",
            nargs="+",
            metavar="[NAME:]X",
            help="Fail a float output whose cosine similarity (worst iteration) is below X.",
        )
        io = parser.add_argument_group("Saved outputs (Polygraphy RunResults JSON)")
        io.add_argument("--save-outputs", "--save-results", dest="save_outputs", metavar="PATH", help="Save both runs.")
        io.add_argument(
            "--load-outputs",
            "--load-results",
            dest="load_outputs",
            nargs="+",
            metavar="PATH",
            default=[],
            help="Saved runs (e.g. from `polygraphy run --save-outputs`); they come before the live runs.",
        )
        parser.add_argument("--report", metavar="PATH", help="Write the figures as JSON.")

    def run(self, args: argparse.Namespace) -> int:
        from onnx_sparse.handoff.compare import DataSpec, compare_models
        from onnx_sparse.report import format_table, write_json

        if len(args.models) > 2:
            raise OnnxSparseError(f"at most two models (DENSE SPARSE), got {len(args.models)}")
        preflight(
            args, models=args.models, reads=[("--data-loader-script", script_path(args.data_loader_script))],
            json_reads=[("--load-inputs", p) for p in args.load_inputs] + [("--load-outputs", p) for p in args.load_outputs],
            writes=[("--save-outputs", args.save_outputs), ("--save-inputs", args.save_inputs), ("--report", args.report)],
        )  # fmt: skip
        if args.fp16 and args.backend != "trt":
            raise OnnxSparseError("--fp16 applies to TensorRT engines only", hint="add --trt, or drop --fp16")
        stats = _parse_dict(args.check_error_stat, "--check-error-stat", number=False)
        for stat in (stats or {}).values():
            if stat not in _STATS:
                raise OnnxSparseError(f"--check-error-stat: {stat!r} is not one of {', '.join(_STATS)}")
        dense, sparse = (None, None)
        if len(args.models) == 2:
            dense, sparse = args.models
        elif len(args.models) == 1:
            sparse = args.models[0]
        data = DataSpec(
            load_inputs=tuple(args.load_inputs),
            data_loader_script=args.data_loader_script,
            seed=args.seed,
            val_range=_parse_val_range(args.val_range),
            input_shapes=_parse_shapes(args.input_shapes),
            iterations=args.iterations,
        )
        report = compare_models(
            dense,
            sparse,
            backend=args.backend,
            data=data,
            atol=_parse_dict(args.atol, "--atol"),
            rtol=_parse_dict(args.rtol, "--rtol"),
            check_error_stat=stats,
            min_cosine=_parse_dict(args.min_cosine, "--min-cosine"),
            load_outputs=args.load_outputs,
            save_outputs=args.save_outputs,
            save_inputs=args.save_inputs,
            fp16=args.fp16,
            providers=args.providers,
        )
        rows = [
            {
                "output": o.name,
                "dtype": o.dtype,
                "shape": o.shape,
                "cosine": _fmt(o.cosine, ".6f"),
                "rel_l2": _fmt(o.rel_l2, ".3e"),
                "max_abs": _fmt(o.max_abs, ".3e"),
                "top1": None if o.top1 is None else f"{100 * o.top1:.1f}%",
                "exact": None if o.kind != "exact" else ("yes" if not o.mismatches else f"{o.mismatches} differ"),
                "polygraphy": "PASSED" if o.polygraphy_passed else "FAILED",
                "result": "PASSED" if o.passed else "FAILED",
            }
            for o in report.outputs
        ]
        cols = [("output", "output"), ("dtype", "dtype"), ("shape", "shape"), ("cosine", "cosine"),
                ("rel_l2", "rel L2"), ("max_abs", "max |err|"), ("top1", "top-1"), ("exact", "exact"),
                ("polygraphy", "polygraphy"), ("result", "result")]  # fmt: skip
        title = f"{report.sparse} vs. {report.dense} ({report.iterations} iteration(s))"
        logger.info("%s\n%s", title, format_table(rows, cols))
        for o in report.outputs:
            for reason in o.reasons:
                logger.error("output %r: %s", o.name, reason)
        if args.report:
            write_json(args.report, report.to_json())
            logger.info("wrote %s", args.report)
        passed = sum(o.passed for o in report.outputs)
        if report.passed:
            logger.info("all %d output(s) passed", passed)
            return 0
        logger.error("%d of %d output(s) failed", len(report.outputs) - passed, len(report.outputs))
        return 1


TOOL = CompareTool()
