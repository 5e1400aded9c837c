"""Memory profile of one calibrated prune, by phase: where the peak resident set comes from.

Runs ``api.prune_file`` on one of :mod:`tools.bench_calibrated`'s encoders in this process, with a
thread that samples the resident set (``/proc/self/status``: anonymous and file-backed pages
apart) every ``--interval`` seconds, and markers around the phases that can hold weights:
loading and the preflight checks, the pass's model copy, whole-model inlining, every
onnxruntime session, each capture stage and solve, the softmax-head screen and the save.

Prints one line per phase (start, seconds, resident set at entry, the highest sample inside it,
the true high water inside it (``VmHWM``, reset at every sample and marker, so a spike inside
one GIL-holding C call between two samples is still seen)
and at exit) and the overall peak with the phase it fell in; ``--json`` writes every sample.

Usage::

    python tools/mem_profile.py --size large --method best
    python tools/mem_profile.py --size large-4 --method sparsegpt --samples 8 --json /tmp/prof.json

Linux only (``/proc``). The markers wrap the functions by name, so a renamed function drops
out of the profile rather than failing it (a warning says which).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_calibrated import METHODS, SHAPES, WORKDIR, _size, feeds, write_model  # noqa: E402
from tools.bench_common import fmt_bytes, proc_status  # noqa: E402

#: (module, qualified name) of the functions marked as phases.
MARKED = (
    ("onnx_sparse.guard", "check_run_paths"),
    ("onnx_sparse.io", "load_model"),
    ("onnx_sparse.io", "check_input_model"),
    ("onnx_sparse.io", "save_model"),
    ("onnx_sparse.io", "verify_model"),
    ("onnx_sparse.io", "_write_external"),
    ("onnx_sparse.passes.base", "copy_model_file"),
    ("onnx_sparse.calib.capture", "inline_model"),
    ("onnx_sparse.calib.capture", "run_model"),
    ("onnx_sparse.calib.capture", "StagedRunner.iter_stage"),
    ("onnx_sparse.calib.capture", "StagedRunner._build"),
    ("onnx_sparse.runtime", "session"),
    ("onnx_sparse.passes.head", "head_candidates"),
    ("onnx_sparse.passes.head", "softmax_heads"),
    ("onnx_sparse.passes.head", "refit_heads"),
    ("onnx_sparse.passes.calibrated", "Calibrator.solve"),
    ("onnx_sparse.passes.calibrated", "Calibrator.groups"),
    ("onnx_sparse.passes.calibrated", "CalibratedPrunePass.call"),
    ("onnx_sparse.calib.stats", "LayerStats.flush"),
)


def _high_water() -> int:
    """The peak resident set since the last call (``VmHWM``, then reset through
    ``/proc/self/clear_refs``): what the sampler cannot see, such as a spike inside one C call
    that holds the GIL (protobuf serializing a model) between two samples. 0 where unsupported."""
    try:
        hwm = proc_status("VmHWM").get("VmHWM", 0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return 0
    return hwm


def _rss() -> tuple[int, int]:
    """(anonymous, file-backed and shared) resident bytes of this process."""
    got = proc_status("RssAnon", "RssFile", "RssShmem")
    return got.get("RssAnon", 0), got.get("RssFile", 0) + got.get("RssShmem", 0)


class Profile:
    """RSS samples and phase markers (enter/exit events, nested)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int, int]] = []
        #: (t, the peak resident set since the previous entry): see :func:`_high_water`
        self.high_water: list[tuple[float, int]] = []
        #: (t, "enter"/"exit", name, rss, thread): capture's worker threads mark their phases too
        self.events: list[tuple[float, str, str, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._lock = threading.Lock()

    def _sample(self) -> None:
        while not self._stop.is_set():
            anon, file = _rss()
            with self._lock:
                self.samples.append((time.perf_counter() - self.t0, anon, file))
                self.high_water.append((time.perf_counter() - self.t0, _high_water()))
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, kind: str, name: str) -> None:
        anon, file = _rss()
        with self._lock:
            thread = threading.current_thread()
            label = "" if thread is threading.main_thread() else thread.name
            self.events.append((time.perf_counter() - self.t0, kind, name, anon + file, label))
            self.samples.append((time.perf_counter() - self.t0, anon, file))
            self.high_water.append((time.perf_counter() - self.t0, _high_water()))

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(*args: Any, **kwargs: Any) -> Any:
                self.mark("enter", name)
                try:
                    yield from fn(*args, **kwargs)
                finally:
                    self.mark("exit", name)

            return gen

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            self.mark("enter", name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.mark("exit", name)

        return call

    def install(self, targets: Sequence[tuple[str, str]] = MARKED) -> None:
        """Wrap every target, wherever a loaded ``onnx_sparse`` module holds it by name."""
        import importlib

        for mod_name, qual in targets:
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                print(f"warning: no module {mod_name}", file=sys.stderr)
                continue
            owner: Any = mod
            *path, attr = qual.split(".")
            for p in path:
                owner = getattr(owner, p, None)
            fn = getattr(owner, attr, None) if owner is not None else None
            if fn is None:
                print(f"warning: {mod_name}.{qual} not found; not profiled", file=sys.stderr)
                continue
            wrapped = self.wrap(fn, qual)
            if isinstance(inspect.getattr_static(owner, attr), staticmethod):
                setattr(owner, attr, staticmethod(wrapped))
            else:
                setattr(owner, attr, wrapped)
            if not path:  # a module-level function: also where other modules imported it by name
                for m in list(sys.modules.values()):
                    if getattr(m, "__name__", "").startswith("onnx_sparse") and getattr(m, attr, None) is fn:
                        setattr(m, attr, wrapped)

    def phases(self) -> list[dict[str, Any]]:
        """One entry per marked call: start, seconds, RSS at entry, the peak sample inside, at exit.

        Nesting is followed per thread (capture runs pieces in worker threads while the main
        thread solves; one shared stack paired their exits with the wrong entries). A worker
        thread's phases sit one level below the outermost phase and carry the thread's name.
        """
        out = []
        stacks: dict[str, list[tuple[float, str, int, int]]] = {}
        for t, kind, name, rss, thread in self.events:
            stack = stacks.setdefault(thread, [])
            base = 1 if thread else 0
            if kind == "enter":
                stack.append((t, name, rss, base + len(stack)))
                continue
            while stack and stack[-1][1] != name:
                stack.pop()
            if not stack:
                continue
            t_in, _, rss_in, depth = stack.pop()
            peak = max((a + f for s, a, f in self.samples if t_in <= s <= t), default=rss)
            # a high-water reading covers the time since the one before: the first inside counts
            true_peak = max((h for s, h in self.high_water if t_in < s <= t), default=peak)
            label = f"{name} [{thread}]" if thread else name
            out.append({"name": label, "depth": depth, "start": t_in, "seconds": t - t_in, "rss_in": rss_in,
                        "peak": peak, "true_peak": max(peak, true_peak), "rss_out": rss})  # fmt: skip
        return sorted(out, key=lambda p: p["start"])


def _collapse(phases: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Runs of the same phase name at the same depth folded into one line (``xN``), to keep the
    table short (``limit``: keep at most this many lines per name; the peak one always stays)."""
    out: list[dict[str, Any]] = []
    for p in phases:
        last = out[-1] if out else None
        if last is not None and last["name"] == p["name"] and last["depth"] == p["depth"]:
            last["count"] += 1
            last["seconds"] += p["seconds"]
            last["peak"] = max(last["peak"], p["peak"])
            last["true_peak"] = max(last["true_peak"], p["true_peak"])
            last["rss_out"] = p["rss_out"]
            continue
        out.append({**p, "count": 1})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", help="bench_calibrated size: base-L, large[-L], big[-L], huge[-L]")
    parser.add_argument("--method", default="best", choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--depth", type=int, default=1, help="nesting depth of phases to print")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    kind, layers = _size(args.size)
    path = write_model(kind, layers, args.workdir)
    weights = sum(p.stat().st_size for p in path.parent.iterdir())
    out = args.workdir / f"profile-out-{os.getpid()}" / "model.onnx"  # runs side by side do not meet
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    cal = feeds(SHAPES[kind][0], args.samples, args.seq)

    from onnx_sparse import api
    from onnx_sparse.passes import calibrated, head  # noqa: F401 - loaded so that their names are wrapped

    prof = Profile(args.interval)
    prof.install()
    prof.start()
    prof.mark("enter", "prune_file")
    api.prune_file(path, out, calibration=cal, verify=False, **METHODS[args.method])  # type: ignore[arg-type]
    prof.mark("exit", "prune_file")
    prof.stop()
    shutil.rmtree(out.parent, ignore_errors=True)

    phases = prof.phases()
    peak_t, peak_a, peak_f = max(prof.samples, key=lambda s: s[1] + s[2])
    print(f"{args.size} ({layers} layers), {args.method}, weights {fmt_bytes(weights)}, "
          f"{args.samples} x {args.seq} rows")  # fmt: skip
    print(f"peak RSS {fmt_bytes(peak_a + peak_f)} at {peak_t:.1f}s (anonymous {fmt_bytes(peak_a)}, "
          f"file-backed {fmt_bytes(peak_f)}); weights + {fmt_bytes(peak_a + peak_f - weights)}")  # fmt: skip
    hw_t, hw = max(prof.high_water, key=lambda s: s[1], default=(peak_t, 0))
    if hw > peak_a + peak_f:
        print(f"true peak (VmHWM) {fmt_bytes(hw)}, weights + {fmt_bytes(hw - weights)}, reached in the interval "
              f"ending at {hw_t:.1f}s: a spike between samples (column 'high water')")  # fmt: skip
    inner = [p for p in phases if p["start"] <= peak_t <= p["start"] + p["seconds"]]
    print("at the peak, inside: " + " > ".join(p["name"] for p in sorted(inner, key=lambda p: p["depth"])))
    print(f"{'phase':<40} {'start s':>8} {'seconds':>8} {'RSS in':>9} {'peak':>9} {'high water':>10} {'RSS out':>9}")
    for p in _collapse([p for p in phases if p["depth"] <= args.depth], 3):
        name = "  " * p["depth"] + p["name"] + (f" x{p['count']}" if p["count"] > 1 else "")
        print(f"{name:<40} {p['start']:8.1f} {p['seconds']:8.1f} {fmt_bytes(p['rss_in']):>9} "
              f"{fmt_bytes(p['peak']):>9} {fmt_bytes(p['true_peak']):>10} {fmt_bytes(p['rss_out']):>9}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"weights": weights, "samples": prof.samples, "high_water": prof.high_water, "phases": phases})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
