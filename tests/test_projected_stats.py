"""Projected paired statistics (``PairedStats(project=W)``: ``pq W^T`` gathered instead of ``pq``)
give the refit what ``pq`` gives it, and the calibration uses them only where they are cheaper."""

from __future__ import annotations

import numpy as np
import pytest
from test_calibrated_models import conv_data, convnet, qkv, rel_error, run

from onnx_sparse import api
from onnx_sparse.core.hessian import PairedStats
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.io import ModelFile
from onnx_sparse.passes.calibrated import Calibrator
from onnx_sparse.prune.select import InputFolds, asymmetric_cv_2_4, choose_refit_damp


def _rows(seed: int, n: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xd = rng.standard_normal((n, cols)).astype(np.float32)
    xp = (xd + 0.1 * rng.standard_normal((n, cols))).astype(np.float32)
    return xp, xd


def _both(w: np.ndarray, parts: int, cols: int) -> tuple[PairedStats, PairedStats]:
    plain, proj = PairedStats(cols), PairedStats(cols, project=w)
    for k in range(parts):
        xp, xd = _rows(k, 300 + 50 * k, cols)
        plain.update(xp, xd)
        proj.update(xp, xd)
    return plain, proj


@pytest.mark.parametrize("cols, out", [(48, 8), (600, 40)])  # a narrow and a wide (blocked) product
def test_projected_statistics_give_pq_times_the_weight(cols: int, out: int) -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((out, cols)).astype(np.float32)
    plain, proj = _both(w, 3, cols)
    assert proj.pq.size == 0 and proj.pqw is not None and proj.pqw.shape == (cols, out)
    np.testing.assert_array_equal(proj.pp, plain.pp)  # pp is gathered as before
    w64 = w.astype(np.float64)
    want = plain.pq @ w64.T
    tol = 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(proj.pq_times(w64), want, atol=tol)
    # a weight stacked at an offset, and a subset of its rows
    half = w64[out // 2 :]
    np.testing.assert_allclose(proj.pq_times(half, out // 2), plain.pq_times(half), atol=tol)
    rows = np.array([0, 1, 3])
    np.testing.assert_allclose(proj.pq_times(half, out // 2, rows), plain.pq @ half[rows].T, atol=tol)
    with pytest.raises(ValueError):
        proj.pq_times(w64, 1)  # past the end of the stack
    with pytest.raises(ValueError):
        _ = proj.pd
    # sums and copies keep them
    total = PairedStats.total([proj, proj.copy()])
    assert total.pqw is not None
    np.testing.assert_allclose(total.pqw, 2 * proj.pqw)
    with pytest.raises(ValueError):
        total.add_(plain)


def test_projected_refit_and_choice_match_the_plain_ones() -> None:
    cols, out = 64, 12
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2 * out, cols)).astype(np.float32)  # two weights of one input
    plain_folds, proj_folds = [], []
    for k in range(4):
        p, q = _both(w, 1, cols)
        xp, xd = _rows(10 + k, 200, cols)
        p.update(xp, xd)
        q.update(xp, xd)
        plain_folds.append(p)
        proj_folds.append(q)
    second = w[out:]
    a = choose_refit_damp(second, plain_folds, total=PairedStats.total(plain_folds), budget=None)
    b = choose_refit_damp(second, proj_folds, total=PairedStats.total(proj_folds), budget=None, offset=out)
    assert a.damp == b.damp
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5)
    with pytest.raises(ValueError):  # the offset is needed
        choose_refit_damp(second, proj_folds, total=PairedStats.total(proj_folds), budget=None)
    new_a, _, cv_a = asymmetric_cv_2_4(second, inputs=InputFolds(plain_folds, None, 0.01))
    new_b, _, cv_b = asymmetric_cv_2_4(second, inputs=InputFolds(proj_folds, None, 0.01), offset=out)
    assert cv_a.damp == cv_b.damp
    assert np.mean((new_a == 0) == (new_b == 0)) > 0.99  # the same 2:4 masks but for a near tie or two
    np.testing.assert_allclose(new_b, new_a, atol=1e-4 * np.abs(new_a).max())


def test_projection_only_where_cheaper() -> None:
    cal = Calibrator("asym")
    mf = ModelFile(convnet())
    groups, _ = cal.groups(mf, [s for s in find_weight_sites(mf.model, macs=False) if s.eligible])
    by = {g.sites[0].node: g for g in groups}
    # conv1: 72 im2col columns, 16 outputs: projected; conv4: 16 columns, 8 outputs: pq itself
    project, offsets = cal._projection([by["conv1"]], mf)
    assert project is not None and offsets == {by["conv1"].key: 0} and project[0].shape == (16, 72)
    assert cal._projection([by["conv4"]], mf) == (None, None)
    # not for the pruned refit's scores, which read pq whole
    assert Calibrator("asym", refit_confirm=2)._projection([by["conv1"]], mf) == (None, None)
    # Q, K and V (32 columns, 3 x 32 outputs): pq itself
    mf = ModelFile(qkv())
    groups, _ = cal.groups(mf, [s for s in find_weight_sites(mf.model, macs=False) if s.eligible])
    assert cal._projection([g for g in groups if g.sites[0].node in "qkv"], mf) == (None, None)


def test_asym_prune_with_projected_statistics_is_as_good(monkeypatch) -> None:
    model, feeds, held = convnet(), conv_data(0, 8), conv_data(1, 4)
    dense = run(model, held)
    used = []
    original = Calibrator._projection

    def spy(self, grps, mf):
        out = original(self, grps, mf)
        used.append(out[0] is not None)
        return out

    monkeypatch.setattr(Calibrator, "_projection", spy)
    projected = api.prune(model, method="asym", calibration=feeds)
    assert any(used) and not all(used)  # conv1-3 projected, conv4 not
    monkeypatch.setattr(Calibrator, "_projection", lambda self, grps, mf: (None, None))
    plain = api.prune(model, method="asym", calibration=feeds)
    e_proj, e_plain = rel_error(projected, dense, held), rel_error(plain, dense, held)
    assert abs(e_proj - e_plain) <= 0.01 * e_plain, (e_proj, e_plain)
