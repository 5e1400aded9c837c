"""Benchmark ``onnx-sparse prune`` against ``polygraphy surgeon prune`` on the big MatMul model.

Ours runs end to end as the CLI does (load, prune, check, save, verify); the anchor is
``polygraphy surgeon prune MODEL -o OUT --save-external-data model.onnx.data`` (the flag makes it
write weights as external data beside OUT, as our output is; without it a 537 MB model is saved
inline, and only a model over protobuf's 2 GB limit is switched to external data automatically).
Runs are interleaved (ours, anchor, ours, ...). Reports median wall time, the ratio anchor / ours
(target: >= 100x), each one's peak RSS and ours' peak RSS over the model's weight bytes (target:
<= 2x). Both outputs are then validated with ``onnx-sparse check`` and their weights compared.

``--big`` first writes the > 2 GB model (``tools/make_big_model.py --dim 8192 --layers 9``, or
``--big-dim``/``--big-layers``) and benchmarks that instead; its files are deleted at the end
unless ``--keep``.

``--steps N`` adds N runs of ours with a timer around each step (interpreter start, imports, the
output/input guard and model load, onnx.checker on the input, the prune pass and its 2:4 check,
the data file's write and hash, onnx.checker and the onnxruntime session on the output, the
folder cleanup) and prints the median wall time of each. ``--code DIR`` runs ours from another
checkout (for example ``git worktree add /tmp/wt-old <commit>``), to compare with an older
commit on the same machine in the same session; steps it does not have are left out. Ours then
runs in that folder (``python -m`` puts the working folder first on the import path, so run from
here it would import this checkout whatever PYTHONPATH says), and the run stops unless
``onnx_sparse`` really comes from DIR.

``--baseline DIR`` runs ours from another checkout too, round by round with ours, so both see the
same load; it reports the ratio of the medians, the median of the paired ratios, and whether both
wrote the same weights. ``--anchor-seconds S`` gives the anchor's time from an earlier measurement
when ``--anchor-runs 0`` (polygraphy takes minutes a run).

On a shared, loaded machine, run it at real-time priority to stand in for a quiet one
(``chrt -f 10 python tools/bench_prune.py ...``; its children inherit the priority).

Usage::

    python tools/bench_prune.py --runs 5 --anchor-runs 1 [--json PATH]
    python tools/bench_prune.py --big --runs 1 --anchor-runs 0
    python tools/bench_prune.py --runs 1 --anchor-runs 0 --profile   # + cProfile of one prune
    python tools/bench_prune.py --runs 5 --anchor-runs 0 --steps 5 [--code /tmp/wt-old]
    python tools/bench_prune.py --runs 9 --anchor-runs 0 --anchor-seconds 266.5 --baseline /tmp/wt-old
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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

WORKDIR = REPO / ".cache" / "bench" / "prune"
TARGET_SPEEDUP = 100.0
TARGET_RSS_OVER_WEIGHTS = 2.0


def _fresh(path: Path) -> Path:
    """Empty directory ``path`` (so every run writes its output from scratch)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())} if directory.exists() else {}


def _compare_weights(a: Path, b: Path) -> dict:
    """Per initializer of ``a``: is ``b``'s the same array? (both loaded with their external data).

    For arrays that differ: how many elements, and whether they keep the same multiset of
    magnitudes, which is what a different tie-break between equal magnitudes, and nothing
    else, gives.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    left = {t.name: t for t in onnx.load(str(a)).graph.initializer}
    right = {t.name: t for t in onnx.load(str(b)).graph.initializer}
    identical: list[str] = []
    differing: dict[str, dict] = {}
    for name, tensor in left.items():
        if name not in right:
            differing[name] = {"missing_in": b.name}
            continue
        x, y = numpy_helper.to_array(tensor), numpy_helper.to_array(right[name])
        if x.shape != y.shape:
            differing[name] = {"shapes": [list(x.shape), list(y.shape)]}
        elif np.array_equal(x, y):
            identical.append(name)
        else:
            differing[name] = {
                "elements": int(np.count_nonzero(x != y)),
                "same_kept_magnitudes": bool(
                    np.array_equal(np.sort(np.abs(x), axis=None), np.sort(np.abs(y), axis=None))
                ),
            }
    return {"identical": identical, "differing": differing}


def _profile(model: Path, workdir: Path, top: int) -> str:
    """One ``python -m cProfile -m onnx_sparse prune`` run; the ``top`` lines by cumulative time."""
    import io
    import pstats
    import subprocess

    out = _fresh(workdir / "profile") / "model.onnx"
    stats_path = workdir / "prune.prof"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            str(stats_path),
            "-m",
            "onnx_sparse",
            "prune",
            str(model),
            "-o",
            str(out),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    buffer = io.StringIO()
    pstats.Stats(str(stats_path), stream=buffer).sort_stats("cumulative").print_stats(top)
    shutil.rmtree(out.parent, ignore_errors=True)
    return buffer.getvalue()


# The steps --steps times: (module, attribute, label). Module-level functions are replaced in
# every onnx_sparse module that holds them (``from x import f`` copies the reference).
STEPS = [
    ("onnx_sparse.guard", "check_run_paths", "guard: outputs vs inputs (+ model load)"),
    ("onnx_sparse.io", "load_model", "  load model (parse, external-data checks)"),
    ("onnx_sparse.io", "check_input_model", "onnx.checker on the input"),
    ("onnx_sparse.api", "run_pipeline", "prune pass (with its 2:4 ensures)"),
    ("onnx_sparse.passes.prune", "PrunePass.ensures", "  2:4 ensures"),
    ("onnx_sparse.core.blas", "_controller", "  BLAS thread limit (first: imports scipy.linalg)"),
    ("onnx_sparse.io", "save_model", "save (all below)"),
    ("onnx_sparse.atomic", "clean_stale", "  stale temporaries"),
    ("onnx_sparse.io", "_write_external", "  write data file (+ its hash)"),
    ("onnx_sparse.io", "verify_model", "  verify: checker + onnxruntime"),
    ("onnx_sparse.io", "_ort_open_error", "    onnxruntime session (incl. import)"),
    ("onnx_sparse.io", "clean_orphans", "  orphan data files"),
]

_STEP_DRIVER = r"""
import functools, importlib, importlib.util, json, sys, time
t0 = time.perf_counter()
steps = json.loads(sys.argv[1])
rows = {}
def wrap(f, label):
    @functools.wraps(f)
    def g(*a, **k):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return f(*a, **k)
        finally:
            w, c = rows.get(label, (0.0, 0.0))
            rows[label] = (w + time.perf_counter() - start, c + time.process_time() - cpu)
    return g
import onnx_sparse.cli.main as cli
mods = [m for m in ("onnx_sparse.api", "onnx_sparse.io", "onnx_sparse.guard", "onnx_sparse.passes.prune",
                    "onnx_sparse.cli.prune", "onnx_sparse.cli.common", "onnx_sparse.core.blas")
        if importlib.util.find_spec(m)]
for m in mods:
    importlib.import_module(m)
imports = (time.perf_counter() - t0, time.process_time())
for mod, attr, label in steps:
    try:
        m = importlib.import_module(mod)
    except ImportError:
        continue
    if "." in attr:
        cls, meth = attr.split(".")
        if hasattr(getattr(m, cls, None), meth):
            setattr(getattr(m, cls), meth, wrap(getattr(getattr(m, cls), meth), label))
        continue
    f = getattr(m, attr, None)
    if f is None:
        continue
    g = wrap(f, label)
    for name, other in list(sys.modules.items()):
        if name.startswith("onnx_sparse") and getattr(other, attr, None) is f:
            setattr(other, attr, g)
rc = cli.main(sys.argv[2:])
total = (time.perf_counter() - t0, time.process_time())
print("STEPS " + json.dumps({"rc": rc, "imports": imports, "total": total, "steps": rows}))
"""


def _code_env(code: Path | None) -> dict[str, str] | None:
    """The environment that makes ``python -m onnx_sparse`` run the checkout at ``code``."""
    if code is None:
        return None
    return {**os.environ, "PYTHONPATH": str(code)}


def _check_code(code: Path) -> None:
    """Refuse to time another checkout unless ``python -m onnx_sparse`` really runs it there.

    (Run from this repository, ``-m`` finds this checkout's package first, whatever PYTHONPATH says.)
    """
    where = subprocess.run(
        [sys.executable, "-c", "import onnx_sparse; print(onnx_sparse.__file__)"],
        cwd=code, env=_code_env(code), capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not Path(where).resolve().is_relative_to(code.resolve()):
        raise SystemExit(f"--code {code}: onnx_sparse is imported from {where}, not from that checkout")


def _steps(model: Path, workdir: Path, runs: int, code: Path | None) -> list[list[str]]:
    """Median wall and CPU time (all threads) of each step over ``runs`` runs (fresh output folder each)."""
    per: dict[str, list[tuple[float, float]]] = {}
    for _ in range(runs):
        out = _fresh(workdir / "steps") / "model.onnx"
        proc = subprocess.Popen(
            [sys.executable, "-c", _STEP_DRIVER, json.dumps(STEPS), "prune", str(model), "-o", str(out), "-qq"],
            cwd=code or REPO, env=_code_env(code), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        start = time.perf_counter()
        stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]  # small outputs
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time
        wall = time.perf_counter() - start
        cpu = usage.ru_utime + usage.ru_stime
        line = next((x for x in stdout.splitlines() if x.startswith("STEPS ")), None)
        if os.waitstatus_to_exitcode(status) != 0 or line is None:
            print(stdout[-2000:], stderr[-2000:], file=sys.stderr)
            raise SystemExit("the step-timed run failed")
        data = json.loads(line[len("STEPS ") :])
        per.setdefault("process (as measured outside)", []).append((wall, cpu))
        total_wall, total_cpu = data["total"]
        per.setdefault("interpreter start + exit", []).append((wall - total_wall, cpu - total_cpu))
        per.setdefault("imports (cli, api, io, guard, prune pass)", []).append(tuple(data["imports"]))
        for label, (w, c) in data["steps"].items():
            per.setdefault(label, []).append((w, c))
    shutil.rmtree(workdir / "steps", ignore_errors=True)
    order = ["process (as measured outside)", "interpreter start + exit",
             "imports (cli, api, io, guard, prune pass)"] + [label for _, _, label in STEPS]  # fmt: skip
    return [
        [
            label,
            f"{statistics.median(w for w, _ in per[label]):.3f}s",
            f"{statistics.median(c for _, c in per[label]):.3f}s",
        ]
        for label in order
        if label in per
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model to prune (ignored with --big)")
    parser.add_argument("--runs", type=int, default=5, help="runs of onnx-sparse prune (median taken)")
    parser.add_argument("--anchor-runs", type=int, default=1, help="runs of polygraphy surgeon prune")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs of ours first (page cache)")
    parser.add_argument("--big", action="store_true", help="generate the > 2 GB model and benchmark that")
    parser.add_argument("--big-dim", type=int, default=8192)
    parser.add_argument("--big-layers", type=int, default=9)
    parser.add_argument("--keep", action="store_true", help="keep generated models and outputs")
    parser.add_argument("--profile", action="store_true", help="also cProfile one run of ours")
    parser.add_argument("--steps", type=int, default=0, metavar="N", help="N step-timed runs of ours (median per step)")
    parser.add_argument("--code", type=Path, help="run ours from this checkout (e.g. a worktree of an older commit)")
    parser.add_argument(
        "--baseline", type=Path, metavar="DIR",
        help="also run ours from this checkout, round by round with ours (same load), and compare: times, "
        "the paired ratio, and whether both write the same weights",
    )  # fmt: skip
    parser.add_argument(
        "--anchor-seconds", type=float, metavar="S",
        help="the anchor's time measured before (e.g. polygraphy's CPU time on a quiet machine), for the ratio "
        "when --anchor-runs is 0",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--json", type=Path, help="default: .cache/bench/prune.json (prune_big.json with --big)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    json_path = args.json or REPO / ".cache" / "bench" / ("prune_big.json" if args.big else "prune.json")

    info = machine_info()
    load_start = loadavg()
    started = time.time()
    generate = None
    if args.big:
        source_dir = _fresh(workdir / f"big_src_{args.big_layers}x{args.big_dim}")
        generate = run_measured(
            "generate",
            [
                sys.executable,
                str(REPO / "tools" / "make_big_model.py"),
                "--dim",
                str(args.big_dim),
                "--layers",
                str(args.big_layers),
                "--out",
                str(source_dir),
                "--no-check",
            ],
        )
        print(f"generated big model in {generate.wall_s:.1f}s (rc={generate.rc})", flush=True)
        if generate.rc != 0:
            print(generate.output_tail, file=sys.stderr)
            return 2
        model = source_dir / "model.onnx"
    else:
        model = args.model.resolve()
        if not model.exists():
            print(f"error: {model} not found; run python tools/make_big_model.py first", file=sys.stderr)
            return 2
    wbytes = weight_bytes(model)
    out_dirs = {"ours": workdir / "ours", "anchor": workdir / "anchor", "baseline": workdir / "baseline"}
    outputs = {who: d / "model.onnx" for who, d in out_dirs.items()}

    def ours_command(code: Path | None, out: Path) -> list[str]:
        if code is None:
            return [venv_tool("onnx-sparse"), "prune", str(model), "-o", str(out)]
        return ["env", f"PYTHONPATH={code.resolve()}", sys.executable, "-m", "onnx_sparse", "prune", str(model),
                "-o", str(out)]  # fmt: skip

    commands = {
        "ours": ours_command(args.code, outputs["ours"]),
        "baseline": ours_command(args.baseline, outputs["baseline"]) if args.baseline else [],
        "anchor": [
            venv_tool("polygraphy"),
            "surgeon",
            "prune",
            str(model),
            "-o",
            str(outputs["anchor"]),
            "--save-external-data",
            "model.onnx.data",
        ],
    }
    print(
        f"model {model} ({fmt_bytes(wbytes)} of weights); {info['cpu_count']} CPUs; load average {load_start}",
        flush=True,
    )

    # With --code/--baseline, ours runs from that checkout's folder: there `-m onnx_sparse` imports its package.
    cwds = {"ours": (args.code or REPO).resolve(), "anchor": REPO, "baseline": (args.baseline or REPO).resolve()}
    for code in (args.code, args.baseline):
        if code is not None:
            _check_code(code)
    mine = ["ours", "baseline"] if args.baseline else ["ours"]
    for _ in range(args.warmup):
        for who in mine:
            _fresh(out_dirs[who])
            run_measured(f"{who}-warmup", commands[who], cwd=cwds[who])
    results: dict[str, list[RunResult]] = {"ours": [], "anchor": [], "baseline": []}
    order = [who for n in schedule(args.runs, args.anchor_runs) for who in (mine if n == "ours" else [n])]
    for n, who in enumerate(order, 1):
        _fresh(out_dirs[who])
        result = run_measured(who, commands[who], cwd=cwds[who])
        results[who].append(result)
        status = "ok" if result.rc == 0 else f"rc={result.rc}"
        print(
            f"  [{n}] {who:8s} {result.wall_s:8.2f}s  peak RSS {fmt_bytes(result.peak_rss_bytes):>9s}  "
            f"load {result.loadavg_before[0]:.2f}  {status}",
            flush=True,
        )
        if result.rc != 0:
            print(result.output_tail[-2000:], file=sys.stderr)
    load_end = loadavg()

    # Validate the last output of each with our checker; compare the two outputs' weights.
    validation: dict[str, dict] = {}
    for who in ("ours", "anchor", "baseline"):
        if not results[who] or results[who][-1].rc != 0:
            continue
        check = run_measured(f"check-{who}", [venv_tool("onnx-sparse"), "check", str(outputs[who])])
        validation[who] = {
            "files": _files(out_dirs[who]),
            "check_rc": check.rc,
            "check_passes": check.rc == 0,
            "check_wall_s": check.wall_s,
            "check_output_tail": check.output_tail[-600:],
        }
    if "ours" in validation and "anchor" in validation:
        validation["ours_vs_anchor_weights"] = _compare_weights(outputs["ours"], outputs["anchor"])
    if "ours" in validation and "baseline" in validation:
        validation["ours_vs_baseline_weights"] = _compare_weights(outputs["ours"], outputs["baseline"])

    ours, anchor, baseline = summarize(results["ours"]), summarize(results["anchor"]), summarize(results["baseline"])
    if ours is not None:
        internal = [t for t in map(reported_runtime, results["ours"]) if t is not None]
        ours["cli_reported_runtime_median_s"] = statistics.median(internal) if internal else None
        ours["peak_rss_over_weight_bytes"] = ours["peak_rss_max_bytes"] / wbytes
    for other in (anchor, baseline):
        if other is not None:
            other["peak_rss_over_weight_bytes"] = other["peak_rss_max_bytes"] / wbytes
    anchor_s = anchor["wall_median_s"] if anchor else args.anchor_seconds
    speedup = anchor_s / ours["wall_median_s"] if ours and anchor_s else None
    # Paired: round by round, the two ran under about the same load.
    pairs = [b.wall_s / o.wall_s for o, b in zip(results["ours"], results["baseline"], strict=False)
             if o.rc == 0 and b.rc == 0]  # fmt: skip
    baseline_ratio = statistics.median(pairs) if pairs else None
    profile = _profile(model, workdir, 40) if args.profile else None
    steps = _steps(model, workdir, args.steps, args.code) if args.steps else None

    print()
    rows = []
    labelled = [("ours: onnx-sparse prune", ours), ("anchor: polygraphy surgeon prune", anchor)]
    if args.baseline:
        labelled.append((f"baseline: onnx-sparse prune from {args.baseline}", baseline))
    for who, summary in labelled:
        check = validation.get(who.split(":")[0], {})
        passes = {True: "passes", False: "FAILS"}.get(check.get("check_passes"), "-")
        if summary is None:
            rows.append([who, 0, "-", "-", "-", "-", passes])
            continue
        rows.append(
            [
                who,
                summary["runs"],
                f"{summary['wall_median_s']:.2f}s",
                f"{summary['wall_min_s']:.2f}-{summary['wall_max_s']:.2f}s",
                fmt_bytes(summary["peak_rss_max_bytes"]),
                f"{summary['peak_rss_over_weight_bytes']:.2f}x",
                passes,
            ]
        )
    print_table(["command", "runs", "median", "range", "peak RSS", "RSS/weights", "onnx-sparse check"], rows)
    if generate is not None:
        print(f"big model: {args.big_layers}x[{args.big_dim},{args.big_dim}], generated in {generate.wall_s:.1f}s")
    if speedup is not None:
        verdict = "meets" if speedup >= TARGET_SPEEDUP else "MISSES"
        given = "" if anchor else f", anchor {anchor_s:.1f}s given, not measured"
        print(
            f"speedup anchor/ours (median wall{given}): {speedup:.1f}x ({verdict} the >= {TARGET_SPEEDUP:.0f}x target)"
        )
    if baseline_ratio is not None and ours and baseline:
        print(
            f"baseline/ours: {baseline['wall_median_s'] / ours['wall_median_s']:.2f}x by medians, "
            f"{baseline_ratio:.2f}x by the median of {len(pairs)} paired rounds"
        )
    if ours is not None:
        ratio = ours["peak_rss_over_weight_bytes"]
        verdict = "meets" if ratio <= TARGET_RSS_OVER_WEIGHTS else "MISSES"
        print(
            f"ours peak RSS / weight bytes: {fmt_bytes(ours['peak_rss_max_bytes'])} / {fmt_bytes(wbytes)} = "
            f"{ratio:.2f}x ({verdict} the <= {TARGET_RSS_OVER_WEIGHTS:.0f}x target)"
        )
    if "ours_vs_baseline_weights" in validation:
        cmp = validation["ours_vs_baseline_weights"]
        print(f"weights ours vs baseline: {len(cmp['identical'])} identical, {len(cmp['differing'])} differ")
    if "ours_vs_anchor_weights" in validation:
        cmp = validation["ours_vs_anchor_weights"]
        detail = ", ".join(
            f"{name}: {d.get('elements', '?')} elements"
            + (" (tie-break only)" if d.get("same_kept_magnitudes") else "")
            for name, d in cmp["differing"].items()
        )
        print(
            f"weights ours vs anchor: {len(cmp['identical'])} identical, {len(cmp['differing'])} differ"
            + (f" [{detail}]" if detail else "")
        )
    if steps:
        print(f"\nours, step by step (median of {args.steps} runs{', code ' + str(args.code) if args.code else ''}):")
        print_table(["step", "wall", "CPU (all threads)"], steps)
    print(f"load average: start {load_start}, end {load_end}; took {time.time() - started:.0f}s")
    if profile:
        print(profile)

    payload = {
        "benchmark": "prune-big" if args.big else "prune",
        "model": str(model),
        "weight_bytes": wbytes,
        "commands": commands,
        "machine": info,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "generate": generate.to_json() if generate else None,
        "ours": ours,
        "anchor": anchor,
        "anchor_seconds_given": None if anchor else args.anchor_seconds,
        "baseline": baseline,
        "baseline_code": str(args.baseline) if args.baseline else None,
        "baseline_over_ours_paired_median": baseline_ratio,
        "speedup_anchor_over_ours": speedup,
        "target_speedup": TARGET_SPEEDUP,
        "meets_speed_target": None if speedup is None else speedup >= TARGET_SPEEDUP,
        "target_rss_over_weight_bytes": TARGET_RSS_OVER_WEIGHTS,
        "meets_memory_target": None if ours is None else ours["peak_rss_over_weight_bytes"] <= TARGET_RSS_OVER_WEIGHTS,
        "validation": validation,
        "profile_top": profile,
        "code": str(args.code) if args.code else None,
        "steps": steps,
        "runs": {who: [r.to_json() for r in rs] for who, rs in results.items()},
    }
    write_json(json_path, payload)

    if not args.keep:
        for directory in out_dirs.values():
            shutil.rmtree(directory, ignore_errors=True)
        if args.big:
            shutil.rmtree(model.parent, ignore_errors=True)
    failed = any(r.rc != 0 for rs in results.values() for r in rs)
    failed = failed or validation.get("ours", {}).get("check_passes") is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
