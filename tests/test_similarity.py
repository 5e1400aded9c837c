"""core.similarity: the figures every output comparison uses, on outputs that hold inf or NaN on
purpose (masked logits) and on ones that do not."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.core.similarity import cosine, finite_pair, rel_l2
from onnx_sparse.quant import quantize


def _old_cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0 and ny == 0:
        return 1.0
    if nx == 0 or ny == 0:
        return 0.0
    return float(x @ y / (nx * ny))


finite = arrays(np.float32, st.integers(1, 40), elements=st.floats(-1e6, 1e6, width=32))


@settings(max_examples=100, deadline=None)
@given(finite, st.data())
def test_finite_outputs_get_the_same_figures_as_before(a: np.ndarray, data: st.DataObject) -> None:
    """On all-finite outputs nothing is dropped and the cosine is the same float as before the change
    (the fidelity searches' decisions, and so the written models, do not move)."""
    b = data.draw(arrays(np.float32, a.shape, elements=st.floats(-1e6, 1e6, width=32)))
    x, y, mismatched = finite_pair(a, b)
    assert mismatched == 0 and x.size == a.size
    assert cosine(a, b) == _old_cosine(a, b)


def test_masked_logits_agree_and_a_one_sided_inf_or_nan_is_the_farthest() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10))
    ref[:, 7:] = -np.inf  # masked classes, in both models
    cand = ref + 0.01 * rng.standard_normal(ref.shape)
    x, y, mismatched = finite_pair(ref, cand)
    assert mismatched == 0 and x.size == 28
    assert 0.99 < cosine(ref, cand) < 1.0 and math.isfinite(rel_l2(ref, cand))
    both_nan = ref.copy()
    both_nan[0, 0] = np.nan
    assert finite_pair(both_nan, both_nan.copy())[2] == 0
    one_sided = cand.copy()
    one_sided[1, 2] = np.nan
    assert finite_pair(ref, one_sided)[2] == 1
    assert cosine(ref, one_sided) == -1.0 and rel_l2(ref, one_sided) == math.inf
    flipped = cand.copy()
    flipped[0, 8] = np.inf  # +inf where the reference is -inf
    assert cosine(ref, flipped) == -1.0


def test_the_int8_search_reads_a_masked_output() -> None:
    """A model whose output carries an additive -inf mask: the INT8 fidelity was NaN (the search could
    compare nothing: 'nan ..., NOT met'); now it is the cosine over the unmasked elements."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "w2")
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["z"], name="mm2"),
            helper.make_node("Add", ["z", "mask"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])],
        [w1, w2],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    mask = np.zeros((8, 64), np.float32)
    mask[:, 50:] = -np.inf
    feeds = [{"x": rng.normal(size=(8, 64)).astype(np.float32), "mask": mask} for _ in range(12)]
    result = quantize(model, feeds)
    assert result.fallback is not None
    assert 0.99 < result.fallback.start <= 1.0 and result.fallback.met
    onnx.checker.check_model(result.model.model)


@pytest.mark.parametrize("zeros", [(0, 0), (1, 0)])
def test_zero_outputs_keep_their_meaning(zeros: tuple[int, int]) -> None:
    a, b = np.full(5, float(zeros[0])), np.full(5, float(zeros[1]))
    assert cosine(a, b) == (1.0 if zeros == (0, 0) else 0.0)
    assert rel_l2(b, a) == (0.0 if zeros == (0, 0) else math.inf)
