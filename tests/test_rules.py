"""Tests for onnx_sparse.graph.rules: each TensorRT rule, hit (a reason) and no-op (None)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import CASE_MODELS, EXPECTED, case_path
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.graph import rules
from onnx_sparse.graph.locate import find_weight_sites

# --------------------------------------------------------------------------- reduction axis


@pytest.mark.parametrize(
    ("op", "index", "attrs", "axis"),
    [
        ("Conv", 1, {}, 1),
        ("ConvTranspose", 1, {}, 0),
        ("Gemm", 1, {}, 0),
        ("Gemm", 1, {"transB": 0}, 0),
        ("Gemm", 1, {"transB": 1}, 1),
        ("Gemm", 0, {}, 1),
        ("Gemm", 0, {"transA": 1}, 0),
        ("MatMul", 1, {}, 0),
        ("MatMul", 0, {}, None),
        ("Conv", 0, {}, None),
        ("Relu", 1, {}, None),
    ],
)
def test_reduction_axis(op: str, index: int, attrs: dict, axis: int | None) -> None:
    assert rules.reduction_axis(op, index, attrs) == axis


# --------------------------------------------------------------------------- one rule each


def test_op_rule() -> None:
    assert "ConvTranspose" in rules.op_rule("ConvTranspose")
    for op in ("Conv", "Gemm", "MatMul"):
        assert rules.op_rule(op) is None


def test_rank_rule() -> None:
    assert "rank 3" in rules.rank_rule("MatMul", 3)
    assert "rank 4" in rules.rank_rule("Gemm", 4)
    assert "rank 1" in rules.rank_rule("MatMul", 1)
    assert "rank 2" in rules.rank_rule("Conv", 2)
    assert rules.rank_rule("MatMul", 2) is None
    assert rules.rank_rule("Gemm", 2) is None
    for rank in (3, 4, 5):
        assert rules.rank_rule("Conv", rank) is None


@pytest.mark.parametrize("dtype", rules.FLOAT_DTYPES)
def test_dtype_rule_float(dtype: str) -> None:
    assert rules.dtype_rule(dtype, dequantized=False) is None
    assert rules.dtype_rule(dtype, dequantized=True) is None


@pytest.mark.parametrize("dtype", rules.QUANT_DTYPES)
def test_dtype_rule_quantized_only_behind_dequantize(dtype: str) -> None:
    assert rules.dtype_rule(dtype, dequantized=True) is None
    assert "DequantizeLinear" in rules.dtype_rule(dtype, dequantized=False)


@pytest.mark.parametrize("dtype", ["float64", "int32", "int64", "int4", "object", "bool"])
def test_dtype_rule_unsupported(dtype: str) -> None:
    reason = rules.dtype_rule(dtype, dequantized=False)
    assert reason is not None and dtype in reason and "not supported" in reason


def test_dtype_rule_uint8() -> None:
    assert "uint8" in rules.dtype_rule("uint8", dequantized=True)
    assert rules.dtype_rule("uint8", dequantized=False) is not None


def test_dtype_rule_uint8_reason_only_behind_dequantize() -> None:
    """uint8 behind a DequantizeLinear gets its own why (TensorRT's weight types); elsewhere the generic one."""
    assert "int8 or fp8 only" in rules.dtype_rule("uint8", dequantized=True)
    assert "not supported" in rules.dtype_rule("uint8", dequantized=False)
    assert "not supported" in rules.dtype_rule("int32", dequantized=True)


def test_zero_point_rule() -> None:
    assert rules.zero_point_rule(None, "int8") is None
    assert rules.zero_point_rule(np.zeros(32, np.float32), "int8") is None
    assert "non-zero zero point" in rules.zero_point_rule(np.array([0, 0, 3], np.float32), "int8")
    assert "non-zero zero point" in rules.zero_point_rule(np.array(-1, np.float32), "int8")


@pytest.mark.parametrize(
    ("op", "axis_len", "group", "reason"),
    [
        ("Conv", 16, 1, None),
        ("Conv", 8, 2, None),
        ("Conv", 1, 12, "depthwise"),
        ("Conv", 1, 2, "depthwise"),  # two channels, two groups: depthwise too
        ("Conv", 6, 1, "C=6 is not a multiple of 4"),
        ("Conv", 6, 2, "C/group=6 is not a multiple of 4"),
        ("MatMul", 10, 1, "K=10 is not a multiple of 4"),
        ("Gemm", 12, 1, None),
        ("MatMul", 4, 1, None),
    ],
)
def test_channels_rule(op: str, axis_len: int, group: int, reason: str | None) -> None:
    got = rules.channels_rule(op, axis_len, group)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_channels_rule_default_is_one_group() -> None:
    assert rules.channels_rule("Conv", 6) == "C=6 is not a multiple of 4"
    assert rules.channels_rule("Conv", 1) == "C=1 is not a multiple of 4"  # not "depthwise": one group


@pytest.mark.parametrize(
    ("cin", "cout", "likely"),
    [(256, 256, True), (512, 512, True), (288, 256, True), (255, 512, False), (512, 255, False), (64, 64, False)],
)
def test_likely_sparse_kernel(cin: int, cout: int, likely: bool) -> None:
    assert rules.likely_sparse_kernel(cin, cout) is likely
    assert rules.likely_sparse_kernel(cin, cout, int8=True) is likely
    assert rules.LIKELY_SPARSE_MIN_CHANNELS == 256


@pytest.mark.parametrize(
    ("cin", "cout", "likely"), [(4096, 4096, True), (4096, 11008, True), (1536, 384, False), (2048, 4096, False)]
)
def test_likely_sparse_kernel_fp16(cin: int, cout: int, likely: bool) -> None:
    """Not INT8 in/weight/out: the measured FP16 floor of 4096 applies."""
    assert rules.likely_sparse_kernel(cin, cout, int8=False) is likely


@pytest.mark.parametrize(
    ("elem", "zp", "reason"),
    [
        (onnx.TensorProto.INT8, None, None),
        (onnx.TensorProto.INT8, np.zeros(3, np.int8), None),
        (onnx.TensorProto.INT8, np.array([0, 1], np.int8), "zero point"),
        (onnx.TensorProto.UINT8, None, "uint8"),
        (onnx.TensorProto.FLOAT8E4M3FN, None, "float8"),
        (None, None, "unknown"),
    ],
)
def test_int8_tensor_rule(elem: int | None, zp: np.ndarray | None, reason: str | None) -> None:
    got = rules.int8_tensor_rule(elem, zp)
    assert got is None if reason is None else (got is not None and reason in got)


# --------------------------------------------------------------------------- applied in the graph


def test_every_case_model_reason_comes_from_a_rule_or_the_tracer() -> None:
    """No case model is not eligible without saying why, and the eligible ones have no reason."""
    for name in CASE_MODELS:
        sites = find_weight_sites(onnx.load(case_path(name)))
        assert len(sites) == len(EXPECTED[name])
        for s in sites:
            assert s.eligible == (s.reason == ""), (name, s.node)


def _single_mm(array: np.ndarray, through: str | None = None) -> onnx.ModelProto:
    nodes, name = [], "w"
    inits = [numpy_helper.from_array(array, "w")]
    if through == "Cast":
        nodes.append(helper.make_node("Cast", ["w"], ["wc"], name="cast", to=TensorProto.FLOAT))
        name = "wc"
    elif through == "DequantizeLinear":
        inits.append(numpy_helper.from_array(np.array(0.1, np.float32), "s"))
        nodes.append(helper.make_node("DequantizeLinear", ["w", "s"], ["wc"], name="dq"))
        name = "wc"
    nodes.append(helper.make_node("MatMul", ["x", name], ["y"], name="mm"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", array.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_int8_without_dequantize_is_not_eligible() -> None:
    q = np.ones((16, 8), np.int8)
    (s,) = find_weight_sites(_single_mm(q, through="Cast"))
    assert not s.eligible and "not dequantized by DequantizeLinear" in s.reason
    (s,) = find_weight_sites(_single_mm(q, through="DequantizeLinear"))
    assert s.eligible and s.dtype == "int8"


def test_float64_weight_is_not_eligible() -> None:
    (s,) = find_weight_sites(_single_mm(np.ones((16, 8)), through="Cast"))
    assert not s.eligible and "float64" in s.reason


def test_bfloat16_weight_is_eligible() -> None:
    import ml_dtypes

    w = np.ones((16, 8), ml_dtypes.bfloat16)
    (s,) = find_weight_sites(_single_mm(w, through="Cast"))
    assert s.eligible and s.dtype == "bfloat16"


def test_rules_apply_in_order_first_reason_wins() -> None:
    """ConvTranspose with C=6 reports the op rule, not the channel rule."""
    w = np.ones((6, 8, 2, 2), np.float32)
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    (s,) = find_weight_sites(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert "ConvTranspose" in s.reason and "multiple of 4" not in s.reason
