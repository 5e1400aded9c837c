"""INT8 Q/DQ quantization (onnx_sparse.quant) and ``onnx-sparse quantize`` / ``prune --int8``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import case_path, error_lines, ort_run, sha256
from onnx import numpy_helper
from polygraphy.json import save_json

from onnx_sparse import api, runtime
from onnx_sparse.core import nm
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.quant import QuantizeOptions, quantize, quantize_file

_SHAPES = {
    "conv_bn_folded.onnx": {"x": (2, 16, 8, 8)},
    "mlp.onnx": {"x": (2, 64), "x3": (2, 2, 16)},
    "constant_nodes.onnx": {"x": (2, 8, 8, 8)},
    "grouped_depthwise.onnx": {"x": (2, 8, 8, 8)},
}


def _feeds(model: onnx.ModelProto, n: int = 6, seed: int = 0) -> list[dict[str, np.ndarray]]:
    from onnx_sparse.calib.data import model_inputs

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for spec in model_inputs(model):
            shape = [d if isinstance(d, int) else 2 for d in spec.shape or ()]
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        out.append(feed)
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", ["conv_bn_folded.onnx", "mlp.onnx", "constant_nodes.onnx"])
def test_every_eligible_layer_is_sparse_int8(name: str, tmp_path: Path) -> None:
    """The structure: with every layer kept INT8 (no fidelity target), every eligible layer is INT8
    in / 2:4 weight / out. With the default target, a layer left float is one the fidelity search
    gave back to float, and says so (on these toy models with random feeds and one held-out feed,
    whether the target is met depends on the last bits of the CPU's BLAS)."""
    pruned = api.prune(onnx.load(case_path(name)))
    feeds = _feeds(pruned)
    result = quantize(pruned, feeds, QuantizeOptions(target_cosine=None))
    model = result.model.model
    onnx.checker.check_model(model, full_check=True)
    # no node whose output nobody reads (an outlier rescaling once added a Mul for a tensor that no
    # INT8 layer reads and whose producer could not take the rescaling: constant_nodes' relu_out)
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    assert [n.name for n in model.graph.node if not set(n.output) & read] == []
    for layer in result.layers:
        if layer.eligible:
            assert layer.sparse_int8, (layer.node, layer.int8)
            assert layer.int8 is not None and layer.int8.possible
    for layer in quantize(pruned, feeds).layers:
        if layer.eligible and not layer.sparse_int8:
            assert not layer.quantized and layer.reason.startswith("mixed precision: output cosine"), layer
    # still the same function, to INT8 precision: Q/DQ as written (onnxruntime's fused integer kernels
    # saturate 16-bit sums on CPUs without VNNI: 0.961 here on an AVX2-only CPU for constant_nodes)
    plain = runtime.session(model, optimize=False)
    for a, b in zip(ort_run(pruned, feeds[0]), plain.run(None, feeds[0]), strict=True):
        assert _cosine(a, b) > 0.99


@pytest.mark.parametrize("name", ["conv_bn_folded.onnx", "mlp.onnx"])
def test_zeros_survive_exactly_with_zero_point_0_and_output_channel_scales(name: str) -> None:
    pruned = api.prune(onnx.load(case_path(name)))
    result = quantize(pruned, _feeds(pruned))
    model = result.model.model
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    float_w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for site in find_weight_sites(model):
        if not site.eligible:
            continue
        assert site.dtype == "int8" and site.quant is not None
        q = inits[site.weight]
        dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == site.weight)
        assert not np.any(inits[dq.input[2]]), "zero point must be 0"
        assert nm.is_2_4(q, site.axis)
        # the zeros are exactly the float model's zeros
        original = float_w[dq.output[0].removesuffix("_DequantizeLinear_Output")]
        assert np.array_equal(q == 0, original == 0)
        scale = inits[dq.input[1]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert scale.size == q.shape[axis] and axis != site.axis  # per output channel


def test_input_is_not_modified_and_left_out_layers_are_listed() -> None:
    model = onnx.load(case_path("transpose_120.onnx"))
    before = model.SerializeToString()
    with pytest.raises(OnnxSparseError, match="no layer to quantize"):
        quantize(model, _feeds(model))
    assert model.SerializeToString() == before
    pruned = api.prune(onnx.load(case_path("mlp.onnx")))
    before = pruned.SerializeToString()
    result = quantize(pruned, _feeds(pruned), QuantizeOptions(exclude=("fc0",)))
    assert pruned.SerializeToString() == before
    by_node = {layer.node: layer for layer in result.layers}
    assert not by_node["fc0"].quantized and "selection" in by_node["fc0"].reason
    assert by_node["Gemm_1"].quantized and by_node["Gemm_3"].sparse_int8
    # fc0 stays float: the next Gemm's input still comes from a DequantizeLinear (the quantizer adds it)
    assert by_node["fc0"].int8 is not None and "not stored quantized" in by_node["fc0"].int8.weight


def test_no_feeds_and_bad_options_are_user_errors() -> None:
    model = onnx.load(case_path("mlp.onnx"))
    with pytest.raises(OnnxSparseError, match="calibration data"):
        quantize(model, [])
    with pytest.raises(OnnxSparseError, match="calibration method"):
        QuantizeOptions(calibration="bogus")


def test_percentile_calibration_runs() -> None:
    pruned = api.prune(onnx.load(case_path("conv_bn_folded.onnx")))
    result = quantize(pruned, _feeds(pruned), QuantizeOptions(calibration="percentile", percentile=99.9))
    assert all(layer.sparse_int8 for layer in result.layers)


# --------------------------------------------------------------------------- CLI


def _inputs_json(model_path: Path, tmp_path: Path) -> Path:
    path = tmp_path / "calib.json"
    save_json(_feeds(onnx.load(model_path)), str(path))
    return path


def test_cli_quantize_then_check(run_cli, tmp_path: Path) -> None:
    src = case_path("conv_bn_folded.onnx")
    pruned = tmp_path / "p.onnx"
    assert run_cli(["prune", src, "-o", pruned])[0] == 0
    digest = sha256(pruned)
    out = tmp_path / "q.onnx"
    rc, text = run_cli(["quantize", pruned, "-o", out, "--load-inputs", _inputs_json(src, tmp_path),
                        "--report", tmp_path / "r.json"])  # fmt: skip
    assert rc == 0, text
    assert "sparse INT8 possible" in text and "2 of 2 2:4-eligible layers sparse INT8 possible" in text
    assert sha256(pruned) == digest
    assert run_cli(["check", out])[0] == 0
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert [layer["sparse_int8_possible"] for layer in report["layers"]] == [True, True]


def test_cli_prune_int8_loads_the_data_once(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx_sparse.calib.data as data

    calls = []
    real = data.load_calibration

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "load_calibration", counting)
    src = case_path("mlp.onnx")
    out = tmp_path / "m.int8.onnx"
    rc, text = run_cli(["prune", src, "-o", out, "--method", "wanda", "--int8",
                        "--load-inputs", _inputs_json(src, tmp_path), "--report", tmp_path / "r.json"])  # fmt: skip
    assert rc == 0, text
    assert len(calls) == 1
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    (tmp_path / "r.json").unlink()
    assert {x["node"] for x in report["int8"] if x["sparse_int8_possible"]} == {"fc0", "Gemm_1", "Gemm_3"}
    assert run_cli(["check", out])[0] == 0
    sites = {s.node: s for s in find_weight_sites(onnx.load(out))}
    assert all(sites[n].int8 is not None and sites[n].int8.possible for n in ("fc0", "Gemm_1", "Gemm_3"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.json", "m.int8.onnx"]


def test_cli_prune_int8_failure_leaves_no_output(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx_sparse.quant as quant

    def broken(*args, **kwargs):
        raise OnnxSparseError("quantizer broke")

    from onnx_sparse.quant import static

    monkeypatch.setattr(quant, "finish", broken)
    monkeypatch.setattr(static, "finish", broken)  # smooth_finish's
    out = tmp_path / "m.int8.onnx"
    rc, text = run_cli(["prune", case_path("mlp.onnx"), "-o", out, "--int8", "--input-shapes", "x:[2,64]",
                        "x3:[2,2,16]"])  # fmt: skip
    assert rc == 2 and error_lines(text)
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_needs_an_output(run_cli) -> None:
    rc, text = run_cli(["quantize", case_path("mlp.onnx")])
    assert rc == 2 and "no output path" in text


def test_quantize_file_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    src = case_path("mlp.onnx")
    with pytest.raises(OnnxSparseError, match="refusing"):
        quantize_file(src, src, _feeds(onnx.load(src)))


@pytest.mark.parametrize("name", ["ppocr_cls", "magika", "minilm_l3"])
def test_real_models_every_eligible_layer_sparse_int8(name: str, real_model) -> None:
    """Real models (opset 11 with Constant weights, ML domain, a transformer): all eligible layers
    end INT8 in/weight/out and 2:4 with no fidelity target; what stays float is listed with its reason."""
    path = real_model(name)
    pruned = api.prune(onnx.load(path))
    result = quantize(pruned, _feeds(pruned, n=2), QuantizeOptions(target_cosine=None))
    onnx.checker.check_model(result.model.model)
    eligible = [layer for layer in result.layers if layer.eligible]
    assert eligible and all(layer.sparse_int8 for layer in eligible)
    for layer in result.layers:
        assert layer.quantized or layer.reason
    ort_run(result.model.model, _feeds(pruned, n=1)[0])


def test_ineligible_layers_stay_float_unless_all() -> None:
    pruned = api.prune(onnx.load(case_path("grouped_depthwise.onnx")))
    feeds = _feeds(pruned)
    by_node = {layer.node: layer for layer in quantize(pruned, feeds).layers}
    assert by_node["gconv"].sparse_int8
    for node in ("dwconv", "g6conv"):
        assert not by_node[node].quantized and "not 2:4 eligible" in by_node[node].reason
    every = {layer.node: layer for layer in quantize(pruned, feeds, QuantizeOptions(layers="all")).layers}
    assert all(layer.quantized for layer in every.values()) and every["gconv"].sparse_int8
    with pytest.raises(OnnxSparseError, match="layer set"):
        QuantizeOptions(layers="some")


def test_int8_errors_are_measured_per_layer() -> None:
    pruned = api.prune(onnx.load(case_path("conv_bn_folded.onnx")))
    result = quantize(pruned, _feeds(pruned))
    for layer in result.layers:
        assert layer.error is not None and layer.error.input is not None and layer.error.output is not None
        # conv2's input is Relu of conv1's already-quantized output: requantizing it can lose nothing
        assert 0.0 <= layer.error.input < 0.1 and 0.0 < layer.error.output < 0.1
    assert result.layers[0].error.input > 0.0
    assert result.layers[0].to_json()["int8_error_output"] == result.layers[0].error.output


def test_max_error_leaves_the_worst_layers_float() -> None:
    pruned = api.prune(onnx.load(case_path("mlp.onnx")))
    feeds = _feeds(pruned)
    first = {x.node: x.error.worst for x in quantize(pruned, feeds).layers if x.error is not None}
    assert len(first) == 3
    limit = sorted(first.values())[1] - 1e-9  # the two worst are above it
    result = quantize(pruned, feeds, QuantizeOptions(max_error=limit))
    by_node = {x.node: x for x in result.layers}
    above = {n for n, e in first.items() if e > limit}
    assert len(above) == 2
    for n in first:
        assert by_node[n].quantized is (n not in above)
        if n in above:
            assert "INT8 error" in by_node[n].reason and by_node[n].error is not None
    with pytest.raises(OnnxSparseError, match="every layer"):
        quantize(pruned, feeds, QuantizeOptions(max_error=1e-12))
    with pytest.raises(OnnxSparseError, match="positive"):
        QuantizeOptions(max_error=0.0)


def test_the_fallback_search_weighs_each_layer_by_its_parameters() -> None:
    """The mixed-precision search is handed each layer's parameter count (readiness is a share of
    parameters): its first step's bar is its share of the INT8 parameters times the loss."""
    pruned = api.prune(onnx.load(case_path("mlp.onnx")))
    params = {s.node: int(np.prod(s.shape)) for s in find_weight_sites(pruned, macs=False) if s.eligible}
    result = quantize(pruned, _feeds(pruned, n=8), QuantizeOptions(target_cosine=1.0, holdout=0.5))
    fb = result.fallback
    assert fb is not None and fb.steps and fb.start < 1.0
    first = fb.steps[0]
    assert len(set(params.values())) > 1  # layers of different sizes: the bar tells them apart
    assert first.needed == pytest.approx((1.0 - fb.start) * params[first.layer] / sum(params.values()), rel=1e-9)


def test_the_recipe_carries_int8_from_cli_to_file_to_api(run_cli, tmp_path: Path) -> None:
    """``prune --int8 --save-recipe`` then ``--recipe`` reproduces the Q/DQ model byte for byte, the
    output says how it was made (INT8 included), and the Python API honours ``recipe.int8``."""
    import json

    from onnx_sparse.recipe import META_RECIPE, Recipe

    src = case_path("mlp.onnx")
    calib = _inputs_json(src, tmp_path)
    first, again = tmp_path / "a.onnx", tmp_path / "b.onnx"
    rc, text = run_cli(["prune", src, "-o", first, "--method", "sparsegpt", "--int8", "--int8-layers", "all",
                        "--load-inputs", calib, "--save-recipe", tmp_path / "r.json"])  # fmt: skip
    assert rc == 0, text
    saved = Recipe.load(tmp_path / "r.json")
    assert saved.int8 and saved.int8_layers == "all"
    assert run_cli(["prune", src, "-o", again, "--recipe", tmp_path / "r.json", "--load-inputs", calib])[0] == 0
    assert sha256(first) == sha256(again)
    meta = {p.key: p.value for p in onnx.load(first).metadata_props}
    assert json.loads(meta[META_RECIPE])["int8"] is True
    via_api = tmp_path / "c.onnx"
    feeds = _feeds(onnx.load(src))
    result = api.prune_file(src, via_api, saved, calibration=feeds)
    assert any(getattr(r, "sparse_int8", False) for r in result.records)
    assert all(s.int8 is not None for s in find_weight_sites(onnx.load(via_api)) if s.node in ("fc0", "Gemm_1"))
    with pytest.raises(OnnxSparseError, match="needs calibration data"):
        api.prune_file(src, tmp_path / "d.onnx", saved.replace(method="magnitude"))
    with pytest.raises(OnnxSparseError, match="unknown layer set"):
        Recipe(int8=True, int8_layers="some")


def test_the_walks_integers_are_stored_without_a_second_rounding() -> None:
    """A weight already on a grid whose largest integer is below 127 (the joint walk's case after its
    updates): the Q/DQ model stores exactly those integers and scales; rounding afresh would not."""
    from onnx_sparse.quant import candidates, finish, prepare
    from onnx_sparse.quant.assemble import find_layers, quantize_weight

    model = prepare(api.prune(onnx.load(case_path("mlp.onnx"))))
    options = QuantizeOptions(target_cosine=None, smooth=False)
    nodes, reasons = candidates(model, options)
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    given = {}
    for x in find_layers(model, nodes):
        w = onnx.numpy_helper.to_array(inits[x.weight])
        c = w.shape[x.w_out_axis]
        scale = rng.uniform(0.01, 0.02, size=c).astype(np.float32)
        shape = [1] * w.ndim
        shape[x.w_out_axis] = c
        ints = np.where(w == 0, 0, rng.integers(1, 91, size=w.shape) * rng.choice([-1, 1], size=w.shape))
        inits[x.weight].CopyFrom(
            onnx.numpy_helper.from_array((ints * scale.reshape(shape)).astype(np.float32), x.weight)
        )
        given[x.weight] = (ints.astype(np.int8), scale, x.w_out_axis)
    result = finish(
        model, nodes, reasons, _feeds(model), options, {k: v[1].astype(np.float64) for k, v in given.items()}
    )
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.model.graph.initializer}
    assert len(given) == 3
    for name, (ints, scale, axis) in given.items():
        assert np.array_equal(stored[f"{name}_quantized"], ints)
        assert np.array_equal(stored[f"{name}_scale"], scale)
        shape = [1] * ints.ndim
        shape[axis] = -1
        _, fresh_scale = quantize_weight(ints * scale.reshape(shape), axis)
        assert not np.array_equal(fresh_scale, scale)  # what a second rounding would have stored


def test_api_prune_with_int8_returns_the_sparse_int8_model() -> None:
    """api.prune(model, Recipe(int8=True), calibration=...) is prune --int8 in memory (it used to
    return the FP32 prune and ignore the setting); without data it is one clear error."""
    from onnx_sparse import Recipe

    model = onnx.load(case_path("mlp.onnx"))
    feeds = _feeds(model)
    out = api.prune(model, Recipe(int8=True), calibration=feeds)
    onnx.checker.check_model(out, full_check=True)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in out.graph.node}
    for site in find_weight_sites(out):
        if site.eligible:
            assert site.dtype == "int8" and nm.is_2_4(numpy_helper.to_array(site.tensor), site.axis)
    with pytest.raises(OnnxSparseError, match="needs calibration data"):
        api.prune(model, Recipe(int8=True))


def test_clip_search_rounding_in_blocks_gives_the_plain_formulas_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """calibrate.rounding_error (blocks of rows into one buffer) and fake_quant(out=) give, bit for bit,
    ``rint(x * (1/s))`` clipped to [-128, 127] times ``s``, minus ``x``; so choose_scale picks what the
    plain loop over the clips (new arrays each time) picks, whatever the block size."""
    from onnx_sparse.quant import calibrate

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((301, 77)) * rng.exponential(1.0, 77)).astype(np.float32)
    x[5, 3], x[7] = 0.0, -0.0
    w = rng.random(77)

    def plain_q(x: np.ndarray, s: float) -> np.ndarray:
        return np.clip(np.rint(x * np.float32(1.0 / s)), -128, 127) * np.float32(s)

    def plain(x: np.ndarray, s: float) -> np.ndarray:
        return plain_q(x, s) - x

    def plain_scale(stats: calibrate.TensorStats, weight: np.ndarray) -> float:
        top = stats.absmax
        ww = (weight / weight.max()).astype(np.float32)
        best, best_err = top / 127, np.inf
        for r in calibrate.CLIP_RATIOS:
            d = plain(stats.rows, top * r / 127)
            err = float(np.einsum("ij,ij,j->", d, d, ww))
            if err < best_err * (1 - 1e-9):
                best, best_err = top * r / 127, err
        return float(np.float32(best))

    stats = calibrate.TensorStats(-1, np.abs(x).max(axis=0).astype(np.float64), x)
    for block in (1, 77 * 4, 77 * 300 + 5, 1 << 20):
        monkeypatch.setattr(calibrate, "_BLOCK", block)
        for s in (1e-3, 0.01, 0.05, float(np.abs(x).max()) / 127):
            out = np.full_like(x, np.nan)
            got = calibrate.rounding_error(x, s, out)
            assert got is out and got.tobytes() == plain(x, s).tobytes()
            y = x.copy()
            assert calibrate.fake_quant(y, s, out=y).tobytes() == plain_q(x, s).tobytes()
            assert calibrate.fake_quant(x, s).tobytes() == plain_q(x, s).tobytes()
        assert calibrate.choose_scale(stats, w) == plain_scale(stats, w)
    assert not calibrate.fake_quant(x, 0.0).any()


def test_int8_error_sums_are_those_of_the_float64_expressions() -> None:
    """error._pair_sums (one float64 array, casting ufuncs) gives, bit for bit, ``np.sum((x64 - y64) ** 2)``
    and ``np.sum(x64 ** 2)`` with x64, y64 the float64 copies, for C- and F-ordered maps, float64
    inputs and scalars (the per-layer INT8 errors in the report stay the same numbers)."""
    from onnx_sparse.quant.error import _pair_sums

    def plain(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        x64 = np.asarray(x, dtype=np.float64)
        return float(np.sum((x64 - np.asarray(y, dtype=np.float64)) ** 2)), float(np.sum(x64**2))

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 33, 41)).astype(np.float32)
    y = (x + rng.standard_normal(x.shape).astype(np.float32) * np.float32(0.01)).astype(np.float32)
    for a, b in (
        (x, y),
        (np.asfortranarray(x[0]), np.asfortranarray(y[0])),
        (x.astype(np.float64), y),
        (x[0, 0, 0, 0], y[0, 0, 0, 0]),
    ):
        assert _pair_sums(a, b) == plain(a, b)
