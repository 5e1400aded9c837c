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
"""

from __future__ import annotations

import numpy as np

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
]

# Ops whose constant weight TensorRT may run with sparse kernels, plus ConvTranspose,
# which we report but never call eligible.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Stored weight dtypes [TRT-DG]; quantized ones only behind DequantizeLinear [POLY][TRT-Q].
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
QUANT_DTYPES = ("int8", "float8_e4m3fn")

# [TRT-3849]: both sides at least this large before sparse kernels tend to win.
LIKELY_SPARSE_MIN_CHANNELS = 256


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


def likely_sparse_kernel(in_features: int, out_features: int) -> bool:
    """Rough guide [TRT-3849]: sparse kernels tend to win only when both the effective input
    size (C/g x kernel positions) and the output channels are >= 256."""
    return in_features >= LIKELY_SPARSE_MIN_CHANNELS and out_features >= LIKELY_SPARSE_MIN_CHANNELS
