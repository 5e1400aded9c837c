"""Tests for onnx_sparse.progress: the per-layer progress bar of long calibration runs."""

from __future__ import annotations

import io
import logging

import pytest
from test_calibrated_models import mlp, mlp_data

from onnx_sparse import progress
from onnx_sparse.passes.calibrated import CalibratedPrunePass
from onnx_sparse.progress import Progress, suspended


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_render_counts_elapsed_and_eta() -> None:
    bar = Progress(4, "sparsegpt", stream=io.StringIO(), enabled=True, width=8)
    bar.start = 100.0
    assert bar.render(now=100.0) == "sparsegpt [>       ] 0/4  0:00 elapsed"
    bar.done, bar.note = 1, "fc1"
    assert bar.render(now=110.0) == "sparsegpt [==>     ] 1/4  0:10 elapsed, ~0:30 left  fc1"
    bar.done = 4
    assert bar.render(now=3800.0) == "sparsegpt [========] 4/4  1:01:40 elapsed  fc1"


def test_drawn_on_a_terminal_only(monkeypatch) -> None:
    logging.getLogger("onnx_sparse").setLevel(logging.INFO)
    tty, pipe = _Tty(), io.StringIO()
    with Progress(2, "x", stream=tty) as a, Progress(2, "y", stream=pipe) as b:
        a.update(note="l1")
        b.update(note="l1")
    assert "\r" in tty.getvalue() and "1/2" in tty.getvalue() and tty.getvalue().endswith("\r\033[K")
    assert pipe.getvalue() == ""
    monkeypatch.setenv("ONNX_SPARSE_PROGRESS", "0")
    assert not Progress(2, "x", stream=_Tty()).enabled
    monkeypatch.delenv("ONNX_SPARSE_PROGRESS")
    logging.getLogger("onnx_sparse").setLevel(logging.WARNING)  # -q
    assert not Progress(2, "x", stream=_Tty()).enabled


def test_log_lines_do_not_land_inside_the_bar() -> None:
    tty = _Tty()
    with Progress(3, "sparsegpt", stream=tty, enabled=True) as bar:
        bar.update(note="fc1")
        with suspended():
            tty.write("[I] a log line\n")
    out = tty.getvalue()
    # the bar is cleared before the line and drawn again after it
    assert "\r\033[K[I] a log line\n\rsparsegpt [" in out
    assert progress._ACTIVE == []


def test_nested_bars_show_the_inner_one() -> None:
    tty = _Tty()
    with Progress(2, "outer", stream=tty, enabled=True) as outer, Progress(2, "inner", stream=tty, enabled=True):
        before = tty.getvalue()
        outer.update()
        assert tty.getvalue() == before  # the inner bar owns the line


@pytest.mark.parametrize("method", ["sparsegpt"])
def test_calibrated_pass_reports_every_layer(method: str, monkeypatch) -> None:
    steps: list[tuple[int, str]] = []
    real_update = Progress.update

    def spy(self: Progress, n: int = 1, note: str = "") -> None:
        real_update(self, n, note)
        steps.append((self.done, note))

    monkeypatch.setattr(Progress, "update", spy)
    CalibratedPrunePass(method, mlp_data(0, 4))(mlp())
    assert steps == [(1, "fc1"), (2, "fc2"), (3, "fc3")]


# The issue 21 example: a 173-column per-layer line of prune on MiniLM.
_NAME = "/model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul"
_TAIL = "asym 0.07s (2432 rows, loss 10.23, no dense refit (cross-validation kept the dense weights))"


def test_line_fits_like_the_tables() -> None:
    from onnx_sparse.report import shorten

    text = progress.line("[1/18]", _NAME, _TAIL, width=100)
    assert len(text) <= 96  # 100 columns with the "[I] " prefix
    assert text.startswith("[1/18] /") and "layer.0" in text and "query/MatMul" in text  # what tells layers apart
    short = text.split(" ")[1]
    assert short == shorten(_NAME, len(short))  # the tables' rule, not a second one
    assert progress.line("[2/18]", "conv1", "asym 0.07s (12 rows)", width=100) == "[2/18] conv1 asym 0.07s (12 rows)"


def test_line_full_under_verbose_and_width_zero(caplog) -> None:
    full = f"[1/18] {_NAME} {_TAIL}"
    assert progress.line("[1/18]", _NAME, _TAIL, width=0) == full
    with caplog.at_level(logging.DEBUG, logger="onnx_sparse"):
        assert progress.line("[1/18]", _NAME, _TAIL, width=100) == full


def test_prune_progress_lines_fit_and_report_keeps_full_names(run_cli, tmp_path) -> None:
    """Per-layer log lines of a calibrated prune fit 100 columns; the JSON report has the full names."""
    import json

    import onnx
    from polygraphy.json import save_json

    model = mlp()
    long = "/model/model.0/auto_model/encoder/layer.0/attention/self/query/"
    for node in model.graph.node:
        if node.name:
            node.name = long + node.name
    onnx.save(model, tmp_path / "m.onnx")
    save_json(mlp_data(0, 6), tmp_path / "calib.json")
    rc, out = run_cli(["prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--method", "asym",
                       "--load-inputs", tmp_path / "calib.json", "--report", tmp_path / "r.json"])  # fmt: skip
    assert rc == 0, out
    layer_lines = [line for line in out.splitlines() if line.startswith("[I] [")]
    assert layer_lines and all(len(line) <= 100 for line in layer_lines), layer_lines
    assert any("..." in line for line in layer_lines)
    nodes = [n for r in json.loads((tmp_path / "r.json").read_text())["layers"] for n in r["nodes"]]
    assert any(n.startswith(long) for n in nodes)
