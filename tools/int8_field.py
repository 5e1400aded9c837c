"""Quantize a model with another INT8 tool (NNCF or NVIDIA ModelOpt), for tools/eval_int8.py.

Runs inside that tool's own virtual environment (neither is a dependency of onnx-sparse), e.g.::

    /work/envs/nncf/bin/python tools/int8_field.py nncf-default sparse.onnx out.onnx feeds.npz
    /work/envs/modelopt/bin/python tools/int8_field.py modelopt sparse.onnx out.onnx feeds.npz

``feeds.npz`` holds the calibration feeds as arrays named ``<feed index>/<input name>``. Each tool is
called the way its documentation shows for ONNX post-training INT8, with every calibration feed:

* ``nncf-default``: ``nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))``;
* ``nncf-transformer``: the same with ``model_type=nncf.ModelType.TRANSFORMER`` (SmoothQuant on);
* ``modelopt``: ``modelopt.onnx.quantization.quantize(..., quantize_mode="int8")`` with its default
  (entropy) calibration on the feeds of the most common input shapes (it takes one array per input).
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np


def load_feeds(path: str) -> list[dict[str, np.ndarray]]:
    data = np.load(path)
    feeds: dict[int, dict[str, np.ndarray]] = {}
    for key in data.files:
        i, name = key.split("/", 1)
        feeds.setdefault(int(i), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


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
    if tool == "modelopt":
        from modelopt.onnx.quantization import quantize

        shapes = Counter(tuple((k, v.shape) for k, v in sorted(f.items())) for f in feeds)
        common = shapes.most_common(1)[0][0]
        same = [f for f in feeds if tuple((k, v.shape) for k, v in sorted(f.items())) == common]
        data = {k: np.concatenate([f[k] for f in same]) for k in same[0]}
        quantize(onnx_path=src, quantize_mode="int8", calibration_data=data, output_path=dst)
        return 0
    raise SystemExit(f"unknown tool {tool!r}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
