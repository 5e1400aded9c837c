"""tools/time_int8.py's summary (the timing itself is a long CPU run, not a test)."""

from __future__ import annotations

from tools import time_int8


def test_summarize_medians_ratio_and_rounds() -> None:
    rows = []
    for i, (fp32, int8) in enumerate([(10.0, 15.0), (12.0, 14.0), (9.0, 18.0)]):
        for method, cpu in (("fp32", fp32), ("int8", int8)):
            rows.append({"model": "m", "method": method, "round": i, "cpu": cpu, "proc_cpu": cpu + 1,
                         "load": [1.0, 2.0 + i], "sha": f"{method}-sha"})  # fmt: skip
    got = time_int8.summarize(rows)["m"]
    assert got["median"] == {"fp32": 10.0, "int8": 15.0}
    assert got["ratio"] == 1.5
    assert got["round_ratios"] == [1.5, 14.0 / 12.0, 2.0]
    assert got["sha"] == {"fp32": ["fp32-sha"], "int8": ["int8-sha"]}
    assert time_int8.summarize(rows, "proc_cpu")["m"]["ratio"] == 16.0 / 11.0
    table = time_int8.report(rows).splitlines()
    assert table[2].startswith("| m | 10.00 | 15.00 | 1.50x (1.50 / 1.17 / 2.00) | 11.00 / 16.00, 1.45x | 1.0-4.0 |")
