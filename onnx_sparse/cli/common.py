"""Option groups shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = [
    "add_model_arg",
    "add_selection_args",
    "selection_kwargs",
    "preflight",
    "script_path",
    "add_table_args",
    "table_width",
    "add_data_args",
    "load_feeds",
]


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Path to the ONNX model (external data is read from beside it).")


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Layer selection")
    group.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="REGEX",
        help="Only nodes whose name matches (repeatable).",
    )
    group.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="Skip nodes whose name matches (repeatable).",
    )
    group.add_argument(
        "--op",
        dest="ops",
        action="append",
        default=[],
        choices=["Conv", "ConvTranspose", "Gemm", "MatMul"],
        help="Only these op types (repeatable).",
    )
    group.add_argument(
        "--min-channels",
        type=int,
        default=0,
        metavar="N",
        help="Only layers whose input (reduction) and output channels are both at least N.",
    )


def selection_kwargs(args: argparse.Namespace) -> dict:
    return dict(include=args.include, exclude=args.exclude, ops=args.ops, min_channels=args.min_channels)


def script_path(spec: str | None) -> str | None:
    """The file of a ``SCRIPT[:FUNC]`` option value (None if not given)."""
    if not spec:
        return None
    if ":" in spec and not Path(spec).exists():
        return spec.rsplit(":", 1)[0]
    return spec


def preflight(args: argparse.Namespace, **paths: Any) -> list[Any]:
    """The checks every tool runs before any work: selection regexes compile, and no output
    replaces an input or another output (see :func:`onnx_sparse.guard.check_run_paths`).
    Returns the models it loaded (``ModelFile``, in order), for the tool to use."""
    from onnx_sparse.guard import check_run_paths
    from onnx_sparse.recipe import compile_patterns

    compile_patterns(getattr(args, "include", ()) or (), "--include")
    compile_patterns(getattr(args, "exclude", ()) or (), "--exclude")
    return check_run_paths(**paths)


def add_table_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wide",
        action="store_true",
        help="Print tables with every column and full names (default: fit the terminal, 100 columns when not "
        "a terminal, shortening long names in the middle; -v also prints them wide).",
    )


def table_width(args: argparse.Namespace) -> int | None:
    """``width`` for :func:`onnx_sparse.report.format_table`: 0 (no limit) with --wide or -v, else the terminal's."""
    return 0 if getattr(args, "wide", False) or getattr(args, "verbose", 0) > 0 else None


def add_data_args(group: Any, seed_help: str = "Seed of the random data.") -> None:
    """The calibration-data options (Polygraphy's conventions), shared by ``prune`` and ``quantize``."""
    group.add_argument(
        "--load-inputs",
        nargs="+",
        default=[],
        metavar="PATH",
        help="Calibration feeds in Polygraphy JSON (e.g. from `polygraphy run --save-inputs`).",
    )
    group.add_argument(
        "--data-loader-script",
        metavar="SCRIPT[:FUNC]",
        help="Python script whose function (default load_data) returns an iterable of {input name: array}.",
    )
    group.add_argument(
        "--input-shapes",
        nargs="+",
        default=[],
        metavar="NAME:[SHAPE]",
        help="Shapes of dynamic inputs for random data, Polygraphy syntax: x:[1,3,224,224].",
    )
    group.add_argument("--seed", type=int, help=seed_help)
    group.add_argument("--iterations", type=int, help="Number of random samples (default 8; random data only).")
    group.add_argument("--calib-samples", type=int, metavar="N", help="Use at most N calibration samples.")


def load_feeds(args: argparse.Namespace, model: Any, limit: int | None) -> tuple[list[dict], bool]:
    """The calibration feeds named by :func:`add_data_args`'s options, and whether they are real data."""
    from onnx_sparse.calib.data import load_calibration

    return load_calibration(
        model,
        load_inputs_paths=args.load_inputs,
        data_loader_script=args.data_loader_script,
        input_shapes=args.input_shapes,
        seed=args.seed,
        iterations=args.iterations,
        limit=limit,
    )
