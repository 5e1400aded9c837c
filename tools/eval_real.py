"""Prune the real models with each method and measure what that costs on real, held-out data.

For each model x method (magnitude, wanda, sparsegpt, asym) x bias correction (off, on) the
model is pruned at FULL coverage (every eligible layer) with the calibration feeds of
:mod:`tools.realdata`, then judged on its DISJOINT evaluation feeds: the task metric
against the dense model, the output cosine (mean over float outputs), coverage (share of
eligible MACs that are 2:4 after pruning, measured at the input shapes in
:data:`COVERAGE_SHAPES`; share of eligible parameters where MACs are unknown) and the pruning time.

Then the fidelity-targeted runs: ``target_cosine`` (a floor on the worst float output's
cosine that the pruner holds by leaving the most sensitive layers dense). The pruner holds
it on HELD-OUT calibration feeds (every 4th feed, ``holdout=0.25``): it fits on the rest and
judges on those. This harness chooses the same way: a binary search along
:data:`TARGET_LADDER` (whose first step, -1, prunes every layer) finds the loosest target
whose task metric meets the goal on the held-out calibration feeds, and that run is then
judged on the evaluation data, which no step has seen. Goals
(:data:`GOALS`): det text-map IoU >= 0.85 with at least half the eligible MACs sparse;
MiniLM sentence cosine >= 0.98; rec token and cls top-1 agreement >= 0.95; magika top-1
agreement >= 0.95 (ours; the brief names none).

Usage::

    python tools/eval_real.py --json out/eval_real.json            # everything (long on a CPU)
    python tools/eval_real.py --quick --models ppocr_cls minilm_l3 # smaller evaluation sets
    python tools/eval_real.py --methods magnitude asym --bias off

Pruning goes through the Python API ``onnx_sparse.api.prune(model, method=...,
calibration=feeds, bias_correction=..., target_cosine=...)``; where that API does not take
those options yet, through the CLI (``onnx-sparse prune --method ... --load-inputs ...``);
where neither does, only plain magnitude pruning runs and the other rows say why not.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import realdata  # noqa: E402
from tools.realmodels import FetchError, model_path  # noqa: E402

__all__ = ["METHODS", "GOALS", "TARGET_LADDER", "Unavailable", "coverage", "prune", "run_one", "targeted", "main"]

METHODS = ("magnitude", "wanda", "sparsegpt", "asym")
COVERAGE_SHAPES: dict[str, dict[str, list[int]]] = {
    "magika": {"bytes": [1, 2048]},
    "ppocr_det": {"x": [1, 3, 640, 640]},
    "ppocr_rec": {"x": [1, 3, 48, 320]},
    "ppocr_cls": {"x": [1, 3, 48, 192]},
    "minilm_l3": {"input_ids": [1, 128], "attention_mask": [1, 128]},
}


@dataclass(frozen=True)
class Goal:
    metric: float
    min_coverage: float = 0.0


GOALS = {
    "ppocr_det": Goal(0.85, 0.5),
    "minilm_l3": Goal(0.98),
    "ppocr_rec": Goal(0.95),
    "ppocr_cls": Goal(0.95),
    "magika": Goal(0.95),
}
# loosest first; low steps for det, whose sigmoid map is ~0 on pictures without text, where
# a few stray activations make the per-sample cosine small while the thresholded map is unchanged
# -1 first: every layer pruned, but fitted without the held-out feeds like every other step
TARGET_LADDER = (-1.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)
QUICK_LADDER = (-1.0, 0.5, 0.9, 0.98, 0.995)
HOLDOUT = 0.25  # the pruner's default share of held-out calibration feeds
QUICK_EVAL = {"magika": 64, "ppocr_det": 16, "ppocr_rec": 48, "ppocr_cls": 64, "minilm_l3": 64}

logger = logging.getLogger("eval_real")


class Unavailable(Exception):
    """The installed onnx_sparse cannot run this configuration (yet)."""


# --------------------------------------------------------------------------- pruning


def _api_options() -> set[str]:
    """Keyword options ``onnx_sparse.api.prune`` understands (named parameters of it and its pipeline)."""
    from onnx_sparse import api

    names: set[str] = set()
    for fn in (api.prune, getattr(api, "build_prune_passes", None)):
        if fn is None:
            continue
        params = inspect.signature(fn).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names


def _cli_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "onnx_sparse", "prune", "--help"], capture_output=True, text=True, check=False
    )
    return out.stdout + out.stderr


def prune(
    model: onnx.ModelProto,
    method: str,
    calibration: list[realdata.Feed],
    bias_correction: bool,
    target_cosine: float | None = None,
    refit_head: bool = False,
) -> tuple[onnx.ModelProto, str]:
    """Prune ``model`` with the documented API, else the CLI; raise :class:`Unavailable` if neither can.

    Returns the pruned model and the way it was pruned (``api``, ``cli``, ``pass``, ``plain``).
    """
    from onnx_sparse import api

    plain = method == "magnitude" and not bias_correction and target_cosine is None
    options = _api_options()
    if {"method", "calibration"} <= options:
        kwargs: dict[str, Any] = {"method": method}
        if not plain:
            kwargs["calibration"] = calibration
        if bias_correction:
            kwargs["bias_correction"] = True
        if target_cosine is not None:
            kwargs["target_cosine"] = target_cosine
        if refit_head:
            kwargs["refit_head"] = True
        return api.prune(model, **kwargs), "api"
    if refit_head:
        raise Unavailable("this onnx_sparse cannot refit a softmax head")
    if "--method" in _cli_help():
        return _prune_cli(model, method, calibration, bias_correction, target_cosine), "cli"
    if plain:
        return api.prune(model), "plain"
    try:  # before the API takes the options: the pass itself, through the pipeline's prune_pass slot
        from onnx_sparse.passes.factory import make_prune_pass

        pass_ = make_prune_pass(method, calibration, bias_correction=bias_correction, target_cosine=target_cosine)
    except ImportError as err:
        raise Unavailable(f"onnx_sparse has no calibrated pruning yet ({err})") from None
    return api.prune(model, prune_pass=pass_), "pass"


def _prune_cli(
    model: onnx.ModelProto,
    method: str,
    calibration: list[realdata.Feed],
    bias_correction: bool,
    target_cosine: float | None,
) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="eval_real_") as tmp:
        src, dst, feeds = Path(tmp, "in.onnx"), Path(tmp, "out.onnx"), Path(tmp, "calib.json")
        onnx.save(model, src)
        cmd = [sys.executable, "-m", "onnx_sparse", "prune", str(src), "-o", str(dst), "--method", method]
        if method != "magnitude" or bias_correction or target_cosine is not None:
            realdata.save_feeds(calibration, feeds)
            cmd += ["--load-inputs", str(feeds)]
        if bias_correction:
            cmd.append("--bias-correction")
        if target_cosine is not None:
            cmd += ["--target-cosine", str(target_cosine)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            tail = " | ".join((res.stderr + res.stdout).strip().splitlines()[-3:])
            raise Unavailable(f"onnx-sparse prune failed (exit {res.returncode}): {tail}")
        return onnx.load(dst)


# --------------------------------------------------------------------------- coverage


def measured_macs(name: str, model: onnx.ModelProto) -> dict[str, int]:
    """Per-sample MACs of each eligible main-graph layer, from output shapes measured by running
    ``model`` once on zeros of the shapes in :data:`COVERAGE_SHAPES` (shape inference stops
    at the data-dependent Reshapes of PP-OCR's rec model)."""
    from onnx_sparse.graph.locate import find_weight_sites

    sites = [s for s in find_weight_sites(model, macs=False) if s.eligible and not s.scope and s.node_proto]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {s.node: s.node_proto.output[0] for s in sites}
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=o) for o in dict.fromkeys(outputs.values()) if o not in known)
    feed = {}
    for value in model.graph.input:
        if value.name in COVERAGE_SHAPES[name]:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feed[value.name] = np.ones(COVERAGE_SHAPES[name][value.name], dtype=dtype)
    names = [o.name for o in probe.graph.output]
    shapes = dict(zip(names, (a.shape for a in realdata.run(probe, [feed])[0]), strict=True))
    macs = {}
    for s in sites:
        out = int(np.prod(shapes[outputs[s.node]]))
        if s.op == "Conv":
            macs[s.node] = out * int(np.prod(s.consumer_shape[1:]))
        else:
            macs[s.node] = out * int(s.consumer_shape[s.consumer_axis or 0])
    return macs


def coverage(model: onnx.ModelProto, macs: dict[str, int]) -> dict[str, Any]:
    """Share of eligible MACs (``macs``: :func:`measured_macs`) whose weights are 2:4; params where MACs are unknown."""
    from onnx_sparse.analysis import layer_records
    from onnx_sparse.passes.base import as_model_file

    records = [r for r in layer_records(as_model_file(model)) if r["eligible"]]
    sparse = [r for r in records if r["sparse_2of4"]]
    out: dict[str, Any] = {
        "eligible_layers": len(records),
        "sparse_layers": len(sparse),
        "params_share": sum(r["params"] for r in sparse) / max(1, sum(r["params"] for r in records)),
    }
    if all(r["node"] in macs for r in records):
        out["macs_share"] = sum(macs[r["node"]] for r in sparse) / max(1, sum(macs[r["node"]] for r in records))
        out["coverage"], out["coverage_unit"] = out["macs_share"], "macs"
    else:
        out["coverage"], out["coverage_unit"] = out["params_share"], "params"
    return out


# --------------------------------------------------------------------------- evaluation


@dataclass
class ModelData:
    name: str
    dense: onnx.ModelProto
    calibration: list[realdata.Feed]
    evaluation: list[realdata.Feed]
    dense_calibration: list[list[np.ndarray]]
    dense_evaluation: list[list[np.ndarray]]
    macs: dict[str, int]


def load(name: str, quick: bool, calibration_size: int | None = None, evaluation_size: int | None = None) -> ModelData:
    """The dense model and its feeds; ``evaluation_size`` (more samples than the default where the
    frozen evaluation list holds them) overrides ``quick``'s smaller set."""
    dense = onnx.load(model_path(name))
    calib = realdata.calibration(name, calibration_size)
    evals = realdata.evaluation(name, evaluation_size or (QUICK_EVAL[name] if quick else None))
    dense_c, dense_e = realdata.run(dense, calib), realdata.run(dense, evals)
    return ModelData(name, dense, calib, evals, dense_c, dense_e, measured_macs(name, dense))


def judge(data: ModelData, pruned: onnx.ModelProto, on_calibration: bool = False) -> dict[str, Any]:
    feeds, dense = (
        (data.calibration, data.dense_calibration) if on_calibration else (data.evaluation, data.dense_evaluation)
    )
    return realdata.metric(data.name, dense, realdata.run(pruned, feeds))


def judge_held_out(data: ModelData, pruned: onnx.ModelProto) -> dict[str, Any]:
    """The task metric on the calibration feeds a targeted prune kept out of fitting."""
    from onnx_sparse.calib.data import split_holdout

    _, held = split_holdout(list(range(len(data.calibration))), HOLDOUT)  # type: ignore[arg-type]
    if not held:
        raise Unavailable(f"{data.name}: one calibration feed, nothing to hold out")
    dense = [data.dense_calibration[i] for i in held]
    return realdata.metric(data.name, dense, realdata.run(pruned, [data.calibration[i] for i in held]))


def run_one(
    data: ModelData, method: str, bias: bool, target: float | None = None, refit_head: bool = False
) -> dict[str, Any]:
    row: dict[str, Any] = {"model": data.name, "method": method, "bias_correction": bias, "target_cosine": target,
                           "refit_head": refit_head}  # fmt: skip
    t0 = time.perf_counter()
    try:
        pruned, row["via"] = prune(data.dense, method, data.calibration, bias, target, refit_head)
    except Unavailable as err:
        row.update(status="unavailable", reason=str(err))
        return row
    except Exception as err:  # a failure of the pruner: record it and go on with the next row
        logger.exception("%s %s bias=%s target=%s failed", data.name, method, bias, target)
        row.update(status="error", reason=f"{type(err).__name__}: {err}")
        return row
    row["prune_s"] = time.perf_counter() - t0
    row.update(coverage(pruned, data.macs))
    row["evaluation"] = judge(data, pruned)
    row["metric"], row["cosine"] = row["evaluation"]["metric"], row["evaluation"]["output_cosine"]
    row["metric_name"] = row["evaluation"]["metric_name"]
    row["status"] = "ok"
    row["calibration"] = judge(data, pruned, on_calibration=True)
    if target is not None:
        row["held_out"] = judge_held_out(data, pruned)
    return row


def _meets(goal: Goal, result: dict[str, Any], cov: float) -> bool:
    return result["metric"] >= goal.metric and cov >= goal.min_coverage


def _step(goal: Goal, row: dict[str, Any]) -> dict[str, Any]:
    """Mark ``row`` with whether it meets ``goal`` on held-out calibration feeds; a summary for the ladder."""
    row["meets_goal_on_held_out"] = _meets(goal, row["held_out"], row["coverage"])
    keys = ("target_cosine", "coverage", "meets_goal_on_held_out")
    return {"held_out_metric": row["held_out"]["metric"], **{k: row[k] for k in keys}}


def targeted(data: ModelData, method: str, bias: bool, ladder: Sequence[float]) -> dict[str, Any]:
    """The loosest ``target_cosine`` on ``ladder`` whose task metric meets the goal on HELD-OUT calibration feeds.

    A binary search on ``ladder`` (loosest first; a tighter target keeps more layers dense,
    so the metric rises and coverage falls), each step one pruning. The chosen run is then
    judged on the evaluation data.
    """
    goal = GOALS[data.name]
    tried: list[dict[str, Any]] = []

    def attempt(target: float | None) -> dict[str, Any]:
        row = run_one(data, method, bias, target)
        if row["status"] == "ok":
            tried.append(_step(goal, row))
            logger.info(
                "%s target %s: held-out calibration %s %.4f, coverage %.3f -> %s",
                data.name, target, row["held_out"]["metric_name"], row["held_out"]["metric"], row["coverage"],
                "meets goal" if row["meets_goal_on_held_out"] else "short",
            )  # fmt: skip
        return row

    rows: dict[int, dict[str, Any]] = {}
    lo, hi = 0, len(ladder) - 1
    while lo < hi:  # smallest index (loosest target) whose metric meets the goal
        mid = (lo + hi) // 2
        rows[mid] = attempt(ladder[mid])
        if rows[mid]["status"] != "ok":
            return {**rows[mid], "kind": "target", "goal": goal.__dict__, "ladder": tried}
        if rows[mid]["meets_goal_on_held_out"]:
            hi = mid
        else:
            lo = mid + 1
    chosen = rows.get(lo) or attempt(ladder[lo])
    if chosen["status"] != "ok":
        return {**chosen, "kind": "target", "goal": goal.__dict__, "ladder": tried}
    chosen.update(kind="target", goal=goal.__dict__, ladder=tried)
    chosen["meets_goal_on_evaluation"] = _meets(goal, chosen["evaluation"], chosen["coverage"])
    return chosen


# --------------------------------------------------------------------------- report

_COLUMNS = [
    ("model", "model"),
    ("label", "method"),
    ("metric_name", "task metric"),
    ("metric", "value"),
    ("extra", "also"),
    ("cosine", "out cos"),
    ("coverage_txt", "coverage"),
    ("prune_s", "prune s"),
    ("note", "note"),
]


def _extra(row: dict[str, Any]) -> str:
    ev = row.get("evaluation") or {}
    keys = {
        "ppocr_det": ("iou_text_images", "pooled_iou"),
        "ppocr_rec": ("sequence_agreement", "nonblank_agreement"),
        "minilm_l3": ("min_sentence_cosine",),
        "ppocr_cls": ("top1_agreement_confident",),
        "magika": ("top1_agreement_confident",),
    }.get(row["model"], ())
    short = {"iou_text_images": "text-img", "pooled_iou": "pooled", "sequence_agreement": "seq",
             "nonblank_agreement": "nonblank", "min_sentence_cosine": "min",
             "top1_agreement_confident": "p>=0.9"}  # fmt: skip
    return " ".join(f"{short[k]} {ev[k]:.3f}" for k in keys if k in ev)


def table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        label = r["method"] + (" +bc" if r["bias_correction"] else "") + (" +head" if r.get("refit_head") else "")
        if r.get("target_cosine") is not None:
            label += " @all" if r["target_cosine"] <= -1 else f" @cos{r['target_cosine']:g}"
        t = dict(r, label=label, extra=_extra(r))
        if r.get("status") == "ok":
            t["coverage_txt"] = f"{100 * r['coverage']:.1f}% {r['coverage_unit']}"
            if r.get("kind") == "target":
                held = "met" if r.get("meets_goal_on_held_out") else "NOT met"
                evals = "met" if r.get("meets_goal_on_evaluation") else "MISSED"
                t["note"] = f"goal: {held} on held-out calibration, {evals} on evaluation"
        else:
            t["note"] = f"{r.get('status')}: {r.get('reason', '')}"
        out.append(t)
    return out


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    from onnx_sparse.report import format_table

    return format_table(table_rows(rows), _COLUMNS, max_width=70)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(realdata.MODELS), choices=realdata.MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bias", choices=("off", "on", "both"), default="both", help="bias correction runs")
    parser.add_argument(
        "--refit-head", choices=("off", "on", "both"), default="off", help="softmax-head refit, full-coverage runs"
    )
    parser.add_argument("--quick", action="store_true", help="smaller evaluation sets and a shorter target ladder")
    parser.add_argument("--no-target", action="store_true", help="skip the fidelity-targeted runs")
    parser.add_argument("--only-target", action="store_true", help="skip the full-coverage runs")
    parser.add_argument("--target-method", default="asym", choices=METHODS, help="method of the targeted runs")
    parser.add_argument("--target-bias", choices=("off", "on"), default="on", help="bias correction, targeted runs")
    parser.add_argument(
        "--calibration-size",
        type=int,
        metavar="N",
        help="calibration samples per model (default: tools.realdata.SIZES; fewer if a source has fewer)",
    )
    parser.add_argument("--json", metavar="PATH", help="write every result as JSON")
    parser.add_argument(
        "--reuse",
        metavar="PATH",
        help="take the full-coverage rows of this earlier --json output (same --quick) instead of pruning again",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    for noisy in ("onnx_sparse",):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    biases = {"off": [False], "on": [True], "both": [False, True]}[args.bias]
    ladder = QUICK_LADDER if args.quick else TARGET_LADDER
    rows: list[dict[str, Any]] = []
    data_info: dict[str, Any] = {}
    reused: dict[tuple[str, str, bool, bool], dict[str, Any]] = {}
    heads = {"off": [False], "on": [True], "both": [False, True]}[args.refit_head]
    if args.reuse:
        earlier = json.loads(Path(args.reuse).read_text())
        env = earlier["environment"]
        if env["quick"] != args.quick or env.get("calibration_size") != args.calibration_size:
            parser.error(f"--reuse {args.reuse}: that run used other --quick / --calibration-size settings")
        for r in earlier["results"]:
            if r.get("status") == "ok" and r.get("target_cosine") is None and r.get("kind") != "target":
                key = (r["model"], r["method"], r["bias_correction"], bool(r.get("refit_head")))
                reused[key] = {**r, "reused_from": args.reuse}
    started = time.perf_counter()
    for name in args.models:
        try:
            data = load(name, args.quick, args.calibration_size)
        except (FetchError, realdata.DataError) as err:
            print(f"{name}: skipped: {err}", file=sys.stderr)
            rows.append({"model": name, "method": "-", "bias_correction": False, "status": "skipped",
                         "reason": str(err)})  # fmt: skip
            continue
        data_info[name] = {
            "calibration_feeds": len(data.calibration),
            "evaluation_feeds": len(data.evaluation),
            **realdata.describe(name),
            "eligible_macs": sum(data.macs.values()),
            "dense_coverage": coverage(data.dense, data.macs),
        }
        for method in [] if args.only_target else args.methods:
            for head in heads:
                for bias in biases:
                    row = reused.get((name, method, bias, head)) or run_one(data, method, bias, refit_head=head)
                    rows.append(row)
                    print(format_report([row]).splitlines()[-1], file=sys.stderr, flush=True)
        if not args.no_target:
            row = targeted(data, args.target_method, args.target_bias == "on", ladder)
            rows.append(row)
            print(format_report([row]).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_report(rows))
    if args.json:
        from onnx_sparse.report import write_json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(
            args.json,
            {
                "environment": {
                    "python": sys.version.split()[0],
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "quick": args.quick,
                    "calibration_size": args.calibration_size,
                    "seconds": time.perf_counter() - started,
                },
                "goals": {k: v.__dict__ for k, v in GOALS.items()},
                "data": data_info,
                "results": rows,
            },
        )
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
