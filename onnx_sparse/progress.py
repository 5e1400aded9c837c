"""A one-line progress bar for long per-layer loops (calibrated pruning, sensitivity).

Drawn on stderr only when stderr is a terminal and ``onnx_sparse`` logs at INFO or more
(so ``-q``, pipes, files and CI logs get none); ``ONNX_SPARSE_PROGRESS=0`` turns it off.
The CLI's log handler calls :func:`suspended` around every record, so log lines never land
in the middle of the bar. Without a bar, the per-layer ``[i/n]`` log lines are the progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

__all__ = ["Progress", "suspended", "line"]

_ACTIVE: list[Progress] = []


def _wanted(stream: TextIO) -> bool:
    if os.environ.get("ONNX_SPARSE_PROGRESS", "1") == "0":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and logging.getLogger("onnx_sparse").isEnabledFor(logging.INFO)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``with Progress(total, "sparsegpt") as bar: ... bar.update(note=layer_name)``.

    Args:
        total: Steps (layers) expected.
        label: What is running.
        stream: Where to draw (default stderr).
        enabled: Force drawing on or off (default: see the module docstring).
        width: Bar width in characters.
    """

    def __init__(
        self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool | None = None, width: int = 24
    ) -> None:
        self.total = max(0, int(total))
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _wanted(self.stream) if enabled is None else enabled
        self.width = width
        self.done = 0
        self.note = ""
        self.start = time.perf_counter()
        self._drawn = False

    def render(self, now: float | None = None) -> str:
        """The bar's text: ``label [=====>    ] 3/8  0:12 elapsed, ~0:20 left  note``."""
        elapsed = (time.perf_counter() if now is None else now) - self.start
        frac = self.done / self.total if self.total else 1.0
        full = int(frac * self.width)
        bar = "=" * full + (">" if full < self.width else "") + " " * max(0, self.width - full - 1)
        text = f"{self.label} [{bar}] {self.done}/{self.total}  {_clock(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f", ~{_clock(elapsed / self.done * (self.total - self.done))} left"
        return text + (f"  {self.note}" if self.note else "")

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more steps done; ``note`` names the last one."""
        self.done = min(self.total, self.done + n)
        self.note = note
        self.draw()

    def draw(self) -> None:
        shown = [b for b in _ACTIVE if b.enabled]
        if not self.enabled or (self in shown and shown[-1] is not self):
            return  # off, or a nested bar is showing
        columns = _columns(self.stream)
        self.stream.write("\r" + self.render()[: columns - 1] + "\033[K")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        _ACTIVE.append(self)
        self.draw()
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)


_MIN_NAME = 24  # a layer name is never cut below this (the tables' floor for names)
_LOG_PREFIX = 4  # "[I] "


def _inner_details(text: str) -> str:
    """``text`` with what sits in parentheses inside parentheses written ``(...)``: ``(3 rows, no
    refit (cross-validation kept the dense weights))`` -> ``(3 rows, no refit (...))``."""
    out, depth, skipping = [], 0, False
    for c in text:
        if c == "(":
            depth += 1
            if depth == 2:
                out.append("(...")
                skipping = True
                continue
        elif c == ")":
            depth -= 1
            if depth == 1:
                skipping = False
        if not skipping:
            out.append(c)
    return "".join(out)


def line(head: str, name: str, tail: str = "", width: int | None = None) -> str:
    """A per-layer log line ``head name tail`` that fits the terminal the way the tables do.

    When the line is too long, first the explanations nested in the details of ``tail`` give way
    (``(3 rows, no dense refit (...))``), then ``name`` (a layer's node name, or several joined
    by commas) is shortened in the middle with :func:`onnx_sparse.report.shorten`, the rule the
    tables use (``.../layer.0/.../query/MatMul``), down to 24 characters. The details themselves
    are never cut, so a line whose details alone are too long stays longer. Under ``-v``
    (``onnx_sparse`` logging at DEBUG) and with ``width`` 0 nothing is shortened; JSON reports
    always hold the full names.

    Args:
        head: What comes before the name (``"[3/18]"``).
        name: The layer's name.
        tail: What comes after it (``"asym 0.07s (2432 rows, loss 10.2)"``).
        width: Columns (default: :func:`onnx_sparse.report.terminal_width`, 100 when not a terminal).
    """
    from onnx_sparse.report import shorten, terminal_width

    full = " ".join(p for p in (head, name, tail) if p)
    if width == 0 or logging.getLogger("onnx_sparse").isEnabledFor(logging.DEBUG):
        return full
    room = (terminal_width() if width is None else width) - _LOG_PREFIX
    if len(full) <= room:
        return full
    tail = _inner_details(tail)
    fixed = len(" ".join(p for p in (head, tail) if p)) + 1
    return " ".join(p for p in (head, shorten(name, max(_MIN_NAME, room - fixed)), tail) if p)


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 100


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Take the active bars off the screen for a moment (to print a log line), then redraw them."""
    bars = [b for b in _ACTIVE if b.enabled]
    for b in bars:
        b.clear()
    try:
        yield
    finally:
        if bars:
            bars[-1].draw()
