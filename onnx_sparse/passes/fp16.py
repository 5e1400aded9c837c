"""FP16 models for TensorRT 11, built on onnxconverter-common's ``convert_float_to_float16``.

TensorRT 11 builds strongly typed networks and has no FP16/INT8 builder flags: a layer runs in
fp16 (and can use sparse kernels) only when the model's tensors are fp16 (or explicitly
quantized). :func:`to_fp16` is the same conversion Polygraphy's ``ConvertToFp16`` loader
(``--fp-to-fp16``) runs, with these differences, each for a reason:

* values are clamped to fp16's own range (smallest subnormal .. 65504) instead of the
  converter's default 1e-7 .. 1e4, so representable weights are not changed. A non-zero value
  never becomes 0 (tiny ones are raised to the smallest subnormal) and 0 stays 0 (``-0.0``
  stays ``-0.0``), so a 2:4 weight stays 2:4 with the same zero positions. (Had a tiny value
  flushed to 0, it could only have added zeros: 2:4 would still hold.)
* Q/DQ weights: int8/fp8 weights and zero points are never touched (the converter only
  converts float tensors). The float scales follow the model's opset. From opset 19 on,
  ONNX allows fp16 scales, so they are converted and DequantizeLinear yields fp16 directly,
  feeding the fp16 Conv/MatMul with no Cast in between, the form NVIDIA's ModelOpt writes
  for TensorRT (its ``convert_to_f16`` converts Q/DQ too, at opset >= 19). Before opset 19
  QuantizeLinear/DequantizeLinear only take fp32 scales (and TensorRT 8.x only fp32), so
  those nodes stay fp32 with Casts around them; a warning says TensorRT may not fuse Q/DQ
  through the Casts and to upgrade the opset first.
* an already fp16 model (any fp16 initializer, graph input/output/value_info, or a Cast to
  fp16) is returned unchanged: converting twice would double the Casts.
* unnamed nodes are named while the converter runs (it derives Cast names from node names,
  which would collide) and unnamed again afterwards.
* the converter's warnings go to this module's logger.

Opsets, IR version, metadata, model-local functions and node metadata are kept (function bodies
as they are: the converter does not enter them, so a body holding float32 constants would not fit
fp16 inputs). Graph inputs
and outputs keep their types with ``keep_io_types=True`` (Casts are inserted after inputs and
before outputs) and become fp16 with ``keep_io_types=False``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.io import ModelFile, finalize_inline, iter_tensors, write_tensor
from onnx_sparse.passes.base import Pass, PassResult

__all__ = ["FP16_QDQ_MIN_OPSET", "QDQ_OPS", "to_fp16", "is_fp16", "has_qdq", "default_opset", "Fp16Pass"]

logger = logging.getLogger(__name__)

FP16_QDQ_MIN_OPSET = 19  # QuantizeLinear/DequantizeLinear-19: float16 scales
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_FP16_MIN = float(np.finfo(np.float16).smallest_subnormal)
_FP16_MAX = float(np.finfo(np.float16).max)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version (0 if it imports none)."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def has_qdq(model: onnx.ModelProto) -> bool:
    """Whether any graph of the model has QuantizeLinear/DequantizeLinear nodes."""
    return any(n.op_type in QDQ_OPS for g in _graphs(model.graph) for n in g.node)


def is_fp16(model: onnx.ModelProto) -> bool:
    """Whether the model already holds fp16 (the test onnxconverter-common refuses to convert on)."""
    for g in _graphs(model.graph):
        if any(t.data_type == TensorProto.FLOAT16 for t in g.initializer):
            return True
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
                return True
        for node in g.node:
            if node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in node.attribute):
                return True
            if node.op_type == "Constant" and any(
                a.HasField("t") and a.t.data_type == TensorProto.FLOAT16 for a in node.attribute
            ):
                return True
    return False


def _name_unnamed(model: onnx.ModelProto) -> set[str]:
    taken = {n.name for g in _graphs(model.graph) for n in g.node}
    temp: set[str] = set()
    k = 0
    for g in _graphs(model.graph):
        for node in g.node:
            if node.name:
                continue
            while f"{node.op_type}_unnamed{k}" in taken:
                k += 1
            node.name = f"{node.op_type}_unnamed{k}"
            taken.add(node.name)
            temp.add(node.name)
    return temp


def _unname(model: onnx.ModelProto, temp: set[str]) -> None:
    for g in _graphs(model.graph):
        for node in g.node:
            if node.name in temp:
                node.name = ""


def to_fp16(model: onnx.ModelProto, keep_io_types: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with float32 tensors converted to fp16 (see the module docstring).

    Args:
        model: an ONNX model with all tensor data inline (load external data first, or use
            :class:`Fp16Pass`, which does).
        keep_io_types: keep fp32 graph inputs/outputs (Casts inside the graph) instead of
            making them fp16.

    Returns:
        The converted model; the input is never modified. An already fp16 model comes back as
        an unchanged copy.

    Raises:
        OnnxSparseError: a tensor still refers to external data, or the converter failed.
    """
    for t in iter_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            raise OnnxSparseError(
                f"tensor {t.name!r} is stored as external data, which the fp16 conversion cannot read",
                hint="load the model with its external data, or run Fp16Pass on a ModelFile",
            )
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if is_fp16(work):
        logger.info("model already holds fp16 tensors: not converted again")
        return work

    from onnxconverter_common import float16

    block = list(float16.DEFAULT_OP_BLOCK_LIST)
    opset = default_opset(work)
    if has_qdq(work) and opset < FP16_QDQ_MIN_OPSET:
        block += list(QDQ_OPS)
        logger.warning(
            "opset %d: QuantizeLinear/DequantizeLinear take fp32 scales only before opset %d, so they stay fp32 "
            "with Casts around them; TensorRT may not fuse Q/DQ through those Casts (upgrade the model to opset "
            ">= %d first, e.g. with onnx.version_converter)",
            opset,
            FP16_QDQ_MIN_OPSET,
            FP16_QDQ_MIN_OPSET,
        )
    temp = _name_unnamed(work)
    kwargs = dict(
        min_positive_val=_FP16_MIN,
        max_finite_val=_FP16_MAX,
        keep_io_types=keep_io_types,
        op_block_list=block,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                out = float16.convert_float_to_float16(work, **kwargs)
            except ValueError as exc:  # shape inference refuses models over 2 GB
                if "2GB" not in str(exc) and "2 GB" not in str(exc):
                    raise
                logger.warning("shape inference failed (%s); converting without it", exc)
                out = float16.convert_float_to_float16(work, disable_shape_infer=True, **kwargs)
        except (ValueError, AssertionError, onnx.shape_inference.InferenceError) as exc:
            raise OnnxSparseError(
                f"fp16 conversion failed: {type(exc).__name__}: {exc}".replace("\n", " "),
                hint="check the model with onnx.checker; as a fallback build with precision flags on TensorRT < 11",
            ) from exc
    seen: set[str] = set()
    for w in caught:
        msg = str(w.message)
        if msg not in seen:
            seen.add(msg)
            logger.warning("fp16 conversion: %s", msg)
    _unname(out, temp)
    # The converter keeps these, but they are the contract: make sure.
    for field in ("opset_import", "metadata_props", "functions"):
        if list(getattr(out, field)) != list(getattr(model, field)):
            out.ClearField(field)
            getattr(out, field).extend(getattr(model, field))
    out.ir_version = model.ir_version
    return out


class Fp16Pass(Pass):
    """Functional pass around :func:`to_fp16`; reads external data (and values pending from
    earlier passes) into the (new) model first.

    The result holds every tensor inline, so it must stay under 2 GB once converted.
    """

    in_place = False

    def __init__(self, keep_io_types: bool = True) -> None:
        self.keep_io_types = keep_io_types

    def call(self, mf: ModelFile) -> PassResult:
        model = mf.model
        for t in iter_tensors(model):
            if t.data_location == TensorProto.EXTERNAL or id(t) in mf.pending:
                write_tensor(t, np.array(mf.read(t, mmap=False)))  # current value, pending or stored
        mf.pending.clear()
        finalize_inline(model)
        if is_fp16(model):
            logger.info("model already holds fp16 tensors: not converted again")
            return PassResult(mf, modified=False)
        out = to_fp16(model, keep_io_types=self.keep_io_types)
        return PassResult(ModelFile(model=out, base_dir=None, path=mf.path), modified=True)
