"""The head refit's row choice: gathering only the chosen rows gives what joining every sample's rows
and then choosing would (the same seeded choice, the same rows in the same order)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_sparse.passes.head import _close, _gather_rows


@pytest.mark.parametrize("budget", [1, 7, 50, 1000])
def test_gather_rows_matches_join_then_pick(budget: int) -> None:
    rng = np.random.default_rng(3)
    counts = [5, 0, 17, 1, 9, 30]
    xs = [rng.normal(size=(c, 4)).astype(np.float32) for c in counts]
    zs = [rng.normal(size=(c, 11)) for c in counts]
    fold = [np.full(c, i) for i, c in enumerate(counts)]
    got = _gather_rows([xs, zs, fold], budget, seed=11)
    joined = [np.concatenate(xs), np.concatenate(zs), np.concatenate(fold)]
    total = sum(counts)
    if total > budget:
        pick = np.sort(np.random.default_rng(11).choice(total, budget, replace=False))
        joined = [a[pick] for a in joined]
    for a, b in zip(got, joined, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_close_agrees_with_allclose() -> None:
    rng = np.random.default_rng(0)
    want = rng.random((6, 9))
    for delta in (0.0, 5e-5, 2e-4, 1e-3):
        o = (want + delta).astype(np.float32)
        assert _close(o, want, 1e-4) == np.allclose(o.astype(np.float64), want, atol=1e-4, rtol=1e-3)
    inf = np.array([np.inf])
    assert _close(inf, inf, 1e-4) and not _close(np.array([np.nan]), np.array([np.nan]), 1e-4)
