"""tools/profile_int8.py on a small model: every phase of prune --int8 is timed, and the phases add up."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import case_path

from tools import profile_int8


def test_the_int8_phases_are_timed_and_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 64)).astype(np.float32), "x3": rng.standard_normal((2, 2, 16)).astype(np.float32)}
             for _ in range(8)]  # fmt: skip
    import onnx_sparse.quant as quant
    from onnx_sparse.quant import error

    before = (quant.finish, error.Int8Probe.__dict__["errors"])
    got = profile_int8.profile(case_path("mlp.onnx"), feeds, "int8")
    rows = {r["phase"]: r for r in got["phases"]}
    for phase in ("TOTAL", "prune (run_pipeline)", "smooth_collect", "finish", "save_model",
                  "smooth: statistics (pruned, fit + held-out, + FP32 reference)", "finish: per-layer report"):  # fmt: skip
        assert phase in rows and rows[phase]["n"] >= 1, phase
    assert all(r["incl"] >= r["excl"] - 1e-9 for r in rows.values())
    # every second is counted once: the exclusive times add up to the total
    assert sum(r["excl"] for r in rows.values()) == pytest.approx(rows["TOTAL"]["incl"], abs=0.05)
    assert rows["finish"]["incl"] >= rows["finish: per-layer report"]["incl"]
    assert got["cpu"] == rows["TOTAL"]["incl"] and len(got["sha"]) == 12
    assert (quant.finish, error.Int8Probe.__dict__["errors"]) == before  # the functions are put back
