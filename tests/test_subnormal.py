"""Tests for onnx_sparse.core.subnormal and where it is applied: the values passes write, the
capture's in-memory pieces, and the calling thread's floating point mode."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import named_tensors
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import helper as h
from onnx import numpy_helper as nh
from test_calibrated_models import conv_data, convnet

from onnx_sparse.calib.capture import StagedRunner, flush_piece, run_model
from onnx_sparse.core.subnormal import count_subnormals, flush_subnormals, subnormal_mask
from onnx_sparse.io import ModelFile

TINY = np.finfo(np.float32).tiny
EDGES = np.array(
    [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00800000, 0x80800000,
     0x3F800000, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x00400000],
    dtype=np.uint32,
)  # fmt: skip


def _is_subnormal_bits(bits: np.ndarray) -> np.ndarray:
    return ((bits & 0x7F800000) == 0) & ((bits & 0x007FFFFF) != 0)


# --------------------------------------------------------------------------- the rule


@settings(max_examples=300, deadline=None)
@given(arrays(np.uint32, st.integers(0, 64), elements=st.integers(0, 2**32 - 1)), st.booleans())
def test_flush_zeroes_exactly_the_subnormals_and_keeps_every_other_bit_pattern(bits, edges) -> None:
    if edges:
        bits = np.concatenate([bits, EDGES])
    a = bits.view(np.float32)
    before = a.copy()
    out = flush_subnormals(a)
    assert np.array_equal(a.view(np.uint32), before.view(np.uint32))  # the input is never modified
    sub = _is_subnormal_bits(bits)
    got = out.view(np.uint32)
    assert np.array_equal(got[~sub], bits[~sub])  # normal, +-0, +-inf, NaN payloads: same bits
    assert np.array_equal(got[sub], bits[sub] & 0x80000000)  # a zero of the same sign
    assert np.array_equal(subnormal_mask(a), sub)
    assert count_subnormals(a) == int(sub.sum())
    if not sub.any():
        assert out is a  # nothing to flush: no copy


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, st.integers(1, 64), elements=st.floats(width=32, allow_nan=True, allow_subnormal=True)))
def test_mask_agrees_with_float_semantics(a) -> None:
    with np.errstate(invalid="ignore"):
        expected = (a != 0) & (np.abs(a) < TINY)
    assert np.array_equal(subnormal_mask(a), expected)


@pytest.mark.filterwarnings("error")
def test_flush_on_strided_views_and_other_dtypes() -> None:
    a = np.zeros((4, 6), np.float32)
    a[:, ::2] = np.float32(1e-39)
    view = a[:, ::2]
    out = flush_subnormals(view)
    assert out.shape == view.shape and not out.any() and count_subnormals(a) == 12
    for other in (np.array([6e-8, 1e-5], np.float16), np.array([1e-310], np.float64), np.array([1, 2], np.int8)):
        assert flush_subnormals(other) is other  # float16/float64/integers: left alone
    assert flush_subnormals(np.zeros(0, np.float32)).size == 0
    scalar = flush_subnormals(np.array(-1e-39, np.float32))  # 0-d: no wrap-around warning, a -0
    assert scalar.shape == () and scalar.view(np.uint32) == 0x80000000


# --------------------------------------------------------------------------- what passes write


def _model_with_subnormals() -> onnx.ModelProto:
    """convnet with subnormals in a pruned weight (a kept entry of a group the pass rewrites), in a
    bias, and in a constant no pass rewrites (the output's offset)."""
    m = convnet()
    inits = {t.name: t for t in m.graph.initializer}
    w = nh.to_array(inits["c4.w"]).copy()
    w[0, :4, 0, 0] = [1e-39, 0, 0, 0]  # magnitude keeps the subnormal (the group is rewritten: see row 0's others)
    w[1, :4, 0, 0] = [-3e-39, 0.5, 0.25, 0.125]
    inits["c4.w"].CopyFrom(nh.from_array(w, "c4.w"))
    b = nh.to_array(inits["c1.b"]).copy()
    b[3] = -2e-39
    inits["c1.b"].CopyFrom(nh.from_array(b, "c1.b"))
    m.graph.node[-1].output[0] = "y0"
    k = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8, 1, 1)
    k[0, 2, 0, 0] = 5e-39
    m.graph.initializer.append(nh.from_array(k, "k"))
    m.graph.node.append(h.make_node("Add", ["y0", "k"], ["y"], name="offset"))
    onnx.checker.check_model(m)
    return m


def _tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return dict(named_tensors(model))


@pytest.mark.parametrize(
    ("method", "options"),
    [("magnitude", {}), ("sparsegpt", {"bias_correction": True}), ("asym", {"bias_correction": True})],
)
def test_written_weights_hold_no_subnormals_and_others_keep_their_bytes(monkeypatch, method, options) -> None:
    """Every value a pass computes goes out with its subnormals flushed (here the pass is made to
    compute some: injected into the new weights and bias shifts it writes); normal values keep
    their bits, tensors no pass rewrites keep their bytes, subnormals included."""
    from onnx_sparse import api
    from onnx_sparse.passes import calibrated

    dense = _model_with_subnormals()
    meant: dict[str, np.ndarray] = {}

    def apply_with_subnormals(real):
        def apply(site, sharers, mf, new, *args, **kwargs):
            new = new.copy()
            flat = new.reshape(-1)
            kept = np.flatnonzero(flat)
            flat[kept[::7]] = np.where(flat[kept[::7]] < 0, -1e-39, 1e-39)  # some kept entries subnormal
            meant[site.weight] = new
            return real(site, sharers, mf, new, *args, **kwargs)

        return apply

    monkeypatch.setattr(calibrated, "apply_site", apply_with_subnormals(calibrated.apply_site))
    real_shift = calibrated.bias_shift

    def shift(*args):
        s = real_shift(*args).copy()
        s[::3] = 2e-39
        return s

    monkeypatch.setattr(calibrated, "bias_shift", shift)
    if method == "magnitude":
        out = api.prune(dense, method="magnitude", include=["conv4"])
    else:
        out = api.prune(dense, method=method, calibration=conv_data(1, 8), **options)
    before, after = _tensors(dense), _tensors(out)
    written = [k for k in before if before[k].SerializeToString() != after[k].SerializeToString()]
    written += [k for k in after if k not in before]  # new bias tensors
    assert "c4.w" in written
    if method != "magnitude":
        assert meant and any("bias" in k or k == "c1.b" for k in written), written
    for key, t in after.items():
        value = nh.to_array(t)
        if key in written:
            assert count_subnormals(value) == 0, key
        else:
            assert t.SerializeToString() == before[key].SerializeToString()
    assert count_subnormals(nh.to_array(after["k"])) == 1  # a constant no pass rewrites: byte-identical
    for weight, new in meant.items():  # what the pass meant to write, subnormals aside, bit for bit
        stored = nh.to_array(after[weight])
        assert count_subnormals(new) > 0
        assert np.array_equal(stored.view(np.uint32), flush_subnormals(new).view(np.uint32)), weight
    if method == "magnitude":
        assert nh.to_array(after["c4.w"])[0, 0, 0, 0] == 0  # the kept dense subnormal went out as 0


# --------------------------------------------------------------------------- the capture's pieces


def test_capture_pieces_flush_in_memory_only_and_capture_the_same_values(monkeypatch) -> None:
    from onnx_sparse.calib import capture

    dense = _model_with_subnormals()
    saved = dense.SerializeToString()
    feeds = conv_data(3, 4)
    pieces: list[onnx.ModelProto] = []
    real_session = capture._session

    def session(model, *args, **kwargs):
        pieces.append(model)
        return real_session(model, *args, **kwargs)

    monkeypatch.setattr(capture, "_session", session)
    mf = ModelFile(dense)
    runner = StagedRunner(mf, feeds)
    first = [values for _, values in runner.iter_stage(["y1"])]
    rest = [values for _, values in runner.iter_stage(["y"])]
    assert len(pieces) == 2
    for piece in pieces:  # what onnxruntime was given: no subnormal
        assert all(count_subnormals(nh.to_array(t)) == 0 for _, t in named_tensors(piece))
    assert mf.model.SerializeToString() == saved  # the model keeps its subnormals
    monkeypatch.setattr(capture, "_session", real_session)
    # captured bits equal a whole-model run on the stored (unflushed) weights
    want = list(run_model(onnx.load_from_string(saved), feeds))
    assert sum(count_subnormals(nh.to_array(t)) for _, t in named_tensors(dense)) == 4
    for f, r, w in zip(first, rest, want, strict=True):
        assert np.array_equal(r["y"], w["y"])
        assert f["y1"].shape[1] == 16


def test_flush_piece_reads_float_data_and_skips_other_types() -> None:
    t = h.make_tensor("a", onnx.TensorProto.FLOAT, [3], [1e-39, 1.0, -0.0])
    assert len(t.float_data) == 3
    half = nh.from_array(np.array([6e-8], np.float16), "b")
    g = h.make_graph([], "g", [], [], [t, half])
    m = h.make_model(g)
    assert flush_piece(m) == 1
    a = nh.to_array(m.graph.initializer[0])
    assert a.view(np.uint32).tolist() == [0, 0x3F800000, 0x80000000]
    assert nh.to_array(m.graph.initializer[1]).tolist() == [np.float16(6e-8)]


def test_a_capture_leaves_the_threads_floating_point_mode_alone() -> None:
    """Subnormals stay subnormal in numpy after a capture: nothing set flush-to-zero or
    denormals-are-zero in this thread (onnxruntime's session.set_denormal_as_zero would)."""
    feeds = conv_data(3, 2)
    runner = StagedRunner(ModelFile(_model_with_subnormals()), feeds)
    for _ in runner.iter_stage(["y"]):
        pass
    x = np.array([1e-39], np.float32)
    assert (x * np.float32(1.0))[0] == np.float32(1e-39)  # inputs not treated as zero (DAZ)
    assert (np.array([1e-30], np.float32) * np.float32(1e-9))[0] != 0  # results not flushed (FTZ)
