"""Records to text tables and JSON files (atomic writes)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnx_sparse import atomic
from onnx_sparse.errors import OnnxSparseError

__all__ = ["format_table", "write_json", "fmt_count", "fmt_share", "printable"]


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


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], max_width: int = 60) -> str:
    """A plain text table; ``columns`` are (key, header) pairs; long cells are cut at ``max_width``."""

    def cell(v: Any) -> str:
        if v is None:
            s = "-"
        elif isinstance(v, bool):
            s = "yes" if v else "no"
        elif isinstance(v, float):
            s = f"{v:.4g}"
        elif isinstance(v, (tuple, list)):
            s = "x".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else ",".join(map(str, v))
        else:
            s = str(v)
        s = printable(s)
        return s if len(s) <= max_width else s[: max_width - 1] + "~"

    table = [[h for _, h in columns]] + [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (temporary file, then rename)."""
    out = Path(path)
    folder = atomic.check_writable_folder(out)
    atomic.clean_stale(folder)
    fd, tmp = atomic.temp_file(folder, suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_default)
            f.write("\n")
        os.replace(tmp, folder / out.name)
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
