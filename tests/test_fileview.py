"""onnx_sparse.fileview: asym's dense copy of an inline model reads its large weights from the model's file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse import api, fileview
from onnx_sparse.io import load_model
from onnx_sparse.passes import base

WIDTH = 128  # 128 x 256 float32 weights: 128 KB, from MIN_BYTES up


def _mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(WIDTH, 2 * WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    w2 = (rng.normal(size=(2 * WIDTH, WIDTH)) / np.sqrt(2 * WIDTH)).astype(np.float32)
    w3 = (rng.normal(size=(WIDTH, 2 * WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    b2 = rng.normal(scale=0.1, size=WIDTH).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")]
    inits.append(numpy_helper.from_array(w3, "w3"))
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])  # float_data, no raw_data
    inits.append(typed)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Relu", ["h0"], ["h1"], name="relu1"),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["h3"], name="fc2_bias"),
        helper.make_node("Relu", ["h3"], ["h4"], name="relu2"),
        helper.make_node("MatMul", ["h4", "w3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2 * WIDTH])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(64, WIDTH)).astype(np.float32)} for _ in range(n)]


def test_raw_data_offsets_point_at_each_initializers_bytes() -> None:
    model = _mlp()
    data = model.SerializeToString()
    spans = fileview.raw_data_offsets(data)
    assert spans is not None and len(spans) == len(model.graph.initializer)
    for t, span in zip(model.graph.initializer, spans, strict=True):
        if t.name == "typed":
            assert span is None
            continue
        assert span is not None
        name, offset, length = span
        assert name == t.name and data[offset : offset + length] == t.raw_data


def test_layouts_it_does_not_follow_give_none() -> None:
    data = _mlp().SerializeToString()
    assert fileview.raw_data_offsets(data[: len(data) // 2]) is None  # truncated inside a field
    assert fileview.raw_data_offsets(b"\x0f\x01\x02") is None  # a group wire type: not a model
    graph = onnx.ModelProto(graph=onnx.GraphProto(name="second")).SerializeToString()
    assert fileview.raw_data_offsets(data + graph) is None  # two graph fields: protobuf merges them
    tensor_twice = onnx.ModelProto(graph=onnx.GraphProto(initializer=[onnx.TensorProto(name="a", raw_data=b"x")]))
    extra = onnx.ModelProto(graph=onnx.GraphProto(initializer=[onnx.TensorProto(raw_data=b"y")])).SerializeToString()
    assert len(fileview.raw_data_offsets(tensor_twice.SerializeToString()) or []) == 1
    assert fileview.raw_data_offsets(tensor_twice.SerializeToString() + extra) is None


def test_the_read_only_copy_refers_to_the_unchanged_weights(tmp_path: Path, monkeypatch) -> None:
    """Unchanged large weights become references into the model file (same values); a weight
    changed since the load, one holding a float32 subnormal, and small ones are copied."""
    monkeypatch.setattr(fileview, "MIN_TOTAL", 0)
    model = _mlp()
    w3 = numpy_helper.to_array(model.graph.initializer[3]).copy()
    w3[0, 0] = np.float32(1e-40)  # a subnormal: flush_piece flushes copies, not mapped tensors
    model.graph.initializer[3].CopyFrom(numpy_helper.from_array(w3, "w3"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    mf = load_model(path)
    w2 = mf.model.graph.initializer[1]
    mf.write(w2, np.asarray(mf.read(w2)) * 0.5)  # changed in memory: the file no longer holds it
    copy = base.copy_model_file(mf, read_only=True)
    kinds = {t.name: t.data_location for t in copy.model.graph.initializer}
    assert kinds == {
        "w1": TensorProto.EXTERNAL, "w2": TensorProto.DEFAULT, "b2": TensorProto.DEFAULT,
        "w3": TensorProto.DEFAULT, "typed": TensorProto.DEFAULT,
    }  # fmt: skip
    for a, b in zip(mf.model.graph.initializer, copy.model.graph.initializer, strict=True):
        assert np.asarray(mf.read(a)).tobytes() == np.asarray(copy.read(b)).tobytes(), a.name
    assert copy.model.graph.node == mf.model.graph.node and copy.model.opset_import == mf.model.opset_import
    assert path.resolve() in copy.data_ids
    plain = base.copy_model_file(mf)  # not read only: a full copy
    assert all(t.data_location == TensorProto.DEFAULT for t in plain.model.graph.initializer)


def test_below_min_total_the_copy_is_a_plain_one(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), path)
    copy = base.copy_model_file(load_model(path), read_only=True)
    assert all(t.data_location == TensorProto.DEFAULT for t in copy.model.graph.initializer)


def test_asym_gives_the_same_bytes_with_the_dense_weights_read_from_the_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), path)
    opts = {"method": "asym", "bias_correction": True, "refit_head": True, "calibration": _feeds(), "verify": False}
    api.prune_file(path, tmp_path / "plain.onnx", **opts)
    made = []
    real = fileview.file_refs

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(fileview, "MIN_TOTAL", 0)
    monkeypatch.setattr(fileview, "file_refs", spy)
    api.prune_file(path, tmp_path / "viewed.onnx", **opts)
    assert made and made[0] is not None  # the dense model read w1, w2, w3 from the file
    refs = [t.name for t in made[0][0].graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert refs == ["w1", "w2", "w3"]
    assert (tmp_path / "viewed.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()


@pytest.mark.parametrize("changed", [False, True])
def test_a_file_changed_after_the_load_is_not_referred_to(tmp_path: Path, monkeypatch, changed: bool) -> None:
    monkeypatch.setattr(fileview, "MIN_TOTAL", 0)
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), path)
    mf = load_model(path)
    if changed:  # another file in its place: not the one loaded
        path.unlink()
        onnx.save(_mlp(seed=3), path)
    copy = base.copy_model_file(mf, read_only=True)
    refs = [t.name for t in copy.model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert refs == ([] if changed else ["w1", "w2", "w3"])


def test_the_dense_runner_still_adopts_the_stages_before_the_first_pruned_layer(tmp_path: Path, monkeypatch) -> None:
    """A constant read before the first pruned layer is held inline by the pruned model and referred
    to in the file by the dense copy: the same bytes, so the dense runner still takes the pruned
    runner's values (StagedRunner.mirror) instead of running a session of its own."""
    from onnx_sparse.calib.capture import StagedRunner

    monkeypatch.setattr(fileview, "MIN_TOTAL", 0)
    model = _mlp()
    pos = np.random.default_rng(7).normal(size=(WIDTH, WIDTH)).astype(np.float32)  # 64 KB
    model.graph.initializer.append(numpy_helper.from_array(pos, "pos"))
    model.graph.node.insert(0, helper.make_node("Add", ["x", "pos"], ["xp"], name="add_pos"))
    model.graph.node[1].input[0] = "xp"
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [WIDTH, WIDTH]))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    feeds = [{"x": f["x"][:WIDTH].repeat(2, axis=0)} for f in _feeds()]
    mf = load_model(path)
    dense = base.copy_model_file(mf, read_only=True)
    assert {t.name for t in dense.model.graph.initializer if t.data_location == TensorProto.EXTERNAL} >= {"pos"}
    runner, follower = StagedRunner(mf, feeds), StagedRunner(dense, feeds)
    assert follower.mirror(runner, ["xp"]) is not None
    opts = {"method": "asym", "bias_correction": True, "calibration": feeds, "verify": False}
    adopted = []
    real = StagedRunner.adopt
    monkeypatch.setattr(StagedRunner, "adopt", lambda self, *a: adopted.append(1) or real(self, *a))
    api.prune_file(path, tmp_path / "viewed.onnx", **opts)
    assert adopted
    monkeypatch.setattr(fileview, "MIN_TOTAL", 1 << 62)
    api.prune_file(path, tmp_path / "plain.onnx", **opts)
    assert (tmp_path / "viewed.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
