"""Benchmark ``onnx-sparse inspect`` against ``polygraphy inspect sparsity`` on the big MatMul model.

Both run as subprocesses on the same model (wall time includes interpreter start and imports),
interleaved (ours, anchor, ours, ...) so that machine load hits both alike. Reports the median
wall time of each, the ratio anchor / ours (target: >= 50x), and each one's peak RSS.

Usage::

    python tools/make_big_model.py                      # once: .cache/big/matmul_8x4096
    python tools/bench_inspect.py --runs 5 --anchor-runs 1 [--json PATH]

Polygraphy takes minutes per run on the 134M-parameter model; ``--anchor-runs 0`` skips it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_common import (  # noqa: E402
    REPO,
    fmt_bytes,
    loadavg,
    machine_info,
    print_table,
    reported_runtime,
    run_measured,
    schedule,
    summarize,
    venv_tool,
    weight_bytes,
    write_json,
)

DEFAULT_MODEL = REPO / ".cache" / "big" / "matmul_8x4096" / "model.onnx"
TARGET_SPEEDUP = 50.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=5, help="runs of onnx-sparse inspect (median taken)")
    parser.add_argument("--anchor-runs", type=int, default=1, help="runs of polygraphy inspect sparsity")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs of ours first (page cache)")
    parser.add_argument("--json", type=Path, default=REPO / ".cache" / "bench" / "inspect.json")
    args = parser.parse_args(argv)

    model = args.model.resolve()
    if not model.exists():
        print(f"error: {model} not found; run python tools/make_big_model.py first", file=sys.stderr)
        return 2
    commands = {
        "ours": [venv_tool("onnx-sparse"), "inspect", str(model)],
        "anchor": [venv_tool("polygraphy"), "inspect", "sparsity", str(model)],
    }
    info = machine_info()
    wbytes = weight_bytes(model)
    load_start = loadavg()
    print(f"model {model} ({fmt_bytes(wbytes)} of weights); {info['cpu_count']} CPUs; load average {load_start}")
    started = time.time()

    for _ in range(args.warmup):
        run_measured("ours-warmup", commands["ours"])
    results = {"ours": [], "anchor": []}
    for n, who in enumerate(schedule(args.runs, args.anchor_runs), 1):
        result = run_measured(who, commands[who])
        results[who].append(result)
        status = "ok" if result.rc == 0 else f"rc={result.rc}"
        print(
            f"  [{n}] {who:6s} {result.wall_s:8.2f}s  peak RSS {fmt_bytes(result.peak_rss_bytes):>9s}  "
            f"load {result.loadavg_before[0]:.2f}  {status}",
            flush=True,
        )
        if result.rc != 0:
            print(result.output_tail[-2000:], file=sys.stderr)
    load_end = loadavg()

    ours, anchor = summarize(results["ours"]), summarize(results["anchor"])
    if ours is not None:
        internal = [t for t in map(reported_runtime, results["ours"]) if t is not None]
        ours["cli_reported_runtime_median_s"] = statistics.median(internal) if internal else None
    speedup = anchor["wall_median_s"] / ours["wall_median_s"] if ours and anchor else None

    print()
    rows = []
    for who, summary in (("ours: onnx-sparse inspect", ours), ("anchor: polygraphy inspect sparsity", anchor)):
        if summary is None:
            rows.append([who, 0, "-", "-", "-", "-"])
            continue
        rows.append(
            [
                who,
                summary["runs"],
                f"{summary['wall_median_s']:.2f}s",
                f"{summary['wall_min_s']:.2f}-{summary['wall_max_s']:.2f}s",
                fmt_bytes(summary["peak_rss_max_bytes"]),
                f"{summary['peak_rss_max_bytes'] / wbytes:.2f}x",
            ]
        )
    print_table(["command", "runs", "median", "range", "peak RSS", "RSS/weights"], rows)
    if speedup is not None:
        verdict = "meets" if speedup >= TARGET_SPEEDUP else "MISSES"
        print(f"speedup anchor/ours (median wall): {speedup:.1f}x ({verdict} the >= {TARGET_SPEEDUP:.0f}x target)")
    print(f"load average: start {load_start}, end {load_end}; took {time.time() - started:.0f}s")

    payload = {
        "benchmark": "inspect",
        "model": str(model),
        "weight_bytes": wbytes,
        "commands": commands,
        "machine": info,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "ours": ours,
        "anchor": anchor,
        "speedup_anchor_over_ours": speedup,
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": None if speedup is None else speedup >= TARGET_SPEEDUP,
        "runs": {who: [r.to_json() for r in rs] for who, rs in results.items()},
    }
    write_json(args.json, payload)
    failed = any(r.rc != 0 for rs in results.values() for r in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
