#!/usr/bin/env bash
# Print the environment (GPU, driver, library versions), then run tools/gpu_check.py with the
# given arguments, under a hard time limit (GPU_CHECK_TIMEOUT seconds, default 175).
#
#   tools/run_gpu_check.sh                 # synthetic BERT/LLaMA shapes, tokens 2048 and 8192
#   tools/run_gpu_check.sh model.onnx --tokens 512
#   PYTHON=.venv/bin/python tools/run_gpu_check.sh --no-trt
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -srm)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv || nvidia-smi
else
    echo "nvidia-smi: not found"
fi
"$PY" - <<'EOF'
import importlib
import sys

print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "numpy", "onnx", "onnxruntime", "polygraphy", "tensorrt"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:12s} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # missing, or a broken install
        print(f"{name:12s} not available ({type(exc).__name__})")
try:
    import torch

    print("cuda available:", torch.cuda.is_available(), "| torch CUDA:", torch.version.cuda)
except Exception:
    pass
EOF
echo "== tools/gpu_check.py $*"
exec timeout --signal=INT --kill-after=5 "${GPU_CHECK_TIMEOUT:-175}" "$PY" tools/gpu_check.py "$@"
