"""tools/eval_int8.py's targets, table and readiness measure (the evaluation itself is a long CPU run, not a test)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import case_path

from onnx_sparse import api
from onnx_sparse.calib.data import random_feeds
from onnx_sparse.quant import QuantizeOptions, quantize
from tools import eval_int8, realdata


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


def test_sign_test_counts_the_split_and_its_exact_p_value() -> None:
    ours = np.array([1.0, 1, 1, 0, 0.5, 0.5])
    theirs = np.array([0.0, 0, 0, 1, 0.5, 0.5])
    got = eval_int8.sign_test(ours, theirs)
    # 3 better, 1 worse, 2 ties dropped: P(X <= 1 | n=4) = 5/16, two-sided 10/16
    assert (got["better"], got["worse"]) == (3, 1)
    assert got["p"] == pytest.approx(10 / 16)
    assert eval_int8.sign_test(ours, ours) == {"better": 0, "worse": 0, "p": 1.0}
    lopsided = eval_int8.sign_test(np.ones(12), np.zeros(12))
    assert lopsided["p"] == pytest.approx(2 / 2**12)


def test_per_sample_scores_average_to_the_headline_metric() -> None:
    rng = np.random.default_rng(0)
    for name, shape in (("ppocr_cls", (4, 2)), ("magika", (3, 5))):
        dense = [[rng.random(shape).astype(np.float32)] for _ in range(3)]
        pruned = [[d[0] + rng.normal(0, 0.2, shape).astype(np.float32)] for d in dense]
        scores = realdata.per_sample(name, dense, pruned)
        assert scores.size == 3 * shape[0]
        assert scores.mean() == pytest.approx(realdata.metric(name, dense, pruned)["metric"])
    dense = [[rng.random((2, 1, 8, 8)).astype(np.float32)] for _ in range(2)]
    pruned = [[d[0] * rng.uniform(0.8, 1.2, d[0].shape).astype(np.float32)] for d in dense]
    scores = realdata.per_sample("ppocr_det", dense, pruned)
    assert scores.size == 4 and scores.mean() == pytest.approx(realdata.metric("ppocr_det", dense, pruned)["metric"])


def test_worst_samples_lists_the_lowest_scores_with_their_keys() -> None:
    scores = np.array([0.9, 0.0, 1.0, 0.5, 0.0])
    keys = ["a", "moon", "b", "c", "moon:crop"]
    assert eval_int8.worst_samples(scores, keys, 3) == [("moon", 0.0), ("moon:crop", 0.0), ("c", 0.5)]
    assert eval_int8.worst_samples(scores, keys, 0) == []
