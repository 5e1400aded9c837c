"""Tests for onnx_sparse.passes.annotate: verdicts written into the model without changing what it computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import CASE_MODELS, EXPECTED, case_path, ort_run, random_feed

from onnx_sparse import io
from onnx_sparse.passes.annotate import PREFIX, AnnotatePass, read_annotations


def _annotate(name: str, tmp_path: Path, extra=None) -> tuple[Path, bool]:
    mf = io.load_model(case_path(name))
    result = AnnotatePass(extra)(mf)
    out = tmp_path / name
    io.save_model(result.model, out)
    return out, result.modified


def _expected_annotations(name: str) -> dict[str, dict[str, str]]:
    out = {}
    for e in EXPECTED[name]:
        values = {"eligible": "true" if e.eligible else "false", "weight": e.weight, "axis": str(e.axis)}
        out[e.node] = values
    return out


@pytest.mark.parametrize("name", CASE_MODELS)
def test_annotated_model_is_valid_and_computes_the_same(name: str, tmp_path: Path) -> None:
    out, modified = _annotate(name, tmp_path)
    assert modified
    original, annotated = onnx.load(case_path(name)), onnx.load(out)
    onnx.checker.check_model(annotated, full_check=True)
    assert annotated.ir_version == original.ir_version
    assert list(annotated.opset_import) == list(original.opset_import)
    if original.ir_version < 10:  # IR 10 annotates nodes inside functions too
        assert list(annotated.functions) == list(original.functions)
        assert list(annotated.graph.node) == list(original.graph.node)
    feed = random_feed(case_path(name))
    for a, b in zip(ort_run(case_path(name), feed), ort_run(out, feed), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()  # bit-exact


@pytest.mark.parametrize("name", CASE_MODELS)
def test_annotations_round_trip(name: str, tmp_path: Path) -> None:
    out, _ = _annotate(name, tmp_path)
    notes = read_annotations(onnx.load(out))
    expected = _expected_annotations(name)
    assert set(notes) == set(expected)
    for node, values in expected.items():
        assert {k: notes[node][k] for k in values} == values, node
        e = next(x for x in EXPECTED[name] if x.node == node)
        assert ("reason" in notes[node]) == (not e.eligible)
        if not e.eligible:
            assert e.reason in notes[node]["reason"]
        assert notes[node]["likely_sparse_kernel"] in ("true", "false")


def test_ir8_annotations_go_to_model_metadata(tmp_path: Path) -> None:
    out, _ = _annotate("mlp.onnx", tmp_path)
    model = onnx.load(out)
    assert model.ir_version == 8
    keys = {p.key: p.value for p in model.metadata_props}
    assert keys[f"{PREFIX}node.fc0.eligible"] == "true"
    assert keys[f"{PREFIX}node.Gemm_3.axis"] == "1"
    assert keys[f"{PREFIX}node.bmm.eligible"] == "false"
    assert "batched" in keys[f"{PREFIX}node.bmm.reason"]
    assert all(len(n.metadata_props) == 0 for n in model.graph.node)  # IR 8 has no node metadata


def test_ir8_subgraph_and_dotted_node_names_round_trip(tmp_path: Path) -> None:
    out, _ = _annotate("if_subgraph.onnx", tmp_path)
    notes = read_annotations(onnx.load(out))
    assert notes["if/then_branch/then_mm_outer"]["weight"] == "outer.weight"


def test_ir10_annotations_go_to_node_metadata(tmp_path: Path) -> None:
    original = onnx.load(case_path("custom_domain.onnx"))
    out, _ = _annotate("custom_domain.onnx", tmp_path)
    model = onnx.load(out)
    assert model.ir_version == 10
    # Model metadata untouched; node fc1 keeps its own entry and gains ours.
    assert list(model.metadata_props) == list(original.metadata_props)
    fc1 = {p.key: p.value for p in model.graph.node[0].metadata_props}
    assert fc1["origin"] == "synthetic"
    assert fc1[f"{PREFIX}eligible"] == "true" and fc1[f"{PREFIX}axis"] == "0"
    assert fc1[f"{PREFIX}weight"] == "fc1.weight"
    # The node inside the model-local function is annotated in the function body.
    proj_mm = next(n for n in model.functions[0].node if n.name == "proj_mm")
    assert {p.key: p.value for p in proj_mm.metadata_props}[f"{PREFIX}eligible"] == "true"
    # Nodes without weights are not annotated.
    assert all(not p.key.startswith(PREFIX) for n in model.graph.node[1:] for p in n.metadata_props)


def test_annotate_is_idempotent_and_functional() -> None:
    mf = io.load_model(case_path("conv_bn_folded.onnx"))
    before = mf.model.SerializeToString()
    first = AnnotatePass()(mf)
    assert first.modified and mf.model.SerializeToString() == before  # input untouched
    second = AnnotatePass()(first.model)
    assert not second.modified
    assert second.model.model.SerializeToString() == first.model.model.SerializeToString()


def test_extra_keys_are_merged(tmp_path: Path) -> None:
    out, _ = _annotate("conv_bn_folded.onnx", tmp_path, extra={"conv2": {"pruned": "magnitude"}})
    notes = read_annotations(onnx.load(out))
    assert notes["conv2"]["pruned"] == "magnitude" and "pruned" not in notes["conv1"]
    # Changing an extra key is a modification; setting it to the same value is not.
    mf = io.load_model(out)
    assert not AnnotatePass({"conv2": {"pruned": "magnitude"}})(mf).modified
    assert AnnotatePass({"conv2": {"pruned": "wanda"}})(mf).modified


def test_inspect_shows_annotations(tmp_path: Path, run_cli) -> None:
    out, _ = _annotate("custom_domain.onnx", tmp_path)
    report = tmp_path / "r.json"
    rc, text = run_cli(["inspect", out, "--json", report, "--wide"])  # the narrow table shortens long cells
    assert rc == 0
    layers = {r["node"]: r for r in json.loads(report.read_text())["layers"]}
    assert layers["fc1"]["annotations"]["eligible"] == "true"
    assert layers["fc1"]["annotations"]["weight"] == "fc1.weight"
    row = next(line for line in text.splitlines() if line.startswith("[I] fc1 "))
    assert "axis=0" in row and "eligible=true" in row
    # Without annotations the column is empty.
    rc, text = run_cli(["inspect", case_path("custom_domain.onnx")])
    row = next(line for line in text.splitlines() if line.startswith("[I] fc1 "))
    assert "eligible=" not in row


def test_annotation_never_changes_weights(tmp_path: Path) -> None:
    out, _ = _annotate("qdq_conv.onnx", tmp_path)
    a, b = onnx.load(case_path("qdq_conv.onnx")), onnx.load(out)
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert x.SerializeToString() == y.SerializeToString()
    del b.metadata_props[:]
    assert a.SerializeToString() == b.SerializeToString()
    assert np.array_equal(
        onnx.numpy_helper.to_array(a.graph.initializer[2]), onnx.numpy_helper.to_array(b.graph.initializer[2])
    )
