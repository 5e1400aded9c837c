"""Tests for the softmax-head refit: onnx_sparse.prune.head (the fit) and onnx_sparse.passes.head (finding heads)."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from polygraphy.json import save_json

from onnx_sparse import api
from onnx_sparse.calib import capture
from onnx_sparse.core import nm
from onnx_sparse.io import ModelFile
from onnx_sparse.passes import calibrated
from onnx_sparse.passes import head as head_pass
from onnx_sparse.passes.calibrated import CalibratedPrunePass
from onnx_sparse.passes.head import head_candidates, softmax_heads
from onnx_sparse.prune.head import mean_kl, refit_softmax_head, softmax

FEATURES, HIDDEN, CLASSES = 24, 32, 12


# --------------------------------------------------------------------------- the fit


def _problem(seed: int = 0, rows: int = 600):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)
    x = rng.normal(size=(rows, HIDDEN)) @ mix + 0.3
    w = rng.normal(size=(CLASSES, HIDDEN))
    b = rng.normal(size=CLASSES)
    p = softmax(x @ w.T + b)
    return x, w, b, p


def test_refit_lowers_held_out_kl_and_keeps_the_mask() -> None:
    x, w, b, p = _problem()
    ws = nm.prune_2_4(w, 1)
    held = np.arange(len(x)) % 4 == 3
    before = (ws.copy(), b.copy())
    w2, b2, info = refit_softmax_head(ws, b, x, p, held)
    np.testing.assert_array_equal(ws, before[0])  # inputs not modified
    np.testing.assert_array_equal(b, before[1])
    assert info.improved and info.kl_after < 0.8 * info.kl_before
    assert info.fit_rows == 450 and info.held_out_rows == 150
    np.testing.assert_array_equal(w2 == 0, ws == 0)  # the 2:4 mask is the one given
    assert nm.is_2_4(w2, 1)
    # the reported held-out KL is the real one
    assert mean_kl(p[held], x[held] @ w2.T + b2) == pytest.approx(info.kl_after)
    # and it carries to rows neither part saw
    x3, _, _, _ = _problem(seed=0, rows=900)
    x3 = x3[600:]
    p3 = softmax(x3 @ w.T + b)
    assert mean_kl(p3, x3 @ w2.T + b2) < mean_kl(p3, x3 @ ws.T + b)


def test_refit_is_the_same_on_any_number_of_workers(monkeypatch) -> None:
    # 1,200 rows: the products run in five pieces of rows side by side, summed in order
    x, w, b, p = _problem(seed=3, rows=1200)
    ws = nm.prune_2_4(w, 1)
    held = np.arange(len(x)) % 4 == 3
    outs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", threads)
        w2, b2, info = refit_softmax_head(ws, b, x, p, held)
        outs.append((w2, b2, info.best_step, info.kl_after))
    for w2, b2, step, kl in outs[1:]:
        np.testing.assert_array_equal(w2, outs[0][0])
        np.testing.assert_array_equal(b2, outs[0][1])
        assert (step, kl) == outs[0][2:]


def test_refit_keeps_a_fit_it_cannot_improve() -> None:
    x, w, b, _ = _problem(1)
    ws = nm.prune_2_4(w, 1)
    p = softmax(x @ ws.T + b)  # the pruned head is already exact
    w2, b2, info = refit_softmax_head(ws, b, x, p, np.arange(len(x)) % 4 == 0)
    assert not info.improved and info.kl_after == info.kl_before
    np.testing.assert_array_equal(w2, ws)
    np.testing.assert_array_equal(b2, b)


def test_refit_rejects_bad_shapes() -> None:
    x, w, b, p = _problem(2, rows=40)
    with pytest.raises(ValueError, match="held_out"):
        refit_softmax_head(w, b, x, p, np.zeros(40, bool))
    with pytest.raises(ValueError, match="do not match"):
        refit_softmax_head(w, b[:3], x, p, np.arange(40) % 2 == 0)
    with pytest.raises(ValueError, match="do not match"):
        refit_softmax_head(w, b, x[:, :5], p, np.arange(40) % 2 == 0)


# --------------------------------------------------------------------------- finding heads in a model


def _classifier(kind: str, seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul+Add -> Relu -> (head) -> kind, where kind spells the softmax (or not)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32)
    b1 = rng.normal(scale=0.5, size=HIDDEN).astype(np.float32)
    w2 = (rng.normal(size=(HIDDEN, CLASSES)) * 0.8).astype(np.float32)
    b2 = rng.normal(size=CLASSES).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu"),
    ]
    if kind == "gemm":
        inits += [numpy_helper.from_array(np.ascontiguousarray(w2.T), "w2"), numpy_helper.from_array(b2 * 2, "b2")]
        nodes.append(helper.make_node("Gemm", ["h", "w2", "b2"], ["z"], name="head", transB=1, alpha=1.0, beta=0.5))
    elif kind == "nobias":
        inits.append(numpy_helper.from_array(w2, "w2"))
        nodes.append(helper.make_node("MatMul", ["h", "w2"], ["z"], name="head"))
    else:
        inits += [numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")]
        nodes += [
            helper.make_node("MatMul", ["h", "w2"], ["z0"], name="head"),
            helper.make_node("Add", ["z0", "b2"], ["z"], name="head_bias"),
        ]
    if kind in ("op", "gemm", "nobias"):
        nodes.append(helper.make_node("Softmax", ["z"], ["probs"], axis=-1))
    elif kind == "log":
        nodes.append(helper.make_node("LogSoftmax", ["z"], ["probs"], axis=-1))
    elif kind == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["z"], ["probs"]))
    elif kind == "decomposed":  # as jax2tf writes it, then an Identity
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "last"))
        nodes += [
            helper.make_node("ReduceMax", ["z"], ["zmax"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["z", "zmax"], ["zs"]),
            helper.make_node("Exp", ["zs"], ["e"]),
            helper.make_node("ReduceSum", ["e", "last"], ["es"], keepdims=1),
            helper.make_node("Div", ["e", "es"], ["p0"]),
            helper.make_node("Identity", ["p0"], ["probs"]),
        ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _feeds(seed: int, n: int, rows: int = 24) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(FEATURES, FEATURES)) / np.sqrt(FEATURES)
    return [{"x": (rng.normal(size=(rows, FEATURES)) @ mix).astype(np.float32)} for _ in range(n)]


def _probs(model: onnx.ModelProto, feeds, log: bool = False) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, f)[0] for f in feeds]).astype(np.float64)
    return np.exp(out) if log else out


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return mean_kl(p, np.log(np.maximum(q, 1e-30)))


def _head_weight(model: onnx.ModelProto) -> np.ndarray:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["w2"]


@pytest.mark.parametrize("kind", ["op", "decomposed", "log", "gemm", "nobias"])
def test_softmax_heads_are_found_and_refit(kind: str, caplog) -> None:
    model = _classifier(kind)
    calib, held = _feeds(1, 16), _feeds(2, 8)
    log = kind == "log"
    dense = _probs(model, held, log)
    plain = CalibratedPrunePass("sparsegpt", calib)(model)
    with caplog.at_level(logging.INFO, logger="onnx_sparse"):
        refit = CalibratedPrunePass("sparsegpt", calib, refit_head=True)(model)
    assert "refit by KL divergence" in caplog.text
    rec = {r.nodes[0]: r for r in refit.records}
    assert rec["head"].head_refit is not None and rec["fc1"].head_refit is None
    assert rec["head"].head_refit["kl_after"] < rec["head"].head_refit["kl_before"]
    out, base = refit.model.model, plain.model.model
    onnx.checker.check_model(out)
    w, w_plain = _head_weight(out), _head_weight(base)
    axis = 1 if kind == "gemm" else 0
    assert nm.is_2_4(w, axis)
    np.testing.assert_array_equal(w == 0, w_plain == 0)  # same mask, new values
    assert not np.array_equal(w, w_plain)
    # judged on data the refit never saw
    assert _kl(dense, _probs(out, held, log)) < 0.9 * _kl(dense, _probs(base, held, log))
    if kind == "nobias":  # a bias was added, as an Add after the MatMul
        assert [n.op_type for n in out.graph.node].count("Add") == 2


def test_not_a_softmax_is_left_alone(caplog) -> None:
    model = _classifier("sigmoid")
    calib = _feeds(1, 8)
    plain = CalibratedPrunePass("sparsegpt", calib)(model)
    with caplog.at_level(logging.WARNING, logger="onnx_sparse"):
        refit = CalibratedPrunePass("sparsegpt", calib, refit_head=True)(model)
    assert "no pruned layer feeds a softmax" in caplog.text
    np.testing.assert_array_equal(_head_weight(refit.model.model), _head_weight(plain.model.model))
    assert all(r.head_refit is None for r in refit.records)


def test_the_screen_session_reads_the_weights_in_place_without_prepacking(monkeypatch) -> None:
    """The screen's one run of the whole model makes no copy of the model's weights: the large
    initializers reach onnxruntime as arrays it reads in place (no serialized copy, none parsed
    back), and pre-packing (a packed copy of every MatMul weight) is off. Same verdict as before."""
    from onnx_sparse import runtime

    model = _classifier("op")
    big = np.random.default_rng(5).normal(size=(FEATURES, 12000)).astype(np.float32)  # 1.1 MB: read in place
    model.graph.initializer.append(numpy_helper.from_array(big, "wide"))
    model.graph.node.append(helper.make_node("MatMul", ["x", "wide"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    mf = ModelFile(model)
    p = CalibratedPrunePass("sparsegpt", _feeds(1, 4))
    groups, _ = p.engine.groups(mf, p.selected_sites(mf))
    cands = head_candidates(mf, [(g.sites, g.view) for g in groups])
    seen = []
    real = capture._session

    def spy(source, threads=None, folder=None, **kw):
        seen.append((source, kw))
        return real(source, threads, folder, **kw)

    monkeypatch.setattr(capture, "_session", spy)
    kept = softmax_heads(mf, cands, _feeds(1, 1)[0])
    assert [c.site.node for c in kept] == ["head"]
    ((source, kw),) = seen
    assert isinstance(source, runtime.ModelBytes)
    assert list(source.initializers) == ["wide"] and len(source.data) < big.nbytes // 10
    np.testing.assert_array_equal(source.initializers["wide"], big)
    assert kw.get("prepack") is False


@pytest.mark.parametrize("kind", ["op", "decomposed", "log", "gemm", "nobias", "sigmoid"])
def test_one_sample_screens_the_head_candidates(kind: str) -> None:
    model = _classifier(kind)
    mf = ModelFile(model)
    p = CalibratedPrunePass("sparsegpt", _feeds(1, 4))
    groups, _ = p.engine.groups(mf, p.selected_sites(mf))
    cands = head_candidates(mf, [(g.sites, g.view) for g in groups])
    assert [c.site.node for c in cands] == ["head"]  # the graph test alone cannot tell
    kept = softmax_heads(mf, cands, _feeds(1, 1)[0])
    assert [c.site.node for c in kept] == ([] if kind == "sigmoid" else ["head"])


def test_a_model_without_softmax_head_is_not_run_in_full(monkeypatch) -> None:
    """The screen's one sample is the only extra run: neither the dense outputs nor the
    pruned model's run over every sample happen when no candidate is a softmax head."""
    runs: list[int] = []

    def counting(model, feeds, threads=None, **kwargs):
        runs.append(len(feeds))
        return capture.run_model(model, feeds, threads, **kwargs)

    monkeypatch.setattr(head_pass, "run_model", counting)
    monkeypatch.setattr(calibrated, "run_model", counting)
    CalibratedPrunePass("sparsegpt", _feeds(1, 8), refit_head=True)(_classifier("sigmoid"))
    assert runs == [1]
    runs.clear()
    CalibratedPrunePass("sparsegpt", _feeds(1, 8), refit_head=True)(_classifier("op"))
    assert runs == [1, 8]  # the screen, the dense outputs; the pruned values come from the capture
    runs.clear()
    CalibratedPrunePass("asym", _feeds(1, 8), refit_head=True)(_classifier("op"))
    assert runs == [1]  # asym's dense capture gives the dense outputs too


@pytest.mark.parametrize("method", ["sparsegpt", "asym"])
@pytest.mark.parametrize("kind", ["op", "nobias"])
def test_head_values_from_the_capture_equal_a_full_run(method: str, kind: str, monkeypatch, caplog) -> None:
    """The refit reads the pruned (and, for asym, dense) model's values from the staged capture's
    last piece; the result is the one the full runs give (bias correction inserts an Add into
    the bias-less head: the logits keep their name)."""
    model, feeds = _classifier(kind), _feeds(1, 8)
    with caplog.at_level(logging.INFO, logger="onnx_sparse"):
        fast = CalibratedPrunePass(method, feeds, refit_head=True, bias_correction=True)(model)
    assert "softmax head head refit by KL divergence" in caplog.text
    monkeypatch.setattr(calibrated.StagedRunner, "computable", lambda self, names: False)
    slow = CalibratedPrunePass(method, feeds, refit_head=True, bias_correction=True)(model)
    a = {t.name: numpy_helper.to_array(t) for t in fast.model.model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in slow.model.model.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_excluded_head_is_not_refit(caplog) -> None:
    model = _classifier("op")
    calib = _feeds(1, 8)
    with caplog.at_level(logging.WARNING, logger="onnx_sparse"):
        out = api.prune(model, method="sparsegpt", calibration=calib, refit_head=True, exclude=["head"])
    assert "no pruned layer feeds a softmax" in caplog.text
    np.testing.assert_array_equal(_head_weight(out), _head_weight(model))


def test_cli_refit_head_reports(run_cli, tmp_path) -> None:
    onnx.save(_classifier("decomposed"), tmp_path / "m.onnx")
    save_json(_feeds(1, 12), tmp_path / "in.json")
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--load-inputs",
                        tmp_path / "in.json", "--refit-head", "--report", tmp_path / "r.json"])  # fmt: skip
    assert rc == 0, text
    assert "softmax head head refit by KL divergence" in text
    layers = {r["nodes"][0]: r for r in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert layers["head"]["head_refit"]["kl_after"] < layers["head"]["head_refit"]["kl_before"]


def test_refit_head_needs_data() -> None:
    from onnx_sparse.errors import OnnxSparseError

    with pytest.raises(OnnxSparseError, match="with a head refit needs calibration data"):
        CalibratedPrunePass("magnitude", None, refit_head=True)


def test_targeted_pruning_refits_the_head_too() -> None:
    from onnx_sparse.passes.factory import make_prune_pass

    model = _classifier("op")
    calib = _feeds(1, 16)
    result = make_prune_pass("sparsegpt", calib, target_cosine=-1.0, refit_head=True)(model)
    heads = [r for r in result.records if getattr(r, "head_refit", None)]
    assert [r.nodes for r in heads] == [("head",)]
    assert heads[0].head_refit["kl_after"] < heads[0].head_refit["kl_before"]


def test_head_on_a_graph_input() -> None:
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.normal(size=(HIDDEN, CLASSES))).astype(np.float32), "w2")
    b = numpy_helper.from_array(rng.normal(size=CLASSES).astype(np.float32), "b2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w2"], ["z0"], name="head"), helper.make_node("Add", ["z0", "b2"], ["z"]),
         helper.make_node("Softmax", ["z"], ["probs"], axis=-1)],
        "head_only",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", HIDDEN])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", CLASSES])],
        [w, b],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"h": rng.normal(size=(24, HIDDEN)).astype(np.float32)} for _ in range(12)]
    result = CalibratedPrunePass("sparsegpt", calib, refit_head=True)(model)
    (rec,) = result.records
    assert rec.head_refit is not None and rec.head_refit["kl_after"] < rec.head_refit["kl_before"]


def _token_head(cols: int = 8, classes: int = 5) -> onnx.ModelProto:
    """Token classifier: softmax((x @ W + b)) per token of [batch, seq, cols]; a mask input marks padding."""
    rng = np.random.default_rng(7)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z0"], name="head"), helper.make_node("Add", ["z0", "b"], ["z"]),
         helper.make_node("Softmax", ["z"], ["p0"], axis=-1),
         helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"]), helper.make_node("Mul", ["p0", "mu"], ["probs"])],
        "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", cols]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["b", "s", classes])],
        [numpy_helper.from_array((rng.normal(size=(cols, classes)) * 1.5).astype(np.float32), "W"),
         numpy_helper.from_array(rng.normal(size=classes).astype(np.float32), "b"),
         numpy_helper.from_array(np.array([2], np.int64), "axes")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_head_refit_leaves_padding_out_with_row_mask() -> None:
    """Padded batches with row_mask refit exactly what the unpadded sentences refit."""
    rng = np.random.default_rng(0)
    mix = np.random.default_rng(9).standard_normal((8, 8)) + np.eye(8)
    padded, unpadded = [], []
    for n in (3, 5, 2, 4, 5, 1, 3, 4):
        t = (rng.standard_normal((n, 8)) @ mix).astype(np.float32)
        x = np.full((1, 5, 8), 40.0, np.float32)  # padding: big garbage activations
        x[0, :n] = t
        mask = np.zeros((1, 5), np.int64)
        mask[0, :n] = 1
        padded.append({"x": x, "mask": mask})
        unpadded.append({"x": t[None], "mask": np.ones((1, n), np.int64)})
    # the masked output is not softmax(z) at padded positions; with the mask those rows are not compared
    model = _token_head()
    runs = {}
    for name, feeds in (("masked", padded), ("clean", unpadded)):
        result = CalibratedPrunePass("sparsegpt", feeds, refit_head=True, row_mask="mask", max_rows=None)(model)
        runs[name] = result
    (rec,) = [r for r in runs["masked"].records if r.head_refit]
    assert rec.head_refit["held_out_rows"] == 4 + 4  # feeds 3 and 7: real tokens only
    got, want = (numpy_helper.to_array(next(t for t in r.model.model.graph.initializer if t.name == "W"))
                 for r in (runs["masked"], runs["clean"]))  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
