"""``compare``: model-level criteria (defaults, given), Polygraphy's element-wise check on request, interface
check, quiet output, Polygraphy's data options and JSON formats."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.handoff.compare import (
    DEFAULT_CRITERIA,
    Criteria,
    DataSpec,
    check_same_interface,
    compare_models,
    load_run_results,
    output_figures,
)

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def make_model(
    path: Path,
    w_a: np.ndarray,
    w_b: np.ndarray,
    offset: int = 0,
    batch: int | str = 4,
) -> Path:
    """x[batch,16] -> a = x @ w_a [.,10] (class-score-like), b = x @ w_b [.,8], cls = argmax(a) + offset."""
    nodes = [
        helper.make_node("MatMul", ["x", "w_a"], ["a"], name="fc_a"),
        helper.make_node("MatMul", ["x", "w_b"], ["b"], name="fc_b"),
        helper.make_node("ArgMax", ["a"], ["am"], name="argmax", axis=-1, keepdims=0),
        helper.make_node("Add", ["am", "offset"], ["cls"], name="offset_add"),
    ]
    inits = [
        numpy_helper.from_array(w_a, "w_a"),
        numpy_helper.from_array(w_b, "w_b"),
        numpy_helper.from_array(np.array(offset, dtype=np.int64), "offset"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [batch, 16])],
        [
            helper.make_tensor_value_info("a", FLOAT, [batch, 10]),
            helper.make_tensor_value_info("b", FLOAT, [batch, 8]),
            helper.make_tensor_value_info("cls", INT64, [batch]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


RNG = np.random.default_rng(0)
W_A = RNG.standard_normal((16, 10)).astype(np.float32)
W_B = RNG.standard_normal((16, 8)).astype(np.float32)
NOISE_B = RNG.standard_normal((16, 8)).astype(np.float32)


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {
        "dense": make_model(tmp_path / "dense.onnx", W_A, W_B),
        "copy": make_model(tmp_path / "copy.onnx", W_A, W_B),
        # b off by ~3% (cosine ~0.9995), a and cls unchanged
        "perturbed": make_model(tmp_path / "perturbed.onnx", W_A, W_B + 0.03 * NOISE_B),
        # same floats, integer output off by one
        "int_off": make_model(tmp_path / "int_off.onnx", W_A, W_B, offset=1),
        "dynamic": make_model(tmp_path / "dynamic.onnx", W_A, W_B, batch="N"),
        # b badly off (cosine ~0.7): what a bad prune looks like
        "broken": make_model(tmp_path / "broken.onnx", W_A, W_B + 1.0 * NOISE_B),
    }


def other_interface(path: Path, *, out_name: str = "a", dtype: int = FLOAT, rank: int = 2) -> Path:
    """x -> Identity -> out: a model whose interface differs from make_model's in name, dtype or rank."""
    shape = [4, 16] if rank == 2 else [4, 16, 1]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [out_name])],
        "g",
        [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info(out_name, dtype, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def polygraphy_cli() -> str:
    exe = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    if not Path(exe).exists():
        pytest.skip("the polygraphy command is not installed")
    return exe


# --------------------------------------------------------------------------- figures


def test_output_figures_values() -> None:
    ref = [np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)]
    cand = [np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], np.float32)]
    f = output_figures(ref, cand)
    assert f["kind"] == "float"
    assert f["cosine"] == pytest.approx(1 / 5)  # dot 1, norms sqrt(5) each
    assert f["rel_l2"] == pytest.approx(np.sqrt(8 / 5))
    assert f["max_abs"] == pytest.approx(2.0)
    assert f["top1"] == pytest.approx(0.5)


def test_output_figures_edge_cases() -> None:
    zeros = [np.zeros((2, 3), np.float32)]
    f = output_figures(zeros, zeros)
    assert f["cosine"] == 1.0 and f["rel_l2"] == 0.0 and f["max_abs"] == 0.0
    assert output_figures(zeros, [np.ones((2, 3), np.float32)])["cosine"] == 0.0
    assert output_figures([np.ones(5, np.float32)], [np.ones(5, np.float32)])["top1"] == 1.0
    assert output_figures([np.ones((5, 1), np.float32)], [np.ones((5, 1), np.float32)])["top1"] is None
    ints = output_figures([np.array([1, 2, 3])], [np.array([1, 2, 4])])
    assert ints["kind"] == "exact" and ints["mismatches"] == 1 and ints["cosine"] is None
    assert output_figures([np.array([True, False])], [np.array([True, True])])["mismatches"] == 1
    assert output_figures([np.ones(3)], [np.ones(4)])["shape_mismatch"]
    # Worst iteration counts.
    two = output_figures([np.ones(4), np.ones(4)], [np.ones(4), -np.ones(4)])
    assert two["cosine"] == -1.0 and two["rel_l2"] == 2.0


# --------------------------------------------------------------------------- verdicts


def test_identical_models_pass(models) -> None:
    report = compare_models(models["dense"], models["copy"])
    assert report.passed and report.iterations == 1
    assert [o.name for o in report.outputs] == ["a", "b", "cls"]
    a = report.output("a")
    assert a.cosine == pytest.approx(1.0) and a.rel_l2 == 0.0 and a.max_abs == 0.0 and a.top1 == 1.0
    assert a.polygraphy_passed is None and a.kind == "float" and a.shape == (4, 10)  # element-wise off
    cls = report.output("cls")
    assert cls.kind == "exact" and cls.mismatches == 0 and cls.passed
    assert report.defaults and report.criteria == DEFAULT_CRITERIA and report.log == ""
    report = compare_models(models["dense"], models["copy"], criteria=Criteria(atol=1e-5))
    assert report.output("a").polygraphy_passed and "Accuracy Summary" in report.log and not report.defaults
    assert report.dense == "onnxrt-dense" and report.sparse == "onnxrt-sparse"


def test_perturbed_copy_fails_min_cosine(models, run_cli) -> None:
    rc, out = run_cli(["compare", models["dense"], models["perturbed"], "--min-cosine", "0.9999",
                       "--atol", "10", "--rtol", "10"])  # fmt: skip
    assert rc == 1
    assert "cosine" in out and "< min-cosine 0.9999" in out
    rc, _ = run_cli(["compare", models["dense"], models["perturbed"], "--min-cosine", "0.99",
                     "--atol", "10", "--rtol", "10"])  # fmt: skip
    assert rc == 0
    report = compare_models(
        models["dense"], models["perturbed"], criteria=Criteria(atol=10, rtol=10, min_cosine=0.9999)
    )
    b = report.output("b")
    assert 0.99 < b.cosine < 0.9999 and b.polygraphy_passed and not b.passed
    assert report.output("a").passed and not report.passed


def test_per_output_tolerances(models, run_cli) -> None:
    report = compare_models(models["dense"], models["perturbed"], criteria=Criteria(atol=1e-5))
    assert [o.name for o in report.outputs if not o.passed] == ["b"]
    assert not report.output("b").polygraphy_passed
    # Per-output Polygraphy syntax: "" (no name) is the default for the other outputs.
    report = compare_models(
        models["dense"], models["perturbed"], criteria=Criteria(atol={"": 1e-5, "b": 1.0}, rtol={"b": 1.0})
    )
    assert report.passed
    rc, _ = run_cli(["compare", models["dense"], models["perturbed"], "--atol", "1e-5", "b:1.0",
                     "--rtol", "b:1.0", "--check-error-stat", "b:max"])  # fmt: skip
    assert rc == 0
    # Per-output min-cosine: only b is held to it.
    report = compare_models(
        models["dense"], models["perturbed"], criteria=Criteria(atol=10, rtol=10, min_cosine={"a": 0.9999})
    )
    assert report.passed
    report = compare_models(
        models["dense"], models["perturbed"], criteria=Criteria(atol=10, rtol=10, min_cosine={"b": 0.9999})
    )
    assert not report.passed


def test_check_error_stat_mean(models) -> None:
    report = compare_models(
        models["dense"], models["perturbed"], criteria=Criteria(atol=0.2, rtol=10, check_error_stat="mean")
    )
    assert report.output("b").polygraphy_passed


def test_integer_outputs_compare_exactly(models) -> None:
    report = compare_models(models["dense"], models["int_off"], criteria=Criteria(atol=100, rtol=100))
    cls = report.output("cls")
    assert cls.polygraphy_passed  # within Polygraphy's tolerance...
    assert not cls.passed and cls.mismatches == 4  # ...but integers must match exactly
    assert "must match exactly" in cls.reasons[0]
    assert report.output("a").passed and not report.passed


def test_default_criteria_pass_a_close_model_and_fail_a_broken_one(models, run_cli) -> None:
    # No criteria: cosine >= 0.9 and rel L2 <= 0.5 decide, not Polygraphy's 1e-5 element-wise.
    report = compare_models(models["dense"], models["perturbed"])
    assert report.passed and report.defaults and report.output("b").polygraphy_passed is None
    report = compare_models(models["dense"], models["broken"])
    b = report.output("b")
    assert not report.passed and b.cosine < 0.9 and any("min-cosine 0.9" in r for r in b.reasons)
    rc, out = run_cli(["compare", models["dense"], models["perturbed"]])
    assert rc == 0 and "criteria (defaults" in out and "elemwise" not in out
    rc, out = run_cli(["compare", models["dense"], models["broken"]])
    assert rc == 1 and "output 'b': cosine" in out


def test_given_criteria_replace_the_element_wise_check(models, run_cli) -> None:
    # The case: a model-level criterion alone decides; Polygraphy's 1e-5 is not applied.
    rc, out = run_cli(["compare", models["dense"], models["perturbed"], "--min-cosine", "0.95"])
    assert rc == 0 and "Difference exceeds tolerance" not in out and "elemwise" not in out
    # ...unless asked for.
    rc, out = run_cli(["compare", models["dense"], models["perturbed"], "--min-cosine", "0.95", "--atol", "1e-5"])
    assert rc == 1 and "element-wise: difference exceeds" in out and "elemwise" in out
    # Given criteria replace ALL defaults: a loose cosine floor passes the broken model.
    report = compare_models(models["dense"], models["broken"], criteria=Criteria(min_cosine=0.5))
    assert report.passed and not report.defaults


def test_max_rel_l2_and_min_top1(models, run_cli) -> None:
    report = compare_models(models["dense"], models["broken"], criteria=Criteria(max_rel_l2=0.5))
    b = report.output("b")
    assert not b.passed and b.rel_l2 > 0.5 and "max-rel-l2 0.5" in b.reasons[0]
    assert report.output("a").passed  # a is unchanged
    report = compare_models(models["dense"], models["perturbed"], criteria=Criteria(max_rel_l2={"b": 0.001}))
    assert [o.name for o in report.outputs if not o.passed] == ["b"]
    # top-1 floor: applies to every class-score-like output when given (b: 8 columns).
    report = compare_models(models["dense"], models["broken"], criteria=Criteria(min_top1=1.0))
    assert not report.output("b").passed and report.output("a").passed
    rc, out = run_cli(["compare", models["dense"], models["broken"], "--min-top1", "b:1.0"])
    assert rc == 1 and "min-top1 100.0%" in out
    rc, out = run_cli(["compare", models["dense"], models["broken"], "--max-rel-l2", "abc"])
    assert rc == 2 and "not a number" in out


def test_default_top1_only_on_class_probabilities() -> None:
    from onnx_sparse.handoff.compare import compare_results

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((64, 5))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    noisy = logits + 0.7 * rng.standard_normal(logits.shape)
    probs_noisy = np.exp(noisy) / np.exp(noisy).sum(-1, keepdims=True)
    f = output_figures([probs], [probs_noisy])
    assert f["probabilities"] and f["top1"] < 0.9 and f["cosine"] > 0.9
    assert not output_figures([logits], [noisy])["probabilities"]  # logits do not sum to 1
    assert not output_figures([np.abs(logits)], [np.abs(noisy)])["probabilities"]

    class Iteration(dict):
        runtime = 0.01

    def results(ref, cand):
        from polygraphy.comparator import RunResults

        r = RunResults()
        r.append(("dense", [Iteration(y=ref.astype(np.float32))]))
        r.append(("sparse", [Iteration(y=cand.astype(np.float32))]))
        return r

    probs_report = compare_results(results(probs, probs_noisy))
    y = probs_report.output("y")
    assert not probs_report.passed and y.probabilities and any("min-top1" in r for r in y.reasons)
    # The same argmax change on logits is not judged by top-1 under the defaults (it could be an embedding).
    logits_report = compare_results(results(logits, logits + 0.3 * rng.standard_normal(logits.shape)))
    assert not any("min-top1" in r for r in logits_report.output("y").reasons)
    assert logits_report.runtimes == {"dense": 0.01, "sparse": 0.01}


def test_an_inf_or_nan_in_one_model_only_fails_the_output_in_any_iteration() -> None:
    """A NaN the sparse model gives where the dense one is finite fails the output, whichever iteration
    it is in (min/max over iterations skipped a NaN that was not the first: PASSED, cosine 1); the
    same inf or a NaN in both models is agreement, and the figures are over the finite elements."""
    from polygraphy.comparator import RunResults

    from onnx_sparse.handoff.compare import compare_results

    rng = np.random.default_rng(3)
    ref = [rng.standard_normal((4, 8)).astype(np.float32) for _ in range(3)]
    for k in range(3):
        cand = [r.copy() for r in ref]
        cand[k][1, 2] = np.nan
        f = output_figures(ref, cand)
        assert f["nonfinite"] == 1 and f["cosine"] == pytest.approx(1.0)
        results = RunResults()
        results.append(("dense", [{"y": r} for r in ref]))
        results.append(("sparse", [{"y": c} for c in cand]))
        report = compare_results(results)
        assert not report.passed, k
        assert any("inf or NaN in one model" in r for r in report.output("y").reasons)
        assert report.to_json()["outputs"][0]["nonfinite"] == 1
    masked = [r.copy() for r in ref]
    masked[1][0, :3] = -np.inf  # e.g. masked logits: the same in both
    masked[2][3, 3] = np.nan
    cand = [m.copy() for m in masked]
    cand[0][2, 2] += 0.01
    f = output_figures(masked, cand)
    assert f["nonfinite"] == 0 and 0.99 < f["cosine"] < 1.0 and np.isfinite(f["rel_l2"])
    assert output_figures([np.array([np.inf, 1.0])], [np.array([-np.inf, 1.0])])["nonfinite"] == 1


def _default_verdict(ref: np.ndarray, cand: np.ndarray) -> tuple[bool, tuple[str, ...]]:
    """compare's verdict on one output under the default criteria (no criterion given)."""
    from polygraphy.comparator import RunResults

    from onnx_sparse.handoff.compare import compare_results

    results = RunResults()
    results.append(("dense", [{"y": ref}]))
    results.append(("sparse", [{"y": cand}]))
    report = compare_results(results)
    assert report.defaults and report.criteria == DEFAULT_CRITERIA
    return report.passed, report.output("y").reasons


def _at_cosine(c: float) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors at cosine ``c`` (rank 4: a feature map, no top-1); relative L2 is sqrt(2 - 2c)."""
    ref = np.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    return ref, np.array([c, np.sqrt(1.0 - c * c)]).reshape(1, 1, 1, 2)


@pytest.mark.parametrize(("c", "passed"), [(0.9005, True), (0.8995, False)])
def test_default_min_cosine_edge(c: float, passed: bool) -> None:
    ok, reasons = _default_verdict(*_at_cosine(c))
    assert ok is passed
    assert passed or (len(reasons) == 1 and "min-cosine 0.9" in reasons[0])  # relative L2 (0.448) is within


@pytest.mark.parametrize(("scale", "passed"), [(1.49, True), (1.5, True), (1.51, False), (0.51, True), (0.49, False)])
def test_default_max_rel_l2_edge(scale: float, passed: bool) -> None:
    """Same direction (cosine 1), norm off by ``scale``: relative L2 = |scale - 1| against the 0.5 ceiling (inclusive)."""
    ref = np.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    ok, reasons = _default_verdict(ref, scale * ref)
    assert ok is passed
    assert passed or (len(reasons) == 1 and "max-rel-l2 0.5" in reasons[0])


@pytest.mark.parametrize(("agree", "passed"), [(91, True), (90, True), (89, False), (81, False)])
def test_default_min_top1_edge(agree: int, passed: bool) -> None:
    """100 rows of class probabilities, ``agree`` of them with the same top class: top-1 >= 0.9 (inclusive) passes."""
    ref = np.tile([0.30, 0.25, 0.15, 0.15, 0.15], (100, 1))
    cand = ref.copy()
    cand[agree:, :2] = [0.25, 0.30]  # the two best classes swap: argmax changes, cosine and L2 barely move
    ok, reasons = _default_verdict(ref, cand)
    assert ok is passed
    assert passed or reasons == (f"top-1 agreement {agree:.1f}% < min-top1 90.0%",)


def test_two_class_probabilities_are_judged_by_top1() -> None:
    """A binary classifier's softmax (last dimension 2, e.g. PP-OCR's orientation) is class scores too."""
    ref = np.tile([0.6, 0.4], (10, 1))
    cand = ref.copy()
    cand[:2] = [0.4, 0.6]
    ok, reasons = _default_verdict(ref, cand)
    assert not ok and reasons == ("top-1 agreement 80.0% < min-top1 90.0%",)


def test_exact_outputs_report_their_largest_difference() -> None:
    same = output_figures([np.array([1, 2, 3])], [np.array([1, 2, 3])])
    assert same["max_abs"] == 0.0 and same["mismatches"] == 0
    assert output_figures([np.array([1, 2, 3])], [np.array([1, 5, 3])])["max_abs"] == 3.0


def test_shape_mismatch_names_both_shapes() -> None:
    ok, reasons = _default_verdict(np.zeros((2, 3)), np.zeros((2, 4)))
    assert not ok and reasons == ("shapes differ: (2, 3) vs (2, 4)",)


def test_non_finite_or_empty_outputs_are_not_probabilities() -> None:
    probs = np.array([[0.5, 0.5]])
    assert output_figures([probs], [probs])["probabilities"]
    assert not output_figures([np.array([[np.nan, 1.0]])], [probs])["probabilities"]
    assert not output_figures([np.zeros((0, 2))], [np.zeros((0, 2))])["probabilities"]


def test_an_output_the_sparse_run_lacks_is_a_reason_not_a_crash() -> None:
    from polygraphy.comparator import RunResults

    from onnx_sparse.handoff.compare import compare_results

    results = RunResults()
    results.append(("dense", [{"y": np.ones((2, 3)), "z": np.ones((2, 3))}]))
    results.append(("sparse", [{"z": np.ones((2, 3))}]))
    report = compare_results(results)
    assert not report.passed and report.output("y").reasons == ("the sparse run has no output 'y'",)
    assert report.output("z").passed


@pytest.mark.parametrize("doc", [{}, {"lst": 3}, {"lst": [["a"]]}, {"lst": [["a", [{"x": 1}]]]}, [1, 2]])
def test_json_that_is_not_run_results_is_one_clear_error(tmp_path, doc) -> None:
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(OnnxSparseError, match="not Polygraphy RunResults"):
        load_run_results(path)


def test_a_model_that_cannot_run_on_the_inputs_is_the_users_error(tmp_path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "g", [helper.make_tensor_value_info("x", FLOAT, [4])],
        [helper.make_tensor_value_info("y", FLOAT, None)], [numpy_helper.from_array(np.array([5], np.int64), "s")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(OnnxSparseError, match="onnxruntime failed on the inputs"):
        compare_models(tmp_path / "bad.onnx", tmp_path / "bad.onnx")


def test_readme_states_the_default_criteria_the_code_applies() -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = text.index("**Default criteria**")
    paragraph = text[start : text.index("\n- ", start)]
    numbers = {
        key: float(re.search(pattern, paragraph.replace("\n", " ")).group(1))
        for key, pattern in {
            "min_cosine": r"\*\*cosine >= ([0-9.]+)\*\*",
            "max_rel_l2": r"\*\*relative L2 <= ([0-9.]+)\*\*",
            "min_top1": r"\*\*top-1 agreement >= ([0-9.]+)\*\*",
        }.items()
    }
    code = {key: getattr(DEFAULT_CRITERIA, key) for key in numbers}
    assert numbers == code
    assert "class probabilities" in paragraph and DEFAULT_CRITERIA.probabilities_only
    assert not DEFAULT_CRITERIA.elementwise  # the defaults never turn Polygraphy's 1e-5 check on


def test_saved_inputs_are_checked_against_the_model(models, tmp_path) -> None:
    from polygraphy.json import save_json

    from onnx_sparse.handoff.compare import make_data_loader

    path = tmp_path / "wrong.json"
    save_json([{"not_x": np.zeros((4, 16), np.float32)}], str(path))
    assert len(list(make_data_loader(DataSpec(load_inputs=(str(path),))))) == 1  # no model: taken as they are
    with pytest.raises(OnnxSparseError, match="not_x"):
        make_data_loader(DataSpec(load_inputs=(str(path),)), model=models["dense"])


def test_providers_are_checked(models) -> None:
    assert compare_models(models["dense"], models["copy"], providers=["cpu"]).passed
    with pytest.raises(OnnxSparseError, match="--providers nosuch: onnxruntime has no such execution provider"):
        compare_models(models["dense"], models["copy"], providers=["nosuch"])


def test_input_settings_with_two_saved_runs_are_ignored_loudly(models, tmp_path, caplog) -> None:
    compare_models(models["dense"], models["copy"], save_outputs=tmp_path / "runs.json")
    with caplog.at_level("WARNING", logger="onnx_sparse"):
        report = compare_models(None, None, load_outputs=[tmp_path / "runs.json"], data=DataSpec(seed=3))
    assert report.passed and "input settings are ignored" in caplog.text


def test_different_interfaces_are_refused_in_one_line(models, tmp_path, run_cli) -> None:
    from conftest import error_lines

    cases = {
        "name": (other_interface(tmp_path / "name.onnx", out_name="logits"), "outputs only in the dense model"),
        "dtype": (other_interface(tmp_path / "dtype.onnx", dtype=TensorProto.DOUBLE), "input 'x' is float in"),
        "rank": (other_interface(tmp_path / "rank.onnx", rank=3), "input 'x' has rank 2 in the dense model, 3"),
    }
    for what, (path, text) in cases.items():
        with pytest.raises(OnnxSparseError, match="do not have the same interface"):
            check_same_interface(models["dense"], path)
        rc, out = run_cli(["compare", models["dense"], path])
        assert rc == 2, what
        assert len(error_lines(out)) == 1 and text in error_lines(out)[0], (what, out)
        assert "Traceback" not in out and "Inference" not in out  # refused before running anything
    check_same_interface(models["dense"], models["perturbed"])  # same interface: no error
    check_same_interface(models["dense"], models["dynamic"])  # a dynamic batch is the same rank


def test_quiet_output_and_no_third_party_noise(models, run_cli) -> None:
    argv = ["compare", models["dense"], models["broken"], "--iterations", "2", "--atol", "1e-5"]
    rc, out = run_cli(argv)
    assert rc == 1
    for noise in ("Difference exceeds tolerance", "Accuracy Summary", "RuntimeWarning", "colored",
                  "Histogram", "Activating and starting inference", "[dtype=float32"):  # fmt: skip
        assert noise not in out, noise
    assert "output 'b': element-wise: difference exceeds" in out
    # -q: our table, the reasons and the verdict, nothing else.
    rc, quiet = run_cli([*argv, "-q"])
    lines = quiet.splitlines()
    assert rc == 1 and any(line.split()[1:2] == ["output"] for line in lines if line.startswith("[I]"))
    assert lines[-1].startswith("[E] FAILED") and "criteria:" in quiet
    rc, ok = run_cli(["compare", models["dense"], models["copy"], "-q"])
    assert rc == 0 and ok.splitlines()[-1].startswith("[I] PASSED") and "cosine" in ok
    # -v: Polygraphy's per-iteration report is there.
    rc, verbose = run_cli([*argv, "-v"])
    assert rc == 1 and "Difference exceeds tolerance" in verbose and "Accuracy Summary" in verbose


# --------------------------------------------------------------------------- inputs


def test_iterations_seed_and_val_range(models) -> None:
    report = compare_models(models["dense"], models["copy"], data=DataSpec(iterations=3, seed=7, val_range=(-1, 1)))
    assert report.iterations == 3 and report.passed


def test_input_shapes_for_dynamic_dims(models, run_cli) -> None:
    report = compare_models(models["dynamic"], models["dynamic"], data=DataSpec(input_shapes={"x": (3, 16)}))
    assert report.output("a").shape == (3, 10)
    rc, out = run_cli(["compare", models["dynamic"], models["dynamic"], "--input-shapes", "x:[5,16]"])
    assert rc == 0 and "5x10" in out and "[W]" not in out and "Will generate" not in out
    # Without shapes: ONE line that names --input-shapes with an example, not Polygraphy's warning per sample
    # (INFO: only the batch is dynamic here, and a batch of one is a fair default for a comparison).
    rc, out = run_cli(["compare", models["dynamic"], models["dynamic"], "--iterations", "3"])
    hints = [line for line in out.splitlines() if "--input-shapes" in line]
    assert rc == 0 and len(hints) == 1 and hints[0].startswith("[I]") and "x:[8,16]" in hints[0], out
    assert "Dynamic shapes cannot be used" not in out and "[W]" not in out


def test_save_and_load_inputs(models, tmp_path, run_cli) -> None:
    inputs = tmp_path / "inputs.json"
    rc, _ = run_cli(["compare", models["dense"], models["copy"], "--val-range", "[2,3]", "--save-inputs", inputs])
    assert rc == 0 and inputs.is_file()
    report = compare_models(models["dense"], models["copy"], data=DataSpec(load_inputs=(str(inputs),)))
    assert report.passed
    from polygraphy.json import load_json

    feeds = load_json(str(inputs))
    assert feeds[0]["x"].min() >= 2.0


def test_data_loader_script(models, tmp_path) -> None:
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "def my_data():\n"
        "    for i in range(2):\n"
        "        yield {'x': np.full((4, 16), i + 1, dtype=np.float32)}\n"
    )
    report = compare_models(models["dense"], models["copy"], data=DataSpec(data_loader_script=f"{script}:my_data"))
    assert report.passed and report.iterations == 2
    (tmp_path / "default.py").write_text(
        "import numpy as np\ndef load_data():\n    return [{'x': np.ones((4, 16), np.float32)}]\n"
    )
    report = compare_models(
        models["dense"], models["copy"], data=DataSpec(data_loader_script=str(tmp_path / "default.py"))
    )
    assert report.iterations == 1


# --------------------------------------------------------------------------- JSON, both directions


def test_load_polygraphy_run_outputs(models, tmp_path) -> None:
    saved = tmp_path / "polygraphy_dense.json"
    proc = subprocess.run(
        [polygraphy_cli(), "run", str(models["dense"]), "--onnxrt", "--save-outputs", str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # polygraphy's default inputs are seeded: ours are the same, so the live copy matches exactly.
    report = compare_models(None, models["copy"], load_outputs=[saved])
    assert report.passed and report.dense.startswith("onnxrt-runner")
    assert report.output("a").max_abs == 0.0
    report = compare_models(
        None, models["perturbed"], load_outputs=[saved], criteria=Criteria(atol=10, rtol=10, min_cosine=0.9999)
    )
    assert not report.output("b").passed


def test_polygraphy_run_loads_our_outputs(models, tmp_path) -> None:
    ours = tmp_path / "ours.json"
    report = compare_models(models["dense"], models["copy"], save_outputs=ours)
    assert report.passed and ours.is_file()
    proc = subprocess.run(
        [polygraphy_cli(), "run", str(models["dense"]), "--onnxrt", "--load-outputs", str(ours)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "onnxrt-dense" in proc.stdout and "onnxrt-sparse" in proc.stdout

    bad = tmp_path / "bad.json"
    assert compare_models(models["dense"], models["perturbed"], save_outputs=bad).passed  # by our defaults
    proc = subprocess.run(
        [polygraphy_cli(), "run", str(models["dense"]), "--onnxrt", "--load-outputs", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0  # dense vs sparse differ by default tolerances, in Polygraphy's eyes too


def test_our_outputs_round_trip(models, tmp_path, run_cli) -> None:
    saved = tmp_path / "runs.json"
    live = compare_models(models["dense"], models["perturbed"], save_outputs=saved, criteria=Criteria(atol=10, rtol=10))
    results = load_run_results(saved)
    assert list(results.keys()) == ["onnxrt-dense", "onnxrt-sparse"]
    again = compare_models(None, None, load_outputs=[saved], criteria=Criteria(atol=10, rtol=10))
    assert again.outputs == live.outputs
    rc, out = run_cli(["compare", "--load-outputs", saved, "--min-cosine", "0.9999", "--atol", "10", "--rtol", "10"])
    assert rc == 1 and "min-cosine" in out
    report_path = tmp_path / "report.json"
    rc, _ = run_cli(["compare", "--load-outputs", saved, "--atol", "10", "--rtol", "10", "--report", report_path])
    assert rc == 0
    data = json.loads(report_path.read_text())
    assert data["passed"] and [o["name"] for o in data["outputs"]] == ["a", "b", "cls"]


# --------------------------------------------------------------------------- errors


def test_needs_exactly_two_runs(models, tmp_path, run_cli) -> None:
    with pytest.raises(OnnxSparseError, match="exactly two runs"):
        compare_models(models["dense"], None)
    rc, out = run_cli(["compare", models["dense"]])
    assert rc == 2 and "exactly two runs" in out
    rc, out = run_cli(["compare", tmp_path / "missing.onnx", models["dense"]])
    assert rc == 2 and "no such file" in out


def test_bad_options_are_user_errors(models, run_cli) -> None:
    from conftest import error_lines

    for argv, text in (
        (["--check-error-stat", "worst"], "check-error-stat"),
        (["--atol", "x:abc"], "not a number"),
        (["--val-range", "[1]"], "--val-range"),
        (["--fp16"], "--fp16 applies to TensorRT"),
        (["--min-top1", "90"], "must be between 0 and 1"),
        (["--min-cosine", "b:1.5"], "--min-cosine: 1.5 is out of range (for b)"),
        (["--max-rel-l2", "-0.1"], "must be at least 0"),
    ):
        rc, out = run_cli(["compare", models["dense"], models["copy"], *argv])
        assert rc == 2, argv
        assert len(error_lines(out)) == 1 and text in error_lines(out)[0]


def test_trt_backend_without_tensorrt(models, run_cli) -> None:
    from onnx_sparse.handoff.trt import trt_version

    if trt_version() is not None:
        pytest.skip("TensorRT is installed here")
    rc, out = run_cli(["compare", models["dense"], models["copy"], "--trt"])
    assert rc == 2 and "TensorRT is not installed" in out
