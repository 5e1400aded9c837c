"""Tests for onnx_sparse.passes.sensitivity: per-layer sensitivity and --target-cosine."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from polygraphy.json import save_json
from test_calibrated_models import conv_data, convnet, mlp, mlp_data

from onnx_sparse.calib.data import split_holdout
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.passes.base import as_model_file
from onnx_sparse.passes.calibrated import CalibratedPrunePass
from onnx_sparse.passes.sensitivity import (
    OutputProbe,
    SensitivityPrunePass,
    SensitivityReport,
    fidelity,
    measure_sensitivity,
)


def test_fidelity_ignores_integer_outputs() -> None:
    dense = [{"y": np.array([1.0, 0.0]), "ids": np.array([1, 2])}]
    same = fidelity(dense, dense)
    assert same.cosine == {"y": 1.0} and same.rel_l2 == {"y": 0.0}
    other = fidelity(dense, [{"y": np.array([1.0, 1.0]), "ids": np.array([3, 4])}])
    assert other.min_cosine == pytest.approx(1 / np.sqrt(2)) and other.mean_rel_l2 == pytest.approx(1.0)


def test_probe_needs_a_float_output() -> None:
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "t",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT64, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [2])],
    )
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(OnnxSparseError, match="no floating-point output"):
        OutputProbe(as_model_file(model), [{"x": np.array([1, 2])}])


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_measure_sensitivity_one_entry_per_tensor(method: str) -> None:
    model = convnet()
    report = measure_sensitivity(as_model_file(model), conv_data(0, 4), method)
    assert isinstance(report, SensitivityReport)
    assert [layer.nodes for layer in report.layers] == [("conv1",), ("conv2",), ("conv3",), ("conv4",)]
    assert all(0.5 < layer.fidelity.min_cosine < 1.0 for layer in report.layers)
    assert all(layer.macs for layer in report.layers)
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["method"] == method and doc["outputs"] == ["y"] and "target" not in doc
    assert set(doc["layers"][0]) >= {"nodes", "min_cosine", "mean_cosine", "mean_rel_l2", "cosine", "macs"}


def test_sparsegpt_layers_are_less_sensitive_than_magnitude() -> None:
    mf = as_model_file(mlp())
    feeds = mlp_data(0, 8)
    mag = measure_sensitivity(mf, feeds, "magnitude")
    sgpt = measure_sensitivity(mf, feeds, "sparsegpt")
    for a, b in zip(mag.layers, sgpt.layers, strict=True):
        assert b.fidelity.min_cosine > a.fidelity.min_cosine


@pytest.mark.parametrize("target", [0.9, 0.95, 0.98])
def test_target_cosine_holds_on_the_held_out_feeds(target: float) -> None:
    model = convnet()
    feeds = conv_data(0, 8)
    p = SensitivityPrunePass(target, method="sparsegpt", feeds=feeds)
    result = p(model)
    report = p.report
    assert report is not None and report.measured is not None
    assert report.measured.min_cosine >= target
    assert 0.0 <= report.coverage <= 1.0
    assert report is result.records[-1]
    assert (report.samples, report.held_out) == (8, 2)
    # The measurement is real, and on the held-out feeds (3 and 7): rerun the pruned model.
    _, held = split_holdout(feeds, 0.25)
    assert held == [feeds[3], feeds[7]]
    probe = OutputProbe(as_model_file(model), held)
    assert probe.measure_model(result.model).min_cosine == pytest.approx(report.measured.min_cosine)
    pruned_nodes = {n for r in result.records[:-1] for n in r.nodes}
    assert pruned_nodes == set(report.chosen)


def test_split_holdout_every_kth_feed() -> None:
    feeds = [{"x": np.array([i])} for i in range(10)]
    fit, held = split_holdout(feeds, 0.25)
    assert [int(f["x"][0]) for f in held] == [3, 7] and len(fit) == 8
    assert [int(f["x"][0]) for f in split_holdout(feeds, 0.5)[1]] == [1, 3, 5, 7, 9]
    assert split_holdout(feeds, 0.0) == (feeds, [])
    assert split_holdout(feeds[:1], 0.25) == (feeds[:1], [])
    assert split_holdout(feeds[:2], 0.25) == (feeds[:1], feeds[1:2])  # fewer feeds than k: the last one
    for bad in (-0.1, 0.75):
        with pytest.raises(OnnxSparseError, match="held-out share"):
            split_holdout(feeds, bad)


def test_held_out_feeds_are_not_fitted_on() -> None:
    """Target 0 prunes every layer; with a hold-out the weights must be those fitted on the rest alone."""
    feeds = conv_data(0, 8)
    fit, held = split_holdout(feeds, 0.25)
    p = SensitivityPrunePass(0.0, method="sparsegpt", feeds=feeds)
    got = p(convnet()).model.model
    want = CalibratedPrunePass("sparsegpt", fit)(convnet()).model.model
    with_all = CalibratedPrunePass("sparsegpt", feeds)(convnet()).model.model
    for a, b in zip(got.graph.initializer, want.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert any(
        not np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(c))
        for a, c in zip(got.graph.initializer, with_all.graph.initializer, strict=True)
    )
    assert p.report.held_out == len(held) == 2
    # holdout=0: fitted and judged on everything
    q = SensitivityPrunePass(0.0, method="sparsegpt", feeds=feeds, holdout=0.0)
    q(convnet())
    assert q.report.held_out == 0 and q.report.samples == 8


def test_target_cosine_extremes() -> None:
    feeds = conv_data(0, 4)
    loose = SensitivityPrunePass(0.0, method="sparsegpt", feeds=feeds)
    loose(convnet())
    assert loose.report.coverage == 1.0 and len(loose.report.chosen) == 4
    strict = SensitivityPrunePass(1.0, method="sparsegpt", feeds=feeds)
    result = strict(convnet())
    assert strict.report.chosen == [] and strict.report.coverage == 0.0 and not result.modified
    assert strict.report.note


def test_cli_sensitivity_report_only(run_cli, tmp_path) -> None:
    onnx.save(mlp(), tmp_path / "m.onnx")
    save_json(mlp_data(0, 4), tmp_path / "in.json")
    out = tmp_path / "s.json"
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "--load-inputs", tmp_path / "in.json", "--sensitivity",
                        "--sensitivity-json", out])  # fmt: skip
    assert rc == 0, text
    assert "each layer pruned alone" in text and "min cosine" in text
    doc = json.loads(out.read_text())
    assert doc["method"] == "sparsegpt" and [x["nodes"] for x in doc["layers"]] == [["fc1"], ["fc2"], ["fc3"]]
    assert not list(tmp_path.glob("*.onnx.*")) and sorted(p.name for p in tmp_path.iterdir()) == [
        "in.json",
        "m.onnx",
        "s.json",
    ]


def test_cli_target_cosine(run_cli, tmp_path) -> None:
    onnx.save(convnet(), tmp_path / "m.onnx")
    save_json(conv_data(0, 8), tmp_path / "in.json")
    out, sens, report = tmp_path / "o.onnx", tmp_path / "s.json", tmp_path / "r.json"
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", out, "--load-inputs", tmp_path / "in.json",
                        "--target-cosine", "0.95", "--sensitivity-json", sens, "--report", report])  # fmt: skip
    assert rc == 0, text
    assert "target cosine 0.95000" in text and "coverage" in text and "2 held-out calibration feeds" in text
    target = json.loads(sens.read_text())["target"]
    assert target["met"] and target["measured"]["min_cosine"] >= 0.95
    assert json.loads(report.read_text())["sensitivity"]["target"] == target
    assert run_cli(["check", out, "--include", "|".join(target["chosen_layers"]) or "^$"])[0] == 0


def test_cli_holdout_out_of_range(run_cli, tmp_path) -> None:
    onnx.save(mlp(), tmp_path / "m.onnx")
    save_json(mlp_data(0, 4), tmp_path / "in.json")
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--load-inputs",
                        tmp_path / "in.json", "--target-cosine", "0.9", "--holdout", "0.8"])  # fmt: skip
    assert rc == 2 and "held-out share must be in [0, 0.5]" in text and "Traceback" not in text
    assert not (tmp_path / "o.onnx").exists()
