"""Mutation testing of the modules that carry the product's rules (a developer habit; not CI, not a dependency).

A mutant is a small change to one module (``<`` for ``<=``, ``and`` for ``or``, ``0.5`` for
``1.5``, a ``not`` added ...); the tests that exercise the module should fail on it. One that
passes them all (a *survivor*) marks behaviour no test pins. Cosmic Ray (PyPI ``cosmic-ray``)
makes the mutants and keeps the session in its SQLite format; this script runs them, each
module against only the test files that exercise it, in scratch copies of the repository (the
checkout is never touched), and prints a score per module and every survivor with its diff.

Set up once, in a virtual environment of its own (the tests still run in the project's, ``--python``)::

    python3 -m venv .cache/mutation-venv && .cache/mutation-venv/bin/pip install 'cosmic-ray==8.7.0'

Run (long: nice it; results are kept per module, ``--resume`` goes on where a run stopped)::

    nice -n 19 .cache/mutation-venv/bin/python tools/mutation.py --sites 40 --jobs 2
    .cache/mutation-venv/bin/python tools/mutation.py --report     # scores and survivors of the last run
    .cache/mutation-venv/bin/python tools/mutation.py --recheck    # after adding tests: the survivors again
    .cache/mutation-venv/bin/cr-report .cache/mutation/graph_qdq.sqlite --show-diff   # Cosmic Ray's own report

Which mutants: Cosmic Ray's core operators, without those inside type annotations (with
``from __future__ import annotations`` they are never evaluated, so every such mutant is
equivalent). A full run is thousands of mutants (each a pytest start of 2-10 s), so by default
the run is sampled, deterministically: one mutant per *site* (source position), the operator
variant picked by a hash of the position, and at most ``--sites`` sites per module, spread
evenly over the file. ``--sites 0`` takes every site; ``--all-variants`` every variant per site.

A mutant whose tests run past the timeout (``--timeout``, at least 3x the module's unmutated
run) counts as killed, as in Cosmic Ray, and is reported apart ("timed out").
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

try:
    import cosmic_ray.plugins
    from cosmic_ray.commands.init import init as cr_init
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkItem, WorkResult
except ImportError:  # pragma: no cover - a setup message, not a code path
    sys.exit(
        "tools/mutation.py needs Cosmic Ray: python3 -m venv .cache/mutation-venv && "
        ".cache/mutation-venv/bin/pip install 'cosmic-ray==8.7.0', then run it with .cache/mutation-venv/bin/python"
    )

REPO = Path(__file__).resolve().parent.parent

#: Module -> the test files that exercise it (most direct first: pytest -x stops at the first failure).
MODULES: dict[str, tuple[str, ...]] = {
    "onnx_sparse/core/nm.py": ("tests/test_nm.py",),
    "onnx_sparse/graph/rules.py": ("tests/test_rules.py", "tests/test_locate.py", "tests/test_qdq.py"),
    "onnx_sparse/graph/locate.py": ("tests/test_locate.py", "tests/test_rules.py", "tests/test_qdq.py"),
    "onnx_sparse/graph/qdq.py": ("tests/test_qdq.py", "tests/test_locate.py"),
    "onnx_sparse/guard.py": ("tests/test_guard_inplace.py", "tests/test_safety.py"),
    "onnx_sparse/external.py": ("tests/test_external_edges.py", "tests/test_safety.py", "tests/test_io.py"),
    "onnx_sparse/recipe.py": ("tests/test_recipe_edges.py", "tests/test_recipe.py"),
    "onnx_sparse/handoff/compare.py": ("tests/test_compare.py",),
    "onnx_sparse/handoff/trtlog.py": ("tests/test_trtlog.py", "tests/test_verdict.py", "tests/test_trt.py"),
}

PYTEST_ARGS = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-m", "not real",
               "--hypothesis-seed=0")  # fmt: skip


def slug(module: str) -> str:
    """``onnx_sparse/graph/qdq.py`` -> ``graph_qdq``."""
    return module.removeprefix("onnx_sparse/").removesuffix(".py").replace("/", "_")


# --------------------------------------------------------------------------- which mutants


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions (line, column) of every type annotation in ``source``."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        found: list[ast.expr | None] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            found += [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x]
            found.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
        spans += [((x.lineno, x.col_offset), (x.end_lineno, x.end_col_offset)) for x in found if x is not None]
    return spans


def _stable(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def choose(items: Sequence[WorkItem], source: str, sites: int, all_variants: bool) -> tuple[list[WorkItem], int]:
    """The work items to run: no annotation mutants; one variant per site; at most ``sites`` sites, evenly spread.

    Returns:
        (chosen items, number of sites after the annotation filter).
    """
    spans = annotation_spans(source)
    live = [w for w in items if not any(a <= w.mutations[0].start_pos < b for a, b in spans)]
    by_site: dict[tuple[int, int], list[WorkItem]] = {}
    for w in live:
        by_site.setdefault(tuple(w.mutations[0].start_pos), []).append(w)
    positions = sorted(by_site)
    if sites and len(positions) > sites:
        positions = [positions[(i * len(positions)) // sites] for i in range(sites)]
    chosen = []
    for pos in positions:
        variants = sorted(by_site[pos], key=lambda w: (w.mutations[0].operator_name, w.mutations[0].occurrence))
        if all_variants:
            chosen += variants
        else:
            chosen.append(min(variants, key=lambda w: _stable(pos, w.mutations[0].operator_name)))
    return chosen, len(by_site)


# --------------------------------------------------------------------------- scratch trees


def make_tree(dest: Path, ref: str | None) -> None:
    """A copy of the repository at ``ref`` (git archive), or of the working tree (tracked and untracked, not ignored)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if ref:
        data = subprocess.run(["git", "archive", ref], cwd=REPO, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
        return
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@dataclass
class Runner:
    """Runs a module's tests in one scratch tree."""

    tree: Path
    python: str

    def run(self, tests: Sequence[str], timeout: float) -> tuple[str, str, float]:
        """("passed" | "failed" | "timeout", output tail, seconds)."""
        env = dict(os.environ, PYTHONPATH=str(self.tree), PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0")
        start = time.monotonic()
        try:
            proc = subprocess.run([self.python, *PYTEST_ARGS, *tests], cwd=self.tree, env=env, capture_output=True,
                                  text=True, timeout=timeout, start_new_session=True)  # fmt: skip
        except subprocess.TimeoutExpired:
            return "timeout", "timeout", time.monotonic() - start
        out = (proc.stdout + proc.stderr)[-4000:]
        return ("passed" if proc.returncode == 0 else "failed"), out, time.monotonic() - start


# --------------------------------------------------------------------------- one module


def run_module(module: str, runners: list[Runner], args: argparse.Namespace) -> None:
    tests = MODULES[module]
    db_path = args.out / f"{slug(module)}.sqlite"
    first = runners[0]
    status, out, secs = first.run(tests, timeout=1800)
    if status != "passed":
        print(f"[{module}] the unmutated tests do not pass; skipped\n{out}", flush=True)
        return
    timeout = max(args.timeout, 3 * secs)
    print(f"[{module}] unmutated tests pass in {secs:.1f} s; per-mutant timeout {timeout:.0f} s", flush=True)
    source = (first.tree / module).read_text(encoding="utf-8")
    digest = hashlib.sha256(source.encode()).hexdigest()
    meta_path = args.out / f"{slug(module)}.json"
    if args.recheck:
        if not db_path.exists():
            print(f"[{module}] no session to recheck", flush=True)
            return
        if json.loads(meta_path.read_text()).get("source_sha256") != digest:
            print(f"[{module}] the module changed since its session: its mutants no longer apply; run it anew")
            return
    fresh = not (args.resume or args.recheck) or not db_path.exists()
    with use_db(str(db_path), WorkDB.Mode.create) as db:
        if fresh:
            cr_init([first.tree / module], db, {})
            chosen, sites = choose(list(db.work_items), source, args.sites, args.all_variants)
            keep = {w.job_id for w in chosen}
            skipped = [w.job_id for w in db.work_items if w.job_id not in keep]
            db.set_multiple_results(skipped, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="not sampled"))
            meta = {"module": module, "tests": list(tests), "mutants": db.num_work_items, "sites": sites,
                    "chosen": len(chosen), "timeout": timeout, "source_sha256": digest}  # fmt: skip
            meta_path.write_text(json.dumps(meta, indent=1))
        if args.recheck:
            todo = [w for w, r in db.completed_work_items if r.test_outcome == TestOutcome.SURVIVED]
        else:
            todo = list(db.pending_work_items)
        pending = sorted(todo, key=lambda w: (tuple(w.mutations[0].start_pos), w.mutations[0].operator_name))
        print(f"[{module}] {len(pending)} mutants to run{' again' if args.recheck else ''}", flush=True)
        free = list(runners)
        lock = threading.Lock()

        def one(item: WorkItem) -> None:
            with lock:
                runner = free.pop()
            try:
                spec = item.mutations[0]
                operator = cosmic_ray.plugins.get_operator(spec.operator_name)(**(spec.operator_args or {}))
                path = runner.tree / module
                mutated = mutate_code(source, operator, spec.occurrence)
                if mutated is None:
                    result = WorkResult(worker_outcome=WorkerOutcome.NO_TEST)
                else:
                    path.write_text(mutated, encoding="utf-8")
                    try:
                        status, out, _ = runner.run(tests, timeout)
                    finally:
                        path.write_text(source, encoding="utf-8")
                    outcome = TestOutcome.SURVIVED if status == "passed" else TestOutcome.KILLED
                    result = WorkResult(worker_outcome=WorkerOutcome.NORMAL, test_outcome=outcome, output=out,
                                        diff=_diff(source, mutated, module))  # fmt: skip
                with lock:
                    db.set_result(item.job_id, result)
                    mark = {"survived": "S", "killed": "." if result.output != "timeout" else "T"}
                    print(mark.get(result.test_outcome or "", "-"), end="", flush=True)
            finally:
                with lock:
                    free.append(runner)

        with ThreadPoolExecutor(max_workers=len(runners)) as pool:
            list(pool.map(one, pending))
        print(flush=True)


def _diff(before: str, after: str, module: str) -> str:
    import difflib

    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), module, module, n=0))


# --------------------------------------------------------------------------- report


def report(out: Path, modules: Sequence[str], show: bool = True) -> dict[str, dict]:
    """Per module: mutants, sampled, killed, survived, timed out, score; and the survivors' diffs."""
    rows: dict[str, dict] = {}
    for module in modules:
        db_path = out / f"{slug(module)}.sqlite"
        if not db_path.exists():
            continue
        meta = json.loads((out / f"{slug(module)}.json").read_text())
        counts = dict(killed=0, survived=0, timed_out=0, no_test=0, pending=0)
        survivors = []
        with use_db(str(db_path), WorkDB.Mode.open) as db:
            done = {job: r for job, r in db.results}
            for item in db.work_items:
                r = done.get(item.job_id)
                if r is None:
                    counts["pending"] += 1
                elif r.worker_outcome == WorkerOutcome.SKIPPED:
                    continue
                elif r.worker_outcome == WorkerOutcome.NO_TEST:
                    counts["no_test"] += 1
                elif r.test_outcome == TestOutcome.SURVIVED:
                    counts["survived"] += 1
                    spec = item.mutations[0]
                    survivors.append({"line": spec.start_pos[0], "operator": spec.operator_name,
                                      "occurrence": spec.occurrence, "diff": r.diff})  # fmt: skip
                elif r.output == "timeout":
                    counts["timed_out"] += 1
                else:
                    counts["killed"] += 1
        run = counts["killed"] + counts["survived"] + counts["timed_out"]
        score = (counts["killed"] + counts["timed_out"]) / run if run else None
        rows[module] = dict(meta, **counts, score=score, survivors=sorted(survivors, key=lambda s: s["line"]))
    if show:
        print(f"{'module':32} {'mutants':>7} {'sites':>5} {'run':>4} {'killed':>6} {'surv':>4} {'t/o':>4} {'score':>6}")
        for module, r in rows.items():
            run = r["killed"] + r["survived"] + r["timed_out"]
            score = "-" if r["score"] is None else f"{100 * r['score']:.0f}%"
            pend = f"  ({r['pending']} pending)" if r["pending"] else ""
            print(f"{module:32} {r['mutants']:7} {r['sites']:5} {run:4} {r['killed']:6} {r['survived']:4} "
                  f"{r['timed_out']:4} {score:>6}{pend}")  # fmt: skip
        for module, r in rows.items():
            for s in r["survivors"]:
                print(f"\n--- survivor {module}:{s['line']} ({s['operator']} #{s['occurrence']})")
                print(
                    "\n".join(
                        line
                        for line in (s["diff"] or "").splitlines()
                        if line[:1] in "+-" and line[:3] not in ("+++", "---")
                    )
                )
    return rows


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="only these (default: all)")
    parser.add_argument("--sites", type=int, default=60, help="sites per module, evenly spread (0: all)")
    parser.add_argument("--all-variants", action="store_true", help="every operator variant per site")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-mutant timeout floor, seconds")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run side by side (one scratch tree each)")
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"), help="the project's Python")
    parser.add_argument("--ref", default=None, help="test this commit (git archive) instead of the working tree")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "mutation", help="sessions and scratch trees")
    parser.add_argument("--resume", action="store_true", help="keep the sessions in --out and run what is pending")
    parser.add_argument("--recheck", action="store_true", help="run the survivors in --out again (after new tests)")
    parser.add_argument("--report", action="store_true", help="only print the scores and survivors of --out")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    args = parser.parse_args(argv)
    modules = args.module or list(MODULES)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        runners = []
        for j in range(max(1, args.jobs)):
            tree = args.out / f"{'recheck' if args.recheck else 'tree'}-{j}"
            make_tree(tree, args.ref)
            runners.append(Runner(tree, args.python))
        for module in modules:
            run_module(module, runners, args)
    rows = report(args.out, modules)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
