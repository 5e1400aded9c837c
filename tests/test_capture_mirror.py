"""asym's dense runner takes the pruned runner's values while the two models compute the same
(:meth:`StagedRunner.mirror` / :meth:`StagedRunner.adopt`): no second session for the stages
before the first pruned layer, and the same output bytes as running both."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper as h
from onnx import numpy_helper as nh
from test_calibrated_models import mlp, mlp_data, run

from onnx_sparse import api
from onnx_sparse.calib import capture
from onnx_sparse.calib.capture import StagedRunner
from onnx_sparse.io import ModelFile
from onnx_sparse.passes.base import copy_model_file


def _behind_a_mul() -> onnx.ModelProto:
    """The MLP with ``x * s`` (a constant) before fc1: its first pruned layer is not at the input."""
    m = mlp()
    fc1 = next(n for n in m.graph.node if n.name == "fc1")
    fc1.input[0] = "xs"
    m.graph.node.insert(0, h.make_node("Mul", ["x", "s"], ["xs"], name="scale"))
    m.graph.initializer.append(nh.from_array(np.linspace(0.5, 1.5, 32, dtype=np.float32), "s"))
    onnx.checker.check_model(m)
    return m


def test_dense_runner_adopts_the_stages_before_the_first_pruned_layer() -> None:
    feeds = mlp_data(0, 3)
    mf = ModelFile(_behind_a_mul())
    dense = copy_model_file(mf)
    runner, follower = StagedRunner(mf, feeds), StagedRunner(dense, feeds)
    piece = follower.mirror(runner, ["xs"])
    assert piece is not None and [n.name for n in piece.nodes] == ["scale"]
    got = [v["xs"] for _, v in runner.iter_stage(["xs"])]
    follower.adopt(runner, piece)
    assert all(a is b for a, b in zip(follower.cache["xs"], runner.cache["xs"], strict=True))
    for g, f in zip(got, feeds, strict=True):
        np.testing.assert_array_equal(g, f["x"] * np.linspace(0.5, 1.5, 32, dtype=np.float32))
    # fc1's weight is written in the pruned model: the next stage is the dense model's own
    w1 = next(t for t in mf.model.graph.initializer if t.name == "w1")
    mf.write(w1, np.zeros((32, 64), np.float32))
    assert follower.mirror(runner, ["a1"]) is None
    for _ in runner.iter_stage(["a1"]):
        pass
    # the dense runner computes fc1 on the adopted frontier, as the dense model does
    m = _behind_a_mul()
    m.graph.output.add().name = "a1"
    want = run(m, feeds, output=1)
    for (_, v), w in zip(follower.iter_stage(["a1"]), want, strict=True):
        np.testing.assert_allclose(v["a1"], w, rtol=1e-6)


def test_mirror_refuses_what_differs() -> None:
    feeds = mlp_data(0, 2)
    mf = ModelFile(_behind_a_mul())
    # a constant the piece reads was written in the pruned model
    dense = copy_model_file(mf)
    s = next(t for t in mf.model.graph.initializer if t.name == "s")
    mf.write(s, np.ones(32, np.float32))
    assert StagedRunner(dense, feeds).mirror(StagedRunner(mf, feeds), ["xs"]) is None
    # other feeds
    mf = ModelFile(_behind_a_mul())
    other = [dict(f) for f in feeds]
    assert StagedRunner(copy_model_file(mf), other).mirror(StagedRunner(mf, feeds), ["xs"]) is None
    # frontier values that are not the very same arrays
    mf = ModelFile(_behind_a_mul())
    runner, follower = StagedRunner(mf, feeds), StagedRunner(copy_model_file(mf), feeds)
    for r in (runner, follower):
        for _ in r.iter_stage(["xs"]):
            pass
    assert follower.mirror(runner, ["a1"]) is None


def test_asym_prune_same_bytes_with_one_session_less(monkeypatch) -> None:
    model, feeds = _behind_a_mul(), mlp_data(0, 8)
    built = []
    original = capture.model_session

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(capture, "model_session", counting)

    def prune() -> tuple[str, int]:
        built.clear()
        out = api.prune(model, method="asym", calibration=feeds)
        return hashlib.sha256(out.SerializeToString(deterministic=True)).hexdigest(), len(built)

    mirrored, n_mirrored = prune()
    monkeypatch.setattr(StagedRunner, "mirror", lambda self, leader, targets: None)
    plain, n_plain = prune()
    assert mirrored == plain
    assert n_mirrored == n_plain - 1  # the dense model's piece up to fc1's input was not built
