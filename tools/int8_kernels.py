"""``prune --int8`` (defaults) on one real model, judged two ways: with onnxruntime's fused INT8 CPU
kernels (its default graph optimizations) and with the Q/DQ run as written (no optimizations).

On CPUs without VNNI the fused kernels' u8 x s8 products saturate 16-bit sums, which GPU engines do
not; the second figure is the one to compare with a TensorRT engine. Prints one JSON line: the FP32
default prune's metric, both INT8 metrics, and both prunes' seconds (tools/RESULTS_INT8.md).

Usage::

    python tools/int8_kernels.py ppocr_cls
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnx_sparse import Recipe, api, runtime  # noqa: E402
from tools import eval_real, realdata  # noqa: E402


def main(name: str) -> dict:
    data = eval_real.load(name, quick=False)
    t0 = time.perf_counter()
    fp32 = api.prune(data.dense, Recipe(), calibration=data.calibration)
    t1 = time.perf_counter()
    q = api.prune(data.dense, Recipe(int8=True), calibration=data.calibration)
    t2 = time.perf_counter()
    sess = runtime.session(q, optimize=False)
    return {
        "model": name,
        "fp32": realdata.metric(name, data.dense_evaluation, realdata.run(fp32, data.evaluation))["metric"],
        "int8_fused": realdata.metric(name, data.dense_evaluation, realdata.run(q, data.evaluation))["metric"],
        "int8_as_written": realdata.metric(
            name, data.dense_evaluation, [sess.run(None, dict(f)) for f in data.evaluation]
        )["metric"],
        "fp32_s": round(t1 - t0, 1),
        "int8_s": round(t2 - t1, 1),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
