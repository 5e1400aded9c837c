"""Quantize a (pruned) model to INT8 Q/DQ that TensorRT can run with sparse INT8 kernels.

What a sparse INT8 kernel needs, and how each step keeps every pruned zero a zero:

* **Symmetric INT8 everywhere** (zero point 0, which TensorRT requires): activations one scale per
  tensor, weights one scale per output channel, integers in [-127, 127]; a 0 weight is the integer 0.
* **Every quantized layer INT8 in, weight and out** (:mod:`onnx_sparse.quant.assemble` writes the
  Q/DQ; :mod:`onnx_sparse.graph.qdq` then verifies it per layer rather than trusting it). Biases
  stay float (TensorRT fuses them).
* **Outliers** (:mod:`onnx_sparse.quant.smooth`): per-channel rescaling of the quantized tensors
  (SmoothQuant into the reading layers' input channels, output equalisation into the producing
  layer's output channels), each chosen on held-out calibration feeds; diagonal, so zero-safe.
* **Scales** by the error they cause in the layers that read the tensor (clip search,
  :mod:`onnx_sparse.quant.calibrate`), not a fixed percentile.
* **Weights**: ``prune --int8`` hands over the integers of the joint SparseGPT walk (pruning and
  rounding in one reconstruction, :mod:`onnx_sparse.prune.sparsegpt`), stored as they are; here a
  float weight is rounded per output channel (clip search per channel).
* **Mixed precision** (:mod:`onnx_sparse.quant.mixed`): with a fidelity target (``target_cosine``,
  against the FP32 model on held-out calibration feeds), the most harmful layers fall back to
  float until it holds, each only if what it recovers is worth its parameters (readiness is a
  share of parameters); each one that does is reported with what it cost.

Layers that stay out of INT8 (and why) are reported: weights that are not stored in the
main graph's initializers the node reads directly (Constant nodes become initializers; a
Transpose on the way, subgraphs), weights that are already quantized or shared, MatMuls of two
activations, and layers the selection leaves out.

onnxruntime's static quantizer (``quantize_static``), used before, placed the same pairs but
re-derives every weight's integers from the float values (it cannot take the walk's) and sends
every consumer through the dequantized tensor; its percentile calibrator was also the slowest
part of ``prune --int8``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from onnx_sparse.calib.capture import inline_model
from onnx_sparse.calib.data import split_holdout, validate_feeds
from onnx_sparse.calib.fakequant import FakeQuant, QuantPoint
from onnx_sparse.core import blas
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph.locate import WeightSite, find_weight_sites
from onnx_sparse.graph.names import display_name
from onnx_sparse.graph.qdq import Int8IO
from onnx_sparse.graph.weights import require_finite_weight, weight_stats
from onnx_sparse.io import ModelFile, finalize_inline, load_model, save_model
from onnx_sparse.quant.assemble import (
    Int8Layer,
    dequantized_readers,
    find_layers,
    index_graph,
    quantize_weight,
    write_qdq,
)
from onnx_sparse.quant.calibrate import TensorStats, choose_scale, collect, collect_split, collect_split_outputs
from onnx_sparse.quant.error import ERROR_FEEDS, Int8Probe, LayerError
from onnx_sparse.quant.mixed import Fallback, fallback_search, output_fidelity
from onnx_sparse.quant.smooth import Rescale, choose, fold_target, rescale

__all__ = [
    "CALIBRATION_METHODS",
    "LAYER_SETS",
    "QuantizeOptions",
    "LayerQuant",
    "QuantizeResult",
    "quantize",
    "quantize_file",
    "prepare",
    "candidates",
    "smooth_model",
    "smooth_collect",
    "smooth_finish",
    "capture_rounding",
    "input_rescaling",
    "apply_rescaling",
    "finish",
    "held_feeds",
    "DEFAULT_TARGET_COSINE",
]

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("search", "minmax", "percentile")
#: Default fidelity target of the mixed-precision search (output cosine to the FP32 model on held-out feeds).
DEFAULT_TARGET_COSINE = 0.99
LAYER_SETS = ("eligible", "all")
_OPS = ("Conv", "Gemm", "MatMul")
_MIN_OPSET = 13
_FIDELITY_FEEDS = 16  # held-out feeds the mixed-precision search runs on, at most  # per-channel (axis) QuantizeLinear/DequantizeLinear


def _at_least_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """``model`` converted to at least ``version`` of the default domain (onnx's version converter)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if current >= version:
        return model
    from onnx import version_converter

    logger.info("converting the model from opset %d to %d (per-channel Q/DQ needs it)", current, version)
    try:
        return version_converter.convert_version(model, version)
    except Exception as exc:  # the converter raises several types
        raise OnnxSparseError(
            f"cannot convert the model from opset {current} to {version}: {type(exc).__name__}",
            hint=f"export the model at opset {version} or later",
        ) from exc


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize.

    Attributes:
        calibration: activation scales: ``search`` (default: the clip with the smallest error in the
            layers that read the tensor, :func:`~onnx_sparse.quant.calibrate.choose_scale`),
            ``minmax`` or ``percentile`` (of the sampled ``|x|``, see ``percentile``).
        percentile: with ``percentile``, the share of values the range covers (e.g. 99.999).
        include / exclude / ops: layer selection as in ``prune`` (regexes on node names, op types).
        layers: ``eligible`` (default): quantize the 2:4-eligible layers, the ones a sparse INT8
            kernel can run, and leave the others (depthwise convs, odd channel counts, the first
            conv of an image model) in float; ``all``: every Conv/Gemm/MatMul with a weight.
        max_error: leave float every layer whose INT8 input or output loses more than this
            relative L2 error on the calibration data (:mod:`onnx_sparse.quant.error`). None: no limit.
        smooth: per-channel outlier rescaling before quantizing (:mod:`onnx_sparse.quant.smooth`).
        target_cosine: fidelity target of the mixed-precision search: the worst float output's
            cosine to the FP32 model on the held-out calibration feeds (None: every layer stays INT8).
        holdout: share of the calibration feeds held out (every k-th) to choose the rescaling and to
            judge the target on.
        seed: seed of the row samples.
    """

    calibration: str = "search"
    percentile: float = 99.999
    layers: str = "eligible"
    max_error: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    smooth: bool = True
    target_cosine: float | None = DEFAULT_TARGET_COSINE
    holdout: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_METHODS:
            raise OnnxSparseError(
                f"unknown calibration method {self.calibration!r}", hint=f"use one of {', '.join(CALIBRATION_METHODS)}"
            )
        if self.layers not in LAYER_SETS:
            raise OnnxSparseError(f"unknown layer set {self.layers!r}", hint=f"use one of {', '.join(LAYER_SETS)}")
        if self.max_error is not None and not self.max_error > 0:
            raise OnnxSparseError(f"the INT8 error limit must be positive, got {self.max_error}")
        if not 50.0 < self.percentile <= 100.0:
            raise OnnxSparseError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.target_cosine is not None and not -1.0 <= self.target_cosine <= 1.0:
            raise OnnxSparseError(f"--int8-target-cosine must be in [-1, 1], got {self.target_cosine}")
        if not 0.0 <= self.holdout <= 0.5:
            raise OnnxSparseError(f"the held-out share must be in [0, 0.5], got {self.holdout}")


@dataclass(frozen=True)
class LayerQuant:
    """One weight-bearing layer after quantization."""

    node: str
    op: str
    quantized: bool  # we asked the quantizer to quantize it
    reason: str  # why it stayed out of INT8 ("" when quantized)
    eligible: bool  # 2:4 eligible (after quantization)
    sparse_2of4: bool | None  # its stored weight is 2:4
    int8: Int8IO | None
    error: LayerError | None = None  # relative L2 error of its INT8 input/output on calibration data

    @property
    def sparse_int8(self) -> bool:
        """Sparse INT8 possible: eligible, 2:4, and INT8 in, weight and out."""
        return bool(self.eligible and self.sparse_2of4 and self.int8 is not None and self.int8.possible)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op": self.op,
            "quantized": self.quantized,
            "reason": self.reason,
            "eligible": self.eligible,
            "sparse_2of4": self.sparse_2of4,
            "sparse_int8_possible": self.sparse_int8,
            "int8_missing": self.int8.reason if self.int8 is not None else "not analysed (subgraph)",
            "int8_error_input": None if self.error is None else self.error.input,
            "int8_error_output": None if self.error is None else self.error.output,
        }


@dataclass
class QuantizeResult:
    model: ModelFile
    layers: list[LayerQuant] = field(default_factory=list)
    fallback: Fallback | None = None  # the mixed-precision search, when a target was set


def _candidate_reason(site: WeightSite, options: QuantizeOptions) -> str:
    """Why ``site`` is not handed to the quantizer ("" when it is)."""
    if site.op not in _OPS:
        return f"{site.op} is not quantized (Conv, Gemm and MatMul only)"
    if site.scope:
        return "inside a subgraph or function (Q/DQ is written in the main graph only)"
    if site.tensor is None:
        return "no constant weight (both inputs are activations)"
    if site.quant is not None or site.dtype not in ("float32",):
        return f"weight is already {site.dtype or 'quantized'}" if site.quant else f"{site.dtype} weight (float32 only)"
    if site.source not in ("initializer", "constant") or site.path:
        how = " -> ".join(site.path) if site.path else site.source
        return f"weight reaches the node through {how}, not directly from an initializer"
    if site.input_index != 1:
        return "the weight is the Gemm's A input"
    if options.layers == "eligible" and not site.eligible:
        return f"not 2:4 eligible ({site.reason}); --int8-layers all quantizes it too"
    return ""


def _constants_to_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    """Move the main-graph ``Constant`` nodes that produce ``names`` into initializers
    (onnxruntime's quantizer quantizes initializer weights only; PaddleOCR exports use Constants)."""
    keep = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and value is not None
            and node.output[0] in names
        ):
            t = onnx.TensorProto()
            t.CopyFrom(value)
            t.name = node.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed main-graph nodes the display names of :mod:`onnx_sparse.graph.locate`."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = display_name(node, i)
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def prepare(mf: ModelFile | onnx.ModelProto) -> onnx.ModelProto:
    """A self-contained copy ready for INT8: opset >= 13 (per-channel Q/DQ), every main-graph node
    named, and the float weights of main-graph Conv/Gemm/MatMul nodes in initializers."""
    src = mf if isinstance(mf, ModelFile) else ModelFile(mf)
    model = inline_model(src)
    model = _at_least_opset(model, _MIN_OPSET)
    _name_nodes(model)
    sites = find_weight_sites(model, macs=False)
    consts = {s.weight for s in sites if s.source == "constant" and not s.scope and not s.path and s.op in _OPS}
    if consts:
        _constants_to_initializers(model, consts)
    return model


def candidates(model: onnx.ModelProto, options: QuantizeOptions) -> tuple[list[str], dict[str, str]]:
    """The layers to quantize and, for every weight-bearing layer, why it is left out ("" when it is not)."""
    from onnx_sparse.analysis import select_sites

    sites = find_weight_sites(model, macs=False)
    chosen = {s.node for s in select_sites(sites, include=options.include, exclude=options.exclude, ops=options.ops)}
    reasons = {
        s.node: "left out by the layer selection" if s.node not in chosen else _candidate_reason(s, options)
        for s in sites
    }
    shared = _shared_weights(model)
    for s in sites:
        if not reasons[s.node] and s.weight in shared:
            reasons[s.node] = "its weight is shared with another node"
    nodes = sorted(n for n, r in reasons.items() if not r)
    if not nodes:
        why = sorted({r for r in reasons.values() if r})
        found = f"; its layers: {'; '.join(why[:3])}{'; ...' if len(why) > 3 else ''}" if why else ""
        raise OnnxSparseError(
            "no layer to quantize",
            hint="the model has no 2:4-eligible Conv/Gemm/MatMul with a float32 weight the quantizer can reach"
            + found
            + " (--int8-layers all also takes the ineligible ones; --include/--exclude may have left all out)",
        )
    return nodes, reasons


def _shared_weights(model: onnx.ModelProto) -> set[str]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            counts[i] = counts.get(i, 0) + 1
    return {t.name for t in model.graph.initializer if counts.get(t.name, 0) > 1}


def _channel_axes(layers: Sequence[Int8Layer]) -> dict[str, int]:
    axes: dict[str, int] = {}
    for x in layers:
        axes[x.act] = x.act_axis
        axes[x.output] = x.out_axis
    return axes


def _readers(model: onnx.ModelProto, layers: Sequence[Int8Layer]) -> dict[str, list[tuple[Int8Layer, np.ndarray]]]:
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, list[tuple[Int8Layer, np.ndarray]]] = {}
    for x in layers:
        out.setdefault(x.act, []).append((x, onnx.numpy_helper.to_array(inits[x.weight]).astype(np.float64)))
    return out


def _groups(model: onnx.ModelProto, node: str) -> int:
    n = next(n for n in model.graph.node if n.name == node)
    return next((int(a.i) for a in n.attribute if a.name == "group"), 1)


def _activation_scales(
    model: onnx.ModelProto, layers: Sequence[Int8Layer], stats: dict[str, TensorStats], options: QuantizeOptions
) -> dict[str, float]:
    """The per-tensor scale of every tensor in ``stats`` (``options.calibration``: the clip search, each
    channel weighted by the squared weight columns of the INT8 layers that read it, or a fixed rule)."""
    readers = _readers(model, layers)

    def act_scale(t: str) -> float:
        st = stats[t]
        weight = None
        if t in readers:
            weight = np.zeros(st.amax.size)
            for x, w in readers[t]:
                a = np.moveaxis(w, x.w_in_axis, 0)
                if a.shape[0] != weight.size:  # a layout the channel weighting does not follow
                    weight = None
                    break
                weight += np.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)
        if options.calibration == "search":
            return choose_scale(st, weight)
        return _fixed_scale(st, options.calibration, options.percentile)

    return dict(zip(stats, blas.parallel_map(act_scale, stats), strict=True))  # one tensor per task


@blas.deterministic
def capture_rounding(
    model: onnx.ModelProto,
    smoothed: onnx.ModelProto,
    nodes: Sequence[str],
    choices: Sequence[Rescale],
    fit: Sequence[dict[str, np.ndarray]],
    options: QuantizeOptions,
) -> FakeQuant:
    """The INT8 rounding the prune's calibration applies (``prune --int8``'s ``int8_fit_quantized``):
    every tensor the Q/DQ model will quantize, in the unscaled prepared ``model``, with the scale it
    gets on the dense ``smoothed`` model (:func:`smooth_model`'s, or ``model`` itself) times the
    rescaling ``v`` chosen for it (per channel), so the rounding is the one of the rescaled model.
    The scales :func:`finish` writes are chosen again on the pruned model."""
    mine = {x.node: x for x in find_layers(smoothed, nodes)}
    layers = [x for x in find_layers(model, nodes) if x.node in mine]
    theirs = [mine[x.node] for x in layers]
    stats = collect(smoothed, fit, _channel_axes(theirs), seed=options.seed)
    scales = _activation_scales(smoothed, theirs, stats, options)
    v = {c.tensor: c.v for c in choices if c.v is not None}
    readers = dequantized_readers(layers)  # the same readers as the Q/DQ model's
    points: dict[str, QuantPoint] = {}
    for x, y in zip(layers, theirs, strict=True):
        for mine_t, their_t, axis in ((x.act, y.act, x.act_axis), (x.output, y.output, x.out_axis)):
            st = stats.get(their_t)
            if st is None or mine_t in points:
                continue
            scale = np.asarray(scales[their_t], dtype=np.float64)
            if mine_t in v:
                scale = scale * np.asarray(v[mine_t], dtype=np.float64)
            points[mine_t] = QuantPoint(scale.astype(np.float32), axis, st.ndim, readers[mine_t])
    return FakeQuant(points)


@blas.deterministic
def smooth_model(
    model: onnx.ModelProto,
    nodes: Sequence[str],
    fit: Sequence[dict[str, np.ndarray]],
    held: Sequence[dict[str, np.ndarray]],
    seed: int = 0,
) -> tuple[onnx.ModelProto, list[Rescale]]:
    """``model`` with the outlier rescaling of :mod:`onnx_sparse.quant.smooth` applied (a copy with the
    same float function), and the choice made for each quantized tensor."""
    axes = _channel_axes(find_layers(model, nodes))
    stats_fit, stats_held = collect_split(model, fit, held or fit, axes, seed=seed)
    out, choices, _ = _smooth(model, nodes, stats_fit, stats_held)
    return out, choices


@blas.deterministic
def smooth_collect(
    model: onnx.ModelProto,
    nodes: Sequence[str],
    fit: Sequence[dict[str, np.ndarray]],
    held: Sequence[dict[str, np.ndarray]],
    seed: int = 0,
) -> tuple[onnx.ModelProto, list[Rescale], dict[str, TensorStats], list[list[np.ndarray]]]:
    """:func:`smooth_model` on the model that will be quantized (``quantize``'s model, or the pruned model of
    ``prune --int8`` without the joint walk), the statistics :func:`finish` takes of the rescaled copy on ``fit``, and the
    graph outputs of ``model`` on each of ``held`` (at most ``MAX_FEEDS // 2`` of them, all read), the
    FP32 reference :func:`finish` compares the candidates with: one set of whole-model runs serves the
    choice, the scales and the reference. The statistics are derived from the ones the choice was made
    on instead of taken again: a tensor's values do not change but where it is rescaled (``x / v``: its
    amax and rows divided by ``v``). A tensor :func:`finish` would sample afresh because a restoring
    ``Mul`` now reads it keeps the rows it had (what a global max pool reads of it, where that is what
    read it). The reference is the unscaled model's (the same float function, to rounding)."""
    before = find_layers(model, nodes)
    names = [o.name for o in model.graph.output]
    stats_fit, stats_held, reference = collect_split_outputs(
        model, fit, held or fit, _channel_axes(before), names if held else (), seed=seed
    )
    out, choices, folded = _smooth(model, nodes, stats_fit, stats_held)
    after = {x.node: x for x in find_layers(out, nodes)}
    v = {c.tensor: c.v for c in choices if c.v is not None}
    stats: dict[str, TensorStats] = {}
    for x in before:
        y = after[x.node]
        for src, dst in ((x.act, y.act), (x.output, y.output)):
            st = stats_fit.get(src)
            if st is None or dst in stats:
                continue
            # x / v where the INT8 layers read a rescaled copy (a new name) or the producer took 1/v (folded)
            if src in v and (dst != src or src in folded):
                vs = np.asarray(v[src], dtype=np.float64)
                st = TensorStats(st.axis, st.amax / vs, st.rows / vs.astype(np.float32), st.ndim)
            stats[dst] = st
    return out, choices, stats, reference


def _smooth(
    model: onnx.ModelProto,
    nodes: Sequence[str],
    stats_fit: dict[str, TensorStats],
    stats_held: dict[str, TensorStats],
) -> tuple[onnx.ModelProto, list[Rescale], set[str]]:
    """The rescaled copy of ``model``, the choices made on the statistics of the unscaled ``model``, and the
    tensors whose producer took ``1/v`` (folded; the others were rescaled by an explicit ``Mul``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    layers = find_layers(out, nodes)
    axes = _channel_axes(layers)
    readers = _readers(out, layers)
    producers = {x.output for x in layers}
    choices = []
    folded: set[str] = set()
    for tensor in axes:
        if tensor not in stats_fit or tensor not in stats_held:
            continue
        mine = [x for x, _ in readers.get(tensor, [])]
        if any(x.op == "Conv" and _groups(out, x.node) != 1 for x in mine):
            continue
        if any(w.shape[x.w_in_axis] != stats_fit[tensor].amax.size for x, w in readers.get(tensor, [])):
            continue  # a layout the per-channel rescaling does not follow
        index = index_graph(out)  # one look at the graph for the readers and the rescaling
        if not mine and fold_target(out, tensor, axes[tensor] == -1, index) is None:
            continue  # no INT8 layer reads it and its producer cannot take 1/v: nothing a rescaling changes
        current = find_layers(out, [x.node for x in mine], index)
        inits = index[2]
        weights = [
            (onnx.numpy_helper.to_array(inits[x.weight]).astype(np.float64), x.w_out_axis, x.w_in_axis) for x in current
        ]
        c = choose(tensor, stats_fit[tensor], stats_held[tensor], weights, tensor in producers)
        if c.v is not None:
            if fold_target(out, tensor, axes[tensor] == -1, index) is not None:
                folded.add(tensor)
            how = rescale(out, tensor, axes[tensor], c.v, current, index, c.ndim)
            logger.info("INT8 rescale of %s: %s, %s (held-out error %.3g -> %.3g)", tensor, c.how, how,
                        c.error_before, c.error_after)  # fmt: skip
        choices.append(c)
    return out, choices, folded


def input_rescaling(
    model: onnx.ModelProto, nodes: Sequence[str], choices: Sequence[Rescale]
) -> dict[str, np.ndarray | None]:
    """Per INT8 layer of the unscaled ``model``, the ``v`` its input tensor was chosen to be divided by
    (its weight's input channels take ``v``), or None."""
    chosen = {c.tensor: c.v for c in choices if c.v is not None}
    return {x.node: chosen.get(x.act) for x in find_layers(model, nodes)}


def apply_rescaling(
    model: onnx.ModelProto, nodes: Sequence[str], choices: Sequence[Rescale], scales: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """The rescalings ``choices`` (made on the dense model by :func:`smooth_model`) applied to a copy of the
    pruned ``model``, in the same order; a weight whose output channels take ``1/v`` has its INT8 scales
    in ``scales`` divided the same way, so the joint walk's integers stay exact."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    layers = {x.node: x for x in find_layers(out, nodes)}
    axes = _channel_axes(list(layers.values()))
    for c in choices:
        if c.v is None or c.tensor not in axes:
            continue
        index = index_graph(out)  # one look at the graph for the readers, the fold and the rescaling
        readers = find_layers(out, [x.node for x in layers.values() if x.act == c.tensor], index)
        fold = fold_target(out, c.tensor, axes[c.tensor] == -1, index) or []
        outs = {x.weight: x.w_out_axis for x in layers.values()}
        for name, axis in fold:
            if name in scales and outs.get(name) == axis:
                scales[name] = scales[name] / c.v
        rescale(out, c.tensor, axes[c.tensor], c.v, readers, index, c.ndim)
    return out


@blas.deterministic
def quantize(
    mf: ModelFile | onnx.ModelProto,
    feeds: Sequence[dict[str, np.ndarray]],
    options: QuantizeOptions | None = None,
) -> QuantizeResult:
    """Quantize ``mf`` to INT8 Q/DQ on the calibration ``feeds``; the input is not modified.

    Steps: :func:`prepare`; the outlier rescaling (``options.smooth``, :mod:`onnx_sparse.quant.smooth`)
    chosen on held-out feeds; then :func:`finish` (weights rounded per output channel, zeros kept): with
    the rescaling, :func:`smooth_finish` (one set of whole-model runs for both).

    Raises:
        OnnxSparseError: no feeds, no layer to quantize, or a model onnxruntime cannot run.
    """
    options = options or QuantizeOptions()
    if not feeds:
        raise OnnxSparseError("quantization needs calibration data", hint="pass --load-inputs or --data-loader-script")
    model = prepare(mf)
    feeds = validate_feeds(model, feeds)  # each a Sample: messages name the user's sample
    nodes, reasons = candidates(model, options)
    logger.info("quantizing %d layer(s) to INT8 Q/DQ on %d calibration sample(s)", len(nodes), len(feeds))
    if options.smooth:
        return smooth_finish(model, nodes, reasons, feeds, options)
    return finish(model, nodes, reasons, feeds, options)


def smooth_finish(
    model: onnx.ModelProto,
    nodes: Sequence[str],
    reasons: dict[str, str],
    feeds: Sequence[dict[str, np.ndarray]],
    options: QuantizeOptions,
    scales: dict[str, np.ndarray] | None = None,
) -> QuantizeResult:
    """The outlier rescaling chosen on ``model``, the model that is quantized, then :func:`finish`, from one
    set of whole-model runs (:func:`smooth_collect`): the choice is judged on the held-out feeds the
    fidelity target is judged on (:func:`held_feeds`; all held-out feeds when there is no target), and
    those runs' outputs are the target's FP32 reference."""
    _require_finite_weights(model, nodes)
    fit, held = split_holdout(list(feeds), options.holdout)
    judged = held_feeds(feeds, options) if options.target_cosine is not None else held
    out, _, stats, reference = smooth_collect(model, nodes, fit, judged, options.seed)
    same = options.target_cosine is not None and len(reference) == len(judged)
    return finish(out, nodes, reasons, feeds, options, scales, stats, reference if same else None)


@blas.deterministic
def finish(
    model: onnx.ModelProto,
    nodes: Sequence[str],
    reasons: dict[str, str],
    feeds: Sequence[dict[str, np.ndarray]],
    options: QuantizeOptions,
    scales: dict[str, np.ndarray] | None = None,
    stats: dict[str, TensorStats] | None = None,
    reference: Sequence[Sequence[np.ndarray]] | None = None,
) -> QuantizeResult:
    """Write the Q/DQ model of a prepared float ``model`` (pruned or not) and hold the fidelity target.

    Activation scales by clip search on the fitting feeds (:func:`~onnx_sparse.quant.calibrate.choose_scale`),
    weights with the joint walk's ``scales`` (weight initializer -> per output channel) where they
    hold, else rounded here (``stats``: the activations' statistics on the fitting feeds, when the caller
    has them, e.g. :func:`smooth_collect`'s; else taken here); then ``--int8-max-error``
    and the mixed-precision search (:mod:`onnx_sparse.quant.mixed`) on the held-out feeds against the
    FP32 reference: ``reference`` (the graph outputs on each of :func:`held_feeds` ``(feeds)``, e.g.
    :func:`smooth_collect`'s) or ``model`` itself run here.
    """
    from onnx_sparse import runtime

    if stats is None:  # a caller that hands statistics ran the model first, and checked before it did
        _require_finite_weights(model, nodes)
    scales = scales or {}
    fit, _ = split_holdout(list(feeds), options.holdout)
    held = held_feeds(feeds, options)
    names = [o.name for o in model.graph.output]

    serialized = runtime.model_bytes(model)  # for the reference and for the statistics' session

    def fp32_reference(source: runtime.ModelBytes) -> list[list[np.ndarray]]:
        # one intra-op thread, as every INT8 session: a value does not depend on the machine's cores
        session = runtime.session(source, what="the FP32 reference", spin=False, threads=1)
        return [runtime.run(session, names, f, where="a held-out calibration sample") for f in held]

    # the mixed-precision search's reference depends on nothing below: made while the statistics are taken
    background = None
    if reference is not None:
        if len(reference) != len(held):
            raise OnnxSparseError(f"the FP32 reference has {len(reference)} feed(s), the held-out set {len(held)}")
    elif options.target_cosine is not None and held:
        background = blas.Background(fp32_reference, serialized)
    layers = find_layers(model, nodes)
    axes = _channel_axes(layers)
    if stats is None or any(t not in stats for t in axes):
        stats = collect(model, fit, axes, seed=options.seed, serialized=serialized)
    del serialized
    # a layer whose input or output never had a value in calibration (empty in every sample) has no scale
    # to choose: it stays float, rather than INT8 on a placeholder scale
    unseen = {x.node for x in layers if x.act not in stats or x.output not in stats}
    if unseen and len(unseen) == len(layers):
        raise OnnxSparseError(
            "no calibration sample gives the INT8 layers' inputs a value (they are empty in every sample)",
            hint="give calibration samples with data where the layers read it",
        )
    act_scales = _activation_scales(model, layers, stats, options)
    for x in layers:
        for t in (x.act, x.output):
            act_scales.setdefault(t, 1.0)  # not float or never computed: a harmless placeholder
    inits = {t.name: t for t in model.graph.initializer}
    weights = {}
    for x in layers:
        if x.weight not in weights:
            w = onnx.numpy_helper.to_array(inits[x.weight])
            weights[x.weight] = quantize_weight(w, x.w_out_axis, scales.get(x.weight))

    # Each candidate model is written once and opened once (optimizations off, its Q/DQ pairs exposed):
    # that one session gives its outputs to the mixed-precision search and its layers' INT8 errors to
    # --int8-max-error, the search's ranking and the per-layer report. Kept: the model with no layer
    # float until the search starts, then the candidate with the best fidelity so far (the search's
    # last accepted one, which the report reads).
    built: dict[frozenset[str], Int8Probe] = {}

    def build(float_layers: frozenset[str]) -> Int8Probe:
        if float_layers not in built:
            keep = [x for x in layers if x.node not in float_layers]
            candidate = write_qdq(model, keep, act_scales, weights) if keep else model
            built[float_layers] = Int8Probe(candidate, what="the INT8 candidate")
            # the per-layer report's errors (_check) are on these: a held-out run of one of them serves both
            built[float_layers].errors_later(list(feeds)[:ERROR_FEEDS])
        return built[float_layers]

    q = build(frozenset()).model
    float_layers = {n: "no calibration value reaches it (empty in every sample)" for n in sorted(unseen)}
    first_errors: dict[str, LayerError] = {}
    if options.max_error is not None:
        errs = first_errors = build(frozenset()).errors(_main_layers(q), feeds)
        for n in nodes:
            e = errs.get(n)
            if e is not None and e.worst > options.max_error:
                float_layers[n] = f"INT8 error {e.worst:.1%} > {options.max_error:.1%} (--int8-max-error)"
        if len(float_layers) == len(nodes):
            raise OnnxSparseError("every layer is above the INT8 error limit", hint="raise --int8-max-error")
    fallback = None
    if background is not None:
        reference = background.result()
    if reference is not None and options.target_cosine is not None:
        expected = reference
        cache: dict[frozenset[str], float] = {}
        best: list[frozenset[str]] = []

        def fidelity(extra: frozenset[str]) -> float:
            key = extra | frozenset(float_layers)
            if key not in cache:
                # Q/DQ as written (no fusion into onnxruntime's integer kernels: on CPUs without VNNI
                # their u8 x s8 products saturate 16-bit sums, which no GPU engine does, and the
                # fidelity, and so which layers stay INT8, would follow the CPU)
                candidate = build(key)
                got = candidate.run_many(names, held, where="a held-out calibration sample")
                cache[key] = output_fidelity(expected, got)
                if not best or cache[key] > cache[best[0]]:
                    best[:] = [key]
                for k in list(built):  # only the best candidate stays open
                    if k not in best:
                        del built[k]
            return cache[key]

        def ranking() -> list[str]:  # most harmful first: the layers' INT8 errors on the fitting feeds
            errs = build(frozenset(float_layers)).errors(_main_layers(q), fit)
            rest = [n for n in nodes if n not in float_layers]
            return sorted(rest, key=lambda n: (-(errs[n].worst if n in errs else 0.0), n))

        sizes = {x.node: float(np.prod(inits[x.weight].dims)) for x in layers}  # readiness counts parameters
        fallback = fallback_search(ranking, fidelity, options.target_cosine, sizes)
        for step in fallback.steps:
            if step.kept_float:
                float_layers[step.layer] = (
                    f"mixed precision: output cosine {step.before:.5f} -> {step.after:.5f} with it float "
                    f"(target {options.target_cosine:g})"
                )
        logger.info(
            "INT8 fidelity to the FP32 model on %d held-out feed(s): %.5f with every layer INT8, %.5f with %d "
            "layer(s) float (target %g%s)", len(held), fallback.start, fallback.end, len(fallback.float_layers),
            options.target_cosine, "" if fallback.met else ", NOT met",
        )  # fmt: skip
    final = build(frozenset(float_layers))
    result = ModelFile(finalize_inline(final.model))
    for n, why in float_layers.items():
        reasons[n] = why
    mf = ModelFile(model)
    before = {s.node: (weight_stats(s, mf) if s.eligible else None) for s in find_weight_sites(model, macs=False)}
    checked = _check(result, before, reasons, feeds, final)
    checked = [
        replace(x, error=first_errors.get(x.node)) if x.error is None and x.node in first_errors else x for x in checked
    ]
    return QuantizeResult(result, checked, fallback)


def _require_finite_weights(model: onnx.ModelProto, nodes: Sequence[str]) -> None:
    """Before any run: a layer weight with inf or NaN is named (its NaN activations would be named
    instead, or its INT8 scales written NaN)."""
    inits = {t.name: t for t in model.graph.initializer}
    for x in find_layers(model, nodes):
        require_finite_weight(onnx.numpy_helper.to_array(inits[x.weight]), x.weight, "INT8 quantization")


def held_feeds(feeds: Sequence[dict[str, np.ndarray]], options: QuantizeOptions) -> list[dict[str, np.ndarray]]:
    """The held-out feeds :func:`finish` judges the fidelity target on: ``options.holdout``'s, evenly
    spread, at most ``_FIDELITY_FEEDS``."""
    _, held = split_holdout(list(feeds), options.holdout)
    return held[:: max(1, -(-len(held) // _FIDELITY_FEEDS))]


def _main_layers(model: onnx.ModelProto) -> list[tuple[str, onnx.NodeProto, str]]:
    sites = find_weight_sites(model, macs=False)
    return [(s.node, s.node_proto, s.activation) for s in sites if not s.scope and s.node_proto is not None]


def _fixed_scale(stats: TensorStats, how: str, percentile: float) -> float:
    x = np.abs(stats.rows)
    top = stats.absmax if how == "minmax" or not x.size else float(np.percentile(x, percentile))
    return float(np.float32(max(top, 1e-12) / 127))


def _check(
    result: ModelFile,
    before: dict[str, Any],
    reasons: dict[str, str],
    feeds: Sequence[dict[str, np.ndarray]],
    probe: Int8Probe | None = None,
) -> list[LayerQuant]:
    """Per-layer state after quantizing; a 2:4 weight that lost its pattern is our bug. ``probe``: the
    session of ``result``'s model the mixed-precision search already opened, if any."""
    layers = []
    sites = find_weight_sites(result.model, macs=False)
    main = [(s.node, s.node_proto, s.activation) for s in sites if not s.scope and s.node_proto is not None]
    errors = (probe if probe is not None and probe.model is result.model else Int8Probe(result.model)).errors(
        main, feeds
    )
    for s in sites:
        stats = weight_stats(s, result) if s.eligible else None
        was = before.get(s.node)
        if was is not None and was.sparse_2of4 and reasons.get(s.node) == "":
            assert stats is not None and stats.sparse_2of4, f"{s.node}: the 2:4 pattern did not survive quantization"
        reason = reasons.get(s.node, "added by the quantizer")
        if not reason and s.dtype != "int8":
            reason = "the quantizer left it in float"
        layers.append(
            LayerQuant(
                node=s.node,
                op=s.op,
                quantized=not reason,
                reason=reason,
                eligible=s.eligible,
                sparse_2of4=None if stats is None else stats.sparse_2of4,
                int8=s.int8,
                error=errors.get(s.node) if not reason else None,
            )
        )
    return layers


@blas.deterministic
def quantize_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    feeds: Sequence[dict[str, np.ndarray]],
    options: QuantizeOptions | None = None,
    *,
    in_place: bool = False,
    verify: bool = True,
) -> QuantizeResult:
    """Quantize ``src`` into ``dst`` (atomic, verified). Refuses to overwrite ``src`` unless ``in_place``,
    and refuses an input that ``onnx.checker`` rejects (before any work)."""
    from onnx_sparse.guard import check_run_paths
    from onnx_sparse.io import check_input_model

    check_run_paths(models=[src], model_output=dst, in_place=in_place)
    check_input_model(src)
    mf = load_model(src)
    result = quantize(mf, feeds, options)
    save_model(result.model, dst, verify=verify, reference=src)
    return result
