"""``onnx-sparse compare DENSE SPARSE``: run both models on the same inputs and judge the sparse one.

Options follow ``polygraphy run``: the same names, the same syntax (``--atol 1e-3 out:1e-2``,
``--input-shapes x:[1,3,224,224]``, ``--data-loader-script file.py:func``) and the same
parsing (Polygraphy's own helpers). Model-level criteria (``--min-cosine``, ``--min-top1``,
``--max-rel-l2``) decide; Polygraphy's element-wise check runs only with ``--atol``, ``--rtol``
or ``--check-error-stat``; with none of these, the defaults of
:data:`onnx_sparse.handoff.compare.DEFAULT_CRITERIA`. Exit status 1 when an output fails.
"""

from __future__ import annotations

import argparse
import logging
import numbers
from typing import Any

from onnx_sparse.cli.base import Tool
from onnx_sparse.cli.common import add_table_args, preflight, script_path, table_width
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


def _in_range(parsed: dict[str, Any] | None, what: str, low: float, high: float | None) -> dict[str, Any] | None:
    """``parsed`` unchanged when every value lies in [low, high]; a user error otherwise."""
    for name, value in (parsed or {}).items():
        if value < low or (high is not None and value > high):
            bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise OnnxSparseError(
                f"{what}: {value} is out of range (for {name or 'all outputs'}); it must be {bounds}",
                hint="shares are fractions: 0.9 means 90%" if high == 1.0 else None,
            )
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
        "and judge the sparse one by cosine, relative L2 and top-1 agreement (defaults: cosine >= 0.9, "
        "relative L2 <= 0.5, top-1 >= 0.9 on class probabilities); Polygraphy's element-wise check on request."
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

        crit = parser.add_argument_group(
            "Model-level criteria",
            "Any of these (or of the element-wise options below) replaces the defaults: cosine >= 0.9 and "
            "relative L2 <= 0.5 on every float output, top-1 agreement >= 0.9 on outputs that are class "
            "probabilities (rows that sum to 1). Integer and bool outputs must always match exactly.",
        )
        crit.add_argument(
            "--min-cosine",
            nargs="+",
            metavar="[NAME:]X",
            help="Fail a float output whose cosine similarity to the dense one (worst iteration) is below X.",
        )
        crit.add_argument(
            "--min-top1",
            nargs="+",
            metavar="[NAME:]X",
            help="Fail an output of class scores (float, last dim > 1) whose argmax agrees with the dense one "
            "on less than X of the rows (0..1).",
        )
        crit.add_argument(
            "--max-rel-l2",
            nargs="+",
            metavar="[NAME:]X",
            help="Fail a float output whose relative L2 error ||sparse - dense|| / ||dense|| (worst iteration) "
            "is above X.",
        )
        acc = parser.add_argument_group(
            "Element-wise check (as polygraphy run)",
            "Off unless one of these is given: a pruned model never meets Polygraphy's default 1e-5.",
        )
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
        add_table_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from onnx_sparse.handoff.compare import Criteria, DataSpec, compare_models
        from onnx_sparse.report import RESULT, format_table, write_json

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
        criteria = Criteria(
            min_cosine=_in_range(_parse_dict(args.min_cosine, "--min-cosine"), "--min-cosine", -1.0, 1.0),
            min_top1=_in_range(_parse_dict(args.min_top1, "--min-top1"), "--min-top1", 0.0, 1.0),
            max_rel_l2=_in_range(_parse_dict(args.max_rel_l2, "--max-rel-l2"), "--max-rel-l2", 0.0, None),
            atol=_parse_dict(args.atol, "--atol"),
            rtol=_parse_dict(args.rtol, "--rtol"),
            check_error_stat=stats,
        )
        report = compare_models(
            dense,
            sparse,
            backend=args.backend,
            data=data,
            criteria=criteria,
            load_outputs=args.load_outputs,
            save_outputs=args.save_outputs,
            save_inputs=args.save_inputs,
            fp16=args.fp16,
            providers=args.providers,
        )
        elementwise = report.criteria.elementwise
        rows = [
            {
                "output": o.name,
                "dtype": o.dtype,
                "shape": o.shape,
                "cosine": _fmt(o.cosine, ".5f"),
                "rel_l2": _fmt(o.rel_l2, ".3g"),
                "max_abs": _fmt(o.max_abs, ".3g"),
                "top1": None if o.top1 is None else f"{100 * o.top1:.1f}%" + (" (p)" if o.probabilities else ""),
                "exact": None if o.kind != "exact" else ("yes" if not o.mismatches else f"{o.mismatches} differ"),
                "elementwise": None if o.polygraphy_passed is None else ("PASSED" if o.polygraphy_passed else "FAILED"),
                "result": "PASSED" if o.passed else "FAILED",
            }
            for o in report.outputs
        ]
        cols = [("output", "output"), ("dtype", "dtype"), ("shape", "shape"), ("cosine", "cosine"),
                ("rel_l2", "rel L2"), ("max_abs", "max |err|"), ("top1", "top-1"), ("exact", "exact")]  # fmt: skip
        if elementwise:
            cols.append(("elementwise", "elemwise"))
        cols.append(("result", "result"))
        if report.runtimes:
            logger.info(
                "mean time per iteration: %s",
                ", ".join(f"{name} {1000 * t:.1f} ms" for name, t in report.runtimes.items()),
            )
        title = f"{report.sparse} vs. {report.dense}, {report.iterations} iteration(s)"
        table = format_table(
            rows, cols, width=table_width(args), keep=("output",), optional=("dtype", "max_abs", "exact", "shape")
        )
        logger.log(RESULT, "%s\n%s", title, table)
        logger.log(RESULT, "%s", criteria_line(report.criteria, report.defaults))
        for o in report.outputs:
            for reason in o.reasons:
                logger.error("output %r: %s", o.name, reason)
        if args.report:
            write_json(args.report, report.to_json())
            logger.info("wrote %s", args.report)
        passed = sum(o.passed for o in report.outputs)
        if report.passed:
            logger.log(RESULT, "all %d output(s) passed", passed)
            return 0
        logger.error("%d of %d output(s) failed", len(report.outputs) - passed, len(report.outputs))
        return 1


def _per(value: Any) -> str:
    if isinstance(value, dict):
        if set(value) == {""}:
            return str(value[""])
        return ", ".join(f"{k or 'others'}: {v}" for k, v in value.items())
    return str(value)


def criteria_line(criteria: Any, defaults: bool) -> str:
    """One line saying what decided PASS/FAIL."""
    parts = []
    if criteria.min_cosine is not None:
        parts.append(f"cosine >= {_per(criteria.min_cosine)}")
    if criteria.max_rel_l2 is not None:
        parts.append(f"rel L2 <= {_per(criteria.max_rel_l2)}")
    if criteria.min_top1 is not None:
        where = " on (p) outputs" if criteria.probabilities_only else ""
        parts.append(f"top-1 >= {_per(criteria.min_top1)}{where}")
    if criteria.elementwise:
        parts.append(
            f"element-wise atol {_per(criteria.atol if criteria.atol is not None else 1e-5)} "
            f"rtol {_per(criteria.rtol if criteria.rtol is not None else 1e-5)} "
            f"({_per(criteria.check_error_stat or 'elemwise')})"
        )
    parts.append("integers exact")
    head = "criteria (defaults)" if defaults else "criteria"
    return f"{head}: " + ", ".join(parts)


TOOL = CompareTool()
