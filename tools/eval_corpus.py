"""The README's table of every real model the tests run, measured through the CLI as a user runs it.

Per model (both corpora: :data:`tools.realmodels.MODELS` with :mod:`tools.realdata`,
:data:`tools.realmodels.CORPUS2` with :mod:`tools.realdata2`):

* **eligible**: share of the model's weight parameters in 2:4-eligible layers (``inspect``);
* **prune time**: wall and CPU (user + system) time of ``onnx-sparse prune M -o P --load-inputs
  calib.json`` (the default recipe with data: asym + bias correction + head refit), the whole
  process; on a machine other jobs load, the CPU time is the steadier figure;
* **agreement** with the dense model on the held-out evaluation feeds, by the model's own
  metric (:func:`tools.realdata.metric` / :func:`tools.realdata2.metric`), for magnitude
  pruning (``prune M -o P``, no data) and the default recipe, and the share of magnitude's
  gap to the dense model (1.0) that the default recipe closes;
* **compare**: ``onnx-sparse compare M P --load-inputs eval.json`` with the default criteria;
* **INT8**: ``prune --int8 --load-inputs calib.json``, then ``inspect``'s INT8 column: how
  many eligible layers are INT8 in, weight and out (a sparse INT8 kernel is possible), and the
  sparse INT8 model's agreement with the dense model on the same held-out feeds, next to the
  default (FP32) prune's: with onnxruntime's default session and with the Q/DQ run as written
  (no graph optimizations: onnxruntime's fused integer kernels saturate 16-bit sums on CPUs
  without VNNI, which no GPU engine does).

Usage::

    python tools/eval_corpus.py --json out/corpus.json          # every model (about 10 min on 2 cores)
    python tools/eval_corpus.py --models silero_vad vit_focus

The calibration and evaluation sets are the default ones of each data module (disjoint).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import realdata, realdata2  # noqa: E402
from tools.realmodels import CORPUS2, MODELS, model_path  # noqa: E402

FAMILY = {
    "magika": "byte-sequence CNN classifier (file types)",
    "ppocr_det": "text detector (DBNet, Constant weights)",
    "ppocr_rec": "text recognizer (SVTR, CTC)",
    "ppocr_cls": "text-line orientation classifier",
    "minilm_l3": "sentence encoder (BERT, 3 layers)",
    "silero_vad": "voice activity (STFT + convs in If branches + LSTM, rank-0 input)",
    "silero_vad_half": "voice activity, fp16 weights behind Cast",
    "basic_pitch": "music transcription (TF export, CQT in the graph)",
    "layout_cdla": "document layout detector (PP-PicoDet)",
    "orientation": "page orientation classifier (PP-LCNet)",
    "vit_focus": "vision transformer (ViT-S/16) saliency",
}


# tools.realdata's metrics by model (tools.realdata2's name themselves)
METRIC = {
    "magika": "top-1 agreement",
    "ppocr_det": "text-map IoU",
    "ppocr_rec": "token agreement",
    "ppocr_cls": "top-1 agreement",
    "minilm_l3": "sentence cosine",
}


def _data(name: str) -> Any:
    return realdata2 if name in CORPUS2 else realdata


def _cli(*argv: object) -> tuple[int, float, float, str]:
    """Exit status, wall seconds, CPU seconds (user + system: what the run costs, whatever else
    loads the machine) and output of one CLI process."""
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_sparse", *map(str, argv)], capture_output=True, text=True, check=False
    )
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return proc.returncode, time.perf_counter() - t0, cpu, proc.stdout + proc.stderr


def measure(name: str, work: Path) -> dict[str, Any]:
    from polygraphy.json import save_json

    from onnx_sparse import runtime

    data = _data(name)
    src = model_path(name)
    calib, held = data.calibration(name), data.evaluation(name)
    save_json(calib, str(work / "calib.json"))
    save_json(held, str(work / "eval.json"))
    row: dict[str, Any] = {
        "model": name,
        "family": FAMILY.get(name, ""),
        "calibration": len(calib),
        "evaluation": len(held),
    }
    rc, _, _, out = _cli("inspect", src, "--json", work / "dense.json")
    assert rc == 0, out
    summary = json.loads((work / "dense.json").read_text())["summary"]
    row["eligible_layers"] = summary["eligible_layers"]
    row["eligible_share"] = summary["eligible_params_share"]
    rc, _, _, out = _cli("prune", src, "-o", work / "magnitude.onnx")
    row["magnitude_exit"] = rc
    rc, seconds, cpu, out = _cli("prune", src, "-o", work / "default.onnx", "--load-inputs", work / "calib.json")
    row["default_exit"], row["prune_s"], row["prune_cpu_s"] = rc, seconds, cpu
    dense = data.run(src, held)
    for label in ("magnitude", "default"):
        if row[f"{label}_exit"] == 0:
            row[label] = data.metric(name, dense, data.run(work / f"{label}.onnx", held))
    if "magnitude" in row and "default" in row:
        mag, best = row["magnitude"]["metric"], row["default"]["metric"]
        row["gap_closed"] = None if mag >= 1.0 else (best - mag) / (1.0 - mag)
    rc, _, _, out = _cli("compare", src, work / "default.onnx", "--load-inputs", work / "eval.json")
    row["compare"] = {0: "PASSED", 1: "FAILED"}.get(rc, f"exit {rc}")
    rc, _, _, out = _cli("prune", src, "-o", work / "int8.onnx", "--int8", "--load-inputs", work / "calib.json")
    row["int8_exit"] = rc
    if rc == 0:
        rc, _, _, out = _cli("inspect", work / "int8.onnx", "--json", work / "int8.json")
        layers = [r for r in json.loads((work / "int8.json").read_text())["layers"] if r["eligible"]]
        row["int8_ready"] = sum(1 for r in layers if r["sparse_int8_possible"])
        row["int8_2of4"] = all(r["sparse_2of4"] for r in layers)
        row["int8"] = data.metric(name, dense, data.run(work / "int8.onnx", held))
        written = runtime.session(str(work / "int8.onnx"), optimize=False)
        row["int8_as_written"] = data.metric(name, dense, [written.run(None, dict(f)) for f in held])
    else:
        row["int8_note"] = next((line for line in out.splitlines() if line.startswith("[E]")), "")
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | family | eligible (share of params) | default prune: wall / CPU (s) | agreement on held-out data: magnitude -> default (metric) | gap closed | compare | INT8 (eligible layers sparse-INT8 ready) | `prune --int8` agreement: default session / Q/DQ as written (change from default) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mag, best = r.get("magnitude", {}), r.get("default", {})
        best.setdefault("name", METRIC.get(r["model"], ""))
        metric = f"{mag.get('metric', float('nan')):.3f} -> **{best.get('metric', float('nan')):.3f}** ({best.get('name', '')})"
        gap = "-" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.0f}%"
        int8 = (
            f"{r['int8_ready']}/{r['eligible_layers']}"
            if "int8_ready" in r
            else f"none ({r.get('int8_note', '')[4:60]})"
        )
        if "int8" in r:
            q, w = r["int8"]["metric"], r["int8_as_written"]["metric"]
            int8_metric = f"{q:.3f} / {w:.3f} ({w - best.get('metric', float('nan')):+.3f})"
        else:
            int8_metric = "-"
        lines.append(
            f"| {r['model']} | {r['family']} | {r['eligible_layers']} ({100 * r['eligible_share']:.0f}%) | "
            f"{r['prune_s']:.1f} / {r.get('prune_cpu_s', float('nan')):.1f} | {metric} | {gap} | {r['compare']} | {int8} | {int8_metric} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    every = [*CORPUS2, *MODELS]
    parser.add_argument("--models", nargs="+", default=every, choices=every)
    parser.add_argument("--json", metavar="PATH", help="write every row as JSON")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix=f"eval-{name}-") as tmp:
            row = measure(name, Path(tmp))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
