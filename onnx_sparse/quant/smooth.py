"""Zero-safe outlier handling before INT8: per-channel rescaling of the tensors that get quantized.

A per-tensor INT8 scale has to cover the largest channel of the tensor; when a few channels carry
values tens or hundreds of times larger than the rest (LayerNorm outputs, GELU outputs, the
residual-stream outliers of a BERT FFN output), the other channels are left with a few levels.
Dividing the tensor by a per-channel ``v`` before it is quantized, and multiplying ``v`` back
after, evens the channels out without changing the float model:

* **Where ``x / v`` is made** (:func:`rescale`): folded into the producer when every consumer of
  the tensor can take the rescaled value: a LayerNormalization or BatchNormalization (scale and
  bias), a Conv / MatMul / Gemm output (its weight's output channels and its bias, also through
  Relu / LeakyRelu), so for an INT8 producer this is cross-layer equalisation and its INT8
  integers do not even change (per-channel scales absorb it). Otherwise an explicit ``Mul(1/v)``
  feeds only the INT8 layers.
* **Where ``v`` goes back**: into the input channels of the INT8 layers that read the tensor
  (SmoothQuant: ``W[:, c] * v_c``), and, for any other consumer of a folded producer, an explicit
  ``Mul(v)`` (the restore; a residual Add reads the exact float value again).

Every step is a diagonal rescaling: a pruned 0 stays 0, and the 2:4 mask is chosen afterwards on
the weights that will be stored.

Which ``v`` (:func:`choose`): none; SmoothQuant's ``v = max|x|^a / max|w|^(1-a)`` for a few
``a``; or output equalisation ``v = max(1, max|x_c| / c)`` for a few clip levels ``c``. Each is
scored on HELD-OUT calibration rows by the error it leaves: the activation's quantization error
weighted by how strongly the INT8 layers read each channel, plus their weights' rounding error
weighted by the channel's energy. The best wins if it beats none by :data:`MIN_GAIN`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnx_sparse.core import blas
from onnx_sparse.quant.assemble import SMOOTH_IN, SMOOTH_OUT, Int8Layer, index_graph, weight_axes
from onnx_sparse.quant.calibrate import TensorStats, choose_scale, fake_quant

__all__ = ["Rescale", "amax_seen", "choose", "rescale", "fold_target", "ALPHAS", "EQUALIZE", "MIN_GAIN", "DEAD_SHARE"]

logger = logging.getLogger(__name__)

#: SmoothQuant migration strengths tried.
ALPHAS = (0.5, 0.9)
#: Output equalisation levels tried, as quantiles of the per-channel maxima.
EQUALIZE = (0.75, 0.5)
#: A channel whose calibrated range is below this share of the tensor's median channel range counts as
#: never seen active (:func:`amax_seen`).
DEAD_SHARE = 0.01
#: A rescaling is kept only if it leaves at most this share of the unscaled error.
MIN_GAIN = 0.9
_HOMOGENEOUS = ("Relu", "LeakyRelu")
_SCALE_RATIOS = (1.0, 0.8, 0.6, 0.4)  # a coarser clip search while comparing rescalings


@dataclass(frozen=True)
class Rescale:
    """The choice for one tensor: ``v`` (None: left alone), how it was made, the held-out errors."""

    tensor: str
    v: np.ndarray | None
    how: str
    error_before: float
    error_after: float
    ndim: int = 0  # the tensor's rank as the statistics saw it (0: not known)


def _weight(inits: Mapping[str, TensorProto], name: str) -> np.ndarray:
    return numpy_helper.to_array(inits[name]).astype(np.float64)


def _in_columns(w: np.ndarray, in_axis: int) -> np.ndarray:
    """``[C_in, rest]``: the weight's values per input channel."""
    a = np.moveaxis(w, in_axis, 0)
    return a.reshape(a.shape[0], -1)


def _quant_w(w: np.ndarray, out_axis: int) -> np.ndarray:
    from onnx_sparse.prune.sparsegpt import int8_round, int8_scales  # lazy: scipy behind it, for every CLI start

    a = np.moveaxis(w, out_axis, 0)
    m = a.reshape(a.shape[0], -1)
    q = int8_round(m, int8_scales(m, ())[:, None])  # no clip: the full range (no search to run)
    return np.moveaxis(q.reshape(a.shape), 0, out_axis)


def _bcast(v: np.ndarray, axis: int, rank: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = v.size
    return v.reshape(shape)


def amax_seen(amax: np.ndarray) -> np.ndarray:
    """Per channel, the range a SmoothQuant ``v`` is computed from: the calibrated ``amax``, except that a
    channel calibration never saw active (below :data:`DEAD_SHARE` of the median range of the channels
    it did) counts as a median channel. SmoothQuant magnifies small channels (``v < 1``); from a range
    of 0 it would magnify by up to 10^4, and the first input that wakes the channel saturates the
    tensor's INT8 range (PP-OCRv4 det on a low-contrast photo: 2,500 times the range, the text map
    lost)."""
    live = amax[amax > 0]
    if not live.size:
        return np.maximum(amax, 1e-8)
    med = float(np.median(live))
    return np.where(amax < DEAD_SHARE * med, med, np.maximum(amax, 1e-8))


def choose(
    tensor: str,
    fit: TensorStats,
    held: TensorStats,
    readers: Sequence[tuple[np.ndarray, int, int]],
    producer_int8: bool,
) -> Rescale:
    """Pick ``v`` for one tensor (module docstring).

    Args:
        fit / held: Statistics on the fitting and the held-out calibration feeds.
        readers: ``(weight, out axis, in axis)`` of each INT8 layer that reads the tensor.
        producer_int8: The tensor is an INT8 layer's quantized output (equalisation candidates).
    """
    x = np.asarray(held.rows, dtype=np.float32)
    c = fit.amax.size
    energy = np.mean(x.astype(np.float64) ** 2, axis=0) if x.size else np.ones(c)
    colnorm = np.zeros(c)
    wmax = np.zeros(c)
    for w, _, in_axis in readers:
        cols = _in_columns(w, in_axis)
        colnorm += np.sum(cols**2, axis=1)
        wmax = np.maximum(wmax, np.abs(cols).max(axis=1))
    act_weight = colnorm if readers else np.ones(c)

    def error(v: np.ndarray | None) -> float:
        # v None: no rescaling; dividing or multiplying by 1 changes no value, so those steps are skipped
        if v is None:
            s = choose_scale(fit, act_weight, _SCALE_RATIOS)
            y = fake_quant(x, s)
        else:
            v32 = v.astype(np.float32)
            s = choose_scale(TensorStats(fit.axis, fit.amax / v, fit.rows / v32), act_weight * v**2, _SCALE_RATIOS)
            y = x / v32
            fake_quant(y, s, out=y)
            y *= v32
        y -= x
        d = y.astype(np.float64) if x.size else np.zeros((0, c))
        err = float(np.einsum("ij,ij,j->", d, d, act_weight))
        for w, out_axis, in_axis in readers:
            dw = _quant_w(w if v is None else w * _bcast(v, in_axis, w.ndim), out_axis)
            if v is not None:
                dw /= _bcast(v, in_axis, w.ndim)
            dw -= w
            np.square(dw, out=dw)
            err += float(np.sum(np.sum(_in_columns(dw, in_axis), axis=1) * energy)) * len(x)
        return err

    candidates: list[tuple[str, np.ndarray]] = []
    amax = np.maximum(fit.amax, 1e-8)
    if readers:
        wm = np.maximum(wmax, 1e-8)
        seen = amax_seen(fit.amax)
        for a in ALPHAS:
            v = seen**a / wm ** (1 - a)
            candidates.append((f"smooth alpha {a:g}", np.clip(v / np.exp(np.mean(np.log(v))), 1e-4, 1e4)))
    if producer_int8 or not readers:
        for qt in EQUALIZE:
            level = float(np.quantile(amax, qt))
            v = np.maximum(1.0, amax / level)
            if np.any(v > 1):
                candidates.append((f"equalize at q{qt:g}", v))
    # every candidate's error is independent of the others': side by side (numpy releases the GIL)
    base, *errors = blas.parallel_map(error, [None, *(v for _, v in candidates)])
    best = Rescale(tensor, None, "none", base, base, fit.ndim)
    for (how, v), e in zip(candidates, errors, strict=True):
        if e < best.error_after and e <= MIN_GAIN * base:
            best = Rescale(tensor, v.astype(np.float32).astype(np.float64), how, base, e, fit.ndim)
    return best


# --------------------------------------------------------------------------------------------- graph


def _set(inits: Mapping[str, TensorProto], name: str, value: np.ndarray) -> None:
    t = inits[name]
    t.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), name))


def _uses(consumers: Mapping[str, list[onnx.NodeProto]], name: str) -> int:
    return len(consumers.get(name, []))


def fold_target(
    model: onnx.ModelProto,
    tensor: str,
    axis_last: bool,
    index: tuple[Mapping[str, onnx.NodeProto], Mapping[str, list[onnx.NodeProto]], Mapping[str, TensorProto]]
    | None = None,
) -> list[tuple[str, int]] | None:
    """The constants to divide by ``v`` so that ``tensor`` comes out divided by ``v``: ``(initializer,
    axis)`` pairs, or None when the producer cannot take it. Only constants used once are changed.
    ``index``: :func:`~onnx_sparse.quant.assemble.index_graph` of ``model``, when the caller has it."""
    producers, consumers, inits = index_graph(model) if index is None else index
    node = producers.get(tensor)
    seen = 0
    while node is not None and node.op_type in _HOMOGENEOUS and seen < 4:
        if _uses(consumers, node.input[0]) != 1:
            return None
        node, seen = producers.get(node.input[0]), seen + 1
    if node is None:
        return None

    def const(name: str) -> bool:
        return name in inits and _uses(consumers, name) == 1

    def chan(name: str) -> int | None:
        # the axis of a per-channel constant: its last axis for channel-last tensors, else axis -3 (C of NCHW)
        dims = list(inits[name].dims)
        if not dims or int(np.prod(dims)) == 1:
            return None
        return len(dims) - 1 if axis_last else (len(dims) - 3 if len(dims) >= 3 else None)

    if node.op_type == "LayerNormalization" and axis_last:
        names = [i for i in node.input[1:3] if i]
        if all(const(i) and len(inits[i].dims) == 1 for i in names):
            return [(i, 0) for i in names]
        return None
    if node.op_type == "BatchNormalization" and not axis_last:
        if all(const(i) for i in node.input[1:3]):
            return [(node.input[1], 0), (node.input[2], 0)]
        return None
    bias: list[tuple[str, int]] = []
    if node.op_type == "Add":
        others = [i for i in node.input if i in inits]
        acts = [i for i in node.input if i not in inits]
        if len(others) != 1 or len(acts) != 1 or not const(others[0]) or _uses(consumers, acts[0]) != 1:
            return None
        ax = chan(others[0])
        if ax is None:
            return None
        bias = [(others[0], ax)]
        node = producers.get(acts[0])
        if node is None:
            return None
    axes = weight_axes(node) if node.op_type in ("Conv", "MatMul", "Gemm") else None
    if axes is None:
        return None
    w = node.input[axes[0]]
    if not const(w) or (node.op_type == "Conv" and _groups(node) != 1):
        return None
    out = [(w, axes[1])]
    if node.op_type == "Conv" and len(node.input) > 2 and node.input[2]:
        if not const(node.input[2]):
            return None
        out.append((node.input[2], 0))
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        return None
    return out + bias


def _groups(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)


def rescale(
    model: onnx.ModelProto,
    tensor: str,
    axis: int,
    v: np.ndarray,
    readers: Iterable[Int8Layer],
    index: tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]], dict[str, TensorProto]] | None = None,
    ndim: int = 0,
) -> str:
    """Rescale ``tensor`` by ``1/v`` for the INT8 ``readers`` (in place on ``model``); returns how.

    Args:
        axis: The channel axis of ``tensor`` (-1 or 1).
        index: :func:`~onnx_sparse.quant.assemble.index_graph` of ``model`` as it is, when the caller has it.
        ndim: The tensor's rank, which shapes the ``v`` of a ``Mul`` on it (channel axis 1 of a rank-3
            Conv1d tensor is ``[C, 1]``, of a rank-4 one ``[C, 1, 1]``); 0 (not known): rank 4.
    """
    readers = list(readers)
    producers, consumers, inits = index = index_graph(model) if index is None else index
    axis_last = axis == -1
    v = np.asarray(v, dtype=np.float64)
    # the readers take v into their input channels
    for r in readers:
        w = _weight(inits, r.weight)
        _set(inits, r.weight, w * _bcast(v, r.w_in_axis, w.ndim))
    reader_names = {r.node for r in readers}
    others = [n for n in consumers.get(tensor, []) if n.name not in reader_names]
    graph_out = tensor in {o.name for o in model.graph.output}
    fold = fold_target(model, tensor, axis_last, index)  # the names and links are still the index's
    # every name already in use, once (new names are added as they enter the graph below)
    used = _used_names(model)
    # v's shape in a Mul on the tensor: [C] for the last axis; [C, 1, ...] for axis 1, one 1 per axis after it
    v_axis, v_rank = (-1, 1) if axis_last else (0, max(1, ndim - 1) if ndim else 3)
    if fold is not None:
        for name, ax in fold:
            w = _weight(inits, name)
            _set(inits, name, w / _bcast(v, ax, w.ndim))
        if others or graph_out:  # restore v for every other consumer
            const = _fresh(used, f"{tensor}_v")
            used.add(const)
            model.graph.initializer.append(numpy_helper.from_array(_bcast(v, v_axis, v_rank).astype(np.float32), const))
            if graph_out:  # the graph output keeps its name, on the restored value
                src = _fresh(used, f"{tensor}_unrestored")
                used.add(src)
                producer = producers[tensor]
                producer.output[list(producer.output).index(tensor)] = src
                for n in readers_nodes(model, reader_names):
                    n.input[list(n.input).index(tensor)] = src
                mul = onnx.helper.make_node("Mul", [src, const], [tensor], name=_fresh(used, f"{SMOOTH_OUT}{tensor}"))
            else:
                restored = _fresh(used, f"{tensor}_restored")
                mul = onnx.helper.make_node(
                    "Mul", [tensor, const], [restored], name=_fresh(used, f"{SMOOTH_OUT}{tensor}")
                )
                for n in others:
                    for k, i in enumerate(n.input):
                        if i == tensor:
                            n.input[k] = restored
            _insert_after(model, producers.get(tensor), mul)
        return "folded into " + ", ".join(sorted({n for n, _ in fold}))
    if not readers:  # an explicit Mul would feed nobody (the tensor's own quantization sits before it)
        return "not rescaled (no INT8 reader, and the producer cannot take 1/v)"
    scaled = _fresh(used, f"{tensor}_smoothed")
    const = _fresh(used, f"{tensor}_inv_v")
    used.add(const)
    shape_v = _bcast(1.0 / v, v_axis, v_rank)
    model.graph.initializer.append(numpy_helper.from_array(shape_v.astype(np.float32), const))
    mul = onnx.helper.make_node("Mul", [tensor, const], [scaled], name=_fresh(used, f"{SMOOTH_IN}{tensor}"))
    for n in consumers.get(tensor, []):
        if n.name in reader_names:
            for k, i in enumerate(n.input):
                if i == tensor:
                    n.input[k] = scaled
    _insert_after(model, producers.get(tensor), mul)
    return "explicit Mul"


def readers_nodes(model: onnx.ModelProto, names: set[str]) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.name in names]


def _used_names(model: onnx.ModelProto) -> set[str]:
    """Every initializer, graph input, node input, output and node name of the main graph."""
    used = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    for n in model.graph.node:
        used.update(n.input)
        used.update(n.output)
        used.add(n.name)
    return used


def _fresh(used: set[str], stem: str) -> str:
    """``stem``, or ``stem_1``, ``stem_2``, ... : the first not in ``used``."""
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    return name


def _insert_after(model: onnx.ModelProto, producer: onnx.NodeProto | None, node: onnx.NodeProto) -> None:
    nodes = list(model.graph.node)
    pos = 0 if producer is None else next(i for i, n in enumerate(nodes) if n is producer) + 1
    model.graph.node.insert(pos, node)
