"""Time of the best recipe against plain SparseGPT on the real models (issue 20's <= 2.5x aim).

Each run is ONE ``onnx_sparse.api.prune`` of a real model (:mod:`tools.realmodels`) on its frozen
calibration feeds (:mod:`tools.realdata`) in a fresh subprocess. The child measures, around the
prune alone (loading the model and the feeds is not counted), the process CPU seconds (user + sys
of all its threads, ``resource.getrusage``) and minor page faults, and reports its peak RSS and
the sha256 of the output model's bytes. ``best`` is the default recipe (asym + bias correction +
head refit: ``api.prune(model, calibration=feeds)``), ``sparsegpt`` is ``method="sparsegpt"``.

Runs alternate (round by round: each model, each method, ours then the baseline), so slow phases
of a shared machine fall on both sides; the summary is medians over ``--repeats`` rounds and
best / sparsegpt of those medians, with each round's own ratio beside it.

Usage::

    python tools/bench_real.py --repeats 3
    python tools/bench_real.py --models ppocr_rec --baseline /tmp/old  # old = `git archive` export
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
MODELS = ("ppocr_rec", "ppocr_det", "ppocr_cls", "minilm_l3", "magika")
METHODS = ("sparsegpt", "best")

__all__ = ["MODELS", "METHODS", "child", "main", "summarize"]


def child(root: Path, name: str, method: str) -> dict:
    """One measured prune with the ``onnx_sparse`` and ``tools`` of ``root`` (run in a fresh process)."""
    import resource

    sys.path.insert(0, str(root))
    import onnx

    from onnx_sparse import api
    from tools import realdata
    from tools.realmodels import model_path

    dense = onnx.load(model_path(name))
    feeds = realdata.calibration(name, None)
    before = resource.getrusage(resource.RUSAGE_SELF)
    pruned = api.prune(dense, method=None if method == "best" else method, calibration=feeds)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "model": name,
        "method": method,
        "user_s": round(after.ru_utime - before.ru_utime, 3),
        "sys_s": round(after.ru_stime - before.ru_stime, 3),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3),
        "minflt": after.ru_minflt - before.ru_minflt,
        "peak_rss_mb": after.ru_maxrss // 1024,
        "sha256": hashlib.sha256(pruned.SerializeToString()).hexdigest(),
        "library": str(Path(api.__file__).resolve().parent),
    }


def _common() -> ModuleType:
    """:mod:`tools.bench_common`, for the parent only: the child imports ``tools`` from the checkout it
    measures (``--baseline``), which a module-level import from this one would pre-empt."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tools import bench_common

    return bench_common


def run_child(root: Path, name: str, method: str) -> dict:
    env = dict(os.environ, ONNX_SPARSE_CACHE=os.environ.get("ONNX_SPARSE_CACHE", str(REPO / ".cache")))
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(root), name, method]
    row = _common().run_json_child(argv, f"{root} {name} {method}", env)
    if Path(row["library"]) != (root / "onnx_sparse").resolve():
        raise SystemExit(f"the child imported {row['library']}, not {root}/onnx_sparse")
    row["load1"] = round(os.getloadavg()[0], 2)
    return row


def summarize(rows: Sequence[dict], key: str = "cpu_s") -> dict[tuple[str, str], dict]:
    """Per (tree, model): median ``key`` of each method, their ratio, each round's ratio, distinct sha256s."""
    groups = dict.fromkeys((r["tree"], r["model"]) for r in rows)
    return {
        (tree, model): _common().paired_summary(
            [r for r in rows if r["tree"] == tree and r["model"] == model], key, "sparsegpt", "best", "sha256"
        )
        for tree, model in groups
    }


def report(rows: Sequence[dict]) -> str:
    lines = ["| tree | model | sparsegpt CPU s | best CPU s | best / sparsegpt (rounds) | sha256 sparsegpt / best |"]
    lines.append("|---|---|---|---|---|---|")
    for (tree, model), s in summarize(rows).items():
        rounds = " / ".join(f"{x:.2f}" for x in s["round_ratios"])
        shas = " / ".join(",".join(h[:12] for h in s["sha256"][m]) or "-" for m in METHODS)
        med = [f"{s['median'][m]:.2f}" if s["median"][m] is not None else "-" for m in METHODS]
        ratio = f"{s['ratio']:.2f}x" if s["ratio"] is not None else "-"
        lines.append(f"| {tree} | {model} | {med[0]} | {med[1]} | {ratio} ({rounds}) | {shas} |")
    loads = [r["load1"] for r in rows]
    lines.append(f"load average (1 min) after the runs: {min(loads):.2f}-{max(loads):.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. a git archive export) run beside ours")
    parser.add_argument("--root", type=Path, default=REPO, help="the checkout measured as 'ours'")
    parser.add_argument("--json", type=Path, help="append each run as a JSON line here")
    args = parser.parse_args(argv)
    trees = [("ours", args.root.resolve())]
    if args.baseline:
        trees.append(("baseline", args.baseline.resolve()))
    rows: list[dict] = []
    for i in range(args.repeats):
        for name in args.models:
            for method in args.methods:
                for tree, root in trees:
                    row = dict(run_child(root, name, method), tree=tree, round=i)
                    rows.append(row)
                    _common().append_jsonl(args.json, row)
    print(report(rows))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]).resolve(), sys.argv[3], sys.argv[4])))
        raise SystemExit(0)
    raise SystemExit(main())
