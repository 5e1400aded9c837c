"""INT8 Q/DQ quantization for sparse INT8 TensorRT engines (see :mod:`onnx_sparse.quant.static`)."""

from onnx_sparse.quant.static import (
    CALIBRATION_METHODS,
    LAYER_SETS,
    LayerQuant,
    QuantizeOptions,
    QuantizeResult,
    quantize,
    quantize_file,
)

__all__ = [
    "CALIBRATION_METHODS",
    "LAYER_SETS",
    "LayerQuant",
    "QuantizeOptions",
    "QuantizeResult",
    "quantize",
    "quantize_file",
]
