"""Tests for onnx_sparse.io: clear load errors, external data, atomic verified saves."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import case_path, error_lines, resident_kb, sha256
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse import io
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph.locate import find_weight_sites

# --------------------------------------------------------------------------- load errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OnnxSparseError, match="no such file") as err:
        io.load_model(tmp_path / "nope.onnx")
    assert "nope.onnx" in err.value.message and err.value.hint


def test_folder(tmp_path: Path) -> None:
    with pytest.raises(OnnxSparseError, match="not a file") as err:
        io.load_model(tmp_path)
    assert "folder" in err.value.hint


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(OnnxSparseError, match="not a valid ONNX model"):
        io.load_model(path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n")
    with pytest.raises(OnnxSparseError, match="not a valid ONNX model"):
        io.load_model(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(OnnxSparseError, match="not a valid ONNX model"):
        io.load_model(path)


def test_truncated_file(tmp_path: Path) -> None:
    data = case_path("conv_bn_folded.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxSparseError, match="not a valid ONNX model") as err:
        io.load_model(path)
    assert "truncated" in err.value.hint
    assert "\n" not in str(err.value)  # one line


def _save_external(src: Path, dst: Path, location: str = "weights.bin", threshold: int = 1024) -> onnx.ModelProto:
    model = onnx.load(src)
    onnx.save(
        onnx.load(src),  # onnx.save moves the data out of the proto it is given
        dst,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=threshold,
    )
    return model


def _data_name(model_path: Path) -> str:
    """The one data file a saved model reads."""
    model = onnx.load(model_path, load_external_data=False)
    names = {e.value for t in io.iter_tensors(model) for e in t.external_data if e.key == "location"}
    assert len(names) == 1, names
    return names.pop()


def test_missing_external_data(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _save_external(case_path("conv_bn_folded.onnx"), path)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(OnnxSparseError, match="is missing") as err:
        io.load_model(path)
    assert "weights.bin" in err.value.message and ".data" in err.value.hint


def test_short_external_data(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _save_external(case_path("conv_bn_folded.onnx"), path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(OnnxSparseError, match="too short") as err:
        io.load_model(path)
    assert "truncated" in err.value.hint


def test_read_external_without_a_base_folder_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _save_external(case_path("conv_bn_folded.onnx"), path)
    model = onnx.load(path, load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    with pytest.raises(OnnxSparseError, match="not loaded from a file"):
        io.read_tensor(t, None)


# --------------------------------------------------------------------------- external data


def test_external_data_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    original = _save_external(case_path("conv_bn_folded.onnx"), path)
    mf = io.load_model(path)
    assert mf.base_dir == tmp_path.resolve()
    external = {t.name for t in mf.model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"conv1.weight", "conv2.weight"}  # conv1.bias (128 bytes) stays inline
    for t in mf.model.graph.initializer:
        want = numpy_helper.to_array(next(o for o in original.graph.initializer if o.name == t.name))
        got = io.read_tensor(t, mf.base_dir)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable  # read-only: nobody writes into the mmap
        np.testing.assert_array_equal(io.read_tensor(t, mf.base_dir, mmap=False), want)


def test_save_keeps_external_external_and_inline_inline(tmp_path: Path) -> None:
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    _save_external(case_path("conv_bn_folded.onnx"), src)
    before = sha256(src.parent / "weights.bin")
    mf = io.load_model(src)
    out = tmp_path / "out" / "sparse.onnx"
    out.parent.mkdir()
    io.save_model(mf, out)
    data_name = _data_name(out)
    assert re.fullmatch(r"sparse\.onnx\.[0-9a-f]{16}\.data", data_name)
    assert sorted(p.name for p in out.parent.iterdir()) == ["sparse.onnx", data_name]
    saved = onnx.load(out, load_external_data=False)
    locations = {t.name: t.data_location for t in saved.graph.initializer}
    assert locations == {
        "conv1.weight": TensorProto.EXTERNAL,
        "conv1.bias": TensorProto.DEFAULT,
        "conv2.weight": TensorProto.EXTERNAL,
    }
    for t in saved.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            assert {e.key: e.value for e in t.external_data}["location"] == data_name
    full = onnx.load(out)
    ref = onnx.load(case_path("conv_bn_folded.onnx"))
    for a, b in zip(full.graph.initializer, ref.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert sha256(src.parent / "weights.bin") == before  # the input's data file is untouched


def test_write_tensor_on_external_data_is_saved_into_the_new_file(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    _save_external(case_path("conv_bn_folded.onnx"), src)
    mf = io.load_model(src)
    t = next(t for t in mf.model.graph.initializer if t.name == "conv2.weight")
    new = np.zeros((64, 32, 1, 1), np.float32)
    mf.write(t, new)
    np.testing.assert_array_equal(mf.read(t), new)
    out = tmp_path / "o.onnx"
    io.save_model(mf, out)
    saved = onnx.load(out)
    got = numpy_helper.to_array(next(t for t in saved.graph.initializer if t.name == "conv2.weight"))
    np.testing.assert_array_equal(got, new)
    np.testing.assert_array_equal(
        numpy_helper.to_array(onnx.load(src).graph.initializer[0]),
        numpy_helper.to_array(onnx.load(case_path("conv_bn_folded.onnx")).graph.initializer[0]),
    )


def test_a_large_new_value_waits_on_disk_until_the_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewritten external weight is not a second copy in memory: its bytes go to an unlinked
    file in ONNX_SPARSE_SPILL_DIR at once, are read back through a memory map, and are streamed
    into the output at the save; a small one stays in memory."""
    src = tmp_path / "m.onnx"
    _save_external(case_path("conv_bn_folded.onnx"), src)
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setenv("ONNX_SPARSE_SPILL_DIR", str(spill))
    monkeypatch.setattr(io, "SCRATCH_FROM", 10_000)
    mf = io.load_model(src)
    big = next(t for t in mf.model.graph.initializer if t.name == "conv1.weight")  # 18 KB
    small = next(t for t in mf.model.graph.initializer if t.name == "conv2.weight")  # 8 KB
    want = np.arange(32 * 16 * 9, dtype=np.float32).reshape(32, 16, 3, 3)
    new_big, new_small = want.copy(), np.full((64, 32, 1, 1), 0.5, np.float32)
    mf.write(big, new_big)
    mf.write(small, new_small)
    new_big[:] = -1  # the caller's array is not what is kept
    kept = mf.read(big)
    assert isinstance(kept, np.memmap) and not kept.flags.writeable
    assert not isinstance(mf.read(small), np.memmap)
    np.testing.assert_array_equal(kept, want)
    assert list(spill.iterdir()) == []  # unlinked at once: nothing is left behind
    out = tmp_path / "o.onnx"
    io.save_model(mf, out)
    saved = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    np.testing.assert_array_equal(saved["conv1.weight"], want)
    np.testing.assert_array_equal(saved["conv2.weight"], new_small)


def test_write_tensor_checks_shape_and_dtype() -> None:
    t = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    with pytest.raises(ValueError, match="shape"):
        io.write_tensor(t, np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        io.write_tensor(t, np.ones((4, 4), np.float16))
    io.write_tensor(t, np.full((4, 4), 2.0, np.float32))
    np.testing.assert_array_equal(io.read_tensor(t), np.full((4, 4), 2.0))


def test_read_tensor_typed_fields_and_bfloat16() -> None:
    t = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0])  # float_data, no raw_data
    np.testing.assert_array_equal(io.read_tensor(t), [[1, 2], [3, 4]])
    b = numpy_helper.from_array(np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16), "b")
    got = io.read_tensor(b)
    assert got.dtype == ml_dtypes.bfloat16 and got.tolist() == [1.5, -2.0]


# --------------------------------------------------------------------------- atomic save


def test_save_is_atomic_when_verification_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path, reference=None):
        raise OnnxSparseError("output does not pass onnx.checker: injected")

    monkeypatch.setattr(io, "verify_model", refuse)
    for external in (False, True):
        mf = io.load_model(case_path("conv_bn_folded.onnx"))
        with pytest.raises(OnnxSparseError, match="injected"):
            io.save_model(mf, tmp_path / "out.onnx", external=external)
        assert list(tmp_path.iterdir()) == [], f"left behind (external={external})"


def test_save_keeps_an_existing_output_when_verification_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    monkeypatch.setattr(io, "verify_model", lambda path, reference=None: (_ for _ in ()).throw(OnnxSparseError("no")))
    with pytest.raises(OnnxSparseError):
        io.save_model(io.load_model(case_path("mlp.onnx")), out)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_save_into_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OnnxSparseError, match="output folder does not exist"):
        io.save_model(io.load_model(case_path("mlp.onnx")), tmp_path / "no" / "out.onnx")


def test_save_verifies_the_output(tmp_path: Path) -> None:
    mf = io.load_model(case_path("mlp.onnx"))
    mf.model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(OnnxSparseError, match="onnx.checker|onnxruntime"):
        io.save_model(mf, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []
    io.save_model(io.load_model(case_path("mlp.onnx")), tmp_path / "good.onnx")  # no-op case
    assert (tmp_path / "good.onnx").read_bytes() == case_path("mlp.onnx").read_bytes()


def test_save_inline_model_round_trips_bytes(tmp_path: Path) -> None:
    for name in ("custom_domain.onnx", "if_subgraph.onnx", "constant_nodes.onnx"):
        out = tmp_path / name
        io.save_model(io.load_model(case_path(name)), out)
        assert out.read_bytes() == case_path(name).read_bytes(), name


# --------------------------------------------------------------------------- unsupported dtypes


def _weight_model(tensor: onnx.TensorProto, dequantize: bool) -> onnx.ModelProto:
    nodes, name = [], tensor.name
    inits = [tensor]
    if dequantize:
        inits.append(numpy_helper.from_array(np.array(0.1, np.float32), "s"))
        nodes.append(helper.make_node("DequantizeLinear", [tensor.name, "s"], ["wd"], name="dq"))
        name = "wd"
    nodes.append(helper.make_node("MatMul", ["x", name], ["y"], name="mm"))
    k = tensor.dims[0]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _int4_model() -> onnx.ModelProto:
    w = np.random.default_rng(0).integers(-7, 8, size=(16, 8)).astype(ml_dtypes.int4)
    return _weight_model(numpy_helper.from_array(w, "w4"), dequantize=True)


def test_int4_weight_has_a_clear_reason() -> None:
    (s,) = find_weight_sites(_int4_model())
    assert not s.eligible and "int4" in s.reason and "not supported" in s.reason


def test_int4_weight_is_read_unpacked(tmp_path: Path) -> None:
    model = _int4_model()
    want = numpy_helper.to_array(model.graph.initializer[0])
    got = io.read_tensor(model.graph.initializer[0])
    assert got.shape == (16, 8)
    np.testing.assert_array_equal(got.astype(np.int8), want.astype(np.int8))
    # External: the packed bytes are half the element count.
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=0)
    mf = io.load_model(path)
    t = next(t for t in mf.model.graph.initializer if t.name == "w4")
    np.testing.assert_array_equal(io.read_tensor(t, mf.base_dir).astype(np.int8), want.astype(np.int8))


def test_inspect_reports_an_int4_weight(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "int4.onnx"
    onnx.save(_int4_model(), path)
    rc, out = run_cli(["inspect", path])
    assert rc == 0, out
    assert "int4" in out and "not supported" in out


def test_string_weight_has_a_clear_reason(tmp_path: Path, run_cli) -> None:
    t = helper.make_tensor("ws", TensorProto.STRING, [4, 4], [b"a"] * 16)
    model = _weight_model(t, dequantize=False)
    (s,) = find_weight_sites(model)
    assert not s.eligible and "string" in s.reason and "not supported" in s.reason
    path = tmp_path / "str.onnx"
    onnx.save(model, path)
    rc, out = run_cli(["inspect", path])
    assert rc == 0 and not error_lines(out), out


def test_unknown_data_type_is_an_onnx_sparse_error() -> None:
    t = TensorProto(name="odd", data_type=999, dims=[4])
    with pytest.raises(OnnxSparseError, match="unsupported data type"):
        io.tensor_dtype(t)


def test_finalize_inline_drops_external_markers(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _save_external(case_path("conv_bn_folded.onnx"), path)
    mf = io.load_model(path)
    for t in io.iter_tensors(mf.model):
        if t.data_location == TensorProto.EXTERNAL:
            io.write_tensor(t, np.array(io.read_tensor(t, mf.base_dir)))
    io.finalize_inline(mf.model)
    assert all(len(t.external_data) == 0 for t in io.iter_tensors(mf.model))
    shutil.rmtree(tmp_path)
    onnx.checker.check_model(mf.model, full_check=True)


def test_save_never_replaces_the_inputs_data_file(tmp_path: Path) -> None:
    """The input's data file is named like the output's old-style data file: it stays untouched,
    because a saved model's data file is named after its content (``out.onnx.<hash>.data``)."""
    src = tmp_path / "m.onnx"
    _save_external(case_path("conv_bn_folded.onnx"), src, location="out.onnx.data")
    digests = {p.name: sha256(p) for p in tmp_path.iterdir()}
    io.save_model(io.load_model(src), tmp_path / "out.onnx")
    assert {p.name: sha256(p) for p in tmp_path.iterdir() if p.name in digests} == digests
    assert _data_name(tmp_path / "out.onnx") != "out.onnx.data"
    ref = onnx.load(case_path("conv_bn_folded.onnx"))
    for path in (src, tmp_path / "out.onnx"):
        for a, b in zip(onnx.load(path).graph.initializer, ref.graph.initializer, strict=True):
            np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    # Saving over a model (in place) replaces its data file by a new one and removes the old one.
    io.save_model(io.load_model(src), tmp_path / "other.onnx")
    first = _data_name(tmp_path / "other.onnx")
    mf = io.load_model(tmp_path / "other.onnx")
    t = mf.model.graph.initializer[0]
    mf.write(t, np.zeros_like(mf.read(t)))
    io.save_model(mf, tmp_path / "other.onnx")
    second = _data_name(tmp_path / "other.onnx")
    assert second != first and not (tmp_path / first).exists() and (tmp_path / second).is_file()
    assert not np.any(numpy_helper.to_array(onnx.load(tmp_path / "other.onnx").graph.initializer[0]))


def test_the_data_file_is_named_after_the_sha256_of_its_bytes(tmp_path: Path) -> None:
    """The digest runs in a second thread beside the write (issue 19.4): the name is still the
    SHA-256 of exactly the bytes in the file, pieces in order, across pieces of any size."""
    src = tmp_path / "m.onnx"
    _save_external(case_path("conv_bn_folded.onnx"), src)
    io.save_model(io.load_model(src), tmp_path / "o.onnx")
    name = _data_name(tmp_path / "o.onnx")
    assert re.fullmatch(r"o\.onnx\.[0-9a-f]{16}\.data", name)
    assert name.split(".")[2] == sha256(tmp_path / name)[:16]
    writer = io._HashingWriter(tmp_path / "w.bin")
    writer._PIECE = 7  # many small pieces, and pieces that split a write
    for part in (b"a" * 20, np.arange(9, dtype=np.float32), b"", b"xyz"):
        writer.write(part if isinstance(part, bytes) else part.view(np.uint8).reshape(-1).data)
    digest = writer.close()
    assert digest == sha256(tmp_path / "w.bin")[:16] and writer.close() == digest


def test_a_hash_failure_is_raised_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = io._HashingWriter(tmp_path / "w.bin")

    class Broken:
        def update(self, data) -> None:
            raise MemoryError("no memory for the hash")

    writer._hash = Broken()  # type: ignore[assignment]
    writer.write(b"abc")
    with pytest.raises(MemoryError):
        writer.close()


def test_clean_orphans_removes_only_unread_data_files_named_like_ours(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    _save_external(case_path("conv_bn_folded.onnx"), src, location="m.onnx.0123456789abcdef.data")
    unread = tmp_path / "gone.onnx.fedcba9876543210.data"
    foreign = tmp_path / "notes.0123456789abcdef.data"  # not named after an .onnx: not taken for ours
    mine = tmp_path / "out.bin.00000000000000aa.data"  # named after the model being written
    for p in (unread, foreign, mine):
        p.write_bytes(b"\0" * 8)
    (tmp_path / "link.onnx.00000000000000bb.data").symlink_to(unread)
    removed = io.clean_orphans(tmp_path, model_name="out.bin")
    assert sorted(p.name for p in removed) == sorted([mine.name, unread.name])
    assert foreign.exists() and (tmp_path / "m.onnx.0123456789abcdef.data").exists()  # m.onnx reads it
    assert (tmp_path / "link.onnx.00000000000000bb.data").is_symlink()  # links are never taken for ours


def test_a_different_file_with_the_data_files_name_is_never_replaced(tmp_path: Path) -> None:
    """Data file names carry 64 bits of SHA-256: a file of that name with other bytes (a crafted
    collision, about 2**32 work) belongs to some other model and must survive the save."""
    src, elsewhere, folder = tmp_path / "m.onnx", tmp_path / "first", tmp_path / "out"
    elsewhere.mkdir()
    folder.mkdir()
    _save_external(case_path("conv_bn_folded.onnx"), src)
    io.save_model(io.load_model(src), elsewhere / "o.onnx")
    name = _data_name(elsewhere / "o.onnx")  # the name this content gets
    # An older model in the target folder reads a file of exactly that name, with other bytes.
    victim = folder / "older.onnx"
    _save_external(case_path("mlp.onnx"), victim, location=name)
    before = {p.name: sha256(p) for p in folder.iterdir()}
    with pytest.raises(OnnxSparseError, match="different file with this name") as err:
        io.save_model(io.load_model(src), folder / "o.onnx")
    assert err.value.hint
    assert {p.name: sha256(p) for p in folder.iterdir()} == before  # no output, nothing replaced or left
    io.check_input_model(victim)
    # The same bytes under that name (the same model saved again) are kept as they are, not replaced.
    (folder / name).unlink()
    victim.unlink()
    shutil.copy(elsewhere / name, folder / name)
    inode = (folder / name).stat().st_ino
    io.save_model(io.load_model(src), folder / "o.onnx")
    assert _data_name(folder / "o.onnx") == name and (folder / name).stat().st_ino == inode
    io.check_input_model(folder / "o.onnx")


def test_a_link_with_the_data_files_name_is_not_taken_for_the_same_bytes(tmp_path: Path) -> None:
    src, elsewhere, folder = tmp_path / "m.onnx", tmp_path / "first", tmp_path / "out"
    elsewhere.mkdir()
    folder.mkdir()
    _save_external(case_path("conv_bn_folded.onnx"), src)
    io.save_model(io.load_model(src), elsewhere / "o.onnx")
    name = _data_name(elsewhere / "o.onnx")
    (folder / name).symlink_to(elsewhere / name)  # the same bytes, through a link
    with pytest.raises(OnnxSparseError, match="different file with this name"):
        io.save_model(io.load_model(src), folder / "o.onnx")
    assert (folder / name).is_symlink() and not (folder / "o.onnx").exists()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_a_new_value_read_for_a_copy_does_not_stay_resident(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: each capture stage copies the earlier layers' new values into its session; the
    pages of the scratch file they were read from must not pile up in memory until the save."""
    from onnx_sparse.calib.capture import _tensor_copy

    src = tmp_path / "m.onnx"
    _save_external(case_path("conv_bn_folded.onnx"), src)
    monkeypatch.setenv("ONNX_SPARSE_SPILL_DIR", str(tmp_path))
    monkeypatch.setattr(io, "SCRATCH_FROM", 10_000)
    mf = io.load_model(src)
    t = next(t for t in mf.model.graph.initializer if t.name == "conv1.weight")
    want = np.random.default_rng(0).standard_normal((32, 16, 3, 3)).astype(np.float32)
    mf.write(t, want)
    assert float(np.asarray(mf.read(t)).sum()) == pytest.approx(float(want.sum()), rel=1e-5)
    assert resident_kb("onnx-sparse-values-") >= 16  # read: its pages are resident
    mf.release(t)
    assert resident_kb("onnx-sparse-values-") == 0
    copy = _tensor_copy(mf, t)  # what a stage's session gets
    np.testing.assert_array_equal(numpy_helper.to_array(copy), want)
    assert resident_kb("onnx-sparse-values-") == 0
    np.testing.assert_array_equal(mf.read(t), want)  # read again from the file when touched
    mf.release(None)  # a site without a tensor: nothing to give back


# ------------------------------------------------- the structural check holds no copy of the weights


def _matmul_model(w: np.ndarray, x_width: int) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, x_width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_the_check_sees_large_inline_weights_as_placeholders() -> None:
    """The checker gets the model with its large inline tensors as external entries naming an
    empty file (not three more copies of the weights), and the model itself is left as it was."""
    model = _matmul_model(np.ones((256, 256), np.float32), 256)  # 256 KiB: a placeholder
    before = model.SerializeToString()
    assert io.model_problem(model) is None
    assert model.SerializeToString() == before
    light = io._placeholder_copy(model)
    assert len(light) < len(before) // 50
    checked = onnx.load_from_string(light)
    (w,) = checked.graph.initializer
    assert w.data_location == TensorProto.EXTERNAL and list(w.dims) == [256, 256] and not w.raw_data


@pytest.mark.parametrize("rows", [64, 256])  # inline as it is, and a placeholder
def test_the_check_still_sees_shapes_and_short_data(rows: int) -> None:
    """The same verdicts as the checker on the whole model: wrong dims reach shape inference
    from a placeholder too, and a tensor whose data is short of its shape stays inline, so the
    checker reports it."""
    bad_dims = _matmul_model(np.ones((rows, 256), np.float32), rows + 1)
    problem = io.model_problem(bad_dims)
    assert problem is not None and "Incompatible dimensions" in problem, problem
    short = _matmul_model(np.ones((rows, 256), np.float32), rows)
    short.graph.initializer[0].raw_data = short.graph.initializer[0].raw_data[:-4]
    problem = io.model_problem(short)
    assert problem is not None and "raw_data size" in problem, problem
    with pytest.raises(onnx.checker.ValidationError, match="raw_data size"):
        onnx.checker.check_model(short, full_check=True)
