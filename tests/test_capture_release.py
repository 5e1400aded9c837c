"""Issue 20: a frontier value that nothing after the running piece reads leaves the spill's budget
as soon as its sample has run, not when the whole stage is done (rec's best recipe: the pruned and
the dense model's frontiers share one budget, and spent values kept the new ones out of it)."""

from __future__ import annotations

import numpy as np
from test_calibrated_models import conv_data, convnet

from onnx_sparse.calib.capture import StagedRunner
from onnx_sparse.calib.spill import Spill
from onnx_sparse.io import ModelFile


def test_spent_frontier_values_leave_sample_by_sample() -> None:
    feeds = conv_data(0, 4)
    spill = Spill(budget=1 << 30)
    runner = StagedRunner(ModelFile(convnet()), feeds, spill=spill)
    a1 = {i: v["a1"].copy() for i, v in runner.iter_stage(["a1"])}
    held = sum(a.nbytes for a in a1.values())
    assert spill.in_memory == held  # a1 is the frontier: conv2 reads it
    made = 0
    for i, got in runner.iter_stage(["a2"]):
        made += got["a2"].nbytes
        assert runner.cache["a1"][i] is None  # spent once sample i has run
        assert spill.in_memory == held - sum(a1[j].nbytes for j in range(i + 1)) + made
    assert "a1" not in runner.cache
    # and the next stage still computes from what is left
    for _, got in runner.iter_stage(["a3"]):
        assert np.isfinite(got["a3"]).all()
    spill.close()
