"""Records to text tables and JSON files (atomic writes)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnx_sparse import atomic
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.guard import output_path

__all__ = ["RESULT", "format_table", "shorten", "terminal_width", "write_json", "fmt_count", "fmt_share", "printable"]


def printable(text: str, keep: str = "") -> str:
    """``text`` safe for a terminal: control characters (ESC, NUL, ...), bidi overrides and other
    non-printable characters are written as Python escapes (``\\x1b``, ``\\u202e``); characters
    in ``keep`` (e.g. newline) stay. JSON output keeps the exact text."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in text)


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def fmt_count(n: int | None) -> str:
    """1234567 -> '1.23M' (None -> '-')."""
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


RESULT = logging.WARNING + 5
"""Log level of a command's result (its summary table and verdict): printed as ``[I]`` and kept by
``-q`` (which hides INFO), hidden by ``-qq``."""

LOG_PREFIX = 4
"""Width of the ``[I] `` letter that starts every log line a table is printed through."""

NOT_A_TERMINAL_WIDTH = 100


def terminal_width() -> int:
    """Columns of the terminal (``COLUMNS`` if set), or 100 when stdout is not a terminal."""
    return shutil.get_terminal_size(fallback=(NOT_A_TERMINAL_WIDTH, 24)).columns


def shorten(text: str, width: int, prefer: Sequence[int] = ()) -> str:
    """``text`` cut in the middle to at most ``width`` characters, keeping what tells names apart.

    A path (``/a/b/c``, no spaces) keeps its last component, then the last component that holds
    a digit (``layer.0``), then the others from the end, and writes ``...`` for each run it left
    out: ``/model/.../layer.0/.../self/MatMul_1``. Text with spaces first shortens the paths
    inside it (``(by Add /model/.../layer.0/.../key/Add)``), then writes ``(...)`` for what is in
    parentheses (``not supported (...)``), and what still does not fit keeps its start. Other text
    that does not fit keeps its start and its end joined by ``...``. ``prefer``: path components (negative indices, from the
    end) to keep right after the last one (what tells this name from a similar one).
    """
    if len(text) <= width:
        return text
    if width <= 3:
        return text[-width:] if width > 0 else ""
    if " " not in text and text.count("/") >= 2:
        short = _shorten_path(text, width, prefer)
        if short is not None:
            return short
    elif " " in text:
        tokens = text.split(" ")
        longest = max(range(len(tokens)), key=lambda i: len(tokens[i]) if tokens[i].count("/") >= 2 else -1)
        if tokens[longest].count("/") >= 2:
            room = width - (len(text) - len(tokens[longest]))
            short = _shorten_path(tokens[longest], max(room, 5))
            if short is not None:
                tokens[longest] = short
                text = " ".join(tokens)
                if len(text) <= width:
                    return text
        bare = re.sub(r"\(([^()]*)\)", lambda m: "(...)" if len(m.group(1)) > 3 else m.group(0), text)
        if len(bare) <= width:  # the words outside parentheses usually say what; the inside, details
            return bare
        return bare[: width - 3] + "..."  # a sentence: its start says what ("no: weight is computed...")
    keep = width - 3
    front = keep // 2
    return text[:front] + "..." + text[len(text) - (keep - front) :]


def _shorten_path(text: str, width: int, prefer: Sequence[int] = ()) -> str | None:
    parts = text.split("/")
    last = len(parts) - 1
    order = [last] + [len(parts) + k for k in prefer if -len(parts) <= k < -1]
    order += [i for i in range(last - 1, -1, -1) if any(ch.isdigit() for ch in parts[i])][:1]
    order += [i for i in range(last - 1, -1, -1) if i not in order]
    kept: set[int] = set()
    for i in order:
        trial = kept | {i}
        if len(_render_path(parts, trial)) <= width:
            kept = trial
        elif i == last:
            return None
    return _render_path(parts, kept)


def _render_path(parts: list[str], kept: set[int]) -> str:
    out: list[str] = []
    for i, part in enumerate(parts):
        if i in kept or (i == 0 and part == ""):
            out.append(part)
        elif not out or out[-1] != "...":
            out.append("...")
    return "/".join(out)


def _cell(v: Any) -> str:
    return printable(_plain(v))


def _plain(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (tuple, list)):
        return "x".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else ",".join(map(str, v))
    return str(v)


def _fit(natural: list[int], headers: list[int], room: int, keep: list[bool]) -> list[int]:
    """Column widths that fit ``room``: short columns (up to 12) stay whole, the long ones are cut down
    to one common cap (never below their header or 12), ``keep`` columns only after the others are
    at that floor; only if that is not enough is every column cut."""
    if sum(natural) <= room:
        return natural
    floors = [min(w, max(h, 12)) for w, h in zip(natural, headers, strict=True)]

    def capped(floors: list[int], flexible: list[bool]) -> list[int]:
        lo, hi = 0, max(natural)
        while lo < hi:  # the largest cap that fits
            cap = (lo + hi + 1) // 2
            if (
                sum(max(min(w, cap), f) if fl else w for w, f, fl in zip(natural, floors, flexible, strict=True))
                <= room
            ):
                lo = cap
            else:
                hi = cap - 1
        return [max(min(w, lo), f) if fl else w for w, f, fl in zip(natural, floors, flexible, strict=True)]

    flexible = [w > 12 for w in natural]
    if any(keep):  # first the other long columns, down to their floor
        others = [fl and not k for fl, k in zip(flexible, keep, strict=True)]
        at_floor = [f if o else w for w, f, o in zip(natural, floors, others, strict=True)]
        if sum(at_floor) <= room:
            return capped(floors, others)
        natural = at_floor
    widths = capped(floors, flexible)
    if sum(widths) <= room:
        return widths
    return capped([min(w, 3) for w in natural], [True] * len(natural))


def format_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    max_width: int = 60,
    width: int | None = None,
    keep: Sequence[str] = (),
    optional: Sequence[str] = (),
) -> str:
    """A plain text table that fits a width; ``columns`` are (key, header) pairs.

    Args:
        rows: one dict per row; a missing or None value prints as ``-``.
        columns: (key, header) pairs, in order.
        max_width: longest cell once the table has to shrink (ignored when it fits, or ``width`` is 0).
        width: widest line allowed. None: the terminal's width less the log prefix
            (:func:`terminal_width`, 100 when not a terminal); 0: no limit and no cell shortened
            (``--wide``). To fit, columns that are empty in every row are left out, then the
            widest columns are shortened in the middle (:func:`shorten`), so names keep their
            distinguishing end.
        keep: keys of columns shortened last (the names a reader tells rows apart by).
        optional: keys of columns left out, in this order, while different names in a ``keep``
            column still come out the same or short columns (numbers) would have to be cut
            (``--wide`` shows them again).
    """
    table = [[h for _, h in columns]] + [[_cell(r.get(k)) for k, _ in columns] for r in rows]
    if width == 0:
        return _render(table)
    limit = (terminal_width() - LOG_PREFIX) if width is None else width
    if _line_width(table) <= limit:
        return _render(table)
    keys = [k for k, _ in columns]
    if rows:
        shown = [i for i in range(len(columns)) if any(row[i] != "-" for row in table[1:])]
        table = [[row[i] for i in shown] for row in table]
        keys = [keys[i] for i in shown]
        for i in range(len(keys)):
            _drop_common_prefix(table, i)
    table = [[shorten(c, max_width) for c in row] for row in table]
    drop = [k for k in optional if k in keys]
    while True:
        short, cramped = _shrink(table, keys, limit, keep)
        twins = any(_has_twins(table, short, i) for i, k in enumerate(keys) if k in keep)
        if not (twins or cramped) or not drop:
            return _render(short)
        gone = keys.index(drop.pop(0))
        table = [row[:gone] + row[gone + 1 :] for row in table]
        keys = keys[:gone] + keys[gone + 1 :]


def _shrink(table: list[list[str]], keys: list[str], limit: int, keep: Sequence[str]) -> tuple[list[list[str]], bool]:
    """The table's cells shortened to fit ``limit``, and whether even short columns (numbers) had to be cut."""
    ncols = len(table[0])
    room = limit - 2 * (ncols - 1)
    natural = [max(len(row[i]) for row in table) for i in range(ncols)]
    widths = _fit(natural, [len(h) for h in table[0]], room, [k in keep for k in keys])
    short = [[shorten(c, w) for c, w in zip(row, widths, strict=True)] for row in table]
    for i, w in enumerate(widths):
        _tell_apart(table, short, i, w)
    return short, any(n <= 12 and w < n for n, w in zip(natural, widths, strict=True))


def _has_twins(full: list[list[str]], short: list[list[str]], col: int) -> bool:
    seen: dict[str, str] = {}
    for row_full, row_short in zip(full[1:], short[1:], strict=True):
        if seen.setdefault(row_short[col], row_full[col]) != row_full[col]:
            return True
    return False


def _tell_apart(full: list[list[str]], short: list[list[str]], col: int, width: int) -> None:
    """Re-shorten cells of a column whose different names came out the same, keeping the components
    (counted from the end) where they differ; a few rounds, since a fix can make new twins."""
    prefer: dict[int, tuple[int, ...]] = {}
    for _ in range(4):
        groups: dict[str, list[int]] = {}
        for r in range(1, len(full)):
            groups.setdefault(short[r][col], []).append(r)
        changed = False
        for rows in groups.values():
            names = {full[r][col] for r in rows}
            if len(names) < 2:
                continue
            split = [n.split("/") for n in names]
            depth = min(len(p) for p in split)
            taken = set(prefer.get(rows[0], ()))
            differ = next((k for k in range(2, depth + 1) if -k not in taken and len({p[-k] for p in split}) > 1), None)
            if differ is None:
                continue
            for r in rows:
                prefer[r] = (*prefer.get(r, ()), -differ)
                short[r][col] = shorten(full[r][col], width, prefer=prefer[r])
            changed = True
        if not changed:
            return


def _drop_common_prefix(table: list[list[str]], col: int) -> None:
    """Replace the leading path components that every cell of a column shares with ``...``."""
    cells = [row[col] for row in table[1:]]
    split = [c.split("/") for c in cells if c != "-"]
    if len(split) < 2 or any(" " in c for c in cells) or any(len(p) < 3 for p in split):
        return
    common = 0
    while all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
        common += 1
    if common < 2:  # only "/x/": nothing worth dropping
        return
    for row in table[1:]:
        if row[col] != "-":
            row[col] = "/".join(["...", *row[col].split("/")[common:]])


def _line_width(table: list[list[str]]) -> int:
    ncols = len(table[0])
    return sum(max(len(row[i]) for row in table) for i in range(ncols)) + 2 * (ncols - 1)


def _render(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (temporary file, then rename)."""
    out = Path(path)
    final = output_path(out)  # the path the guard compared: the folder as written must exist
    folder = final.parent
    atomic.clean_stale(folder)
    fd, tmp = atomic.temp_file(folder, suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_default)
            f.write("\n")
        os.replace(tmp, final)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OnnxSparseError(f"{out}: could not write ({exc.strerror or exc})") from exc
        raise
    return out


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")
