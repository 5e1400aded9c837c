"""The Recipe: validation, JSON, defaults, the API/CLI forms, provenance in the output, the starved-fit warning."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
from pathlib import Path

import onnx
import pytest
from conftest import error_lines
from polygraphy.json import save_json
from test_calibrated_models import mlp, mlp_data

from onnx_sparse import Recipe, api
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.passes.calibrated import CalibratedPrunePass, _refit_words
from onnx_sparse.passes.factory import make_prune_pass
from onnx_sparse.passes.prune import PrunePass
from onnx_sparse.passes.sensitivity import SensitivityPrunePass
from onnx_sparse.recipe import (
    DEFAULT_CALIBRATED,
    META_CALIBRATION,
    META_RECIPE,
    META_VERSION,
    calibration_digest,
    read_provenance,
)

ROOT = Path(__file__).resolve().parent.parent


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


# --------------------------------------------------------------------------- the object


def test_validated_once_and_frozen() -> None:
    r = Recipe(method="sparsegpt", include=["fc.*"], damp=0.1)
    assert r.include == ("fc.*",)  # lists become tuples: hashable, immutable
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.damp = 0.2  # type: ignore[misc]
    for bad, match in [
        (dict(method="obs"), "unknown pruning method"),
        (dict(include=["("]), "not a valid regular expression"),
        (dict(ops=["Relu"]), "unknown op type"),
        (dict(blocksize=6), "multiple of 4"),
        (dict(damp=-1.0), "non-negative"),
        (dict(target_cosine=2.0), r"\[-1, 1\]"),
        (dict(holdout=0.9), r"\[0, 0.5\]"),
        (dict(max_rows=0), "positive"),
        (dict(min_channels="8"), "integer"),
        (dict(bias_correction="yes"), "true or false"),
        (dict(include="fc"), "list of strings"),
    ]:
        with pytest.raises(OnnxSparseError, match=match):
            Recipe(**bad)
    with pytest.raises(OnnxSparseError, match="unknown setting"):
        r.replace(dmap=0.1)


def test_json_round_trip_and_refusals(tmp_path: Path) -> None:
    r = Recipe(method="asym", exclude=("head",), bias_correction=True, max_rows=None, target_cosine=0.99)
    assert Recipe.from_json(r.to_json()) == r
    assert r.to_json() == Recipe.from_json(r.to_json()).to_json()  # canonical text
    r.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json") == r
    assert json.loads((tmp_path / "r.json").read_text())["format"] == 1
    with pytest.raises(OnnxSparseError, match=r"unknown recipe key\(s\) \['methd'\]"):
        Recipe.from_dict({"methd": "asym"})
    with pytest.raises(OnnxSparseError, match="format 2 is not supported"):
        Recipe.from_dict({"format": 2})
    with pytest.raises(OnnxSparseError, match="not valid JSON"):
        Recipe.from_json("{", "r.json")
    with pytest.raises(OnnxSparseError, match="r.json: recipe: damp must be a finite number"):
        Recipe.from_json('{"damp": "0.1"}', "r.json")


def test_every_int8_field_round_trips_and_reaches_the_quantizer(tmp_path: Path) -> None:
    """Each INT8 setting, set away from its default, survives JSON and the file, and is what the
    quantizer is given (one place maps recipe fields to QuantizeOptions)."""
    changed = dict(int8=True, int8_calibration="percentile", int8_percentile=99.9, int8_layers="all",
                   int8_max_error=0.2, int8_smooth=False, int8_joint=True, int8_fit_quantized=True,
                   int8_target_cosine=0.95,
                   holdout=0.2, seed=3)  # fmt: skip
    defaults = Recipe()
    assert all(getattr(defaults, k) != v for k, v in changed.items())
    assert {f for f in Recipe.__dataclass_fields__ if f.startswith("int8")} <= set(changed)
    r = Recipe(**changed)
    r.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json") == r == Recipe.from_json(r.to_json())
    q = r.quantize_options()
    got = (q.calibration, q.percentile, q.layers, q.max_error, q.smooth, q.target_cosine, q.holdout, q.seed)
    assert got == ("percentile", 99.9, "all", 0.2, False, 0.95, 0.2, 3)
    assert Recipe(int8=True, int8_target_cosine=None).quantize_options().target_cosine is None
    with pytest.raises(OnnxSparseError, match="int8-target-cosine"):
        Recipe(int8_target_cosine=1.5)
    with pytest.raises(OnnxSparseError, match="unknown calibration method"):
        Recipe(int8_calibration="entropy")


def test_defaults_resolve() -> None:
    assert Recipe().resolve(has_data=True) == DEFAULT_CALIBRATED
    assert DEFAULT_CALIBRATED.method == "asym" and DEFAULT_CALIBRATED.bias_correction and DEFAULT_CALIBRATED.refit_head
    assert Recipe().resolve(has_data=False) == Recipe(method="magnitude", bias_correction=False, refit_head=False)
    off = Recipe(refit_head=False).resolve(has_data=True)  # an explicit False wins over the default
    assert (off.method, off.bias_correction, off.refit_head) == ("asym", True, False)
    named = Recipe(method="sparsegpt").resolve(has_data=True)  # a named method comes alone
    assert (named.bias_correction, named.refit_head) == (False, False)
    assert Recipe(bias_correction=True).resolve(has_data=False).needs_data


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ({"bias_correction": False}, (False, True)),
        ({"refit_head": False}, (True, False)),
        ({"bias_correction": False, "refit_head": False}, (False, False)),
    ],
    ids=["no-bias-correction", "no-refit-head", "neither"],
)
def test_resolve_with_data_keeps_each_explicit_false(given: dict, want: tuple[bool, bool]) -> None:
    """`--no-bias-correction` / `--no-refit-head` drop one part of the default recipe, the rest stays."""
    r = Recipe(**given).resolve(has_data=True)
    assert (r.method, r.bias_correction, r.refit_head) == ("asym", *want)


def test_defaults_are_pinned() -> None:
    """A default is part of every recipe that leaves it out (and of every model pruned with it): changing
    one changes outputs, so it is a decision, not an edit. The README states some of them."""
    assert Recipe().to_dict() == {
        "format": 1, "method": None, "include": [], "exclude": [], "ops": [], "min_channels": 0,
        "bias_correction": None, "refit_head": None, "damp": 0.01, "refit_confirm": 0, "blocksize": 128,
        "max_rows": 20_000,
        "seed": 0, "row_mask": None, "calib_samples": None, "sensitivity": False, "target_cosine": None,
        "holdout": 0.25, "fc_layout": False, "annotate": False, "int8": False, "int8_calibration": "search",
        "int8_percentile": 99.999, "int8_layers": "eligible", "int8_max_error": None, "int8_smooth": True,
        "int8_joint": False, "int8_fit_quantized": False, "int8_target_cosine": 0.99,
    }  # fmt: skip
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "[--holdout 0.25]" in readme and "default **0.99**" in readme and "the usual 0.01" in readme


@pytest.mark.parametrize(
    ("field", "ok", "bad"),
    [
        ("calib_samples", 1, 0),
        ("target_cosine", -1.0, -1.5),
        ("target_cosine", 1.0, 1.01),
        ("max_rows", 1, 0),
        ("refit_confirm", 0, -1),
    ],
)
def test_validation_edges(field: str, ok, bad) -> None:
    assert getattr(Recipe(**{field: ok}), field) == ok
    with pytest.raises(OnnxSparseError, match=field.replace("_", "-")):
        Recipe(**{field: bad})


def test_type_errors_say_when_null_is_allowed() -> None:
    with pytest.raises(OnnxSparseError, match=r"recipe: damp must be a finite number, got 'x'$"):
        Recipe(damp="x")
    with pytest.raises(OnnxSparseError, match=r"recipe: max_rows must be an integer or null, got 'x'$"):
        Recipe(max_rows="x")


def test_load_of_a_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OnnxSparseError, match="cannot read the recipe"):
        Recipe.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------- passes and API


def test_passes_take_the_recipe() -> None:
    r = Recipe(method="wanda", exclude=("fc3",), max_rows=100, seed=3)
    p = CalibratedPrunePass(r, mlp_data(0, 2))
    assert p.recipe == r.resolve(True) and p.engine.max_rows == 100 and p.engine.seed == 3
    assert CalibratedPrunePass(r.replace(refit_confirm=2), mlp_data(0, 2)).engine.refit_confirm == 2
    assert p.selection["exclude"] == ("fc3",)
    s = SensitivityPrunePass(r.replace(target_cosine=0.9), mlp_data(0, 2))
    assert s.target == 0.9 and s.method == "wanda"
    assert isinstance(make_prune_pass(Recipe()), PrunePass)
    assert isinstance(make_prune_pass(Recipe(), mlp_data(0, 2)), CalibratedPrunePass)
    assert isinstance(make_prune_pass(Recipe(sensitivity=True), mlp_data(0, 2)), SensitivityPrunePass)
    with pytest.raises(TypeError, match="either a Recipe or keyword options"):
        CalibratedPrunePass(r, mlp_data(0, 2), damp=0.1)


def test_refit_confirm_reaches_the_damping_choice(monkeypatch) -> None:
    """`refit_confirm` (`--refit-confirm K`) is what every asym layer's damping choice confirms with."""
    from onnx_sparse.prune import select

    seen: list[int] = []
    real = select.choose_refit_damp

    def spy(*args, **kwargs):
        seen.append(kwargs.get("confirm", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(select, "choose_refit_damp", spy)
    model, feeds = mlp(), mlp_data(1, 6)
    api.prune(model, Recipe(method="asym", refit_confirm=2), calibration=feeds)
    assert seen and set(seen) == {2}
    seen.clear()
    api.prune(model, Recipe(method="asym"), calibration=feeds)
    assert seen and set(seen) == {0}


def test_keyword_api_equals_recipe_api() -> None:
    model, feeds = mlp(), mlp_data(1, 6)
    old = api.prune(model, method="sparsegpt", calibration=feeds, damp=0.05, exclude=["fc3"])
    new = api.prune(model, Recipe(method="sparsegpt", damp=0.05, exclude=("fc3",)), calibration=feeds)
    assert old.SerializeToString(deterministic=True) == new.SerializeToString(deterministic=True)
    with pytest.raises(OnnxSparseError, match="not both"):
        api.prune(model, Recipe(), damp=0.05)
    with pytest.raises(OnnxSparseError, match="not both"):
        api.prune(model, Recipe(), method="wanda")
    with pytest.raises(OnnxSparseError, match="unexpected keyword"):
        api.prune(model, dmap=0.05)


def test_provenance_in_metadata() -> None:
    model, feeds = mlp(), mlp_data(1, 6)
    recipe = Recipe(method="sparsegpt", calib_samples=4)
    out = api.prune(model, recipe, calibration=feeds)
    props = _props(out)
    assert Recipe.from_json(props[META_RECIPE]) == recipe.resolve(has_data=True)
    from onnx_sparse import __version__

    assert props[META_VERSION] == __version__
    # the digest is of the data the prune used (the first calib_samples feeds)
    assert json.loads(props[META_CALIBRATION]) == {"samples": 4, "digest": calibration_digest(feeds[:4])}
    assert calibration_digest(feeds[:4]) != calibration_digest(feeds[:3])
    # deterministic: the same prune gives the same bytes
    again = api.prune(model, recipe, calibration=feeds)
    assert again.SerializeToString(deterministic=True) == out.SerializeToString(deterministic=True)
    # no data: recipe and version, no calibration record
    plain = _props(api.prune(model))
    assert META_CALIBRATION not in plain and json.loads(plain[META_RECIPE])["method"] == "magnitude"
    made = read_provenance(props)
    assert made is not None and made["recipe"]["method"] == "sparsegpt" and made["calibration"]["samples"] == 4
    assert read_provenance({}) is None


def test_reprune_keeps_one_record_per_key() -> None:
    model, feeds = mlp(), mlp_data(1, 6)
    first = api.prune(model, method="sparsegpt", calibration=feeds)
    second = api.prune(first, method="wanda", calibration=feeds, damp=0.5)  # wanda keeps 2:4 weights: unchanged
    keys = [p.key for p in second.metadata_props]
    assert keys.count(META_RECIPE) == 1 and keys.count(META_CALIBRATION) == 1
    assert second.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)


# --------------------------------------------------------------------------- CLI


def test_cli_save_recipe_then_recipe_reproduces_bytes(run_cli, tmp_path: Path) -> None:
    onnx.save(mlp(), tmp_path / "m.onnx")
    save_json(mlp_data(0, 5), tmp_path / "in.json")
    common = ["--load-inputs", tmp_path / "in.json"]
    a, b, r = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "r.json"
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", a, *common, "--method", "sparsegpt", "--exclude", "fc3",
                        "--damp", "0.05", "--max-rows", "40", "--seed", "7", "--save-recipe", r])  # fmt: skip
    assert rc == 0, text
    doc = json.loads(r.read_text())
    assert (doc["method"], doc["exclude"], doc["damp"], doc["max_rows"], doc["seed"]) == (
        "sparsegpt", ["fc3"], 0.05, 40, 7)  # fmt: skip
    assert doc["bias_correction"] is False and doc["refit_head"] is False  # saved resolved
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", b, *common, "--recipe", r])
    assert rc == 0, text
    assert b.read_bytes() == a.read_bytes()
    # options on the command line override the file
    c = tmp_path / "c.onnx"
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", c, *common, "--recipe", r, "--damp", "0.5",
                        "--no-bias-correction", "--report", tmp_path / "rep.json"])  # fmt: skip
    assert rc == 0, text
    used = Recipe.from_json(_props(onnx.load(c))[META_RECIPE])
    assert (used.damp, used.exclude, used.seed, used.bias_correction) == (0.5, ("fc3",), 7, False)
    assert json.loads((tmp_path / "rep.json").read_text())["recipe"]["damp"] == 0.5
    # and inspect says how the model was made
    rc, text = run_cli(["inspect", c])
    assert rc == 0 and "made by onnx-sparse" in text and 'method="sparsegpt"' in text and "damp=0.5" in text
    assert "calibration data: 5 samples, sha256:" in text


def test_cli_default_recipe_reproduces_bytes(run_cli, tmp_path: Path) -> None:
    """No --method with data: the default recipe, saved resolved; --recipe gives the same file."""
    onnx.save(mlp(), tmp_path / "m.onnx")
    save_json(mlp_data(0, 4), tmp_path / "in.json")
    a, b, r = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "r.json"
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", a, "--load-inputs", tmp_path / "in.json",
                        "--save-recipe", r])  # fmt: skip
    assert rc == 0, text
    assert Recipe.load(r) == DEFAULT_CALIBRATED
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", b, "--load-inputs", tmp_path / "in.json", "--recipe", r])
    assert rc == 0, text
    assert b.read_bytes() == a.read_bytes()
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", b, "--save-recipe", tmp_path / "no" / "r.json"])
    assert rc == 2 and "output folder does not exist" in text


def test_plugin_loader_takes_a_recipe() -> None:
    from onnx_sparse.handoff.plugin import PruneOnnx

    model = mlp()
    loader = PruneOnnx(model, recipe=Recipe(method="sparsegpt", exclude=("fc3",)), data_loader=mlp_data(1, 6))
    assert loader.recipe.method == "sparsegpt" and loader.needs_data
    out = loader()
    ref = api.prune(model, Recipe(method="sparsegpt", exclude=("fc3",)), calibration=mlp_data(1, 6))
    assert out.SerializeToString(deterministic=True) == ref.SerializeToString(deterministic=True)
    assert PruneOnnx(model, recipe=Recipe(method="wanda"), method="magnitude").recipe.method == "magnitude"


def test_cli_bad_recipe_file(run_cli, tmp_path: Path) -> None:
    onnx.save(mlp(), tmp_path / "m.onnx")
    bad = tmp_path / "r.json"
    bad.write_text('{"method": "sparsegpt", "bias": true}')
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--recipe", bad])
    assert rc == 2 and "unknown recipe key(s) ['bias']" in text and "Traceback" not in text
    assert len(error_lines(text)) <= 2 and not (tmp_path / "o.onnx").exists()
    rc, text = run_cli(["prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--include", "("])
    assert rc == 2 and "not a valid regular expression" in text and "internal error" not in text


# --------------------------------------------------------------------------- starved fits, log words


def test_starved_fit_warns_once_naming_layers(caplog) -> None:
    model = mlp()
    with caplog.at_level(logging.INFO, logger="onnx_sparse"):
        CalibratedPrunePass("sparsegpt", mlp_data(0, 2, rows=8))(model)  # 16 rows for 32- and 64-wide inputs
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "fewer activation rows" in r.message]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "fc1 (16 rows < 32 inputs)" in msg and "fc2 (16 rows < 64 inputs)" in msg and "more calibration" in msg
    assert "starved: rows < 64 inputs" in caplog.text  # the per-layer line says it too
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onnx_sparse"):
        CalibratedPrunePass("sparsegpt", mlp_data(0, 8))(model)  # 128 rows: enough
    assert "fewer activation rows" not in caplog.text and "starved" not in caplog.text


def test_refit_words_explain_themselves() -> None:
    assert _refit_words(float("inf")) == ", no dense refit (cross-validation kept the dense weights)"
    assert _refit_words(0.1) == ", dense refit with ridge damp 0.1 (cross-validated)"
    assert _refit_words(None) == ""


# --------------------------------------------------------------------------- layering


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_import_circle_between_calibrated_and_sensitivity() -> None:
    passes = ROOT / "onnx_sparse" / "passes"
    calibrated = _imports(passes / "calibrated.py")
    sensitivity = _imports(passes / "sensitivity.py")
    assert "onnx_sparse.passes.sensitivity" not in calibrated
    assert "onnx_sparse.passes.factory" not in calibrated | sensitivity
    recipe = _imports(ROOT / "onnx_sparse" / "recipe.py")
    assert not any(m.startswith(("onnx_sparse.passes", "onnx_sparse.api", "onnx_sparse.cli")) for m in recipe)
