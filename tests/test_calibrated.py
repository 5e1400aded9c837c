"""Tests for onnx_sparse.passes.calibrated (calibrated one-shot 2:4 pruning), its API and CLI options."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from conftest import case_path, error_lines
from polygraphy.json import save_json
from test_calibrated_models import conv_data, convnet, mlp, mlp_data, rel_error, run, single

from onnx_sparse import api
from onnx_sparse.core import nm
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.passes.calibrated import CalibratedPrunePass, CalibratedSiteRecord
from onnx_sparse.passes.factory import make_prune_pass
from onnx_sparse.passes.prune import PrunePass


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _all_2_4(model: onnx.ModelProto) -> bool:
    sites = [s for s in find_weight_sites(model, macs=False) if s.eligible]
    return bool(sites) and all(nm.is_2_4(onnx.numpy_helper.to_array(s.tensor), s.axis) for s in sites)


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(("make", "data"), [(mlp, mlp_data), (convnet, conv_data)])
def test_calibrated_methods_beat_magnitude_on_held_out_data(make, data) -> None:
    model = make()
    calib, held = data(1, 16), data(2, 8)
    dense = run(model, held)
    err = {"magnitude": rel_error(PrunePass()(model).model.model, dense, held)}
    for method in ("wanda", "sparsegpt", "asym"):
        result = CalibratedPrunePass(method, calib)(model)
        assert result.modified and _all_2_4(result.model.model)
        err[method] = rel_error(result.model.model, dense, held)
    assert err["wanda"] < err["magnitude"]
    assert err["sparsegpt"] < 0.8 * err["magnitude"], err
    assert err["asym"] < 0.8 * err["magnitude"], err
    assert err["asym"] < 1.05 * err["sparsegpt"], err


# --------------------------------------------------------------------------- one set of statistics per input


@pytest.mark.parametrize(("method", "options"), [("asym", {"bias_correction": True}), ("sparsegpt", {})])
def test_layers_reading_one_input_share_its_statistics_to_the_bit(monkeypatch, method, options) -> None:
    """Q, K and V read one tensor: one LayerStats gathers it and the solves share the folds and
    factorisations; the weights are exactly those of three separate sets of statistics."""
    from test_calibrated_models import qkv

    from onnx_sparse.passes import calibrated

    feeds = mlp_data(3, 8)
    made: list[int] = []
    real = calibrated.LayerStats

    def counting(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrated, "LayerStats", counting)
    shared = CalibratedPrunePass(method, feeds, **options)(qkv()).model.model
    assert len(made) == 2  # x (read by q, k and v) and the attention output (read by o)
    made.clear()
    monkeypatch.setattr(calibrated, "_input_key", lambda g: (g.key,))  # every group its own statistics
    apart = CalibratedPrunePass(method, feeds, **options)(qkv()).model.model
    assert len(made) == 4
    assert shared.SerializeToString() == apart.SerializeToString()


@pytest.mark.parametrize("method", ["asym", "sparsegpt"])
def test_reused_flush_buffers_change_no_bit(monkeypatch, method) -> None:
    """The flushes join rows and take the paired difference in reused buffers (calib.stats.Scratch):
    the model is the same, byte for byte, as with new arrays every time. A 640-wide hidden layer
    takes the wide product's path (one difference of the whole); several samples per fold are joined."""
    from onnx_sparse.calib import stats

    feeds = mlp_data(5, 12)
    taken: list[str] = []
    take = stats.Scratch.take

    def counting(self, key, shape, dtype, order="C"):
        taken.append(key)
        return take(self, key, shape, dtype, order)

    monkeypatch.setattr(stats.Scratch, "take", counting)
    reused = CalibratedPrunePass(method, feeds, bias_correction=True)(mlp(hidden=640)).model.model
    assert "p" in taken and (method != "asym" or {"d", "diff"} <= set(taken))
    init = stats.LayerStats.__init__

    def fresh(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.scratch = None

    monkeypatch.setattr(stats.LayerStats, "__init__", fresh)
    taken.clear()
    new = CalibratedPrunePass(method, feeds, bias_correction=True)(mlp(hidden=640)).model.model
    assert not taken
    assert reused.SerializeToString() == new.SerializeToString()


def _wide_convnet() -> onnx.ModelProto:
    """8 -> 64 channels (3x3), 64 -> 64 (3x3: 576 columns, a wide product), 64 -> 8 (1x1)."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper

    rng = np.random.default_rng(3)
    shapes = {"c1.w": (64, 8, 3, 3), "c2.w": (64, 64, 3, 3), "c3.w": (8, 64, 1, 1)}
    inits = [
        numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32), n)
        for n, s in shapes.items()
    ]
    nodes = [
        h.make_node("Conv", ["x", "c1.w"], ["y1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["y1"], ["a1"], name="relu1"),
        h.make_node("Conv", ["a1", "c2.w"], ["y2"], name="conv2", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["y2"], ["a2"], name="relu2"),
        h.make_node("Conv", ["a2", "c3.w"], ["y"], name="conv3"),
    ]
    graph = h.make_graph(
        nodes,
        "wide_convnet",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", 8, "h", "w"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["n", 8, "h", "w"])],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("method", ["sparsegpt", "asym"])
@pytest.mark.parametrize("max_rows", [None, 100])
def test_reused_im2col_buffers_change_no_bit(monkeypatch, method, max_rows) -> None:
    """A conv layer's im2col chunks are made in arrays lent until the next flush, its passing arrays
    (a subsample's whole chunk, the channels-last input) in reused ones, and position-fastest chunks
    are joined in a reused Fortran-ordered buffer (calib.stats.RowPool, Scratch): the model is the
    same, byte for byte, as with new arrays every time. Small flushes and chunks make every buffer
    serve several times; ``max_rows`` takes the subsampled paths (gathered rows, picked rows)."""
    from onnx_sparse.calib import layers, stats

    monkeypatch.setattr(stats, "_FLUSH_VALUES", 1 << 12)
    monkeypatch.setattr(layers, "CHUNK_BYTES", 1 << 16)
    feeds = conv_data(7, 12, hw=12)
    lent: list[tuple[int, ...]] = []
    orders: set[str] = set()
    lend, take = stats.RowPool.lend, stats.Scratch.take

    def counting_lend(self, shape, dtype):
        lent.append(shape)
        return lend(self, shape, dtype)

    def counting_take(self, key, shape, dtype, order="C"):
        orders.add(f"{key.split('-')[0]}:{order}")
        return take(self, key, shape, dtype, order)

    monkeypatch.setattr(stats.RowPool, "lend", counting_lend)
    monkeypatch.setattr(stats.Scratch, "take", counting_take)
    kw = {"bias_correction": True, "max_rows": max_rows}
    reused = CalibratedPrunePass(method, feeds, **kw)(_wide_convnet()).model.model
    assert len(lent) > 20
    assert ("p:F" if max_rows is None else "rows:C") in orders, orders
    if method == "asym":
        assert ("diff:F" if max_rows is None else "diff:C") in orders, orders
    init = stats.LayerStats.__init__

    def fresh(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.scratch = None

    monkeypatch.setattr(stats.LayerStats, "__init__", fresh)
    lent.clear()
    new = CalibratedPrunePass(method, feeds, **kw)(_wide_convnet()).model.model
    assert not lent
    assert reused.SerializeToString() == new.SerializeToString()


def test_row_pool_lends_each_array_once_until_reclaimed() -> None:
    from onnx_sparse.calib.stats import RowPool

    pool = RowPool()
    a, b = pool.lend((10, 8), np.float32), pool.lend((10, 8), np.float32)
    assert not np.shares_memory(a, b) and a.flags.c_contiguous
    pool.reclaim()
    c, d = pool.lend((4, 8), np.float64), pool.lend((5, 8), np.float32)
    assert c.dtype == np.float64 and c.shape == (4, 8) and not np.shares_memory(c, d)
    assert all(np.shares_memory(x, a) or np.shares_memory(x, b) for x in (c, d))  # the same two arrays
    pool.reclaim()
    big = pool.lend((100, 8), np.float32)  # fits in neither: a new one, in place of one freed
    assert len(pool._free) == 1 and big.shape == (100, 8)


# --------------------------------------------------------------------------- sequential capture


def test_second_layer_is_fitted_to_the_pruned_first_layer() -> None:
    model = mlp()
    feeds = mlp_data(1, 6)
    fits = {}
    result = CalibratedPrunePass("sparsegpt", feeds, on_fit=lambda f: fits.setdefault(f.group.sites[0].node, f))(model)
    w = _weights(result.model.model)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    pruned_in = np.maximum(x @ w["w1"] + w["b1"], 0)
    dense_in = np.maximum(x @ _weights(model)["w1"] + w["b1"], 0)
    stats = fits["fc2"].acc.stats[0]
    assert stats.n == x.shape[0]
    np.testing.assert_allclose(stats.xtx, pruned_in.T @ pruned_in, rtol=1e-4, atol=1e-3)
    assert not np.allclose(stats.xtx, dense_in.T @ dense_in, rtol=1e-2)
    # And fc3 sees fc2 as pruned.
    pruned_in3 = np.maximum(pruned_in @ w["w2"], 0)
    np.testing.assert_allclose(fits["fc3"].acc.stats[0].xtx, pruned_in3.T @ pruned_in3, rtol=1e-4, atol=1e-3)


def test_asym_pairs_pruned_and_dense_inputs(monkeypatch) -> None:
    from onnx_sparse.passes import calibrated

    model = mlp()
    feeds = mlp_data(1, 6)
    fits = {}
    made: list[list] = []  # each layer's folds, as the solve takes them over (it lets go of what it is done with)
    real = calibrated.InputFolds

    def keeping(folds, *args, **kwargs):
        made.append(list(folds))
        return real(folds, *args, **kwargs)

    monkeypatch.setattr(calibrated, "InputFolds", keeping)
    result = CalibratedPrunePass("asym", feeds, on_fit=lambda f: fits.setdefault(f.group.sites[0].node, f))(model)
    w, w0 = _weights(result.model.model), _weights(model)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    xp = np.maximum(x @ w["w1"] + w["b1"], 0)
    xd = np.maximum(x @ w0["w1"] + w0["b1"], 0)
    folds = made[1]  # fc2's
    assert len(folds) == 4 and sum(f.n for f in folds) == x.shape[0]
    np.testing.assert_allclose(sum(f.pp for f in folds), xp.T @ xp, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(sum(f.pd for f in folds), xp.T @ xd, rtol=1e-4, atol=1e-3)
    assert fits["fc2"].refit_damp is not None


def test_row_budget_per_sample() -> None:
    result = CalibratedPrunePass("sparsegpt", conv_data(0, 3), max_rows=40)(convnet())
    # conv1: 144 positions per sample (capped at 40); conv2: 6x5 = 30; conv3 and conv4: 3x5 = 15
    assert [r.rows for r in result.records] == [120, 90, 45, 45]


# --------------------------------------------------------------------------- layouts and dtypes


@pytest.mark.parametrize(
    "name", ["transpose_120.onnx", "constant_nodes.onnx", "grouped_depthwise.onnx", "dynamic_shapes.onnx"]
)
def test_case_models_pass_check(name: str, run_cli, tmp_path) -> None:
    from onnx_sparse.calib.data import model_inputs

    model = onnx.load(case_path(name))
    shapes = [
        f"{s.name}:[{','.join(str(d) if isinstance(d, int) else '4' for d in s.shape)}]" for s in model_inputs(model)
    ]
    out = tmp_path / "out.onnx"
    rc, text = run_cli(["prune", case_path(name), "-o", out, "--method", "sparsegpt", "--input-shapes", *shapes])
    assert rc == 0, text
    assert "sparsegpt" in text
    rc, text = run_cli(["check", out])
    assert rc == 0, text


def _output_error(model: onnx.ModelProto, dense: onnx.ModelProto, feeds) -> float:
    from onnx_sparse.calib.capture import run_model

    ref = [o["y"] for o in run_model(dense, feeds)]
    got = [o["y"] for o in run_model(model, feeds)]
    return float(sum(np.sum((a - b) ** 2) for a, b in zip(ref, got, strict=True)))


def test_int8_weights_are_requantized_with_their_scale() -> None:
    """SparseGPT's updates survive on an int8 weight behind DequantizeLinear: requantized, not dropped."""
    model = onnx.load(case_path("qdq_conv.onnx"))
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((16, 16)) * 0.7 + np.eye(16)  # correlated channels: where SparseGPT pays off
    feeds = [
        {"x": (rng.standard_normal((1, 8, 8, 16)) @ mix).transpose(0, 3, 1, 2).astype(np.float32)} for _ in range(8)
    ]
    result = CalibratedPrunePass("sparsegpt", feeds)(model)
    (rec,) = result.records
    assert rec.method == "sparsegpt" and rec.dtype == "int8"
    before = _weights(model)["conv.weight_q"]
    after = _weights(result.model.model)["conv.weight_q"]
    assert after.dtype == np.int8 and nm.is_2_4(after, 1)
    kept = after != 0
    assert not np.array_equal(after[kept], before[kept])  # the updates were stored
    assert np.abs(after.astype(int)).max() <= 127
    # What storing only the mask would give (the old behaviour), against the requantized update:
    mask_only = onnx.ModelProto()
    mask_only.CopyFrom(model)
    for t in mask_only.graph.initializer:
        if t.name == "conv.weight_q":
            t.CopyFrom(onnx.numpy_helper.from_array(np.where(kept, before, 0).astype(np.int8), t.name))
    ours, masked = _output_error(result.model.model, model, feeds), _output_error(mask_only, model, feeds)
    assert ours < 0.8 * masked, (ours, masked)


def test_fake_quantized_float_weights_store_the_update() -> None:
    model = onnx.load(case_path("q_float_conv.onnx"))
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32)} for _ in range(8)]
    result = CalibratedPrunePass("sparsegpt", feeds)(model)
    before, after = _weights(model)["conv.weight"], _weights(result.model.model)["conv.weight"]
    assert after.dtype == np.float32 and nm.is_2_4(after, 1)
    kept = after != 0
    assert not np.allclose(after[kept], before[kept])
    assert _all_2_4(result.model.model)


def test_fp16_weights_are_updated_and_rounded() -> None:
    model = onnx.load(case_path("fp16_cast.onnx"))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 8, 8, 8)).astype(np.float32), "v": rng.standard_normal((2, 32)).astype(np.float32)}
             for _ in range(4)]  # fmt: skip
    result = CalibratedPrunePass("sparsegpt", feeds)(model)
    assert {r.dtype for r in result.records} == {"float16"}
    before, after = _weights(model), _weights(result.model.model)
    for name in ("conv.weight", "fc.weight"):
        assert after[name].dtype == np.float16
        kept = after[name] != 0
        assert not np.array_equal(after[name][kept], before[name][kept])  # SparseGPT moved the kept weights
    assert _all_2_4(result.model.model)


def test_layers_that_cannot_be_calibrated_fall_back_to_magnitude(caplog) -> None:
    model = onnx.load(case_path("gemm_const_a.onnx"))
    from onnx_sparse.calib.data import model_inputs

    (spec,) = model_inputs(model)
    shape = tuple(d if isinstance(d, int) else 4 for d in spec.shape)
    feeds = [{spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}]
    with caplog.at_level(logging.INFO, logger="onnx_sparse"):
        result = CalibratedPrunePass("sparsegpt", feeds)(model)
    (rec,) = result.records
    assert isinstance(rec, CalibratedSiteRecord) and rec.method == "magnitude" and "A input" in rec.note
    assert "magnitude instead of sparsegpt" in caplog.text
    assert _all_2_4(result.model.model)


def test_subgraph_sites_are_calibrated_in_their_bodies() -> None:
    """Layers inside If branches are fitted on what their branch sees (issue 21; tests/test_bodies.py);
    a branch no sample takes is pruned by magnitude and says so."""
    from onnx_sparse.passes.bodies import NOT_REACHED

    model = onnx.load(case_path("if_subgraph.onnx"))
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    result = CalibratedPrunePass("sparsegpt", [{"cond": np.array(True), "x": x}] * 2)(model)
    methods = {r.nodes[0].split("/")[1]: r.method for r in result.records if len(r.nodes) == 1}
    assert methods == {"then_branch": "sparsegpt", "else_branch": "magnitude"}
    assert all(r.note == NOT_REACHED for r in result.records if r.method == "magnitude")


def test_needs_data_and_valid_options() -> None:
    with pytest.raises(OnnxSparseError, match="needs calibration data"):
        CalibratedPrunePass("sparsegpt")
    with pytest.raises(OnnxSparseError, match="unknown pruning method"):
        CalibratedPrunePass("obs", [])
    with pytest.raises(OnnxSparseError, match="blocksize"):
        CalibratedPrunePass("sparsegpt", [], blocksize=6)
    assert isinstance(make_prune_pass(), PrunePass)
    assert isinstance(make_prune_pass(calibration=mlp_data(0, 1)), CalibratedPrunePass)
    with pytest.raises(OnnxSparseError, match="dtype"):
        CalibratedPrunePass("sparsegpt", [{"x": np.zeros((2, 32))}])(mlp())


# --------------------------------------------------------------------------- bias correction


def _means(model: onnx.ModelProto, feeds) -> np.ndarray:
    out = run(model, feeds)
    axes = (0, 2, 3) if out[0].ndim == 4 else (0,)
    return np.mean([o.mean(axis=axes) for o in out], axis=0)


@pytest.mark.parametrize("op", ["Conv", "MatMul", "Gemm"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("method", ["sparsegpt", "asym", "magnitude"])
def test_bias_correction_keeps_the_mean_output(op: str, bias: bool, method: str) -> None:
    model = single(op, bias)
    if op == "Conv":
        feeds = conv_data(3, 4)  # mean 0.5: padding changes the mean of border rows
    else:
        feeds = [{"x": f["x"] + 1.0} for f in mlp_data(3, 4)]
    dense = _means(model, feeds)
    plain = _means(CalibratedPrunePass(method, feeds)(model).model.model, feeds)
    result = CalibratedPrunePass(method, feeds, bias_correction=True)(model)
    corrected = _means(result.model.model, feeds)
    scale = np.abs(dense).max()
    assert np.abs(plain - dense).max() > 1e-2 * scale
    np.testing.assert_allclose(corrected, dense, atol=1e-4 * scale)
    assert result.records[0].bias_corrected
    pruned = result.model.model
    onnx.checker.check_model(pruned)
    assert _all_2_4(pruned)
    ops = [n.op_type for n in pruned.graph.node]
    if op == "MatMul":
        assert ops == ["MatMul", "Add"]  # an existing bias Add is updated; otherwise one is inserted
        assert [n.output[0] for n in pruned.graph.node][-1] == "y"
        if not bias:
            assert pruned.graph.node[1].name.endswith("bias_correction")
    else:
        assert ops == [op] and len(pruned.graph.node[0].input) == 3


def test_bias_correction_leaves_a_shared_bias_alone(caplog) -> None:
    model = single("Conv", True)
    # a second reader of the bias makes it shared
    model.graph.node.append(onnx.helper.make_node("Identity", ["b"], ["b_copy"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("b_copy", onnx.TensorProto.FLOAT, [16]))
    with caplog.at_level(logging.INFO, logger="onnx_sparse"):
        result = CalibratedPrunePass("sparsegpt", conv_data(0, 2), bias_correction=True)(model)
    assert "shared" in caplog.text and not result.records[0].bias_corrected
    np.testing.assert_array_equal(_weights(result.model.model)["b"], _weights(model)["b"])


# --------------------------------------------------------------------------- API and CLI


def test_api_prune_with_calibration() -> None:
    model = mlp()
    feeds, held = mlp_data(1, 8), mlp_data(2, 4)
    dense = run(model, held)
    sparse = api.prune(model, method="sparsegpt", calibration=feeds)
    assert isinstance(sparse, onnx.ModelProto) and _all_2_4(sparse)
    default = api.prune(model, calibration=feeds)  # data given: the default recipe, asym + bias + head refit
    best = api.prune(model, method="asym", bias_correction=True, refit_head=True, calibration=feeds)
    assert rel_error(default, dense, held) == pytest.approx(rel_error(best, dense, held))
    assert rel_error(sparse, dense, held) < rel_error(api.prune(model), dense, held)
    corrected = api.prune(model, method="wanda", calibration=feeds, bias_correction=True)
    assert _all_2_4(corrected)
    with pytest.raises(OnnxSparseError, match="calibration data"):
        api.prune(model, method="sparsegpt")


def test_cli_load_inputs(run_cli, tmp_path) -> None:
    onnx.save(mlp(), tmp_path / "m.onnx")
    save_json(mlp_data(0, 4), tmp_path / "in.json")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", out, "--load-inputs", tmp_path / "in.json",
                        "--report", report, "--calib-samples", "3"])  # fmt: skip
    assert rc == 0, text
    assert "[3/3] fc3 asym" in text and "RANDOM" not in text and not error_lines(text)
    assert "recipe: asym + bias correction + head refit (the default with calibration data" in text
    doc = json.loads(report.read_text())
    assert doc["method"] == "asym" and doc["calibration"] == {"random": False}
    assert doc["recipe"]["bias_correction"] is True and doc["recipe"]["refit_head"] is True
    assert [layer["rows"] for layer in doc["layers"]] == [48, 48, 48]
    assert run_cli(["check", out])[0] == 0


def test_cli_data_loader_script(run_cli, tmp_path) -> None:
    onnx.save(convnet(), tmp_path / "m.onnx")
    script = tmp_path / "data.py"
    script.write_text(
        "import numpy as np\n"
        "def feeds():\n"
        "    rng = np.random.default_rng(0)\n"
        "    return [{'x': rng.standard_normal((1, 8, 10, 10)).astype(np.float32)} for _ in range(3)]\n"
    )
    out = tmp_path / "o.onnx"
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", out, "--data-loader-script", f"{script}:feeds",
                        "--method", "asym", "--bias-correction"])  # fmt: skip
    assert rc == 0, text
    assert "[4/4] conv4 asym" in text and "RANDOM" not in text
    assert run_cli(["check", out])[0] == 0


def test_cli_random_data_warns(run_cli, tmp_path) -> None:
    onnx.save(convnet(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", out, "--method", "wanda", "--input-shapes",
                        "x:[1,8,9,9]", "--iterations", "2", "--seed", "3"])  # fmt: skip
    assert rc == 0, text
    warnings = [line for line in text.splitlines() if line.startswith("[W]") and "RANDOM" in line]
    assert len(warnings) == 1  # once per command (issue 21): at the end, after the result
    assert "2 sample(s) of RANDOM data" in text


def test_cli_bad_data_is_a_user_error(run_cli, tmp_path) -> None:
    onnx.save(mlp(), tmp_path / "m.onnx")
    save_json([{"x": np.zeros((2, 32), np.float64)}], tmp_path / "in.json")
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--load-inputs", tmp_path / "in.json"])
    assert rc == 2 and "dtype float64" in text
    assert not (tmp_path / "o.onnx").exists()


def test_cli_magnitude_needs_no_data(run_cli, tmp_path, caplog) -> None:
    onnx.save(mlp(), tmp_path / "m.onnx")
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx"])
    assert rc == 0 and "RANDOM" not in text and "magnitude" in text


def _masked_matmul(cols: int = 8, out: int = 6) -> onnx.ModelProto:
    """y = (x @ W) * mask: like a transformer layer, padded tokens still carry activations."""
    w = np.random.default_rng(5).standard_normal((cols, out)).astype(np.float32)
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "W"], ["xw"], name="fc"),
        onnx.helper.make_node("Cast", ["mask"], ["mf"], to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"]),
        onnx.helper.make_node("Mul", ["xw", "mu"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "masked",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", "s", cols]),
            onnx.helper.make_tensor_value_info("mask", onnx.TensorProto.INT64, ["b", "s"]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", "s", out])],
        [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(np.array([2], np.int64), "axes")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _tokens(rng: np.random.Generator, n: int, cols: int = 8) -> np.ndarray:
    mix = np.random.default_rng(9).standard_normal((cols, cols)) + np.eye(cols)
    return (rng.standard_normal((n, cols)) @ mix).astype(np.float32)


@pytest.mark.parametrize("method", ["sparsegpt", "asym"])
def test_padding_rows_are_left_out_with_row_mask(method: str) -> None:
    """A padded batch with row_mask fits exactly what the unpadded sentences fit."""
    rng = np.random.default_rng(0)
    lengths = [(3, 5), (4, 2), (5, 5), (1, 4)]
    padded, unpadded = [], []
    for a, b in lengths:
        ta, tb = _tokens(rng, a), _tokens(rng, b)
        x = np.full((2, 5, 8), 40.0, np.float32)  # padding: big garbage activations
        x[0, :a], x[1, :b] = ta, tb
        mask = np.zeros((2, 5), np.int64)
        mask[0, :a], mask[1, :b] = 1, 1
        padded.append({"x": x, "mask": mask})
        unpadded.append({"x": np.concatenate([ta, tb])[None], "mask": np.ones((1, a + b), np.int64)})
    model = _masked_matmul()
    seen: list = []
    masked = CalibratedPrunePass(method, padded, row_mask="mask", max_rows=None, on_fit=seen.append)(model)
    clean = CalibratedPrunePass(method, unpadded, row_mask="mask", max_rows=None)(model)
    blind = CalibratedPrunePass(method, padded, max_rows=None)(model)
    got, want, bad = (_weights(r.model.model)["W"] for r in (masked, clean, blind))
    assert seen[0].acc.masked == len(padded) and seen[0].rows == sum(a + b for a, b in lengths)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, bad, atol=1e-3)  # without the mask the padding skews the fit
    # and the masked fit is the better one on the real tokens
    dense_w = _weights(model)["W"].astype(np.float64)
    real = np.concatenate([f["x"][0] for f in unpadded]).astype(np.float64)
    err = {k: float(np.sum((real @ dense_w - real @ w.astype(np.float64)) ** 2)) for k, w in (("m", got), ("b", bad))}
    assert err["m"] < err["b"]


def test_row_mask_must_be_an_input(run_cli, tmp_path) -> None:
    from polygraphy.json import save_json

    onnx.save(_masked_matmul(), tmp_path / "m.onnx")
    feed = {"x": np.ones((1, 4, 8), np.float32), "mask": np.ones((1, 4), np.int64)}
    save_json([feed, feed], tmp_path / "in.json")
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--load-inputs",
                        tmp_path / "in.json", "--mask-input", "attention_mask"])  # fmt: skip
    assert rc == 2 and "'attention_mask' is not an input of the model" in text and "Traceback" not in text
    assert not (tmp_path / "o.onnx").exists()
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--load-inputs",
                        tmp_path / "in.json", "--mask-input", "mask", "-v"])  # fmt: skip
    assert rc == 0 and "padding left out of 2 samples" in text


def test_row_mask_ignored_by_magnitude_says_so(run_cli, tmp_path) -> None:
    onnx.save(_masked_matmul(), tmp_path / "m.onnx")
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--mask-input", "attention_mask"])
    assert rc == 0 and "calibration data options are ignored: magnitude pruning needs no data" in text


def test_row_mask_ignored_by_magnitude_api_says_so(caplog) -> None:
    from onnx_sparse import api

    with caplog.at_level("WARNING"):
        api.prune(_masked_matmul(), row_mask="attention_mask")
    assert "--mask-input 'attention_mask' is ignored: magnitude pruning reads no data" in caplog.text
