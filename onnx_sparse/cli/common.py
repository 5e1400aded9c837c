"""Option groups shared by several subcommands."""

from __future__ import annotations

import argparse

__all__ = ["add_model_arg", "add_selection_args", "selection_kwargs", "add_table_args", "table_width"]


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
