"""Tensors read only through a global max pool: found by the graph rule, calibrated on their pooled values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse import runtime
from onnx_sparse.quant import QuantizeOptions, quantize
from onnx_sparse.quant import calibrate as calibrate_mod
from onnx_sparse.quant.calibrate import collect
from onnx_sparse.quant.pooling import max_pooled

C, K, T = 16, 32, 256  # input channels, conv outputs, positions


def _gelu_tanh(x: str, p: str) -> list[onnx.NodeProto]:
    """GELU as jax2tf writes it: x * 0.5 * (1 + tanh(c * (x + 0.044715 x^3))), x read four times."""
    return [
        helper.make_node("Mul", [f"{p}k3", x], [f"{p}m"], name=f"{p}mul"),
        helper.make_node("Mul", [x, f"{p}m"], [f"{p}m1"], name=f"{p}mul1"),
        helper.make_node("Mul", [x, f"{p}m1"], [f"{p}m2"], name=f"{p}mul2"),
        helper.make_node("Add", [x, f"{p}m2"], [f"{p}a"], name=f"{p}add"),
        helper.make_node("Mul", [f"{p}c", f"{p}a"], [f"{p}m3"], name=f"{p}mul3"),
        helper.make_node("Tanh", [f"{p}m3"], [f"{p}t"], name=f"{p}tanh"),
        helper.make_node("Add", [f"{p}one", f"{p}t"], [f"{p}a1"], name=f"{p}add1"),
        helper.make_node("Mul", [f"{p}half", f"{p}a1"], [f"{p}m4"], name=f"{p}mul4"),
        helper.make_node("Mul", [x, f"{p}m4"], [f"{p}y"], name=f"{p}mul5"),
    ]


def _gelu_consts(p: str) -> list[onnx.TensorProto]:
    vals = {"k3": 0.044715, "c": 0.7978846, "one": 1.0, "half": 0.5}
    return [numpy_helper.from_array(np.array(v, np.float32), f"{p}{k}") for k, v in vals.items()]


def _model(between: str = "gelu") -> onnx.ModelProto:
    """x [N, C, T, 1] -> Conv 1x1 -> + bias -> ``between`` -> GlobalMaxPool -> Flatten -> MatMul -> logits."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, C, 1, 1)) / np.sqrt(C)).astype(np.float32)
    head = (rng.standard_normal((K, 8)) / np.sqrt(K)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(rng.standard_normal(K).astype(np.float32).reshape(1, K, 1, 1) * 0.1, "b"),
        numpy_helper.from_array(head, "head"),
        numpy_helper.from_array(np.array(-1.0, np.float32), "minus"),
        *_gelu_consts("g_"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], name="conv"),
        helper.make_node("Add", ["conv", "b"], ["biased"], name="bias"),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 8])]
    act = "biased"
    if between == "gelu":
        nodes += _gelu_tanh("biased", "g_")
        act = "g_y"
    elif between == "neg":  # the maxima become the minima: not a max pool's input any more
        nodes.append(helper.make_node("Mul", ["biased", "minus"], ["neg"], name="neg"))
        act = "neg"
    elif between == "output":  # the activation is also a graph output
        nodes.append(helper.make_node("Relu", ["biased"], ["relu"], name="relu"))
        act = "relu"
        outputs.append(helper.make_tensor_value_info("relu", TensorProto.FLOAT, [None, K, T, 1]))
    elif between == "second reader":  # another op reads the conv's output at every position
        nodes.append(helper.make_node("Relu", ["biased"], ["relu"], name="relu"))
        nodes.append(helper.make_node("ReduceMean", ["conv"], ["mean"], name="mean", keepdims=0))
        act = "relu"
        outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, []))
    nodes += [
        helper.make_node("GlobalMaxPool", [act], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flat"),
        helper.make_node("MatMul", ["flat", "head"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, C, T, 1])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(n: int = 24, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Mostly small inputs with a rare large burst per sample: the pooled maxima are the outliers of the map."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((2, C, T, 1)).astype(np.float32)
        for b in range(2):
            x[b, :, rng.integers(T), 0] += np.abs(rng.standard_normal(C)).astype(np.float32) * 12
        out.append({"x": x})
    return out


def test_the_rule_follows_elementwise_chains_to_the_pool() -> None:
    m = _model("gelu")
    names = ["conv", "biased", "g_m1", "g_y", "pooled", "flat"]
    assert max_pooled(m, names) == {"conv", "biased", "g_y"}  # g_m1 is an operand, not the whole signal


@pytest.mark.parametrize("between", ["neg", "output", "second reader"])
def test_the_rule_refuses_what_it_cannot_judge(between: str) -> None:
    m = _model(between)
    assert "conv" not in max_pooled(m, ["conv", "biased"])


def test_a_tensor_read_by_a_subgraph_is_not_pooled() -> None:
    m = _model("gelu")
    branch = helper.make_graph(
        [helper.make_node("Identity", ["conv"], ["seen"])],
        "b",
        [],
        [helper.make_tensor_value_info("seen", 1, [None, K, T, 1])],
    )
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.append(helper.make_node("If", ["cond"], ["iff"], then_branch=branch, else_branch=branch))
    m.graph.output.append(helper.make_tensor_value_info("iff", TensorProto.FLOAT, [None, K, T, 1]))
    assert "conv" not in max_pooled(m, ["conv"])
    assert "g_y" in max_pooled(m, ["g_y"])


def test_pooled_rows_are_each_samples_channel_maxima() -> None:
    m = _model("gelu")
    feeds = _feeds(6)
    stats = collect(m, feeds, {"conv": 1, "flat": -1})
    sess = runtime.session(runtime.with_outputs(m, ["conv"], m.SerializeToString()))
    maps = [sess.run(["conv"], f)[0] for f in feeds]
    want = np.concatenate([a.max(axis=(2, 3)) for a in maps]).astype(np.float32)
    np.testing.assert_array_equal(stats["conv"].rows, want)
    np.testing.assert_array_equal(stats["conv"].amax, np.max([np.abs(a).max(axis=(0, 2, 3)) for a in maps], axis=0))
    assert stats["flat"].rows.shape[1] == K  # a tensor not pooled keeps its sampled positions


def _pooled_error(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    q = quantize(model, feeds, QuantizeOptions(target_cosine=None, smooth=False, layers="all")).model.model
    f_sess = runtime.session(runtime.with_outputs(model, ["pooled"], model.SerializeToString()))
    q_sess = runtime.session(runtime.with_outputs(q, ["pooled"], q.SerializeToString()), optimize=False)
    test = _feeds(8, seed=99)
    ref = np.concatenate([f_sess.run(["pooled"], f)[0] for f in test])
    got = np.concatenate([q_sess.run(["pooled"], f)[0] for f in test])
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_the_scale_keeps_the_pooled_maxima(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's output error with the pooled rows is well under the one with rows sampled at every
    position, whose best clip cuts the rare bursts the pool reads (both include the conv input's own
    rounding, the same in both)."""
    m, feeds = _model("gelu"), _feeds()
    pooled = _pooled_error(m, feeds)
    monkeypatch.setattr(calibrate_mod, "max_pooled", lambda model, names: set())
    positions = _pooled_error(m, feeds)
    assert pooled < 0.6 * positions, (pooled, positions)
