"""``report``: tables that fit a width, names shortened in the middle, ``--wide`` on every table command."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnx_sparse.report import LOG_PREFIX, format_table, shorten, terminal_width

MINILM = [
    f"/model/model.0/auto_model/encoder/layer.{i}/{part}/MatMul"
    for i in range(3)
    for part in (
        "attention/self/query",
        "attention/self/key",
        "attention/self/value",
        "attention/output/dense",
        "intermediate/dense",
        "output/dense",
    )
] + [f"/model/model.0/auto_model/encoder/layer.{i}/attention/self/MatMul_1" for i in range(3)]


def _rows() -> list[dict]:
    return [
        {
            "node": name,
            "op": "MatMul",
            "shape": (384, 384),
            "reason": f"weight is computed at run time (by Add {name.rsplit('/', 1)[0]}/Add)",
            "notes": None,
        }
        for name in MINILM
    ]


COLS = [("node", "node"), ("op", "op"), ("shape", "shape"), ("reason", "eligible / reason"), ("notes", "annotations")]


def test_shorten_keeps_the_distinguishing_end() -> None:
    name = "/model/model.0/auto_model/encoder/layer.1/attention/self/query/MatMul"
    assert shorten(name, 100) == name
    assert shorten(name, 40) == "/.../layer.1/attention/self/query/MatMul"
    assert shorten(name, 30) == "/.../layer.1/.../query/MatMul"
    assert shorten(name, 12) == "/.../MatMul"
    # Text with a path inside: the path is shortened, the words stay.
    reason = "weight is computed at run time (by Add /model/model.0/auto_model/encoder/layer.0/attention/self/key/Add)"
    short = shorten(reason, 80)
    assert short.startswith("weight is computed at run time (by Add /") and short.endswith("/key/Add)")
    assert "layer.0" in short and len(short) <= 80
    # Details in parentheses go before the words that say what.
    text = "weight dtype int4 is not supported (float32/float16/bfloat16, or int8/fp8 behind DequantizeLinear)"
    assert shorten(text, 50) == "weight dtype int4 is not supported (...)"
    # Plain text keeps its start and its end.
    assert shorten("abcdefghijklmnopqrstuvwxyz", 11) == "abcd...wxyz"


@given(st.text(alphabet="ab/. 0123", max_size=80), st.integers(min_value=0, max_value=90))
def test_shorten_never_exceeds_the_width(text: str, width: int) -> None:
    out = shorten(text, width)
    assert len(out) <= width
    if len(text) <= width:
        assert out == text


@pytest.mark.parametrize("width", [60, 80, 100, 140])
def test_table_lines_fit_and_names_stay_distinguishable(width: int) -> None:
    text = format_table(_rows(), COLS, width=width, keep=("node",))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, text
    if width >= 80:  # room for the layer and the last two components
        nodes = [line.split("  ")[0].strip() for line in lines[2:]]
        assert len(set(nodes)) == len(MINILM), text
        assert all(n.endswith("MatMul") or n.endswith("MatMul_1") for n in nodes)


def test_optional_columns_make_room_for_names() -> None:
    rows = [r | {"macs": "589.82K", "kind": "reduction-first"} for r in _rows()]
    cols = [("node", "node"), ("op", "op"), ("shape", "shape"), ("macs", "MACs"), ("kind", "layout")]

    def nodes(text: str) -> list[str]:
        return [line.split("  ")[0].strip() for line in text.splitlines()[2:]]

    crowded = format_table(rows, cols, width=60, keep=("node",))
    assert len(set(nodes(crowded))) < len(MINILM)  # too little room: twins
    roomy = format_table(rows, cols, width=60, keep=("node",), optional=("kind", "macs", "shape"))
    assert len(set(nodes(roomy))) == len(MINILM), roomy
    assert "layout" not in roomy.splitlines()[0] and "node" in roomy.splitlines()[0]
    assert max(len(line) for line in roomy.splitlines()) <= 60
    # Nothing is dropped when the names already differ.
    assert "layout" in format_table(rows, cols, width=140, keep=("node",), optional=("kind",)).splitlines()[0]


def test_wide_table_keeps_everything() -> None:
    text = format_table(_rows(), COLS, width=0)
    for name in MINILM:
        assert name in text
    assert "annotations" in text  # an empty column is kept when wide
    narrow = format_table(_rows(), COLS, width=80)
    assert "annotations" not in narrow  # ...and left out when the table must shrink


def test_short_table_is_untouched() -> None:
    rows = [{"a": "x", "b": 1.5}, {"a": "yy", "b": None}]
    assert format_table(rows, [("a", "A"), ("b", "B")], width=80) == "A   B\n--  ---\nx   1.5\nyy  -"
    long = [{"a": "x" * 90}]
    assert format_table(long, [("a", "A")], width=100).splitlines()[-1] == "x" * 90  # fits: no cell cut


def test_default_width_is_the_terminal_less_the_log_prefix(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "70")
    assert terminal_width() == 70
    lines = format_table(_rows(), COLS).splitlines()
    assert max(len(line) for line in lines) <= 70 - LOG_PREFIX
    monkeypatch.delenv("COLUMNS")
    # pytest captures stdout: not a terminal, so 100 columns.
    assert terminal_width() == 100


@pytest.mark.parametrize("command", ["inspect", "check", "prune"])
def test_every_table_command_fits_and_has_wide(command: str, run_cli, tmp_path, monkeypatch) -> None:
    from conftest import EXPECTED, MODELS_DIR

    name = "if_subgraph.onnx"  # nodes inside subgraphs: the longest names among the case models
    rows = len(EXPECTED[name]) if command == "inspect" else 1
    extra = ["-o", str(tmp_path / "out.onnx")] if command == "prune" else []

    def table(out: str) -> list[str]:
        lines = out.splitlines()
        dash = next(i for i, line in enumerate(lines) if line.startswith("[I] --") or line.startswith("[E] --"))
        end = dash + 1
        while end < len(lines) and not lines[end].startswith(("[I] wrote", "[I] PASSED", "[E] FAILED")):
            if "layers eligible" in lines[end]:
                break
            end += 1
        assert end - dash - 1 >= rows
        return lines[dash - 1 : end]

    monkeypatch.setenv("COLUMNS", "50")
    rc, out = run_cli([command, MODELS_DIR / name, *extra])
    assert rc in (0, 1)
    narrow = table(out)
    assert max(len(line) for line in narrow) <= 50, "\n".join(narrow)
    rc, out = run_cli([command, MODELS_DIR / name, *extra, "--wide"])
    wide = table(out)
    assert rc in (0, 1) and max(len(line) for line in wide) > 50
    if command == "inspect":
        assert "layout" in wide[0] and "weight" in wide[0] and "layout" not in narrow[0]
    rc, out = run_cli([command, MODELS_DIR / name, *extra, "-v"])
    assert table(out)[0] == wide[0]  # -v prints tables wide too


def test_inspect_source_column(run_cli, tmp_path) -> None:
    from conftest import EXPECTED, MODELS_DIR

    from onnx_sparse.cli.inspect import source_text

    assert source_text("initializer", []) == "init"
    assert source_text("constant", ["Cast"]) == "Constant>Cast"
    assert source_text("initializer", ["DequantizeLinear", "Transpose"]) == "init>DQ>Transpose"
    assert source_text("", ["Transpose"]) == "-"
    for name, expects in EXPECTED.items():
        rc, out = run_cli(["inspect", MODELS_DIR / name, "--json", tmp_path / "i.json", "--wide"])
        assert rc == 0
        layers = {r["node"]: r for r in json.loads((tmp_path / "i.json").read_text())["layers"]}
        for e in expects:
            want = source_text(layers[e.node]["source"], layers[e.node]["path"])
            row = next(line for line in out.splitlines() if line.startswith(f"[I] {e.node} "))
            assert f"  {want}  " in row, (name, row)
