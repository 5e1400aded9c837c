"""The INT8 rounding of chosen tensors, applied while calibrating (``prune --int8``'s fit on what a layer will see).

A layer of the sparse INT8 model reads its input through an INT8 ``QuantizeLinear -> DequantizeLinear``
pair, and every layer upstream of it has its output rounded the same way. :class:`FakeQuant` says which
tensors are rounded, with which scale and for which readers; the staged capture
(:class:`~onnx_sparse.calib.capture.StagedRunner`) then computes every piece with those roundings in
place, and the calibration rounds each layer's own input (:meth:`FakeQuant.apply`) before gathering
its statistics, so a layer's refit and bias correction answer the pruning *and* the quantization
error of everything upstream, and its own input rounding.

Both roundings are the same float32 arithmetic, ``round_half_even(x * (1/s))`` clipped to
``[-128, 127]`` then times ``s`` (onnx ``Mul``, ``Round``, ``Clip``, ``Mul`` in the pieces; numpy here),
so they agree bit for bit. ``s`` is one scale per tensor, or one per channel where an outlier
rescaling is applied after the prune (a rescaled tensor ``x / v`` rounded with scale ``s`` is ``x``
rounded with ``s * v`` per channel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["QuantPoint", "FakeQuant"]

_PREFIX = "onnx_sparse_fq/"


@dataclass(frozen=True)
class QuantPoint:
    """One rounded tensor.

    Attributes:
        scale: float32 scale, a scalar or one per channel along ``axis``.
        axis: The channel axis of the tensor; ``ndim`` its rank (needed for a per-channel scale).
        readers: Names of the nodes that read the rounded value (None: every reader).
    """

    scale: np.ndarray
    axis: int
    ndim: int
    readers: frozenset[str] | None

    def _shaped(self, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value, dtype=np.float32)
        if value.ndim == 0:
            return value
        shape = [1] * self.ndim
        shape[self.axis % self.ndim] = value.size
        return value.reshape(shape)

    @property
    def inverse(self) -> np.ndarray:
        """``1/s`` in float32, as both roundings multiply by it."""
        return self._shaped((1.0 / np.asarray(self.scale, dtype=np.float64)).astype(np.float32))

    @property
    def multiplier(self) -> np.ndarray:
        return self._shaped(self.scale)


@dataclass(frozen=True)
class FakeQuant:
    """Tensors rounded to INT8 while calibrating (see the module docstring)."""

    points: Mapping[str, QuantPoint]

    def reads(self, node: str, tensor: str) -> bool:
        """Whether ``node`` reads ``tensor`` rounded."""
        p = self.points.get(tensor)
        return p is not None and (p.readers is None or node in p.readers)

    def apply(self, tensor: str, x: np.ndarray) -> np.ndarray:
        """``x`` (a value of ``tensor``) rounded as its readers see it (a new array)."""
        p = self.points[tensor]
        if x.dtype != np.float32 or (p.scale.ndim and x.ndim != p.ndim):
            return x  # not the tensor the scale was chosen for (a dtype or layout it does not follow)
        q = np.rint(x * p.inverse)
        np.clip(q, -128.0, 127.0, out=q)
        q *= p.multiplier
        return q

    def rewrite(
        self, nodes: Sequence[onnx.NodeProto], used: set[str]
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """``nodes`` (copies, in order) with each rounded tensor's readers reading its rounded value,
        computed right before its first reader; and the constants that needs. ``used``: names taken."""
        out: list[onnx.NodeProto] = []
        consts: list[onnx.TensorProto] = []
        made: dict[str, str] = {}

        def fresh(stem: str) -> str:
            name, k = _PREFIX + stem, 0
            while name in used:
                k += 1
                name = f"{_PREFIX}{stem}_{k}"
            used.add(name)
            return name

        for node in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            for k, name in enumerate(copy.input):
                if not name or not self.reads(node.name, name):
                    continue
                if name not in made:
                    p = self.points[name]
                    inv, mul, lo, hi = (
                        fresh(f"{name}/inv"),
                        fresh(f"{name}/scale"),
                        fresh(f"{name}/lo"),
                        fresh(f"{name}/hi"),
                    )
                    consts += [
                        numpy_helper.from_array(p.inverse, inv),
                        numpy_helper.from_array(p.multiplier, mul),
                        numpy_helper.from_array(np.array(-128.0, np.float32), lo),
                        numpy_helper.from_array(np.array(127.0, np.float32), hi),
                    ]
                    a, b, c, d = (fresh(f"{name}/{s}") for s in ("scaled", "rounded", "clipped", "value"))
                    out += [
                        onnx.helper.make_node("Mul", [name, inv], [a], name=fresh(f"{name}/Mul")),
                        onnx.helper.make_node("Round", [a], [b], name=fresh(f"{name}/Round")),
                        onnx.helper.make_node("Clip", [b, lo, hi], [c], name=fresh(f"{name}/Clip")),
                        onnx.helper.make_node("Mul", [c, mul], [d], name=fresh(f"{name}/Dequantize")),
                    ]
                    made[name] = d
                copy.input[k] = made[name]
            out.append(copy)
        return out, consts
