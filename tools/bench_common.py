"""Shared helpers for the benchmark scripts in ``tools/`` (not installed, not tests).

Each measured command runs as its own subprocess; the parent reaps it with ``os.wait4``, so the
wall time covers interpreter start, imports and all the work, and ``ru_maxrss`` is that child's
peak resident set (Linux reports it in KiB; children it waited for are included). It is not
always the child's own: Linux carries the resident set the parent had at the fork into the
child's ``ru_maxrss`` across ``exec``, so a parent that holds a large model lends it to every run;
where that matters the child reports its own ``VmHWM`` (``tools/bench_calibrated.py``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "REPO",
    "RunResult",
    "append_jsonl",
    "fmt_bytes",
    "git_state",
    "loadavg",
    "machine_info",
    "paired_summary",
    "print_table",
    "proc_status",
    "reported_runtime",
    "run_json_child",
    "run_measured",
    "schedule",
    "summarize",
    "venv_tool",
    "weight_bytes",
    "write_json",
]

REPO = Path(__file__).resolve().parent.parent
# The 134M-parameter benchmark model written by tools/make_big_model.py.
DEFAULT_MODEL = REPO / ".cache" / "big" / "matmul_8x4096" / "model.onnx"


@dataclass
class RunResult:
    """One measured subprocess run."""

    label: str
    argv: list[str]
    rc: int
    wall_s: float
    peak_rss_bytes: int
    loadavg_before: tuple[float, float, float]
    user_s: float
    sys_s: float
    output_tail: str = field(repr=False)

    def to_json(self) -> dict:
        return asdict(self)


def venv_tool(name: str) -> str:
    """The console script ``name`` beside the running interpreter (the project's venv), else PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def proc_status(*fields: str) -> dict[str, int]:
    """This process's ``/proc/self/status`` fields (``VmHWM``, ``RssAnon``, ...) in bytes; a field
    the kernel does not report is left out. Raises OSError where the file cannot be read."""
    want = {f"{name}:": name for name in fields}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(maxsplit=1)[0] if line.strip() else ""
            if key in want:
                out[want[key]] = int(line.split()[1]) * 1024
    return out


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return (round(one, 2), round(five, 2), round(fifteen, 2))


def run_measured(label: str, argv: Sequence[str], *, cwd: Path = REPO, tail_chars: int = 4000) -> RunResult:
    """Run ``argv`` to completion; return its wall time, peak RSS and the tail of its output."""
    before = loadavg()
    with tempfile.TemporaryFile(mode="w+b") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return RunResult(
        label=label,
        argv=list(argv),
        rc=proc.returncode,
        wall_s=wall,
        peak_rss_bytes=usage.ru_maxrss * 1024,
        loadavg_before=before,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        output_tail=text[-tail_chars:],
    )


def reported_runtime(result: RunResult) -> float | None:
    """The in-process time our CLI reports (``| Runtime: 1.23s |``), or None."""
    marker = "Runtime: "
    pos = result.output_tail.rfind(marker)
    if pos < 0:
        return None
    value = result.output_tail[pos + len(marker) :].split("s", 1)[0]
    try:
        return float(value)
    except ValueError:
        return None


def schedule(ours: int, anchor: int) -> list[str]:
    """Interleave runs: ours, anchor, ours, anchor, ..., then the rest of whichever has more."""
    order: list[str] = []
    for i in range(max(ours, anchor)):
        if i < ours:
            order.append("ours")
        if i < anchor:
            order.append("anchor")
    return order


def summarize(results: Sequence[RunResult]) -> dict | None:
    """Median/min/max of wall time and peak RSS over successful runs (None when there are none)."""
    ok = [r for r in results if r.rc == 0]
    if not ok:
        return None
    walls = [r.wall_s for r in ok]
    rss = [r.peak_rss_bytes for r in ok]
    return {
        "runs": len(ok),
        "failed_runs": len(results) - len(ok),
        "wall_median_s": statistics.median(walls),
        "wall_min_s": min(walls),
        "wall_max_s": max(walls),
        "walls_s": walls,
        "peak_rss_median_bytes": int(statistics.median(rss)),
        "peak_rss_max_bytes": max(rss),
    }


def weight_bytes(model_path: Path) -> int:
    """Bytes of all initializer data (inline or external), from dims and dtype; weights are not read."""
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def git_state() -> dict:
    """HEAD and whether the library sources differ from it (others edit the tree concurrently)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    dirty = [line for line in git("status", "--porcelain", "--", "onnx_sparse").splitlines() if line]
    return {"head": git("rev-parse", "HEAD"), "onnx_sparse_changes_vs_head": dirty}


def machine_info() -> dict:
    """CPU count/model, memory, Python and library versions, git state."""
    info: dict = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_bytes"] = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    versions = {}
    for module in ("numpy", "onnx", "onnxruntime", "polygraphy"):
        try:
            versions[module] = __import__(module).__version__
        except Exception as exc:  # a missing package is recorded, not fatal
            versions[module] = f"unavailable ({exc.__class__.__name__})"
    info["versions"] = versions
    info["git"] = git_state()
    return info


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def run_json_child(argv: Sequence[str], what: str, env: dict[str, str] | None = None) -> dict:
    """Run a child that prints one JSON object as its last line of output; that object (exit on failure)."""
    done = subprocess.run(list(argv), env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def append_jsonl(path: Path | None, row: dict) -> None:
    """Print ``row`` as a JSON line and append it to ``path`` (when given), so a long series survives an interruption."""
    print(json.dumps(row), flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def paired_summary(rows: Sequence[dict], key: str, base: str, other: str, sha_key: str) -> dict:
    """Two methods' runs (``rows``, each with ``method``, ``round``, ``key`` and ``sha_key``): the median
    ``key`` of each (None without runs), ``other / base`` of the medians (None without both or with a
    zero base), each round's own ratio, and each method's distinct ``sha_key`` values."""
    by = {m: [r for r in rows if r["method"] == m] for m in (base, other)}
    med = {m: statistics.median(r[key] for r in by[m]) if by[m] else None for m in (base, other)}
    per_round = []
    for i in sorted({r["round"] for r in rows}):
        pair = {r["method"]: r[key] for r in rows if r["round"] == i}
        if base in pair and other in pair and pair[base] > 0:
            per_round.append(pair[other] / pair[base])
    b, o = med[base], med[other]
    return {
        "median": med,
        "ratio": o / b if o is not None and b else None,
        "round_ratios": per_round,
        sha_key: {m: sorted({r[sha_key] for r in by[m]}) for m in (base, other)},
    }
