"""The Python API: prune a model in memory or file to file, as one step of an export pipeline.

>>> import onnx_sparse
>>> sparse = onnx_sparse.prune(model)              # ModelProto in, ModelProto out
>>> onnx_sparse.prune_file("m.onnx", "m.sparse.onnx")  # external data, > 2 GB, atomic
>>> onnx_sparse.prune(model, onnx_sparse.Recipe(method="sparsegpt"), calibration=feeds)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import onnx

from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.io import (
    ModelFile,
    check_input_model,
    finalize_inline,
    iter_tensors,
    load_model,
    save_model,
    write_tensor,
)
from onnx_sparse.passes.annotate import AnnotatePass
from onnx_sparse.passes.base import Pass, PassResult, Sequential, as_model_file
from onnx_sparse.passes.prune import PrunePass, SiteRecord
from onnx_sparse.recipe import META_CALIBRATION, Recipe, provenance

__all__ = ["prune", "prune_file", "build_prune_passes", "Recipe"]


def build_prune_passes(recipe: Recipe | None = None, *, prune_pass: Pass | None = None, **options: Any) -> Sequential:
    """The pass pipeline behind ``prune``: [fc-layout] -> prune -> [annotate].

    ``recipe`` gives the selection, ``fc_layout`` and ``annotate`` (or, the older form, its
    fields as keywords); ``prune_pass`` replaces the magnitude :class:`PrunePass` in the middle.
    """
    recipe = _recipe(recipe, options)
    passes: list[Pass] = []
    if recipe.fc_layout:
        from onnx_sparse.passes.fc_layout import FcLayoutPass

        passes.append(FcLayoutPass())
    passes.append(prune_pass or PrunePass(**recipe.selection))
    if recipe.annotate:
        passes.append(_AnnotateFromRecords())
    return Sequential(passes)


class _AnnotateFromRecords(Pass):
    """Annotation with the pruning records of the passes before it (set by :func:`run_pipeline`)."""

    in_place = True
    records: Sequence[SiteRecord] = ()

    def call(self, mf: ModelFile) -> PassResult:
        extra: dict[str, dict[str, str]] = {}
        for r in self.records:
            if not r.groups_changed:
                continue  # already 2:4: keep what an earlier run wrote (its retained magnitude is not 1.0)
            for node in r.nodes:
                extra[node] = {"pruned": r.method, "retained_magnitude": f"{r.retained_magnitude:.6f}"}
        return AnnotatePass(extra)(mf)


def run_pipeline(pipeline: Sequential, mf: ModelFile, *, consume: bool = False) -> PassResult:
    """Run ``pipeline``, feeding pruning records into a trailing annotation pass.

    ``consume``: ``mf`` is this run's own (loaded for it, or given up by the caller), so the first
    pass works on it directly; every later pass does so on its predecessor's output whenever that
    is not ``mf`` itself (a pass's output is a model no one else holds).
    """
    given = mf
    records: list[Any] = []
    modified = False
    for p in pipeline.passes:
        if isinstance(p, _AnnotateFromRecords):
            p.records = [r for r in records if isinstance(r, SiteRecord)]
        result = p(mf, consume=consume or mf is not given)
        mf, modified = result.model, modified or result.modified
        records.extend(result.records)
    return PassResult(mf, modified, records)


def _recipe(recipe: Recipe | None, options: dict[str, Any]) -> Recipe:
    if recipe is None:
        try:
            return Recipe(**options)
        except TypeError as exc:  # an unknown keyword
            raise OnnxSparseError(f"prune: {exc}", hint="the options are the fields of onnx_sparse.Recipe") from None
    if not isinstance(recipe, Recipe):
        raise OnnxSparseError(f"recipe must be an onnx_sparse.Recipe, got {type(recipe).__name__}")
    if options:
        raise OnnxSparseError(
            f"pass either recipe= or the options {sorted(options)}, not both",
            hint="recipe.replace(...) makes a changed copy",
        )
    return recipe


class _Calibration:
    """The calibration source as the pass sees it: at most ``limit`` samples; remembers what it
    gave (for the provenance digest)."""

    def __init__(self, source: Any, limit: int | None) -> None:
        self.source = source
        self.limit = limit
        self.given: list[Any] | None = None

    def __call__(self, model: onnx.ModelProto) -> list[Any]:
        feeds = list(self.source(model) if callable(self.source) else self.source)
        if self.limit is not None:
            feeds = feeds[: self.limit]
        self.given = feeds
        return feeds


def _plan(
    recipe: Recipe | None, method: str | None, calibration: Any, options: dict[str, Any]
) -> tuple[Sequential, Recipe, _Calibration | None, bool]:
    """The pipeline, the resolved recipe, the calibration wrapper, and whether we built the pass."""
    prune_pass = options.pop("prune_pass", None)
    sensitivity_report = options.pop("sensitivity_report", None)
    if method is not None:
        if recipe is not None:
            raise OnnxSparseError("pass either recipe= or method=, not both", hint="recipe.replace(method=...)")
        options["method"] = method
    recipe = _recipe(recipe, options).resolve(has_data=calibration is not None)
    calib = _Calibration(calibration, recipe.calib_samples) if calibration is not None else None
    if prune_pass is not None:
        if calibration is not None or recipe.needs_data:
            raise OnnxSparseError("pass either prune_pass or the calibration options (method, calibration, ...)")
        return build_prune_passes(recipe, prune_pass=prune_pass), recipe, None, False
    from onnx_sparse.passes.factory import make_prune_pass

    made = make_prune_pass(recipe, calib, sensitivity_report=sensitivity_report)
    return build_prune_passes(recipe, prune_pass=made), recipe, calib, True


def _stamp(model: onnx.ModelProto, recipe: Recipe, calib: _Calibration | None) -> None:
    """Write the provenance (recipe, version, calibration digest) into ``model.metadata_props``:
    existing keys are updated in place, new ones appended (deterministic)."""
    values = provenance(recipe, calib.given if calib is not None else None)
    stale = [p for p in model.metadata_props if p.key == META_CALIBRATION and META_CALIBRATION not in values]
    for p in stale:
        model.metadata_props.remove(p)
    for p in model.metadata_props:
        if p.key in values:
            p.value = values.pop(p.key)
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)


def prune(
    model: onnx.ModelProto | str | os.PathLike[str] | Any,
    recipe: Recipe | None = None,
    *,
    method: str | None = None,
    calibration: Any = None,
    **options: Any,
) -> Any:
    """Prune every eligible weight of ``model`` to 2:4 and return a new ModelProto.

    ``model`` may be a ModelProto, an onnx-graphsurgeon Graph (a Graph is returned then), or
    a path (external data is then loaded into memory; for large models use
    :func:`prune_file`).

    * ``recipe``: an :class:`onnx_sparse.Recipe` (method, selection, calibration settings,
      fidelity target, ...). Instead of a recipe, its fields may be given as keywords
      (``method="sparsegpt", exclude=["head"]``), the older form.
    * ``calibration``: a list of feeds ``{input name: numpy array}``, or a callable that makes
      them from the model. With calibration and no method, the default recipe is used:
      ``asym`` + bias correction + head refit (:data:`onnx_sparse.recipe.DEFAULT_CALIBRATED`);
      without calibration, magnitude.
    * ``prune_pass``: a pass of your own instead of the recipe's pruning pass.
    * ``sensitivity_report``: called with the sensitivity report (``sensitivity`` or
      ``target_cosine`` recipes).

    When the prune changes the model, the output's ``metadata_props`` record the resolved
    recipe, the onnx-sparse version and a digest of the calibration data
    (:func:`onnx_sparse.recipe.provenance`); a model that comes out unchanged (nothing eligible,
    already 2:4) keeps the record of how it was made, if any. The input is not modified.
    With ``int8`` (recipe field) the output is the sparse INT8 Q/DQ model (as :func:`prune_file`).
    """
    pipeline, resolved, calib, made = _plan(recipe, method, calibration, options)
    if _is_gs_graph(model):
        import onnx_graphsurgeon as gs

        return gs.import_onnx(_run_in_memory(gs.export_onnx(model), pipeline, resolved, calib, made))
    if isinstance(model, (str, os.PathLike)):
        mf = load_model(model)
        for t in iter_tensors(mf.model):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                write_tensor(t, mf.read(t, mmap=False))
        mf.base_dir = None
    else:
        mf = as_model_file(model)
    return _run_in_memory(mf, pipeline, resolved, calib, made)


def _run_in_memory(
    model: Any, pipeline: Sequential, recipe: Recipe, calib: _Calibration | None, made: bool
) -> onnx.ModelProto:
    if recipe.int8:  # the sparse INT8 model, as prune_file and the CLI's prune --int8 make it
        if calib is None:
            raise OnnxSparseError(
                "INT8 quantization needs calibration data", hint="pass calibration= (a list of feeds)"
            )
        _, quantized = _prune_int8(as_model_file(model), pipeline, recipe, calib, made)
        return finalize_inline(quantized.model.model)
    result = run_pipeline(pipeline, as_model_file(model))
    if made and result.modified:
        _stamp(result.model.model, recipe, calib)
    return finalize_inline(result.model.model)


def _is_gs_graph(model: Any) -> bool:
    try:
        import onnx_graphsurgeon as gs
    except ImportError:  # pragma: no cover - a hard dependency
        return False
    return isinstance(model, gs.Graph)


def prune_file(
    src: str | os.PathLike[str] | ModelFile,
    dst: str | os.PathLike[str],
    recipe: Recipe | None = None,
    *,
    in_place: bool = False,
    verify: bool = True,
    method: str | None = None,
    calibration: Any = None,
    consume: bool = False,
    **options: Any,
) -> PassResult:
    """Prune ``src`` into ``dst`` (atomic, verified). Refuses to overwrite ``src`` unless ``in_place``,
    and refuses an input that ``onnx.checker`` rejects (before any work).

    ``src`` is a path, or a model :func:`onnx_sparse.io.load_model` loaded (the CLI passes the
    one its checks loaded, so the file is read once). A path's model is loaded for this run
    alone and pruned where it is loaded; a given model is left as it was unless ``consume``
    (the caller will not read it again: then it is pruned where it is, and an inline model's
    weights are not held twice). Options are those of :func:`prune`. The
    result's ``recipe`` attribute is not set; the resolved recipe is in the output's metadata.
    With ``recipe.int8`` the output is the sparse INT8 Q/DQ model, pruned and quantized in one
    reconstruction on the same calibration feeds (:func:`_prune_int8`); the per-layer INT8 results
    (:class:`onnx_sparse.quant.LayerQuant`) are appended to the result's records.
    """
    from onnx_sparse.guard import check_run_paths

    pipeline, resolved, calib, made = _plan(recipe, method, calibration, options)
    if resolved.int8 and calib is None:
        raise OnnxSparseError("INT8 quantization needs calibration data", hint="pass calibration= (a list of feeds)")
    (mf,) = check_run_paths(models=[src], model_output=dst, in_place=in_place)
    check_input_model(mf)
    reference = mf.path
    consume = consume or not isinstance(src, ModelFile)
    if resolved.int8:
        assert calib is not None
        result, quantized = _prune_int8(mf, pipeline, resolved, calib, made)
        save_model(quantized.model, dst, verify=verify, reference=reference)
        result.records.extend(quantized.layers)
        return result
    result = run_pipeline(pipeline, mf, consume=consume)
    if made and result.modified:
        _stamp(result.model.model, resolved, calib)
    save_model(result.model, dst, verify=verify, reference=reference)
    return result


def _prune_int8(
    mf: ModelFile, pipeline: Sequential, recipe: Recipe, calib: _Calibration, made: bool
) -> tuple[PassResult, Any]:
    """``prune --int8``: the FP32 prune, then its INT8 Q/DQ model on the same calibration feeds.

    The model is prepared for INT8 (:func:`onnx_sparse.quant.prepare`) and the layers that will be INT8
    are chosen first; the prune runs on the unscaled weights (its masks, dampings and refits are the
    FP32 prune's, which a rescaling before the prune would change through the relative damping). The
    outlier rescaling of their tensors is chosen on the pruned model and applied to it
    (:func:`onnx_sparse.quant.smooth_finish`: one set of whole-model runs for the choice and ``finish``), or, with
    ``int8_joint`` or ``int8_fit_quantized`` (which need it during the prune), chosen on the dense
    model and applied to the pruned one; then :func:`onnx_sparse.quant.finish` writes the Q/DQ model (its weights
    rounded per output channel, or the walk's integers as they are) and holds the fidelity target
    against the pruned FP32 model. With ``int8_joint`` the prune's SparseGPT walk rounds the layers'
    kept weights onto the INT8 grids they will have once rescaled, as it fixes them (pruning and
    rounding error compensated together); with ``int8_fit_quantized`` each layer is fitted on its
    input as the INT8 model computes it (:func:`onnx_sparse.quant.capture_rounding`).
    """
    from onnx_sparse.calib.data import split_holdout
    from onnx_sparse.passes.calibrated import CalibratedPrunePass, LayerFit
    from onnx_sparse.quant import (
        apply_rescaling,
        candidates,
        capture_rounding,
        finish,
        input_rescaling,
        prepare,
        smooth_finish,
        smooth_model,
    )

    options = recipe.quantize_options()
    prepared = prepare(mf)
    feeds = calib(prepared)
    nodes, reasons = candidates(prepared, options)
    choices: list[Any] = []
    fit, held = split_holdout(list(feeds), options.holdout)
    smoothed = prepared
    # Without the joint walk or the quantized fit, nothing in the prune depends on the rescaling: it is
    # chosen on the pruned model, whose statistics finish then reads (one set of whole-model runs, not a
    # dense set and a pruned one). The walk and the fit need it before the prune: chosen on the dense model.
    late = options.smooth and not recipe.int8_joint and not recipe.int8_fit_quantized
    if options.smooth and not late:  # chosen on the dense model, applied after the prune (see below)
        smoothed, choices = smooth_model(prepared, nodes, fit, held, options.seed)
    # the calibration's INT8 rounding (int8_fit_quantized): scales of the dense rescaled model
    rounding = capture_rounding(prepared, smoothed, nodes, choices, fit, options) if recipe.int8_fit_quantized else None
    del smoothed
    scales: dict[str, Any] = {}

    def keep_scale(fit: LayerFit) -> None:
        if fit.int8_scale is not None:
            scales[fit.group.sites[0].weight] = fit.int8_scale

    # The prune runs on the unscaled weights, so its masks, dampings and refits are exactly the FP32
    # prune's (a diagonal rescaling would change the relative damping); the walk rounds each weight
    # onto the grid it will have once its input channels are rescaled.
    for p in pipeline.passes:
        if isinstance(p, CalibratedPrunePass):
            if recipe.int8_joint:
                p.engine.int8_nodes = input_rescaling(prepared, nodes, choices)
            p.on_fit = keep_scale
            p.engine.fake_quant = rounding
    fixed = list(feeds)
    calib.source, calib.limit = fixed, None  # the feeds are loaded once
    result = run_pipeline(pipeline, ModelFile(prepared), consume=True)  # prepared here, for this run
    if made:
        _stamp(result.model.model, recipe, calib)
    if late:
        return result, smooth_finish(finalize_inline(result.model.model), nodes, reasons, fixed, options, scales)
    pruned = apply_rescaling(finalize_inline(result.model.model), nodes, choices, scales)
    return result, finish(pruned, nodes, reasons, fixed, options, scales)
