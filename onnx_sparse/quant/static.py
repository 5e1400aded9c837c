"""Quantize a (pruned) model to INT8 Q/DQ that TensorRT can run with sparse INT8 kernels.

The quantizer is onnxruntime's static QDQ quantizer (``onnxruntime.quantization.quantize_static``),
a well-kept, documented PTQ tool that is already a dependency; NVIDIA ModelOpt's ONNX PTQ
would serve too but pulls in PyTorch and a CUDA stack for calibration. Settings, each for a
TensorRT reason:

* ``QuantFormat.QDQ``, INT8 activations and weights, ``ActivationSymmetric`` and
  ``WeightSymmetric``: TensorRT takes Q/DQ with zero point 0 only. With zero point 0, a
  pruned weight (exactly 0) quantizes to exactly 0, so the 2:4 pattern survives; this module
  checks it on every layer after quantizing.
* ``per_channel=True``: one weight scale per output channel (Conv axis 0, MatMul ``[K, N]``
  axis 1, Gemm axis 0 with ``transB``), which is what TensorRT expects.
* Outputs: the QDQ quantizer quantizes each quantized node's output too (our op list:
  Conv/Gemm/MatMul), so a layer is INT8 in, INT8 weight and INT8 out; this module verifies
  that per layer (:mod:`onnx_sparse.graph.qdq`) rather than trusting it.
* ``QuantizeBias=False``: biases stay float (TensorRT fuses them; it has no use for int32 biases).
* ``QDQKeepRemovableActivations=True``: Relu/Clip stay in the graph (the float model's meaning).

Layers that stay out of INT8 (and why) are reported: weights that are not stored in the
main graph's initializers the node reads directly (Constant nodes, a Transpose on the way,
subgraphs), weights that are already quantized, MatMuls of two activations, and layers the
selection leaves out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_sparse.calib.capture import inline_model
from onnx_sparse.core import blas
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph.locate import WeightSite, find_weight_sites
from onnx_sparse.graph.names import display_name
from onnx_sparse.graph.qdq import Int8IO
from onnx_sparse.graph.weights import weight_stats
from onnx_sparse.io import ModelFile, finalize_inline, load_model, save_model
from onnx_sparse.quant.error import LayerError, int8_errors

__all__ = [
    "CALIBRATION_METHODS",
    "LAYER_SETS",
    "QuantizeOptions",
    "LayerQuant",
    "QuantizeResult",
    "quantize",
    "quantize_file",
]

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
LAYER_SETS = ("eligible", "all")
_OPS = ("Conv", "Gemm", "MatMul")
_MIN_OPSET = 13  # per-channel (axis) QuantizeLinear/DequantizeLinear


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
        calibration: activation range method: ``percentile`` (default), ``minmax`` or ``entropy``
            (onnxruntime's calibrators). Percentile 99.999 kept more of the dense model's answers than
            min/max on the real models (magika top-1 agreement 0.953 -> 0.969, PP-OCRv4 cls 0.922 ->
            0.953, MiniLM unchanged; tools/eval_int8.py, quick sets); it costs more calibration time.
        percentile: with ``percentile``, the share of values the range covers (e.g. 99.999).
        include / exclude / ops: layer selection as in ``prune`` (regexes on node names, op types).
        layers: ``eligible`` (default): quantize the 2:4-eligible layers, the ones a sparse INT8
            kernel can run, and leave the others (depthwise convs, odd channel counts, the first
            conv of an image model) in float; ``all``: every Conv/Gemm/MatMul with a weight. On
            the real models, quantizing the ineligible layers too cost the most accuracy
            (PP-OCRv4 cls top-1 agreement with the dense model 0.89 with all, 0.92 eligible only;
            tools/eval_int8.py).
        max_error: leave float every layer whose INT8 input or output loses more than this
            relative L2 error on the calibration data (measured after a first quantization, see
            :mod:`onnx_sparse.quant.error`), then quantize again. None: keep every layer.
    """

    calibration: str = "percentile"
    percentile: float = 99.999
    layers: str = "eligible"
    max_error: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()

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


def _candidate_reason(site: WeightSite, options: QuantizeOptions) -> str:
    """Why ``site`` is not handed to the quantizer ("" when it is)."""
    if site.op not in _OPS:
        return f"{site.op} is not quantized (Conv, Gemm and MatMul only)"
    if site.scope:
        return "inside a subgraph or function (onnxruntime quantizes the main graph only)"
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


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of feeds, with ``set_range`` for its strided
    collection (which we use one feed at a time, see :func:`_ort_quantize`)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._i = 0
        self._end = len(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= self._end:
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self._i, self._end = start_index, min(end_index, len(self._feeds))

    def __len__(self) -> int:
        return len(self._feeds)


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    """onnxruntime's quantizer logs advice through the root logger (``logging.warning``), which would
    also install a default handler on it, and prints progress; hold all of it off while it runs (its
    errors still raise; the printed lines go to DEBUG)."""
    root = logging.getLogger()
    null = logging.NullHandler()
    level = root.level
    root.addHandler(null)
    root.setLevel(logging.ERROR)
    printed = io.StringIO()  # its calibrators print progress to stdout
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.removeHandler(null)
        root.setLevel(level)
        if printed.getvalue().strip():
            logger.debug("onnxruntime quantizer: %s", " | ".join(printed.getvalue().split("\n")))


def _ort_quantize(model: onnx.ModelProto, nodes: list[str], feeds: Sequence[Any], options: QuantizeOptions) -> Any:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_Reader, CalibrationDataReader):
        pass

    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[options.calibration]
    large = model.ByteSize() > (1 << 30)
    with tempfile.TemporaryDirectory(prefix="onnx-sparse-quant-") as tmp, _quiet_root():
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src), save_as_external_data=large)
        quantize_static(
            str(src),
            str(dst),
            Reader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(_OPS),
            nodes_to_quantize=nodes,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=large,
            calibrate_method=method,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "QDQKeepRemovableActivations": True,
                "CalibPercentile": options.percentile,
                # One feed per collection step: the histogram calibrators stack each step's values
                # into one array, which fails when feeds differ in shape (sequence lengths, image
                # sizes); the min/max calibrator then also holds one feed's activations at a time.
                "CalibStridedMinMax": 1,
                "CalibTensorRangeSymmetric": True,
                # MatMul B [.., K, N]: scales per output column N (onnxruntime's default, 1, is K for rank 3).
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": -1},
            },
        )
        return onnx.load(str(dst))


@blas.deterministic
def quantize(
    mf: ModelFile | onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], options: QuantizeOptions | None = None
) -> QuantizeResult:
    """Quantize ``mf`` to INT8 Q/DQ on the calibration ``feeds``; the input is not modified.

    Raises:
        OnnxSparseError: no feeds, no layer to quantize, or a model onnxruntime cannot quantize.
    """
    options = options or QuantizeOptions()
    if not feeds:
        raise OnnxSparseError("quantization needs calibration data", hint="pass --load-inputs or --data-loader-script")
    src = mf if isinstance(mf, ModelFile) else ModelFile(mf)
    model = inline_model(src)  # onnxruntime reads one self-contained model
    model = _at_least_opset(model, _MIN_OPSET)
    _name_nodes(model)
    from onnx_sparse.analysis import select_sites

    sites = find_weight_sites(model, macs=False)
    consts = {s.weight for s in sites if s.source == "constant" and not s.scope and not s.path and s.op in _OPS}
    if consts:
        _constants_to_initializers(model, consts)
        sites = find_weight_sites(model, macs=False)
    chosen = {s.node for s in select_sites(sites, include=options.include, exclude=options.exclude, ops=options.ops)}
    before = {s.node: (weight_stats(s, ModelFile(model)) if s.eligible else None) for s in sites}
    reasons: dict[str, str] = {}
    for s in sites:
        reasons[s.node] = "left out by the layer selection" if s.node not in chosen else _candidate_reason(s, options)
    nodes = sorted(n for n, r in reasons.items() if not r)
    if not nodes:
        raise OnnxSparseError(
            "no layer to quantize",
            hint="the model has no 2:4-eligible Conv/Gemm/MatMul with a float32 weight the quantizer can reach "
            "(--int8-layers all also takes the ineligible ones; --include/--exclude may have left all out)",
        )
    logger.info("quantizing %d layer(s) to INT8 Q/DQ on %d calibration sample(s)", len(nodes), len(feeds))
    result, layers = _run(model, nodes, feeds, options, before, reasons)
    if options.max_error is not None:
        worse = {x.node: x.error.worst for x in layers if x.quantized and x.error and x.error.worst > options.max_error}
        if worse:
            for node, e in worse.items():
                reasons[node] = f"INT8 error {e:.1%} > {options.max_error:.1%} (--int8-max-error)"
            nodes = [n for n in nodes if n not in worse]
            logger.info("leaving %d layer(s) float (INT8 error above %.1f%%), quantizing again", len(worse),
                        100 * options.max_error)  # fmt: skip
            if not nodes:
                raise OnnxSparseError("every layer is above the INT8 error limit", hint="raise --int8-max-error")
            errors = {x.node: x.error for x in layers}
            result, layers = _run(model, nodes, feeds, options, before, reasons)
            layers = [x if x.quantized else replace(x, error=errors.get(x.node)) for x in layers]
    return QuantizeResult(result, layers)


def _run(
    model: onnx.ModelProto,
    nodes: list[str],
    feeds: Sequence[dict[str, np.ndarray]],
    options: QuantizeOptions,
    before: dict[str, Any],
    reasons: dict[str, str],
) -> tuple[ModelFile, list[LayerQuant]]:
    """Quantize ``nodes``, check the result and measure each INT8 layer's error."""
    from onnx_sparse import runtime
    from onnx_sparse.calib.capture import toposort_graph

    runtime.quiet()  # the quantizer opens its own onnxruntime sessions
    try:
        out = _ort_quantize(model, nodes, feeds, options)
        # its node sort ignores what If/Loop bodies read from the main graph: sort again
        toposort_graph(out.graph)
    except OnnxSparseError:
        raise
    except Exception as exc:  # onnxruntime raises many types
        raise OnnxSparseError(
            f"onnxruntime could not quantize the model: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="check that the model runs in onnxruntime on the calibration data",
        ) from exc
    result = ModelFile(finalize_inline(out))
    return result, _check(result, before, reasons, feeds)


def _check(
    result: ModelFile, before: dict[str, Any], reasons: dict[str, str], feeds: Sequence[dict[str, np.ndarray]]
) -> list[LayerQuant]:
    """Per-layer state after quantizing; a 2:4 weight that lost its pattern is our bug."""
    layers = []
    sites = find_weight_sites(result.model, macs=False)
    main = [(s.node, s.node_proto, s.activation) for s in sites if not s.scope and s.node_proto is not None]
    errors = int8_errors(result.model, main, feeds)
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
