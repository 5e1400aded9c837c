"""Where a pruned layer's bias lives, and how to shift it (or add one) in the graph.

Bias correction and the softmax-head refit both end in "add this vector to the output of
that node". The vector is in the units of ``x @ W^T`` (before Gemm's ``alpha``); this module
finds the bias the node already has and adds to it, or adds a bias where there is none:

* Conv / Gemm with a constant ``C`` (or ``B`` for Conv): the constant is updated in place.
* Conv / Gemm without one: a new initializer becomes the node's third input.
* MatMul read by exactly one ``Add`` of a constant: that constant is updated.
* Any other MatMul: its output is renamed and a new ``Add`` of a new constant produces the
  old name, so every reader sees the shifted value.

A bias that is computed at run time, shared with other nodes, a graph output, quantized, or
not one value per output channel is left alone and the reason is returned.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_sparse.calib.capture import StagedRunner
from onnx_sparse.calib.layers import LayerView
from onnx_sparse.graph.locate import WeightSite
from onnx_sparse.graph.weights import stored_value, write_value
from onnx_sparse.io import ModelFile
from onnx_sparse.passes.base import unique_name

__all__ = ["constant_tensor", "matmul_bias_add", "shift_bias"]


def _readers(runner: StagedRunner, name: str) -> list[onnx.NodeProto]:
    return [n for n in runner.nodes if name in n.input]


def constant_tensor(runner: StagedRunner, name: str) -> onnx.TensorProto | None:
    """The tensor behind ``name`` when it is an initializer or a ``Constant`` node's value."""
    if name in runner.initializers:
        return runner.initializers[name]
    node = runner.producers.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                return a.t
    return None


def _graph_outputs(mf: ModelFile) -> set[str]:
    return {o.name for o in mf.model.graph.output}


def matmul_bias_add(runner: StagedRunner, mf: ModelFile, node: onnx.NodeProto) -> tuple[onnx.NodeProto, str] | None:
    """The ``Add`` that adds a constant to a MatMul's output (its only reader), and the constant's name."""
    out = node.output[0]
    readers = _readers(runner, out)
    if len(readers) != 1 or readers[0].op_type != "Add" or out in _graph_outputs(mf):
        return None
    add = readers[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    if other == out or constant_tensor(runner, other) is None:
        return None
    return add, other


def _update_bias(
    runner: StagedRunner, mf: ModelFile, name: str, shift: np.ndarray, reader: onnx.NodeProto, where: str
) -> str:
    """Add ``shift`` to the constant bias ``name``; returns "" or why it could not."""
    t = constant_tensor(runner, name)
    if t is None:
        return f"{where}: bias {name!r} is computed at run time"
    if len(_readers(runner, name)) != 1 or name in _graph_outputs(mf):
        return f"{where}: bias {name!r} is shared with other nodes"
    b = np.asarray(mf.read(t))
    if b.dtype.kind != "f" and b.dtype.name != "bfloat16":
        return f"{where}: bias {name!r} is {b.dtype} (quantized biases are not corrected)"
    if b.size != shift.size or (b.ndim > 0 and b.shape[-1] != shift.size):
        return f"{where}: bias {name!r} of shape {b.shape} is not one value per output channel ({shift.size})"
    new = (b.astype(np.float64) + shift.reshape(b.shape)).astype(b.dtype)
    write_value(mf, t, new)
    return ""


def shift_bias(
    site: WeightSite, view: LayerView, shift: np.ndarray, runner: StagedRunner, mf: ModelFile, dtype: np.dtype
) -> str:
    """Add ``shift`` (units of ``x @ W^T``, one value per output channel) to ``site``'s output.

    ``dtype`` is the type of a new bias tensor. Returns "" when done, else why not.
    """
    node = site.node_proto
    assert node is not None
    if site.op == "Gemm":
        if view.beta == 0:
            return f"{site.node}: Gemm beta=0 ignores C"
        shift = shift * view.alpha / view.beta
    used = runner.names()
    if site.op in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        return _update_bias(runner, mf, node.input[2], shift, node, site.node)
    if site.op in ("Conv", "Gemm"):
        name = unique_name(used, f"{site.weight}.bias_correction")
        runner.set_initializer(name, stored_value(shift.astype(dtype)))
        while len(node.input) < 2:
            node.input.append("")
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
        runner.node_changed(node)
        return ""
    found = matmul_bias_add(runner, mf, node)
    if found is not None:
        add, other = found
        return _update_bias(runner, mf, other, shift, add, site.node)
    out = node.output[0]
    pre = unique_name(used, f"{out}_before_bias")
    bname = unique_name(used, f"{site.weight}.bias_correction")
    node.output[0] = pre
    runner.node_changed(node)
    add_node = onnx.helper.make_node("Add", [pre, bname], [out], name=unique_name(used, f"{site.node}/bias_correction"))
    runner.set_initializer(bname, stored_value(shift.astype(dtype)))
    runner.insert_after(node, add_node)
    return ""
