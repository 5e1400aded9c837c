"""tools/bench_real.py's summary: medians per method, their ratio, each round's own ratio."""

from __future__ import annotations

import pytest

from tools.bench_real import summarize


def _row(tree: str, rnd: int, method: str, cpu: float, sha: str = "a") -> dict:
    return {"tree": tree, "model": "m", "round": rnd, "method": method, "cpu_s": cpu, "sha256": sha}


def test_summary_medians_ratio_and_rounds() -> None:
    rows = [
        _row("ours", 0, "sparsegpt", 10.0),
        _row("ours", 0, "best", 30.0),
        _row("ours", 1, "sparsegpt", 20.0),
        _row("ours", 1, "best", 22.0, sha="b"),
        _row("ours", 2, "sparsegpt", 12.0),
        _row("ours", 2, "best", 24.0),
        _row("baseline", 0, "sparsegpt", 5.0),
        _row("baseline", 0, "best", 15.0),
    ]
    out = summarize(rows)
    ours = out["ours", "m"]
    assert ours["median"] == {"sparsegpt": 12.0, "best": 24.0}
    assert ours["ratio"] == pytest.approx(2.0)  # of the medians, not the median of the rounds' ratios (2.0)
    assert ours["round_ratios"] == pytest.approx([3.0, 1.1, 2.0])
    assert ours["sha256"] == {"sparsegpt": ["a"], "best": ["a", "b"]}
    assert out["baseline", "m"]["ratio"] == pytest.approx(3.0)


def test_summary_without_a_method() -> None:
    out = summarize([_row("ours", 0, "best", 30.0)])
    assert out["ours", "m"]["ratio"] is None
    assert out["ours", "m"]["round_ratios"] == []
