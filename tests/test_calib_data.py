"""Tests for onnx_sparse.calib.data: Polygraphy JSON, data-loader scripts, random data, validation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from polygraphy.json import save_json
from test_calibrated_models import convnet, mlp, mlp_data

from onnx_sparse.calib.data import (
    RANDOM_DATA_WARNING,
    load_calibration,
    load_data_script,
    load_inputs,
    model_inputs,
    parse_input_shapes,
    random_feeds,
    validate_feeds,
)
from onnx_sparse.errors import OnnxSparseError


def test_model_inputs() -> None:
    (spec,) = model_inputs(convnet())
    assert spec.name == "x" and spec.dtype == np.float32 and spec.shape == ("n", 8, "h", "w")


def test_load_inputs_polygraphy_json(tmp_path) -> None:
    feeds = mlp_data(0, 3)
    save_json(feeds, tmp_path / "a.json")
    save_json(feeds[:1], tmp_path / "b.json")
    got = load_inputs([tmp_path / "a.json", tmp_path / "b.json"])
    assert len(got) == 4
    np.testing.assert_array_equal(got[3]["x"], feeds[0]["x"])


def test_load_inputs_missing_file(tmp_path) -> None:
    with pytest.raises(OnnxSparseError, match="no such file"):
        load_inputs([tmp_path / "nope.json"])


def test_load_inputs_not_json(tmp_path) -> None:
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(OnnxSparseError, match="--load-inputs"):
        load_inputs([tmp_path / "bad.json"])


def test_data_loader_script_default_and_named_function(tmp_path) -> None:
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    for i in range(3):\n"
        "        yield {'x': np.full((2, 32), i, dtype=np.float32)}\n"
        "def other():\n"
        "    return [{'x': np.zeros((1, 32), np.float32)}]\n"
    )
    feeds = load_data_script(str(script))
    assert [float(f["x"][0, 0]) for f in feeds] == [0.0, 1.0, 2.0]
    assert len(load_data_script(f"{script}:other")) == 1


def test_data_loader_script_errors(tmp_path) -> None:
    with pytest.raises(OnnxSparseError, match="no such file"):
        load_data_script(str(tmp_path / "missing.py"))
    script = tmp_path / "broken.py"
    script.write_text("def load_data():\n    raise RuntimeError('boom')\n")
    with pytest.raises(OnnxSparseError, match="boom"):
        load_data_script(str(script))
    with pytest.raises(OnnxSparseError, match="nothere"):
        load_data_script(f"{script}:nothere")


def test_parse_input_shapes() -> None:
    assert parse_input_shapes(["x:[1,8,12,12]", "ids:[2,5]"]) == {"x": (1, 8, 12, 12), "ids": (2, 5)}
    assert parse_input_shapes([]) == {}
    with pytest.raises(OnnxSparseError, match="static"):
        parse_input_shapes(["x:[1,n,4]"])


def test_random_feeds_warn_and_follow_input_shapes(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="onnx_sparse"):
        feeds = random_feeds(convnet(), seed=3, iterations=2, input_shapes={"x": (1, 8, 6, 10)})
    assert RANDOM_DATA_WARNING in caplog.text
    assert len(feeds) == 2 and feeds[0]["x"].shape == (1, 8, 6, 10) and feeds[0]["x"].dtype == np.float32
    again = random_feeds(convnet(), seed=3, iterations=2, input_shapes={"x": (1, 8, 6, 10)})
    np.testing.assert_array_equal(feeds[1]["x"], again[1]["x"])  # seeded
    with pytest.raises(OnnxSparseError, match="unknown inputs"):
        random_feeds(convnet(), input_shapes={"y": (1,)})


def test_dynamic_inputs_without_shapes_get_one_line_naming_input_shapes(capsys, caplog) -> None:
    from onnx_sparse.calib.data import input_shapes_example, random_data_shapes

    specs = model_inputs(convnet())  # x [n, 8, h, w]
    assert input_shapes_example(specs) == "x:[1,8,224,224]"
    assert input_shapes_example(specs, {"x": (2, 8, 5, 5)}) == "x:[2,8,5,5]"
    with caplog.at_level(logging.WARNING, logger="onnx_sparse"):
        assert random_data_shapes(specs, {"x": (2, 8, 5, 5)}) == {"x": (2, 8, 5, 5)}
    assert not caplog.records  # shapes given: nothing to say
    with caplog.at_level(logging.WARNING, logger="onnx_sparse"):
        feeds = random_feeds(convnet(), seed=0, iterations=8)
    hints = [r.getMessage() for r in caplog.records if "--input-shapes" in r.getMessage()]
    assert len(hints) == 1 and "x [n,8,h,w]" in hints[0] and "--input-shapes x:[1,8,224,224]" in hints[0]
    assert feeds[0]["x"].shape == (1, 8, 1, 1)  # Polygraphy's size for dynamic dims, now said once
    assert "Dynamic shapes cannot be used" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({}, "missing \\['x'\\]"),
        ({"x": np.zeros((2, 32), np.float32), "z": np.zeros(1)}, "unknown \\['z'\\]"),
        ({"x": np.zeros((2, 32), np.float64)}, "dtype float64, the model expects float32"),
        ({"x": np.zeros((2, 32, 1), np.float32)}, "expects rank 2"),
        ({"x": np.zeros((2, 31), np.float32)}, "axis 1 must be 32"),
    ],
)
def test_validate_feeds_errors(feed, message) -> None:
    with pytest.raises(OnnxSparseError, match=message):
        validate_feeds(mlp(), [feed])


def test_validate_feeds_limit_and_empty() -> None:
    assert len(validate_feeds(mlp(), mlp_data(0, 5), limit=2)) == 2
    with pytest.raises(OnnxSparseError, match="empty"):
        validate_feeds(mlp(), [])
    with pytest.raises(OnnxSparseError, match="not a mapping"):
        validate_feeds(mlp(), [np.zeros(3)])


def test_load_calibration_sources(tmp_path, caplog) -> None:
    save_json(mlp_data(0, 4), tmp_path / "in.json")
    feeds, real = load_calibration(mlp(), load_inputs_paths=[tmp_path / "in.json"], limit=3)
    assert real and len(feeds) == 3
    with caplog.at_level(logging.WARNING, logger="onnx_sparse"):
        feeds, real = load_calibration(mlp(), input_shapes=["x:[4,32]"], iterations=2)
    assert not real and len(feeds) == 2 and feeds[0]["x"].shape == (4, 32)
    assert "RANDOM" not in caplog.text  # real=False: the caller warns, once per command (issue 21)
    with pytest.raises(OnnxSparseError, match="both"):
        load_calibration(mlp(), load_inputs_paths=[tmp_path / "in.json"], data_loader_script="x.py")


@pytest.mark.parametrize("extra", [["--int8"], ["--method", "sparsegpt"], ["--method", "sparsegpt", "--int8"]])
def test_random_data_warning_once_per_command(extra, run_cli, tmp_path) -> None:
    """prune --int8 without data printed the NO CALIBRATION DATA warning twice (issue 21)."""
    from conftest import case_path

    rc, out = run_cli(["prune", case_path("mlp.onnx"), "-o", tmp_path / "o.onnx", *extra])
    assert rc == 0, out
    assert out.count("NO CALIBRATION DATA GIVEN") == 1, out
