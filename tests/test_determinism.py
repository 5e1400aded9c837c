"""The same model, data and recipe give the same file, byte for byte, whatever the thread
settings, the number of worker threads or the load of the machine (README, "Which recipe").

Run the way it failed for users: the real CLI in separate processes, on real models with real
calibration data, with 1, 2 and 4 solve threads, two prunes started at the same moment, a
process that keeps both cores busy with multi-threaded BLAS meanwhile, and the recipe given
three ways (defaults, ``--recipe`` file, explicit flags). Before the fix (BLAS thread settings
that one worker changed for the whole process) MiniLM-L3 gave three different files here.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]

_MAIN = "import sys; from onnx_sparse.cli.main import main; sys.exit(main())"
_BUSY = """
import numpy as np, time
a = np.random.default_rng(0).standard_normal((700, 700))
end = time.time() + 600
while time.time() < end:
    a = np.tanh(a @ a.T / 700.0)
"""


def _prune(model: Path, out: Path, calib: Path, *args: str, threads: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("ONNX_SPARSE_SOLVE_THREADS", None)
    if threads is not None:
        env["ONNX_SPARSE_SOLVE_THREADS"] = threads
    cmd = [sys.executable, "-c", _MAIN, "prune", str(model), "-o", str(out)]
    cmd += ["--load-inputs", str(calib), "-qq", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out


def _digest(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    for data in sorted(path.parent.glob(path.name + ".*.data")):
        h.update(data.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(("name", "feeds"), [("minilm_l3", 25), ("ppocr_cls", 24)])
def test_same_bytes_whatever_the_threads_and_the_load(real_model, tmp_path: Path, name: str, feeds: int) -> None:
    from tools import realdata

    model = real_model(name)
    calib = tmp_path / "calib.json"
    realdata.save_feeds(realdata.calibration(name)[:feeds], calib)
    recipe = tmp_path / "recipe.json"
    outs: dict[str, Path] = {}

    def out(label: str) -> Path:
        outs[label] = tmp_path / f"{label}.onnx"
        return outs[label]

    # a quiet machine, the default thread count, the recipe saved for later
    _finish(_prune(model, out("default"), calib, "--save-recipe", str(recipe)))
    busy = subprocess.Popen([sys.executable, "-c", _BUSY])
    try:
        # one solve thread, four (more than the cores), and two prunes at the same moment,
        # each given the recipe another way, all while another process keeps the cores busy
        _finish(_prune(model, out("threads1"), calib, threads="1"))
        _finish(_prune(model, out("threads4"), calib, threads="4"))
        pair = [
            _prune(model, out("recipe_file"), calib, "--recipe", str(recipe)),
            _prune(model, out("explicit"), calib, "--method", "asym", "--bias-correction", "--refit-head", threads="2"),
        ]
        for proc in pair:
            _finish(proc)
    finally:
        busy.kill()
        busy.wait()
    digests = {label: _digest(path) for label, path in outs.items()}
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("flags", [("--int8",), ("--int8", "--int8-joint")], ids=["default", "joint"])
def test_int8_prune_same_bytes_on_one_and_two_solve_threads(real_model, tmp_path: Path, flags: tuple[str, ...]) -> None:
    """``prune --int8`` (the rescaling chosen on the pruned model, whose statistics and held-out outputs
    serve the scales and the search's reference) and ``--int8-joint`` (the rescaling chosen on the
    dense model, joint walk), with the Q/DQ writer and the mixed-precision search, give the same file
    with one solve thread as with two."""
    from tools import realdata

    model = real_model("minilm_l3")
    calib = tmp_path / "calib.json"
    realdata.save_feeds(realdata.calibration("minilm_l3")[:16], calib)
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    _finish(_prune(model, one, calib, *flags, threads="1"))
    _finish(_prune(model, two, calib, *flags, threads="2"))
    assert _digest(one) == _digest(two)
