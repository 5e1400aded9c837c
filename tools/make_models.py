"""Build the small synthetic ONNX fixtures in ``models/`` (deterministic, byte for byte).

Each model isolates one case the weight locator and the eligibility rules must get right;
its graph ``doc_string`` states what a test should expect, and ``models/README.md`` has the
same expectations as a table. Weights are seeded random float32 (or int8/float16 where the
case needs it), never zero and never already 2:4.

Usage::

    python tools/make_models.py            # (re)write models/ and check every model
    python tools/make_models.py --out DIR  # write somewhere else (tests compare bytes)

Every model is checked with ``onnx.checker.check_model(full_check=True)`` and run in
onnxruntime (CPU) on random inputs before the script reports success.

Random numbers come from ``numpy.random.RandomState``: its stream is frozen by NumPy's
compatibility policy, so the committed files stay byte-identical across NumPy versions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MODELS", "build_all", "check_model", "run_model", "write_all"]

OPSET = 17
IR_VERSION = 8
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
FLOAT = TensorProto.FLOAT

# --------------------------------------------------------------------------- helpers


def _rng(seed: int) -> np.random.RandomState:
    return np.random.RandomState(seed)  # frozen stream: see the module docstring


def _weight(rng: np.random.RandomState, shape: Sequence[int], fan_in: int) -> np.ndarray:
    """Normal weights scaled by 1/sqrt(fan_in), float32, with no exact zeros."""
    w = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    w[w == 0] = np.float32(0.5)
    return w


def _int8_weight(rng: np.random.RandomState, shape: Sequence[int], zero_point: int = 0) -> np.ndarray:
    """int8 values in [-127, 127] (TensorRT's weight range), never 0 and never ``zero_point``."""
    q = rng.randint(1, 128, size=shape) * rng.choice([-1, 1], size=shape)
    q[q == zero_point] = -zero_point
    return q.astype(np.int8)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def _vi(name: str, elem_type: int, shape: Sequence[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def _graph(
    name: str,
    doc: str,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[TensorProto] | None = None,
    value_info: list[onnx.ValueInfoProto] | None = None,
) -> onnx.GraphProto:
    return helper.make_graph(
        nodes, name, inputs, outputs, initializer=initializers or [], doc_string=doc, value_info=value_info
    )


def _model(
    graph: onnx.GraphProto,
    *,
    ir_version: int = IR_VERSION,
    extra_opsets: dict[str, int] | None = None,
    functions: list[onnx.FunctionProto] | None = None,
) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)]
    opsets += [helper.make_opsetid(domain, v) for domain, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions or [])
    model.ir_version = ir_version
    model.producer_name = "onnx_sparse/tools/make_models.py"
    model.producer_version = "1"
    return model


def _conv(name: str, x: str, w: str, y: str, b: str | None = None, **attrs: object) -> onnx.NodeProto:
    inputs = [x, w] if b is None else [x, w, b]
    return helper.make_node("Conv", inputs, [y], name=name, **attrs)


def _matmul(name: str, a: str, b: str, y: str) -> onnx.NodeProto:
    return helper.make_node("MatMul", [a, b], [y], name=name)


def _constant(name: str, output: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], name=name, value=_init(output, array))


# --------------------------------------------------------------------------- models


def conv_bn_folded() -> onnx.ModelProto:
    """Conv + BatchNorm folded into weight/bias, Relu, then a 1x1 Conv."""
    rng = _rng(1)
    w1 = _weight(rng, (32, 16, 3, 3), 16 * 9)
    gamma = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    beta = rng.uniform(-0.1, 0.1, 32).astype(np.float32)
    mean = rng.uniform(-0.1, 0.1, 32).astype(np.float32)
    var = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    factor = (gamma / np.sqrt(var + np.float32(1e-5))).astype(np.float32)
    w1 = (w1 * factor[:, None, None, None]).astype(np.float32)
    b1 = (beta - mean * factor).astype(np.float32)
    w2 = _weight(rng, (64, 32, 1, 1), 32)
    doc = (
        "Expect: conv1 eligible, stored conv1.weight [32,16,3,3] axis 1 (C=16); "
        "conv2 eligible, stored conv2.weight [64,32,1,1] axis 1 (C=32). "
        "conv1.bias is a bias, not a weight site."
    )
    nodes = [
        _conv("conv1", "x", "conv1.weight", "conv1_out", "conv1.bias", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        _conv("conv2", "relu1_out", "conv2.weight", "y", kernel_shape=[1, 1]),
    ]
    graph = _graph(
        "conv_bn_folded",
        doc,
        nodes,
        [_vi("x", FLOAT, ["N", 16, 8, 8])],
        [_vi("y", FLOAT, ["N", 64, 8, 8])],
        [_init("conv1.weight", w1), _init("conv1.bias", b1), _init("conv2.weight", w2)],
    )
    return _model(graph)


def grouped_depthwise() -> onnx.ModelProto:
    """Grouped Conv with C/group=8, depthwise Conv, grouped Conv with C/group=6."""
    rng = _rng(2)
    doc = (
        "Expect: gconv eligible (group=2, C/group=8), stored gconv.weight [12,8,3,3] axis 1; "
        "dwconv not eligible (depthwise: group=12=C, C/group=1), stored dwconv.weight [12,1,3,3] axis 1; "
        "g6conv not eligible ('C/group=6 is not a multiple of 4'), stored g6conv.weight [16,6,3,3] axis 1."
    )
    k3 = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        _conv("gconv", "x", "gconv.weight", "gconv_out", group=2, **k3),
        _conv("dwconv", "gconv_out", "dwconv.weight", "dwconv_out", group=12, **k3),
        _conv("g6conv", "dwconv_out", "g6conv.weight", "y", group=2, **k3),
    ]
    inits = [
        _init("gconv.weight", _weight(rng, (12, 8, 3, 3), 8 * 9)),
        _init("dwconv.weight", _weight(rng, (12, 1, 3, 3), 9)),
        _init("g6conv.weight", _weight(rng, (16, 6, 3, 3), 6 * 9)),
    ]
    graph = _graph(
        "grouped_depthwise",
        doc,
        nodes,
        [_vi("x", FLOAT, ["N", 16, 8, 8])],
        [_vi("y", FLOAT, ["N", 16, 8, 8])],
        inits,
    )
    return _model(graph)


def mlp() -> onnx.ModelProto:
    """MatMul + Gemm(transB=0) + Gemm(transB=1), and a batched MatMul; the Gemms have no names."""
    rng = _rng(3)
    doc = (
        "Expect: fc0 (MatMul) eligible, stored fc0.weight [64,32] axis 0; "
        "graph.node[1] (Gemm, UNNAMED, transB=0) eligible, stored fc1.weight [32,16] axis 0; "
        "graph.node[3] (Gemm, UNNAMED, transB=1) eligible, stored fc2.weight [8,16] axis 1; "
        "bmm not eligible (batched MatMul: constant B has rank 3), stored bmm.weight [2,16,8] "
        "(reduction axis 1 if it were). The two Gemm nodes have no name: tools must generate stable names."
    )
    nodes = [
        _matmul("fc0", "x", "fc0.weight", "fc0_out"),
        helper.make_node("Gemm", ["fc0_out", "fc1.weight", "fc1.bias"], ["fc1_out"], transB=0),
        helper.make_node("Relu", ["fc1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("Gemm", ["relu1_out", "fc2.weight", "fc2.bias"], ["y"], transB=1),
        _matmul("bmm", "x3", "bmm.weight", "y3"),
    ]
    inits = [
        _init("fc0.weight", _weight(rng, (64, 32), 64)),
        _init("fc1.weight", _weight(rng, (32, 16), 32)),
        _init("fc1.bias", _weight(rng, (16,), 16)),
        _init("fc2.weight", _weight(rng, (8, 16), 16)),
        _init("fc2.bias", _weight(rng, (8,), 8)),
        _init("bmm.weight", _weight(rng, (2, 16, 8), 16)),
    ]
    graph = _graph(
        "mlp",
        doc,
        nodes,
        [_vi("x", FLOAT, ["N", 64]), _vi("x3", FLOAT, [2, "M", 16])],
        [_vi("y", FLOAT, ["N", 8]), _vi("y3", FLOAT, [2, "M", 8])],
        inits,
    )
    return _model(graph)


def gemm_const_a() -> onnx.ModelProto:
    """Gemm whose constant is input A (transA=1) while B is the graph input."""
    rng = _rng(4)
    doc = (
        "Expect: gemm_a eligible (a constant Gemm A is a fully-connected weight whose reduction axis is "
        "0 with transA=1, else 1; Polygraphy and trtexec only prune a constant B, so this is unverified on "
        "TensorRT), stored gemm_a.weight [12,8], axis 0 (K=12)."
    )
    nodes = [helper.make_node("Gemm", ["gemm_a.weight", "x"], ["y"], name="gemm_a", transA=1)]
    graph = _graph(
        "gemm_const_a",
        doc,
        nodes,
        [_vi("x", FLOAT, [12, "N"])],
        [_vi("y", FLOAT, [8, "N"])],
        [_init("gemm_a.weight", _weight(rng, (12, 8), 12))],
    )
    return _model(graph)


def shared_agree() -> onnx.ModelProto:
    """One initializer used as MatMul B by two MatMuls (same reduction axis)."""
    rng = _rng(5)
    doc = (
        "Expect: mm1 and mm2 both eligible, one stored tensor shared.weight [16,16] axis 0, "
        "pruned once (both consumers agree on the axis)."
    )
    nodes = [
        _matmul("mm1", "x", "shared.weight", "mm1_out"),
        _matmul("mm2", "mm1_out", "shared.weight", "y"),
    ]
    graph = _graph(
        "shared_agree",
        doc,
        nodes,
        [_vi("x", FLOAT, ["N", 16])],
        [_vi("y", FLOAT, ["N", 16])],
        [_init("shared.weight", _weight(rng, (16, 16), 16))],
    )
    return _model(graph)


def shared_conflict() -> onnx.ModelProto:
    """One initializer used by a MatMul (axis 0) and a Gemm transB=1 (axis 1)."""
    rng = _rng(6)
    doc = (
        "Expect: mm and gemm both NOT eligible: shared.weight [16,16] is reduced along axis 0 by mm "
        "and along axis 1 by gemm (transB=1); each reason names the other node."
    )
    nodes = [
        _matmul("mm", "x", "shared.weight", "mm_out"),
        helper.make_node("Gemm", ["mm_out", "shared.weight"], ["y"], name="gemm", transB=1),
    ]
    graph = _graph(
        "shared_conflict",
        doc,
        nodes,
        [_vi("x", FLOAT, ["N", 16])],
        [_vi("y", FLOAT, ["N", 16])],
        [_init("shared.weight", _weight(rng, (16, 16), 16))],
    )
    return _model(graph)


def _qdq_conv(seed: int, name: str, doc: str, zero_point: int) -> onnx.ModelProto:
    rng = _rng(seed)
    q = _int8_weight(rng, (32, 16, 3, 3), zero_point=zero_point)
    scale = rng.uniform(0.5, 1.5, 32).astype(np.float32) / np.float32(127 * 12)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zero_point"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x.scale", "x.zero_point"], ["x_dq"], name="x_dequant"),
        helper.make_node(
            "DequantizeLinear",
            ["conv.weight_q", "conv.weight_scale", "conv.weight_zero_point"],
            ["conv.weight_dq"],
            name="conv_weight_dequant",
            axis=0,
        ),
        _conv("conv", "x_dq", "conv.weight_dq", "y", "conv.bias", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    inits = [
        _init("x.scale", np.array(0.05, dtype=np.float32)),
        _init("x.zero_point", np.array(0, dtype=np.int8)),
        _init("conv.weight_q", q),
        _init("conv.weight_scale", scale),
        _init("conv.weight_zero_point", np.full(32, zero_point, dtype=np.int8)),
        _init("conv.bias", _weight(rng, (32,), 32)),
    ]
    graph = _graph(name, doc, nodes, [_vi("x", FLOAT, ["N", 16, 8, 8])], [_vi("y", FLOAT, ["N", 32, 8, 8])], inits)
    return _model(graph)


def qdq_conv() -> onnx.ModelProto:
    """int8 weight -> per-channel DequantizeLinear (zero point 0) -> Conv, activation Q/DQ."""
    doc = (
        "Expect: conv eligible, stored int8 conv.weight_q [32,16,3,3] (behind DequantizeLinear axis=0, "
        "zero point 0) axis 1; a pruned entry is int8 0. x_quant/x_dequant are activation Q/DQ (no weight)."
    )
    return _qdq_conv(7, "qdq_conv", doc, zero_point=0)


def qdq_conv_zp() -> onnx.ModelProto:
    """Same as qdq_conv with a nonzero int8 weight zero point."""
    doc = (
        "Expect: conv NOT eligible: conv.weight_zero_point is 3, not 0 (TensorRT accepts only "
        "symmetric quantization, zero point 0); stored int8 conv.weight_q [32,16,3,3] axis 1."
    )
    return _qdq_conv(8, "qdq_conv_zp", doc, zero_point=3)


def q_float_conv() -> onnx.ModelProto:
    """float32 weight -> QuantizeLinear -> DequantizeLinear -> Conv (fake-quantized weight)."""
    rng = _rng(9)
    w = _weight(rng, (32, 16, 3, 3), 16 * 9)
    scale = (np.abs(w).reshape(32, -1).max(axis=1) / np.float32(127)).astype(np.float32)
    doc = (
        "Expect: conv eligible, stored float32 conv.weight [32,16,3,3] axis 1, reached through "
        "QuantizeLinear(axis=0) -> DequantizeLinear(axis=0) with zero point 0."
    )
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zero_point"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x.scale", "x.zero_point"], ["x_dq"], name="x_dequant"),
        helper.make_node(
            "QuantizeLinear",
            ["conv.weight", "conv.weight_scale", "conv.weight_zero_point"],
            ["conv.weight_q"],
            name="conv_weight_quant",
            axis=0,
        ),
        helper.make_node(
            "DequantizeLinear",
            ["conv.weight_q", "conv.weight_scale", "conv.weight_zero_point"],
            ["conv.weight_dq"],
            name="conv_weight_dequant",
            axis=0,
        ),
        _conv("conv", "x_dq", "conv.weight_dq", "y", "conv.bias", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    inits = [
        _init("x.scale", np.array(0.05, dtype=np.float32)),
        _init("x.zero_point", np.array(0, dtype=np.int8)),
        _init("conv.weight", w),
        _init("conv.weight_scale", scale),
        _init("conv.weight_zero_point", np.zeros(32, dtype=np.int8)),
        _init("conv.bias", _weight(rng, (32,), 32)),
    ]
    graph = _graph(
        "q_float_conv",
        doc,
        nodes,
        [_vi("x", FLOAT, ["N", 16, 8, 8])],
        [_vi("y", FLOAT, ["N", 32, 8, 8])],
        inits,
    )
    return _model(graph)


def fp16_cast() -> onnx.ModelProto:
    """float16 initializers -> Cast(to=FLOAT) -> Conv / MatMul in an fp32 graph."""
    rng = _rng(10)
    doc = (
        "Expect: conv eligible, stored float16 conv.weight [16,8,3,3] axis 1 (through Cast); "
        "fc eligible, stored float16 fc.weight [32,16] axis 0 (through Cast)."
    )
    nodes = [
        helper.make_node("Cast", ["conv.weight"], ["conv.weight_f32"], name="conv_weight_cast", to=FLOAT),
        helper.make_node("Cast", ["conv.bias"], ["conv.bias_f32"], name="conv_bias_cast", to=FLOAT),
        _conv("conv", "x", "conv.weight_f32", "y", "conv.bias_f32", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["fc.weight"], ["fc.weight_f32"], name="fc_weight_cast", to=FLOAT),
        _matmul("fc", "v", "fc.weight_f32", "z"),
    ]
    inits = [
        _init("conv.weight", _weight(rng, (16, 8, 3, 3), 8 * 9).astype(np.float16)),
        _init("conv.bias", _weight(rng, (16,), 16).astype(np.float16)),
        _init("fc.weight", _weight(rng, (32, 16), 32).astype(np.float16)),
    ]
    for init in inits:
        assert np.all(numpy_helper.to_array(init) != 0), init.name
    graph = _graph(
        "fp16_cast",
        doc,
        nodes,
        [_vi("x", FLOAT, ["N", 8, 8, 8]), _vi("v", FLOAT, ["N", 32])],
        [_vi("y", FLOAT, ["N", 16, 8, 8]), _vi("z", FLOAT, ["N", 16])],
        inits,
    )
    return _model(graph)


def constant_nodes() -> onnx.ModelProto:
    """All weights in Constant nodes (no initializers), as in the PaddleOCR exports."""
    rng = _rng(11)
    doc = (
        "Expect: conv eligible, stored in Constant node const_conv_weight (output conv.weight) "
        "[16,8,3,3] axis 1; fc eligible, stored in Constant node const_fc_weight (output fc.weight) "
        "[16,8] axis 0. The graph has no initializers."
    )
    nodes = [
        _constant("const_conv_weight", "conv.weight", _weight(rng, (16, 8, 3, 3), 8 * 9)),
        _constant("const_conv_bias", "conv.bias", _weight(rng, (16,), 16)),
        _conv("conv", "x", "conv.weight", "conv_out", "conv.bias", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat"], name="flatten", axis=1),
        _constant("const_fc_weight", "fc.weight", _weight(rng, (16, 8), 16)),
        _matmul("fc", "flat", "fc.weight", "fc_out"),
        _constant("const_fc_bias", "fc.bias", _weight(rng, (8,), 8)),
        helper.make_node("Add", ["fc_out", "fc.bias"], ["y"], name="fc_add"),
    ]
    graph = _graph("constant_nodes", doc, nodes, [_vi("x", FLOAT, ["N", 8, 8, 8])], [_vi("y", FLOAT, ["N", 8])])
    return _model(graph)


def _stored_for(logical: np.ndarray, perm: Sequence[int]) -> np.ndarray:
    """The stored tensor S such that Transpose(S, perm) == logical (out axis a = in axis perm[a])."""
    stored = np.ascontiguousarray(logical.transpose(np.argsort(perm)))
    assert np.array_equal(stored.transpose(perm), logical)
    return stored


def transpose_120() -> onnx.ModelProto:
    """Conv1d weights reaching the Conv through non-self-inverse Transposes, and an FC through [1,0]."""
    rng = _rng(12)
    wa = _weight(rng, (8, 16, 3), 16 * 3)  # logical [K, C, R]
    wb = _weight(rng, (8, 16, 3), 16 * 3)
    wf = _weight(rng, (16, 8), 16)  # logical MatMul B [K_in, N_out]
    doc = (
        "Expect: conv_a eligible, stored conva.weight [16,3,8] (C,R,K) -> Transpose perm=[2,0,1] -> "
        "[8,16,3]; reduction axis 1 maps to stored axis perm[1]=0 (perm.index(1)=2 is wrong and has "
        "size 8, so a wrong mapping prunes silently). conv_b eligible, stored convb.weight [3,8,16] "
        "(R,K,C) -> Transpose perm=[1,2,0] -> [8,16,3]; stored axis perm[1]=2 (perm.index(1)=0 has "
        "size 3). fc eligible, stored fc.weight [8,16] -> Transpose perm=[1,0] -> [16,8]; stored axis 1."
    )
    k3 = {"kernel_shape": [3], "pads": [1, 1]}
    nodes = [
        helper.make_node("Transpose", ["conva.weight"], ["conva.weight_t"], name="conva_transpose", perm=[2, 0, 1]),
        _conv("conv_a", "x", "conva.weight_t", "conv_a_out", **k3),
        helper.make_node("Transpose", ["convb.weight"], ["convb.weight_t"], name="convb_transpose", perm=[1, 2, 0]),
        _conv("conv_b", "x", "convb.weight_t", "conv_b_out", **k3),
        helper.make_node("Add", ["conv_a_out", "conv_b_out"], ["y"], name="add"),
        helper.make_node("Transpose", ["fc.weight"], ["fc.weight_t"], name="fc_transpose", perm=[1, 0]),
        _matmul("fc", "v", "fc.weight_t", "z"),
    ]
    inits = [
        _init("conva.weight", _stored_for(wa, [2, 0, 1])),
        _init("convb.weight", _stored_for(wb, [1, 2, 0])),
        _init("fc.weight", _stored_for(wf, [1, 0])),
    ]
    graph = _graph(
        "transpose_120",
        doc,
        nodes,
        [_vi("x", FLOAT, ["N", 16, 10]), _vi("v", FLOAT, ["N", 16])],
        [_vi("y", FLOAT, ["N", 8, 10]), _vi("z", FLOAT, ["N", 8])],
        inits,
    )
    return _model(graph)


def if_subgraph() -> onnx.ModelProto:
    """An If whose branches use an outer-scope initializer and a branch-local one."""
    rng = _rng(13)
    doc = (
        "Expect: then_mm_outer and else_mm_outer eligible, both use outer-scope outer.weight [16,16] "
        "axis 0 (shared across branches, axes agree); then_mm_local eligible, stored then.weight "
        "[16,16] (then_branch initializer) axis 0; else_mm_local eligible, stored else.weight [16,16] "
        "(else_branch initializer) axis 0."
    )
    branches = {}
    for branch in ("then", "else"):
        nodes = [
            _matmul(f"{branch}_mm_outer", "x", "outer.weight", f"{branch}_h"),
            _matmul(f"{branch}_mm_local", f"{branch}_h", f"{branch}.weight", f"{branch}_out"),
        ]
        branches[branch] = helper.make_graph(
            nodes,
            f"{branch}_branch",
            [],
            [_vi(f"{branch}_out", FLOAT, ["N", 16])],
            initializer=[_init(f"{branch}.weight", _weight(rng, (16, 16), 16))],
        )
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branches["then"], else_branch=branches["else"])
    ]
    graph = _graph(
        "if_subgraph",
        doc,
        nodes,
        [_vi("cond", TensorProto.BOOL, []), _vi("x", FLOAT, ["N", 16])],
        [_vi("y", FLOAT, ["N", 16])],
        [_init("outer.weight", _weight(rng, (16, 16), 16))],
    )
    return _model(graph)


def conv_transpose() -> onnx.ModelProto:
    """ConvTranspose (reported, not eligible) followed by a Conv."""
    rng = _rng(14)
    doc = (
        "Expect: deconv (ConvTranspose) reported, NOT eligible (TensorRT sparsity covers convolution "
        "and fully-connected weights, not deconvolution), stored deconv.weight [16,8,2,2] "
        "(C_in,K/group,R,S), reduction axis 0 if it were; conv eligible, stored conv.weight "
        "[16,8,3,3] axis 1."
    )
    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["x", "deconv.weight"],
            ["deconv_out"],
            name="deconv",
            kernel_shape=[2, 2],
            strides=[2, 2],
        ),
        _conv("conv", "deconv_out", "conv.weight", "y", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    inits = [
        _init("deconv.weight", _weight(rng, (16, 8, 2, 2), 16 * 4)),
        _init("conv.weight", _weight(rng, (16, 8, 3, 3), 8 * 9)),
    ]
    graph = _graph(
        "conv_transpose",
        doc,
        nodes,
        [_vi("x", FLOAT, ["N", 16, 8, 8])],
        [_vi("y", FLOAT, ["N", 16, 16, 16])],
        inits,
    )
    return _model(graph)


def not_div4() -> onnx.ModelProto:
    """Conv with C=6 and MatMul with K=10: reduction lengths not multiples of 4."""
    rng = _rng(15)
    doc = (
        "Expect: conv NOT eligible ('C=6 is not a multiple of 4'), stored conv.weight [8,6,3,3] axis 1; "
        "fc NOT eligible ('K=10 is not a multiple of 4'), stored fc.weight [10,8] axis 0."
    )
    nodes = [
        _conv("conv", "x", "conv.weight", "y", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _matmul("fc", "v", "fc.weight", "z"),
    ]
    inits = [
        _init("conv.weight", _weight(rng, (8, 6, 3, 3), 6 * 9)),
        _init("fc.weight", _weight(rng, (10, 8), 10)),
    ]
    graph = _graph(
        "not_div4",
        doc,
        nodes,
        [_vi("x", FLOAT, ["N", 6, 8, 8]), _vi("v", FLOAT, ["N", 10])],
        [_vi("y", FLOAT, ["N", 8, 8, 8]), _vi("z", FLOAT, ["N", 8])],
        inits,
    )
    return _model(graph)


def custom_domain() -> onnx.ModelProto:
    """IR 10: com.microsoft Gelu, a model-local function, metadata, doc strings, value_info."""
    rng = _rng(16)
    doc = (
        "Expect: fc1 eligible, stored fc1.weight [16,32] axis 0; inside function local.Proj, proj_mm "
        "eligible, stored in the function's Constant node proj_const_weight (output proj.weight) "
        "[32,16] axis 0; gelu (com.microsoft) has no weight. Everything else must survive a round "
        "trip unchanged: IR version 10, opset imports ''/com.microsoft/local, model metadata_props, "
        "node doc_string and metadata_props on fc1, value_info, the function."
    )
    fc1 = _matmul("fc1", "x", "fc1.weight", "h")
    fc1.doc_string = "First projection; its weight is an initializer."
    entry = fc1.metadata_props.add()
    entry.key, entry.value = "origin", "synthetic"
    gelu = helper.make_node("Gelu", ["h"], ["g"], name="gelu", domain="com.microsoft")
    gelu.doc_string = "Contrib op that the onnxruntime CPU provider implements."
    proj = helper.make_node("Proj", ["g"], ["y"], name="proj", domain="local")
    proj.doc_string = "Calls the model-local function local.Proj."
    function = helper.make_function(
        "local",
        "Proj",
        ["inp"],
        ["out"],
        [
            _constant("proj_const_weight", "proj.weight", _weight(rng, (32, 16), 32)),
            _matmul("proj_mm", "inp", "proj.weight", "out"),
        ],
        [helper.make_opsetid("", OPSET)],
        doc_string="MatMul by a Constant-node weight [32,16].",
    )
    graph = _graph(
        "custom_domain",
        doc,
        [fc1, gelu, proj],
        [_vi("x", FLOAT, ["N", 16])],
        [_vi("y", FLOAT, ["N", 16])],
        [_init("fc1.weight", _weight(rng, (16, 32), 16))],
        value_info=[_vi("h", FLOAT, ["N", 32]), _vi("g", FLOAT, ["N", 32])],
    )
    model = _model(graph, ir_version=10, extra_opsets={"com.microsoft": 1, "local": 1}, functions=[function])
    helper.set_model_props(model, {"author": "onnx_sparse tests", "license": "Apache-2.0", "case": "custom_domain"})
    model.doc_string = "Model-level doc string that must survive."
    return model


def dynamic_shapes() -> onnx.ModelProto:
    """Transformer-style MatMul: rank-3 activation [batch, seq, 16] times a rank-2 constant."""
    rng = _rng(17)
    doc = (
        "Expect: proj eligible, stored proj.weight [16,32] axis 0 (the activation is rank 3 with "
        "symbolic batch and seq dims, the constant is rank 2: not batched)."
    )
    nodes = [
        _matmul("proj", "x", "proj.weight", "proj_out"),
        helper.make_node("Add", ["proj_out", "proj.bias"], ["y"], name="proj_add"),
    ]
    graph = _graph(
        "dynamic_shapes",
        doc,
        nodes,
        [_vi("x", FLOAT, ["batch", "seq", 16])],
        [_vi("y", FLOAT, ["batch", "seq", 32])],
        [_init("proj.weight", _weight(rng, (16, 32), 16)), _init("proj.bias", _weight(rng, (32,), 32))],
    )
    return _model(graph)


MODELS: tuple[tuple[str, Callable[[], onnx.ModelProto]], ...] = (
    ("conv_bn_folded.onnx", conv_bn_folded),
    ("grouped_depthwise.onnx", grouped_depthwise),
    ("mlp.onnx", mlp),
    ("gemm_const_a.onnx", gemm_const_a),
    ("shared_agree.onnx", shared_agree),
    ("shared_conflict.onnx", shared_conflict),
    ("qdq_conv.onnx", qdq_conv),
    ("qdq_conv_zp.onnx", qdq_conv_zp),
    ("q_float_conv.onnx", q_float_conv),
    ("fp16_cast.onnx", fp16_cast),
    ("constant_nodes.onnx", constant_nodes),
    ("transpose_120.onnx", transpose_120),
    ("if_subgraph.onnx", if_subgraph),
    ("conv_transpose.onnx", conv_transpose),
    ("not_div4.onnx", not_div4),
    ("custom_domain.onnx", custom_domain),
    ("dynamic_shapes.onnx", dynamic_shapes),
)

# --------------------------------------------------------------------------- write and check


def build_all() -> dict[str, onnx.ModelProto]:
    """Build every fixture; keys are file names."""
    return {name: build() for name, build in MODELS}


def write_all(out_dir: Path) -> list[Path]:
    """Write every fixture into ``out_dir`` and return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in build_all().items():
        path = out_dir / name
        path.write_bytes(model.SerializeToString())
        paths.append(path)
    return paths


def check_model(path: Path) -> None:
    """Full ONNX checker (with strict shape inference); raises on failure."""
    onnx.checker.check_model(onnx.load(path), full_check=True)


def _random_feed(value_info: Sequence[object], rng: np.random.RandomState, cond: bool) -> dict[str, np.ndarray]:
    feed = {}
    for inp in value_info:
        shape = [d if isinstance(d, int) else 3 for d in inp.shape]  # symbolic dims -> 3
        if inp.type == "tensor(bool)":
            feed[inp.name] = np.full(shape, cond, dtype=bool)
        elif inp.type == "tensor(float)":
            feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            raise AssertionError(f"no random data for {inp.name}: {inp.type}")
    return feed


def run_model(path: Path) -> list[np.ndarray]:
    """Run ``path`` in onnxruntime (CPU) on random inputs; bool inputs take True then False.

    Returns all outputs of all runs; raises if any output is not finite.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    conds = (True, False) if any(i.type == "tensor(bool)" for i in inputs) else (True,)
    results: list[np.ndarray] = []
    for cond in conds:
        outputs = session.run(None, _random_feed(inputs, _rng(0), cond))
        for out, info in zip(outputs, session.get_outputs(), strict=True):
            if not np.all(np.isfinite(out)):
                raise AssertionError(f"{path.name}: output {info.name} is not finite")
        results.extend(outputs)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="output directory (default: models/)")
    args = parser.parse_args(argv)
    for path in write_all(args.out):
        check_model(path)
        run_model(path)
        print(f"{path}  {path.stat().st_size:>7} bytes  ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
