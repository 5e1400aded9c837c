"""Edges of onnx_sparse.external the mutation run found unpinned: empty tensors, NUL and empty locations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, numpy_helper

from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.external import element_count, external_ref, stored_nbytes


def _external(name: str, dims: list[int], location: str) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    return t


def test_a_zero_dimension_is_an_empty_tensor_not_an_error() -> None:
    t = numpy_helper.from_array(np.zeros((0, 4), np.float32), "empty")
    assert element_count(t) == 0 and stored_nbytes(t) == 0
    with pytest.raises(OnnxSparseError, match="negative dimension -1"):
        element_count(TensorProto(name="bad", data_type=TensorProto.FLOAT, dims=[-1, 4]))


@pytest.mark.parametrize("location", ["", "w\0.data", "\0"], ids=["empty", "nul-inside", "nul"])
def test_empty_or_nul_location_is_one_clear_error(tmp_path: Path, location: str) -> None:
    """A NUL would make the OS path calls raise ValueError (an internal error); it is refused first."""
    (tmp_path / "w").write_bytes(b"\0" * 16)
    with pytest.raises(OnnxSparseError, match="empty or invalid location"):
        external_ref(_external("w", [4], location), tmp_path)


def test_length_entry_must_equal_what_dtype_and_shape_need(tmp_path: Path) -> None:
    (tmp_path / "w.data").write_bytes(b"\0" * 64)
    t = _external("w", [4], "w.data")  # 16 bytes
    entry = t.external_data.add()
    entry.key, entry.value = "length", "20"  # longer than needed is refused as well as shorter
    with pytest.raises(OnnxSparseError, match="has length 20 but dtype x shape \\[4\\] needs 16 bytes"):
        external_ref(t, tmp_path)


def test_too_short_file_names_the_bytes_it_needs(tmp_path: Path) -> None:
    (tmp_path / "w.data").write_bytes(b"\0" * 10)
    t = _external("w", [4], "w.data")
    entry = t.external_data.add()
    entry.key, entry.value = "offset", "2"
    with pytest.raises(OnnxSparseError, match="too short \\(needs 18 bytes from offset 2, has 10\\)"):
        external_ref(t, tmp_path)


# --------------------------------------------------------------------------- open_data: the file read is the file checked


def _ref(folder: Path):
    folder.mkdir(exist_ok=True)
    (folder / "w.data").write_bytes(b"\1" * 16)
    return external_ref(_external("w", [4], "w.data"), folder)


def test_open_data_reads_the_checked_file(tmp_path: Path) -> None:
    from onnx_sparse.external import open_data

    with open_data(_ref(tmp_path / "m"), "w") as f:
        assert f.read() == b"\1" * 16


@pytest.mark.parametrize("how", ["removed", "rewritten"])
def test_open_data_refuses_a_file_changed_after_its_check(tmp_path: Path, how: str) -> None:
    from onnx_sparse.external import open_data

    ref = _ref(tmp_path / "m")
    if how == "removed":
        ref.file.unlink()
    else:
        ref.file.write_bytes(b"\2" * 32)  # still a regular file, but not the one checked
    with pytest.raises(OnnxSparseError, match="changed between its check and the read"):
        open_data(ref, "w")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="the opened file's path comes from Linux /proc")
def test_open_data_refuses_the_same_file_reached_outside_the_folder(tmp_path: Path) -> None:
    """The model's folder swapped for a link to another folder holding a hard link of the same,
    unchanged file: identity and version agree, but the file is read from outside the folder."""
    from onnx_sparse.external import open_data

    outside = tmp_path / "outside"
    outside.mkdir()
    ref = _ref(tmp_path / "m")
    (outside / "w.data").hardlink_to(ref.file)
    ref = external_ref(_external("w", [4], "w.data"), tmp_path / "m")  # checked with both links in place
    (tmp_path / "m").rename(tmp_path / "m_old")
    (tmp_path / "m").symlink_to(outside)
    with pytest.raises(OnnxSparseError, match="changed between its check and the read"):
        open_data(ref, "w")
