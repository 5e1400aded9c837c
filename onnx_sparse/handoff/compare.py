"""Run the dense and the sparse model on the same inputs and judge how far apart their outputs are.

Both models run through Polygraphy's ``Comparator.run`` (ONNX-Runtime by default, TensorRT
engines from :mod:`onnx_sparse.handoff.trt` on request), so they see the same feed dicts; the
inputs come from Polygraphy's conventions (saved JSON inputs, a data loader script, or its
seeded ``DataLoader``). Before anything runs, the two models must have the same input and
output names, element types and ranks (:func:`check_same_interface`).

Figures per output (:func:`output_figures`, pure numpy): cosine similarity (worst iteration),
relative L2 error ``||s - d|| / ||d||`` (worst iteration), max abs error, and top-1 agreement
where the output looks like class scores (float, rank 1-3, last dim > 1). Integer and bool
outputs must match exactly, always.

The verdict comes from :class:`Criteria`:

* model-level criteria: ``min_cosine``, ``min_top1``, ``max_rel_l2`` (one value, or per output
  with ``""`` as the default key);
* Polygraphy's element-wise check (``Comparator.compare_accuracy`` with a
  ``SimpleCompareFunc``: ``atol``/``rtol``/``check_error_stat``), only when one of those three
  is given. A pruned model never meets Polygraphy's default 1e-5 element-wise, so it is off
  unless asked for.

With no criterion at all, :data:`DEFAULT_CRITERIA` apply: every float output keeps cosine
>= 0.9 and relative L2 <= 0.5, and outputs that are class probabilities (rows of non-negative
numbers summing to 1, e.g. a softmax) keep top-1 agreement >= 0.9. Given criteria replace the
defaults entirely (see the README's compare section for why these numbers).

Saved outputs use Polygraphy's ``RunResults`` JSON, so ``polygraphy run --save-outputs`` files
load here and ours load in ``polygraphy run --load-outputs``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnx_sparse.core.similarity import cosine, finite_pair, rel_l2
from onnx_sparse.errors import OnnxSparseError, first_line
from onnx_sparse.handoff.trt import capture_polygraphy_log

__all__ = [
    "Criteria",
    "DEFAULT_CRITERIA",
    "check_same_interface",
    "DataSpec",
    "OutputFigures",
    "CompareReport",
    "make_data_loader",
    "run_models",
    "load_run_results",
    "compare_results",
    "compare_models",
    "output_figures",
    "BACKENDS",
]

logger = logging.getLogger(__name__)

BACKENDS = ("onnxrt", "trt")
_ROLES = ("dense", "sparse")


# --------------------------------------------------------------------------- figures (pure numpy)


def _is_exact_dtype(dtype: np.dtype) -> bool:
    return dtype.kind in "biuUSO"


def output_figures(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, Any]:
    """Figures for one output over all iterations (pure; no thresholds).

    Args:
        reference: the dense model's arrays, one per iteration.
        candidate: the sparse model's arrays for the same iterations.

    Returns:
        ``kind`` ("float" or "exact"), ``cosine`` (lowest over iterations), ``rel_l2``
        (highest), ``max_abs`` (highest), ``top1`` (share of positions whose argmax over the
        last axis agrees, pooled; None unless float, rank 1-3, last dim > 1), ``mismatches``
        (differing elements, exact kind only), ``probabilities`` (the dense rows are non-negative
        and sum to 1, as a softmax's: the output is class probabilities), ``shape_mismatch`` and
        ``nonfinite`` (float kind: elements that are inf or NaN in one model and not the same in the
        other; the other figures are taken over the elements finite in both).
    """
    out: dict[str, Any] = dict(
        kind="float",
        cosine=None,
        rel_l2=None,
        max_abs=None,
        top1=None,
        mismatches=None,
        probabilities=False,
        nonfinite=None,
    )
    out["shape_mismatch"] = any(np.shape(r) != np.shape(c) for r, c in zip(reference, candidate, strict=True))
    if not reference:
        return out
    dtype = np.asarray(reference[0]).dtype
    if _is_exact_dtype(dtype):
        out["kind"] = "exact"
    if out["shape_mismatch"]:
        return out
    if out["kind"] == "exact":
        out["mismatches"] = int(
            sum(
                int(np.count_nonzero(np.asarray(r) != np.asarray(c))) for r, c in zip(reference, candidate, strict=True)
            )
        )
        out["max_abs"] = max(
            (float(np.max(np.abs(np.asarray(r, np.float64) - np.asarray(c, np.float64)), initial=0.0))
             for r, c in zip(reference, candidate, strict=True) if dtype.kind in "biu"),
            default=None,
        )  # fmt: skip
        return out
    cosines, rels, maxes = [], [], []
    agree = total = 0
    probabilities = True
    nonfinite = 0
    for r, c in zip(reference, candidate, strict=True):
        # the figures over the elements finite in both; an inf or NaN in one model only is counted (and
        # fails the output) instead of making the figures -1 / inf (core.similarity)
        a, b, mismatched = finite_pair(r, c)
        nonfinite += mismatched
        cosines.append(cosine(a, b))
        rels.append(rel_l2(a, b))
        maxes.append(float(np.max(np.abs(b - a), initial=0.0)))
        shape = np.shape(r)
        # Class scores: [N, classes] or [N, T, classes]; feature maps (rank 4+) are not.
        if 1 <= len(shape) <= 3 and shape[-1] > 1:
            ra = np.argmax(np.asarray(r), axis=-1)
            ca = np.argmax(np.asarray(c), axis=-1)
            agree += int(np.count_nonzero(ra == ca))
            total += int(ra.size)
            probabilities = probabilities and _is_probabilities(np.asarray(r))
    out["nonfinite"] = nonfinite
    out["cosine"] = float(min(cosines))
    out["rel_l2"] = float(max(rels))
    out["max_abs"] = float(max(maxes))
    out["top1"] = agree / total if total else None
    out["probabilities"] = bool(total) and probabilities
    return out


def _is_probabilities(x: np.ndarray) -> bool:
    """Whether every row (last axis) holds non-negative numbers summing to 1, like a softmax output."""
    if x.size == 0 or not np.all(np.isfinite(x)):
        return False
    if float(np.min(x)) < -1e-6:
        return False
    sums = np.sum(x, axis=-1, dtype=np.float64)
    return bool(np.all(np.abs(sums - 1.0) <= 1e-3))


PerOutput = float | Mapping[str, float] | None


@dataclass(frozen=True)
class Criteria:
    """What makes the sparse model PASS: model-level figures, and optionally Polygraphy's element-wise check.

    Every field is one value for all outputs, a mapping from output name to value (key ``""``
    for the rest), or None (not checked).

    Attributes:
        min_cosine: lowest cosine similarity (worst iteration) a float output may have.
        min_top1: lowest top-1 agreement an output with class scores (float, rank 1-3, last
            dim > 1) may have.
        max_rel_l2: highest relative L2 error ``||s - d|| / ||d||`` (worst iteration).
        probabilities_only: apply ``min_top1`` only to outputs that are class probabilities
            (rows of non-negative numbers summing to 1). The defaults set it: argmax agreement of
            an embedding or a feature map means nothing.
        atol, rtol, check_error_stat: Polygraphy's ``SimpleCompareFunc`` settings; giving any of
            them turns the element-wise check on (Polygraphy's defaults, 1e-5 and ``elemwise``,
            fill the others).
    """

    min_cosine: PerOutput = None
    min_top1: PerOutput = None
    max_rel_l2: PerOutput = None
    probabilities_only: bool = False
    atol: PerOutput = None
    rtol: PerOutput = None
    check_error_stat: str | Mapping[str, str] | None = None

    @property
    def elementwise(self) -> bool:
        """Whether Polygraphy's element-wise check runs (atol, rtol or check_error_stat given)."""
        return any(v is not None for v in (self.atol, self.rtol, self.check_error_stat))

    @property
    def empty(self) -> bool:
        """No criterion given at all (then :data:`DEFAULT_CRITERIA` apply)."""
        return self.elementwise is False and all(v is None for v in (self.min_cosine, self.min_top1, self.max_rel_l2))

    def to_json(self) -> dict[str, Any]:
        """Plain data (mappings as dicts)."""
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}


DEFAULT_CRITERIA = Criteria(min_cosine=0.9, max_rel_l2=0.5, min_top1=0.9, probabilities_only=True)
"""The criteria when none are given (reasons in the README's compare section).

cosine >= 0.9: the sparse output still points the same way as the dense one (within ~25
degrees); magnitude 2:4 on every MatMul of MiniLM-L3 gives 0.76 on the sentence embedding and
fails, a calibrated prune gives 0.90-0.94 and passes. relative L2 <= 0.5: cosine cannot see a
change of scale; with equal norms cosine 0.9 is relative L2 0.45, so this only adds a guard of
about +-15% on the output's norm. top-1 >= 0.9 on class probabilities: at most one decision in
ten may change.
"""


@dataclass(frozen=True)
class OutputFigures:
    """How one output of the sparse model compares with the dense one.

    Attributes:
        name, dtype, shape: the output (shape of the dense model's first iteration).
        kind: "float" (figures below) or "exact" (integer/bool: must match exactly).
        cosine: lowest cosine similarity over iterations; rel_l2: highest ``||s-d||/||d||``;
        max_abs: highest max abs error; top1: pooled argmax agreement (class-score-like outputs).
        mismatches: differing elements (exact outputs).
        polygraphy_passed: Polygraphy's element-wise verdict (every iteration within
            atol/rtol), None when that check was off.
        passed: exactness, the model-level criteria and, when on, Polygraphy's verdict.
        reasons: why it failed, one line each.
        probabilities: the dense output is class probabilities (rows summing to 1).
        nonfinite: float outputs: elements inf or NaN in one model and not (the same) in the other;
            any fails the output (the figures are over the elements finite in both).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    cosine: float | None
    rel_l2: float | None
    max_abs: float | None
    top1: float | None
    mismatches: int | None
    polygraphy_passed: bool | None
    passed: bool
    reasons: tuple[str, ...] = ()
    probabilities: bool = False
    nonfinite: int | None = None


@dataclass(frozen=True)
class CompareReport:
    """The result of comparing two runs (dense = reference, sparse = candidate).

    ``passed`` is true when every output of the dense run passed. ``criteria`` are the ones
    that decided (the defaults when none were given; ``defaults`` says so). ``log`` holds
    Polygraphy's element-wise accuracy report as it would have printed it (empty when off).
    """

    dense: str
    sparse: str
    iterations: int
    outputs: tuple[OutputFigures, ...]
    passed: bool
    criteria: Criteria = DEFAULT_CRITERIA
    defaults: bool = False
    runtimes: Mapping[str, float] = field(default_factory=dict)
    log: str = field(default="", repr=False)

    def output(self, name: str) -> OutputFigures:
        """The figures of one output by name."""
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """Plain data for a JSON report (no log)."""
        return {
            "dense": self.dense,
            "sparse": self.sparse,
            "iterations": self.iterations,
            "passed": self.passed,
            "criteria": self.criteria.to_json(),
            "default_criteria": self.defaults,
            "outputs": [asdict(o) for o in self.outputs],
        }


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class DataSpec:
    """Where inference inputs come from, with Polygraphy's options and precedence.

    Attributes:
        load_inputs: JSON files (or per-iteration folders) saved by ``--save-inputs``.
        data_loader_script: ``script.py`` or ``script.py:func`` (default ``load_data``), a
            no-argument function returning an iterable of feed dicts.
        seed, val_range, input_shapes, iterations: Polygraphy's ``DataLoader`` settings (used
            only without the two above); ``val_range`` is ``(lo, hi)`` or a dict with per-input
            ranges (key ``""`` for the rest); ``input_shapes`` maps input name to shape.
    """

    load_inputs: tuple[str, ...] = ()
    data_loader_script: str | None = None
    seed: int | None = None
    val_range: Any = None
    input_shapes: Mapping[str, Sequence[int | str]] | None = None
    iterations: int | None = None


def make_data_loader(spec: DataSpec | None = None, model: str | os.PathLike[str] | None = None) -> Any:
    """The inputs ``spec`` describes: a list of feeds, or Polygraphy's seeded ``DataLoader`` for random data.

    Saved inputs and data loader scripts are read by the same loader as calibration data
    (:func:`onnx_sparse.calib.data.load_inputs` / :func:`~onnx_sparse.calib.data.load_data_script`:
    one refusal for a file that is not Polygraphy JSON, pickled data included) and, given
    ``model`` (a path), checked against its inputs (names, dtypes, ranks, fixed dimensions;
    rank-0 inputs stay rank 0) before anything runs.

    For random data, ``model`` gives the input shapes: dynamic dimensions without
    ``input_shapes`` become 1 with one warning naming ``--input-shapes`` (see
    :func:`onnx_sparse.calib.data.random_data_shapes`).
    """
    from polygraphy.comparator import DataLoader

    from onnx_sparse.calib import data as feeds_io

    spec = spec or DataSpec()
    if spec.load_inputs and spec.data_loader_script:
        raise OnnxSparseError("both saved inputs and a data loader script were given", hint="pass only one of them")
    if spec.load_inputs or spec.data_loader_script:
        ignored = [n for n in ("seed", "val_range", "input_shapes", "iterations") if getattr(spec, n) is not None]
        if ignored:
            logger.warning("ignoring %s: a custom data loader was given", ", ".join(ignored))
        if spec.load_inputs:
            feeds = feeds_io.load_inputs(spec.load_inputs)
        else:
            feeds = feeds_io.load_data_script(str(spec.data_loader_script))
        if model is None:
            return feeds
        from onnx_sparse.io import load_model

        return feeds_io.validate_feeds(load_model(model).model, feeds, what="input feed")
    shapes: dict[str, tuple] = {name: tuple(shape) for name, shape in (spec.input_shapes or {}).items()}
    if model is not None:
        from onnx_sparse.io import load_model

        specs = feeds_io.model_inputs(load_model(model).model)
        unknown = sorted(set(shapes) - {s.name for s in specs})
        if unknown:
            raise OnnxSparseError(
                f"--input-shapes names unknown inputs {unknown}",
                hint=f"the model's inputs are {[s.name for s in specs]}",
            )
        shapes = dict(feeds_io.random_data_shapes(specs, shapes))
    meta = None
    if shapes:
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for name, shape in shapes.items():
            meta.add(name, dtype=None, shape=tuple(shape))
    detail = logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.WARNING
    with capture_polygraphy_log(forward_level=detail, severity=_pg_info(), to=logger):
        return DataLoader(seed=spec.seed, iterations=spec.iterations, input_metadata=meta, val_range=spec.val_range)


# --------------------------------------------------------------------------- interfaces


def _interface(
    path: str | os.PathLike[str],
) -> tuple[dict[str, tuple[str, int | None]], dict[str, tuple[str, int | None]]]:
    """``(inputs, outputs)``: name -> (element type name, rank or None) of a model file's main graph."""
    import onnx

    from onnx_sparse.io import load_model

    graph = load_model(path).model.graph
    inits = {t.name for t in graph.initializer}

    def describe(vi: Any) -> tuple[str, int | None]:
        if not vi.type.HasField("tensor_type"):
            return (vi.type.WhichOneof("value") or "unknown", None)
        tt = vi.type.tensor_type
        elem = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "unknown"
        return (elem.lower(), len(tt.shape.dim) if tt.HasField("shape") else None)

    inputs = {vi.name: describe(vi) for vi in graph.input if vi.name not in inits}
    outputs = {vi.name: describe(vi) for vi in graph.output}
    return inputs, outputs


def check_same_interface(dense: str | os.PathLike[str], sparse: str | os.PathLike[str]) -> None:
    """Refuse two models whose inputs or outputs differ in name, element type or rank.

    Raises:
        OnnxSparseError: one line naming every difference.
    """
    a_in, a_out = _interface(dense)
    b_in, b_out = _interface(sparse)
    problems: list[str] = []
    for what, a, b in (("input", a_in, b_in), ("output", a_out, b_out)):
        only_a = [n for n in a if n not in b]
        only_b = [n for n in b if n not in a]
        if only_a:
            problems.append(f"{what}s only in the dense model: {', '.join(map(repr, only_a))}")
        if only_b:
            problems.append(f"{what}s only in the sparse model: {', '.join(map(repr, only_b))}")
        for name in a:
            if name not in b:
                continue
            (ta, ra), (tb, rb) = a[name], b[name]
            if ta != tb:
                problems.append(f"{what} {name!r} is {ta} in the dense model, {tb} in the sparse one")
            elif ra is not None and rb is not None and ra != rb:
                problems.append(f"{what} {name!r} has rank {ra} in the dense model, {rb} in the sparse one")
    if problems:
        raise OnnxSparseError(
            f"{Path(dense).name} and {Path(sparse).name} do not have the same interface: {'; '.join(problems)}",
            hint="compare a model with its own pruned copy",
        )


# --------------------------------------------------------------------------- running


def _providers(names: Sequence[str] | None) -> list[str] | None:
    """Execution provider names as ``polygraphy run --providers`` takes them (``cpu``, ``cuda``: case-insensitive parts)."""
    if not names:
        return None
    import onnxruntime as ort
    from polygraphy import util

    available = ort.get_available_providers()
    out = []
    for name in names:
        found = util.find_str_in_iterable(name, available)
        if found is None:
            raise OnnxSparseError(
                f"--providers {name}: onnxruntime has no such execution provider",
                hint=f"available: {', '.join(available)}",
            )
        out.append(found)
    return out


def _runner(role: str, path: Path, backend: str, fp16: bool, workdir: str, providers: Sequence[str] | None) -> Any:
    name = f"{backend}-{role}"
    if backend == "onnxrt":
        from polygraphy.backend.onnxrt import OnnxrtRunner

        from onnx_sparse import runtime

        chosen = _providers(providers)
        # The session comes from onnx_sparse.runtime (quiet onnxruntime logging, one error for a model it cannot open).
        return OnnxrtRunner(lambda: runtime.session(path, what=f"the {role} model", providers=chosen), name=name)
    if backend == "trt":
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from onnx_sparse.handoff.trt import build_engine, plan_precision

        plan = plan_precision(path, fp16, workdir)
        logger.info("%s: %s", role, plan.note)
        built = build_engine(plan.path, sparse=(role == "sparse"), fp16=plan.fp16, int8=plan.int8)
        return TrtRunner(EngineFromBytes(built.engine), name=name)
    raise OnnxSparseError(f"unknown backend {backend!r}", hint=f"one of {', '.join(BACKENDS)}")


def run_models(
    models: Sequence[tuple[str, str | os.PathLike[str]]],
    *,
    backend: str = "onnxrt",
    data_loader: Any = None,
    save_inputs: str | os.PathLike[str] | None = None,
    fp16: bool = False,
    providers: Sequence[str] | None = None,
) -> Any:
    """Run ``(role, model path)`` pairs on the same inputs with ``Comparator.run``.

    Runner names are ``<backend>-<role>``. ``fp16`` applies to the ``trt`` backend (flag or
    conversion, see :func:`onnx_sparse.handoff.trt.plan_precision`).

    Returns:
        Polygraphy ``RunResults``, one entry per model, in order.
    """
    from polygraphy.comparator import Comparator
    from polygraphy.exception import PolygraphyException

    paths = []
    for role, p in models:
        path = Path(p)
        if not path.is_file():
            raise OnnxSparseError(f"{path}: no such file", hint=f"check the {role} model path")
        paths.append((role, path))
    with tempfile.TemporaryDirectory(prefix="onnx-sparse-") as workdir:
        runners = [_runner(role, path, backend, fp16, workdir, providers) for role, path in paths]
        # Polygraphy's per-iteration input/output dumps and session lines: -v only.
        detail = logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.WARNING
        with capture_polygraphy_log(forward_level=detail, severity=_pg_info(), to=logger), _numeric_quiet():
            try:
                return Comparator.run(
                    runners,
                    data_loader=data_loader,
                    save_inputs_path=None if save_inputs is None else str(save_inputs),
                )
            except PolygraphyException as exc:
                raise OnnxSparseError(
                    f"inference failed: {first_line(exc)}", hint="rerun with -v for Polygraphy's log"
                ) from exc
            except Exception as exc:
                from onnx_sparse import runtime

                if runtime.is_ort_error(exc):  # the model cannot run on these inputs: the user's data
                    raise runtime.user_error(exc, "the inputs") from exc
                raise


def _pg_info() -> int:
    from polygraphy.logger import G_LOGGER

    return G_LOGGER.INFO


def load_run_results(path: str | os.PathLike[str]) -> Any:
    """Polygraphy ``RunResults`` from a JSON file or a per-iteration folder (``--save-outputs``)."""
    from polygraphy.comparator import RunResults
    from polygraphy.exception import PolygraphyException

    p = Path(path)
    if not p.exists():
        raise OnnxSparseError(f"{p}: no such file or folder", hint="check the --load-outputs path")
    try:
        with capture_polygraphy_log(forward_level=logging.WARNING, severity=_pg_info(), to=logger):
            if hasattr(RunResults, "load_streaming"):
                return RunResults.concat(RunResults.load_streaming(str(p), allow_dirs=True))
            return RunResults.load(str(p))
    # the same refusal as for feed files (onnx_sparse.calib.data.load_inputs): pickled arrays included
    except (PolygraphyException, ValueError, TypeError, KeyError, OSError) as exc:
        raise OnnxSparseError(
            f"{p}: not Polygraphy RunResults: {first_line(exc)}",
            hint="save with `polygraphy run --save-outputs` or `onnx-sparse compare --save-outputs`",
        ) from exc


# --------------------------------------------------------------------------- comparing


def _per_output(value: Any, name: str, default: Any = None) -> Any:
    if isinstance(value, Mapping):
        return value.get(name, value.get("", default))
    return default if value is None else value


def _array(x: Any) -> np.ndarray:
    return np.asarray(x.load() if hasattr(x, "load") else x)


def compare_results(
    results: Any, criteria: Criteria | None = None, *, reference: int = 0, candidate: int = 1
) -> CompareReport:
    """Compare two runs of a ``RunResults`` (by position) against ``criteria``.

    Args:
        results: Polygraphy ``RunResults``.
        criteria: what decides PASS/FAIL; None or empty: :data:`DEFAULT_CRITERIA`.
        reference, candidate: positions of the dense and the sparse run.
    """
    from polygraphy.comparator import RunResults

    given = criteria if criteria is not None else Criteria()
    defaults = given.empty
    crit = DEFAULT_CRITERIA if defaults else given
    runs = list(results.items())
    for idx in (reference, candidate):
        if not 0 <= idx < len(runs):
            raise OnnxSparseError(f"no run at position {idx}: the results hold {len(runs)}")
    ref_name, ref_iters = runs[reference]
    cand_name, cand_iters = runs[candidate]
    if cand_name == ref_name:
        cand_name = f"{cand_name} (2)"
    n = min(len(ref_iters), len(cand_iters))
    if len(ref_iters) != len(cand_iters):
        logger.warning(
            "%s has %d iterations and %s %d: comparing the first %d",
            ref_name,
            len(ref_iters),
            cand_name,
            len(cand_iters),
            n,
        )
    if n == 0:
        raise OnnxSparseError("nothing to compare: a run has no iterations", hint="check the data loader")
    pair = RunResults()
    pair.append((ref_name, list(ref_iters[:n])))
    pair.append((cand_name, list(cand_iters[:n])))
    matches, log = _elementwise(pair, ref_name, cand_name, crit) if crit.elementwise else ([], "")

    extra = [name for name in cand_iters[0].keys() if name not in ref_iters[0]]
    if extra:
        logger.warning("%s has outputs the dense run lacks, not compared: %s", cand_name, ", ".join(extra))
    outputs = []
    for name in ref_iters[0].keys():
        refs = [_array(it[name]) for it in ref_iters[:n]]
        missing = [i for i, it in enumerate(cand_iters[:n]) if name not in it]
        reasons: list[str] = []
        if missing:
            cands: list[np.ndarray] = []
            reasons.append(f"the sparse run has no output {name!r}")
            figs = output_figures([], [])
        else:
            cands = [_array(it[name]) for it in cand_iters[:n]]
            figs = output_figures(refs, cands)
        pg_passed: bool | None = None
        if crit.elementwise:
            verdicts = [m[name] for m in matches if name in m]
            pg_passed = bool(verdicts) and all(bool(v) for v in verdicts) and not missing
            if not missing and not verdicts:
                reasons.append("Polygraphy did not compare this output")
            elif not pg_passed and not missing:
                stat = _per_output(crit.check_error_stat, name, "elemwise")
                reasons.append(
                    f"element-wise: difference exceeds atol={_per_output(crit.atol, name, 1e-5)}, "
                    f"rtol={_per_output(crit.rtol, name, 1e-5)} ({stat})"
                )
        if figs["shape_mismatch"]:
            reasons.append(f"shapes differ: {refs[0].shape} vs {cands[0].shape if cands else '?'}")
        if figs["kind"] == "exact" and figs["mismatches"]:
            reasons.append(f"{figs['mismatches']} elements differ (integer/bool outputs must match exactly)")
        if figs["nonfinite"]:
            reasons.append(f"{figs['nonfinite']} element(s) are inf or NaN in one model and not in the other")
        reasons += _criteria_reasons(name, figs, crit)
        outputs.append(
            OutputFigures(
                name=name,
                dtype=str(refs[0].dtype),
                shape=tuple(int(d) for d in refs[0].shape),
                kind=figs["kind"],
                cosine=figs["cosine"],
                rel_l2=figs["rel_l2"],
                max_abs=figs["max_abs"],
                top1=figs["top1"],
                mismatches=figs["mismatches"],
                polygraphy_passed=pg_passed,
                passed=not reasons,
                reasons=tuple(reasons),
                probabilities=figs["probabilities"],
                nonfinite=figs["nonfinite"],
            )
        )
    runtimes = {}
    for run_name, iters in ((ref_name, ref_iters[:n]), (cand_name, cand_iters[:n])):
        times = [it.runtime for it in iters if getattr(it, "runtime", None) is not None]
        if times:
            runtimes[run_name] = float(np.mean(times))
    return CompareReport(
        dense=ref_name,
        sparse=cand_name,
        iterations=n,
        outputs=tuple(outputs),
        passed=all(o.passed for o in outputs),
        criteria=crit,
        defaults=defaults,
        runtimes=runtimes,
        log=log,
    )


def _criteria_reasons(name: str, figs: Mapping[str, Any], crit: Criteria) -> list[str]:
    """Why one output misses the model-level criteria (empty when it meets them)."""
    if figs["kind"] != "float" or figs["shape_mismatch"] or figs["cosine"] is None:
        return []
    reasons = []
    low = _per_output(crit.min_cosine, name)
    if low is not None and not figs["cosine"] >= float(low):
        reasons.append(f"cosine {figs['cosine']:.6f} < min-cosine {float(low)}")
    high = _per_output(crit.max_rel_l2, name)
    if high is not None and not figs["rel_l2"] <= float(high):
        reasons.append(f"relative L2 {figs['rel_l2']:.4g} > max-rel-l2 {float(high)}")
    top = _per_output(crit.min_top1, name)
    applies = figs["top1"] is not None and (figs["probabilities"] or not crit.probabilities_only)
    if top is not None and applies and not figs["top1"] >= float(top):
        reasons.append(f"top-1 agreement {100 * figs['top1']:.1f}% < min-top1 {100 * float(top):.1f}%")
    return reasons


def _elementwise(pair: Any, ref_name: str, cand_name: str, crit: Criteria) -> tuple[list[Any], str]:
    """Polygraphy's element-wise check: per-iteration verdicts and its report text.

    Its report (a page per iteration and output, histograms, one ``[E] FAILED`` line per
    output and iteration) is shown only with -v; our table carries the verdict.
    """
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.exception import PolygraphyException

    func = SimpleCompareFunc(atol=crit.atol, rtol=crit.rtol, check_error_stat=crit.check_error_stat)
    detail = logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.CRITICAL + 1
    with capture_polygraphy_log(forward_level=detail, severity=_pg_info(), to=logger) as lines, _numeric_quiet():
        try:
            accuracy = Comparator.compare_accuracy(pair, comparisons=[(1, 0)], compare_func=func)
        except PolygraphyException as exc:
            raise OnnxSparseError(f"comparison failed: {first_line(exc)}") from exc
    matches = accuracy[0][(cand_name, ref_name)] if len(accuracy) else []
    return list(matches), "\n".join(line.text for line in lines)


@contextlib.contextmanager
def _numeric_quiet() -> Any:
    """Numpy's divide-by-zero and invalid-value warnings inside Polygraphy's statistics: to -v only."""
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        yield
    for w in caught:
        logger.debug("%s: %s", w.category.__name__, w.message)


def compare_models(
    dense: str | os.PathLike[str] | None,
    sparse: str | os.PathLike[str] | None,
    *,
    backend: str = "onnxrt",
    data: DataSpec | None = None,
    criteria: Criteria | None = None,
    load_outputs: Sequence[str | os.PathLike[str]] = (),
    save_outputs: str | os.PathLike[str] | None = None,
    save_inputs: str | os.PathLike[str] | None = None,
    fp16: bool = False,
    providers: Sequence[str] | None = None,
) -> CompareReport:
    """Run (or load) the dense and the sparse model's outputs and compare them.

    The runs to compare are the ones in ``load_outputs`` (Polygraphy ``RunResults`` files, in
    order) followed by the live runs of ``dense`` and ``sparse`` (either may be None); there must
    be exactly two: the first is the reference (dense), the second the candidate (sparse). So
    ``compare_models(None, "s.onnx", load_outputs=["d.json"])`` compares a live sparse run with
    saved dense outputs (e.g. from ``polygraphy run d.onnx --onnxrt --save-outputs d.json``;
    Polygraphy's default data loader is seeded, so the inputs agree unless changed).

    Args:
        dense, sparse: ONNX model paths to run live.
        backend: "onnxrt" (CPU) or "trt" (TensorRT engines; sparse one with SPARSE_WEIGHTS).
        data: input settings (default: Polygraphy's seeded DataLoader).
        criteria: what decides PASS/FAIL (see :class:`Criteria`; None: :data:`DEFAULT_CRITERIA`).
        save_outputs: write both runs as Polygraphy RunResults JSON.
        save_inputs: write the inputs used as Polygraphy JSON (``--load-inputs`` reads them).
        fp16: TensorRT only: build fp16 engines (flag on TensorRT < 11, conversion on 11).
        providers: ONNX-Runtime execution providers (default CPU).
    """
    from polygraphy.comparator import RunResults
    from polygraphy.exception import PolygraphyException

    if backend not in BACKENDS:
        raise OnnxSparseError(f"unknown backend {backend!r}", hint=f"one of {', '.join(BACKENDS)}")
    merged = RunResults()
    for p in load_outputs:
        for name, iters in load_run_results(p).items():
            if name in merged:
                name = f"{name} ({Path(p).name})"
            merged.append((name, list(iters)))
    live = [p for p in (dense, sparse) if p is not None]
    total = len(merged) + len(live)
    if total != 2:
        raise OnnxSparseError(
            f"need exactly two runs to compare, got {total} ({len(merged)} loaded, {len(live)} models)",
            hint="pass DENSE and SPARSE models, or one model and --load-outputs with one saved run",
        )
    if len(live) == 2:
        check_same_interface(live[0], live[1])
    if live:
        roles = _ROLES[len(merged) :]
        loader = make_data_loader(data, model=live[0])
        results = run_models(
            list(zip(roles, live, strict=True)),
            backend=backend,
            data_loader=loader,
            save_inputs=save_inputs,
            fp16=fp16,
            providers=providers,
        )
        for name, iters in results.items():
            if name in merged:
                name = f"{name} (live)"
            merged.append((name, list(iters)))
    elif data is not None and data != DataSpec():
        logger.warning("input settings are ignored: both runs were loaded from files")
    if save_outputs is not None:
        with contextlib.suppress(FileNotFoundError):
            if Path(save_outputs).is_dir():
                raise OnnxSparseError(f"{save_outputs} is a folder", hint="--save-outputs takes a .json file path")
        try:
            with capture_polygraphy_log(forward_level=logging.WARNING, severity=_pg_info(), to=logger):
                merged.save(str(save_outputs))
        except (OSError, PolygraphyException) as exc:
            raise OnnxSparseError(f"{save_outputs}: could not save the outputs ({exc})") from exc
        logger.info("saved both runs to %s", save_outputs)
    return compare_results(merged, criteria)
