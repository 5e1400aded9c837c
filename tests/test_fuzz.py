"""Fuzzing the CLI with hostile models (issue 10): the contract holds for every one.

Hypothesis (fixed: ``derandomize=True``, no example database) mutates real case models from
``models/`` and a synthetic external-data model at the protobuf level: flipped and truncated
bytes of the serialized model (stored with external data, so the bytes are structure, not
weights), hostile external-data entries, absurd dims and data types, raw data cut short,
broken wiring, names with control characters, subgraphs nested up to 2,000 deep. Each mutant
goes through ``inspect``, ``check`` or ``prune`` in-process (``compare`` is left out: it hands
the input to onnxruntime, whose crashes on malformed graphs are not ours to fix), and each run must:

* exit 0, 1 or 2, never 3 (no internal error), with exactly one ``[E]`` line when it is 2;
* write nothing outside its output folder and leave no temporary there;
* leave every input file byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import case_path, error_lines
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.atomic import PREFIX
from onnx_sparse.io import iter_tensors

# A longer, random (not derandomized) hunt: ONNX_SPARSE_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py
_HUNT = int(os.environ.get("ONNX_SPARSE_FUZZ_EXAMPLES", "0"))
_SETTINGS = settings(
    derandomize=not _HUNT,  # the same cases on every run: CI stays deterministic
    max_examples=_HUNT or 300,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
_CASES = ["mlp.onnx", "conv_bn_folded.onnx", "if_subgraph.onnx", "qdq_conv.onnx", "custom_domain.onnx",
          "constant_nodes.onnx", "transpose_120.onnx"]  # fmt: skip
_COMMANDS = ["inspect", "check", "prune"]
_HOSTILE_LOCATIONS = ["../secret.bin", "/etc/passwd", "link.bin", "", ".", "sub", "w.bin\x00x", "w.bin/..",
                      "./w.bin", "sub/../w.bin", "W.BIN", "w.bin"]  # fmt: skip
_NUMBERS = ["0", "-1", "1e3", "0x10", "abc", "", " 4", "4 ", "18446744073709551616", "9" * 40, "4096", "1024"]
_DIMS = [-1, 0, 1, 3, 2**31, 2**32 + 4, 2**62, 2**63 - 1, -(2**63)]
_NAMES = ["\x1b[2J", "\x00", "a\u202eb", "\u2066x\u2069", "\n[I] PASSED", "x" * 300, "", "w.bin"]


def _secret_layout(root: Path) -> tuple[Path, Path]:
    """``root/in`` (model folder) and ``root/out``; a secret file beside ``in`` and a symlink to it."""
    src, out = root / "in", root / "out"
    src.mkdir()
    out.mkdir()
    (root / "secret.bin").write_bytes(b"TOPSECRET" * 1000)
    (src / "link.bin").symlink_to(root / "secret.bin")
    (src / "sub").mkdir()
    return src, out


def _snapshot(root: Path, out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "-"
        for p in sorted(root.rglob("*"))
        if out not in p.parents and p != out and not p.is_symlink()
    }


def _check_contract(run_cli: Callable, command: str, model: Path, root: Path, out: Path) -> int:
    before = _snapshot(root, out)
    argv = [command, model] + (["-o", out / "o.onnx", "--report", out / "r.json"] if command == "prune" else [])
    rc, text = run_cli(argv)
    assert rc in (0, 1, 2), text
    assert "internal error" not in text and "Traceback" not in text, text
    if rc == 2:
        assert len(error_lines(text)) == 1, text
    assert _snapshot(root, out) == before  # inputs unchanged, nothing written outside the output folder
    assert not [p for p in out.iterdir() if p.name.startswith(PREFIX)]
    event(f"{command} exit {rc}")  # --hypothesis-show-statistics shows the mix
    if rc == 0 and command == "prune":
        assert b"TOPSECRET" not in b"".join(p.read_bytes() for p in out.iterdir() if p.is_file())
    return rc


def _external_skeleton(name: str, folder: Path) -> bytes:
    """Serialized case model with every tensor in ``w.bin`` (so its bytes are mostly structure)."""
    model = onnx.load(case_path(name))
    onnx.save(model, folder / "seed.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    return (folder / "seed.onnx").read_bytes()


@_SETTINGS
@given(
    name=st.sampled_from(_CASES),
    flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
    command=st.sampled_from(_COMMANDS),
)
@pytest.mark.filterwarnings("ignore")
def test_flipped_and_truncated_bytes(run_cli, name: str, flips: list, cut: float | None, command: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src, out = _secret_layout(root)
        data = bytearray(_external_skeleton(name, src))
        for pos, xor in flips:
            data[pos % len(data)] ^= xor
        if cut is not None:
            data = data[: int(len(data) * cut)]
        model = src / "m.onnx"
        model.write_bytes(bytes(data))
        _check_contract(run_cli, command, model, root, out)


def _tensors(model: onnx.ModelProto) -> list[TensorProto]:
    return list(iter_tensors(model))


def _edit_dims(model: onnx.ModelProto, draw) -> None:
    t = draw(st.sampled_from(_tensors(model)))
    if t.dims:
        t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(st.sampled_from(_DIMS))
    else:
        t.dims.append(draw(st.sampled_from(_DIMS)))


def _edit_external(model: onnx.ModelProto, draw) -> None:
    t = draw(st.sampled_from(_tensors(model)))
    t.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data"):
        t.ClearField(f)
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("external_data")
    for key in draw(st.lists(st.sampled_from(["location", "offset", "length", "checksum", "location"]), max_size=4)):
        e = t.external_data.add()
        e.key = key
        e.value = draw(st.sampled_from(_HOSTILE_LOCATIONS if key == "location" else _NUMBERS))


def _edit_raw_data(model: onnx.ModelProto, draw) -> None:
    t = draw(st.sampled_from(_tensors(model)))
    if t.raw_data:
        t.raw_data = t.raw_data[: draw(st.integers(0, max(len(t.raw_data) - 1, 0)))]
    else:
        t.raw_data = b"\x01" * draw(st.integers(0, 64))


def _edit_dtype(model: onnx.ModelProto, draw) -> None:
    draw(st.sampled_from(_tensors(model))).data_type = draw(st.integers(0, 40))


def _edit_wiring(model: onnx.ModelProto, draw) -> None:
    node = draw(st.sampled_from(list(model.graph.node)))
    what = draw(st.sampled_from(["input", "output", "op", "domain", "opset", "ir"]))
    if what == "input" and node.input:
        node.input[draw(st.integers(0, len(node.input) - 1))] = draw(
            st.sampled_from(_NAMES + [model.graph.output[0].name])
        )
    elif what == "output" and node.output:
        node.output[0] = draw(st.sampled_from(_NAMES + [model.graph.input[0].name]))
    elif what == "op":
        node.op_type = draw(st.sampled_from(["Conv", "MatMul", "Gemm", "If", "Loop", "Nope", ""]))
    elif what == "domain":
        node.domain = draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "evil", "\x1b"]))
    elif what == "opset":
        model.opset_import[0].version = draw(st.sampled_from([0, 1, 7, 99, 2**62]))
    else:
        model.ir_version = draw(st.sampled_from([0, 1, 3, 99, 2**62]))


def _edit_names(model: onnx.ModelProto, draw) -> None:
    node = draw(st.sampled_from(list(model.graph.node)))
    node.name = draw(st.sampled_from(_NAMES))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _nested(model: onnx.ModelProto, depth: int) -> bytes:
    """``model`` with its graph wrapped in ``depth`` nested If nodes, written at the wire level
    (protobuf's Python API itself refuses to build messages nested deeper than 100)."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.ClearField("input")
    inner = graph.SerializeToString()
    outputs = b"".join(_field(12, o.SerializeToString()) for o in model.graph.output)
    cond = _field(5, helper.make_tensor("cond", TensorProto.BOOL, [], [True]).SerializeToString())
    names = b"".join(_field(2, o.name.encode()) for o in model.graph.output)
    graph_type = _varint(20 << 3) + _varint(onnx.AttributeProto.GRAPH)
    for i in range(depth):  # one If per level, the model once at the bottom: linear size
        then = _field(1, b"then_branch") + _field(6, inner) + graph_type
        other = _field(1, b"else_branch") + _field(6, _field(2, b"e") + outputs) + graph_type
        node = _field(1, b"cond") + names + _field(3, f"if{i}".encode()) + _field(4, b"If") + _field(5, then)
        inner = _field(1, node + _field(5, other)) + _field(2, f"g{i}".encode()) + cond + outputs
    inputs = b"".join(_field(11, x.SerializeToString()) for x in model.graph.input)
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    return rest.SerializeToString() + _field(7, inner + inputs)


_EDITS = [_edit_dims, _edit_external, _edit_raw_data, _edit_dtype, _edit_wiring, _edit_names]


def _synthetic() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    w = numpy_helper.from_array(np.arange(128, dtype=np.float32).reshape(16, 8) - 64, "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@_SETTINGS
@given(
    base=st.sampled_from(["synthetic", *_CASES]),
    external=st.booleans(),
    command=st.sampled_from(_COMMANDS),
    data=st.data(),
)
@pytest.mark.filterwarnings("ignore")
def test_hostile_edits(run_cli, base: str, external: bool, command: str, data) -> None:
    model = _synthetic() if base == "synthetic" else onnx.load(case_path(base))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src, out = _secret_layout(root)
        if external:  # move the weights into w.bin first, then edit the skeleton
            onnx.save(model, src / "seed.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
            model = onnx.load(src / "seed.onnx", load_external_data=False)
        edits = data.draw(st.lists(st.sampled_from(_EDITS), min_size=0, max_size=3))
        for edit in edits:
            edit(model, data.draw)
        depth = data.draw(st.sampled_from([0, 0, 0, 1, 3, 60, 150, 2000]))
        path = src / "m.onnx"
        path.write_bytes(_nested(model, depth) if depth else model.SerializeToString())
        _check_contract(run_cli, command, path, root, out)
