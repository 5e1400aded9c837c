"""The ``polygraphy run`` plugin: ``--onnx-sparse-prune`` inserts PruneOnnx into Polygraphy's ONNX loading chain.

Most tests run the real ``polygraphy run`` command (subprocess), which finds the plugin through
the installed entry point, and compare its saved outputs with those of the model pruned by
``onnx-sparse prune`` (Polygraphy's default inputs are seeded, so both runs see the same data).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_sparse.handoff.plugin import DATA_METHODS, METHODS, OnnxSparsePruneArgs, PruneOnnx, prune_onnx

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
CASES = ["conv_bn_folded.onnx", "mlp.onnx"]
OPTIONS = [
    "--onnx-sparse-prune",
    "--onnx-sparse-method",
    "--onnx-sparse-fc-layout",
    "--onnx-sparse-include",
    "--onnx-sparse-exclude",
    "--onnx-sparse-ops",
    "--onnx-sparse-min-channels",
    "--onnx-sparse-bias-correction",
    "--onnx-sparse-recipe",
    "--onnx-sparse-runners",
    "--onnx-sparse-save",
]


def polygraphy_cli() -> str:
    exe = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    if not Path(exe).exists():
        pytest.skip("the polygraphy command is not installed")
    return exe


def polygraphy(*args: object, cwd: Path, ok: bool = True) -> str:
    proc = subprocess.run([polygraphy_cli(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, out
    assert "Failed to load plugin" not in out, out
    return out


def onnx_sparse_prune(src: Path, dst: Path, *options: str) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_sparse", "prune", str(src), "-o", str(dst), *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dst


def outputs(path: Path) -> dict[str, list[np.ndarray]]:
    """{output name: [array per iteration]} of the only runner in a ``--save-outputs`` file."""
    from polygraphy.comparator import RunResults

    results = RunResults.load(str(path))
    assert len(results) == 1
    (_, iterations), *_ = results.items()
    return {name: [np.asarray(it[name]) for it in iterations] for name in iterations[0].keys()}


def assert_same(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert len(a[name]) == len(b[name])
        for x, y in zip(a[name], b[name], strict=True):
            np.testing.assert_array_equal(x, y, err_msg=name)


def differs(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> bool:
    return any(not np.array_equal(x, y) for n in a for x, y in zip(a[n], b[n], strict=True))


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each case model pruned by the ``onnx-sparse prune`` command."""
    d = tmp_path_factory.mktemp("pruned")
    return {m: onnx_sparse_prune(MODELS / m, d / m) for m in CASES}


# --------------------------------------------------------------------------- registration and help


def test_entry_point_is_registered() -> None:
    eps = metadata.entry_points(group="polygraphy.run.plugins")
    (ep,) = [e for e in eps if e.name == "onnx-sparse"]
    groups = ep.load()()
    assert [type(g) for g in groups] == [OnnxSparsePruneArgs]


def test_help_lists_our_options(tmp_path: Path) -> None:
    out = polygraphy("run", "-h", cwd=tmp_path)
    for option in OPTIONS:
        assert option in out
    assert "onnx-sparse 2:4 Pruning:" in out
    for method in METHODS:
        assert method in out
    assert "--load-inputs" in out and "RANDOM" in out  # where calibration data comes from


# --------------------------------------------------------------------------- the real command


@pytest.mark.parametrize("model", CASES)
def test_prune_flag_runs_the_pruned_model(model: str, pruned: dict[str, Path], tmp_path: Path) -> None:
    out = polygraphy("run", MODELS / model, "--onnxrt", "--onnx-sparse-prune", "--save-outputs", "a.json", cwd=tmp_path)
    assert "onnx-sparse: pruning to 2:4 (magnitude)" in out  # our log lines go through Polygraphy's logger
    assert re.search(r"\[I\] pruned \d+ tensors", out)
    polygraphy("run", pruned[model], "--onnxrt", "--save-outputs", "b.json", cwd=tmp_path)
    polygraphy("run", MODELS / model, "--onnxrt", "--save-outputs", "d.json", cwd=tmp_path)
    a, b, dense = (outputs(tmp_path / f) for f in ("a.json", "b.json", "d.json"))
    assert_same(a, b)
    assert differs(a, dense)


@pytest.mark.parametrize("model", CASES)
def test_without_the_flag_outputs_are_dense(model: str, pruned: dict[str, Path], tmp_path: Path) -> None:
    import onnxruntime as ort
    from polygraphy.json import load_json

    polygraphy(
        "run", MODELS / model, "--onnxrt", "--iterations", "2", "--save-inputs", "in.json", "--save-outputs", "d.json",
        cwd=tmp_path,
    )  # fmt: skip
    sess = ort.InferenceSession(str(MODELS / model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds = load_json(str(tmp_path / "in.json"))
    want = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, sess.run(names, dict(feed)), strict=True):
            want[n].append(v)
    got = outputs(tmp_path / "d.json")
    assert_same(got, want)
    polygraphy("run", pruned[model], "--onnxrt", "--iterations", "2", "--save-outputs", "s.json", cwd=tmp_path)
    assert differs(got, outputs(tmp_path / "s.json"))


@pytest.mark.parametrize("model", CASES)
def test_gen_script_contains_our_loader_and_runs(model: str, pruned: dict[str, Path], tmp_path: Path) -> None:
    polygraphy(
        "run", MODELS / model, "--onnxrt", "--onnx-sparse-prune", "--save-outputs", "c.json", "--gen-script", "out.py",
        cwd=tmp_path,
    )  # fmt: skip
    script = (tmp_path / "out.py").read_text()
    assert "from onnx_sparse.handoff.plugin import PruneOnnx" in script
    assert re.search(r"^prune_onnx = PruneOnnx\(load_onnx\)$", script, re.M)
    assert "BytesFromOnnx(prune_onnx)" in script
    assert not (tmp_path / "c.json").exists()  # --gen-script only writes the script
    proc = subprocess.run([sys.executable, "out.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    polygraphy("run", pruned[model], "--onnxrt", "--save-outputs", "b.json", cwd=tmp_path)
    assert_same(outputs(tmp_path / "c.json"), outputs(tmp_path / "b.json"))


def test_save_onnx_saves_the_pruned_model(pruned: dict[str, Path], tmp_path: Path) -> None:
    model = "conv_bn_folded.onnx"
    polygraphy("run", MODELS / model, "--onnxrt", "--onnx-sparse-prune", "--save-onnx", "x.onnx", cwd=tmp_path)
    got, want = weights(tmp_path / "x.onnx"), weights(pruned[model])
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_selection_and_fc_layout_match_the_cli(tmp_path: Path) -> None:
    src = MODELS / "mlp.onnx"
    ref = onnx_sparse_prune(src, tmp_path / "ref.onnx", "--fc-layout", "--exclude", "Gemm_3")
    polygraphy(
        "run", src, "--onnxrt", "--onnx-sparse-prune", "--onnx-sparse-fc-layout", "--onnx-sparse-exclude", "Gemm_3",
        "--save-outputs", "a.json", "--save-onnx", "x.onnx", cwd=tmp_path,
    )  # fmt: skip
    polygraphy("run", ref, "--onnxrt", "--save-outputs", "b.json", cwd=tmp_path)
    assert_same(outputs(tmp_path / "a.json"), outputs(tmp_path / "b.json"))
    got, dense = weights(tmp_path / "x.onnx"), weights(src)
    np.testing.assert_array_equal(got["fc2.weight"], dense["fc2.weight"])  # excluded: still dense
    assert not np.array_equal(got["fc1.weight"], dense["fc1.weight"])
    assert [n.op_type for n in onnx.load(str(tmp_path / "x.onnx")).graph.node].count("MatMul") == 1  # fc0 -> Gemm


def test_trt_takes_the_pruned_bytes_not_the_file(tmp_path: Path) -> None:
    """As with --fp-to-fp16, TensorRT parses the serialized chain (NetworkFromOnnxBytes), not the path."""
    model = MODELS / "conv_bn_folded.onnx"
    dense = polygraphy("run", model, "--trt", "--sparse-weights", "--gen-script", "-", cwd=tmp_path)
    assert "NetworkFromOnnxPath(" in dense and "PruneOnnx" not in dense
    script = polygraphy(
        "run", model, "--onnxrt", "--trt", "--sparse-weights", "--onnx-sparse-prune", "--gen-script", "-", cwd=tmp_path
    )
    assert "NetworkFromOnnxPath" not in script
    assert "serialize_onnx = BytesFromOnnx(prune_onnx)" in script
    assert "NetworkFromOnnxBytes(serialize_onnx" in script and "SessionFromOnnx(serialize_onnx" in script
    assert script.count("= PruneOnnx(") == 1  # one loader, shared by both backends
    warn = polygraphy("run", model, "--trt", "--onnx-sparse-prune", "--gen-script", "-", cwd=tmp_path)
    assert "without --sparse-weights" in warn


def test_prune_comes_right_after_loading(tmp_path: Path) -> None:
    """Shape inference, then prune, then output marking, fp16, saving and serialization."""
    script = polygraphy(
        "run", MODELS / "mlp.onnx", "--onnxrt", "--onnx-sparse-prune", "--shape-inference", "--onnx-outputs", "h0",
        "--fp-to-fp16", "--save-onnx", "x.onnx", "--gen-script", "-", cwd=tmp_path,
    )  # fmt: skip
    chain = re.findall(r"^(\w+) = (\w+)\((\w+|'[^']*')", script, re.M)
    loaders = [(var, cls, arg) for var, cls, arg in chain if cls not in ("Comparator",)]
    classes = [cls for _, cls, _ in loaders]
    i = classes.index("PruneOnnx")
    assert classes[i - 1] == "InferShapes" and loaders[i - 1][2].endswith("mlp.onnx'")
    assert classes[i + 1 : i + 5] == ["ModifyOnnxOutputs", "ConvertToFp16", "SaveOnnx", "BytesFromOnnx"]


@pytest.mark.parametrize("method", DATA_METHODS)
def test_calibrated_methods_use_polygraphy_inputs(method: str, tmp_path: Path) -> None:
    from polygraphy.backend.onnx import OnnxFromPath
    from polygraphy.json import load_json

    src = MODELS / "mlp.onnx"
    polygraphy(
        "run", src, "--onnxrt", "--iterations", "3", "--input-shapes", "x:[4,64]", "x3:[2,3,16]",
        "--save-inputs", "in.json", cwd=tmp_path,
    )  # fmt: skip
    out = polygraphy(
        "run", src, "--onnxrt", "--onnx-sparse-prune", "--onnx-sparse-method", method, "--load-inputs", "in.json",
        "--save-onnx", "x.onnx", cwd=tmp_path,
    )  # fmt: skip
    assert "3 sample(s)" in out and "RANDOM" not in out
    got = weights(tmp_path / "x.onnx")
    feeds = [dict(f) for f in load_json(str(tmp_path / "in.json"))]
    want = {t.name: numpy_helper.to_array(t) for t in prune_onnx(OnnxFromPath(str(src)), method, data_loader=feeds).graph.initializer}  # fmt: skip
    magnitude = weights(onnx_sparse_prune(src, tmp_path / "mag.onnx"))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    if method != "wanda":  # wanda keeps the weights it keeps; the others update them
        assert not np.array_equal(got["fc0.weight"], magnitude["fc0.weight"])


def test_calibrated_without_data_says_random(tmp_path: Path) -> None:
    out = polygraphy(
        "run", MODELS / "conv_bn_folded.onnx", "--onnxrt", "--onnx-sparse-prune", "--onnx-sparse-method", "wanda",
        "--iterations", "2", cwd=tmp_path,
    )  # fmt: skip
    assert "[W] NO CALIBRATION DATA GIVEN" in out and "2 sample(s) from the Polygraphy data loader (RANDOM)" in out


def test_user_errors_fail_the_command(tmp_path: Path) -> None:
    model = MODELS / "conv_bn_folded.onnx"
    out = polygraphy("run", model, "--onnxrt", "--onnx-sparse-method", "wanda", cwd=tmp_path, ok=False)
    assert "without --onnx-sparse-prune" in out
    out = polygraphy(
        "run", model, "--onnxrt", "--onnx-sparse-prune", "--onnx-sparse-include", "(", cwd=tmp_path, ok=False
    )
    assert "not a valid regular expression" in out and "Traceback" not in out
    from polygraphy.json import save_json

    save_json([{"wrong": np.zeros((1, 16, 8, 8), np.float32)}], str(tmp_path / "in.json"))
    out = polygraphy(
        "run", model, "--onnxrt", "--onnx-sparse-prune", "--onnx-sparse-method", "sparsegpt",
        "--load-inputs", "in.json", cwd=tmp_path, ok=False,
    )  # fmt: skip
    assert "[!] onnx-sparse: calibration feed 0" in out and "Traceback" not in out


# --------------------------------------------------------------------------- in process


def _parsed(argv: list[str], tool=None):
    """A ``polygraphy run`` tool (argument groups, plugins included) that has parsed ``argv``."""
    from polygraphy.tools.run.run import Run

    if tool is None:
        tool = Run()
        tool.parser = tool.setup_parser()
    tool.parse(tool.parser.parse_args(argv))
    return tool


# Polygraphy's own entry-point scan uses the deprecated dict interface on Python < 3.12.
@pytest.mark.filterwarnings("ignore:SelectableGroups dict interface:DeprecationWarning")
def test_hook_is_per_run_and_undone() -> None:
    from polygraphy.tools.args import OnnxLoadArgs

    model = str(MODELS / "mlp.onnx")
    assert not _parsed([model, "--onnxrt"]).arg_groups[OnnxLoadArgs].must_use_onnx_loader()
    tool = _parsed([model, "--onnxrt", "--onnx-sparse-prune"])
    onnx_args = tool.arg_groups[OnnxLoadArgs]
    assert onnx_args.must_use_onnx_loader()
    assert not _parsed([model, "--onnxrt"]).arg_groups[OnnxLoadArgs].must_use_onnx_loader()  # nothing global
    # the same groups parsing again without the flag: the hook leaves this instance
    _parsed([model, "--onnxrt"], tool)
    assert not onnx_args.must_use_onnx_loader()
    assert "must_use_onnx_loader" not in vars(onnx_args) and "add_to_script_impl" not in vars(onnx_args)


def test_prune_onnx_loader_is_lazy_and_functional() -> None:
    from onnx_sparse.api import prune

    src = onnx.load(str(MODELS / "conv_bn_folded.onnx"))
    before = src.SerializeToString()
    calls = []

    def load():
        calls.append(1)
        return src

    loader = PruneOnnx(load, exclude=["conv2"])
    assert not calls  # nothing happens until it is called
    got = loader()
    assert calls == [1]
    assert src.SerializeToString() == before  # the input model is not changed
    assert got.SerializeToString() == prune(src, exclude=["conv2"]).SerializeToString()
    assert prune_onnx(src).SerializeToString() == prune(src).SerializeToString()  # the eager twin


def test_calibrated_result_is_computed_once() -> None:
    src = onnx.load(str(MODELS / "conv_bn_folded.onnx"))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32)} for _ in range(2)]
    calls = []

    def load():
        calls.append(1)
        return src

    loader = PruneOnnx(load, method="sparsegpt", data_loader=iter(feeds))  # a one-shot iterator, like a generator
    first, second = loader(), loader()
    assert calls == [1]
    assert first is not second and first.SerializeToString() == second.SerializeToString()


def test_logging_is_restored() -> None:
    log = logging.getLogger("onnx_sparse")
    saved = (list(log.handlers), log.level, log.propagate)
    PruneOnnx(onnx.load(str(MODELS / "mlp.onnx")))()
    assert (list(log.handlers), log.level, log.propagate) == saved


def test_unknown_method_is_refused() -> None:
    from polygraphy.exception import PolygraphyException

    with pytest.raises(PolygraphyException, match="unknown method"):
        PruneOnnx(None, method="random")


# --------------------------------------------------------------------------- dense vs sparse in one run


def _runner_outputs(path: Path) -> list[dict[str, list[np.ndarray]]]:
    """Per runner, in run order: {output name: [array per iteration]} of a ``--save-outputs`` file."""
    from polygraphy.comparator import RunResults

    return [
        {name: [np.asarray(it[name]) for it in iterations] for name in iterations[0].keys()}
        for _, iterations in RunResults.load(str(path)).items()
    ]


def test_prune_for_selected_runners_only(pruned: dict[str, Path], tmp_path: Path) -> None:
    """Two ONNX-Runtime runners in one real run; only the second (by position) gets the pruned model,
    which --onnx-sparse-save also keeps."""
    model = "conv_bn_folded.onnx"
    out = polygraphy(
        "run", MODELS / model, "--onnxrt", "--onnxrt", "--onnx-sparse-prune", "--onnx-sparse-runners", "2",
        "--onnx-sparse-save", "kept.onnx", "--save-outputs", "both.json", "--atol", "1e9", "--rtol", "1e9",
        cwd=tmp_path,
    )  # fmt: skip
    assert "pruned model for runner(s) 2:onnxrt; dense for 1:onnxrt" in out
    dense_run, sparse_run = _runner_outputs(tmp_path / "both.json")
    polygraphy("run", MODELS / model, "--onnxrt", "--save-outputs", "d.json", cwd=tmp_path)
    polygraphy("run", pruned[model], "--onnxrt", "--save-outputs", "s.json", cwd=tmp_path)
    assert_same(dense_run, outputs(tmp_path / "d.json"))
    assert_same(sparse_run, outputs(tmp_path / "s.json"))
    assert differs(dense_run, sparse_run)
    # the saved model is the pruned one, with its recipe in the metadata
    for name, w in weights(pruned[model]).items():
        np.testing.assert_array_equal(weights(tmp_path / "kept.onnx")[name], w, err_msg=name)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "kept.onnx")).metadata_props}
    assert '"method":"magnitude"' in props["onnx_sparse.recipe"]


def test_prune_for_trt_only_script(tmp_path: Path) -> None:
    """--onnxrt --trt --onnx-sparse-runners trt: ONNX-Runtime loads the dense model, TensorRT the pruned one
    (the generated script shows the two chains; TensorRT need not be installed to write it)."""
    script = polygraphy(
        "run", MODELS / "conv_bn_folded.onnx", "--onnxrt", "--trt", "--sparse-weights", "--onnx-sparse-prune",
        "--onnx-sparse-runners", "trt", "--gen-script", "-", cwd=tmp_path,
    )  # fmt: skip
    var = dict(re.findall(r"^(\w+) = (.+)$", script, re.M))

    def chain(name: str) -> list[str]:
        seen = []
        while name in var:
            seen.append(var[name].split("(")[0])
            m = re.match(r"\w+\((\w+)", var[name])
            if not m:
                break
            name = m.group(1)
        return seen

    session = next(k for k, v in var.items() if v.startswith("SessionFromOnnx("))
    network = next(k for k, v in var.items() if v.startswith("NetworkFromOnnxBytes("))
    assert chain(session) == ["SessionFromOnnx", "BytesFromOnnx", "OnnxFromPath"]
    assert chain(network) == ["NetworkFromOnnxBytes", "BytesFromOnnx", "PruneOnnx", "OnnxFromPath"]
    assert "without --sparse-weights" not in script
    # pruned only for onnxrt: no --sparse-weights hint about TensorRT, which runs dense
    quiet = polygraphy(
        "run", MODELS / "conv_bn_folded.onnx", "--onnxrt", "--trt", "--onnx-sparse-prune",
        "--onnx-sparse-runners", "onnxrt", "--gen-script", "-", cwd=tmp_path,
    )  # fmt: skip
    assert "without --sparse-weights" not in quiet


def test_runner_selection_errors(tmp_path: Path) -> None:
    model = MODELS / "conv_bn_folded.onnx"
    out = polygraphy("run", model, "--onnxrt", "--onnx-sparse-prune", "--onnx-sparse-runners", "trt",
                     cwd=tmp_path, ok=False)  # fmt: skip
    assert "--onnx-sparse-runners trt: not a runner of this run (runners: onnxrt" in out
    out = polygraphy("run", model, "--onnxrt", "--onnx-sparse-prune", "--onnx-sparse-runners", "3",
                     cwd=tmp_path, ok=False)  # fmt: skip
    assert "this run has 1 runner(s)" in out


def test_recipe_file_for_the_plugin(tmp_path: Path) -> None:
    from onnx_sparse.recipe import Recipe

    Recipe(method="magnitude", exclude=("conv2",)).save(tmp_path / "r.json")
    polygraphy(
        "run", MODELS / "conv_bn_folded.onnx", "--onnxrt", "--onnx-sparse-prune", "--onnx-sparse-recipe", "r.json",
        "--onnx-sparse-save", "kept.onnx", cwd=tmp_path,
    )  # fmt: skip
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "kept.onnx")).metadata_props}
    assert Recipe.from_json(props["onnx_sparse.recipe"]).exclude == ("conv2",)
    bad = tmp_path / "bad.json"
    bad.write_text('{"methd": "asym"}')
    out = polygraphy("run", MODELS / "conv_bn_folded.onnx", "--onnxrt", "--onnx-sparse-prune",
                     "--onnx-sparse-recipe", bad, cwd=tmp_path, ok=False)  # fmt: skip
    assert "unknown recipe key(s) ['methd']" in out and "Traceback" not in out
