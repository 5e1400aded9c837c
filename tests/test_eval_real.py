"""Tests for the evaluation harness's target search (tools/eval_real.py), with the pruning stubbed out."""

from __future__ import annotations

from typing import Any

import pytest

from tools import eval_real


def _row(target: float | None, held: float, evaluation: float, coverage: float) -> dict[str, Any]:
    return {
        "model": "ppocr_cls", "method": "asym", "bias_correction": True, "target_cosine": target, "status": "ok",
        "coverage": coverage, "coverage_unit": "macs", "metric": evaluation, "evaluation": {"metric": evaluation},
        "calibration": {"metric": 1.0, "metric_name": "top1_agreement"},  # fitted data: flattering, never used
        "held_out": {"metric": held, "metric_name": "top1_agreement"},
    }  # fmt: skip


@pytest.fixture
def stub(monkeypatch):
    """run_one answers from a table: target -> (held-out metric, evaluation metric, coverage)."""
    table = {
        -1.0: (0.80, 0.78, 1.0), 0.3: (0.85, 0.83, 0.9), 0.5: (0.90, 0.88, 0.8), 0.7: (0.93, 0.90, 0.6),
        0.8: (0.94, 0.92, 0.5), 0.9: (0.96, 0.94, 0.4), 0.95: (0.97, 0.96, 0.3), 0.98: (0.98, 0.97, 0.2),
        0.99: (0.99, 0.98, 0.1), 0.995: (0.99, 0.99, 0.05), 0.998: (1.0, 1.0, 0.02), 0.999: (1.0, 1.0, 0.0),
    }  # fmt: skip
    calls: list[float | None] = []

    def run_one(data: Any, method: str, bias: bool, target: float | None = None) -> dict[str, Any]:
        calls.append(target)
        return _row(target, *table[target])

    monkeypatch.setattr(eval_real, "run_one", run_one)
    return calls, table


class _Data:
    name = "ppocr_cls"


def test_target_search_picks_the_loosest_step_that_meets_the_goal_on_held_out_feeds(stub) -> None:
    row = eval_real.targeted(_Data(), "asym", True, eval_real.TARGET_LADDER)  # type: ignore[arg-type]
    assert row["target_cosine"] == 0.9  # held-out 0.96 >= 0.95; 0.8 gives 0.94
    assert row["meets_goal_on_held_out"] and not row["meets_goal_on_evaluation"]  # evaluation 0.94 < 0.95
    calls, table = stub
    assert len(calls) <= 5  # a binary search, not the whole ladder
    assert [step["target_cosine"] for step in row["ladder"]] == calls
    assert all(step["held_out_metric"] == table[step["target_cosine"]][0] for step in row["ladder"])
    note = eval_real.table_rows([row])[0]["note"]
    assert note == "goal: met on held-out calibration, MISSED on evaluation"


def test_every_layer_pruned_is_the_first_step(stub, monkeypatch) -> None:
    monkeypatch.setitem(eval_real.GOALS, "ppocr_cls", eval_real.Goal(0.75))
    row = eval_real.targeted(_Data(), "asym", True, eval_real.TARGET_LADDER)  # type: ignore[arg-type]
    assert row["target_cosine"] == -1.0 and row["coverage"] == 1.0
    assert eval_real.table_rows([row])[0]["label"].endswith("@all")
