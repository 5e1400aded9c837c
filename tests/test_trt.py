"""TensorRT glue: version rules and log capture everywhere; engine builds only where TensorRT is installed."""

from __future__ import annotations

import builtins
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.core.nm import prune_2_4
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.handoff import trt

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

TRT_REASON = "TensorRT is not installed (it needs an NVIDIA GPU); engine builds cannot be tested here"


def test_modules_import_without_tensorrt() -> None:
    import onnx_sparse.cli.build  # noqa: F401
    import onnx_sparse.cli.compare  # noqa: F401
    import onnx_sparse.handoff.compare  # noqa: F401
    import onnx_sparse.handoff.verdict  # noqa: F401


@pytest.mark.parametrize(
    ("version", "flags"),
    [("8.6.1.6", True), ("10.0.1", True), ("10.12.0.36", True), ("10.13.3.9.post1", True), ("11.0.0.1", False),
     ("11", False), ("12.1.0", False)],
)  # fmt: skip
def test_precision_flags_until_11(version: str, flags: bool) -> None:
    assert trt.has_precision_flags(version) is flags


def test_trt_version_none_when_not_importable(monkeypatch) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("no tensorrt")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert trt.trt_version() is None
    with pytest.raises(OnnxSparseError, match="TensorRT is not installed"):
        trt.require_trt()
    with pytest.raises(OnnxSparseError, match="TensorRT is not installed"):
        trt.build_engine("model.onnx")


def test_capture_polygraphy_log_collects_and_forwards(caplog) -> None:
    from polygraphy.logger import G_LOGGER

    before = (G_LOGGER.module_severity.get(), G_LOGGER.use_python_logging_system)
    with caplog.at_level(logging.DEBUG, logger="onnx_sparse"):
        with trt.capture_polygraphy_log(forward_level=logging.INFO) as lines:
            G_LOGGER.info("an info line")
            G_LOGGER.verbose("(Sparsity) Layers eligible for sparse math: conv1")
            G_LOGGER.extra_verbose("an extra verbose line")
    assert [line.text for line in lines] == [
        "[I] an info line",
        "[V] (Sparsity) Layers eligible for sparse math: conv1",
        "[X] an extra verbose line",
    ]
    assert lines[1].message == "(Sparsity) Layers eligible for sparse math: conv1"
    assert "an info line" in caplog.text and "extra verbose" not in caplog.text
    assert (G_LOGGER.module_severity.get(), G_LOGGER.use_python_logging_system) == before


def test_build_command_without_tensorrt(run_cli, tmp_path) -> None:
    from conftest import error_lines

    if trt.trt_version() is not None:
        pytest.skip("TensorRT is installed here")
    rc, out = run_cli(["build", tmp_path / "any.onnx", "--dense-too"])
    assert rc == 2
    (line,) = error_lines(out)
    assert line.startswith("[E] TensorRT is not installed") and "pip install tensorrt" in line


# --------------------------------------------------------------------------- with TensorRT


def sparse_mlp(path: Path, dim: int = 512, tokens: int = 256, fp16: bool = False) -> Path:
    """x[tokens, dim] -> MatMul -> Relu -> MatMul, 2:4 weights (large enough for sparse kernels)."""
    rng = np.random.default_rng(0)
    dtype, onnx_type = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    w1 = prune_2_4(rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim), axis=0).astype(dtype)
    w2 = prune_2_4(rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim), axis=0).astype(dtype)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", onnx_type, [tokens, dim])],
        [helper.make_tensor_value_info("y", onnx_type, [tokens, dim])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def tensorrt():
    return pytest.importorskip("tensorrt", reason=TRT_REASON)


def test_build_sparse_engine_and_parse_its_log(tensorrt, tmp_path) -> None:
    from onnx_sparse.handoff.trtlog import parse_trt_log

    version = trt.require_trt()
    fp16_model = not trt.has_precision_flags(version)
    model = sparse_mlp(tmp_path / "mlp.onnx", fp16=fp16_model)
    built = trt.build_engine(model, sparse=True, fp16=not fp16_model, save_path=tmp_path / "mlp.engine")
    assert built.engine == tmp_path / "mlp.engine" and built.engine.stat().st_size > 0
    log = parse_trt_log(built.log)
    assert log.found, "no (Sparsity) lines in the captured builder log"
    assert trt.time_engine(built.engine, iterations=5, warmup=2) > 0
    layers = trt.engine_layers(built.engine)  # profilingVerbosity=DETAILED: tactic names are there
    assert layers and any(x.tactic for x in layers)


def test_build_int8_qdq_model(tensorrt, tmp_path, run_cli) -> None:
    """prune --int8 output builds as INT8 (INT8 flag on TensorRT 10, strongly typed on 11)."""
    model = sparse_mlp(tmp_path / "mlp.onnx")
    feeds = tmp_path / "calib.json"
    from polygraphy.json import save_json

    save_json(
        [{"x": np.random.default_rng(i).standard_normal((256, 512)).astype(np.float32)} for i in range(2)], str(feeds)
    )
    q = tmp_path / "mlp.int8.onnx"
    assert run_cli(["quantize", model, "-o", q, "--load-inputs", feeds])[0] == 0
    rc, out = run_cli(["build", q, "--int8", "--iterations", "5"])
    assert rc == 0, out
    assert "sparse INT8 (ours)" in out


def test_precision_flags_refused_on_trt11(tensorrt, tmp_path) -> None:
    if trt.has_precision_flags(trt.require_trt()):
        pytest.skip("this TensorRT still has precision flags")
    with pytest.raises(OnnxSparseError, match="no FP16/INT8 builder flags"):
        trt.build_engine(sparse_mlp(tmp_path / "m.onnx"), fp16=True)


def test_build_command_end_to_end(tensorrt, tmp_path, run_cli) -> None:
    model = sparse_mlp(tmp_path / "mlp.onnx")
    rc, out = run_cli(["build", model, "--dense-too", "--fp16", "--iterations", "5", "--report", tmp_path / "r.json"])
    assert rc == 0, out
    assert "sparse engine: median" in out and "dense engine:" in out and "TRT eligible" in out


# --------------------------------------------------------------------------- tools/gpu_check.py


def test_gpu_check_without_cuda_says_so(tmp_path) -> None:
    import subprocess
    import sys

    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present: run tools/run_gpu_check.sh instead")
    except ImportError:
        pass
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(repo / "tools" / "gpu_check.py"), "--no-trt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_gpu_check_layers_and_synthetic_model(tmp_path) -> None:
    from tools import gpu_check

    layers = gpu_check.layers_from_model(Path(__file__).resolve().parent.parent / "models" / "mlp.onnx")
    assert layers and all(layer.weight.shape == (layer.out_features, layer.in_features) for layer in layers)
    path = gpu_check.synthetic_trt_model(tmp_path / "chain.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    from onnx_sparse.graph.locate import find_weight_sites

    sites = find_weight_sites(model)
    assert len(sites) == len(gpu_check.TRT_CHAIN) - 1 and all(s.eligible for s in sites)


# --------------------------------------------------------------------------- fakes: inspector JSON, precision plans


# The shape of IEngineInspector's JSON with profilingVerbosity=DETAILED, as in a public engine dump
# (one Conv layer; fields shortened to the ones we read).
LAYER_INFO = """{"Layers": [{"Name": "conv1 + relu1", "LayerType": "CaskConvolution", "HasSparseWeights": 1,
 "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32",
 "TacticValue": "0x1"}, {"Name": "fc", "HasSparseWeights": 0,
 "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8f32_i8i32_f32"}],
 "Bindings": ["x", "y"]}"""


def test_parse_layer_info_detailed_and_names_only() -> None:
    layers = trt.parse_layer_info(LAYER_INFO)
    assert [(x.name, x.sparse_weights, x.sparse_tactic) for x in layers] == [
        ("conv1 + relu1", True, True),
        ("fc", False, False),
    ]
    assert trt.parse_layer_info('{"Layers": ["a", "b"]}') == [trt.EngineLayer("a"), trt.EngineLayer("b")]


def _qdq_model(tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copy(MODELS_DIR / "qdq_conv.onnx", tmp_path / "q.onnx"))


@pytest.mark.parametrize(
    ("version", "fp16", "flags", "typed"),
    [
        ("10.14.1", False, (False, True), False),
        ("10.14.1", True, (True, True), False),
        ("11.0.0", False, (False, False), True),
    ],
)
def test_plan_int8_uses_the_qdq_model(tmp_path: Path, version: str, fp16: bool, flags, typed: bool) -> None:
    plan = trt.plan_precision(_qdq_model(tmp_path), fp16, tmp_path, int8=True, version=version)
    assert (plan.fp16, plan.int8) == flags and plan.strongly_typed is typed and plan.qdq
    assert not plan.converted and "Q/DQ" in plan.note


def test_plan_trt11_qdq_fp16_converts_the_float_parts(tmp_path: Path) -> None:
    plan = trt.plan_precision(_qdq_model(tmp_path), True, tmp_path, int8=True, version="11.0")
    assert plan.converted and plan.strongly_typed and plan.qdq and not (plan.fp16 or plan.int8)
    assert "Q/DQ" in plan.note


def test_plan_int8_refuses_a_float_model(tmp_path: Path) -> None:
    with pytest.raises(OnnxSparseError, match="no QuantizeLinear") as err:
        trt.plan_precision(MODELS_DIR / "conv_bn_folded.onnx", False, tmp_path, int8=True, version="10.14")
    assert "onnx-sparse quantize" in (err.value.hint or "")


def test_plan_trt11_fp32_converts_to_fp16(tmp_path: Path) -> None:
    plan = trt.plan_precision(MODELS_DIR / "conv_bn_folded.onnx", True, tmp_path, version="11.0")
    assert plan.converted and plan.strongly_typed and not (plan.fp16 or plan.int8)


def test_build_command_with_a_fake_tensorrt(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole `build --int8` report path on TensorRT 11 with the builder, timer and inspector faked."""
    import json

    calls = []

    def fake_build(path, sparse=True, **kw):
        calls.append((sparse, kw))
        log = "[I] [TRT] (Sparsity) Found 1 layer(s) eligible to use sparse tactics\n[I] [TRT] (Sparsity) Chose 1 layer(s) using sparse tactics\n"
        return trt.EngineBuild(b"engine", log if sparse else "")

    monkeypatch.setattr(trt, "require_trt", lambda: "11.0.0")
    monkeypatch.setattr(trt, "build_engine", fake_build)
    monkeypatch.setattr(trt, "time_engine", lambda engine, iterations=1: 1.0)
    monkeypatch.setattr(
        trt, "engine_layers", lambda engine: [trt.EngineLayer("conv", "sm80_xmma_fprop_sparse_conv_i8", True)]
    )
    report = tmp_path / "r.json"
    rc, out = run_cli(["build", _qdq_model(tmp_path), "--int8", "--dense-too", "--report", report])
    assert rc == 0, out
    assert [c[0] for c in calls] == [True, False]
    assert all(c[1]["strongly_typed"] and not c[1]["fp16"] and not c[1]["int8"] for c in calls)
    doc = json.loads(report.read_text())
    (node,) = doc["nodes"]
    assert (node["trt_eligible"], node["trt_picked"], node["tactic_sparse"]) == (True, True, True)
    assert doc["trt_eligible_count"] == 1 and "strongly typed" in doc["precision"]
    assert "1 layer(s) eligible for sparse tactics, 1 chose them" in out


# --------------------------------------------------------------------------- build's outputs, with a fake TensorRT


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """An importable ``tensorrt`` module (version 10.0.0) and the builder, timer and inspector faked:
    ``build`` runs end to end; the fake builder writes ``--save-engine`` like the real one."""
    import sys
    import types

    module = types.ModuleType("tensorrt")
    module.__version__ = "10.0.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    saved: list[Path] = []

    def fake_build(path, sparse=True, save_path=None, **kw):
        if save_path is None:
            return trt.EngineBuild(b"engine", "[I] [TRT] (Sparsity) Found 0 layer(s) eligible to use sparse tactics\n")
        Path(save_path).write_bytes(b"engine")
        saved.append(Path(save_path))
        return trt.EngineBuild(Path(save_path), "")

    monkeypatch.setattr(trt, "build_engine", fake_build)
    monkeypatch.setattr(trt, "time_engine", lambda engine, iterations=1: 1.0)
    monkeypatch.setattr(trt, "engine_layers", lambda engine: [])
    return saved


def _external_model(folder: Path) -> tuple[Path, Path]:
    model, data = folder / "m.onnx", folder / "m.onnx.data"
    onnx.save(
        onnx.load(MODELS_DIR / "conv_bn_folded.onnx"),
        model,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=0,
    )
    return model, data


@pytest.mark.parametrize(
    ("argv", "option", "message"),
    [
        (["--save-engine", "{model}"], "--save-engine", "input"),
        (["--save-log", "{data}"], "--save-log", "external data file"),
        (["--report", "{folder}/nosuchdir/../m.onnx"], "--report", "output folder does not exist"),
        (["--save-log", "{folder}/log.txt", "--report", "{folder}/log.txt"], "--report", "log.txt"),
        (["--save-engine", "{folder}"], "--save-engine", "folder"),
    ],
    ids=["engine-over-model", "log-over-data", "missing-folder-dotdot", "two-outputs-one-file", "a-folder"],
)
def test_build_outputs_never_replace_an_input_or_each_other(
    fake_tensorrt, run_cli, tmp_path: Path, argv: list[str], option: str, message: str
) -> None:
    from conftest import error_lines, sha256

    model, data = _external_model(tmp_path)
    before = {p.name: sha256(p) for p in tmp_path.iterdir() if p.is_file()}
    args = [a.format(model=model, data=data, folder=tmp_path) for a in argv]
    rc, out = run_cli(["build", model, *args])
    assert rc == 2, out
    (line,) = error_lines(out)
    assert option in line and message in line, line
    assert {p.name: sha256(p) for p in tmp_path.iterdir() if p.is_file()} == before  # nothing written or replaced
    assert not fake_tensorrt  # refused before any build


def test_build_writes_its_outputs_where_the_guard_looked(fake_tensorrt, run_cli, tmp_path: Path) -> None:
    import json

    model, _ = _external_model(tmp_path)
    (tmp_path / "sub").mkdir()
    out = tmp_path / "sub"
    rc, text = run_cli(
        [
            "build",
            model,
            "--save-engine",
            out / "e.plan",
            "--save-log",
            out / "log.txt",
            "--report",
            tmp_path / "sub" / ".." / "sub" / "r.json",
        ]  # fmt: skip
    )
    assert rc == 0, text
    assert fake_tensorrt == [out / "e.plan"] and (out / "e.plan").read_bytes() == b"engine"
    assert (out / "log.txt").is_file() and json.loads((out / "r.json").read_text())["tensorrt"] == "10.0.0"
