"""Hostile inputs and outputs (issue 10): each finding as a test that failed before the fix.

1 external data outside the model's folder, 2 a failed in-place write, 3 outputs that alias
inputs, 4 temporaries left by killed runs, 5 bad input reported as an internal error, 6 invalid
input models blamed on us, 7 raw control characters in names, 8 work thrown away late.
"""

from __future__ import annotations

import base64
import io as pyio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO, case_path, error_lines, sha256
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse import api, atomic
from onnx_sparse import io as osio
from onnx_sparse.errors import OnnxSparseError

SECRET = b"root:x:0:0:secret-outside-the-model-folder\n" * 64  # 2816 bytes


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _add_model(n: int = 256, name: str = "B", node: str = "add") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])
    b = numpy_helper.from_array(np.arange(n, dtype=np.float32), name)
    graph = helper.make_graph([helper.make_node("Add", ["x", name], ["y"], name=node)], "g", [x], [y], [b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external(model: onnx.ModelProto, tensor: str, **entries: str) -> onnx.ModelProto:
    """Make initializer ``tensor`` external with exactly these entries (raw, unchecked)."""
    t = next(t for t in model.graph.initializer if t.name == tensor)
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in entries.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    return model


def _hostile(tmp_path: Path, location: str, **entries: str) -> Path:
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    path = folder / "m.onnx"
    entries = {"location": location, "offset": "0", "length": "1024"} | entries
    onnx.save(_external(_add_model(), "B", **entries), path)
    return path


def _mlp_mlp_conv_with_data(tmp_path: Path, location: str = "w.bin") -> Path:
    src = tmp_path / "m.onnx"
    onnx.save(onnx.load(case_path("conv_bn_folded.onnx")), src, save_as_external_data=True,
              location=location, size_threshold=0)  # fmt: skip
    return src


# --------------------------------------------------------------------------- 1: data outside the folder


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "folder", "fifo"])
def test_external_data_outside_the_models_folder_is_refused_everywhere(run_cli, tmp_path: Path, kind: str) -> None:
    secret = tmp_path / "secret.txt"
    location = {
        "traversal": "../" * 12 + str(secret).lstrip("/"),
        "absolute": str(secret),
        "symlink": "link.bin",
        "folder": "sub",
        "fifo": "pipe",
    }[kind]
    path = _hostile(tmp_path, location)
    if kind == "symlink":
        (path.parent / "link.bin").symlink_to(secret)
    elif kind == "folder":
        (path.parent / "sub").mkdir()
    elif kind == "fifo":
        os.mkfifo(path.parent / "pipe")
    before = _files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for argv in (["inspect", path], ["check", path], ["prune", path, "-o", out / "o.onnx"], ["compare", path, path]):
        rc, text = run_cli(argv)
        assert rc == 2, (argv, text)
        assert len(error_lines(text)) == 1, text
        assert "'B'" in error_lines(text)[0] and location in error_lines(text)[0], text
    assert list(out.iterdir()) == []
    assert _files(tmp_path) == before
    for call in (lambda: osio.load_model(path), lambda: api.prune(path), lambda: api.prune_file(path, out / "a.onnx")):
        with pytest.raises(OnnxSparseError, match="'B'"):
            call()
    assert list(out.iterdir()) == []


def test_external_data_inside_the_folder_through_a_symlink_is_one_rule_for_every_command(
    run_cli, tmp_path: Path
) -> None:
    """A data file that is a symlink to a regular file inside the model's folder is allowed (the
    README's rule: inside the folder after following symlinks): inspect, check and prune agree
    (issue 19.6: prune used to call it invalid through onnx.checker's own symlink ban)."""
    src = _mlp_mlp_conv_with_data(tmp_path, "real.bin")
    (tmp_path / "real.bin").rename(tmp_path / "store.bin")
    (tmp_path / "real.bin").symlink_to("store.bin")
    rc, text = run_cli(["inspect", src])
    assert rc == 0 and not error_lines(text) and "the model is valid" in text, text
    assert run_cli(["check", src])[0] == 1  # a dense model: not 2:4, no error
    rc, text = run_cli(["prune", src, "-o", tmp_path / "o.onnx"])
    assert rc == 0 and not error_lines(text), text
    assert run_cli(["check", tmp_path / "o.onnx"])[0] == 0
    # the same link pointing outside the folder is refused by both, with the same line
    (tmp_path / "sub").mkdir()
    inner = _mlp_mlp_conv_with_data(tmp_path / "sub", "real.bin")
    (tmp_path / "sub" / "real.bin").unlink()
    (tmp_path / "sub" / "real.bin").symlink_to(tmp_path / "store.bin")
    lines = []
    for argv in (["inspect", inner], ["prune", inner, "-o", tmp_path / "o2.onnx"]):
        rc, text = run_cli(argv)
        assert rc == 2, text
        lines += error_lines(text)
    assert len(lines) == 2 and lines[0] == lines[1] and "outside the model's folder" in lines[0]


# --------------------------------------------------------------------------- 2: crash-safe output


def test_a_failed_in_place_write_leaves_the_input_as_it_was(run_cli, tmp_path: Path, monkeypatch) -> None:
    src = _mlp_mlp_conv_with_data(tmp_path, "m.onnx.data")
    before = _files(tmp_path)
    real_replace = os.replace

    def replace(a, b):
        if Path(b).name == "m.onnx":  # the last rename fails (e.g. chattr +i on the model)
            raise PermissionError(1, "Operation not permitted")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    rc, text = run_cli(["prune", src, "--in-place"])
    assert rc == 2 and len(error_lines(text)) == 1 and "Operation not permitted" in text, text
    assert _files(tmp_path) == before  # same files, same bytes: the old model still reads its own data
    monkeypatch.setattr(os, "replace", real_replace)
    assert run_cli(["check", src])[0] == 1  # still the dense model


def test_an_output_that_is_a_folder_leaves_nothing(run_cli, tmp_path: Path) -> None:
    src = _mlp_mlp_conv_with_data(tmp_path)
    (tmp_path / "o.onnx").mkdir()
    before = _files(tmp_path)
    rc, text = run_cli(["prune", src, "-o", tmp_path / "o.onnx"])
    assert rc == 2 and "is a folder" in text
    assert _files(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx", "w.bin"]


def test_the_model_is_renamed_last_and_never_reads_a_foreign_data_file(tmp_path: Path, monkeypatch) -> None:
    """At every rename, the model at the output path reads data files that hold its own bytes."""
    src = _mlp_mlp_conv_with_data(tmp_path)
    out = tmp_path / "o.onnx"
    osio.save_model(osio.load_model(src), out)

    def values() -> list[bytes]:
        model = onnx.load(out, load_external_data=False)
        return [np.asarray(osio.read_tensor(t, tmp_path)).tobytes() for t in model.graph.initializer]

    old = values()
    mf = osio.load_model(out)
    t = mf.model.graph.initializer[0]
    mf.write(t, np.zeros_like(mf.read(t)))
    real_replace = os.replace
    seen = []

    def replace(a, b):
        # before each rename, the model now at `out` reads exactly the values it was saved with
        seen.append(Path(b).name)
        assert values() == old
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    osio.save_model(mf, out)
    assert seen[-1] == "o.onnx" and seen[-2].endswith(".data")
    new = values()
    assert new != old and new[1:] == old[1:] and not any(np.frombuffer(new[0], np.float32))


# --------------------------------------------------------------------------- 3: outputs never replace inputs


def test_outputs_that_alias_inputs_are_refused_before_any_work(run_cli, tmp_path: Path) -> None:
    src = _mlp_mlp_conv_with_data(tmp_path)
    os.link(src, tmp_path / "hard.onnx")
    (tmp_path / "soft.json").symlink_to("m.onnx")
    (tmp_path / "calib.json").write_text("[]")
    before = _files(tmp_path)
    o = tmp_path / "o.onnx"
    cases = [
        ["prune", src, "-o", tmp_path / "w.bin"],  # the input's data file
        ["prune", src, "-o", tmp_path / "hard.onnx"],  # a hard link of the input
        ["inspect", src, "--json", src],
        ["inspect", src, "--json", tmp_path / "hard.onnx"],
        ["inspect", src, "--json", tmp_path / "soft.json"],
        ["inspect", src, "--json", tmp_path / "w.bin"],
        ["prune", src, "-o", o, "--report", src],
        ["prune", src, "-o", o, "--report", o],  # the verified output itself
        ["prune", src, "-o", o, "--report", tmp_path / "o.onnx.0123456789abcdef.data"],
        [
            "prune",
            src,
            "-o",
            o,
            "--method",
            "wanda",
            "--load-inputs",
            tmp_path / "calib.json",
            "--report",
            tmp_path / "calib.json",
        ],  # fmt: skip
        ["compare", src, src, "--save-outputs", src],
        ["compare", src, src, "--report", tmp_path / "w.bin"],
        ["compare", src, src, "--save-inputs", tmp_path / "r.json", "--report", tmp_path / "r.json"],
    ]
    for argv in cases:
        rc, text = run_cli(argv)
        assert rc == 2, (argv, text)
        assert len(error_lines(text)) == 1 and ("refusing to overwrite" in text or "same file" in text
                                                or "data file" in text), text  # fmt: skip
        assert _files(tmp_path) == before, argv
        assert not o.exists()


def test_in_place_is_the_only_way_to_replace_the_input(run_cli, tmp_path: Path) -> None:
    src = _mlp_mlp_conv_with_data(tmp_path)
    rc, text = run_cli(["prune", src, "-o", src])
    assert rc == 2 and "--in-place" in text
    rc, text = run_cli(["prune", src, "--in-place"])
    assert rc == 0, text
    assert run_cli(["check", src])[0] == 0
    assert (tmp_path / "w.bin").is_file()  # not ours by name: left alone


# --------------------------------------------------------------------------- 4: temporaries


_KILL_DURING_VERIFY = """
import os, signal, sys
from onnx_sparse import io
def verify(path, reference=None):
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
io.verify_model = verify
from onnx_sparse.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _killed_run(sig: str, src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILL_DURING_VERIFY, sig, "prune", str(src), "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip


def test_sigterm_during_a_write_removes_the_temporary_folder(tmp_path: Path) -> None:
    src = _mlp_mlp_conv_with_data(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _killed_run("SIGTERM", src, out_dir / "o.onnx")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "terminated" in proc.stdout
    assert list(out_dir.iterdir()) == []


def test_the_next_run_removes_what_a_killed_run_left(run_cli, tmp_path: Path) -> None:
    src = _mlp_mlp_conv_with_data(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _killed_run("SIGKILL", src, out_dir / "o.onnx")
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in out_dir.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(atomic.PREFIX) and left[0].is_dir()
    # a temporary of a live process (ours) and a foreign folder are left alone
    mine = atomic.temp_dir(out_dir)
    (out_dir / ".onnx-sparse-notours").mkdir()
    rc, text = run_cli(["prune", src, "-o", out_dir / "o.onnx"])
    assert rc == 0, text
    assert "killed onnx-sparse run" in text
    assert not left[0].exists() and mine.is_dir() and (out_dir / ".onnx-sparse-notours").is_dir()


_KILL_AT_MODEL_RENAME = """
import os, signal, sys
real = os.replace
def replace(a, b):
    if os.path.basename(b) == os.path.basename(sys.argv[-1]):  # the model is renamed over the output last
        os.kill(os.getpid(), signal.SIGKILL)
    return real(a, b)
os.replace = replace
from onnx_sparse.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_before_model_rename(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILL_AT_MODEL_RENAME, "prune", str(src), "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip


def _data_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(".data")}


def test_an_orphan_data_file_from_a_killed_run_is_removed_by_the_next_write(run_cli, tmp_path: Path) -> None:
    """Issue 19.6: a kill between placing the data file and renaming the model leaves
    ``<out>.<hash>.data`` that no model reads; the next write into the folder removes it, and
    leaves alone every data file a model in the folder still reads."""
    src = _mlp_mlp_conv_with_data(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.onnx"
    # an older output (dense copy, magnitude-pruned later) and a copy of it that reads its data file
    assert run_cli(["prune", src, "-o", out, "--include", "nothing-matches"])[0] == 0
    old_data = _data_files(out_dir)
    (out_dir / "backup.onnx").write_bytes(out.read_bytes())
    proc = _killed_before_model_rename(src, out)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    orphans = _data_files(out_dir) - old_data
    assert len(orphans) == 1, _data_files(out_dir)  # placed, but o.onnx still reads the old one
    assert run_cli(["check", out])[0] == 1  # the old model, whole
    # the next write into the folder (another output) removes the orphan and the dead run's temporary
    rc, text = run_cli(["prune", src, "-o", out_dir / "p.onnx"])
    assert rc == 0, text
    assert not (_data_files(out_dir) & orphans), _data_files(out_dir)
    assert old_data <= _data_files(out_dir)  # o.onnx and backup.onnx still read it
    assert not [p for p in out_dir.iterdir() if p.name.startswith(atomic.PREFIX)]
    for model in ("o.onnx", "backup.onnx", "p.onnx"):
        assert run_cli(["check", out_dir / model])[0] in (0, 1)


def test_an_orphan_is_kept_while_another_run_may_be_about_to_use_it(run_cli, tmp_path: Path) -> None:
    """A data file no model reads yet may belong to a live run between its two renames: while
    the folder holds another run's temporary, nothing is removed."""
    src = _mlp_mlp_conv_with_data(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    placed = out_dir / "q.onnx.0123456789abcdef.data"
    placed.write_bytes(b"\0" * 16)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = atomic._host_tag()
        (out_dir / f"{atomic.PREFIX}{sleeper.pid}-{host}-abcd").mkdir()  # a live run's temporary
        assert run_cli(["prune", src, "-o", out_dir / "o.onnx"])[0] == 0
        assert placed.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_cli(["prune", src, "-o", out_dir / "o.onnx"])[0] == 0  # that run is gone now
    assert not placed.exists()


# --------------------------------------------------------------------------- 5: clear errors, exit 2


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ({"offset": "abc"}, "offset 'abc'"),
        ({"offset": "-8"}, "offset '-8'"),
        ({"offset": "1e3"}, "offset '1e3'"),
        ({"offset": "99999999999999999999999"}, "offset"),
        ({"length": "-1"}, "length '-1'"),
        ({"length": "4"}, "length 4"),
        ({"offset": "2048"}, "too short"),
    ],
)
def test_bad_external_offsets_and_lengths(run_cli, tmp_path: Path, entries: dict, words: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.bin").write_bytes(np.arange(256, dtype=np.float32).tobytes() + b"\0" * 1024)
    path = folder / "m.onnx"
    onnx.save(_external(_add_model(), "B", **({"location": "w.bin", "length": "1024"} | entries)), path)
    for argv in (["inspect", path], ["prune", path, "-o", tmp_path / "o.onnx"]):
        rc, text = run_cli(argv)
        assert rc == 2 and len(error_lines(text)) == 1 and words in text and "'B'" in text, text
    assert not (tmp_path / "o.onnx").exists()


def _with_dims(dims: list[int], raw: bytes | None, location: str | None = None) -> onnx.ModelProto:
    model = _add_model()
    t = model.graph.initializer[0]
    t.ClearField("dims")
    t.dims.extend(dims)
    if location is not None:
        _external(model, "B", location=location)
    elif raw is not None:
        t.raw_data = raw
    return model


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (lambda: _with_dims([-4, -64], b"\0" * 1024), "negative dimension"),
        (lambda: _with_dims([-1], None, "w.bin"), "negative dimension"),
        (lambda: _with_dims([2**62, 2**62, 16], b"\0" * 1024), "raw_data holds 1024 bytes"),
        (lambda: _with_dims([2**31, 2**31, 2**2], None, "w.bin"), "too short"),  # 2**64 bytes: wraps in int64
        (lambda: _with_dims([256], b"\0" * 1000), "raw_data holds 1000 bytes"),
    ],
)
def test_absurd_dims_and_short_raw_data(run_cli, tmp_path: Path, model, words: str) -> None:
    (tmp_path / "w.bin").write_bytes(b"\0" * 1024)
    path = tmp_path / "m.onnx"
    onnx.save(model(), path)
    for argv in (["inspect", path], ["check", path], ["prune", path, "-o", tmp_path / "o.onnx"]):
        rc, text = run_cli(argv)
        assert rc == 2 and len(error_lines(text)) == 1 and words in text, text
    assert not (tmp_path / "o.onnx").exists()


def test_an_unwritable_output_folder_is_a_clear_error(run_cli, tmp_path: Path, monkeypatch) -> None:
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)  # what a read-only folder does (root bypasses chmod)
    rc, text = run_cli(["prune", case_path("mlp.onnx"), "-o", tmp_path / "o.onnx"])
    assert rc == 2 and "Permission denied" in text and "internal error" not in text, text


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_output_folder_is_refused_before_any_work(run_cli, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, text = run_cli(["prune", case_path("mlp.onnx"), "-o", ro / "o.onnx"])
    finally:
        ro.chmod(0o755)
    assert rc == 2 and "not writable" in text


@pytest.mark.parametrize("option", ["--include", "--exclude"])
def test_a_bad_regex_is_a_clear_error(run_cli, tmp_path: Path, option: str) -> None:
    for argv in (["inspect", case_path("mlp.onnx")], ["check", case_path("mlp.onnx")],
                 ["prune", case_path("mlp.onnx"), "-o", tmp_path / "o.onnx"]):  # fmt: skip
        rc, text = run_cli([*argv, option, "["])
        assert rc == 2 and len(error_lines(text)) == 1 and "not a valid regular expression" in text, text
    with pytest.raises(OnnxSparseError, match="regular expression"):
        api.prune(onnx.load(case_path("mlp.onnx")), include=["("])


def _pickled_array_json(path: Path) -> None:
    buf = pyio.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path.write_text(json.dumps([{"x": {"array": base64.b64encode(buf.getvalue()).decode()}}]))


@pytest.mark.parametrize("kind", ["pickle", "deep", "pickled-array", "binary"])
def test_hostile_load_inputs(run_cli, tmp_path: Path, kind: str) -> None:
    import pickle

    data = tmp_path / "in.json"
    if kind == "pickle":
        data.write_bytes(pickle.dumps([{"x": np.zeros(3)}]))
    elif kind == "deep":
        data.write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "pickled-array":
        _pickled_array_json(data)
    else:
        data.write_bytes(bytes(range(256)))
    m = case_path("mlp.onnx")
    for argv in (["compare", m, m, "--load-inputs", data],
                 ["prune", m, "-o", tmp_path / "o.onnx", "--method", "wanda", "--load-inputs", data]):  # fmt: skip
        rc, text = run_cli(argv)
        assert rc == 2 and len(error_lines(text)) == 1 and "internal error" not in text, (argv, text)
    assert not (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------- 6: invalid input models


def _cyclic() -> onnx.ModelProto:
    m = _add_model()
    g = m.graph
    g.node.append(helper.make_node("Relu", ["y"], ["z"], name="r"))
    g.node[0].input[0] = "z"  # add reads z, which depends on add
    return m


def _undefined_input() -> onnx.ModelProto:
    m = _add_model()
    m.graph.node[0].input[0] = "nowhere"
    return m


def _duplicate_initializer() -> onnx.ModelProto:
    m = _add_model()
    m.graph.initializer.append(m.graph.initializer[0])
    return m


def _no_opset() -> onnx.ModelProto:
    m = _add_model()
    del m.opset_import[:]
    return m


def _ir_99() -> onnx.ModelProto:
    m = _add_model()
    m.ir_version = 99
    return m


@pytest.mark.parametrize("make", [_cyclic, _undefined_input, _duplicate_initializer, _no_opset, _ir_99])
def test_an_invalid_input_is_not_blamed_on_us(run_cli, tmp_path: Path, make) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(make().SerializeToString())
    rc, text = run_cli(["prune", path, "-o", tmp_path / "o.onnx"])
    assert rc == 2 and "the input model is invalid" in text and "bug" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    rc, text = run_cli(["inspect", path])
    assert "the model is invalid" in text and "[E] internal error" not in text, text
    rc, text = run_cli(["inspect", case_path("mlp.onnx")])
    assert "the model is valid" in text


# --------------------------------------------------------------------------- 7: printable names


def test_control_characters_in_names_are_escaped_on_the_terminal(run_cli, tmp_path: Path) -> None:
    evil_node, evil_weight = "fc\x1b[2J\x00\u202eevil", "w\u2066\x07"
    model = onnx.load(case_path("mlp.onnx"))
    node = next(n for n in model.graph.node if n.name == "fc0")
    old = node.input[1]
    node.name = evil_node
    for t in model.graph.initializer:
        if t.name == old:
            t.name = evil_weight
    for n in model.graph.node:
        n.input[:] = [evil_weight if i == old else i for i in n.input]
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rc, text = run_cli(["inspect", path, "--json", tmp_path / "r.json", "--include", "fc"])
    assert rc == 0, text
    for ch in ("\x1b", "\x00", "\u202e", "\u2066", "\x07"):
        assert ch not in text
    assert "fc\\x1b[2J\\x00\\u202eevil" in text
    data = json.loads((tmp_path / "r.json").read_text())
    assert {r["node"] for r in data["layers"]} >= {evil_node}  # JSON keeps the exact name
    rc, text = run_cli(["prune", path, "-o", tmp_path / "o.onnx", "--include", "\x1b"])
    assert rc == 0 and "\x1b" not in text, text


# --------------------------------------------------------------------------- 8: fail early, normal modes


def test_a_missing_output_folder_is_found_before_calibration(run_cli, tmp_path: Path, monkeypatch) -> None:
    from onnx_sparse.calib import data

    def never(*args, **kwargs):
        raise AssertionError("calibration ran before the output path was checked")

    monkeypatch.setattr(data, "load_calibration", never)
    monkeypatch.setattr(data, "load_inputs", never)
    rc, text = run_cli(["prune", case_path("mlp.onnx"), "-o", tmp_path / "no" / "such" / "o.onnx", "--method", "asym"])
    assert rc == 2 and "output folder does not exist" in text, text


def test_json_outputs_get_normal_permissions(run_cli, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert run_cli(["inspect", case_path("mlp.onnx"), "--json", tmp_path / "i.json"])[0] == 0
        rc, _ = run_cli(["prune", case_path("mlp.onnx"), "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json"])
        assert rc == 0
    finally:
        os.umask(old)
    for name in ("i.json", "r.json", "o.onnx"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_sigterm_wrapped_by_a_c_extension_is_still_a_termination(run_cli, monkeypatch) -> None:
    """SIGTERM during an import of a C extension surfaces as ImportError caused by ours."""
    from onnx_sparse.cli import check, main

    def run(args):
        try:
            raise main.Terminated()
        except main.Terminated as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(check.TOOL, "run", run)
    rc, text = run_cli(["check", case_path("mlp.onnx")])
    assert rc == 1 and "terminated (SIGTERM)" in text and "internal error" not in text


# --------------------------------------------------------------------------- issue 19.2: one resolved output path


def _calib(folder: Path) -> Path:
    from polygraphy.json import save_json

    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((3, 64)).astype(np.float32),
              "x3": rng.standard_normal((2, 3, 16)).astype(np.float32)} for _ in range(2)]  # fmt: skip
    save_json(feeds, str(folder / "calib.json"))
    return folder / "calib.json"


def test_an_output_whose_folder_does_not_exist_as_written_is_refused(run_cli, tmp_path: Path, monkeypatch) -> None:
    """``-o ./nosuchdir/../m.onnx`` used to pass the guard (which could not resolve the path) and be
    written as ``m.onnx``, replacing the input. Every option that writes a file is refused the same way."""
    monkeypatch.chdir(tmp_path)
    src = Path("m.onnx")
    onnx.save(onnx.load(case_path("mlp.onnx")), src, save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)  # fmt: skip
    calib = _calib(tmp_path)
    before = _files(tmp_path)
    bad = "./nosuchdir/../"
    cases = [
        ["prune", src, "-o", bad + "m.onnx"],
        ["prune", src, "-o", bad + "o.onnx"],
        ["prune", src, "-o", "o.onnx", "--report", bad + "m.onnx"],
        ["prune", src, "-o", "o.onnx", "--save-recipe", bad + "r.json"],
        ["prune", src, "--method", "wanda", "--load-inputs", calib, "--sensitivity-json", bad + "s.json"],
        ["quantize", src, "-o", bad + "m.onnx", "--load-inputs", calib],
        ["quantize", src, "-o", "q.onnx", "--load-inputs", calib, "--report", bad + "q.json"],
        ["inspect", src, "--json", bad + "m.onnx"],
        ["compare", src, src, "--report", bad + "c.json"],
        ["compare", src, src, "--save-outputs", bad + "m.onnx"],
    ]
    for argv in cases:
        rc, text = run_cli(argv)
        assert rc == 2, (argv, text)
        (line,) = error_lines(text)
        assert "output folder does not exist" in line and "nosuchdir is not there" in line, (argv, line)
        assert _files(tmp_path) == before, argv
    # the same path with the folder there is a different file (the OS resolves nosuchdir/.. to .):
    # now it is the input, and refused as such
    Path("nosuchdir").mkdir()
    rc, text = run_cli(["prune", src, "-o", bad + "m.onnx"])
    assert rc == 2 and "refusing to overwrite the input model" in text, text
    assert _files(tmp_path) == before


def test_the_guard_and_the_writer_use_the_same_resolved_path(run_cli, tmp_path: Path) -> None:
    """Through a symlinked folder, ``link/..`` is the parent of the link's target (as the OS
    resolves it), not the folder holding the link: the output lands there, and the input
    there is protected."""
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    src = _mlp_mlp_conv_with_data(tmp_path / "a")  # a/m.onnx + a/w.bin
    (tmp_path / "link").symlink_to(deep)
    before = _files(tmp_path)
    rc, text = run_cli(["prune", src, "-o", tmp_path / "link" / ".." / "m.onnx"])  # = a/m.onnx: the input
    assert rc == 2 and "refusing to overwrite the input model" in text, text
    assert _files(tmp_path) == before
    rc, text = run_cli(["prune", src, "-o", tmp_path / "link" / ".." / "o.onnx", "--report",
                        tmp_path / "link" / ".." / "r.json"])  # fmt: skip
    assert rc == 0, text
    assert (tmp_path / "a" / "o.onnx").is_file() and (tmp_path / "a" / "r.json").is_file()
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "r.json").exists()


def test_the_writers_refuse_a_folder_that_does_not_exist_as_written(tmp_path: Path, monkeypatch) -> None:
    from onnx_sparse.guard import output_path
    from onnx_sparse.report import write_json

    monkeypatch.chdir(tmp_path)
    src = _mlp_mlp_conv_with_data(tmp_path)
    before = _files(tmp_path)
    for call in (lambda: osio.save_model(osio.load_model(src), "nosuch/../m.onnx"),
                 lambda: write_json("nosuch/../m.onnx", {}),
                 lambda: api.prune_file(src, "nosuch/../m.onnx"),
                 lambda: output_path("w.bin/../x.json")):  # fmt: skip
        with pytest.raises(OnnxSparseError, match="does not exist"):
            call()
    assert _files(tmp_path) == before
    assert output_path("./o.onnx") == tmp_path.resolve() / "o.onnx"


# --------------------------------------------------------------------------- issue 19.6: the file that is read is the file checked


def _swap_after_the_checks(monkeypatch, swap) -> None:
    """Run ``swap()`` right after prune's input checks, before any weight is read."""
    real = api.check_input_model

    def check_then_swap(model):
        real(model)
        swap()

    monkeypatch.setattr(api, "check_input_model", check_then_swap)


@pytest.mark.parametrize("when", ["after-the-checks", "between-check-and-open"])
@pytest.mark.parametrize("to", ["outside-link", "other-file"])
def test_a_data_file_swapped_after_its_check_is_not_read(
    run_cli, tmp_path: Path, monkeypatch, to: str, when: str
) -> None:
    """A data file replaced after it was checked (by a symlink to a file outside the folder, or
    by another file) is refused, never read: the file that is opened is checked, not the path.

    ``after-the-checks`` replaces it once, after prune's input checks. ``between-check-and-open``
    is the racing attacker: the real file is back in place whenever a path is checked and
    swapped out right after each check, before the open (today's main read the outside file
    then, and copied it into the output's data file)."""
    folder = tmp_path / "m"
    folder.mkdir()
    src = _mlp_mlp_conv_with_data(folder)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET * 64)  # long enough for every tensor's offset and length
    data, saved = folder / "w.bin", tmp_path / "w.saved"

    def swap() -> None:
        data.rename(saved)
        if to == "outside-link":
            data.symlink_to(secret)
        else:
            data.write_bytes(SECRET * 64)

    def restore() -> None:
        if saved.exists():
            data.unlink()
            saved.rename(data)

    if when == "after-the-checks":
        _swap_after_the_checks(monkeypatch, swap)
    else:
        armed: list[bool] = []
        real_ref = osio.external_ref
        # weights are read on several threads: one attacker step (restore, check, swap) at a time,
        # or one thread's swap lands inside another's check and that check refuses the file first
        # (a different refusal than the one this test is about)
        step = threading.Lock()

        def racing_ref(t, base_dir):
            with step:
                if armed:
                    restore()
                ref = real_ref(t, base_dir)
                if armed:
                    swap()
                return ref

        monkeypatch.setattr(osio, "external_ref", racing_ref)
        _swap_after_the_checks(monkeypatch, lambda: armed.append(True))
    out = tmp_path / "out"
    out.mkdir()
    rc, text = run_cli(["prune", src, "-o", out / "o.onnx"])
    assert rc == 2, text
    (line,) = error_lines(text)
    assert "w.bin" in line and any(w in line for w in ("changed between its check", "replaced", "outside")), line
    assert list(out.iterdir()) == []


def test_a_data_file_read_checks_the_opened_file(tmp_path: Path, monkeypatch) -> None:
    """external.open_data: the path swapped for a link between external_ref and the open is refused."""
    from onnx_sparse import external

    src = _mlp_mlp_conv_with_data(tmp_path)
    secret = tmp_path.parent / f"{tmp_path.name}-secret.bin"
    secret.write_bytes(SECRET * 64)
    mf = osio.load_model(src)
    t = next(t for t in osio.iter_tensors(mf.model) if t.data_location == TensorProto.EXTERNAL)
    ref = external.external_ref(t, mf.base_dir)
    with external.open_data(ref, t.name) as f:  # untouched: fine
        assert len(f.read(4)) == 4
    (tmp_path / "w.bin").rename(tmp_path / "w.old")
    (tmp_path / "w.bin").symlink_to(secret)
    with pytest.raises(OnnxSparseError, match="changed between its check and the read"):
        external.open_data(ref, t.name)
    with pytest.raises(OnnxSparseError, match="outside the model's folder"):
        mf.read(t)  # a fresh check refuses the link outright


def test_the_model_file_is_read_once(run_cli, tmp_path: Path, monkeypatch) -> None:
    """The model that was checked is the model that is pruned: replacing the file after the
    checks changes nothing (it used to be parsed again, and the new file pruned)."""
    src = tmp_path / "m.onnx"
    onnx.save(onnx.load(case_path("mlp.onnx")), src)
    other = onnx.load(case_path("conv_bn_folded.onnx"))
    _swap_after_the_checks(monkeypatch, lambda: onnx.save(other, src))
    rc, text = run_cli(["prune", src, "-o", tmp_path / "o.onnx"])
    assert rc == 0, text
    pruned = onnx.load(tmp_path / "o.onnx")
    assert [n.name for n in pruned.graph.node] == [n.name for n in onnx.load(case_path("mlp.onnx")).graph.node]
