"""How much each layer's INT8 input and output lose: the relative error of Q/DQ on real activations.

A Q/DQ model computes ``x_hat = DequantizeLinear(QuantizeLinear(x))`` wherever it quantizes an
activation; ``||x - x_hat|| / ||x||`` over calibration feeds says how much that tensor loses. One
onnxruntime run (optimizations off, so each Q/DQ is computed as written) with every such pair
exposed as extra outputs measures all of them at once. A layer whose output carries outliers
(MiniLM's first FFN output, which feeds the residual stream) stands out, so the user can leave it
float (``quantize --int8-max-error``) at the cost of its sparse INT8 kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_sparse.graph import rules

__all__ = ["LayerError", "Int8Probe", "int8_errors", "ERROR_FEEDS"]

#: Calibration feeds the INT8 errors are measured on (the first ones).
ERROR_FEEDS = 8


@dataclass(frozen=True)
class LayerError:
    """Relative L2 error of a layer's INT8 input and output (None where that side is not Q/DQ)."""

    input: float | None
    output: float | None

    @property
    def worst(self) -> float:
        return max((e for e in (self.input, self.output) if e is not None), default=0.0)


def _pairs(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, list[onnx.NodeProto]], dict[str, onnx.NodeProto]]:
    """float tensor -> its fake-quantized twin (Q -> DQ), consumers, producers (main graph)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers: dict[str, onnx.NodeProto] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producers[o] = n
    pairs = {}
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        dqs = [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
        if dqs:
            pairs[n.input[0]] = dqs[0].output[0]
    return pairs, consumers, producers


def _layer_tensors(
    node: onnx.NodeProto,
    activation: str,
    pairs: dict[str, str],
    consumers: dict[str, list[onnx.NodeProto]],
    producers: dict[str, onnx.NodeProto],
) -> tuple[str | None, str | None]:
    """The float tensors whose Q/DQ make the layer's INT8 input and output."""
    inp = None
    dq = producers.get(activation)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in pairs:
            inp = q.input[0]
    out = None
    name = node.output[0] if node.output else ""
    for _ in range(16):
        if name in pairs:
            out = name
            break
        users = consumers.get(name, [])
        if len(users) != 1 or users[0].op_type not in rules.INT8_EPILOGUE_OPS:
            break
        name = users[0].output[0]
    return inp, out


def int8_errors(
    model: onnx.ModelProto,
    layers: Iterable[tuple[str, onnx.NodeProto, str]],
    feeds: Sequence[dict[str, np.ndarray]],
    max_feeds: int = ERROR_FEEDS,
) -> dict[str, LayerError]:
    """Relative L2 error of each layer's INT8 input and output on up to ``max_feeds`` feeds.

    Args:
        model: the Q/DQ model (main graph analysed).
        layers: ``(display name, node, activation input name)`` per layer.
        feeds: calibration feeds.
    """
    return Int8Probe(model).errors(layers, feeds, max_feeds)


def _pair_sums(exact: np.ndarray, through_qdq: np.ndarray) -> tuple[float, float]:
    """One feed's ``sum((x - x_hat)^2)`` and ``sum(x^2)`` of a Q/DQ pair (float64), in one float64 array:
    the ufuncs cast each value as ``astype`` would, and lay their result out as the expression's, so
    the sums add the same values in the same order as ``np.sum((x64 - y64) ** 2)`` and ``np.sum(x64**2)``."""
    d = np.subtract(exact, through_qdq, dtype=np.float64)
    if not isinstance(d, np.ndarray) or d.ndim == 0:  # a scalar
        x = np.float64(exact)
        return float(d * d), float(x * x)
    err = float(np.sum(np.square(d, out=d)))
    return err, float(np.sum(np.square(exact, out=d, dtype=np.float64)))


class Int8Probe:
    """One onnxruntime session of a Q/DQ model, optimizations off (each Q/DQ computed as written),
    with every Q/DQ pair's float tensor and its fake-quantized twin exposed as extra outputs.

    It answers both questions asked of a candidate model: its outputs (:meth:`run`, the
    mixed-precision search; with optimizations off, exposing more tensors changes no value) and
    its layers' INT8 errors (:meth:`errors`), so a model is opened once for both. The session is
    opened on first use, with one intra-op thread: several feeds run side by side instead
    (:meth:`run_many`, :meth:`errors`), which costs less CPU than splitting each run's small
    operators over the cores, and a value does not depend on how many cores the machine has.
    """

    def __init__(self, model: onnx.ModelProto, what: str = "the INT8 error probe") -> None:
        self.model = model
        self.pairs, self._consumers, self._producers = _pairs(model)
        self._what = what
        self._session: object | None = None
        self._later: set[int] = set()  # ids of the feeds errors() will be asked about
        self._sums: dict[int, dict[str, tuple[float, float]]] = {}  # their sums, taken by run()

    @property
    def session(self) -> object:
        from onnx_sparse import runtime

        if self._session is None:
            exposed = [x for t in sorted(self.pairs) for x in (t, self.pairs[t])]
            # no copy of the model; its large weights are read in place
            probe = runtime.with_outputs(self.model, exposed, runtime.model_bytes(self.model))
            self._session = runtime.session(probe, what=self._what, optimize=False, spin=False, threads=1)
        return self._session

    def errors_later(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        """The feeds :meth:`errors` will be asked about: a :meth:`run` on one of them before then also takes
        its INT8 error sums, and :meth:`errors` does not run it again (the same values, one run less)."""
        self._later = {id(f) for f in feeds}

    def run(self, names: Sequence[str], feed: dict[str, np.ndarray], where: str) -> list[np.ndarray]:
        """The values of ``names`` (graph outputs or exposed tensors) on ``feed``."""
        from onnx_sparse import runtime

        if id(feed) not in self._later or id(feed) in self._sums:
            return runtime.run(self.session, names, feed, where=where)
        exposed = [x for t in sorted(self.pairs) for x in (t, self.pairs[t])]
        fetch = list(dict.fromkeys([*names, *exposed]))
        values = dict(zip(fetch, runtime.run(self.session, fetch, feed, where=where), strict=True))
        self._sums[id(feed)] = {t: _pair_sums(values[t], values[self.pairs[t]]) for t in self.pairs}
        return [values[n] for n in names]

    def run_many(
        self, names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]], where: str
    ) -> list[list[np.ndarray]]:
        """:meth:`run` on each of ``feeds`` (in worker threads, side by side), in the order of ``feeds``."""
        from onnx_sparse.core import blas

        _ = self.session  # opened once, before the workers share it
        return blas.parallel_map(lambda feed: self.run(names, feed, where), feeds)

    def errors(
        self,
        layers: Iterable[tuple[str, onnx.NodeProto, str]],
        feeds: Sequence[dict[str, np.ndarray]],
        max_feeds: int = ERROR_FEEDS,
    ) -> dict[str, LayerError]:
        """As :func:`int8_errors` (``layers`` as there, nodes of this model)."""
        pairs = self.pairs
        wanted: dict[str, tuple[str | None, str | None]] = {}
        for name, node, activation in layers:
            wanted[name] = _layer_tensors(node, activation, pairs, self._consumers, self._producers)
        tensors = sorted({t for io in wanted.values() for t in io if t is not None})
        if not tensors:
            return {name: LayerError(None, None) for name in wanted}
        outputs = list(dict.fromkeys(x for t in tensors for x in (t, pairs[t])))
        err = dict.fromkeys(tensors, 0.0)
        ref = dict.fromkeys(tensors, 0.0)
        from onnx_sparse import runtime
        from onnx_sparse.core import blas

        def sums(feed: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
            # a feed run() took the sums of is not run again
            if id(feed) in self._sums:
                return self._sums[id(feed)]
            got = dict(
                zip(outputs, runtime.run(self.session, outputs, feed, where="a calibration sample"), strict=True)
            )
            return {t: _pair_sums(got[t], got[pairs[t]]) for t in tensors}

        # each feed's run and sums in a worker (side by side); the sums are added in the feeds' order
        _ = self.session  # opened once, before the workers share it
        for per_feed in blas.parallel_map(sums, list(feeds)[:max_feeds]):
            for t in tensors:
                e, r = per_feed[t]
                err[t] += e
                ref[t] += r
        rel = {t: float(np.sqrt(err[t] / ref[t])) if ref[t] > 0 else 0.0 for t in tensors}
        return {
            name: LayerError(None if i is None else rel[i], None if o is None else rel[o])
            for name, (i, o) in wanted.items()
        }
