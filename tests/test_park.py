"""Tests for onnx_sparse.core.park (arrays set aside on disk) and PairedStats.park."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_sparse.core.hessian import PairedStats
from onnx_sparse.core.park import Parked


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int8])
def test_parked_arrays_come_back_with_the_same_bits_and_leave_no_file(tmp_path, monkeypatch, dtype) -> None:
    monkeypatch.setenv("ONNX_SPARSE_SPILL_DIR", str(tmp_path))
    rng = np.random.default_rng(0)
    value = (rng.standard_normal((37, 53)) * 100).astype(dtype)
    value[0, 0] = -0.0 if value.dtype.kind == "f" else 0
    parked = Parked(value.T)  # not contiguous: parked as its contiguous copy
    assert list(tmp_path.iterdir()) == []  # unlinked at once
    back = parked.take()
    assert back.dtype == value.dtype and back.shape == (53, 37)
    assert back.tobytes() == np.ascontiguousarray(value.T).tobytes()
    with pytest.raises(RuntimeError, match="already taken"):
        parked.take()
    assert Parked(np.zeros((0, 4), dtype)).take().shape == (0, 4)


def test_paired_stats_park_and_unpark() -> None:
    rng = np.random.default_rng(1)
    stats = PairedStats(6)
    x = rng.standard_normal((20, 6))
    stats.update(x, x + 0.1 * rng.standard_normal(x.shape))
    pp, pq = stats.pp.copy(), stats.pq.copy()
    stats.park("pq", "pp")
    assert stats.parked == ("pp", "pq") and stats.pp.size == 0 and stats.pq.size == 0
    with pytest.raises(ValueError, match="cannot park"):
        stats.park("pp")
    with pytest.raises(ValueError, match="cannot park"):
        stats.park("dd")
    stats.unpark()
    assert stats.parked == ()
    assert stats.pp.tobytes() == pp.tobytes() and stats.pq.tobytes() == pq.tobytes()
    stats.unpark()  # nothing parked: nothing to do
