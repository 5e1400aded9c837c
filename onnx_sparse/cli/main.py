"""Entry point of the ``onnx-sparse`` command (Polygraphy-style logging and framing).

Log lines look like Polygraphy's (``[V]``, ``[I]``, ``[W]``, ``[E]``); ``-v`` / ``-q`` step
the level (and ``-v`` shows tracebacks); every command ends with a ``PASSED`` or
``FAILED`` line. Exit status: 0 passed, 1 the check failed (e.g. weights not 2:4,
outputs differ), 2 a user error (bad file, bad option), 3 an internal error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from onnx_sparse import __version__
from onnx_sparse.cli.base import Tool
from onnx_sparse.errors import OnnxSparseError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("onnx_sparse.cli")

# Subcommand modules, each exposing TOOL (a Tool instance). Imported lazily in build_parser
# so that ``onnx-sparse inspect`` never pays for importing Polygraphy's comparator.
_TOOL_MODULES = (
    "onnx_sparse.cli.inspect",
    "onnx_sparse.cli.check",
    "onnx_sparse.cli.prune",
    "onnx_sparse.cli.quantize",
    "onnx_sparse.cli.compare",
    "onnx_sparse.cli.build",
)

_LETTERS = {
    logging.DEBUG: "V",
    logging.INFO: "I",
    logging.WARNING: "W",
    logging.ERROR: "E",
    logging.CRITICAL: "!",
}

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        letter = _LETTERS.get(record.levelno, "I")
        text = record.getMessage()
        lines = [f"[{letter}] {line}" for line in text.splitlines() or [""]]
        if record.exc_info:
            lines.append(self.formatException(record.exc_info))
        return "\n".join(lines)


class _Handler(logging.StreamHandler):
    """Writes records to stdout with any progress bar taken off the terminal first."""

    def emit(self, record: logging.LogRecord) -> None:
        from onnx_sparse.progress import suspended

        with suspended():
            super().emit(record)


def _setup_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(max(verbosity, -2), logging.DEBUG)
    root = logging.getLogger("onnx_sparse")
    for h in list(root.handlers):
        if not isinstance(h, logging.NullHandler):
            root.removeHandler(h)
    handler = _Handler(sys.stdout)
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def _tools() -> list[Tool]:
    tools = []
    for mod_name in _TOOL_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:  # a subcommand not built yet
            if exc.name == mod_name:
                continue
            raise
        tools.append(mod.TOOL)
    return tools


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for all subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="More output (repeatable); shows tracebacks."
    )
    common.add_argument("-q", "--quiet", action="count", default=0, help="Less output (repeatable).")
    parser = argparse.ArgumentParser(
        prog="onnx-sparse",
        description="Take an ONNX model to NVIDIA 2:4 structured sparsity and prove what that did.",
    )
    parser.add_argument("--version", action="version", version=f"onnx-sparse {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    sub.required = True
    for tool in _tools():
        p = sub.add_parser(tool.name, help=tool.help, description=tool.help, parents=[common])
        tool.add_arguments(p)
        p.set_defaults(tool=tool)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = args.verbose - args.quiet
    _setup_logging(verbosity)
    start = time.perf_counter()
    command = "onnx-sparse " + " ".join(argv)
    try:
        status = args.tool.run(args)
    except OnnxSparseError as exc:
        logger.error("%s", exc, exc_info=verbosity > 0)
        status = EXIT_USER_ERROR
    except KeyboardInterrupt:
        logger.error("interrupted")
        status = EXIT_FAILED
    except Exception as exc:  # an internal bug: say so, show the traceback only with -v
        logger.error(
            "internal error: %s: %s (rerun with -v for the traceback)",
            type(exc).__name__,
            exc,
            exc_info=verbosity > 0,
        )
        status = EXIT_INTERNAL_ERROR
    runtime = time.perf_counter() - start
    word = "PASSED" if status == 0 else "FAILED"
    line = f"{word} | Runtime: {runtime:.3f}s | Command: {command}"
    if status == 0:
        logger.info("%s", line)
    else:
        logger.error("%s", line)
    return status
