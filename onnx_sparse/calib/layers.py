"""A weight-bearing layer seen as a matrix product: the bridge between the graph and the pruning math.

The pruning math (:mod:`onnx_sparse.prune`) works on ``W[rows, cols]`` (rows = outputs,
cols = inputs, groups of 4 along cols) and activation rows ``X[n, cols]``. This module maps a
traced :class:`~onnx_sparse.graph.locate.WeightSite` onto that:

* **Weights.** The matrix is derived from the *stored* tensor through the site's path
  (Identity, Cast, DequantizeLinear/QuantizeLinear, Transpose, Reshape, ...): the path is
  replayed on the stored values (float64, dequantized) and, separately, on an array of flat
  indices, so every matrix entry knows which stored element it is. Consumer views:
  MatMul ``B[C_in, K_out]`` -> ``B^T``; Gemm ``B`` -> ``B`` when ``transB=1`` else ``B^T``; Conv
  ``[K, C/g, *k]`` -> one matrix per group with columns ``kernel_position * C/g + c``
  (:func:`onnx_sparse.core.hessian.conv_weight_to_matrix`), so groups of 4 columns are 4 input
  channels at one kernel position, the axis the tracing rule chose.
* **Writing back.** Float weights take the new values, rounded to the stored dtype (fp16 and
  bf16 included; zeros stay exact). Integer weights whose path starts with a per-tensor or
  per-axis DequantizeLinear (int8 / uint8 / int16 / uint16 behind ``DQ``, the usual QDQ
  export) are *requantized* with their own scale and zero point: ``q = clip(round(w / s) +
  zp)`` (clipped to the dtype; a symmetric signed weight that never used -128 stays in
  [-127, 127]), pruned entries ``zp`` exactly, so SparseGPT's updates survive up to the
  rounding the model already had. Float weights behind a Q->DQ pair (fake quantization) store the updated
  floats; the graph's own QuantizeLinear rounds them, and 0 still maps to the zero point.
  Anything else on a quantized path (blocked quantization, fp8, a DequantizeLinear that is
  not the first op) keeps only the chosen mask: kept entries keep their stored values,
  pruned ones become the zero value.
* **Activations.** MatMul: the input reshaped to ``[-1, C_in]``; Gemm: ``A`` (``A^T`` with
  ``transA=1``); Conv: im2col rows (pads, strides, dilations, groups; ``auto_pad``
  SAME_UPPER/SAME_LOWER/VALID turned into explicit pads per input size), made in chunks of
  bounded memory. Each sample contributes at most ``max_rows`` rows, a seeded uniform
  subset, drawn identically for a pruned and a dense capture of the same sample.

Layers that do not fit (a constant Gemm ``A``, a path that is not a pure permutation of the
stored elements, ...) raise :class:`Unsupported` with the reason; callers fall back to
magnitude pruning for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_sparse.core import nm
from onnx_sparse.core.hessian import Alloc, conv_output_shape, conv_weight_to_matrix, im2col_rows, iter_im2col
from onnx_sparse.graph.locate import LOOK_THROUGH, WeightSite
from onnx_sparse.io import ModelFile, tensor_dtype

__all__ = ["Unsupported", "LayerView", "layer_view", "CHUNK_BYTES"]

#: Memory budget of one im2col chunk (float64 rows after conversion).
CHUNK_BYTES = 32 << 20

_ELEMENTWISE = ("Identity", "Cast", "DequantizeLinear", "QuantizeLinear")
_QUANT = ("DequantizeLinear", "QuantizeLinear")


class Unsupported(Exception):
    """This layer cannot be calibrated; the message says why."""


@dataclass
class LayerView:
    """One site as matrices (see the module docstring).

    Attributes:
        site: The site.
        kind: ``"conv"``, ``"matmul"`` or ``"gemm"``.
        groups: Conv groups (1 otherwise); one matrix per group.
        cols: Columns of each matrix (input features).
        rows_per_group: Rows (output channels) of each matrix.
        index: Per group, ``[rows, cols]`` flat indices into the stored tensor (a property:
            kept only for a weight behind a path of nodes, made on demand for a plain one, so
            that the views of a large model do not hold a second model's worth of indices).
        mask_only: The stored values cannot take updated weights (Q/DQ on the path).
        requant: For integer weights behind a leading DequantizeLinear: its scale and zero
            point broadcast to the stored shape, used to requantize updated weights.
        stored_shape / stored_dtype: Of the stored tensor.
    """

    site: WeightSite
    kind: str
    groups: int
    cols: int
    rows_per_group: int
    path_index: list[np.ndarray] | None
    mask_only: bool
    stored_shape: tuple[int, ...]
    stored_dtype: np.dtype
    chain: tuple[onnx.NodeProto, ...]
    side: Mapping[str, np.ndarray]
    opsets: tuple[tuple[str, int], ...] = (("", 17),)
    trans_a: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    kernel_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    requant: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def index(self) -> list[np.ndarray]:
        """Per group, ``[rows, cols]`` flat indices into the stored tensor."""
        if self.path_index is not None:
            return self.path_index
        return _index_matrices(self.kind, self.stored_shape, self.groups, self.site)

    # -------------------------------------------------------------- weights

    def consumer_values(self, stored: np.ndarray) -> np.ndarray:
        """The weight as the node sees it (float64), computed from ``stored`` along the path."""
        if not self.chain:
            return np.asarray(stored).astype(np.float64)
        out = _replay(self.chain, self.side, stored, False, self.opsets)
        return np.asarray(out).astype(np.float64)

    def matrices(self, stored: np.ndarray) -> list[np.ndarray]:
        """Per-group float64 matrices ``[rows, cols]`` of the weight stored as ``stored``."""
        flat = self.consumer_values(stored)
        return _to_matrices(self.kind, flat, self.groups, self.site)

    def to_stored(self, mats: Sequence[np.ndarray], stored: np.ndarray, zero: np.ndarray | float = 0) -> np.ndarray:
        """The new stored tensor for per-group matrices ``mats`` (see the module docstring)."""
        idx = np.concatenate([i.ravel() for i in self.index])
        vals = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in mats])
        if self.mask_only:
            keep = np.zeros(stored.size, dtype=bool)
            keep[idx] = vals != 0
            return nm.apply_keep(np.asarray(stored), keep.reshape(stored.shape), zero)
        flat = np.empty(stored.size, dtype=np.float64)
        flat[idx] = vals
        out = flat.reshape(stored.shape)
        if self.requant is not None and stored.dtype.kind in "iu":
            scale, zp = self.requant
            info = np.iinfo(stored.dtype)
            # symmetric signed weights (zero point 0) stay in [-max, max] unless they already used min
            symmetric = info.min < 0 and not np.any(zp) and np.asarray(stored).min() > info.min
            q = np.clip(np.rint(out / scale) + zp, -info.max if symmetric else info.min, info.max)
            return np.where(out == 0, zp, q).astype(stored.dtype)
        return out.astype(stored.dtype)

    # -------------------------------------------------------------- activations

    def conv_pads(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Explicit pads ``[begin..., end...]`` for an input of this spatial size."""
        n = len(self.kernel_shape)
        if self.auto_pad in ("NOTSET", ""):
            return self.pads or (0,) * (2 * n)
        if self.auto_pad == "VALID":
            return (0,) * (2 * n)
        begin, end = [], []
        for i in range(n):
            out = math.ceil(spatial[i] / self.strides[i])
            span = (self.kernel_shape[i] - 1) * self.dilations[i] + 1
            total = max(0, (out - 1) * self.strides[i] + span - spatial[i])
            small, big = total // 2, total - total // 2
            begin.append(small if self.auto_pad == "SAME_UPPER" else big)
            end.append(big if self.auto_pad == "SAME_UPPER" else small)
        return tuple(begin + end)

    def n_rows(self, x: np.ndarray) -> int:
        """How many activation rows one sample ``x`` gives (before any subsampling)."""
        if self.kind == "conv":
            self._check_conv_input(x)
            out = conv_output_shape(
                x.shape[2:], self.kernel_shape, self.strides, self.conv_pads(x.shape[2:]), self.dilations
            )
            return int(x.shape[0]) * math.prod(out)
        return int(x.size // self.cols) if self.cols else 0

    def _check_conv_input(self, x: np.ndarray) -> None:
        if (
            x.ndim != 2 + len(self.kernel_shape)
            or x.shape[1] != self.cols // math.prod(self.kernel_shape) * self.groups
        ):
            raise Unsupported(
                f"{self.site.node}: input of shape {x.shape} does not match the kernel {self.kernel_shape} "
                f"with {self.cols // math.prod(self.kernel_shape) * self.groups} channels"
            )

    def masks_rows(self, x: np.ndarray, keep: np.ndarray) -> bool:
        """Whether a padding mask ``keep`` (e.g. ``attention_mask [batch, seq]``) lines up with the rows of ``x``.

        True for MatMul/Gemm inputs whose leading dimensions are the mask's shape (``[batch,
        seq, features]``); convolutions and other layouts are never masked.
        """
        if self.kind == "conv":
            return False
        return tuple(self.fc_input(x).shape[:-1]) == tuple(np.shape(keep))

    def fc_input(self, x: np.ndarray) -> np.ndarray:
        """A MatMul/Gemm activation with its features last (``A^T`` for Gemm ``transA=1``)."""
        return x.T if (self.kind == "gemm" and self.trans_a) else x

    def rows(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        max_rows: int | None = None,
        keep: np.ndarray | None = None,
        alloc: Alloc | None = None,
        temp: Alloc | None = None,
    ) -> Iterator[list[np.ndarray]]:
        """Activation rows of one sample, in chunks, one array per group (dtype of ``x``).

        With ``keep`` (a padding mask for which :meth:`masks_rows` holds), rows where it is 0
        are left out. With ``max_rows``, a sample with more rows keeps a uniform random subset
        (drawn from ``rng``; the same ``rng`` state gives the same rows).

        A convolution's chunks are made in arrays from ``alloc`` (the caller keeps them as long
        as it holds the chunks) and its passing arrays (the whole chunk a subsample is taken from,
        the channels-last input) in ``temp``, whose array may be reused at its next call
        (:data:`~onnx_sparse.core.hessian.Alloc`; None: new arrays). The values and the layout of
        the rows are the same either way.
        """
        x = np.asarray(x)
        if self.kind != "conv":
            a = self.fc_input(x)
            if a.shape[-1] != self.cols:
                raise Unsupported(f"{self.site.node}: input of shape {x.shape} does not have {self.cols} features")
            r = a.reshape(-1, self.cols)
            if keep is not None and self.masks_rows(x, keep):
                r = r[np.asarray(keep).reshape(-1) != 0]
            pick = _row_subset(r.shape[0], rng, max_rows)
            yield [r if pick is None else r[pick]]
            return
        sel = _row_subset(self.n_rows(x), rng, max_rows)
        width = math.prod(self.kernel_shape) * (self.cols // math.prod(self.kernel_shape)) * self.groups
        chunk_rows = max(1, CHUNK_BYTES // (8 * width))
        pads = self.conv_pads(x.shape[2:])
        if sel is not None and math.prod(self.kernel_shape) > 1:
            # a subsample of a large map: gather just its rows (the same values, in the same order)
            yield from im2col_rows(
                x, self.kernel_shape, sel, self.strides, pads, self.dilations, self.groups, chunk_rows, alloc, temp
            )
            return
        offset = 0
        chunks = iter_im2col(
            x, self.kernel_shape, self.strides, pads, self.dilations, self.groups, chunk_rows,
            alloc if sel is None else temp,  # a subsample's whole chunk is only passing through
        )  # fmt: skip
        for chunk in chunks:
            n = chunk[0].shape[0]
            if sel is None:
                yield chunk
            else:
                lo, hi = np.searchsorted(sel, [offset, offset + n])
                if hi > lo:
                    local = sel[lo:hi] - offset
                    yield [_pick(c, local, alloc) for c in chunk]
            offset += n


def _pick(rows: np.ndarray, index: np.ndarray, alloc: Alloc | None) -> np.ndarray:
    """``rows[index]`` (a new C-ordered array), made in an array from ``alloc`` when given."""
    if alloc is None:
        return rows[index]
    out = alloc((index.size, rows.shape[1]), rows.dtype)
    return np.take(rows, index, axis=0, out=out, mode="clip")  # "clip": no buffered copy (indices are valid)


def _row_subset(total: int, rng: np.random.Generator | None, max_rows: int | None) -> np.ndarray | None:
    """Sorted indices of a uniform random ``max_rows`` of ``total`` rows, or None to keep them all."""
    if max_rows is None or total <= max_rows:
        return None
    if rng is None:
        rng = np.random.default_rng(0)
    return np.sort(rng.choice(total, size=max_rows, replace=False))


def _is_permutation(index: np.ndarray, size: int) -> bool:
    """Whether ``index`` holds every element index ``0..size-1`` exactly once (O(size), no sort)."""
    if index.size != size or (size and (index.min() < 0 or index.max() >= size)):
        return False
    seen = np.zeros(size, dtype=bool)
    seen[index] = True
    return bool(seen.all())


def _index_matrices(kind: str, shape: tuple[int, ...], groups: int, site: WeightSite) -> list[np.ndarray]:
    """The index matrices of a weight the node reads as stored (no path of nodes)."""
    size = math.prod(shape)
    arange = np.arange(size, dtype=np.int32 if size < 2**31 else np.int64).reshape(shape)
    return _to_matrices(kind, arange, groups, site)


def _to_matrices(kind: str, consumer: np.ndarray, groups: int, site: WeightSite) -> list[np.ndarray]:
    if kind == "conv":
        return conv_weight_to_matrix(consumer, groups)
    if consumer.ndim != 2:
        raise Unsupported(f"{site.node}: weight of rank {consumer.ndim}")
    if kind == "gemm" and int(site.attributes.get("transB", 0)):
        return [np.ascontiguousarray(consumer)]
    return [np.ascontiguousarray(consumer.T)]


def _replay(
    chain: Sequence[onnx.NodeProto],
    side: Mapping[str, np.ndarray],
    stored: np.ndarray,
    structural: bool,
    opsets: Sequence[tuple[str, int]],
) -> np.ndarray:
    """Run the weight path on ``stored`` with onnxruntime (CPU).

    ``structural`` replaces element-wise ops by Identity (for index arrays).
    """
    from onnx_sparse import runtime

    first = chain[0].input[0]
    nodes = []
    for n in chain:
        if structural and n.op_type in _ELEMENTWISE:
            nodes.append(onnx.helper.make_node("Identity", [n.input[0]], [n.output[0]]))
        else:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            nodes.append(copy)
    needed = {i for n in nodes for i in n.input if i and i != first}
    stored = np.ascontiguousarray(stored)
    graph = onnx.helper.make_graph(
        nodes,
        "weight_path",
        [onnx.helper.make_tensor_value_info(first, onnx.helper.np_dtype_to_tensor_dtype(stored.dtype), stored.shape)],
        [onnx.ValueInfoProto(name=chain[-1].output[0])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in side.items() if k in needed],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = min(model.ir_version, 10)
    sess = runtime.session(model, what="a weight's path", optimize=False)
    return np.asarray(runtime.run(sess, None, {first: stored}, where="a weight's path")[0])


def _requantizer(
    chain: Sequence[onnx.NodeProto], side: Mapping[str, np.ndarray], stored: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Scale and zero point of a leading per-tensor/per-axis DequantizeLinear, broadcast to ``stored``.

    None unless the stored tensor is 8/16-bit integer and the first op of the path (after
    Identity) is a DequantizeLinear without ``block_size``, and no other quantizing op follows.
    """
    if stored.dtype not in (np.int8, np.uint8, np.int16, np.uint16):
        return None
    ops = [n for n in chain if n.op_type != "Identity"]
    if not ops or ops[0].op_type != "DequantizeLinear" or any(n.op_type in _QUANT for n in ops[1:]):
        return None
    dq = ops[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    if int(attrs.get("block_size", 0)):
        return None
    scale = np.asarray(side[dq.input[1]], dtype=np.float64)
    zp = np.asarray(side[dq.input[2]], dtype=np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros(1)
    if scale.size > 1 or zp.size > 1:
        if scale.ndim != 1 or stored.ndim == 0:
            return None
        axis = int(attrs.get("axis", 1)) % stored.ndim
        if scale.size != stored.shape[axis] or zp.size not in (1, scale.size):
            return None
        shape = [1] * stored.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.size > 1 else zp.reshape(())
    else:
        scale, zp = scale.reshape(()), zp.reshape(())
    if not np.all(scale > 0):
        return None
    return np.broadcast_to(scale, stored.shape), np.broadcast_to(zp, stored.shape)


def _is_qdq_pair(chain: Sequence[onnx.NodeProto]) -> bool:
    """A float weight fake-quantized by QuantizeLinear -> DequantizeLinear (and nothing else quantizing)."""
    quant = [n.op_type for n in chain if n.op_type in _QUANT]
    return quant == ["QuantizeLinear", "DequantizeLinear"]


def _constant_value(mf: ModelFile, producers: Mapping[str, onnx.NodeProto], name: str) -> np.ndarray | None:
    for t in mf.model.graph.initializer:
        if t.name == name:
            return np.asarray(mf.read(t))
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return np.asarray(mf.read(a.t))
            if a.name in ("value_ints", "value_floats", "value_int", "value_float"):
                return np.asarray(onnx.helper.get_attribute_value(a))
    return None


def layer_view(
    site: WeightSite, mf: ModelFile, producers: Mapping[str, onnx.NodeProto], in_body: bool = False
) -> LayerView:
    """Build the matrix view of ``site`` (raises :class:`Unsupported` when it does not fit).

    A site inside a subgraph needs ``in_body`` (it lives in an If/Loop/Scan body whose values
    :func:`onnx_sparse.calib.capture.iter_body_values` can capture) and ``producers`` of its own
    scope (:func:`onnx_sparse.calib.capture.body_producers`); inside a function it is refused.
    """
    if site.scope and not in_body:
        raise Unsupported(f"{site.node}: inside a subgraph or function ({site.scope})")
    if site.tensor is None or site.axis is None or site.node_proto is None:
        raise Unsupported(f"{site.node}: weight not traced")
    node = site.node_proto
    attrs = site.attributes
    if site.op == "Conv":
        kind = "conv"
    elif site.op == "MatMul":
        kind = "matmul"
    elif site.op == "Gemm":
        kind = "gemm"
        if site.input_index != 1:
            raise Unsupported(f"{site.node}: the Gemm weight is its A input (activation and weight roles swap)")
    else:
        raise Unsupported(f"{site.node}: {site.op} is not calibrated")

    # The path, from the stored tensor outwards.
    chain: list[onnx.NodeProto] = []
    cur = node.input[site.input_index]
    for _ in range(32):
        if cur == site.weight:
            break
        prod = producers.get(cur)
        if prod is None or prod.op_type not in LOOK_THROUGH:
            raise Unsupported(f"{site.node}: cannot retrace the weight path at {cur!r}")
        chain.append(prod)
        cur = prod.input[0]
    else:
        raise Unsupported(f"{site.node}: weight path too long")
    chain.reverse()
    side: dict[str, np.ndarray] = {}
    for n in chain:
        for name in n.input[1:]:
            if name:
                value = _constant_value(mf, producers, name)
                if value is None:
                    raise Unsupported(f"{site.node}: {n.op_type} input {name!r} on the weight path is not a constant")
                side[name] = value

    opsets = tuple((o.domain if o.domain != "ai.onnx" else "", int(o.version)) for o in mf.model.opset_import)
    opsets = tuple(o for o in opsets if o[0] == "") or (("", 17),)
    if chain:
        stored = np.asarray(mf.read(site.tensor))
        shape, dtype = tuple(stored.shape), stored.dtype
    else:  # a weight read as stored: its view needs its shape and dtype, not its values
        shape, dtype = tuple(int(d) for d in site.tensor.dims), tensor_dtype(site.tensor)
    groups = int(attrs.get("group", 1)) if kind == "conv" else 1
    if chain:
        index_arr = np.arange(stored.size, dtype=np.int64).reshape(shape)
        try:
            consumer_index = _replay(chain, side, index_arr, True, opsets)
        except Exception as exc:  # onnxruntime raises many types
            raise Unsupported(f"{site.node}: cannot replay the weight path ({type(exc).__name__}: {exc})") from exc
        if tuple(consumer_index.shape) != tuple(site.consumer_shape):
            raise Unsupported(f"{site.node}: weight path gives {consumer_index.shape}, expected {site.consumer_shape}")
        if not _is_permutation(consumer_index.ravel(), stored.size):
            raise Unsupported(f"{site.node}: the weight path is not a permutation of the stored elements")
        index = _to_matrices(kind, consumer_index, groups, site)
        if stored.size < 2**31:  # views of every layer live for the whole pass: half the memory of int64
            index = [np.ascontiguousarray(m, dtype=np.int32) for m in index]
        del consumer_index, index_arr
    else:
        if shape != tuple(site.consumer_shape):
            raise Unsupported(f"{site.node}: weight path gives {shape}, expected {site.consumer_shape}")
        # Every output row of a plain weight has the same column layout: the view's indices (remade
        # on demand) and the sanity probe below need only one row per group, not the whole weight.
        out_axis = 0 if kind == "conv" or (kind == "gemm" and int(attrs.get("transB", 0))) else 1
        if len(shape) != 2 and kind != "conv":
            raise Unsupported(f"{site.node}: weight of rank {len(shape)}")
        shape_small = tuple(groups if a == out_axis else d for a, d in enumerate(shape))
        index = _index_matrices(kind, shape_small, groups, site)
    rows_g, cols = index[0].shape
    if not chain:
        rows_g = shape[out_axis] // groups
    if cols % nm.GROUP_SIZE:
        raise Unsupported(f"{site.node}: {cols} input features are not a multiple of 4")
    requant = _requantizer(chain, side, stored) if chain else None
    fake_quant = dtype.kind == "f" and _is_qdq_pair(chain)
    mask_only = requant is None and not fake_quant and (any(c.op_type in _QUANT for c in chain) or dtype.kind in "iu")
    view = LayerView(
        site=site,
        kind=kind,
        groups=groups,
        cols=cols,
        rows_per_group=rows_g,
        path_index=index if chain else None,  # a plain weight's indices are remade on demand
        mask_only=mask_only,
        stored_shape=shape,
        stored_dtype=dtype,
        chain=tuple(chain),
        side=side,
        opsets=opsets,
        requant=requant,
    )
    if kind == "gemm":
        view.trans_a = bool(int(attrs.get("transA", 0)))
        view.alpha = float(attrs.get("alpha", 1.0))
        view.beta = float(attrs.get("beta", 1.0))
    if kind == "conv":
        k = tuple(int(v) for v in site.consumer_shape[2:])
        dims = len(k)
        if not 1 <= dims <= 3:
            raise Unsupported(f"{site.node}: {dims}-D convolution")
        if "kernel_shape" in attrs and tuple(int(v) for v in attrs["kernel_shape"]) != k:
            raise Unsupported(f"{site.node}: kernel_shape {attrs['kernel_shape']} does not match the weight {k}")
        view.kernel_shape = k
        view.strides = tuple(int(v) for v in attrs.get("strides", (1,) * dims))
        view.dilations = tuple(int(v) for v in attrs.get("dilations", (1,) * dims))
        view.pads = tuple(int(v) for v in attrs.get("pads", (0,) * (2 * dims)))
        auto_pad = attrs.get("auto_pad", "NOTSET")
        view.auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if view.auto_pad not in ("NOTSET", "", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise Unsupported(f"{site.node}: auto_pad={view.auto_pad}")
    # Sanity: the matrix groups of 4 must be the stored axis' groups of 4 (for a plain weight, on
    # its first row per group: the other rows have the same layout).
    probe_shape = shape if chain else shape_small
    flat = np.zeros(math.prod(probe_shape))
    flat[np.concatenate([m.ravel() for m in index])] = np.concatenate(
        [np.tile([1.0, 1.0, 0.0, 0.0], m.size // 4) for m in index]
    )
    if not nm.is_2_4(flat.reshape(probe_shape), site.axis):
        raise Unsupported(f"{site.node}: the matrix columns do not follow the stored axis {site.axis}")
    return view
