"""``python -m onnx_sparse`` runs the CLI."""

import sys

from onnx_sparse.cli.main import main

sys.exit(main())
