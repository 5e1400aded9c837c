"""The 2:4 pruning pass: write each selected eligible weight back in the 2:4 pattern.

The pass finds the eligible sites (:mod:`onnx_sparse.graph.locate`), picks those the
caller selected, and for each stored tensor (once, however many nodes share it) asks a
*weight pruner* for the new values, then writes them through the real source: the
initializer, the ``Constant`` node, the int8/fp8 tensor behind DequantizeLinear (a pruned
entry holds the zero point, so it dequantizes to exactly 0), the fp16/bf16 tensor behind a
Cast, the tensor behind a Transpose. Tensors that already follow 2:4 are left untouched,
so pruning twice gives the same bytes. Everything else in the model stays as it was.

The default pruner is magnitude (keep the 2 largest ``|w - zero|`` per group of 4);
calibrated methods plug in their own pruner with the same signature.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from onnx_sparse.analysis import select_sites
from onnx_sparse.core import nm
from onnx_sparse.graph.locate import WeightSite, find_weight_sites
from onnx_sparse.graph.weights import read_weight, read_weight_copy, write_weight, zero_value
from onnx_sparse.io import ModelFile
from onnx_sparse.passes.base import Pass, PassResult

__all__ = ["SiteRecord", "WeightPruner", "magnitude_pruner", "PrunePass", "apply_site", "record_site", "totals"]

logger = logging.getLogger(__name__)

# (site, stored weight, zero value) -> new stored weight, 2:4 along site.axis, same dtype.
WeightPruner = Callable[[WeightSite, np.ndarray, Any], np.ndarray]


def magnitude_pruner(site: WeightSite, w: np.ndarray, zero: Any) -> np.ndarray:
    """Keep the two largest magnitudes in each group of 4 (ties: lower index)."""
    assert site.axis is not None
    return nm.prune_2_4(w, site.axis, zero=zero)


@dataclass(frozen=True)
class SiteRecord:
    """What pruning did to one stored weight (shared by ``nodes``)."""

    nodes: tuple[str, ...]
    weight: str
    op: str
    method: str
    axis: int
    shape: tuple[int, ...]
    dtype: str
    params: int
    groups: int
    groups_changed: int
    already_sparse: bool
    retained_magnitude: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def apply_site(
    site: WeightSite,
    sharers: Sequence[WeightSite],
    mf: ModelFile,
    new: np.ndarray,
    method: str,
    original: np.ndarray | None = None,
) -> SiteRecord:
    """Write ``new`` as the stored weight of ``site`` (if it differs) and describe the change."""
    assert site.axis is not None
    w = read_weight(site, mf) if original is None else original
    if new.shape != w.shape or new.dtype != w.dtype:
        raise AssertionError(f"{site.node}: pruner returned {new.dtype}{new.shape}, expected {w.dtype}{w.shape}")
    return record_site(site, sharers, mf, new, nm.prune_stats(w, new, site.axis, zero_value(site)), method)


def record_site(
    site: WeightSite, sharers: Sequence[WeightSite], mf: ModelFile, new: np.ndarray, stats: nm.PruneStats, method: str
) -> SiteRecord:
    """Write ``new`` (described by ``stats``) as the stored weight of ``site`` if it changed; its record."""
    assert site.axis is not None
    if not stats.is_2_4:
        raise AssertionError(f"{site.node}: pruner returned a weight that is not 2:4 along axis {site.axis}")
    if stats.groups_changed:
        write_weight(site, mf, new)
    return SiteRecord(
        nodes=tuple(s.node for s in sharers),
        weight=site.weight,
        op=site.op,
        method=method,
        axis=site.axis,
        shape=tuple(new.shape),
        dtype=str(new.dtype),
        params=int(new.size),
        groups=stats.groups,
        groups_changed=stats.groups_changed,
        already_sparse=stats.was_2_4,
        retained_magnitude=stats.retained_magnitude,
    )


def group_by_tensor(sites: Sequence[WeightSite]) -> list[list[WeightSite]]:
    """Sites that share one stored tensor, in graph order (a shared weight is pruned once)."""
    groups: dict[int, list[WeightSite]] = {}
    for s in sites:
        groups.setdefault(id(s.tensor), []).append(s)
    return list(groups.values())


def totals(records: Sequence[SiteRecord]) -> dict[str, Any]:
    """Totals over the records: parameters, groups changed, retained magnitude (weighted)."""
    params = sum(r.params for r in records)
    return {
        "tensors": len(records),
        "layers": sum(len(r.nodes) for r in records),
        "params": params,
        "groups": sum(r.groups for r in records),
        "groups_changed": sum(r.groups_changed for r in records),
        "retained_magnitude": (sum(r.retained_magnitude * r.params for r in records) / params) if params else 1.0,
    }


class PrunePass(Pass):
    """Prune every selected eligible weight to 2:4 (functional: the input model is not changed).

    Args:
        pruner: the weight pruner (default: magnitude, which prunes a private copy of each weight
            in place and gathers its statistics in the same pass, see
            :func:`onnx_sparse.core.nm.prune_2_4_stats`).
        method: the name recorded in the report.
        include/exclude: regular expressions on node names; ops: op types; min_channels:
            skip layers whose input or output channels are fewer (see
            :func:`onnx_sparse.analysis.select_sites`).
        workers: how many tensors to prune at once (default: CPU count). The pruner
            must then be thread-safe (magnitude is).

    Cases: eligible weight not 2:4 -> pruned; already 2:4 -> untouched (modified False);
    shared by several nodes -> pruned once; not eligible or not selected -> untouched.
    """

    in_place = False

    def __init__(
        self,
        pruner: WeightPruner | None = None,
        method: str = "magnitude",
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        ops: Sequence[str] = (),
        min_channels: int = 0,
        workers: int | None = None,
    ) -> None:
        self.pruner = pruner
        self.workers = workers or os.cpu_count() or 1
        self.method = method
        self.selection = dict(include=include, exclude=exclude, ops=ops, min_channels=min_channels)

    def selected_sites(self, mf: ModelFile) -> list[WeightSite]:
        sites = find_weight_sites(mf.model, macs=False)
        chosen = {id(s) for s in select_sites(sites, **self.selection) if s.eligible}
        # A shared tensor is pruned only if every node that uses it was selected.
        out = []
        for group in group_by_tensor([s for s in sites if s.eligible]):
            if all(id(s) in chosen for s in group):
                out.extend(group)
            elif any(id(s) in chosen for s in group):
                logger.warning(
                    "skipped %s: its weight %s is shared with unselected nodes %s",
                    ", ".join(s.node for s in group if id(s) in chosen),
                    group[0].weight,
                    ", ".join(s.node for s in group if id(s) not in chosen),
                )
        return out

    def call(self, mf: ModelFile) -> PassResult:
        groups = group_by_tensor(self.selected_sites(mf))
        spare: list[np.ndarray] = []  # read buffers no pending value holds, for the next weight
        lock = threading.Lock()

        def one(group: list[WeightSite]) -> SiteRecord:
            site = group[0]
            assert site.axis is not None
            zero = zero_value(site)
            if self.pruner is not None:
                w = read_weight(site, mf, mmap=False)
                return apply_site(site, group, mf, self.pruner(site, w, zero), self.method, original=w)
            with lock:
                scratch = spare.pop() if spare else None
            w = read_weight_copy(site, mf, scratch)
            new, stats = nm.prune_2_4_stats(w, site.axis, zero, out=w)  # in place: w is our own copy
            record = record_site(site, group, mf, new, stats, self.method)
            if scratch is None or not np.may_share_memory(w, scratch):  # read into a new array
                scratch = w.reshape(-1).view(np.uint8)
            if not stats.groups_changed or not np.may_share_memory(mf.read(site.tensor), scratch):
                with lock:  # the model keeps no view of it (its new value went elsewhere): reuse it
                    spare.append(scratch)
            return record

        # Tensors are independent and numpy releases the GIL: prune them on all cores.
        # (At most `workers` weights are in flight, so memory stays bounded.)
        workers = min(self.workers, len(groups)) or 1
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                records = list(pool.map(one, groups))
        else:
            records = [one(g) for g in groups]
        modified = any(r.groups_changed for r in records)
        t = totals(records)
        logger.info(
            "pruned %d tensors (%d layers, %d parameters): %d of %d groups changed, retained magnitude %.4f",
            t["tensors"], t["layers"], t["params"], t["groups_changed"], t["groups"], t["retained_magnitude"],
        )  # fmt: skip
        return PassResult(mf, modified, records)

    def ensures(self, result: PassResult) -> None:
        for site in self.selected_sites(result.model):
            w = read_weight(site, result.model)
            if not nm.is_2_4(w, site.axis, zero_value(site)):
                raise AssertionError(f"{site.node}: weight {site.weight} is not 2:4 after pruning")
            result.model.release(site.tensor)
