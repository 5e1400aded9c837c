"""onnx_sparse.runtime, the one owner of onnxruntime sessions, and the feed rules every command shares.

Issue 21 items 1-2 and issue 19 items 3 and 7, each on the real CLI path:

* rank-0 (scalar) inputs survive every way feeds arrive (Polygraphy JSON, a data loader script,
  random data), in prune and in compare;
* one loader and one refusal for a pickled feed file, in every command that reads feeds;
* onnxruntime failing on the user's data is exit 2 with one ``[E]`` line and the
  ``--input-shapes`` / ``--load-inputs`` hint (compare used to end in exit 3);
* onnxruntime's own C++ logger prints nothing past our error, except under ``-v``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import error_lines
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.errors import OnnxSparseError

REPO = Path(__file__).resolve().parent.parent


def _scalar_model(path: Path) -> Path:
    """``y = MatMul(x * s + B, W)``: ``x [1, n]`` (n dynamic; onnxruntime's Add needs 8), ``s`` a rank-0 gain."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "s"], ["xs"]),
            helper.make_node("Add", ["xs", "B"], ["xb"], name="bias"),
            helper.make_node("MatMul", ["xb", "W"], ["y"], name="fc"),
        ],
        "scalar",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _feeds(n: int = 6, width: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [
        {"x": rng.standard_normal((1, width)).astype(np.float32), "s": np.array(0.5 + i, np.float32)} for i in range(n)
    ]


def _save(feeds: list[dict[str, np.ndarray]], path: Path) -> Path:
    from polygraphy.json import save_json

    save_json(feeds, str(path))
    return path


def _cli(*argv: object) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process: onnxruntime's C++ logger writes to file descriptor 2, past capsys."""
    return subprocess.run(
        [sys.executable, "-m", "onnx_sparse", *map(str, argv)], capture_output=True, text=True, cwd=REPO, check=False
    )


# --------------------------------------------------------------------------- rank-0 inputs (21.1)


def test_as_array_keeps_rank_zero() -> None:
    from onnx_sparse.calib.data import as_array

    scalar = as_array(np.array(16000, np.int64))
    assert scalar.shape == () and scalar.dtype == np.int64
    strided = as_array(np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2])
    assert strided.flags.c_contiguous and strided.shape == (3, 2)


@pytest.mark.parametrize("source", ["json", "script", "random"])
def test_scalar_input_calibrates(source: str, run_cli, tmp_path: Path) -> None:
    model = _scalar_model(tmp_path / "m.onnx")
    argv: list[object] = ["prune", model, "-o", tmp_path / "out.onnx", "--method", "sparsegpt"]
    if source == "json":
        argv += ["--load-inputs", _save(_feeds(), tmp_path / "calib.json")]
    elif source == "script":
        script = tmp_path / "data.py"
        script.write_text(
            "import numpy as np\n"
            "def load_data():\n"
            "    rng = np.random.default_rng(1)\n"
            "    return [{'x': rng.standard_normal((1, 8)).astype(np.float32), 's': np.array(2.0, np.float32)}\n"
            "            for _ in range(6)]\n"
        )
        argv += ["--data-loader-script", script]
    else:
        argv += ["--input-shapes", "x:[1,8]", "s:[]"]
    rc, out = run_cli(argv)
    assert rc == 0, out
    assert "rank 0" not in out


def test_scalar_input_compares(run_cli, tmp_path: Path) -> None:
    model = _scalar_model(tmp_path / "m.onnx")
    rc, out = run_cli(["compare", model, model, "--load-inputs", _save(_feeds(), tmp_path / "eval.json")])
    assert rc == 0, out
    rc, out = run_cli(["compare", model, model, "--input-shapes", "x:[1,8]", "s:[]"])
    assert rc == 0, out


def test_compare_checks_feeds_like_prune(run_cli, tmp_path: Path) -> None:
    model = _scalar_model(tmp_path / "m.onnx")
    bad = _save([{"x": np.zeros((1, 8), np.float32), "s": np.zeros((1,), np.float32)}], tmp_path / "bad.json")
    for argv in (["compare", model, model], ["prune", model, "-o", tmp_path / "o.onnx", "--method", "sparsegpt"]):
        rc, out = run_cli([*argv, "--load-inputs", bad])
        assert rc == 2, out
        (line,) = error_lines(out)
        assert "input 's' has shape (1,), the model expects rank 0" in line


# --------------------------------------------------------------------------- one refusal (19.3)


def _pickled_json(path: Path) -> Path:
    """Polygraphy JSON whose one array is an object array (np.save with pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    entry = {"array": base64.b64encode(buf.getvalue()).decode(), "polygraphy_class": "ndarray"}
    path.write_text(json.dumps([{"x": entry, "s": entry}]))
    return path


@pytest.mark.parametrize("command", ["prune", "compare", "quantize"])
def test_pickled_feed_file_is_one_refusal(command: str, run_cli, tmp_path: Path) -> None:
    model = _scalar_model(tmp_path / "m.onnx")
    pickled = _pickled_json(tmp_path / "feeds.json")
    argv: list[object] = {
        "prune": ["prune", model, "-o", tmp_path / "o.onnx", "--method", "sparsegpt"],
        "compare": ["compare", model, model],
        "quantize": ["quantize", model, "-o", tmp_path / "q.onnx"],
    }[command]
    rc, out = run_cli([*argv, "--load-inputs", pickled])
    assert rc == 2, out
    (line,) = error_lines(out)
    assert "pickled" in line and "Polygraphy JSON" in line
    assert "internal error" not in out


def test_pickled_outputs_file_is_refused_too(run_cli, tmp_path: Path) -> None:
    """compare --load-outputs: a saved-outputs file with a pickled array is bad input, like a feed file."""
    model = _scalar_model(tmp_path / "m.onnx")
    saved = tmp_path / "outs.json"
    rc, out = run_cli(["compare", model, model, "--load-inputs", _save(_feeds(2), tmp_path / "in.json"),
                       "--save-outputs", saved])  # fmt: skip
    assert rc == 0, out
    doc = json.loads(saved.read_text())
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)

    def poison(o: object) -> bool:
        if isinstance(o, dict):
            if o.get("polygraphy_class") == "ndarray":
                o["array"] = base64.b64encode(buf.getvalue()).decode()
                return True
            return any(poison(v) for v in o.values())
        return isinstance(o, list) and any(poison(v) for v in o)

    assert poison(doc)
    saved.write_text(json.dumps(doc))
    rc, out = run_cli(["compare", "--load-outputs", saved])
    assert rc == 2, out
    (line,) = error_lines(out)
    assert "pickled" in line and "internal error" not in out


# --------------------------------------------------------------------------- onnxruntime on user data (21.2, 19.7)


def test_compare_onnxruntime_failure_is_a_user_error(run_cli, tmp_path: Path) -> None:
    model = _scalar_model(tmp_path / "m.onnx")
    rc, out = run_cli(["compare", model, model, "--input-shapes", "x:[1,5]", "s:[]"])  # Add needs 8
    assert rc == 2, out
    (line,) = error_lines(out)
    assert line.startswith("[E] onnxruntime failed on the inputs: Add node 'bias'")
    assert "--input-shapes" in line and "--load-inputs" in line


def test_onnxruntime_logger_is_silent_except_verbose(tmp_path: Path) -> None:
    model = _scalar_model(tmp_path / "m.onnx")
    bad = _save([{"x": np.zeros((1, 5), np.float32), "s": np.array(1.0, np.float32)}], tmp_path / "bad.json")
    quiet = _cli("prune", model, "-o", tmp_path / "o.onnx", "--method", "sparsegpt", "--load-inputs", bad)
    assert quiet.returncode == 2, quiet.stdout + quiet.stderr
    assert "[E:onnxruntime" not in quiet.stderr + quiet.stdout  # no raw [E:onnxruntime:, ...] line
    assert len(error_lines(quiet.stdout)) == 1
    compare = _cli("compare", model, model, "--load-inputs", bad)
    assert compare.returncode == 2 and "[E:onnxruntime" not in compare.stderr + compare.stdout
    verbose = _cli("prune", model, "-o", tmp_path / "o.onnx", "--method", "sparsegpt", "--load-inputs", bad, "-v")
    assert verbose.returncode == 2 and "[E:onnxruntime" in verbose.stderr  # -v shows onnxruntime's own log


def test_session_error_and_severity(caplog, tmp_path: Path) -> None:
    from onnx_sparse import runtime

    with pytest.raises(OnnxSparseError, match="onnxruntime cannot open the probe"):
        runtime.session(b"not a model", what="the probe")
    assert runtime.severity() == 4
    with caplog.at_level(logging.DEBUG, logger="onnx_sparse"):
        assert runtime.severity() == 3
    sess = runtime.session(_scalar_model(tmp_path / "m.onnx"))
    with pytest.raises(OnnxSparseError, match=r"onnxruntime failed on sample 3: .*\(hint: .*--input-shapes"):
        runtime.run(sess, None, {"x": np.zeros((1, 5), np.float32), "s": np.array(1.0, np.float32)}, where="sample 3")


def test_message_keeps_the_innermost_node() -> None:
    from onnx_sparse import runtime

    class InvalidArgument(Exception):
        pass

    InvalidArgument.__module__ = "onnxruntime.capi.onnxruntime_pybind11_state"
    exc = InvalidArgument(
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running If node. "
        "Name:'If_0' Status Message: Non-zero status code returned while running Pad node. Name:'stft/Pad' "
        "Status Message: Pad reflect requires axis length >= 2 after slicing."
    )
    assert runtime.is_ort_error(exc) and not runtime.is_ort_error(ValueError("x"))
    assert runtime.message(exc) == "Pad node 'stft/Pad': Pad reflect requires axis length >= 2 after slicing."


def test_no_other_module_opens_a_session() -> None:
    """One owner: onnx_sparse.runtime is the only module that calls InferenceSession (or Polygraphy's SessionFromOnnx)."""
    import ast

    owners = set()
    for path in (REPO / "onnx_sparse").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("InferenceSession", "SessionFromOnnx"):
                    owners.add(str(path.relative_to(REPO)))
    assert owners == {"onnx_sparse/runtime.py"}, owners


def test_with_outputs_exposes_inner_tensors_without_changing_the_model() -> None:
    """runtime.with_outputs: the model's bytes followed by a model holding only the new outputs parse as
    one model whose outputs are the old ones then the new (the INT8 probes' sessions rely on it)."""
    from onnx_sparse import runtime

    w = numpy_helper.from_array(np.array([[2.0, -1.0], [0.5, 3.0]], dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    before = model.SerializeToString()
    probe = runtime.with_outputs(model, ["h", "y"])
    assert model.SerializeToString() == before  # the model itself is not touched
    assert [o.name for o in onnx.load_from_string(probe).graph.output] == ["y", "h"]
    assert runtime.with_outputs(model, ["y"]) == before  # nothing new: the same bytes
    x = np.array([[1.0, -2.0]], dtype=np.float32)
    y, h = runtime.session(probe).run(["y", "h"], {"x": x})
    np.testing.assert_array_equal(h, x @ numpy_helper.to_array(w))
    np.testing.assert_array_equal(y, np.maximum(h, 0))
    assert runtime.with_outputs(model, ["h"], serialized=before) == probe  # y is there already: only h


def test_model_bytes_gives_large_initializers_as_arrays_the_session_reads_in_place() -> None:
    """runtime.model_bytes: initializers from min_bytes up leave the serialized model (external stubs) and
    reach the session as arrays over one copy of their data; the model is not touched, the session
    computes the same values as one on the whole model, with extra outputs appended as with bytes,
    and it keeps the arrays alive (onnxruntime does not copy them)."""
    import gc

    from onnx_sparse import runtime

    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "big")  # 8 KB
    small = numpy_helper.from_array(rng.standard_normal((32,)).astype(np.float32), "small")
    ints = numpy_helper.from_array(np.arange(64 * 32, dtype=np.int64).reshape(64, 32) % 7, "ints")  # 16 KB
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "big"], ["h"]),
            helper.make_node("Add", ["h", "small"], ["a"]),
            helper.make_node("Cast", ["ints"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "f"], ["g"]),
            helper.make_node("Add", ["a", "g"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 32])],
        [big, small, ints],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.metadata_props.add(key="k", value="v")
    before = model.SerializeToString()
    lean = runtime.model_bytes(model, min_bytes=4096)
    assert model.SerializeToString() == before  # the model itself is not touched
    assert sorted(lean.initializers) == ["big", "ints"] and len(lean.data) < 1000 < len(before)
    np.testing.assert_array_equal(lean.initializers["big"], numpy_helper.to_array(big))
    np.testing.assert_array_equal(lean.initializers["ints"], numpy_helper.to_array(ints))
    parsed = onnx.load_from_string(lean.data)
    assert [t.name for t in parsed.graph.initializer] == ["big", "small", "ints"]  # the order kept
    assert (
        parsed.graph.initializer[0].data_location == TensorProto.EXTERNAL and not parsed.graph.initializer[0].raw_data
    )
    assert parsed.graph.node == model.graph.node and parsed.metadata_props == model.metadata_props
    assert parsed.opset_import == model.opset_import and parsed.ir_version == model.ir_version
    assert runtime.model_bytes(model).initializers == {}  # nothing from 1 MB up: the plain bytes
    assert runtime.model_bytes(model).data == before

    x = rng.standard_normal((3, 64)).astype(np.float32)
    probe = runtime.with_outputs(model, ["h"], lean)
    assert isinstance(probe, runtime.ModelBytes) and probe.initializers is lean.initializers
    sess = runtime.session(probe)
    del probe, lean
    gc.collect()
    ref = runtime.session(runtime.with_outputs(model, ["h"]))
    for _ in range(2):
        got, want = sess.run(["y", "h"], {"x": x}), ref.run(["y", "h"], {"x": x})
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
