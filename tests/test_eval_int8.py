"""tools/eval_int8.py's targets, table and readiness measure (the evaluation itself is a long CPU run, not a test)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import case_path

from onnx_sparse import api
from onnx_sparse.calib.data import random_feeds
from onnx_sparse.quant import QuantizeOptions, quantize
from tools import eval_int8


def test_verdict() -> None:
    metrics = {"dense": 1.0, "sparse": 0.95, "int8": 0.945, "nncf-default": 0.90, "modelopt": 0.96}
    ready = {"int8": 1.0, "nncf-default": 1.0, "modelopt": 0.2}
    got = eval_int8.verdict(metrics, ready)
    assert got["within_tolerance"] and got["ready_enough"] and got["beaten_by"] == [] and got["meets"]
    got = eval_int8.verdict(metrics | {"int8": 0.93}, ready)  # 0.02 below sparse
    assert not got["within_tolerance"] and not got["meets"]
    got = eval_int8.verdict(metrics, ready | {"modelopt": 1.0})  # as ready and better: beaten
    assert got["beaten_by"] == ["modelopt"] and not got["meets"]
    assert not eval_int8.verdict(metrics, ready | {"int8": 0.85})["ready_enough"]


def test_table() -> None:
    row = {"model": "m", "metric_name": "top1", "metrics": {"dense": 1.0, "sparse": 0.8, "int8": 0.79},
           "ready": {"sparse": 0.0, "int8": 0.95}, "zeros_kept": {"sparse": True, "int8": True}}  # fmt: skip
    lines = eval_int8.format_table([row]).splitlines()
    assert lines[0] == "| model | metric | sparse | int8 |" and lines[2] == "| m | top1 | 0.8000 (0%) | 0.7900 (95%) |"


def test_table_orders_target_cosine_variants_by_target() -> None:
    metrics = {"sparse": 0.8, "int8@0.999": 0.8, "int8": 0.7, "int8@0.995": 0.75}
    row = {"model": "m", "metric_name": "top1", "metrics": metrics, "ready": dict.fromkeys(metrics, 0.5),
           "zeros_kept": dict.fromkeys(metrics, True)}  # fmt: skip
    head = eval_int8.format_table([row]).splitlines()[0]
    assert head == "| model | metric | sparse | int8 | int8@0.995 | int8@0.999 |"
    assert eval_int8._target_variant(0.995) == "int8@0.995"


def test_readiness_counts_int8_layers_and_sees_moved_zeros() -> None:
    sparse = api.prune(onnx.load(case_path("mlp.onnx")))
    feeds = random_feeds(sparse, seed=0, iterations=4, input_shapes={"x": [2, 64], "x3": [2, 2, 16]}, warn=False)
    q = quantize(sparse, feeds, QuantizeOptions(target_cosine=None)).model.model
    assert eval_int8.readiness(sparse, None)["ready"] == 0.0
    got = eval_int8.readiness(q, sparse)
    assert got["ready"] == 1.0 and got["zeros_kept"]
    moved = onnx.ModelProto()
    moved.CopyFrom(q)
    t = next(t for t in moved.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2)
    a = onnx.numpy_helper.to_array(t).copy()
    a[a == 0] = 1
    t.CopyFrom(onnx.numpy_helper.from_array(a.astype(np.int8), t.name))
    assert not eval_int8.readiness(moved, sparse)["zeros_kept"]
