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


def _with_a_nan_weight(tmp_path: Path) -> Path:
    model = onnx.load(case_path("mlp.onnx"))
    for i, t in enumerate(model.graph.initializer):
        if t.name == "fc1.weight":
            w = numpy_helper.to_array(t).copy()
            w.flat[5] = np.nan
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, t.name))
    path = tmp_path / "nan_weight.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "command",
    [["prune"], ["prune", "--method", "sparsegpt"], ["prune", "--int8"], ["prune", "--method", "magnitude", "--int8"],
     ["quantize"]],
)  # fmt: skip
def test_a_weight_with_nan_is_named_before_calibration_uses_it(run_cli, tmp_path: Path, command: list[str]) -> None:
    """A calibrated refit spreads a NaN weight along its row, and an INT8 scale from it is NaN: refused,
    naming the weight (exit 2, not an internal error), nothing written."""
    src = _with_a_nan_weight(tmp_path)
    data = tmp_path / "calib.json"
    save_json(_mlp_feeds(), str(data))
    out = tmp_path / "out.onnx"
    rc, text = run_cli([*command, src, "-o", out, "--load-inputs", data])
    assert rc == 2, text
    errors = error_lines(text)
    assert len(errors) == 1 and "weight 'fc1.weight' holds 1 inf or NaN" in errors[0], errors
    assert not out.exists()


def test_magnitude_pruning_without_data_keeps_a_nan_weight_as_it_is(run_cli, tmp_path: Path) -> None:
    src = _with_a_nan_weight(tmp_path)
    out = tmp_path / "out.onnx"
    rc, text = run_cli(["prune", src, "-o", out])
    assert rc == 0, text
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}["fc1.weight"]
    assert int(np.isnan(w).sum()) == 1


def test_require_finite_passes_large_finite_values_and_refuses_any_inf_or_nan() -> None:
    """Values near the dtype's limit (whose sum would overflow) are finite and pass; one inf or NaN among
    them, in any array of the sample, is refused."""
    from onnx_sparse.calib.data import require_finite

    require_finite((np.full(10, 3e38, np.float32), np.full(10, 60000, np.float16), np.zeros(0)), "t", 0)
    for bad in (np.inf, -np.inf, np.nan):
        a = np.full(10, 3e38, np.float32)
        a[4] = bad
        with pytest.raises(OnnxSparseError, match="calibration sample 7: tensor 't'"):
            require_finite((np.ones(3, np.float32), a), "t", 7)


def _two_branches() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), n) for n in ("wa", "wb")]
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "wa"], ["ya"], name="mma"), helper.make_node("MatMul", ["b", "wb"], ["yb"], name="mmb")],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 64]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["M", 64])],
        [helper.make_tensor_value_info("ya", TensorProto.FLOAT, ["N", 64]),
         helper.make_tensor_value_info("yb", TensorProto.FLOAT, ["M", 64])],
        inits,
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_layer_no_calibration_value_reaches_stays_float_and_none_at_all_is_refused() -> None:
    """Samples that are empty where a layer reads it (an optional input with 0 rows) give it no scale to
    choose: it stays float with that reason, instead of INT8 on a placeholder scale of 1.0 (which
    passed, fidelity 1.0, on samples empty everywhere)."""
    rng = np.random.default_rng(6)
    model = _two_branches()
    feeds = [{"a": rng.normal(size=(4, 64)).astype(np.float32), "b": np.zeros((0, 64), np.float32)} for _ in range(8)]
    result = quantize(model, feeds)
    by_node = {x.node: x for x in result.layers}
    assert by_node["mma"].reason == "" and by_node["mma"].int8 is not None
    assert "no calibration value reaches it" in by_node["mmb"].reason
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.model.graph.initializer}
    assert "wb" in inits and inits["wb"].dtype == np.float32  # mmb's weight as it was
    empty = [{"a": np.zeros((0, 64), np.float32), "b": np.zeros((0, 64), np.float32)} for _ in range(4)]
    with pytest.raises(OnnxSparseError, match="no calibration sample gives the INT8 layers' inputs a value"):
        quantize(model, empty)
