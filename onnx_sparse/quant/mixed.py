"""Automatic mixed precision: which INT8 layers fall back to float to hold a fidelity target.

The fidelity of a candidate (a set of layers left float) is measured on held-out calibration
feeds against the sparse FP32 model (:func:`output_fidelity`: the worst float output's mean
cosine). The search (:func:`fallback_search`) walks the layers most harmful first; each one is
left float, and the step is **reverted** unless it is worth the parameters it takes out of INT8
(a sparse INT8 engine's readiness is a share of parameters): it must raise the fidelity by at
least its share of what leaving every layer still INT8 float would recover, ``(1 - fidelity) *
size / sizes still INT8`` (all float is the reference itself, fidelity 1), i.e. the step must be at
least as steep, per parameter, as the straight line from where the search stands to all float. A
large layer whose step raises the fidelity by noise (PP-OCRv4 det's 138,240-parameter
``p2o.Conv.36``: +0.00001) stays INT8; a small one that matters (det's 512-parameter first conv:
+0.0255) goes float. When that walk ends short of the target, a second walk tries again the
layers it reverted only for their size, now kept float on any gain (the plain greedy rule). It
stops as soon as the target is met. The walks and their accept/revert decisions do not depend on
the target (only where they stop does), so a higher target leaves a superset of layers float: the
search is monotone in its target, and reproducible (no randomness, a fixed order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnx_sparse.core.similarity import cosine

__all__ = ["Step", "Fallback", "fallback_search", "output_fidelity"]


@dataclass(frozen=True)
class Step:
    """One layer tried: the fidelity before and with it float, the least gain that would have been
    worth its size (0: any gain), and whether it stayed float."""

    layer: str
    before: float
    after: float
    kept_float: bool
    needed: float = 0.0


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
    sizes: Mapping[str, float] | None = None,
) -> Fallback:
    """Leave layers float, most harmful first (``order``, or a callable that ranks them, called only
    when the target is missed), until ``fidelity(float set) >= target``.

    ``sizes``: each layer's parameters (what it costs the engine's readiness to leave it float;
    missing or None: 0, and any gain is worth it). A step is kept when it raises the fidelity by at
    least ``(1 - fidelity) * size / (sizes of the layers still INT8)``; then, if the target is still
    missed, the steps reverted only for that bar are tried again and kept on any gain.
    ``target`` None: nothing is tried.
    """
    start = fidelity(frozenset())
    if target is None or start >= target:
        return Fallback((), start, start, target is None or start >= target)
    if callable(order):
        order = order()
    size = {layer: float(sizes.get(layer, 0.0)) if sizes else 0.0 for layer in order}
    int8_left = sum(size.values())
    chosen: list[str] = []
    current = start
    steps: list[Step] = []
    second: list[str] = []  # steps that raised the fidelity by less than their size was worth

    def walk(layers: Sequence[str], by_size: bool) -> bool:
        """Try each layer; True once the target is met."""
        nonlocal current, int8_left
        for layer in layers:
            trial = fidelity(frozenset([*chosen, layer]))
            needed = (1.0 - current) * size[layer] / int8_left if by_size and int8_left > 0 else 0.0
            keep = trial > current and trial - current >= needed
            steps.append(Step(layer, current, trial, keep, needed))
            if keep:
                chosen.append(layer)
                current = trial
                int8_left -= size[layer]
                if current >= target:
                    return True
            elif by_size and trial > current:
                second.append(layer)
        return False

    if not walk(order, True):
        walk(second, False)
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
