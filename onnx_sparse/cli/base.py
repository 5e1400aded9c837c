"""The shape of a subcommand: one :class:`Tool` per module, a few lines into the library."""

from __future__ import annotations

import argparse
import logging

__all__ = ["Tool"]

logger = logging.getLogger(__name__)


class Tool:
    """A CLI subcommand.

    Subclasses set ``name`` and ``help``, add their options in :meth:`add_arguments` and do
    their work in :meth:`run`, which returns the exit status (0 success, 1 check failed).
    User errors are raised as :class:`onnx_sparse.OnnxSparseError`; the CLI prints them as
    one ``[E]`` line and exits 2 (or 1 where the tool says so).
    """

    name: str = ""
    help: str = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this tool's options to its sub-parser."""

    def run(self, args: argparse.Namespace) -> int:
        """Do the work; return the exit status."""
        raise NotImplementedError
