"""Tests for ``onnx-sparse inspect`` and ``onnx-sparse check`` (and the CLI frame they share)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CASE_MODELS, EXPECTED, case_path, error_lines

LAYER_KEYS = {
    "node",
    "op",
    "weight",
    "shape",
    "axis",
    "eligible",
    "reason",
    "sparse_2of4",
    "violating_fraction",
    "params",
}


def _inspect_json(run_cli, model: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "inspect.json"
    rc, text = run_cli(["inspect", model, "--json", out, *extra])
    assert rc == 0, text
    return json.loads(out.read_text())


def _closing(text: str) -> str:
    return text.strip().splitlines()[-1]


def _pruned(run_cli, name: str, tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / f"sparse_{name}"
    rc, text = run_cli(["prune", case_path(name), "-o", out, *extra])
    assert rc == 0, text
    return out


# --------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("name", CASE_MODELS)
def test_inspect_table_and_json(name: str, run_cli, tmp_path: Path) -> None:
    rc, text = run_cli(["inspect", case_path(name)])
    assert rc == 0
    lines = text.splitlines()
    header = next(line for line in lines if "eligible" in line)
    assert header.startswith("[I] node") and "source" in header and "shape" in header
    for e in EXPECTED[name]:
        assert any(line.startswith(f"[I] {e.node} ") for line in lines), e.node
    assert "layers eligible" in text
    assert _closing(text).startswith("[I] PASSED | Runtime:")

    data = _inspect_json(run_cli, case_path(name), tmp_path)
    assert set(data) == {"model", "layers", "summary", "checker"} and data["checker"] == "valid"
    assert data["model"] == str(case_path(name))
    assert len(data["layers"]) == len(EXPECTED[name])
    for layer in data["layers"]:
        assert LAYER_KEYS <= set(layer), LAYER_KEYS - set(layer)
        e = next(x for x in EXPECTED[name] if x.node == layer["node"])
        assert (layer["op"], layer["weight"], tuple(layer["shape"]), layer["axis"], layer["eligible"]) == (
            e.op,
            e.weight,
            e.shape,
            e.axis,
            e.eligible,
        )
        assert (layer["reason"] == "") == e.eligible
        if layer["eligible"]:  # the case models are dense
            assert layer["sparse_2of4"] is False and layer["violating_fraction"] == 1.0


def test_inspect_summary_by_hand(run_cli, tmp_path: Path) -> None:
    s = _inspect_json(run_cli, case_path("grouped_depthwise.onnx"), tmp_path)["summary"]
    # gconv [12,8,3,3] = 864 (eligible), dwconv [12,1,3,3] = 108, g6conv [16,6,3,3] = 864.
    assert (s["layers"], s["eligible_layers"], s["sparse_layers"]) == (3, 1, 0)
    assert (s["params"], s["eligible_params"]) == (1836, 864)
    assert s["eligible_params_share"] == pytest.approx(864 / 1836)
    # Per sample, 8x8 outputs: gconv 12*64 outputs x (8*9); dwconv 12*64 x 9; g6conv 16*64 x (6*9).
    gconv, dw, g6 = 12 * 64 * 72, 12 * 64 * 9, 16 * 64 * 54
    assert (s["macs"], s["eligible_macs"]) == (gconv + dw + g6, gconv)
    assert s["eligible_macs_share"] == pytest.approx(gconv / (gconv + dw + g6))
    assert s["sparse_eligible_share"] == 0.0 and s["sparse_params_share"] == 0.0


def test_inspect_summary_after_prune(run_cli, tmp_path: Path) -> None:
    s = _inspect_json(run_cli, _pruned(run_cli, "mlp.onnx", tmp_path), tmp_path)["summary"]
    # fc0 64x32 + fc1 32x16 + fc2 8x16 eligible, bmm 2x16x8 not.
    assert (s["layers"], s["eligible_layers"], s["sparse_layers"]) == (4, 3, 3)
    assert (s["params"], s["eligible_params"]) == (2048 + 512 + 128 + 256, 2048 + 512 + 128)
    assert s["sparse_eligible_share"] == 1.0 and s["sparse_params_share"] == 1.0


def test_inspect_layer_values_after_prune(run_cli, tmp_path: Path) -> None:
    layers = _inspect_json(run_cli, _pruned(run_cli, "conv_bn_folded.onnx", tmp_path), tmp_path)["layers"]
    for layer in layers:
        assert layer["sparse_2of4"] is True and layer["violating_fraction"] == 0.0
        assert layer["zero_fraction"] == pytest.approx(0.5)
    assert [layer["params"] for layer in layers] == [32 * 16 * 9, 64 * 32]


@pytest.mark.parametrize(
    ("argv", "nodes"),
    [
        (["--include", "conv1"], ["conv1"]),
        (["--exclude", "conv1"], ["conv2"]),
        (["--include", "conv", "--exclude", "2$"], ["conv1"]),
        (["--include", "nothing"], []),
    ],
)
def test_inspect_selection(argv: list[str], nodes: list[str], run_cli, tmp_path: Path) -> None:
    data = _inspect_json(run_cli, case_path("conv_bn_folded.onnx"), tmp_path, *argv)
    assert [layer["node"] for layer in data["layers"]] == nodes
    assert data["summary"]["layers"] == len(nodes)


def test_inspect_op_filter(run_cli, tmp_path: Path) -> None:
    data = _inspect_json(run_cli, case_path("mlp.onnx"), tmp_path, "--op", "Gemm")
    assert [layer["node"] for layer in data["layers"]] == ["Gemm_1", "Gemm_3"]
    data = _inspect_json(run_cli, case_path("mlp.onnx"), tmp_path, "--op", "Gemm", "--op", "MatMul")
    assert len(data["layers"]) == 4


def test_inspect_min_channels(run_cli, tmp_path: Path) -> None:
    # conv1: C=16, K=32; conv2: C=32, K=64.
    data = _inspect_json(run_cli, case_path("conv_bn_folded.onnx"), tmp_path, "--min-channels", "32")
    assert [layer["node"] for layer in data["layers"]] == ["conv2"]


def test_inspect_model_without_weights(run_cli, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), path)
    rc, text = run_cli(["inspect", path])
    assert rc == 0 and "no Conv, ConvTranspose, Gemm or MatMul layers found" in text


# --------------------------------------------------------------------------- check


@pytest.mark.parametrize("name", [n for n in CASE_MODELS if any(e.eligible for e in EXPECTED[n])])
def test_check_fails_on_dense_and_passes_after_prune(name: str, run_cli, tmp_path: Path) -> None:
    rc, text = run_cli(["check", case_path(name)])
    assert rc == 1
    eligible = [e.node for e in EXPECTED[name] if e.eligible]
    assert f"{len(eligible)} of {len(eligible)} eligible layers are not 2:4" in text
    for node in eligible:
        assert any(line.startswith(f"[E] {node} ") for line in text.splitlines()), node
    for e in EXPECTED[name]:
        if not e.eligible:
            assert not any(line.startswith(f"[E] {e.node} ") for line in text.splitlines()), e.node
    assert _closing(text).startswith("[E] FAILED | Runtime:")

    rc, text = run_cli(["check", _pruned(run_cli, name, tmp_path)])
    assert rc == 0, text
    assert f"all {len(eligible)} eligible layers are 2:4" in text
    assert _closing(text).startswith("[I] PASSED | Runtime:")


@pytest.mark.parametrize("name", [n for n in CASE_MODELS if not any(e.eligible for e in EXPECTED[n])])
def test_check_without_eligible_layers_passes(name: str, run_cli) -> None:
    rc, text = run_cli(["check", case_path(name)])
    assert rc == 0 and "no eligible layers to check" in text


def test_check_selection(run_cli, tmp_path: Path) -> None:
    half = _pruned(run_cli, "conv_bn_folded.onnx", tmp_path, "--include", "conv2")
    assert run_cli(["check", half])[0] == 1
    assert run_cli(["check", half, "--include", "conv2"])[0] == 0
    assert run_cli(["check", half, "--exclude", "conv1"])[0] == 0
    rc, text = run_cli(["check", half, "--include", "conv1"])
    assert rc == 1 and "[E] conv1 " in text and "[E] conv2 " not in text
    mixed = _pruned(run_cli, "mlp.onnx", tmp_path, "--op", "Gemm")
    assert run_cli(["check", mixed, "--op", "Gemm"])[0] == 0
    assert run_cli(["check", mixed, "--op", "MatMul"])[0] == 1


# --------------------------------------------------------------------------- bad input through the CLI


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(bytes(range(256)) * 8)
    return {"missing": tmp_path / "missing.onnx", "folder": tmp_path, "noise": noise}


@pytest.mark.parametrize("command", ["inspect", "check", "prune"])
@pytest.mark.parametrize("kind", ["missing", "folder", "noise"])
def test_bad_input_is_one_error_line(command: str, kind: str, run_cli, tmp_path: Path) -> None:
    path = _bad_inputs(tmp_path)[kind]
    argv = [command, path] + (["-o", tmp_path / "out.onnx"] if command == "prune" else [])
    rc, text = run_cli(argv)
    assert rc == 2
    assert len(error_lines(text)) == 1, text
    assert str(path) in error_lines(text)[0]
    assert "Traceback" not in text
    assert _closing(text).startswith("[E] FAILED | Runtime:")
    assert not (tmp_path / "out.onnx").exists()


def test_verbose_shows_the_traceback(run_cli, tmp_path: Path) -> None:
    rc, text = run_cli(["inspect", tmp_path / "missing.onnx", "-v"])
    assert rc == 2 and "Traceback" in text and "OnnxSparseError" in text


def test_quiet_hides_info(run_cli) -> None:
    rc, text = run_cli(["inspect", case_path("mlp.onnx"), "-q"])
    # Only the verdict line stays (as Polygraphy's -q keeps its PASSED line); -qq hides it too.
    assert rc == 0 and [line.split(" |")[0] for line in text.splitlines()] == ["[I] PASSED"]
    rc, text = run_cli(["inspect", case_path("mlp.onnx"), "-qq"])
    assert rc == 0 and text == ""


def test_bad_option_exits_2(run_cli) -> None:
    with pytest.raises(SystemExit) as err:
        run_cli(["inspect", case_path("mlp.onnx"), "--op", "Relu"])
    assert err.value.code == 2


def test_a_reader_that_goes_away_ends_the_output_quietly():
    """``onnx-sparse inspect m.onnx | head -1``: no "Logging error" traceback per remaining line."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onnx_sparse",
            "inspect",
            str(Path(__file__).resolve().parent.parent / "models" / "mlp.onnx"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away before anything is written (the CLI takes ~0.5 s to start)
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Logging error" not in err and "BrokenPipeError" not in err, err
