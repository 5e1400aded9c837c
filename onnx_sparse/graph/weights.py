"""Read and write a site's stored weight through its real source.

The stored tensor is whatever :func:`~onnx_sparse.graph.locate.find_weight_sites` traced
(an initializer, an outer-scope initializer or a ``Constant`` node's value), in its stored
dtype (float32/float16/bfloat16, int8/fp8 behind DequantizeLinear). The "zero" of a
quantized tensor is its zero point: the value a pruned entry must hold to dequantize to 0.

Every value a pass computes and stores (pruned and refitted weights, corrected or new biases)
goes through :func:`stored_value`: float32 subnormals become zeros
(:mod:`onnx_sparse.core.subnormal`); tensors a pass does not rewrite are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BufferedReader
from typing import cast

import numpy as np
from onnx import TensorProto

from onnx_sparse.core import nm
from onnx_sparse.core.subnormal import flush_subnormals
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.external import PACKED_4BIT, open_data, tensor_dtype
from onnx_sparse.graph.locate import WeightSite
from onnx_sparse.io import ModelFile

__all__ = [
    "require_finite_weight",
    "WeightStats",
    "zero_value",
    "read_weight",
    "read_weight_copy",
    "stored_value",
    "write_value",
    "write_weight",
    "weight_stats",
]


@dataclass(frozen=True)
class WeightStats:
    """The 2:4 state of a stored weight."""

    sparse_2of4: bool
    violating_fraction: float
    zero_fraction: float


def zero_value(site: WeightSite) -> np.ndarray | float:
    """The stored value that dequantizes to 0: the zero point for a direct DequantizeLinear, else 0."""
    q = site.quant
    if q is not None and q.direct and q.zero_point is not None and q.zero_point.size == 1:
        return q.zero_point.reshape(())
    return 0


def read_weight(site: WeightSite, mf: ModelFile, mmap: bool = True) -> np.ndarray:
    """The stored weight of ``site`` (read-only; memory-mapped when external)."""
    assert site.tensor is not None, f"{site.node}: no stored weight"
    return mf.read(site.tensor, mmap=mmap)


def read_weight_copy(site: WeightSite, mf: ModelFile, scratch: np.ndarray | None = None) -> np.ndarray:
    """A private, writable copy of the stored weight of ``site`` (to prune in place).

    External data is read with plain reads from the file checked at load, never through a
    memory map (a data file cut short while mapped would kill the process instead of failing
    cleanly). With ``scratch`` (a flat uint8 array at least as large) the copy is a view of its
    first bytes, so a buffer reused from weight to weight costs no fresh memory; otherwise it is
    a new array. Pending new values and inline tensors are copied from memory.
    """
    t = site.tensor
    assert t is not None, f"{site.node}: no stored weight"
    dtype, shape = tensor_dtype(t), tuple(int(d) for d in t.dims)
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if scratch is not None and scratch.nbytes >= nbytes:
        out = scratch[:nbytes].view(dtype).reshape(shape)
    else:
        out = np.empty(shape, dtype)
    if t.data_location != TensorProto.EXTERNAL or t.data_type in PACKED_4BIT or id(t) in mf.pending or not nbytes:
        np.copyto(out, mf.read(t, mmap=False))
        return out
    ref = mf.ref(t)  # checked against the file checked at load
    view = out.reshape(-1).view(np.uint8).data
    with open_data(ref, t.name) as f:
        f.seek(ref.offset)
        reader = cast(BufferedReader, f)  # open_data opens in binary mode, buffered
        done = 0
        while done < nbytes:
            got = reader.readinto(view[done:])
            if not got:
                raise OnnxSparseError(f"external data file {ref.file} ended early (changed while reading?)")
            done += got
    return out


def stored_value(value: np.ndarray) -> np.ndarray:
    """What a pass stores for a value it computed: float32 subnormals flushed to zero.

    Normal numbers, zeros, infinities and NaNs keep their bits; ``value`` itself comes back when
    there is nothing to flush. A subnormal weight contributes less than 1.2e-38 times its input
    to any output but slows every CPU multiply that reads it (in our capture and in the user's
    runs of the output), so none is written.
    """
    return flush_subnormals(value)


def write_value(mf: ModelFile, t: TensorProto, value: np.ndarray) -> None:
    """Replace the value of the stored tensor ``t`` with ``value`` as a pass stores it (:func:`stored_value`)."""
    mf.write(t, stored_value(value))


def write_weight(site: WeightSite, mf: ModelFile, value: np.ndarray) -> None:
    """Replace the stored weight of ``site`` in its model ``mf`` (:func:`write_value`)."""
    assert site.tensor is not None, f"{site.node}: no stored weight"
    write_value(mf, site.tensor, value)


def weight_stats(site: WeightSite, mf: ModelFile) -> WeightStats | None:
    """2:4 statistics along the site's axis, or None when the axis cannot hold groups of 4."""
    if site.tensor is None or site.axis is None or not site.shape or site.shape[site.axis] % nm.GROUP_SIZE:
        return None
    w = read_weight(site, mf)
    zero = zero_value(site)
    counts = nm.nonzero_per_group(w, site.axis, zero)
    violating = float(np.mean(counts > nm.KEEP)) if counts.size else 0.0
    zeros = 1.0 - float(counts.sum(dtype=np.int64)) / max(w.size, 1)
    return WeightStats(sparse_2of4=violating == 0.0, violating_fraction=violating, zero_fraction=zeros)


def require_finite_weight(w: np.ndarray, name: str, why: str) -> None:
    """Refuse a stored weight holding inf or NaN where ``why`` needs its values (a calibrated refit spreads
    a NaN along the rows it corrects; an INT8 scale from it is NaN).

    Raises:
        OnnxSparseError: naming the weight.
    """
    if w.dtype.kind == "f" and w.size and not np.all(np.isfinite(w)):
        bad = int(np.count_nonzero(~np.isfinite(w)))
        raise OnnxSparseError(
            f"weight {name!r} holds {bad} inf or NaN value(s): {why} needs finite weights",
            hint="check the model's export: a weight with inf or NaN makes every output it reaches inf or NaN",
        )
