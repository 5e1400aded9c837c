"""Per-layer sensitivity to 2:4 pruning, and choosing the layers that keep a target output fidelity.

**Sensitivity** (:func:`measure_sensitivity`): every eligible layer (stored tensor) is pruned
*alone*, everything else dense, and the model's outputs on the calibration data are compared
with the dense model's. The layer is pruned with the chosen method fitted to the DENSE
model's activations (one staged capture for all layers: no layer sees another one pruned);
``asym`` is measured as ``sparsegpt`` since, alone, a layer's pruned-model and dense-model
inputs are the same. Bias correction is not part of the measurement.

Fidelity of a model against the dense one (:class:`Fidelity`): for every floating-point graph
output, the cosine similarity and the relative L2 error ``||y' - y|| / ||y||`` per calibration
sample, averaged over samples; integer and boolean outputs are ignored. ``min_cosine`` is the
worst output's cosine; it is what ``--target-cosine`` holds.

**Target** (:class:`SensitivityPrunePass` with ``target_cosine``): order the layers by damage
per unit of work, ``(1 - min_cosine) / MACs`` (parameters where MACs are unknown), cheapest
first; find the longest prefix whose *combined* per-layer weights keep ``min_cosine >=
target`` (binary search on the prefix length, each step one model evaluation); then run the
calibrated method sequentially on that set and measure again. Sequential calibration is
normally at least as good as the independent per-layer fits, but if it is not, the prefix is
shortened (15% of its layers at a time, at most 5 times) until the measured fidelity holds.
The report gives the chosen layers, the coverage (share of the eligible MACs that end up
2:4) and the measured fidelity.

**Held out** (``holdout``, default 0.25): with a target, every 4th calibration feed is kept
out of all fitting (:func:`onnx_sparse.calib.data.split_holdout`). Layers are fitted on the
rest, and every fidelity the search looks at (per-layer sensitivity, the prefix search, the
final check) is measured on the held-out feeds. Judged on the data they were fitted to,
fitted layers look better than they are (on PP-OCRv4 cls: cosine 0.991 on the fitted data
against 0.971 on unseen data), and the search then prunes too much. The returned model is the
one fitted on the fitting part, so the reported fidelity is that of the model you get, on
data it has not seen. Without a target (``--sensitivity`` alone) all feeds are used for both.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from onnx_sparse.calib.capture import inline_model, run_model
from onnx_sparse.calib.data import split_holdout
from onnx_sparse.core import nm
from onnx_sparse.core.similarity import cosine, rel_l2
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph.locate import WeightSite, find_weight_sites
from onnx_sparse.graph.weights import read_weight, zero_value
from onnx_sparse.io import ModelFile, iter_tensors, write_tensor
from onnx_sparse.passes.base import Pass, PassResult, copy_model_file
from onnx_sparse.passes.calibrated import CalibratedPrunePass, Calibrator, FeedSource
from onnx_sparse.passes.prune import PrunePass, group_by_tensor
from onnx_sparse.progress import Progress
from onnx_sparse.recipe import Recipe

__all__ = [
    "Fidelity",
    "LayerSensitivity",
    "SensitivityReport",
    "OutputProbe",
    "fidelity",
    "measure_sensitivity",
    "SensitivityPrunePass",
]

logger = logging.getLogger(__name__)

_BACKOFF_STEPS = 5
_BACKOFF_SHARE = 0.15


# --------------------------------------------------------------------------------------
# output fidelity


@dataclass(frozen=True)
class Fidelity:
    """How close a model's outputs are to the dense model's (see the module docstring)."""

    cosine: Mapping[str, float]
    rel_l2: Mapping[str, float]

    @property
    def min_cosine(self) -> float:
        return min(self.cosine.values()) if self.cosine else 1.0

    @property
    def mean_cosine(self) -> float:
        return float(np.mean(list(self.cosine.values()))) if self.cosine else 1.0

    @property
    def mean_rel_l2(self) -> float:
        return float(np.mean(list(self.rel_l2.values()))) if self.rel_l2 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "min_cosine": self.min_cosine,
            "mean_cosine": self.mean_cosine,
            "mean_rel_l2": self.mean_rel_l2,
            "cosine": dict(self.cosine),
            "rel_l2": dict(self.rel_l2),
        }


def _is_float(v: Any) -> bool:
    return isinstance(v, np.ndarray) and (v.dtype.kind == "f" or v.dtype.name == "bfloat16")


def fidelity(dense: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]]) -> Fidelity:
    """Per-output cosine and relative L2 of ``other`` against ``dense`` (float outputs only)."""
    names = [k for k, v in dense[0].items() if _is_float(v)] if dense else []
    cos = {k: float(np.mean([cosine(d[k], o[k]) for d, o in zip(dense, other, strict=True)])) for k in names}
    rel = {k: float(np.mean([rel_l2(d[k], o[k]) for d, o in zip(dense, other, strict=True)])) for k in names}
    return Fidelity(cos, rel)


class OutputProbe:
    """Runs variants of one model on the calibration set and compares them with the dense outputs.

    Args:
        mf: The dense model.
        feeds: Validated calibration samples.
        threads: onnxruntime intra-op threads.
    """

    def __init__(self, mf: ModelFile, feeds: Sequence[Mapping[str, np.ndarray]], threads: int | None = None) -> None:
        self.feeds = feeds
        self.threads = threads
        self.base = inline_model(mf)
        self._index = {id(t): i for i, t in enumerate(iter_tensors(mf.model))}
        self.dense = list(run_model(self.base, feeds, threads))
        if not any(_is_float(v) for v in self.dense[0].values()):
            raise OnnxSparseError(
                "the model has no floating-point output to measure fidelity on",
                hint="sensitivity and --target-cosine compare float outputs; integer outputs are ignored",
            )
        self.evaluations = 0

    def measure(self, overrides: Mapping[int, np.ndarray]) -> Fidelity:
        """Fidelity of the dense model with some stored tensors replaced (keyed by ``id`` of the
        TensorProto in the model the probe was built from)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.base)
        tensors = list(iter_tensors(model))
        for key, value in overrides.items():
            write_tensor(tensors[self._index[key]], value)
        return self.measure_model(model)

    def measure_model(self, model: onnx.ModelProto | ModelFile) -> Fidelity:
        """Fidelity of another model with the same inputs and outputs."""
        proto = inline_model(model) if isinstance(model, ModelFile) else model
        self.evaluations += 1
        return fidelity(self.dense, list(run_model(proto, self.feeds, self.threads)))


# --------------------------------------------------------------------------------------
# sensitivity


@dataclass(frozen=True)
class LayerSensitivity:
    """One stored tensor pruned alone."""

    nodes: tuple[str, ...]
    weight: str
    op: str
    params: int
    macs: int | None
    fidelity: Fidelity

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "fidelity"}
        out["nodes"] = list(self.nodes)
        out.update(self.fidelity.to_json())
        return out


@dataclass
class SensitivityReport:
    """What :func:`measure_sensitivity` (and a target search) found; JSON via :meth:`to_json`."""

    method: str
    samples: int
    outputs: list[str]
    layers: list[LayerSensitivity]
    seconds: float = 0.0
    target_cosine: float | None = None
    chosen: list[str] = field(default_factory=list)
    coverage: float | None = None
    predicted: Fidelity | None = None
    measured: Fidelity | None = None
    evaluations: int = 0
    note: str = ""
    held_out: int = 0  # calibration feeds kept out of fitting; fidelity is measured on them

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "samples": self.samples,
            "held_out_samples": self.held_out,
            "outputs": self.outputs,
            "seconds": self.seconds,
            "layers": [
                layer.to_json() | {"chosen": bool(set(layer.nodes) & set(self.chosen))} for layer in self.layers
            ],
        }
        if self.target_cosine is not None:
            out["target"] = {
                "target_cosine": self.target_cosine,
                "chosen_layers": self.chosen,
                "chosen_tensors": sum(1 for layer in self.layers if set(layer.nodes) & set(self.chosen)),
                "eligible_tensors": len(self.layers),
                "coverage": self.coverage,
                "predicted": self.predicted.to_json() if self.predicted else None,
                "measured": self.measured.to_json() if self.measured else None,
                "met": bool(self.measured and self.measured.min_cosine >= self.target_cosine),
                "evaluations": self.evaluations,
                "note": self.note,
            }
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Table rows (for :func:`onnx_sparse.report.format_table`), most sensitive first."""
        rows = []
        for layer in sorted(self.layers, key=lambda s: s.fidelity.min_cosine):
            rows.append(
                {
                    "nodes": ",".join(layer.nodes),
                    "op": layer.op,
                    "macs": layer.macs if layer.macs is not None else layer.params,
                    "min_cos": layer.fidelity.min_cosine,
                    "mean_cos": layer.fidelity.mean_cosine,
                    "rel_l2": layer.fidelity.mean_rel_l2,
                    "chosen": bool(set(layer.nodes) & set(self.chosen)) if self.target_cosine is not None else None,
                }
            )
        return rows


def _weight(layer: LayerSensitivity) -> float:
    return float(layer.macs if layer.macs else layer.params) or 1.0


@dataclass
class _Measured:
    report: SensitivityReport
    probe: OutputProbe
    new: dict[int, tuple[WeightSite, np.ndarray]]  # by index into report.layers


def _measure(
    mf: ModelFile,
    feeds: Sequence[Mapping[str, np.ndarray]],
    method: str,
    sites: Sequence[WeightSite],
    *,
    damp: float,
    blocksize: int,
    max_rows: int | None,
    seed: int,
    threads: int | None,
    row_mask: str | None = None,
    probe_feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> _Measured:
    """Fit every layer alone on ``feeds``; measure on ``probe_feeds`` (default: ``feeds``)."""
    t0 = time.perf_counter()
    held = list(probe_feeds) if probe_feeds else []
    probe = OutputProbe(mf, held or feeds, threads)
    groups = group_by_tensor(sites)
    macs = {s.node: s.macs for s in find_weight_sites(mf.model, macs=True)}
    new: dict[int, tuple[WeightSite, np.ndarray]] = {}
    fit_method = "sparsegpt" if method == "asym" else method
    by_weight = {id(g[0].tensor): k for k, g in enumerate(groups)}
    if fit_method == "magnitude":
        for k, g in enumerate(groups):
            w = read_weight(g[0], mf)
            assert g[0].axis is not None
            new[k] = (g[0], nm.prune_2_4(np.asarray(w), g[0].axis, zero=zero_value(g[0])))
    else:
        engine = Calibrator(
            fit_method, damp=damp, blocksize=blocksize, max_rows=max_rows, seed=seed, threads=threads, row_mask=row_mask
        )
        ok, fallback = engine.groups(mf, sites)
        for grp in fallback:
            logger.info("sensitivity: magnitude instead of %s: %s", fit_method, grp.note)
        # Without ``apply`` nothing is written: every layer is fitted to the dense activations.
        with Progress(len(ok), f"sensitivity: {fit_method} fits") as bar:
            fits = [engine.solve(g, None, mf, time.perf_counter()) for g in fallback]
            for fit in engine.run(mf, ok, feeds, apply=None):
                fits.append(fit)
                bar.update(note=",".join(s.node for s in fit.group.sites))
        for fit in fits:
            new[by_weight[id(fit.group.sites[0].tensor)]] = (fit.group.sites[0], fit.new)
    layers = []
    with Progress(len(groups), "sensitivity: measuring") as bar:
        for k, g in enumerate(groups):
            site, value = new[k]
            fid = probe.measure({id(site.tensor): value})
            m = [macs.get(s.node) for s in g]
            layers.append(
                LayerSensitivity(
                    nodes=tuple(s.node for s in g),
                    weight=site.weight,
                    op=site.op,
                    params=site.params,
                    macs=None if any(v is None for v in m) else int(sum(v for v in m if v is not None)),
                    fidelity=fid,
                )
            )
            bar.update(note=",".join(s.node for s in g))
            logger.info(
                "[%d/%d] sensitivity %s: min cosine %.5f, rel L2 %.4g",
                k + 1, len(groups), ",".join(s.node for s in g), fid.min_cosine, fid.mean_rel_l2,
            )  # fmt: skip
    outputs = [k for k, v in probe.dense[0].items() if _is_float(v)]
    report = SensitivityReport(
        method=fit_method, samples=len(feeds) + len(held), outputs=outputs, layers=layers, held_out=len(held)
    )
    report.seconds = time.perf_counter() - t0
    return _Measured(report, probe, new)


def measure_sensitivity(
    model: ModelFile,
    feeds: Sequence[Mapping[str, np.ndarray]],
    method: str | Recipe = "sparsegpt",
    *,
    threads: int | None = None,
    **options: Any,
) -> SensitivityReport:
    """Prune each selected eligible layer alone and measure the outputs (module docstring).

    ``method`` is a :class:`~onnx_sparse.recipe.Recipe` (its method, selection and calibration
    settings are used), or a method name with the recipe's fields as keywords. ``model`` is
    not changed. ``feeds`` must already be validated
    (:func:`onnx_sparse.calib.data.validate_feeds`).
    """
    if isinstance(method, Recipe):
        if options:
            raise TypeError(f"pass either a Recipe or keyword options, not both ({sorted(options)})")
        recipe = method
    else:
        recipe = Recipe(method=method, **options)
    recipe = recipe.resolve(has_data=True)
    assert recipe.method is not None
    mf = copy_model_file(model)
    sites = PrunePass(**recipe.selection).selected_sites(mf)
    if not sites:
        raise OnnxSparseError("no eligible layers selected: nothing to measure")
    return _measure(mf, feeds, recipe.method, sites, threads=threads, **_fit_options(recipe)).report


def _fit_options(recipe: Recipe) -> dict[str, Any]:
    return dict(damp=recipe.damp, blocksize=recipe.blocksize, max_rows=recipe.max_rows, seed=recipe.seed,
                row_mask=recipe.row_mask)  # fmt: skip


# --------------------------------------------------------------------------------------
# the pass


class SensitivityPrunePass(Pass):
    """Measure per-layer sensitivity, then prune (all selected layers, or those a target allows).

    Args:
        recipe: The :class:`~onnx_sparse.recipe.Recipe`. Its ``target_cosine``: keep the worst
            float output's cosine similarity to the dense model at or above this on the
            held-out calibration feeds, pruning as much work (MACs) as that allows; None
            prunes every selected layer (the measurement is then only reported). Its
            ``holdout``: share of the calibration feeds kept out of fitting when there is a
            target (module docstring); 0 fits and judges on all of them. Method, selection,
            calibration settings, ``bias_correction`` and ``refit_head`` are as for
            :class:`~onnx_sparse.passes.calibrated.CalibratedPrunePass`. The older form, a
            target (float or None) with the recipe's fields as keywords, builds one.
        feeds: Calibration samples, or a callable that makes them from the model.
        threads: onnxruntime intra-op threads.
        report: Called with the :class:`SensitivityReport` when the pass is done.

    The report is also the last entry of the result's ``records``.
    """

    numeric = True

    in_place = False

    def __init__(
        self,
        recipe: Recipe | float | None = None,
        feeds: FeedSource | None = None,
        *,
        threads: int | None = None,
        report: Callable[[SensitivityReport], None] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(recipe, Recipe):
            if options:
                raise TypeError(f"pass either a Recipe or keyword options, not both ({sorted(options)})")
        else:
            recipe = Recipe(target_cosine=recipe, **{"sensitivity": True, **options})
        recipe = recipe.resolve(has_data=True)
        if feeds is None:
            raise OnnxSparseError(
                "sensitivity and target_cosine need calibration data to measure the outputs on",
                hint="pass calibration feeds (a list of {input name: array})",
            )
        assert recipe.method is not None
        self.recipe = recipe
        self.target = recipe.target_cosine
        self.method = recipe.method
        self.feeds = feeds
        self.threads = threads
        self.options = dict(_fit_options(recipe), threads=threads)
        self.callback = report
        self.holdout = recipe.holdout
        self.report: SensitivityReport | None = None

    def _prune(
        self, mf: ModelFile, feeds: Sequence[Mapping[str, np.ndarray]], nodes: Iterable[str] | None
    ) -> PassResult:
        return CalibratedPrunePass(self.recipe, feeds, sites=nodes, threads=self.threads)(mf)

    def call(self, mf: ModelFile) -> PassResult:
        helper = CalibratedPrunePass(self.recipe.replace(method="magnitude"), self.feeds)
        feeds = helper.resolve_feeds(mf.model)
        sites = helper.selected_sites(mf)
        if not sites:
            logger.warning("no eligible layers selected: nothing to prune")
            return PassResult(mf, False, [])
        held: list[dict[str, np.ndarray]] = []
        if self.target is not None:
            feeds, held = split_holdout(feeds, self.holdout)
            if held:
                logger.info(
                    "[target] fitting on %d calibration feeds, judging fidelity on %d held-out feeds",
                    len(feeds), len(held),
                )  # fmt: skip
            elif self.holdout > 0:
                logger.warning(
                    "only one calibration feed: the target is judged on the data the layers are fitted to, "
                    "which flatters fitted layers; give several feeds so some can be held out"
                )
        measured = _measure(mf, feeds, self.method, sites, probe_feeds=held, **self.options)  # type: ignore[arg-type]
        report, probe = measured.report, measured.probe
        if self.target is None:
            result = self._prune(mf, feeds, None)
            report.measured = probe.measure_model(result.model)
            logger.info("all selected layers pruned: min output cosine %.5f", report.measured.min_cosine)
            return self._finish(result, report, probe)

        target = self.target
        layers = report.layers
        order = sorted(
            range(len(layers)),
            key=lambda k: (max(0.0, 1.0 - layers[k].fidelity.min_cosine) / _weight(layers[k]), -_weight(layers[k])),
        )
        cache: dict[int, Fidelity] = {0: Fidelity({k: 1.0 for k in report.outputs}, {k: 0.0 for k in report.outputs})}

        def combined(p: int) -> Fidelity:
            if p not in cache:
                over = {id(measured.new[k][0].tensor): measured.new[k][1] for k in order[:p]}
                cache[p] = probe.measure(over)
                logger.info(
                    "[target] first %d of %d layers: min output cosine %.5f", p, len(order), cache[p].min_cosine
                )
            return cache[p]

        n = len(order)
        if combined(n).min_cosine >= target:
            p = n
        else:
            lo, hi = 0, n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if combined(mid).min_cosine >= target:
                    lo = mid
                else:
                    hi = mid
            p = lo
        report.predicted = combined(p)
        total = sum(_weight(layer) for layer in layers)

        result: PassResult | None = None
        for step in range(_BACKOFF_STEPS + 1):
            chosen = [node for k in order[:p] for node in layers[k].nodes]
            if p == 0:
                result = PassResult(copy_model_file(mf), False, [])
                report.measured = combined(0)
                report.note = report.note or "no layer can be pruned without going below the target"
                break
            result = self._prune(mf, feeds, chosen)
            report.measured = probe.measure_model(result.model)
            logger.info(
                "[target] %s on %d layers: min output cosine %.5f (target %.5f)",
                self.method, p, report.measured.min_cosine, target,
            )  # fmt: skip
            if report.measured.min_cosine >= target or step == _BACKOFF_STEPS:
                break
            p = max(0, p - max(1, math.ceil(p * _BACKOFF_SHARE)))
            report.note = "sequential calibration fell short of the prediction; shortened the layer list"
        assert result is not None
        report.chosen = [node for k in order[:p] for node in layers[k].nodes]
        report.coverage = sum(_weight(layers[k]) for k in order[:p]) / total if total else 0.0
        if report.measured is not None and report.measured.min_cosine < target:
            logger.warning(
                "target cosine %.5f not reached (measured %.5f) after backing off", target, report.measured.min_cosine
            )
        logger.info(
            "[target] chose %d of %d layers (coverage %.1f%% of eligible %s), min output cosine %.5f",
            p, n, 100 * (report.coverage or 0.0), "MACs" if all(layer.macs for layer in layers) else "work",
            report.measured.min_cosine if report.measured else float("nan"),
        )  # fmt: skip
        return self._finish(result, report, probe)

    def _finish(self, result: PassResult, report: SensitivityReport, probe: OutputProbe) -> PassResult:
        report.target_cosine = self.target
        report.evaluations = probe.evaluations
        self.report = report
        if self.callback is not None:
            self.callback(report)
        return PassResult(result.model, result.modified, list(result.records) + [report])

    def ensures(self, result: PassResult) -> None:
        CalibratedPrunePass("magnitude").ensures(result)
