"""Automatic mixed precision: which INT8 layers fall back to float to hold a fidelity target.

The fidelity of a candidate (a set of layers left float) is measured on held-out calibration
feeds against the sparse FP32 model (:func:`output_fidelity`: the worst float output's mean
cosine). The search (:func:`fallback_search`) walks the layers most harmful first; each one is
left float, and the step is **reverted** when it did not raise the fidelity; it stops as soon as
the target is met. The walk and its accept/revert decisions do not depend on the target (only
where it stops does), so a higher target leaves a superset of layers float: the search is
monotone in its target, and reproducible (no randomness, a fixed order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnx_sparse.core.similarity import cosine

__all__ = ["Step", "Fallback", "fallback_search", "output_fidelity"]


@dataclass(frozen=True)
class Step:
    """One layer tried: the fidelity before and with it float, and whether it stayed float."""

    layer: str
    before: float
    after: float
    kept_float: bool


@dataclass(frozen=True)
class Fallback:
    """The search's outcome: the layers left float (in the order they were), the fidelity with
    every layer INT8 and at the end, whether the target was met, and every step tried."""

    float_layers: tuple[str, ...]
    start: float
    end: float
    met: bool
    steps: tuple[Step, ...] = field(default=())


def fallback_search(
    order: Sequence[str] | Callable[[], Sequence[str]],
    fidelity: Callable[[frozenset[str]], float],
    target: float | None,
) -> Fallback:
    """Leave layers float, most harmful first (``order``, or a callable that ranks them, called only
    when the target is missed), until ``fidelity(float set) >= target``.

    A step that does not raise the fidelity is reverted. ``target`` None: nothing is tried.
    """
    start = fidelity(frozenset())
    if target is None or start >= target:
        return Fallback((), start, start, target is None or start >= target)
    if callable(order):
        order = order()
    chosen: list[str] = []
    current = start
    steps = []
    for layer in order:
        trial = fidelity(frozenset([*chosen, layer]))
        keep = trial > current
        steps.append(Step(layer, current, trial, keep))
        if keep:
            chosen.append(layer)
            current = trial
            if current >= target:
                break
    return Fallback(tuple(chosen), start, current, current >= target, tuple(steps))


def output_fidelity(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> float:
    """The worst float output's cosine to the reference, each output's per-feed cosines averaged
    (lists of outputs per feed, in the same order); 1.0 when no output is float."""
    per_output: dict[int, list[float]] = {}
    for ref, got in zip(reference, candidate, strict=True):
        for j, (r, g) in enumerate(zip(ref, got, strict=True)):
            if np.asarray(r).dtype.kind == "f":
                per_output.setdefault(j, []).append(cosine(r, g))
    return min((float(np.mean(v)) for v in per_output.values()), default=1.0)
