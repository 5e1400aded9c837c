"""``--in-place`` lets ``-o`` replace the input model and nothing else the run reads (onnx_sparse.guard).

The exemption is for the model file alone: ``-o`` naming the model's external data file or the
calibration JSON is still refused through the CLI, with one ``[E]`` line, exit 2, and every file
left as it was, exactly as without ``--in-place``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import case_path, error_lines, sha256
from polygraphy.json import save_json


def _files(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def model_with_data(tmp_path: Path) -> Path:
    """mlp.onnx with its weights in ``m.onnx.data``, and two calibration feeds in ``calib.json``."""
    src = tmp_path / "m.onnx"
    onnx.save(onnx.load(case_path("mlp.onnx")), src, save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)  # fmt: skip
    rng = np.random.default_rng(0)
    feeds = [
        {"x": rng.standard_normal((3, 64)).astype(np.float32), "x3": rng.standard_normal((2, 3, 16)).astype(np.float32)}
        for _ in range(2)
    ]
    save_json(feeds, str(tmp_path / "calib.json"))
    return src


@pytest.mark.parametrize(
    ("target", "extra", "what"),
    [
        ("m.onnx.data", [], "the external data file"),
        ("calib.json", ["--method", "wanda", "--load-inputs"], "--load-inputs"),
    ],
    ids=["data-file", "calibration-json"],
)
def test_in_place_output_may_not_replace_another_input(
    run_cli, model_with_data: Path, target: str, extra: list[str], what: str
) -> None:
    folder = model_with_data.parent
    before = _files(folder)
    argv = ["prune", model_with_data, "--in-place", "-o", folder / target]
    if extra:
        argv += [*extra, folder / "calib.json"]
    rc, text = run_cli(argv)
    assert rc == 2, text
    (line,) = error_lines(text)
    assert "refusing to overwrite" in line and what in line and "Traceback" not in text
    assert "--in-place" not in line.split("(hint:")[1]  # the --in-place hint is for the model file only
    assert _files(folder) == before  # nothing written, nothing replaced


def test_in_place_alone_still_replaces_the_model(run_cli, model_with_data: Path) -> None:
    """The control case: the exemption itself works (the model and its data are replaced)."""
    before = sha256(model_with_data)
    rc, text = run_cli(["prune", model_with_data, "--in-place"])
    assert rc == 0, text
    assert sha256(model_with_data) != before and run_cli(["check", model_with_data])[0] == 0


def test_a_file_named_like_the_data_file_in_another_folder_is_not_refused(run_cli, tmp_path: Path) -> None:
    """Only a --report beside the output can be taken for its data file (``<name>.<hash>.data``)."""
    src = tmp_path / "m.onnx"
    src.write_bytes(case_path("mlp.onnx").read_bytes())
    (tmp_path / "sub").mkdir()
    beside = ["prune", src, "-o", tmp_path / "o.onnx", "--report", tmp_path / "o.onnx.0123456789abcdef.data"]
    rc, text = run_cli(beside)
    assert rc == 2 and "named like the data file" in text
    rc, text = run_cli([*beside[:-1], tmp_path / "sub" / "o.onnx.0123456789abcdef.data"])
    assert rc == 0, text


def test_check_run_paths_never_replaces_the_model_unless_asked(tmp_path: Path) -> None:
    """The API's default: in_place is off, so a model output that is the input model is refused."""
    from onnx_sparse.errors import OnnxSparseError
    from onnx_sparse.guard import check_run_paths

    src = tmp_path / "m.onnx"
    src.write_bytes(case_path("mlp.onnx").read_bytes())
    with pytest.raises(OnnxSparseError, match="refusing to overwrite the input model"):
        check_run_paths(models=[src], model_output=src)
    check_run_paths(models=[src], model_output=src, in_place=True)  # asked: allowed


def test_unreadable_json_input_is_one_clear_error(tmp_path: Path) -> None:
    from onnx_sparse.errors import OnnxSparseError
    from onnx_sparse.guard import check_json_input

    with pytest.raises(OnnxSparseError, match="--load-inputs .*missing.json: cannot read"):
        check_json_input(tmp_path / "missing.json", "--load-inputs")


def test_protocol_0_pickle_of_an_array_is_named_a_pickle(tmp_path: Path) -> None:
    import pickle

    from onnx_sparse.errors import OnnxSparseError
    from onnx_sparse.guard import check_json_input

    path = tmp_path / "calib.json"
    path.write_bytes(pickle.dumps(np.arange(3), protocol=0))
    with pytest.raises(OnnxSparseError, match="looks like a Python pickle"):
        check_json_input(path, "--load-inputs")


def test_output_path_refuses_a_folder_unless_asked(tmp_path: Path) -> None:
    from onnx_sparse.errors import OnnxSparseError
    from onnx_sparse.guard import output_path

    (tmp_path / "sub").mkdir()
    with pytest.raises(OnnxSparseError, match="is a folder"):
        output_path(tmp_path / "sub", "-o")
    assert output_path(tmp_path / "sub", "--save-inputs", folder_ok=True) == (tmp_path / "sub").resolve()


def test_output_folder_that_cannot_be_walked_is_one_clear_error(tmp_path: Path) -> None:
    """A symlink loop in the folder (ELOOP): refused with the reason, not a traceback."""
    from onnx_sparse.errors import OnnxSparseError
    from onnx_sparse.guard import output_path

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(OnnxSparseError, match="output folder .*loop cannot be used"):
        output_path(tmp_path / "loop" / "m.onnx", "-o")


def test_a_folder_of_json_inputs_is_checked_file_by_file(tmp_path: Path) -> None:
    import pickle

    from onnx_sparse.errors import OnnxSparseError
    from onnx_sparse.guard import check_json_input

    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "0.json").write_text("[]")
    (folder / "1.json").write_bytes(pickle.dumps({"x": 1}, protocol=2))
    with pytest.raises(OnnxSparseError, match="1.json: looks like a Python pickle"):
        check_json_input(folder, "--load-inputs")


def test_missing_output_folder_names_its_first_missing_part(tmp_path: Path) -> None:
    from onnx_sparse.errors import OnnxSparseError
    from onnx_sparse.guard import output_path

    with pytest.raises(OnnxSparseError) as err:
        output_path(tmp_path / "a" / "b" / "m.onnx", "-o")
    assert "output folder does not exist" in err.value.message
    assert err.value.hint == f"{tmp_path / 'a'} is not there: create it, or give a path without it"


def test_refusal_names_the_input_models_path(tmp_path: Path) -> None:
    from onnx_sparse.errors import OnnxSparseError
    from onnx_sparse.guard import check_run_paths

    src = tmp_path / "m.onnx"
    src.write_bytes(case_path("mlp.onnx").read_bytes())
    with pytest.raises(OnnxSparseError, match=re.escape(f"refusing to overwrite the input model {src}")):
        check_run_paths(models=[src], model_output=src)


def test_an_in_memory_model_has_nothing_to_overwrite(tmp_path: Path) -> None:
    from onnx_sparse.guard import check_run_paths
    from onnx_sparse.io import ModelFile

    (mf,) = check_run_paths(models=[ModelFile(onnx.load(case_path("mlp.onnx")))], model_output=tmp_path / "o.onnx")
    assert mf.path is None
