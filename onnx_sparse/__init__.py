"""onnx-sparse: take an ONNX model to NVIDIA 2:4 structured sparsity and prove what that did."""

from __future__ import annotations

import logging

from onnx_sparse.errors import OnnxSparseError

__all__ = ["OnnxSparseError", "__version__"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
