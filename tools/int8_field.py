"""Quantize a model with another INT8 tool (NNCF or NVIDIA ModelOpt), for tools/eval_int8.py.

Runs inside that tool's own virtual environment (neither is a dependency of onnx-sparse), e.g.::

    /work/envs/nncf/bin/python tools/int8_field.py nncf-default sparse.onnx out.onnx feeds.npz
    /work/envs/modelopt/bin/python tools/int8_field.py modelopt sparse.onnx out.onnx feeds.npz
    /work/envs/modelopt/bin/python tools/int8_field.py modelopt-fp32 sparse.onnx out.onnx feeds.npz

``feeds.npz`` holds the calibration feeds as arrays named ``<feed index>/<input name>``. Each tool is
called the way its documentation shows for ONNX post-training INT8, with every calibration feed:

* ``nncf-default``: ``nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))``;
* ``nncf-transformer``: the same with ``model_type=nncf.ModelType.TRANSFORMER`` (SmoothQuant on);
* ``modelopt``: ``modelopt.onnx.quantization.quantize(..., quantize_mode="int8")`` with its defaults
  (entropy calibration, everything not INT8 converted to FP16) on every calibration feed through a
  ``CalibrationDataReader`` (its ``calibration_data`` takes one array per input, so feeds of different
  shapes could not all be given that way); ``calibration_eps=["cpu"]`` (no GPU here: its default list
  also tries CUDA and TensorRT, logs that they cannot load, and calibrates on the CPU all the same);
* ``modelopt-fp32``: the same with ``high_precision_dtype="fp32"``: the INT8 alone, the rest kept in
  FP32 as every other variant keeps it (ModelOpt's FP16 conversion turns a float32-min attention-mask
  constant into -inf, which by itself takes MiniLM's sentence cosine to 0).
"""

from __future__ import annotations

import sys

import numpy as np


def load_feeds(path: str) -> list[dict[str, np.ndarray]]:
    data = np.load(path)
    feeds: dict[int, dict[str, np.ndarray]] = {}
    for key in data.files:
        i, name = key.split("/", 1)
        feeds.setdefault(int(i), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


def _reader(feeds: list[dict[str, np.ndarray]]) -> object:
    """An onnxruntime ``CalibrationDataReader`` over ``feeds`` (ModelOpt also calls ``get_first``)."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(feeds):
                return None
            self.i += 1
            return dict(feeds[self.i - 1])

        def get_first(self) -> dict[str, np.ndarray]:
            return dict(feeds[0])

        def rewind(self) -> None:
            self.i = 0

    return Reader()


def main(tool: str, src: str, dst: str, feeds_path: str) -> int:
    import onnx

    feeds = load_feeds(feeds_path)
    if tool.startswith("nncf"):
        import nncf

        model = onnx.load(src)
        kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if tool == "nncf-transformer" else {}
        out = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds), **kwargs)
        onnx.save(out, dst)
        return 0
    if tool in ("modelopt", "modelopt-fp32"):
        from modelopt.onnx.quantization import quantize

        precision = "fp32" if tool == "modelopt-fp32" else "fp16"
        quantize(onnx_path=src, quantize_mode="int8", calibration_data_reader=_reader(feeds), output_path=dst,
                 calibration_eps=["cpu"], high_precision_dtype=precision)  # fmt: skip
        return 0
    raise SystemExit(f"unknown tool {tool!r}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
