"""onnx-sparse: take an ONNX model to NVIDIA 2:4 structured sparsity and prove what that did."""

from __future__ import annotations

import logging

from onnx_sparse.errors import OnnxSparseError

__all__ = ["OnnxSparseError", "Recipe", "__version__"]
__version__ = "0.1.0"

from onnx_sparse.recipe import Recipe  # noqa: E402  (after __version__, which it reads)

logging.getLogger(__name__).addHandler(logging.NullHandler())
