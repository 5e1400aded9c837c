"""Benchmark ``onnx-sparse inspect`` against ``polygraphy inspect sparsity`` on the big MatMul model.

Both run as subprocesses on the same model (wall time includes interpreter start and imports),
interleaved (ours, anchor, ours, ...) so that machine load hits both alike. Reports the median
wall time of each, the ratio anchor / ours (target: >= 50x), and each one's peak RSS.

Two cases, because Polygraphy's check returns at a tensor's first group that is not 2:4:
``dense`` (the model as generated: it reads each weight and stops at once, seconds in all) and
``pruned`` (a copy pruned by ``onnx-sparse prune``: every group of every weight is visited in
Python, minutes per run; this is the case the >= 50x target is about).

Usage::

    python tools/make_big_model.py                      # once: .cache/big/matmul_8x4096
    python tools/bench_inspect.py --runs 5 --anchor-runs 1 [--json PATH]

``--anchor-runs`` counts Polygraphy runs on the pruned model (minutes each; 0 skips them);
``--dense-anchor-runs`` those on the dense model (default: ``--runs``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_common import (  # noqa: E402
    DEFAULT_MODEL,
    REPO,
    RunResult,
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

TARGET_SPEEDUP = 50.0


def _bench(model: Path, runs: int, anchor_runs: int, warmup: int) -> dict:
    """Interleaved runs of both commands on ``model``; summaries, speedup and every run."""
    commands = {
        "ours": [venv_tool("onnx-sparse"), "inspect", str(model)],
        "anchor": [venv_tool("polygraphy"), "inspect", "sparsity", str(model)],
    }
    for _ in range(warmup):
        run_measured("ours-warmup", commands["ours"])
    results: dict[str, list[RunResult]] = {"ours": [], "anchor": []}
    load_start = loadavg()
    for n, who in enumerate(schedule(runs, anchor_runs), 1):
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
    ours, anchor = summarize(results["ours"]), summarize(results["anchor"])
    if ours is not None:
        internal = [t for t in map(reported_runtime, results["ours"]) if t is not None]
        ours["cli_reported_runtime_median_s"] = statistics.median(internal) if internal else None
    return {
        "model": str(model),
        "commands": commands,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "ours": ours,
        "anchor": anchor,
        "speedup_anchor_over_ours": anchor["wall_median_s"] / ours["wall_median_s"] if ours and anchor else None,
        "runs": {who: [r.to_json() for r in rs] for who, rs in results.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=5, help="runs of onnx-sparse inspect per model (median taken)")
    parser.add_argument(
        "--anchor-runs",
        type=int,
        default=1,
        help="runs of polygraphy inspect sparsity on the pruned model (minutes each)",
    )
    parser.add_argument(
        "--dense-anchor-runs",
        type=int,
        help="runs of polygraphy on the dense model, where it stops at the first violating group (default: --runs)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs of ours first (page cache)")
    parser.add_argument("--models", choices=("dense", "pruned", "both"), default="both")
    parser.add_argument("--keep", action="store_true", help="keep the pruned copy of the model")
    parser.add_argument("--json", type=Path, default=REPO / ".cache" / "bench" / "inspect.json")
    args = parser.parse_args(argv)

    model = args.model.resolve()
    if not model.exists():
        print(f"error: {model} not found; run python tools/make_big_model.py first", file=sys.stderr)
        return 2
    info = machine_info()
    wbytes = weight_bytes(model)
    load_start = loadavg()
    print(f"model {model} ({fmt_bytes(wbytes)} of weights); {info['cpu_count']} CPUs; load average {load_start}")
    started = time.time()

    cases: dict[str, dict] = {}
    pruned_dir = REPO / ".cache" / "bench" / "inspect_pruned"
    if args.models in ("dense", "both"):
        print("dense model (Polygraphy stops at the first group that is not 2:4):", flush=True)
        dense_anchor = args.runs if args.dense_anchor_runs is None else args.dense_anchor_runs
        cases["dense"] = _bench(model, args.runs, dense_anchor, args.warmup)
    if args.models in ("pruned", "both"):
        shutil.rmtree(pruned_dir, ignore_errors=True)
        pruned_dir.mkdir(parents=True)
        pruned = pruned_dir / "model.onnx"
        made = run_measured("make-pruned", [venv_tool("onnx-sparse"), "prune", str(model), "-o", str(pruned)])
        if made.rc != 0:
            print(made.output_tail, file=sys.stderr)
            return 2
        print(f"pruned copy {pruned} (every group must be checked):", flush=True)
        cases["pruned"] = _bench(pruned, args.runs, args.anchor_runs, args.warmup)
        if not args.keep:
            shutil.rmtree(pruned_dir, ignore_errors=True)
    load_end = loadavg()

    print()
    rows = []
    for case, result in cases.items():
        for who, label in (("ours", "onnx-sparse inspect"), ("anchor", "polygraphy inspect sparsity")):
            summary = result[who]
            if summary is None:
                rows.append([case, label, 0, "-", "-", "-", "-"])
                continue
            rows.append(
                [
                    case,
                    label,
                    summary["runs"],
                    f"{summary['wall_median_s']:.2f}s",
                    f"{summary['wall_min_s']:.2f}-{summary['wall_max_s']:.2f}s",
                    fmt_bytes(summary["peak_rss_max_bytes"]),
                    f"{summary['peak_rss_max_bytes'] / wbytes:.2f}x",
                ]
            )
    print_table(["model", "command", "runs", "median", "range", "peak RSS", "RSS/weights"], rows)
    for case, result in cases.items():
        speedup = result["speedup_anchor_over_ours"]
        if speedup is not None:
            verdict = "meets" if speedup >= TARGET_SPEEDUP else "MISSES"
            print(
                f"{case}: speedup anchor/ours (median wall) {speedup:.1f}x "
                f"({verdict} the >= {TARGET_SPEEDUP:.0f}x target)"
            )
    print(f"load average: start {load_start}, end {load_end}; took {time.time() - started:.0f}s")

    payload = {
        "benchmark": "inspect",
        "model": str(model),
        "weight_bytes": wbytes,
        "machine": info,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "target_speedup": TARGET_SPEEDUP,
        "cases": cases,
    }
    write_json(args.json, payload)
    failed = any(r["rc"] != 0 for c in cases.values() for rs in c["runs"].values() for r in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
