"""Calibration data that holds inf or NaN (in a sample, or made by the model's arithmetic on it) is
refused with one clear error naming the sample and the tensor, before anything is written: every
statistic built on it (Gram matrices, bias corrections, activation ranges) would be NaN, and so
would the weights, biases and INT8 scales written from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import case_path, error_lines
from onnx import TensorProto, helper, numpy_helper
from polygraphy.json import save_json

from onnx_sparse import api
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.quant import quantize
from onnx_sparse.recipe import Recipe


def _mlp_feeds(n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {"x": rng.normal(size=(2, 64)).astype(np.float32), "x3": rng.normal(size=(2, 2, 16)).astype(np.float32)}
        for _ in range(n)
    ]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("command", [["quantize"], ["prune"], ["prune", "--int8"]])
def test_cli_refuses_a_calibration_sample_with_inf_or_nan(
    run_cli, tmp_path: Path, command: list[str], bad: float
) -> None:
    feeds = _mlp_feeds()
    feeds[2]["x"][0, 5] = bad
    data = tmp_path / "calib.json"
    save_json(feeds, str(data))
    out = tmp_path / "out.onnx"
    rc, text = run_cli([*command, case_path("mlp.onnx"), "-o", out, "--load-inputs", data])
    assert rc == 2, text
    errors = error_lines(text)
    assert len(errors) == 1 and "calibration sample 2" in errors[0] and "'x'" in errors[0], errors
    assert "Traceback" not in text
    assert not out.exists()


def _log_matmul() -> onnx.ModelProto:
    """x -> Log -> MatMul(W): finite inputs, NaN where an input is negative."""
    w = np.random.default_rng(1).normal(size=(16, 32)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Log", ["x"], ["lx"], name="log"), helper.make_node("MatMul", ["lx", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_nan_made_by_the_model_is_named_where_a_layer_reads_it() -> None:
    model = _log_matmul()
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.uniform(0.5, 2.0, size=(4, 16)).astype(np.float32)} for _ in range(6)]
    feeds[4]["x"][1, 3] = -1.0  # finite input, log(-1) = NaN inside
    with pytest.raises(OnnxSparseError, match=r"calibration sample 4: tensor 'lx' holds inf or NaN"):
        quantize(model, feeds)
    with pytest.raises(OnnxSparseError, match=r"calibration sample 4: tensor 'lx' holds inf or NaN"):
        api.prune(model, Recipe(), calibration=feeds)
    del feeds[4]  # the same model on finite data goes through, and writes finite values
    result = quantize(model, feeds)
    for t in result.model.model.graph.initializer:
        a = numpy_helper.to_array(t)
        assert a.dtype.kind != "f" or np.all(np.isfinite(a)), t.name
