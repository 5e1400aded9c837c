"""Tests for onnx_sparse.quant.mixed: the fallback search is reproducible and monotone in its target."""

from __future__ import annotations

import numpy as np
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


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 0.05), min_size=1, max_size=7),
    st.floats(0, 0.05),
    st.lists(st.floats(0.8, 1.0), min_size=2, max_size=6),
)
def test_monotone_and_reproducible_in_the_target(harms: list[float], bonus: float, targets: list[float]) -> None:
    """A higher target leaves a superset of layers float (and the same target, the same set)."""
    names = [f"l{i}" for i in range(len(harms))]
    harm = dict(zip(names, harms, strict=True))
    order = sorted(names, key=lambda n: -harm[n])
    pair = (names[0], names[-1])
    results = {}
    for t in sorted(targets):
        out = fallback_search(order, _fidelity(harm, pair, bonus), t)
        again = fallback_search(order, _fidelity(harm, pair, bonus), t)
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
