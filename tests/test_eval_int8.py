"""tools/eval_int8.py's targets and table (the evaluation itself is a long CPU run, not a test)."""

from __future__ import annotations

import pytest

from tools import eval_int8


@pytest.mark.parametrize(
    ("metrics", "near", "additive"),
    [
        ({"dense": 1.0, "dense-int8": 0.97, "sparse": 0.95, "sparse-int8": 0.94}, True, True),
        ({"dense": 1.0, "dense-int8": 0.97, "sparse": 0.95, "sparse-int8": 0.92}, False, True),  # 0.03 below sparse
        ({"dense": 1.0, "dense-int8": 1.0, "sparse": 0.95, "sparse-int8": 0.94}, True, False),  # loss 0.06 > 0 + 0.05
        ({"dense": 1.0, "dense-int8": 0.99, "sparse": 0.95, "sparse-int8": 0.93}, True, False),
    ],
)
def test_verdict(metrics: dict[str, float], near: bool, additive: bool) -> None:
    got = eval_int8.verdict(metrics)
    assert (got["within_0.02_of_sparse"], got["no_worse_than_sum"], got["meets"]) == (near, additive, near and additive)


def test_table() -> None:
    row = {"model": "m", "metric_name": "top1", "sparse_int8_layers": 3, "eligible_layers": 4, "exclude": ["x"],
           "metrics": {"dense": 1.0, "dense-int8": 0.9, "sparse": 0.8, "sparse-int8": 0.79}}  # fmt: skip
    row |= eval_int8.verdict(row["metrics"])
    lines = eval_int8.format_table([row]).splitlines()
    assert (
        len(lines) == 3
        and "| m (1 pattern(s) left float) | top1 | 1.0000 | 0.9000 | 0.8000 | 0.7900 | 3/4 | yes | yes |" == lines[2]
    )
