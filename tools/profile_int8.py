"""Where ``prune --int8``'s time goes: process CPU seconds per phase of one ``api.prune_file``.

The phases are the steps of :func:`onnx_sparse.api._prune_int8` and of
:func:`onnx_sparse.quant.finish` (the prune itself, the outlier rescaling's statistics and choice,
the INT8 statistics and the FP32 reference, the activation scales, the weights, the
mixed-precision search's candidate runs and ranking, the per-layer error report, the save). Each
is timed by wrapping the function in its module for this process only: ``resource.getrusage``
(user + sys of every thread) around each call made from the main thread, so a phase includes the
work its worker threads do meanwhile (the FP32 reference, computed in the background while the
statistics are taken, counts in ``finish.collect``). ``incl`` is a phase with the phases inside
it, ``excl`` without them; ``n`` the calls. ``--ort-threads 1`` opens every onnxruntime session
with one intra-op thread (the prune's capture too), to attribute time without the cores' split.

Usage::

    python tools/profile_int8.py --model ppocr_rec [--method int8|fp32] [--json out/profile_int8.jsonl]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import resource
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = ["Phases", "profile", "main"]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Phases:
    """Inclusive / exclusive process CPU per label, for calls made from the main thread."""

    def __init__(self) -> None:
        self.incl: dict[str, float] = {}
        self.excl: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[Any]] = []
        self._wrapped: list[tuple[Any, str, Any]] = []  # (owner, attribute, original), to undo

    def timed(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        t0 = _cpu()
        self._stack.append([label, 0.0])
        try:
            return fn(*args, **kwargs)
        finally:
            dt = _cpu() - t0
            _, inner = self._stack.pop()
            self.incl[label] = self.incl.get(label, 0.0) + dt
            self.excl[label] = self.excl.get(label, 0.0) + dt - inner
            self.calls[label] = self.calls.get(label, 0) + 1
            if self._stack:
                self._stack[-1][1] += dt

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        """Time ``owner.attr`` (a function, or a property computed once per object) as ``label``."""
        fn = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        self._wrapped.append((owner, attr, fn))
        if isinstance(fn, property):
            fget = fn.fget
            assert fget is not None

            def get(obj: Any) -> Any:
                return self.timed(label, fget, obj)

            setattr(owner, attr, property(functools.wraps(fget)(get)))
            return

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self.timed(label, fn, *args, **kwargs)

        setattr(owner, attr, wrapper)

    def undo(self) -> None:
        """Put every wrapped attribute back."""
        for owner, attr, fn in reversed(self._wrapped):
            setattr(owner, attr, fn)
        self._wrapped.clear()

    def rows(self) -> list[dict[str, Any]]:
        order = sorted(self.incl, key=lambda k: -self.incl[k])
        return [
            {"phase": k, "incl": round(self.incl[k], 3), "excl": round(self.excl[k], 3), "n": self.calls[k]}
            for k in order
        ]


def _instrument(phases: Phases) -> None:
    import onnx_sparse.quant as quant
    from onnx_sparse import api
    from onnx_sparse.quant import error, static

    # _prune_int8 imports these from onnx_sparse.quant when it runs
    for name in (
        "prepare",
        "candidates",
        "smooth_model",
        "smooth_finish",
        "capture_rounding",
        "apply_rescaling",
        "finish",
    ):
        phases.wrap(quant, name, name)
    for name in ("smooth_collect", "finish"):  # smooth_finish calls these from its own module
        phases.wrap(static, name, name)
    phases.wrap(api, "run_pipeline", "prune (run_pipeline)")
    phases.wrap(api, "save_model", "save_model")
    for name, label in (
        ("collect_split", "smooth: statistics (dense, fit + held-out)"),
        ("collect_split_outputs", "smooth: statistics (pruned, fit + held-out, + FP32 reference)"),
        ("collect", "finish: statistics (+ FP32 reference in background)"),
        ("_activation_scales", "finish: activation scales"),
        ("quantize_weight", "finish: weights rounded"),
        ("write_qdq", "finish: Q/DQ written"),
        ("fallback_search", "finish: mixed-precision search"),
        ("_check", "finish: per-layer report"),
        ("finalize_inline", "finish: finalize"),
    ):
        phases.wrap(static, name, label)
    phases.wrap(error.Int8Probe, "run_many", "probe: candidate runs (held-out)")
    phases.wrap(error.Int8Probe, "errors", "probe: INT8 errors (ranking, report)")


def profile(
    model: str | Path,
    feeds: Sequence[dict[str, Any]],
    method: str = "int8",
    ort_threads: int | None = None,
) -> dict[str, Any]:
    """One ``api.prune_file`` of ``model`` on ``feeds`` (``Recipe(int8=True)`` or ``Recipe()``), timed per phase."""
    from onnx_sparse import api, runtime
    from onnx_sparse.recipe import Recipe

    phases = Phases()
    _instrument(phases)
    if ort_threads:
        opened = runtime.session

        def session(*args: Any, **kwargs: Any) -> Any:
            kwargs["threads"] = ort_threads
            return opened(*args, **kwargs)

        phases._wrapped.append((runtime, "session", opened))
        runtime.session = session  # type: ignore[assignment]
    recipe = Recipe(int8=True) if method == "int8" else Recipe()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / "out.onnx"
            phases.timed("TOTAL", api.prune_file, str(model), dst, recipe, calibration=list(feeds))
            sha = hashlib.sha256(dst.read_bytes()).hexdigest()
    finally:
        phases.undo()
    return {"method": method, "cpu": round(phases.incl["TOTAL"], 3), "sha": sha[:12], "phases": phases.rows()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a real model's name (tools/realmodels.py)")
    parser.add_argument("--method", choices=("int8", "fp32"), default="int8")
    parser.add_argument("--ort-threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="append the result as a JSON line here")
    args = parser.parse_args(argv)
    from tools import realdata
    from tools.bench_common import append_jsonl
    from tools.realmodels import model_path

    feeds = realdata.calibration(args.model, None)
    row = dict(profile(model_path(args.model), feeds, args.method, args.ort_threads), model=args.model)
    for p in row["phases"]:
        print(f"{p['phase']:55s} incl {p['incl']:8.2f}  excl {p['excl']:8.2f}  n={p['n']}")
    append_jsonl(args.json, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
