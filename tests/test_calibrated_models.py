"""Small models and calibration data for the calibrated-pruning tests (imported by the other
``test_calib*``/``test_sensitivity`` modules), and checks that the fixtures are what they claim.

* :func:`mlp`: ``MatMul -> Add -> Relu -> MatMul -> Relu -> Gemm(transB=1, C)``; inputs with
  strongly correlated, unevenly scaled features (:func:`mlp_data`), where a data-aware method
  must beat magnitude pruning.
* :func:`convnet`: four Convs: pads + bias; groups=2 with stride 2, asymmetric pads and
  dilation; ``auto_pad=SAME_UPPER`` with a 3x1 kernel and stride (2, 1); a 1x1 without bias.
* :func:`single`: one layer (Conv / MatMul / Gemm) with or without a bias, for bias correction.
* :func:`qkv`: three MatMuls sharing one input, then a MatMul on their sum (two stages).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

D_IN = 32


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    g = h.make_graph(nodes, "test", inputs, outputs, [nh.from_array(v, k) for k, v in inits.items()])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def mlp(seed: int = 0, hidden: int = 64, d_out: int = 16) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {
        "w1": (rng.standard_normal((D_IN, hidden)) / np.sqrt(D_IN)).astype(np.float32),
        "b1": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32),
        "w3": (rng.standard_normal((d_out, hidden)) / np.sqrt(hidden)).astype(np.float32),
        "c3": (rng.standard_normal(d_out) * 0.1).astype(np.float32),
    }
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        h.make_node("Add", ["h1", "b1"], ["h1b"], name="add1"),
        h.make_node("Relu", ["h1b"], ["a1"], name="relu1"),
        h.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"),
        h.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        h.make_node("Gemm", ["a2", "w3", "c3"], ["y"], name="fc3", transB=1),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["n", D_IN])],
        [h.make_tensor_value_info("y", T.FLOAT, ["n", d_out])],
        inits,
    )


def mlp_data(seed: int, feeds: int, rows: int = 16) -> list[dict[str, np.ndarray]]:
    """Feeds ``{"x": [rows, 32]}`` with correlated, unevenly scaled features (same mixing for every seed)."""
    fixed = np.random.default_rng(1234)
    mix = fixed.standard_normal((D_IN, D_IN)) * 0.7 + np.eye(D_IN)
    scale = fixed.uniform(0.2, 3.0, D_IN)
    rng = np.random.default_rng(seed)
    return [{"x": ((rng.standard_normal((rows, D_IN)) @ mix) * scale).astype(np.float32)} for _ in range(feeds)]


def convnet(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = {
        "c1.w": w(16, 8, 3, 3),
        "c1.b": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "c2.w": w(16, 8, 3, 3),
        "c3.w": w(16, 16, 3, 1),
        "c4.w": w(8, 16, 1, 1),
    }
    nodes = [
        h.make_node("Conv", ["x", "c1.w", "c1.b"], ["y1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["y1"], ["a1"], name="relu1"),
        h.make_node(
            "Conv", ["a1", "c2.w"], ["y2"], name="conv2", group=2, strides=[2, 2], pads=[1, 0, 0, 1], dilations=[1, 2]
        ),
        h.make_node("Relu", ["y2"], ["a2"], name="relu2"),
        h.make_node("Conv", ["a2", "c3.w"], ["y3"], name="conv3", auto_pad="SAME_UPPER", strides=[2, 1]),
        h.make_node("Relu", ["y3"], ["a3"], name="relu3"),
        h.make_node("Conv", ["a3", "c4.w"], ["y"], name="conv4"),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["n", 8, "h", "w"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["n", 8, "ho", "wo"])],
        inits,
    )


def conv_data(seed: int, feeds: int, hw: int = 12) -> list[dict[str, np.ndarray]]:
    """Feeds ``{"x": [1, 8, hw, hw]}`` with correlated channels and smooth spatial structure."""
    mix = np.random.default_rng(99).standard_normal((8, 8)) * 0.8 + np.eye(8)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(feeds):
        z = (rng.standard_normal((1, hw, hw, 8)) @ mix).transpose(0, 3, 1, 2)
        z = (z + np.roll(z, 1, 2) + np.roll(z, 1, 3)) / 3 + 0.5
        out.append({"x": z.astype(np.float32)})
    return out


def single(op: str, bias: bool, seed: int = 0) -> onnx.ModelProto:
    """One layer: Conv [16, 8, 3, 3] (pads 1, stride 2), MatMul [32, 16] (+ Add), or Gemm [16, 32] (transB)."""
    rng = np.random.default_rng(seed)
    if op == "Conv":
        inits = {"w": (rng.standard_normal((16, 8, 3, 3)) / 8).astype(np.float32)}
        ins = ["x", "w"]
        if bias:
            inits["b"] = (rng.standard_normal(16) * 0.1).astype(np.float32)
            ins.append("b")
        nodes = [h.make_node("Conv", ins, ["y"], name="layer", pads=[1, 1, 1, 1], strides=[2, 2])]
        x = h.make_tensor_value_info("x", T.FLOAT, [1, 8, 12, 12])
        y = h.make_tensor_value_info("y", T.FLOAT, [1, 16, 6, 6])
        return _model(nodes, [x], [y], inits)
    x = h.make_tensor_value_info("x", T.FLOAT, ["n", D_IN])
    y = h.make_tensor_value_info("y", T.FLOAT, ["n", 16])
    if op == "MatMul":
        inits = {"w": (rng.standard_normal((D_IN, 16)) / 6).astype(np.float32)}
        if bias:
            inits["b"] = (rng.standard_normal(16) * 0.1).astype(np.float32)
            nodes = [h.make_node("MatMul", ["x", "w"], ["mm"], name="layer"), h.make_node("Add", ["mm", "b"], ["y"])]
        else:
            nodes = [h.make_node("MatMul", ["x", "w"], ["y"], name="layer")]
        return _model(nodes, [x], [y], inits)
    inits = {"w": (rng.standard_normal((16, D_IN)) / 6).astype(np.float32)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = (rng.standard_normal(16) * 0.1).astype(np.float32)
        ins.append("b")
    return _model([h.make_node("Gemm", ins, ["y"], name="layer", transB=1, alpha=0.5, beta=2.0)], [x], [y], inits)


def qkv(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {k: (rng.standard_normal((D_IN, D_IN)) / 6).astype(np.float32) for k in ("wq", "wk", "wv", "wo")}
    nodes = [
        h.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        h.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        h.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
        h.make_node("Mul", ["q", "k"], ["qk"], name="mul"),
        h.make_node("Add", ["qk", "v"], ["s"], name="add"),
        h.make_node("MatMul", ["s", "wo"], ["y"], name="o"),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["n", D_IN])],
        [h.make_tensor_value_info("y", T.FLOAT, ["n", D_IN])],
        inits,
    )


def run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], output: int = 0) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[output] for f in feeds]


def rel_error(model: onnx.ModelProto, dense: list[np.ndarray], feeds: list[dict[str, np.ndarray]]) -> float:
    """Mean over feeds of ``||y' - y|| / ||y||``."""
    out = run(model, feeds)
    return float(np.mean([np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(out, dense, strict=True)]))


# --------------------------------------------------------------------------- the fixtures themselves


def test_fixtures_run() -> None:
    assert run(mlp(), mlp_data(0, 1))[0].shape == (16, 16)
    assert run(convnet(), conv_data(0, 1))[0].shape == (1, 8, 3, 5)
    for op in ("Conv", "MatMul", "Gemm"):
        for bias in (False, True):
            feed = conv_data(0, 1) if op == "Conv" else mlp_data(0, 1)
            assert run(single(op, bias), feed)[0].shape[1] == 16
    assert run(qkv(), mlp_data(0, 1))[0].shape == (16, D_IN)


def test_mlp_data_is_correlated() -> None:
    x = np.concatenate([f["x"] for f in mlp_data(0, 8)])
    corr = np.corrcoef(x.T)
    assert np.mean(np.abs(corr[np.triu_indices(D_IN, 1)])) > 0.1
