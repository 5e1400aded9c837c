"""Tests for onnx_sparse.calib.layers: weights and activations as matrices, mapped to the stored tensor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import case_path
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from test_calibrated_models import conv_data, convnet, mlp, mlp_data

from onnx_sparse.calib.capture import run_model
from onnx_sparse.calib.layers import Unsupported, layer_view
from onnx_sparse.core import nm
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.graph.weights import read_weight
from onnx_sparse.io import ModelFile


def _views(model: onnx.ModelProto) -> dict:
    mf = ModelFile(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for s in find_weight_sites(model, macs=False):
        if s.eligible:
            try:
                out[s.node] = (s, layer_view(s, mf, producers), mf)
            except Unsupported as exc:
                out[s.node] = (s, exc, mf)
    return out


def _acts(model: onnx.ModelProto, names: list[str], feeds) -> list[dict]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.add().name = n
    return list(run_model(m, feeds))


def test_conv_matrices_times_im2col_rows_is_the_conv() -> None:
    """Pads, strides, groups, dilations and auto_pad=SAME_UPPER: rows @ W^T equals onnxruntime's Conv."""
    model = convnet()
    feeds = conv_data(0, 2, hw=11)  # odd size: SAME_UPPER pads unevenly
    views = _views(model)
    pairs = {"conv1": ("x", "y1"), "conv2": ("a1", "y2"), "conv3": ("a2", "y3"), "conv4": ("a3", "y")}
    acts = _acts(model, ["a1", "a2", "a3", "y1", "y2", "y3"], feeds)
    for node, (inp, out) in pairs.items():
        site, view, mf = views[node]
        mats = view.matrices(read_weight(site, mf))
        for feed, act in zip(feeds, acts, strict=True):
            x = feed["x"] if inp == "x" else act[inp]
            y = act[out]
            if node == "conv1":
                y = y - onnx.numpy_helper.to_array(model.graph.initializer[1]).reshape(1, -1, 1, 1)
            chunks = list(view.rows(x))
            rows = [np.concatenate([c[g] for c in chunks]) for g in range(view.groups)]
            assert rows[0].shape[0] == view.n_rows(x)
            got = np.concatenate([r.astype(np.float64) @ m.T for r, m in zip(rows, mats, strict=True)], axis=1)
            want = y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=node)


def test_fc_matrices() -> None:
    model = mlp()
    feeds = mlp_data(0, 1)
    acts = _acts(model, ["h1", "a1", "a2", "h2"], feeds)[0]
    views = _views(model)
    site, view, mf = views["fc1"]
    (w,) = view.matrices(read_weight(site, mf))
    (r,) = next(view.rows(feeds[0]["x"]))
    np.testing.assert_allclose(r @ w.T, acts["h1"], rtol=1e-4, atol=1e-5)
    site, view, mf = views["fc3"]  # Gemm transB=1: the stored [16, 64] is already [out, in]
    (w,) = view.matrices(read_weight(site, mf))
    assert w.shape == (16, 64)
    np.testing.assert_array_equal(w, read_weight(site, mf))


def test_gemm_trans_a_rows() -> None:
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    g = h.make_graph(
        [h.make_node("Gemm", ["x", "w"], ["y"], name="g", transA=1)],
        "t",
        [h.make_tensor_value_info("x", T.FLOAT, [8, 5])],
        [h.make_tensor_value_info("y", T.FLOAT, [5, 16])],
        [nh.from_array(w, "w")],
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    site, view, mf = _views(model)["g"]
    x = np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)
    (r,) = next(view.rows(x))
    (m,) = view.matrices(read_weight(site, mf))
    y = list(run_model(model, [{"x": x}]))[0]["y"]
    np.testing.assert_allclose(r @ m.T, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["transpose_120.onnx", "fp16_cast.onnx", "qdq_conv.onnx", "constant_nodes.onnx"])
def test_round_trip_through_the_path(name: str) -> None:
    """matrices() follows the path from the stored tensor; to_stored() of them gives the tensor back."""
    for site, view, mf in _views(onnx.load(case_path(name))).values():
        stored = np.asarray(read_weight(site, mf))
        mats = view.matrices(stored)
        back = view.to_stored(mats, stored)
        assert back.dtype == stored.dtype
        np.testing.assert_array_equal(back.view(np.uint8), np.ascontiguousarray(stored).view(np.uint8))
        # 2 of every 4 matrix columns zeroed lands as 2:4 along the stored axis.
        halved = [m * np.tile([1.0, 0.0, 1.0, 0.0], m.shape[1] // 4) for m in mats]
        assert nm.is_2_4(view.to_stored(halved, stored), site.axis)


def test_quantized_path_dequantizes_and_requantizes() -> None:
    model = onnx.load(case_path("qdq_conv.onnx"))
    ((site, view, mf),) = _views(model).values()
    assert not view.mask_only and view.requant is not None
    stored = np.asarray(read_weight(site, mf))
    assert stored.dtype == np.int8
    scale = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "conv.weight_scale")
    scale = scale.astype(np.float64).reshape(-1, 1, 1, 1)
    consumer = view.consumer_values(stored)
    np.testing.assert_allclose(consumer, stored.astype(np.float64) * scale, rtol=1e-6)
    mats = view.matrices(stored)
    updated = [m * np.tile([1.7, 0.0, 0.0, 1.3], m.shape[1] // 4) for m in mats]  # "updated" values
    new = view.to_stored(updated, stored)
    assert new.dtype == np.int8 and nm.is_2_4(new, site.axis)
    # every stored entry is the requantized update: round(value / scale), clipped to int8
    factor = np.moveaxis(np.broadcast_to(np.array([1.7, 0.0, 0.0, 1.3]), (3, 3, 4)), -1, 0)  # [4, kh, kw]
    lo = -128 if stored.min() == -128 else -127  # symmetric weights stay symmetric
    want = np.clip(np.rint(consumer * np.tile(factor, (1, 4, 1, 1)) / scale), lo, 127)
    np.testing.assert_array_equal(new, want.astype(np.int8))
    # unchanged matrices come back as the same bytes
    np.testing.assert_array_equal(view.to_stored(mats, stored), stored)


def _dq_chain(**attrs) -> list[onnx.NodeProto]:
    return [onnx.helper.make_node("DequantizeLinear", ["w", "s", "z"], ["d"], **attrs)]


def test_requantizer_only_for_a_leading_plain_dequantize() -> None:
    from onnx_sparse.calib.layers import _requantizer

    w = np.zeros((8, 4), np.int8)
    side = {"s": np.full(8, 0.1, np.float32), "z": np.zeros(8, np.int8)}
    got = _requantizer(_dq_chain(axis=0), side, w)
    assert got is not None and got[0].shape == (8, 4) and float(got[0][3, 2]) == pytest.approx(0.1)
    assert _requantizer(_dq_chain(axis=0, block_size=2), {"s": np.ones((4, 4), np.float32), "z": side["z"]}, w) is None
    transposed_first = [onnx.helper.make_node("Transpose", ["w"], ["t"], perm=[1, 0])] + _dq_chain(axis=1)
    assert _requantizer(transposed_first, side, w) is None
    assert _requantizer(_dq_chain(axis=0), side, w.astype(np.float32)) is None  # float stored: not requantized
    assert _requantizer(_dq_chain(axis=1), side, w) is None  # scale length does not match the axis


def test_row_subsampling_is_seeded_and_bounded() -> None:
    site, view, mf = _views(convnet())["conv1"]
    x = conv_data(0, 1)[0]["x"]
    full = np.concatenate([c[0] for c in view.rows(x)])
    a = np.concatenate([c[0] for c in view.rows(x, np.random.default_rng(5), 50)])
    b = np.concatenate([c[0] for c in view.rows(x, np.random.default_rng(5), 50)])
    assert a.shape == (50, full.shape[1])
    np.testing.assert_array_equal(a, b)
    assert all(any(np.array_equal(r, f) for f in full) for r in a[:5])


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "GemmT", "Conv"])
def test_a_plain_weights_view_costs_one_row_not_the_weight(op: str) -> None:
    """Views of every layer are built before calibration starts: for a weight read as stored, the
    index matrices and the layout probe take one output row per group (the other rows have the
    same layout), not arrays of the whole weight (BERT-large: 28 s of CPU and 100 MB at a time)."""
    import tracemalloc

    rows, cols = 2048, 1024
    if op == "Conv":
        w = np.zeros((rows, cols // 4, 2, 2), np.float32)
        node = h.make_node("Conv", ["x", "w"], ["y"], name="l", group=2)
        x = h.make_tensor_value_info("x", T.FLOAT, [1, cols // 2, 8, 8])
    elif op == "MatMul":
        w = np.zeros((cols, rows), np.float32)
        node = h.make_node("MatMul", ["x", "w"], ["y"], name="l")
        x = h.make_tensor_value_info("x", T.FLOAT, [4, cols])
    else:
        trans = op == "GemmT"
        w = np.zeros((rows, cols) if trans else (cols, rows), np.float32)
        node = h.make_node("Gemm", ["x", "w"], ["y"], name="l", transB=int(trans))
        x = h.make_tensor_value_info("x", T.FLOAT, [4, cols])
    graph = h.make_graph([node], "g", [x], [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(w, "w")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    (site,) = [s for s in find_weight_sites(model, macs=False) if s.eligible]
    mf = ModelFile(model)
    tracemalloc.start()
    try:
        view = layer_view(site, mf, {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < w.nbytes // 8, peak
    assert view.cols * view.rows_per_group * view.groups == w.size
    full = [np.asarray(m) for m in view.index]  # remade on demand: every stored element once
    assert sorted(np.concatenate([m.ravel() for m in full]).tolist()) == list(range(w.size))
    assert nm.is_2_4(view.to_stored([np.tile([1.0, 0.0, 1.0, 0.0], m.size // 4).reshape(m.shape) for m in full],
                                    w), site.axis)  # fmt: skip


def test_unsupported_layers() -> None:
    views = _views(onnx.load(case_path("gemm_const_a.onnx")))
    assert isinstance(views["gemm_a"][1], Unsupported) and "A input" in str(views["gemm_a"][1])
    views = _views(onnx.load(case_path("if_subgraph.onnx")))
    assert all(isinstance(v[1], Unsupported) and "subgraph" in str(v[1]) for v in views.values())


def test_padding_mask_lines_up_only_with_token_rows() -> None:
    site, view, mf = _views(mlp())["fc1"]
    x = np.arange(2 * 3 * view.cols, dtype=np.float64).reshape(2, 3, view.cols)
    keep = np.array([[1, 1, 0], [1, 0, 0]])
    assert view.masks_rows(x, keep) and not view.masks_rows(x, keep[:, :2])
    (rows,) = next(view.rows(x, keep=keep))
    np.testing.assert_array_equal(rows, x.reshape(-1, view.cols)[[0, 1, 3]])
    (sub,) = next(view.rows(x, np.random.default_rng(0), max_rows=2, keep=keep))
    assert sub.shape == (2, view.cols) and {tuple(r) for r in sub} <= {tuple(r) for r in rows}
    conv_site, conv_view, _ = _views(convnet())["conv1"]
    assert not conv_view.masks_rows(np.zeros((1, 8, 12, 12)), np.ones((1, 8)))
