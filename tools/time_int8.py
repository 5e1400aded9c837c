"""Time of ``prune --int8`` against the FP32 default prune on the real models (issue 18's <= 1.5x).

Each run is ONE ``onnx_sparse.api.prune_file`` (the CLI's path: write and verify included) of a real
model (:mod:`tools.realmodels`) on its frozen calibration feeds (:mod:`tools.realdata`) in a fresh
subprocess, with ``Recipe()`` (``fp32``) or ``Recipe(int8=True)`` (``int8``). The child measures
the process CPU seconds (user + sys of all its threads, ``resource.getrusage``) around the prune
alone; the parent also records the whole child process's user + sys (imports and loading
included) and the 1-minute load average before and after. Methods alternate (even rounds fp32
then int8, odd rounds int8 then fp32), so slow phases of a shared machine fall on both sides; the
summary is medians over ``--repeats`` rounds, their ratio and each round's own ratio.

Usage::

    python tools/time_int8.py --models minilm_l3 ppocr_cls --repeats 3 --json out/time_int8.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_common import REPO, append_jsonl, paired_summary, run_json_child  # noqa: E402

MODELS = ("minilm_l3", "ppocr_cls", "ppocr_rec", "ppocr_det", "magika")
METHODS = ("fp32", "int8")

__all__ = ["MODELS", "METHODS", "child", "summarize", "main"]


def child(name: str, method: str) -> dict[str, float | str]:
    """One measured prune (run in a fresh process)."""
    sys.path.insert(0, str(REPO))
    from onnx_sparse import api
    from onnx_sparse.recipe import Recipe
    from tools import realdata
    from tools.realmodels import model_path

    feeds = realdata.calibration(name, None)
    recipe = Recipe(int8=True) if method == "int8" else Recipe()
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "out.onnx"
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        api.prune_file(str(model_path(name)), dst, recipe, calibration=feeds)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        sha = hashlib.sha256(dst.read_bytes()).hexdigest()
    return {
        "user": r1.ru_utime - r0.ru_utime,
        "sys": r1.ru_stime - r0.ru_stime,
        "cpu": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
        "sha": sha[:12],
    }


def run_child(name: str, method: str) -> dict:
    load0 = os.getloadavg()[0]
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, method]
    row = run_json_child(argv, f"{name} {method}")
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    row.update(
        model=name,
        method=method,
        proc_cpu=c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
        load=[round(load0, 2), round(os.getloadavg()[0], 2)],
    )
    return row


def summarize(rows: Sequence[dict], key: str = "cpu") -> dict[str, dict]:
    """Per model: median ``key`` of each method, int8 / fp32 of the medians, each round's ratio, loads, sha256s."""
    out: dict[str, dict] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        out[model] = {**paired_summary(mine, key, "fp32", "int8", "sha"), "loads": [x for r in mine for x in r["load"]]}
    return out


def report(rows: Sequence[dict]) -> str:
    lines = ["| model | FP32 CPU s | --int8 CPU s | ratio (rounds) | whole process s, ratio | load avg | sha256 |"]
    lines.append("|---|---|---|---|---|---|---|")
    proc = summarize(rows, "proc_cpu")
    for model, s in summarize(rows).items():
        rounds = " / ".join(f"{x:.2f}" for x in s["round_ratios"])
        p = proc[model]
        shas = " / ".join(",".join(s["sha"][m]) for m in METHODS)
        lines.append(
            f"| {model} | {s['median']['fp32']:.2f} | {s['median']['int8']:.2f} | {s['ratio']:.2f}x ({rounds}) "
            f"| {p['median']['fp32']:.2f} / {p['median']['int8']:.2f}, {p['ratio']:.2f}x "
            f"| {min(s['loads']):.1f}-{max(s['loads']):.1f} | {shas} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["minilm_l3", "ppocr_cls"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="append each run as a JSON line here")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    for name in args.models:
        for i in range(args.repeats):
            for method in METHODS if i % 2 == 0 else METHODS[::-1]:
                row = dict(run_child(name, method), round=i)
                rows.append(row)
                append_jsonl(args.json, row)
    print(report(rows))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
        raise SystemExit(0)
    raise SystemExit(main())
