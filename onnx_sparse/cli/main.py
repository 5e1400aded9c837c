"""Entry point of the ``onnx-sparse`` command (Polygraphy-style logging and framing).

Log lines look like Polygraphy's (``[V]``, ``[I]``, ``[W]``, ``[E]``); ``-v`` / ``-q`` step
the level (and ``-v`` shows tracebacks); every command ends with a ``PASSED`` or
``FAILED`` line. Exit status: 0 passed, 1 the check failed (e.g. weights not 2:4,
outputs differ), 2 a user error (bad file, bad option), 3 an internal error.

Every line goes through one formatter, which escapes control characters, bidi overrides and
NUL (names in a model are data, not terminal commands). SIGTERM (what ``timeout`` and CI
cancellation send) ends a run like Ctrl-C: temporary files are removed, exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

from onnx_sparse import __version__
from onnx_sparse.cli.base import Tool
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.report import printable

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
        text = printable(record.getMessage(), keep="\n")
        lines = [f"[{letter}] {line}" for line in text.split("\n")]
        if record.exc_info:
            lines.append(printable(self.formatException(record.exc_info), keep="\n"))
        return "\n".join(lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that ``finally`` blocks clean up."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Handler(logging.StreamHandler):
    """Writes records to stdout with any progress bar taken off the terminal first."""

    def emit(self, record: logging.LogRecord) -> None:
        from onnx_sparse.progress import suspended

        with suspended():
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A reader that went away (``onnx-sparse inspect m.onnx | head``) ends the output quietly:
        the rest goes to /dev/null instead of a "Logging error" traceback per line."""
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            return
        super().handleError(record)


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
    from onnx_sparse.cli.noise import quiet_third_party

    quiet_third_party()


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


def _caused_by_sigterm(exc: BaseException) -> bool:
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, Terminated):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _internal_error(exc: Exception, verbosity: int) -> int:
    logger.error(
        "internal error: %s: %s (rerun with -v for the traceback)",
        type(exc).__name__,
        exc,
        exc_info=verbosity > 0,
    )
    return EXIT_INTERNAL_ERROR


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
        with _sigterm_as_exception():
            status = args.tool.run(args)
    except KeyboardInterrupt as exc:
        logger.error("%s", "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted")
        status = EXIT_FAILED
    except Exception as exc:
        if _caused_by_sigterm(exc):  # e.g. a C extension or a wrapper turned ours into its own exception
            logger.error("terminated (SIGTERM)", exc_info=verbosity > 0)
            status = EXIT_FAILED
        elif isinstance(exc, OnnxSparseError):
            logger.error("%s", exc, exc_info=verbosity > 0)
            status = EXIT_USER_ERROR
        else:  # an internal bug: say so, show the traceback only with -v
            status = _internal_error(exc, verbosity)
    runtime = time.perf_counter() - start
    word = "PASSED" if status == 0 else "FAILED"
    line = f"{word} | Runtime: {runtime:.3f}s | Command: {command}"
    if status == 0:
        from onnx_sparse.report import RESULT

        logger.log(RESULT, "%s", line)  # kept by -q, like the result it closes
    else:
        logger.error("%s", line)
    return status
