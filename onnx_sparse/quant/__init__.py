"""INT8 Q/DQ quantization for sparse INT8 TensorRT engines (see :mod:`onnx_sparse.quant.static`)."""

from onnx_sparse.quant.static import (
    CALIBRATION_METHODS,
    DEFAULT_TARGET_COSINE,
    LAYER_SETS,
    LayerQuant,
    QuantizeOptions,
    QuantizeResult,
    apply_rescaling,
    candidates,
    capture_rounding,
    finish,
    input_rescaling,
    prepare,
    quantize,
    quantize_file,
    smooth_model,
)

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_TARGET_COSINE",
    "LAYER_SETS",
    "LayerQuant",
    "QuantizeOptions",
    "QuantizeResult",
    "apply_rescaling",
    "candidates",
    "capture_rounding",
    "finish",
    "input_rescaling",
    "prepare",
    "quantize",
    "quantize_file",
    "smooth_model",
]
