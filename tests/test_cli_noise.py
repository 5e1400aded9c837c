"""``cli.noise``: no third-party warning reaches the terminal by default; ``-v`` shows them."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

from conftest import MODELS_DIR

NOISE = ("colored", "RuntimeWarning", "DeprecationWarning", "Dynamic shapes cannot be used", "Traceback")


def _cli(*argv: object) -> subprocess.CompletedProcess[str]:
    """A fresh process: Polygraphy's one-time 'colored' notice is printed at most once per process."""
    return subprocess.run(
        [sys.executable, "-m", "onnx_sparse", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_commands_print_no_third_party_noise(tmp_path: Path) -> None:
    model = MODELS_DIR / "dynamic_shapes.onnx"
    out = tmp_path / "out.onnx"
    for argv in (
        ("inspect", model),
        ("prune", model, "-o", out, "--method", "sparsegpt"),  # random data, dynamic dims, Polygraphy loader
        ("compare", model, out, "--input-shapes", "x:[2,3,16]"),
        ("check", out),
    ):
        proc = _cli(*argv)
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        text = proc.stdout + proc.stderr
        for noise in NOISE:
            assert noise not in text, (argv, noise, text)
        assert proc.stderr == "", (argv, proc.stderr)


def test_python_warnings_go_to_debug(caplog) -> None:
    from onnx_sparse.cli.noise import quiet_third_party

    saved = warnings.showwarning
    try:
        with warnings.catch_warnings():
            quiet_third_party()
            with caplog.at_level(logging.DEBUG, logger="onnx_sparse"):
                warnings.warn("invalid value encountered in divide", RuntimeWarning, stacklevel=1)
    finally:
        warnings.showwarning = saved
    (record,) = [r for r in caplog.records if "invalid value" in r.getMessage()]
    assert record.levelno == logging.DEBUG and record.getMessage().startswith("RuntimeWarning: ")
