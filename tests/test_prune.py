"""Tests for pruning: ``onnx-sparse prune``, PrunePass and the Python API.

Every eligible weight ends up 2:4 along its stored axis, written through its real source;
everything else in the model (every other tensor, opsets, functions, metadata, value_info,
doc strings, IR version, node names and order) stays exactly as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    CASE_MODELS,
    EXPECTED,
    case_path,
    error_lines,
    named_tensors,
    ort_run,
    pruned_weights,
    random_feed,
    sha256,
    stored_weight,
    tensor_map,
    without_provenance,
)
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse import api, io
from onnx_sparse.core import nm
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.passes.prune import PrunePass


def _weight_key(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _prune(run_cli, src: Path, out: Path, *extra: str) -> dict:
    report = out.with_suffix(".report.json")
    rc, text = run_cli(["prune", src, "-o", out, "--report", report, *extra])
    assert rc == 0, text
    assert text.strip().splitlines()[-1].startswith("[I] PASSED")
    return json.loads(report.read_text())


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def _restore(pruned: onnx.ModelProto, original: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``pruned`` with the tensors in ``names`` copied back from ``original``."""
    restored = without_provenance(pruned)
    before = tensor_map(original)
    for key, t in named_tensors(restored):
        if _weight_key(key) in names:
            t.CopyFrom(before[key])
    return restored


# --------------------------------------------------------------------------- every case model


@pytest.mark.parametrize("name", CASE_MODELS)
def test_prune_case_model(name: str, run_cli, tmp_path: Path) -> None:
    src = case_path(name)
    digest = sha256(src)
    out = tmp_path / name
    report = _prune(run_cli, src, out)
    assert sha256(src) == digest  # the input is untouched

    # check passes, the ONNX checker passes, onnxruntime runs it.
    rc, text = run_cli(["check", out])
    assert rc == 0, text
    original, pruned = onnx.load(src), onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    for y in ort_run(out, random_feed(out)):
        assert np.all(np.isfinite(y))

    # Pruned weights: 2:4 along the stored axis, same dtype/shape, exactly magnitude 2:4 of the original.
    names = pruned_weights(name)
    axes = {e.weight: e.axis for e in EXPECTED[name] if e.eligible}
    for w in names:
        before, after = stored_weight(original, w), stored_weight(pruned, w)
        assert after.dtype == before.dtype and after.shape == before.shape, w
        assert nm.is_2_4(after, axes[w]) and not nm.is_2_4(before, axes[w]), w
        np.testing.assert_array_equal(_bits(after), _bits(nm.prune_2_4(before, axes[w])), err_msg=w)
    assert {frozenset(r["nodes"]) for r in report["layers"]} == {
        frozenset(e.node for e in EXPECTED[name] if e.eligible and e.weight == w) for w in names
    }

    # Every other tensor bit-identical; with the pruned ones put back, the whole model is identical
    # (opsets, functions, metadata_props, value_info, doc strings, IR version, node names and order).
    after_map, before_map = tensor_map(pruned), tensor_map(original)
    assert list(after_map) == list(before_map)
    for key, t in after_map.items():
        if _weight_key(key) not in names:
            assert t.SerializeToString() == before_map[key].SerializeToString(), key
    assert _restore(pruned, original, names) == original

    # Idempotent: pruning the output again gives the same bytes.
    again = tmp_path / f"again_{name}"
    report2 = _prune(run_cli, out, again)
    assert again.read_bytes() == out.read_bytes()
    assert all(r["groups_changed"] == 0 and r["already_sparse"] for r in report2["layers"])


def test_everything_else_survives_on_custom_domain(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    _prune(run_cli, case_path("custom_domain.onnx"), out)
    a, b = onnx.load(case_path("custom_domain.onnx")), without_provenance(onnx.load(out))
    assert b.ir_version == a.ir_version == 10
    assert [(o.domain, o.version) for o in b.opset_import] == [("", 17), ("com.microsoft", 1), ("local", 1)]
    assert list(b.metadata_props) == list(a.metadata_props) and b.doc_string == a.doc_string
    assert list(b.graph.value_info) == list(a.graph.value_info)
    assert [(n.name, n.op_type, n.domain, n.doc_string) for n in b.graph.node] == [
        (n.name, n.op_type, n.domain, n.doc_string) for n in a.graph.node
    ]
    assert list(b.graph.node[0].metadata_props) == list(a.graph.node[0].metadata_props)
    assert [n.name for n in b.functions[0].node] == [n.name for n in a.functions[0].node]
    assert b.functions[0].doc_string == a.functions[0].doc_string
    assert nm.is_2_4(stored_weight(b, "proj.weight"), 0)  # pruned inside the function's Constant


def test_outputs_change_only_through_pruned_weights(run_cli, tmp_path: Path) -> None:
    """Running the pruned weights through numpy gives what onnxruntime gives on the pruned model."""
    out = tmp_path / "m.onnx"
    _prune(run_cli, case_path("dynamic_shapes.onnx"), out)
    feed = random_feed(out)
    (y,) = ort_run(out, feed)
    pruned = onnx.load(out)
    want = feed["x"] @ stored_weight(pruned, "proj.weight") + stored_weight(pruned, "proj.bias")
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- where the weight lives


def test_int8_qdq_weight_is_pruned_in_the_int8_tensor(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    _prune(run_cli, case_path("qdq_conv.onnx"), out)
    a, b = onnx.load(case_path("qdq_conv.onnx")), onnx.load(out)
    q0, q = stored_weight(a, "conv.weight_q"), stored_weight(b, "conv.weight_q")
    assert q.dtype == np.int8 and nm.is_2_4(q, 1)
    kept = q != 0
    np.testing.assert_array_equal(q[kept], q0[kept])
    for name in ("conv.weight_scale", "conv.weight_zero_point", "conv.bias", "x.scale", "x.zero_point"):
        assert np.array_equal(stored_weight(a, name), stored_weight(b, name)), name
    scale = stored_weight(b, "conv.weight_scale")
    assert nm.is_2_4(q.astype(np.float32) * scale[:, None, None, None], 1)  # dequantized: still 2:4


def test_nonzero_zero_point_model_is_left_alone(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = _prune(run_cli, case_path("qdq_conv_zp.onnx"), out)
    assert report["layers"] == [] and report["totals"]["tensors"] == 0
    assert onnx.load(out) == onnx.load(case_path("qdq_conv_zp.onnx"))


def test_fp16_weight_behind_cast_is_pruned_in_fp16(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = _prune(run_cli, case_path("fp16_cast.onnx"), out)
    b = onnx.load(out)
    for name, axis in (("conv.weight", 1), ("fc.weight", 0)):
        w = stored_weight(b, name)
        assert w.dtype == np.float16 and nm.is_2_4(w, axis)
    assert {r["dtype"] for r in report["layers"]} == {"float16"}
    assert stored_weight(b, "conv.bias").dtype == np.float16 and np.all(stored_weight(b, "conv.bias") != 0)


def test_constant_node_weight_is_pruned_in_the_constant(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    _prune(run_cli, case_path("constant_nodes.onnx"), out)
    b = onnx.load(out)
    assert len(b.graph.initializer) == 0
    const = next(n for n in b.graph.node if n.name == "const_conv_weight")
    assert nm.is_2_4(numpy_helper.to_array(const.attribute[0].t), 1)
    bias = next(n for n in b.graph.node if n.name == "const_conv_bias")
    assert np.all(numpy_helper.to_array(bias.attribute[0].t) != 0)


@pytest.mark.parametrize(
    ("weight", "perm", "consumer_axis"),
    [("conva.weight", [2, 0, 1], 1), ("convb.weight", [1, 2, 0], 1), ("fc.weight", [1, 0], 0)],
)
def test_transposed_weight_is_2_4_in_the_consumers_view(
    weight: str, perm: list[int], consumer_axis: int, run_cli, tmp_path: Path
) -> None:
    out = tmp_path / "m.onnx"
    _prune(run_cli, case_path("transpose_120.onnx"), out)
    stored = stored_weight(onnx.load(out), weight)
    seen = np.transpose(stored, perm)  # what the Transpose node hands the Conv / MatMul
    assert nm.is_2_4(seen, consumer_axis)
    # Polygraphy's perm.index(axis) would have pruned another stored axis; ours is not 2:4 along it.
    wrong = perm.index(consumer_axis)
    if wrong != perm[consumer_axis] and stored.shape[wrong] % 4 == 0:
        assert not nm.is_2_4(stored, wrong)


def test_rank3_matmul_weight_is_untouched(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = _prune(run_cli, case_path("mlp.onnx"), out)
    a, b = tensor_map(onnx.load(case_path("mlp.onnx"))), tensor_map(onnx.load(out))
    assert a["bmm.weight"].SerializeToString() == b["bmm.weight"].SerializeToString()
    assert "bmm.weight" not in {r["weight"] for r in report["layers"]}


@pytest.mark.parametrize(("name", "weight", "nodes"), [
    ("shared_agree.onnx", "shared.weight", ["mm1", "mm2"]),
    ("if_subgraph.onnx", "outer.weight", ["if/then_branch/then_mm_outer", "if/else_branch/else_mm_outer"]),
])  # fmt: skip
def test_shared_weight_is_pruned_once(name: str, weight: str, nodes: list[str], run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = _prune(run_cli, case_path(name), out)
    records = [r for r in report["layers"] if r["weight"] == weight]
    assert len(records) == 1 and sorted(records[0]["nodes"]) == sorted(nodes)
    assert records[0]["groups_changed"] == records[0]["groups"] == 16 * 16 // 4
    assert nm.is_2_4(stored_weight(onnx.load(out), weight), 0)


def test_shared_conflict_is_untouched(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = _prune(run_cli, case_path("shared_conflict.onnx"), out)
    assert report["layers"] == []
    assert onnx.load(out) == onnx.load(case_path("shared_conflict.onnx"))


def test_shared_weight_with_one_unselected_node_is_skipped(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = _prune(run_cli, case_path("shared_agree.onnx"), out, "--include", "mm1")
    assert report["layers"] == []
    assert onnx.load(out) == onnx.load(case_path("shared_agree.onnx"))


def _reshape_conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 16, 9)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["w", "shape"], ["wv"], name="view"),
            helper.make_node("Conv", ["x", "wv"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        initializer=[
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([8, 16, 3, 3], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_weight_behind_reshape_is_2_4_in_the_consumers_view() -> None:
    model = _reshape_conv_model()
    out = api.prune(model)
    stored = stored_weight(out, "w")
    assert nm.is_2_4(stored.reshape(8, 16, 3, 3), 1)
    assert nm.is_2_4(stored, 1)  # the stored [8, 16, 9] tensor, along C
    np.testing.assert_array_equal(stored, nm.prune_2_4(stored_weight(model, "w"), 1))
    assert nm.is_2_4(stored_weight(model, "w"), 1) is False  # the input model is untouched


# --------------------------------------------------------------------------- selection, report, annotate


@pytest.mark.parametrize(
    ("argv", "changed"),
    [
        ([], {"conv1.weight", "conv2.weight"}),
        (["--include", "conv2"], {"conv2.weight"}),
        (["--exclude", "conv2"], {"conv1.weight"}),
        (["--min-channels", "32"], {"conv2.weight"}),  # conv1 has C=16
        (["--min-channels", "65"], set()),
        (["--op", "MatMul"], set()),
    ],
)
def test_selection(argv: list[str], changed: set[str], run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = _prune(run_cli, case_path("conv_bn_folded.onnx"), out, *argv)
    a, b = tensor_map(onnx.load(case_path("conv_bn_folded.onnx"))), tensor_map(onnx.load(out))
    got = {k for k in a if a[k].SerializeToString() != b[k].SerializeToString()}
    assert got == changed
    assert {r["weight"] for r in report["layers"]} == changed


def test_report(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = _prune(run_cli, case_path("conv_bn_folded.onnx"), out)
    assert report["model"] == str(case_path("conv_bn_folded.onnx")) and report["output"] == str(out)
    a, b = onnx.load(case_path("conv_bn_folded.onnx")), onnx.load(out)
    total_kept = total = 0.0
    for r in report["layers"]:
        w0, w1 = stored_weight(a, r["weight"]), stored_weight(b, r["weight"])
        kept, all_ = float(np.abs(w1).sum(dtype=np.float64)), float(np.abs(w0).sum(dtype=np.float64))
        assert r["retained_magnitude"] == pytest.approx(kept / all_, rel=1e-6)
        assert 0.5 < r["retained_magnitude"] < 1.0
        assert r["groups"] == w0.size // 4 and r["groups_changed"] == r["groups"]  # dense: every group changes
        assert (r["params"], tuple(r["shape"]), r["axis"], r["dtype"], r["method"]) == (
            w0.size,
            w0.shape,
            1,
            "float32",
            "magnitude",
        )
        assert r["already_sparse"] is False
        total_kept += r["retained_magnitude"] * r["params"]
        total += r["params"]
    t = report["totals"]
    assert (t["tensors"], t["layers"], t["params"]) == (2, 2, 32 * 16 * 9 + 64 * 32)
    assert t["groups"] == t["groups_changed"] == t["params"] // 4
    assert t["retained_magnitude"] == pytest.approx(total_kept / total)


def test_annotate(run_cli, tmp_path: Path) -> None:
    plain, annotated = tmp_path / "plain.onnx", tmp_path / "annotated.onnx"
    report = _prune(run_cli, case_path("mlp.onnx"), plain)
    _prune(run_cli, case_path("mlp.onnx"), annotated, "--annotate")
    a, b = onnx.load(plain), onnx.load(annotated)
    props = {p.key: p.value for p in b.metadata_props}
    retained = {r["nodes"][0]: r["retained_magnitude"] for r in report["layers"]}
    for node in ("fc0", "Gemm_1", "Gemm_3"):
        assert props[f"onnx_sparse.node.{node}.pruned"] == "magnitude"
        assert float(props[f"onnx_sparse.node.{node}.retained_magnitude"]) == pytest.approx(retained[node], abs=1e-6)
        assert props[f"onnx_sparse.node.{node}.eligible"] == "true"
    assert props["onnx_sparse.node.bmm.eligible"] == "false" and "onnx_sparse.node.bmm.pruned" not in props
    del b.metadata_props[:]
    del a.metadata_props[:]  # both record their recipe (which says annotate: true in b)
    assert a == b  # annotation adds metadata and nothing else
    rc, _ = run_cli(["inspect", annotated, "--json", tmp_path / "i.json"])
    layers = {r["node"]: r for r in json.loads((tmp_path / "i.json").read_text())["layers"]}
    assert rc == 0 and layers["fc0"]["annotations"]["pruned"] == "magnitude"


def test_annotate_is_idempotent(run_cli, tmp_path: Path) -> None:
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _prune(run_cli, case_path("mlp.onnx"), first, "--annotate")
    _prune(run_cli, first, second, "--annotate")
    assert second.read_bytes() == first.read_bytes()  # the first run's retained magnitude is kept
    props = {p.key: p.value for p in onnx.load(second).metadata_props}
    assert float(props["onnx_sparse.node.fc0.retained_magnitude"]) < 1.0


# --------------------------------------------------------------------------- files


def test_refuses_to_overwrite_the_input(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    shutil.copy(case_path("mlp.onnx"), src)
    digest = sha256(src)
    rc, text = run_cli(["prune", src, "-o", src])
    assert rc == 2 and "refusing to overwrite the input model" in text and "--in-place" in text
    assert len(error_lines(text)) == 1
    rc, text = run_cli(["prune", src])
    assert rc == 2 and "no output path" in text
    assert sha256(src) == digest and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def _data_name(model_path: Path) -> str:
    """The one data file a saved model reads (``<name>.<content hash>.data``)."""
    model = onnx.load(model_path, load_external_data=False)
    names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert len(names) == 1, names
    return names.pop()


def test_in_place(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    shutil.copy(case_path("mlp.onnx"), src)
    rc, text = run_cli(["prune", src, "--in-place"])
    assert rc == 0, text
    assert run_cli(["check", src])[0] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_in_place_with_external_data(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(
        onnx.load(case_path("mlp.onnx")), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    rc, text = run_cli(["prune", src, "--in-place"])
    assert rc == 0, text
    assert run_cli(["check", src])[0] == 0
    # the old data file is replaced by one named after the new content, then removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", _data_name(src)]
    assert _data_name(src) != "m.onnx.data"
    want = nm.prune_2_4(stored_weight(onnx.load(case_path("mlp.onnx")), "fc0.weight"), 0)
    np.testing.assert_array_equal(stored_weight(onnx.load(src), "fc0.weight"), want)


def test_output_never_replaces_the_inputs_data_file(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(
        onnx.load(case_path("mlp.onnx")), src, save_as_external_data=True, location="out.onnx.data", size_threshold=0
    )
    digests = {p.name: sha256(p) for p in tmp_path.iterdir()}
    rc, text = run_cli(["prune", src, "-o", tmp_path / "out.onnx"])
    assert rc == 0, text
    assert {p.name: sha256(p) for p in tmp_path.iterdir() if p.name in digests} == digests
    assert _data_name(tmp_path / "out.onnx") != "out.onnx.data"
    assert run_cli(["check", tmp_path / "out.onnx"])[0] == 0


def test_no_output_left_behind_on_error(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path, reference=None):
        raise OnnxSparseError("onnxruntime cannot open the output: injected")

    monkeypatch.setattr(io, "verify_model", refuse)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, text = run_cli(
        ["prune", case_path("conv_bn_folded.onnx"), "-o", out_dir / "m.onnx", "--report", out_dir / "r.json"]
    )
    assert rc == 2 and "injected" in text and "Traceback" not in text
    assert list(out_dir.iterdir()) == []


def test_output_folder_missing(run_cli, tmp_path: Path) -> None:
    rc, text = run_cli(["prune", case_path("mlp.onnx"), "-o", tmp_path / "no" / "m.onnx"])
    assert rc == 2 and "output folder does not exist" in text


def test_external_data_model(run_cli, tmp_path: Path) -> None:
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "m.onnx"
    onnx.save(
        onnx.load(case_path("conv_bn_folded.onnx")),
        src,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=1024,
    )
    digests = {p.name: sha256(p) for p in src_dir.iterdir()}
    out = out_dir / "sparse.onnx"
    _prune(run_cli, src, out)
    assert {p.name: sha256(p) for p in src_dir.iterdir()} == digests
    assert sorted(p.name for p in out_dir.iterdir()) == ["sparse.onnx", _data_name(out), "sparse.report.json"]
    skeleton = onnx.load(out, load_external_data=False)
    locations = {t.name: t.data_location for t in skeleton.graph.initializer}
    assert locations == {
        "conv1.weight": TensorProto.EXTERNAL,
        "conv1.bias": TensorProto.DEFAULT,
        "conv2.weight": TensorProto.EXTERNAL,
    }
    full, original = onnx.load(out), onnx.load(case_path("conv_bn_folded.onnx"))
    for w in ("conv1.weight", "conv2.weight"):
        np.testing.assert_array_equal(stored_weight(full, w), nm.prune_2_4(stored_weight(original, w), 1))
    assert run_cli(["check", out])[0] == 0
    feed = random_feed(out)
    ort_run(out, feed)
    # Pruning the output again (external in, external out) changes nothing.
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    _prune(run_cli, out, again_dir / "sparse.onnx")
    assert (again_dir / "sparse.onnx").read_bytes() == out.read_bytes()
    assert _data_name(again_dir / "sparse.onnx") == _data_name(out)
    assert (again_dir / _data_name(out)).read_bytes() == (out_dir / _data_name(out)).read_bytes()


def test_model_without_eligible_layers(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    rc, text = run_cli(["prune", case_path("not_div4.onnx"), "-o", out])
    assert rc == 0 and "nothing to prune" in text
    assert out.read_bytes() == case_path("not_div4.onnx").read_bytes()


# --------------------------------------------------------------------------- pass and Python API


def test_prune_pass_hit_and_no_op() -> None:
    mf = io.load_model(case_path("conv_bn_folded.onnx"))
    before = mf.model.SerializeToString()
    first = PrunePass()(mf)
    assert first.modified and len(first.records) == 2
    assert mf.model.SerializeToString() == before  # functional
    second = PrunePass()(first.model)
    assert not second.modified
    assert all(r.already_sparse and r.groups_changed == 0 and r.retained_magnitude == 1.0 for r in second.records)


def test_api_prune_model_proto() -> None:
    model = onnx.load(case_path("constant_nodes.onnx"))
    before = model.SerializeToString()
    out = api.prune(model)
    assert isinstance(out, onnx.ModelProto) and out is not model
    assert model.SerializeToString() == before
    onnx.checker.check_model(out, full_check=True)
    for s in find_weight_sites(out):
        assert s.eligible and nm.is_2_4(numpy_helper.to_array(s.tensor), s.axis)
    assert all(len(t.external_data) == 0 for t in io.iter_tensors(out))


def test_api_prune_in_memory_model() -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    out = api.prune(model)
    assert model.SerializeToString() == before
    w0, w1 = numpy_helper.to_array(model.graph.initializer[0]), numpy_helper.to_array(out.graph.initializer[0])
    np.testing.assert_array_equal(w1, nm.prune_2_4(w0, 1))  # transB=1: groups along the stored last axis
    assert out.graph.initializer[1] == model.graph.initializer[1]
    feed = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    np.testing.assert_allclose(
        ort_run(out, feed)[0],
        feed["x"] @ w1.T + numpy_helper.to_array(model.graph.initializer[1]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_api_prune_options() -> None:
    model = onnx.load(case_path("conv_bn_folded.onnx"))
    out = api.prune(model, include=["conv1"], annotate=True)
    assert nm.is_2_4(stored_weight(out, "conv1.weight"), 1)
    assert not nm.is_2_4(stored_weight(out, "conv2.weight"), 1)
    assert {p.key: p.value for p in out.metadata_props}["onnx_sparse.node.conv1.pruned"] == "magnitude"


def test_api_prune_path_with_external_data(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(onnx.load(case_path("mlp.onnx")), src, save_as_external_data=True, location="m.data", size_threshold=0)
    out = api.prune(src)
    assert all(t.data_location == TensorProto.DEFAULT and not t.external_data for t in io.iter_tensors(out))
    assert nm.is_2_4(stored_weight(out, "fc0.weight"), 0)
    onnx.checker.check_model(out, full_check=True)


def test_api_prune_graphsurgeon_graph() -> None:
    import onnx_graphsurgeon as gs

    model = onnx.load(case_path("conv_bn_folded.onnx"))
    graph = gs.import_onnx(model)
    w_before = graph.tensors()["conv1.weight"].values.copy()
    out = api.prune(graph)
    exported = gs.export_onnx(out) if isinstance(out, gs.Graph) else out
    assert nm.is_2_4(stored_weight(exported, "conv1.weight"), 1)
    assert nm.is_2_4(stored_weight(exported, "conv2.weight"), 1)
    np.testing.assert_array_equal(graph.tensors()["conv1.weight"].values, w_before)  # input graph untouched
    np.testing.assert_array_equal(
        stored_weight(exported, "conv1.weight"), nm.prune_2_4(stored_weight(model, "conv1.weight"), 1)
    )


def test_prune_file_refuses_in_place_without_flag(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    shutil.copy(case_path("mlp.onnx"), src)
    with pytest.raises(OnnxSparseError, match="refusing to overwrite the input model"):
        api.prune_file(src, src)
    result = api.prune_file(src, src, in_place=True)
    assert result.modified and nm.is_2_4(stored_weight(onnx.load(src), "fc0.weight"), 0)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_prune_file_prunes_a_given_model_in_place_only_when_consumed(tmp_path: Path, method: str) -> None:
    """A loaded model handed to prune_file is left as it was, unless the caller gives it up
    (``consume``, what the CLI does): then the passes work on it rather than on a copy, so its
    weights are not held twice; the output is the same bytes either way."""
    src = case_path("mlp.onnx")
    options: dict = {"method": method}
    if method == "sparsegpt":
        options["calibration"] = [random_feed(src, seed=i) for i in range(4)]
    kept = io.load_model(src)
    before = kept.model.SerializeToString()
    api.prune_file(kept, tmp_path / "kept.onnx", **options)
    assert kept.model.SerializeToString() == before and not kept.pending
    given = io.load_model(src)
    api.prune_file(given, tmp_path / "given.onnx", consume=True, **options)
    assert nm.is_2_4(given.read(_tensor(given, "fc0.weight")), 0)  # pruned where it was loaded
    api.prune_file(src, tmp_path / "path.onnx", **options)  # loaded for the run: consumed too
    assert sha256(tmp_path / "kept.onnx") == sha256(tmp_path / "given.onnx") == sha256(tmp_path / "path.onnx")


def test_magnitude_prune_imports_no_calibration_or_int8_machinery(tmp_path: Path) -> None:
    # A magnitude prune needs neither scipy (0.1-0.2 s to import) nor the INT8 quantizer's
    # numeric core: building the CLI (whose prune has --int8 options) must not pull them in.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from onnx_sparse.cli.main import main\n"
        f"rc = main(['prune', {str(case_path('mlp.onnx'))!r}, '-o', {str(tmp_path / 'm.onnx')!r}, '-qq'])\n"
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] == 'scipy' or m == 'onnx_sparse.prune.sparsegpt'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []", out


# --------------------------------------------------------------------------- the magnitude path: private copies, reused buffers


def _matmul_chain(tmp_path: Path, shapes: list[tuple[int, int]], seed: int = 0) -> Path:
    """x -> MatMul(w0) -> MatMul(w1) -> ...: every weight external, in one data file."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, shape in enumerate(shapes):
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        prev = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", shapes[0][0]])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", shapes[-1][1]])],
        initializer=inits,
    )
    path = tmp_path / "chain.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="chain.onnx.data",
        size_threshold=0,
    )
    return path


@pytest.mark.parametrize("keeps_view", [True, False], ids=["model-keeps-the-array", "model-copies-it"])
@pytest.mark.parametrize("workers", [1, 2])
def test_magnitude_pass_reuses_a_buffer_only_when_the_model_does_not_hold_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keeps_view: bool, workers: int
) -> None:
    # Several weights, some of one size: a read buffer handed to the model as a new value must never
    # be read into again, whether ModelFile keeps that very array (pending) or stores a copy.
    shapes = [(16, 16), (16, 16), (16, 8), (8, 8), (8, 16), (16, 16)]
    src = _matmul_chain(tmp_path, shapes)
    original = {f"w{i}": stored_weight(onnx.load(src), f"w{i}") for i in range(len(shapes))}
    if not keeps_view:
        real_write = io.ModelFile.write
        monkeypatch.setattr(io.ModelFile, "write", lambda self, t, value: real_write(self, t, np.array(value)))
    import onnx_sparse.passes.prune as prune_pass

    scratches: list[int] = []
    real_copy = prune_pass.read_weight_copy

    def spy(site, mf, scratch=None):
        scratches.append(0 if scratch is None else scratch.nbytes)
        return real_copy(site, mf, scratch)

    monkeypatch.setattr(prune_pass, "read_weight_copy", spy)
    result = PrunePass(workers=workers)(io.load_model(src))
    for name, w in original.items():
        np.testing.assert_array_equal(result.model.read(_tensor(result.model, name)), nm.prune_2_4(w, 0))
    assert result.modified and all(r.groups_changed for r in result.records)
    if keeps_view:
        assert not any(scratches)  # every array read went into the model
    elif workers == 1:
        assert scratches[0] == 0 and all(scratches[1:])  # one buffer, read into again and again


def _tensor(mf: io.ModelFile, name: str) -> TensorProto:
    return next(t for t in io.iter_tensors(mf.model) if t.name == name)


def test_magnitude_pass_on_an_already_sparse_model_writes_nothing(tmp_path: Path) -> None:
    src = _matmul_chain(tmp_path, [(16, 16), (16, 16)])
    once = tmp_path / "once.onnx"
    api.prune_file(io.load_model(src), once)
    mf = io.load_model(once)
    result = PrunePass(workers=1)(mf)
    assert not result.modified and not mf.pending and not result.model.pending
    assert all(r.already_sparse and r.groups_changed == 0 for r in result.records)


def test_custom_pruner_goes_through_the_checked_path(tmp_path: Path) -> None:
    from onnx_sparse.passes.prune import magnitude_pruner

    src = _matmul_chain(tmp_path, [(16, 16), (16, 8)])
    default, custom = PrunePass()(io.load_model(src)), PrunePass(pruner=magnitude_pruner)(io.load_model(src))
    assert default.records == custom.records
    for name in ("w0", "w1"):
        np.testing.assert_array_equal(
            default.model.read(_tensor(default.model, name)), custom.model.read(_tensor(custom.model, name))
        )

    def not_2_4(site, w, zero):
        return w.copy()

    with pytest.raises(AssertionError, match="not 2:4"):
        PrunePass(pruner=not_2_4)(io.load_model(src))


def test_read_weight_copy_is_private_and_reads_into_the_scratch(tmp_path: Path) -> None:
    from onnx_sparse.graph.weights import read_weight, read_weight_copy

    src = _matmul_chain(tmp_path, [(16, 16), (16, 8)])
    mf = io.load_model(src)
    sites = {s.weight: s for s in find_weight_sites(mf.model)}
    stored = np.array(read_weight(sites["w0"], mf))
    fresh = read_weight_copy(sites["w0"], mf)
    assert fresh.flags.writeable and fresh.flags.c_contiguous
    np.testing.assert_array_equal(fresh, stored)
    fresh[...] = 0  # private: the model's data is untouched
    np.testing.assert_array_equal(read_weight(sites["w0"], mf), stored)
    scratch = np.full(16 * 16 * 4 + 100, 7, np.uint8)
    into = read_weight_copy(sites["w1"], mf, scratch)
    assert np.shares_memory(into, scratch) and into.shape == (16, 8)
    np.testing.assert_array_equal(into, read_weight(sites["w1"], mf))
    small = np.zeros(8, np.uint8)  # too small: a new array
    assert not np.shares_memory(read_weight_copy(sites["w0"], mf, small), small)
    # A pending new value is what a read gives, copied.
    mf.write(sites["w0"].tensor, np.ones((16, 16), np.float32))
    pending = read_weight_copy(sites["w0"], mf)
    np.testing.assert_array_equal(pending, np.ones((16, 16), np.float32))
    assert pending.flags.writeable and not np.shares_memory(pending, mf.read(sites["w0"].tensor))


def test_read_weight_copy_refuses_a_data_file_cut_short_after_the_load(tmp_path: Path) -> None:
    from onnx_sparse.graph.weights import read_weight_copy

    src = _matmul_chain(tmp_path, [(16, 16), (16, 8)])
    mf = io.load_model(src)
    site = next(s for s in find_weight_sites(mf.model) if s.weight == "w1")
    data = tmp_path / "chain.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(OnnxSparseError):
        read_weight_copy(site, mf)


def test_inline_weight_copy(tmp_path: Path) -> None:
    from onnx_sparse.graph.weights import read_weight, read_weight_copy

    mf = io.load_model(case_path("mlp.onnx"))
    site = next(s for s in find_weight_sites(mf.model) if s.eligible)
    copy = read_weight_copy(site, mf)
    np.testing.assert_array_equal(copy, read_weight(site, mf))
    copy[...] = 1
    assert not np.array_equal(read_weight(site, mf), copy)
