"""onnx_sparse.serialize: a model's protobuf bytes written piece by piece, the same bytes as protobuf's."""

from __future__ import annotations

import builtins
import io as pyio
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse import io, serialize


class _Recorder(pyio.BytesIO):
    """A file that remembers the size of every write."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, data) -> int:  # type: ignore[override]
        self.sizes.append(len(data))
        return super().write(data)


def _weights_model(n: int = 4, size: int = 64 << 10) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(n):
        inits.append(numpy_helper.from_array(rng.normal(size=(size // 4 // 16, 16)).astype(np.float32).T, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Transpose", [f"h{i}"], [f"t{i}"], name=f"tr{i}", perm=[1, 0]))
        prev = f"t{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size // 4 // 16, 16])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)],
        inits,
        doc_string="weights",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.metadata_props.add(key="k", value="v")
    return model


def _every_model() -> list[Path]:
    return sorted(MODELS_DIR.glob("**/*.onnx"))


@pytest.mark.parametrize("path", _every_model(), ids=lambda p: p.name)
def test_the_bytes_and_size_are_protobufs(path: Path) -> None:
    model = onnx.load(path, load_external_data=False)
    want = model.SerializeToString()
    f = _Recorder()
    assert serialize.write_message(f, model) == len(want)
    assert f.getvalue() == want
    assert serialize.message_size(model) == model.ByteSize()


def test_every_message_type_written_field_by_field_gives_the_same_bytes(monkeypatch) -> None:
    """The field order holds at every level (nodes, attributes, subgraphs, tensors, types), not only
    the two levels streamed by default."""
    every = frozenset(d.full_name for d in onnx.ModelProto.DESCRIPTOR.file.message_types_by_name.values())
    every |= {f"onnx.TypeProto.{n}" for n in ("Tensor", "Sequence", "Map", "Optional", "SparseTensor")}
    every |= {"onnx.TensorShapeProto.Dimension", "onnx.TensorProto.Segment"}
    monkeypatch.setattr(serialize, "STREAMED", every)
    for path in [*_every_model(), None]:
        model = _weights_model() if path is None else onnx.load(path, load_external_data=False)
        f = _Recorder()
        serialize.write_message(f, model)
        assert f.getvalue() == model.SerializeToString(), path


def test_pieces_are_no_larger_than_one_tensor() -> None:
    model = _weights_model()
    f = _Recorder()
    serialize.write_message(f, model)
    largest = max(t.ByteSize() for t in model.graph.initializer)
    assert f.getvalue() == model.SerializeToString()
    assert max(f.sizes) <= largest < len(f.getvalue()) // 3


def test_unknown_fields_are_kept() -> None:
    """A message holding fields protobuf does not know is serialized whole, unknown fields included."""
    model = onnx.ModelProto.FromString(_weights_model().SerializeToString() + b"\xf8\x07\x05")
    graph = onnx.GraphProto.FromString(model.graph.SerializeToString() + b"\xf8\x07\x06")
    model.graph.CopyFrom(graph)
    f = _Recorder()
    serialize.write_message(f, model)
    assert f.getvalue() == model.SerializeToString()
    assert serialize.message_size(model) == model.ByteSize()


def test_the_save_writes_an_inline_model_piece_by_piece(tmp_path: Path, monkeypatch) -> None:
    """save_model never holds the whole serialization: no write is larger than one tensor, and the
    file is protobuf's bytes."""
    model = _weights_model()
    src = tmp_path / "in.onnx"
    src.write_bytes(model.SerializeToString())
    files: list[_Recorder] = []
    real_open = builtins.open

    def recording_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and str(file).endswith("out.onnx"):
            rec = _Recorder()
            files.append(rec)
            inner_write = f.write

            def write(data):
                rec.write(data)
                return inner_write(data)

            f.write = write
        return f

    monkeypatch.setattr(io, "open", recording_open, raising=False)
    io.save_model(io.load_model(src), tmp_path / "out.onnx", verify=False)
    assert (tmp_path / "out.onnx").read_bytes() == src.read_bytes()
    (rec,) = files
    largest = max(t.ByteSize() for t in model.graph.initializer)
    assert max(rec.sizes) <= largest < src.stat().st_size // 3
