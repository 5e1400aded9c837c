"""TensorRT's rules for 2:4 sparse math, one function per rule, each with its source.

Every rule returns a one-line reason when it rules a layer out, or ``None``. The tracing
module (:mod:`onnx_sparse.graph.locate`) applies them in order; the first reason wins.
Sources:
  [TRT-DG]  TensorRT Developer Guide, "Structured Sparsity": for each output channel and
            each kernel position, every 4 input channels hold at least 2 zeros; applies to
            convolution kernel weights and fully-connected weights; needs SPARSE_WEIGHTS
            and FP16/INT8 (TRT >= 11: precision from the model: fp16 tensors or Q/DQ).
  [POLY]    Polygraphy ``tools/sparse.py``: Conv weight axis 1, MatMul B axis 0, Gemm B
            axis 1 if transB else 0; float weights or int8 behind DequantizeLinear.
  [TRTEXEC] trtexec ``sparsifyMatMulKernelWeights``: 2-D constant MatMul weights only.
  [TRT-Q]   TensorRT quantization docs: Q/DQ zero points must be 0; int8 and fp8 weights.
  [TRT-3849] NVIDIA/TensorRT issues #3849, #4065 (maintainer): sparse kernels beat dense
            only when input and output channels are large (about >= 256); a 3x3 kernel
            counts 9x on the input side. #2169: eligible layers may still run dense.
  [TRT-I8]  NVIDIA TensorRT-Model-Optimizer ``examples/sparse_quant_trt`` (PR #1664) and
            NVIDIA/TensorRT #4694: a sparse INT8 kernel is chosen only when the layer's input,
            weight and output are INT8 (the example turns on output quantizers for this);
            otherwise the layer dequantizes in its epilogue and a dense kernel wins.
  [GPU-5]   Our GPU check (issue #5, ``tools/gpu_check.py``; H100, PyTorch + cuSPARSELt, FP16):
            2:4 matmuls at MiniLM's 384/1536 widths ran 0.33-1.03x the speed of dense, at
            4096-wide LLM shapes 1.00-1.33x. So in FP16 a sparse kernel is likely only at
            LLM widths.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_sparse.core.nm import GROUP_SIZE

__all__ = [
    "WEIGHT_OPS",
    "FLOAT_DTYPES",
    "QUANT_DTYPES",
    "LIKELY_SPARSE_MIN_CHANNELS",
    "reduction_axis",
    "op_rule",
    "rank_rule",
    "dtype_rule",
    "zero_point_rule",
    "channels_rule",
    "likely_sparse_kernel",
    "LIKELY_SPARSE_MIN_CHANNELS_FP16",
    "INT8_EPILOGUE_OPS",
    "int8_tensor_rule",
]

# Ops whose constant weight TensorRT may run with sparse kernels, plus ConvTranspose,
# which we report but never call eligible.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Stored weight dtypes [TRT-DG]; quantized ones only behind DequantizeLinear [POLY][TRT-Q].
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
QUANT_DTYPES = ("int8", "float8_e4m3fn")

# [TRT-3849]: both sides at least this large before sparse kernels tend to win (INT8 layers).
LIKELY_SPARSE_MIN_CHANNELS = 256
# [GPU-5]: in FP16 (a float model that TensorRT builds in FP16), both sides at least this large.
LIKELY_SPARSE_MIN_CHANNELS_FP16 = 4096

# [TRT-I8]: pointwise ops after a layer that TensorRT fuses into its epilogue, so a QuantizeLinear
# after them still makes the layer's output INT8: bias/scale by a constant, and activations.
INT8_EPILOGUE_OPS = ("Add", "Mul", "Relu", "Clip", "LeakyRelu", "BatchNormalization")


def reduction_axis(op: str, input_index: int, attrs: dict[str, int]) -> int | None:
    """The axis of the consumer-side weight along which groups of 4 run [TRT-DG][POLY].

    Conv ``[K, C/g, *k]`` -> 1; Gemm B -> 1 if transB else 0; Gemm constant A -> 0 if
    transA else 1; MatMul B (rank 2) -> 0. ``None`` where the op/input holds no weight.
    """
    if op in ("Conv", "ConvTranspose") and input_index == 1:
        return 1 if op == "Conv" else 0  # ConvTranspose W is [C, K/g, *k]: C on axis 0
    if op == "Gemm" and input_index == 1:
        return 1 if attrs.get("transB", 0) else 0
    if op == "Gemm" and input_index == 0:
        return 0 if attrs.get("transA", 0) else 1
    if op == "MatMul" and input_index == 1:
        return 0
    return None


def op_rule(op: str) -> str | None:
    """ConvTranspose is reported but not eligible: no sign that TensorRT runs deconvolution
    with sparse kernels, and neither trtexec nor Polygraphy prunes it."""
    if op == "ConvTranspose":
        return "ConvTranspose: TensorRT has no sparse deconvolution kernels (trtexec and Polygraphy skip it)"
    return None


def rank_rule(op: str, rank: int) -> str | None:
    """MatMul/Gemm weights must be 2-D [TRTEXEC]; batched (rank > 2) MatMul weights are not."""
    if op in ("MatMul", "Gemm"):
        if rank > 2:
            return f"batched MatMul weight (rank {rank}) is not eligible"
        if rank < 2:
            return f"weight of rank {rank} is not a matrix"
    elif op == "Conv" and rank < 3:
        return f"Conv weight of rank {rank}"
    return None


def dtype_rule(stored: str, dequantized: bool) -> str | None:
    """Float weights, or int8/fp8 stored behind DequantizeLinear [TRT-DG][TRT-Q]."""
    if stored in FLOAT_DTYPES:
        return None
    if stored in QUANT_DTYPES:
        return None if dequantized else f"{stored} weight is not dequantized by DequantizeLinear"
    if stored == "uint8" and dequantized:
        return "uint8 weight: TensorRT quantizes weights to int8 or fp8 only"
    return f"weight dtype {stored} is not supported (float32/float16/bfloat16, or int8/fp8 behind DequantizeLinear)"


def zero_point_rule(zero_point: np.ndarray | None, stored: str) -> str | None:
    """TensorRT requires zero points of 0 [TRT-Q]; a pruned entry must then be stored as 0.

    With a non-zero zero point, a pruned entry would have to be stored as the zero point to
    dequantize to 0, which TensorRT does not accept anyway.
    """
    if zero_point is not None and np.any(zero_point.astype(np.float32) != 0):
        return f"{stored} weight with non-zero zero point"
    return None


def channels_rule(op: str, axis_len: int, group: int = 1) -> str | None:
    """The reduction axis must split into groups of 4 [TRT-DG]; depthwise convs cannot."""
    if op == "Conv":
        if group > 1 and axis_len == 1:
            return "depthwise (C/group = 1)"
        if axis_len % GROUP_SIZE:
            what = "C/group" if group > 1 else "C"
            return f"{what}={axis_len} is not a multiple of {GROUP_SIZE}"
        return None
    if axis_len % GROUP_SIZE:
        return f"reduction axis K={axis_len} is not a multiple of {GROUP_SIZE}"
    return None


def likely_sparse_kernel(in_features: int, out_features: int, int8: bool = True) -> bool:
    """Rough guide whether TensorRT would pick a sparse kernel for an eligible layer.

    ``in_features`` is the effective input size (C/g x kernel positions for a Conv).
    ``int8``: the layer is INT8 in, weight and out (sparse INT8 possible) [TRT-I8]; then both
    sides must be >= 256 [TRT-3849]. Otherwise it runs in FP16 (or dequantizes to it), where
    we measured 2:4 no faster than dense below LLM widths [GPU-5]: both sides >= 4096.
    """
    floor = LIKELY_SPARSE_MIN_CHANNELS if int8 else LIKELY_SPARSE_MIN_CHANNELS_FP16
    return in_features >= floor and out_features >= floor


def int8_tensor_rule(elem_type: int | None, zero_point: np.ndarray | None) -> str | None:
    """An activation or weight counts as INT8 when its Q/DQ type is int8 with zero point 0
    [TRT-Q][TRT-I8] (uint8 and fp8 do not run sparse INT8 kernels)."""
    if elem_type != onnx.TensorProto.INT8:
        name = onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"
        return f"quantized to {name}, not int8"
    if zero_point is not None and np.any(zero_point.astype(np.int32) != 0):
        return "non-zero zero point"
    return None
