"""Write each weight-bearing node's verdict into the model, under ``onnx_sparse.`` keys.

Where the model's IR version has node ``metadata_props`` (IR >= 10), the keys go on the
node (``onnx_sparse.eligible``, ``onnx_sparse.reason``, ...). Older IR versions have no
such field, so the same keys go into the model's ``metadata_props`` as
``onnx_sparse.node.<node name>.<key>``; both survive save/load and neither changes what
the model computes, its IR version or its opsets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import onnx

from onnx_sparse.graph.locate import WeightSite, find_weight_sites
from onnx_sparse.io import ModelFile
from onnx_sparse.passes.base import Pass, PassResult

__all__ = ["PREFIX", "AnnotatePass", "site_annotations", "read_annotations", "NODE_METADATA_IR"]

logger = logging.getLogger(__name__)

PREFIX = "onnx_sparse."
NODE_METADATA_IR = 10  # NodeProto.metadata_props arrived with IR version 10 (onnx 1.16)


def site_annotations(site: WeightSite) -> dict[str, str]:
    """The verdict of one site as string key/values (without the prefix)."""
    out = {
        "eligible": "true" if site.eligible else "false",
        "weight": site.weight,
        "axis": "" if site.axis is None else str(site.axis),
        "likely_sparse_kernel": "true" if site.likely_sparse_kernel else "false",
    }
    if site.reason:
        out["reason"] = site.reason
    return out


def _set(props, key: str, value: str) -> bool:
    for p in props:
        if p.key == key:
            if p.value == value:
                return False
            p.value = value
            return True
    entry = props.add()
    entry.key, entry.value = key, value
    return True


class AnnotatePass(Pass):
    """Annotate every weight-bearing node with its eligibility (and any ``extra`` keys).

    Args:
        extra: more keys per node name (e.g. the pruning result), merged over the verdict.
    """

    in_place = False

    def __init__(self, extra: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.extra = dict(extra or {})

    def call(self, mf: ModelFile) -> PassResult:
        model = mf.model
        sites = find_weight_sites(model)
        modified = False
        on_nodes = model.ir_version >= NODE_METADATA_IR
        for site in sites:
            values = site_annotations(site) | dict(self.extra.get(site.node, {}))
            for key, value in values.items():
                if on_nodes:
                    assert site.node_proto is not None
                    modified |= _set(site.node_proto.metadata_props, PREFIX + key, value)
                else:
                    modified |= _set(model.metadata_props, f"{PREFIX}node.{site.node}.{key}", value)
        logger.debug("annotated %d nodes (%s)", len(sites), "node metadata" if on_nodes else "model metadata")
        return PassResult(mf, modified, [])


def read_annotations(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    """Existing ``onnx_sparse.`` annotations per node name (both storage forms)."""
    out: dict[str, dict[str, str]] = {}
    node_prefix = PREFIX + "node."
    for p in model.metadata_props:
        if p.key.startswith(node_prefix):
            node, _, key = p.key[len(node_prefix) :].rpartition(".")
            out.setdefault(node, {})[key] = p.value
    for site in find_weight_sites(model):
        if site.node_proto is None:
            continue
        for p in site.node_proto.metadata_props:
            if p.key.startswith(PREFIX):
                out.setdefault(site.node, {})[p.key[len(PREFIX) :]] = p.value
    return out
