"""Calibrated pruning inside If/Loop bodies (issue 21 item 4): layers are fitted on the activations
their bodies really see; a layer no calibration sample reaches is pruned by magnitude and says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import case_path, stored_weight
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.calib.capture import iter_body_values
from onnx_sparse.core import nm
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.io import load_model
from onnx_sparse.passes.bodies import NOT_REACHED


def _save(feeds: list[dict[str, np.ndarray]], path: Path) -> Path:
    from polygraphy.json import save_json

    save_json(feeds, str(path))
    return path


def _if_feeds(cond: bool, n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    # correlated inputs: a fit that sees them differs from magnitude
    mix = rng.standard_normal((16, 16)).astype(np.float32)
    return [{"cond": np.array(cond), "x": (rng.standard_normal((32, 16)).astype(np.float32) @ mix)} for _ in range(n)]


def _loop_model(path: Path) -> Path:
    """``y = Loop(trips, x)`` whose body computes ``x <- tanh(x @ W)``; ``trips`` is a rank-0 int64."""
    w = (np.random.default_rng(0).standard_normal((16, 16)) / 4).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["xc", "W"], ["xw"], name="body_mm"),
            helper.make_node("Tanh", ["xw"], ["xn"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("xc", TensorProto.FLOAT, ["N", 16]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("xn", TensorProto.FLOAT, ["N", 16]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body, name="loop")],
        "loop_model",
        [
            helper.make_tensor_value_info("trips", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _records(report: Path) -> dict[str, dict]:
    return {node: r for r in json.loads(report.read_text())["layers"] for node in r["nodes"]}


def test_if_branch_taken_is_fitted_the_other_is_magnitude(run_cli, tmp_path: Path) -> None:
    src, out, report = case_path("if_subgraph.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    calib = _save(_if_feeds(True), tmp_path / "calib.json")
    rc, text = run_cli(["prune", src, "-o", out, "--method", "sparsegpt", "--load-inputs", calib, "--report", report])
    assert rc == 0, text
    rec = _records(report)
    assert rec["if/then_branch/then_mm_local"]["method"] == "sparsegpt"
    assert rec["if/then_branch/then_mm_outer"]["method"] == "sparsegpt"  # shared with else: fitted on then's rows
    assert rec["if/then_branch/then_mm_local"]["rows"] == 8 * 32
    assert rec["if/else_branch/else_mm_local"]["method"] == "magnitude"
    assert rec["if/else_branch/else_mm_local"]["note"] == NOT_REACHED
    assert "else_mm_local: no calibration sample reaches it" in text  # said per layer, in the log
    assert run_cli(["check", out])[0] == 0


def test_if_branch_fit_uses_the_activations_the_body_sees(run_cli, tmp_path: Path) -> None:
    """The fitted then-branch layer reproduces its dense output on what the branch really computes
    (x @ the pruned shared weight) better than magnitude pruning does."""
    src = case_path("if_subgraph.onnx")
    feeds = _if_feeds(True)
    calib = _save(feeds, tmp_path / "calib.json")
    fitted, plain = tmp_path / "fit.onnx", tmp_path / "mag.onnx"
    assert run_cli(["prune", src, "-o", fitted, "--method", "sparsegpt", "--load-inputs", calib])[0] == 0
    assert run_cli(["prune", src, "-o", plain])[0] == 0
    dense_w = stored_weight(onnx.load(src), "then.weight")
    errors = {}
    for name, path in (("fit", fitted), ("magnitude", plain)):
        model = onnx.load(path)
        x = np.concatenate([f["x"] for f in feeds]) @ stored_weight(model, "outer.weight")
        errors[name] = np.linalg.norm(x @ stored_weight(model, "then.weight") - x @ dense_w)
    assert errors["fit"] < 0.8 * errors["magnitude"], errors


def test_loop_body_values_stack_every_iteration(tmp_path: Path) -> None:
    path = _loop_model(tmp_path / "loop.onnx")
    mf = load_model(path)
    (site,) = [s for s in find_weight_sites(mf.model) if s.eligible]
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    feeds = [{"trips": np.array(3, np.int64), "x": x}, {"trips": np.array(0, np.int64), "x": x}]
    (first, (seen,)), (second, (never,)) = list(iter_body_values(mf, feeds, [(site.node_proto, site.activation)]))
    w = onnx.numpy_helper.to_array(mf.model.graph.initializer[0])
    expected, cur = [], x
    for _ in range(3):
        expected.append(cur)
        cur = np.tanh(cur @ w)
    assert (first, second) == (0, 1)
    np.testing.assert_allclose(seen, np.concatenate(expected), rtol=1e-5, atol=1e-6)  # [3 * 5, 16]
    assert never is None  # the loop ran zero times


@pytest.mark.parametrize("trips", [3, 0])
def test_loop_body_layer(trips: int, run_cli, tmp_path: Path) -> None:
    src, out, report = _loop_model(tmp_path / "loop.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    rng = np.random.default_rng(2)
    feeds = [
        {"trips": np.array(trips, np.int64), "x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(6)
    ]
    calib = _save(feeds, tmp_path / "calib.json")
    rc, text = run_cli(["prune", src, "-o", out, "--load-inputs", calib, "--report", report])
    assert rc == 0, text
    (rec,) = json.loads(report.read_text())["layers"]
    if trips:
        assert rec["method"] == "asym" and rec["rows"] == 6 * 8 * trips
    else:
        assert rec["method"] == "magnitude" and rec["note"] == NOT_REACHED
    assert nm.is_2_4(stored_weight(onnx.load(out), "W"), 0)
