"""Calibrated pruning of layers inside If/Loop/Scan bodies (the part of the calibrated pass that
:class:`~onnx_sparse.calib.capture.StagedRunner`, which splits the main graph only, cannot reach).

A body layer is fitted on the activations its body really sees: the whole model runs on every
calibration sample with the layer's input exposed as an extra output of the body and of the
owning node, level by level (:func:`onnx_sparse.calib.capture.iter_body_values`): an If gives
it only for the samples that take that branch, a Loop stacks every iteration's value. Body
layers are fitted one group at a time, in the order their nodes come in the model, each after
the ones before it were written, so each sees the model as pruned so far; they are fitted
before the main graph's layers (which then see them as final), like the layers that cannot be
calibrated at all.

A layer that no calibration sample reaches (a branch the data never takes, a loop that never
runs) is pruned by magnitude, and its fit says so (the per-layer log line and the JSON
record's ``note``). Bias correction does not apply inside bodies (its edits are main-graph
nodes): those layers keep their bias, and their records say so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnx_sparse.calib.capture import body_path, iter_body_values
from onnx_sparse.calib.data import require_finite, sample_number
from onnx_sparse.calib.stats import LayerStats
from onnx_sparse.io import ModelFile
from onnx_sparse.recipe import DATA_METHODS

if TYPE_CHECKING:
    from onnx_sparse.passes.calibrated import Calibrator, LayerFit, LayerGroup

__all__ = ["NOT_REACHED", "in_body", "fit_bodies"]

logger = logging.getLogger(__name__)

NOT_REACHED = (
    "no calibration sample reaches it (an If branch the data never takes, or a loop that never runs): "
    "pruned by magnitude"
)


def in_body(group: LayerGroup) -> bool:
    """Whether a calibratable group's layers sit inside If/Loop/Scan bodies."""
    return bool(group.sites[0].scope)


def _order(mf: ModelFile, group: LayerGroup) -> tuple[int, ...]:
    """A sort key that follows the model's node order, level by level into the bodies (a group
    shared by several layers comes where its first layer does)."""
    return min(_position(mf, s.node_proto) for s in group.sites)


def _position(mf: ModelFile, node: onnx.NodeProto) -> tuple[int, ...]:
    path = body_path(mf.model, node) or []
    key: list[int] = []
    graph = mf.model.graph
    for owner, attr, k in path:
        key.append(next(i for i, n in enumerate(graph.node) if n is owner))
        a = next(a for a in owner.attribute if a.name == attr)
        graph = a.g if a.type == onnx.AttributeProto.GRAPH else a.graphs[k]
        key.append(0 if attr in ("then_branch", "body") else 1)
    key.append(next(i for i, n in enumerate(graph.node) if n is node))
    return tuple(key)


def fit_bodies(
    engine: Calibrator,
    mf: ModelFile,
    groups: Sequence[LayerGroup],
    feeds: Sequence[Mapping[str, np.ndarray]],
    dense: ModelFile | None,
    apply: Any,
) -> Iterator[LayerFit]:
    """Fit every body group (see the module docstring), calling ``apply(fit)`` before the next capture."""
    method = engine.method
    for grp in sorted(groups, key=lambda g: _order(mf, g)):
        t0 = time.perf_counter()
        acc: LayerStats | None = None
        if method in DATA_METHODS and grp.view is not None:
            acc = LayerStats(grp.key, grp.view, len(grp.sites), method, len(feeds), engine.folds, engine.max_rows,
                             engine.seed, False)  # fmt: skip
            targets = [(s.node_proto, s.activation) for s in grp.sites]
            pruned = iter_body_values(mf, feeds, targets, engine.threads)
            dense_values = (
                iter_body_values(dense, feeds, targets, engine.threads, like=mf.model)
                if method == "asym" and dense is not None
                else None
            )
            reached = 0
            for i, values in pruned:
                d = next(dense_values)[1] if dense_values is not None else None
                for m, x in enumerate(values):
                    if x is None or (d is not None and d[m] is None):
                        continue  # this sample does not take the member's branch
                    require_finite((x,) if d is None else (x, d[m]), targets[m][1], sample_number(feeds[i], i))
                    acc.update(m, i, x, None if d is None else d[m])
                    reached += 1
            if dense_values is not None:
                for _ in dense_values:
                    pass
            if not reached:
                grp.note = NOT_REACHED
                acc = None
            else:
                logger.debug("%s: captured in its body on %d sample(s)", grp.sites[0].node, reached)
        fit = engine.solve(grp, acc, mf, t0)
        apply(fit)
        yield fit
