"""Tests for onnx_sparse.quant.mixed: the fallback search is reproducible and monotone in its target, and
leaves a layer float only when its gain is worth its parameters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_sparse.quant.mixed import fallback_search, output_fidelity


def _fidelity(harm: dict[str, float], pair: tuple[str, str] | None = None, bonus: float = 0.0):
    """A made-up model: each INT8 layer costs ``harm`` (not additive: a pair interacts)."""

    def f(float_layers: frozenset[str]) -> float:
        lost = sum(h for k, h in harm.items() if k not in float_layers)
        if pair and not (set(pair) & float_layers):
            lost += bonus
        return 1.0 - lost

    return f


def test_most_harmful_first_until_the_target_holds() -> None:
    harm = {"a": 0.02, "b": 0.005, "c": 0.001}
    out = fallback_search(["a", "b", "c"], _fidelity(harm), 0.99)
    assert out.float_layers == ("a",) and out.met and out.end == 1 - 0.006
    assert fallback_search(["a", "b", "c"], _fidelity(harm), 0.5).float_layers == ()
    assert fallback_search(["a", "b", "c"], _fidelity(harm), None).float_layers == ()


def test_a_step_that_does_not_help_is_reverted() -> None:
    harm = {"a": 0.02, "useless": 0.0, "b": 0.01}
    out = fallback_search(["useless", "a", "b"], _fidelity(harm), 0.999)
    assert out.float_layers == ("a", "b")
    assert [s.kept_float for s in out.steps] == [False, True, True]


def test_an_unreachable_target_is_reported_not_met() -> None:
    out = fallback_search(["a"], lambda s: 0.5 + 0.1 * len(s), 0.9)
    assert not out.met and out.float_layers == ("a",) and out.end == 0.6


def test_the_ranking_is_asked_for_only_when_the_target_is_missed() -> None:
    calls = []

    def ranking() -> list[str]:
        calls.append(1)
        return ["a"]

    fallback_search(ranking, _fidelity({"a": 0.001}), 0.99)
    assert calls == []
    fallback_search(ranking, _fidelity({"a": 0.1}), 0.99)
    assert calls == [1]


def test_a_big_layer_whose_gain_is_noise_stays_int8() -> None:
    """PP-OCRv4 det's case: the ranking puts a large layer first whose step raises the fidelity by
    noise (+0.00001 for 12.6% of the parameters); the plain greedy rule kept it float (any gain),
    the size rule does not, and the small harmful layer after it meets the target alone."""
    harm = {"big": 0.00001, "small": 0.0255, "rest": 0.003}
    sizes = {"big": 138_240, "small": 512, "rest": 960_576}
    order = ["big", "small", "rest"]
    plain = fallback_search(order, _fidelity(harm), 0.99)
    assert plain.float_layers == ("big", "small")  # what the search did before sizes were known
    out = fallback_search(order, _fidelity(harm), 0.99, sizes)
    assert out.float_layers == ("small",) and out.met
    big = out.steps[0]
    assert not big.kept_float and big.after > big.before
    assert big.needed == pytest.approx((1 - big.before) * 138_240 / sum(sizes.values()))
    # the bar follows the layers still INT8: the second step's is measured from where the first left it
    assert out.steps[1].needed == pytest.approx((1 - big.before) * 512 / sum(sizes.values()))


def test_layers_reverted_for_their_size_are_tried_again_when_the_target_is_missed() -> None:
    """Most of the loss needs two big layers float together, so neither step alone is worth its
    size (+0.0005 each for 45% of the parameters) and the first walk ends short of the target with
    only the small layer float; the second keeps the two reverted ones on any gain, in order."""

    def f(float_layers: frozenset[str]) -> float:
        int8 = {"a", "b", "c", "useless"} - float_layers
        return 1.0 - 0.01 * bool(int8 & {"a", "b"}) - 0.0005 * len(int8 & {"a", "b"}) - 0.001 * ("c" in int8)

    sizes = {"a": 45.0, "b": 45.0, "c": 5.0, "useless": 5.0}
    out = fallback_search(["a", "b", "useless", "c"], f, 0.999, sizes)
    first = out.steps[:4]
    assert [(s.layer, s.kept_float) for s in first] == [("a", False), ("b", False), ("useless", False), ("c", True)]
    assert first[0].after > first[0].before and first[0].after - first[0].before < first[0].needed
    assert [(s.layer, s.kept_float, s.needed) for s in out.steps[4:]] == [("a", True, 0.0), ("b", True, 0.0)]
    assert out.float_layers == ("c", "a", "b") and out.met  # "useless" raised nothing: not tried again
    assert fallback_search(["a", "b", "useless", "c"], f, 0.989, sizes).float_layers == ("c",)


def test_without_sizes_every_gain_counts() -> None:
    harm = {"a": 0.00001, "b": 0.02}
    assert fallback_search(["a", "b"], _fidelity(harm), 0.99).float_layers == ("a", "b")
    assert fallback_search(["a", "b"], _fidelity(harm), 0.99, {"a": 1.0, "b": 1.0}).float_layers == ("b",)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 0.05), min_size=1, max_size=7),
    st.floats(0, 0.05),
    st.lists(st.floats(0.8, 1.0), min_size=2, max_size=6),
    st.lists(st.integers(1, 200_000), min_size=1, max_size=7),
)
def test_monotone_and_reproducible_in_the_target(
    harms: list[float], bonus: float, targets: list[float], sizes: list[int]
) -> None:
    """A higher target leaves a superset of layers float (and the same target, the same set), with
    and without the layers' sizes."""
    names = [f"l{i}" for i in range(len(harms))]
    harm = dict(zip(names, harms, strict=True))
    size = {n: float(sizes[i % len(sizes)]) for i, n in enumerate(names)}
    order = sorted(names, key=lambda n: -harm[n])
    pair = (names[0], names[-1])
    for by_size in (None, size):
        _nested(order, _fidelity(harm, pair, bonus), targets, by_size)


def _nested(order: list[str], f, targets: list[float], sizes: dict[str, float] | None) -> None:
    results = {}
    for t in sorted(targets):
        out = fallback_search(order, f, t, sizes)
        again = fallback_search(order, f, t, sizes)
        assert out == again
        results[t] = set(out.float_layers)
    ts = sorted(results)
    for lo, hi in zip(ts, ts[1:], strict=False):
        assert results[lo] <= results[hi]


def test_output_fidelity_is_the_worst_float_output() -> None:
    a = np.array([[1.0, 0.0]])
    ref = [[a, a, np.array([1, 2])]]
    got = [[a, np.array([[1.0, 1.0]]), np.array([3, 4])]]
    assert output_fidelity(ref, got) == np.float64(1 / np.sqrt(2))
    assert output_fidelity(ref, ref) == 1.0
