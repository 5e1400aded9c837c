"""The Python API: prune a model in memory or file to file, as one step of an export pipeline.

>>> import onnx_sparse
>>> sparse = onnx_sparse.prune(model)              # ModelProto in, ModelProto out
>>> onnx_sparse.prune_file("m.onnx", "m.sparse.onnx")  # external data, > 2 GB, atomic
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
    read_tensor,
    save_model,
    write_tensor,
)
from onnx_sparse.passes.annotate import AnnotatePass
from onnx_sparse.passes.base import Pass, PassResult, Sequential, as_model_file
from onnx_sparse.passes.prune import PrunePass, SiteRecord

__all__ = ["prune", "prune_file", "build_prune_passes"]


def build_prune_passes(
    *,
    fc_layout: bool = False,
    annotate: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    ops: Sequence[str] = (),
    min_channels: int = 0,
    prune_pass: Pass | None = None,
) -> Sequential:
    """The pass pipeline behind ``prune``: [fc-layout] -> prune -> [annotate]."""
    passes: list[Pass] = []
    if fc_layout:
        from onnx_sparse.passes.fc_layout import FcLayoutPass

        passes.append(FcLayoutPass())
    passes.append(prune_pass or PrunePass(include=include, exclude=exclude, ops=ops, min_channels=min_channels))
    if annotate:
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


def run_pipeline(pipeline: Sequential, mf: ModelFile) -> PassResult:
    """Run ``pipeline``, feeding pruning records into a trailing annotation pass."""
    records: list[Any] = []
    modified = False
    for p in pipeline.passes:
        if isinstance(p, _AnnotateFromRecords):
            p.records = [r for r in records if isinstance(r, SiteRecord)]
        result = p(mf)
        mf, modified = result.model, modified or result.modified
        records.extend(result.records)
    return PassResult(mf, modified, records)


_CALIBRATION_OPTIONS = (
    "bias_correction", "refit_head", "damp", "blocksize", "max_rows", "seed", "row_mask", "target_cosine", "holdout"
)  # fmt: skip
_SELECTION_OPTIONS = ("include", "exclude", "ops", "min_channels")


def _calibrated(options: dict[str, Any], method: str | None, calibration: Any) -> dict[str, Any]:
    """Turn the calibration options of :func:`prune` into a ``prune_pass``."""
    calib = {k: options.pop(k) for k in _CALIBRATION_OPTIONS if k in options}
    if method is None and calibration is None and not calib:
        return options
    if options.get("prune_pass") is not None:
        raise OnnxSparseError("pass either prune_pass or the calibration options (method, calibration, ...)")
    from onnx_sparse.passes.calibrated import make_prune_pass

    selection = {k: options[k] for k in _SELECTION_OPTIONS if k in options}
    options["prune_pass"] = make_prune_pass(method, calibration, **calib, **selection)
    return options


def prune(
    model: onnx.ModelProto | str | os.PathLike[str] | Any,
    *,
    method: str | None = None,
    calibration: Any = None,
    **options: Any,
) -> Any:
    """Prune every eligible weight of ``model`` to 2:4 and return a new ModelProto.

    ``model`` may be a ModelProto, an onnx-graphsurgeon Graph (a Graph is returned then), or
    a path (external data is then loaded into memory; for large models use
    :func:`prune_file`). Options are those of :func:`build_prune_passes`, plus calibrated
    pruning:

    * ``method``: ``magnitude``, ``wanda``, ``sparsegpt`` or ``asym`` (default ``sparsegpt``
      when ``calibration`` is given, else ``magnitude``);
    * ``calibration``: a list of feeds ``{input name: numpy array}``;
    * ``bias_correction``, ``refit_head``, ``damp``, ``blocksize``, ``max_rows``, ``seed``,
      ``row_mask``, ``target_cosine``, ``holdout``:
      see :class:`onnx_sparse.passes.calibrated.CalibratedPrunePass` and
      :class:`onnx_sparse.passes.sensitivity.SensitivityPrunePass`.

    The input is not modified.
    """
    options = _calibrated(options, method, calibration)
    if _is_gs_graph(model):
        import onnx_graphsurgeon as gs

        return gs.import_onnx(prune(gs.export_onnx(model), **options))
    if isinstance(model, (str, os.PathLike)):
        mf = load_model(model)
        for t in iter_tensors(mf.model):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                write_tensor(t, read_tensor(t, mf.base_dir, mmap=False))
        mf.base_dir = None
    else:
        mf = as_model_file(model)
    result = run_pipeline(build_prune_passes(**options), mf)
    return finalize_inline(result.model.model)


def _is_gs_graph(model: Any) -> bool:
    try:
        import onnx_graphsurgeon as gs
    except ImportError:  # pragma: no cover - a hard dependency
        return False
    return isinstance(model, gs.Graph)


def prune_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    in_place: bool = False,
    verify: bool = True,
    method: str | None = None,
    calibration: Any = None,
    **options: Any,
) -> PassResult:
    """Prune ``src`` into ``dst`` (atomic, verified). Refuses to overwrite ``src`` unless ``in_place``,
    and refuses an input that ``onnx.checker`` rejects (before any work).

    Options are those of :func:`prune`.
    """
    from onnx_sparse.guard import check_run_paths

    options = _calibrated(options, method, calibration)
    check_run_paths(models=[src], model_output=dst, in_place=in_place)
    check_input_model(src)
    mf = load_model(src)
    result = run_pipeline(build_prune_passes(**options), mf)
    save_model(result.model, dst, verify=verify, reference=src)
    return result
