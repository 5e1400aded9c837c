"""Capture intermediate activations with onnxruntime (CPU), stage by stage, keeping only a frontier.

One-shot pruning fits each layer to the inputs it sees in the *already pruned* model, so
layers are pruned in dependency order: a layer's **stage** is the length of the longest chain
of calibrated layers that feeds its input (:func:`schedule`). All layers of one stage (e.g. the
Q/K/V projections that share an input, or parallel branches) are captured together, pruned,
and only then is the next stage captured.

:class:`StagedRunner` makes that cheap. It never reruns the whole model per stage: for a stage
it cuts out the part of the graph that computes the stage's inputs and has not been computed
yet, runs that piece in onnxruntime (as a small model whose extra outputs are the wanted
intermediate tensors) on every calibration sample, and keeps just the *frontier*: tensors
computed so far that nodes still to run will read (skip connections, attention masks, the
residual stream). Everything upstream of the frontier is final, because every layer that
feeds it has already been pruned. So over a whole calibration every node runs once per
sample, memory holds the frontier for the calibration set plus one sample's captures,
and each captured activation is handed to the caller one sample at a time. A frontier larger
than the memory budget goes to memory-mapped files (:mod:`onnx_sparse.calib.spill`).

The pieces are built from the in-memory model with its current weights: tensors still stored
as the external data they were loaded with are read by onnxruntime from their files (it maps
them; :func:`model_session`), and only values written since the load are copied in, so a model
with external data needs neither temporary files nor a second copy of its weights.
Only the main graph is split; If/Loop/Scan nodes run whole (their outer-scope reads count
as inputs). A piece's in-memory float32 constants have their subnormals flushed to zero
(:func:`flush_piece`): the captured values do not depend on them (each adds less than 1.2e-38
times its input to a sum), but every multiply that reads one is slow on x86 CPUs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnx_sparse.calib.data import sample_number
from onnx_sparse.calib.fakequant import FakeQuant
from onnx_sparse.calib.spill import Spill
from onnx_sparse.core.subnormal import count_subnormals, flush_subnormals
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.io import ModelFile

__all__ = [
    "node_reads",
    "schedule",
    "Schedule",
    "StagedRunner",
    "run_model",
    "inline_model",
    "model_session",
    "prefetch",
    "toposort_graph",
    "body_path",
    "body_producers",
    "expose_body_values",
    "iter_body_values",
    "flush_piece",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scopes (used but not defined inside)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(node_reads(node))
        defined.update(o for o in node.output if o)
    return used - defined


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every main-scope name ``node`` reads: its inputs plus outer-scope names used by its subgraphs."""
    reads = [i for i in node.input if i]
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            reads.extend(sorted(_subgraph_reads(a.g)))
        elif a.type == onnx.AttributeProto.GRAPHS:
            for g in a.graphs:
                reads.extend(sorted(_subgraph_reads(g)))
    return reads


def _toposort(nodes: Sequence[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in a topological order (stable: the given order when it already is one)."""
    produced = {o for n in nodes for o in n.output if o}
    ready = set(available)
    out: list[onnx.NodeProto] = []
    pending = list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(r in ready or r not in produced for r in node_reads(n)):
                out.append(n)
                ready.update(o for o in n.output if o)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise OnnxSparseError(
                "the graph has a cycle or reads values no node produces in order",
                hint="check the model with onnx.checker",
            )
        pending = rest
    return out


def toposort_graph(graph: onnx.GraphProto) -> bool:
    """Put ``graph``'s nodes in an order where every node, and every subgraph it owns, comes after
    whatever it reads (stable: an order that already is one is kept). Returns whether it moved any.

    Tools that sort by explicit inputs only (onnxruntime's quantizer) can put an If before the
    producer of a value its branches read from the outer scope, which onnx.checker rejects.
    """
    inits = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    order = _toposort(list(graph.node), inits)
    if [id(n) for n in order] == [id(n) for n in graph.node]:
        return False
    nodes = [onnx.NodeProto() for _ in order]
    for dst, src in zip(nodes, order, strict=True):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(nodes)
    return True


@dataclass(frozen=True)
class Schedule:
    """Stages of layer groups and the groups that cannot be calibrated in order.

    Attributes:
        stages: ``stages[k]`` lists the group indices captured and pruned together at stage ``k``.
        cyclic: Groups (sharing one stored tensor) where one member feeds another's input:
            they cannot be fitted to their own pruned output; callers prune them another way.
    """

    stages: tuple[tuple[int, ...], ...]
    cyclic: tuple[int, ...]


def schedule(
    nodes: Sequence[onnx.NodeProto],
    groups: Sequence[Sequence[tuple[onnx.NodeProto, str]]],
) -> Schedule:
    """Order layer groups so that each is captured after every group that feeds its inputs.

    Args:
        nodes: The main graph's nodes (any order; sorted topologically here).
        groups: Per group (one stored tensor), its members as ``(node, activation name)``.

    Returns:
        The stages (longest-path layering of the group dependency graph) and the cyclic groups.
    """
    site_group = {id(n): g for g, members in enumerate(groups) for n, _ in members}
    all_groups = set(range(len(groups)))
    cyclic: set[int] = set()
    for _ in range(2):  # a second pass once cyclic groups no longer count as dependencies
        dep: dict[str, int] = {}
        deps = [0] * len(groups)
        members_act: dict[str, list[int]] = {}
        for g, members in enumerate(groups):
            for _, act in members:
                members_act.setdefault(act, []).append(g)
        for node in _toposort(nodes, set()):
            mask = 0
            for r in node_reads(node):
                mask |= dep.get(r, 0)
            grp = site_group.get(id(node))
            if grp is not None and grp not in cyclic:
                for _, act in groups[grp]:
                    deps[grp] |= dep.get(act, 0)
                mask |= 1 << grp
            for o in node.output:
                if o:
                    dep[o] = mask
        new_cyclic = {g for g in all_groups - cyclic if deps[g] >> g & 1}
        if not new_cyclic:
            break
        cyclic |= new_cyclic
    level: dict[int, int] = {}

    def stage_of(g: int) -> int:
        if g not in level:
            bits = [h for h in all_groups - cyclic if h != g and deps[g] >> h & 1]
            # deps are transitive, so the deepest dependency decides
            level[g] = 1 + max((stage_of(h) for h in bits), default=-1)
        return level[g]

    by_stage: dict[int, list[int]] = {}
    for g in sorted(all_groups - cyclic):
        by_stage.setdefault(stage_of(g), []).append(g)
    stages = tuple(tuple(by_stage[k]) for k in sorted(by_stage))
    return Schedule(stages=stages, cyclic=tuple(sorted(cyclic)))


def _session(model: Any, threads: int | None = None, folder: Path | None = None, *, prepack: bool = True):
    from onnx_sparse import runtime

    # Calibration alternates onnxruntime runs with numpy solves in this process: onnxruntime's
    # worker threads must not spin between runs, or they starve numpy's BLAS threads.
    return runtime.session(
        model,
        what="the model for calibration",
        threads=threads,
        prepack=prepack,
        spin=False,
        hint="calibration runs the model on CPU with onnxruntime; custom operators must be registered there",
        external_folder=folder,
    )


def _run(sess, names: Sequence[str], feed: Mapping[str, np.ndarray], index: int) -> list[np.ndarray]:
    from onnx_sparse import runtime

    return runtime.run(sess, names, feed, where=f"calibration sample {index}")


def flush_piece(model: onnx.ModelProto) -> int:
    """Flush float32 subnormals to zero in the in-memory tensors of ``model``, a capture piece
    (initializers and node attributes, subgraphs included; tensors onnxruntime maps from their
    files are left as they are). Returns how many values were flushed.

    The piece is a copy made for one onnxruntime session: the model being pruned, its files and
    what is saved keep their values (:func:`onnx_sparse.graph.weights.stored_value` is the rule
    for the values a pass writes). Done on the values, not with onnxruntime's
    ``session.set_denormal_as_zero``, which sets flush-to-zero in the calling thread's floating
    point control register and leaves it set for every later numpy operation of that thread.
    """
    from onnx_sparse.io import iter_tensors

    flushed = 0
    for t in iter_tensors(model):
        if t.data_type != TensorProto.FLOAT or t.data_location == TensorProto.EXTERNAL:
            continue
        if t.raw_data:
            values = np.frombuffer(t.raw_data, dtype="<f4")
        elif len(t.float_data):
            values = np.asarray(t.float_data, dtype=np.float32)
        else:
            continue
        n = count_subnormals(values)
        if n:
            t.ClearField("float_data")
            t.raw_data = flush_subnormals(values).astype("<f4", copy=False).tobytes()
            flushed += n
    return flushed


def _tensor_copy(mf: ModelFile, t: TensorProto, name: str | None = None) -> TensorProto:
    """An inline copy of ``t`` with its current value (pending or external values loaded)."""
    if id(t) in mf.pending or t.data_location == TensorProto.EXTERNAL or len(t.external_data):
        out = numpy_helper.from_array(np.asarray(mf.read(t, mmap=False)), name or t.name)
        mf.release(t)  # the copy is made: a new value waiting on disk need not stay resident too
        return out
    out = TensorProto()
    out.CopyFrom(t)
    if name is not None:
        out.name = name
    return out


def inline_model(mf: ModelFile, keep_external: bool = False) -> onnx.ModelProto:
    """A copy of ``mf.model`` with every tensor's current value inline (for an onnxruntime session).

    ``keep_external``: tensors whose stored external data is still their value keep their
    references (a copy without the weights, for :func:`model_session`); only values written
    since the load are copied in.
    """
    from onnx_sparse.io import iter_tensors

    model = onnx.ModelProto()
    model.CopyFrom(mf.model)
    for src, dst in zip(iter_tensors(mf.model), iter_tensors(model), strict=True):
        if keep_external and id(src) not in mf.pending and src.data_location == TensorProto.EXTERNAL:
            continue
        if id(src) in mf.pending or src.data_location == TensorProto.EXTERNAL or len(src.external_data):
            dst.CopyFrom(_tensor_copy(mf, src))
    return model


def model_session(
    mf: ModelFile,
    model: onnx.ModelProto | None = None,
    threads: int | None = None,
    *,
    outputs: Sequence[str] = (),
    prepack: bool = True,
):
    """An onnxruntime session of the whole model on ``mf``'s current weights, without a copy of its
    external data: onnxruntime maps the data files itself (from ``mf``'s folder), and only values
    written since the load are given to it.

    ``model``: :func:`inline_model` ``(mf, keep_external=True)`` after the caller's changes; default:
    ``mf.model`` itself as it is now, with ``outputs`` added to its graph outputs, and no copy of the
    model: its large inline initializers and the values written since the load reach the session as
    arrays it reads in place (:func:`onnx_sparse.runtime.model_bytes`), so neither a serialized copy
    of the weights nor onnxruntime's parse of one is made (where a written value sits elsewhere than
    a main-graph initializer, the copy is made as before). ``prepack``: False for a session that runs
    only a few times: onnxruntime does not make its pre-packed copy of every MatMul weight. The data
    files are checked to be the ones checked at load first; if onnxruntime refuses to read them itself
    (a path form it does not take), their tensors are read in here instead, as before.
    """
    from onnx_sparse.io import finalize_inline, iter_tensors, read_tensor, write_tensor

    if model is None:
        sess = _lean_session(mf, outputs, threads, prepack)
        if sess is not None:
            return sess
        model = inline_model(mf, keep_external=True)
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(outputs) if n not in have)
    elif outputs:
        raise ValueError("outputs are for the session of mf.model itself (model=None)")
    external = [t for t in iter_tensors(model) if t.data_location == TensorProto.EXTERNAL]
    if not external:
        return _session(model, threads, prepack=prepack)
    for t in external:
        mf.ref(t)  # the file that was checked at load, unchanged
    try:
        return _session(model, threads, folder=mf.base_dir, prepack=prepack)
    except OnnxSparseError as exc:
        logger.debug("onnxruntime did not map the external data itself (%s); reading it in", exc.message)
    for t in external:
        write_tensor(t, np.array(read_tensor(t, mf.base_dir, mmap=False, pinned=mf.data_ids)))
    return _session(finalize_inline(model), threads, prepack=prepack)


def _lean_session(mf: ModelFile, outputs: Sequence[str], threads: int | None, prepack: bool):
    """:func:`model_session` on ``mf.model`` itself (its large initializers, and the values written
    since the load, as arrays read in place), or None where that cannot be done: a written value
    inside a body or an attribute, or of a type not read in place, a "was external" marker left by a
    save, or onnxruntime refusing to map the external data itself."""
    from onnx_sparse import runtime
    from onnx_sparse.io import iter_tensors

    main = {id(t) for t in mf.model.graph.initializer}
    values: dict[str, np.ndarray] = {}
    external = []
    for t in iter_tensors(mf.model):
        if id(t) in mf.pending:
            value = mf.pending[id(t)][1]
            if id(t) not in main or value.dtype != runtime.array_type(t.data_type) or not value.flags.c_contiguous:
                return None
            values[t.name] = value
        elif t.data_location == TensorProto.EXTERNAL:
            external.append(t)
        elif len(t.external_data):
            return None  # written back inline by a save (flush_pending): the copy drops the marker
    for t in external:
        mf.ref(t)  # the file that was checked at load, unchanged
    source = runtime.with_outputs(mf.model, outputs, runtime.model_bytes(mf.model, values=values))
    try:
        return _session(source, threads, folder=mf.base_dir if external else None, prepack=prepack)
    except OnnxSparseError as exc:
        if not external:
            raise
        logger.debug("onnxruntime did not map the external data itself (%s)", exc.message)
        return None


_END = object()


def prefetch(items: Iterator[T], ahead: int = 2) -> Iterator[T]:
    """``items``, computed by a worker thread up to ``ahead`` items before they are asked for.

    The staged capture alternates onnxruntime runs (of the pruned and the dense model) with the
    statistics of what they gave; with the runs in their own threads, the three overlap on the
    cores. The items, their order and where an error is raised (at the item it replaced) are
    those of ``items`` itself. ``items`` is run to its end, or closed when the caller stops early.
    """
    out: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put((x, None)):
                    return
        except BaseException as exc:  # handed to the consumer at its place in the sequence
            put((_END, exc))
            return
        put((_END, None))

    thread = threading.Thread(target=work, name="onnx-sparse-capture", daemon=True)
    thread.start()
    try:
        while True:
            x, error = out.get()
            if x is _END:
                if error is not None:
                    raise error
                return
            yield x
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()


def run_model(
    model: onnx.ModelProto | ModelFile,
    feeds: Sequence[Mapping[str, np.ndarray]],
    threads: int | None = None,
    *,
    source: ModelFile | None = None,
    outputs: Sequence[str] = (),
    prepack: bool = True,
):
    """Yield the outputs of ``model`` (all graph outputs, by name) for each feed.

    A :class:`ModelFile` runs on its current weights through :func:`model_session` (no copy of
    the model or of its weights; ``outputs``: inner tensors to return too); so does a ModelProto
    made by :func:`inline_model` ``(source, keep_external=True)`` when ``source`` is given.
    ``prepack``: False: no pre-packed copy of the weights (a run or two).
    """
    if isinstance(model, ModelFile):
        sess = model_session(model, None, threads, outputs=outputs, prepack=prepack)
    elif outputs:
        raise ValueError("outputs are for a ModelFile")
    elif source is not None:
        sess = model_session(source, model, threads, prepack=prepack)
    else:
        sess = _session(model, threads, prepack=prepack)
    names = [o.name for o in sess.get_outputs()]
    for i, feed in enumerate(feeds):
        yield dict(zip(names, _run(sess, names, feed, sample_number(feed, i)), strict=True))


@dataclass
class _Piece:
    nodes: list[onnx.NodeProto]
    inputs: list[str]  # graph inputs and cached tensors it reads
    outputs: list[str]  # targets first, then new frontier tensors
    frontier: list[str]
    initializers: list[str]


@dataclass
class StagedRunner:
    """Runs a model piece by piece on a calibration set (see the module docstring).

    The runner works on ``mf`` as it is when each piece is built: write pruned weights into
    ``mf`` between stages and the next piece sees them. New nodes (e.g. a bias ``Add``) are
    added with :meth:`insert_after` and new constant tensors with :meth:`set_initializer`;
    :meth:`commit` writes those into ``mf.model`` at the end.

    Attributes:
        mf: The model.
        feeds: The calibration samples.
        threads: onnxruntime intra-op threads (None: its default).
        spill: Where the frontier's arrays live (:class:`~onnx_sparse.calib.spill.Spill`: in
            memory up to a budget, then in memory-mapped files); share one between runners so
            that the budget is one. Default: a runner of its own with the default budget.
        fake_quant: Tensors every piece rounds to INT8 for their readers (``prune --int8``:
            :mod:`onnx_sparse.calib.fakequant`); the values handed out and kept are unrounded.
    """

    mf: ModelFile
    feeds: Sequence[Mapping[str, np.ndarray]]
    threads: int | None = None
    spill: Spill = field(default_factory=Spill)
    fake_quant: FakeQuant | None = None
    nodes: list[onnx.NodeProto] = field(init=False)
    extra: dict[str, np.ndarray] = field(init=False, default_factory=dict)
    cache: dict[str, list[np.ndarray | None]] = field(init=False, default_factory=dict)
    done: set[int] = field(init=False, default_factory=set)
    inserted: bool = field(init=False, default=False)
    stats: dict[str, float] = field(
        init=False, default_factory=lambda: {"build_s": 0.0, "run_s": 0.0, "pieces": 0, "nodes": 0}
    )

    def __post_init__(self) -> None:
        g = self.mf.model.graph
        self.initializers = {t.name: t for t in g.initializer}
        self.graph_inputs = {vi.name: vi for vi in g.input if vi.name not in self.initializers}
        self.nodes = _toposort(list(g.node), set(self.graph_inputs) | set(self.initializers))
        self.inserted = [id(n) for n in self.nodes] != [id(n) for n in g.node]
        self._index_producers()

    # ------------------------------------------------------------------ graph edits

    def _index_producers(self) -> None:
        self.producers = {o: n for n in self.nodes for o in n.output if o}

    def insert_after(self, node: onnx.NodeProto, new: onnx.NodeProto) -> None:
        """Insert ``new`` right after ``node`` (which may have been renamed); neither may have run yet."""
        assert id(node) not in self.done, "cannot edit a node that already ran"
        pos = next(i for i, n in enumerate(self.nodes) if n is node)
        self.nodes.insert(pos + 1, new)
        self.inserted = True
        self._index_producers()

    def node_changed(self, node: onnx.NodeProto) -> None:
        """Tell the runner that ``node``'s inputs or outputs were edited (it must not have run)."""
        assert id(node) not in self.done, "cannot edit a node that already ran"
        self._index_producers()

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        """A new constant tensor (held here until :meth:`commit`)."""
        assert name not in self.initializers and name not in self.producers
        self.extra[name] = value

    def names(self) -> set[str]:
        """Every name in use in the main graph (for picking new unique names)."""
        used = set(self.initializers) | set(self.graph_inputs) | set(self.extra)
        for n in self.nodes:
            used.update(n.input)
            used.update(n.output)
        used.update(o.name for o in self.mf.model.graph.output)
        return used

    def commit(self) -> None:
        """Write inserted nodes (in order) and new initializers into ``mf.model``."""
        g = self.mf.model.graph
        if self.inserted:
            nodes = [onnx.NodeProto() for _ in self.nodes]
            for dst, src in zip(nodes, self.nodes, strict=True):
                dst.CopyFrom(src)
            del g.node[:]
            g.node.extend(nodes)
            self.inserted = False
            self.nodes = list(g.node)
            self.done = set()  # ids changed; the runner is finished once committed
            self._index_producers()
        for name, value in self.extra.items():
            g.initializer.append(numpy_helper.from_array(value, name))
        self.initializers = {t.name: t for t in g.initializer}
        self.extra = {}

    # ------------------------------------------------------------------ pieces

    def _available(self, name: str) -> bool:
        return name in self.cache or name in self.graph_inputs or name in self.initializers or name in self.extra

    def computable(self, names: Sequence[str]) -> bool:
        """Whether :meth:`iter_stage` can still give ``names``: each is a graph input, a constant,
        kept on the frontier, or made by a node that has not run (whose own inputs are then
        available: the frontier keeps whatever a node still to run reads). A value that was
        computed and dropped (nothing left reads it, e.g. an early graph output) is not."""
        for name in names:
            if self._available(name):
                continue
            node = self.producers.get(name)
            if node is None or id(node) in self.done:
                return False
        return True

    def _plan(self, targets: Sequence[str]) -> _Piece:
        needed: set[int] = set()
        stack = [t for t in targets if not self._available(t)]
        while stack:
            name = stack.pop()
            if self._available(name):
                continue
            node = self.producers.get(name)
            if node is None:
                raise OnnxSparseError(f"tensor {name!r} is not produced by any node of the main graph")
            if id(node) in needed:
                continue
            if id(node) in self.done:
                raise AssertionError(f"{name!r} was computed but not kept on the frontier")
            needed.add(id(node))
            stack.extend(node_reads(node))
        piece_nodes = [n for n in self.nodes if id(n) in needed]
        produced = {o for n in piece_nodes for o in n.output if o}
        reads: list[str] = []
        for n in piece_nodes:
            reads.extend(r for r in node_reads(n) if r not in produced)
        reads = list(dict.fromkeys(reads))
        inputs = [r for r in reads if r in self.cache or r in self.graph_inputs]
        inits = [r for r in reads if r in self.initializers or r in self.extra]
        # Frontier: values this piece makes that later nodes will read (Constant nodes just rerun).
        later = set()
        finished = self.done | needed
        for n in self.nodes:
            if id(n) not in finished:
                later.update(node_reads(n))
        frontier = [o for n in piece_nodes if n.op_type != "Constant" for o in n.output if o and o in later]
        outputs = list(dict.fromkeys([t for t in targets if t in produced] + frontier))
        return _Piece(piece_nodes, inputs, outputs, frontier, inits)

    def _build(self, piece: _Piece) -> onnx.ModelProto:
        src = self.mf.model
        g = onnx.GraphProto(name="onnx_sparse_capture")
        if self.fake_quant is not None:
            nodes, consts = self.fake_quant.rewrite(piece.nodes, self.names())
            g.node.extend(nodes)
            g.initializer.extend(consts)
        else:
            for n in piece.nodes:
                g.node.add().CopyFrom(n)
        for name in piece.inputs:
            if name in self.graph_inputs:
                g.input.add().CopyFrom(self.graph_inputs[name])
            else:
                arr = next(a for a in self.cache[name] if a is not None)
                elem = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
                g.input.append(onnx.helper.make_tensor_value_info(name, elem, [None] * arr.ndim))
        for name in piece.initializers:
            if name in self.extra:
                g.initializer.append(numpy_helper.from_array(self.extra[name], name))
            elif self._stored(self.initializers[name]):
                g.initializer.add().CopyFrom(self.initializers[name])  # onnxruntime maps it: model_session
            else:
                g.initializer.append(_tensor_copy(self.mf, self.initializers[name]))
        for name in piece.outputs:
            g.output.add().name = name
        model = onnx.ModelProto(ir_version=src.ir_version, graph=g)
        model.opset_import.extend(src.opset_import)
        model.functions.extend(src.functions)
        flushed = flush_piece(model)
        if flushed:
            logger.debug("capture piece: %d float32 subnormal constant(s) read as 0", flushed)
        return model

    def _stored(self, t: TensorProto) -> bool:
        """Whether ``t``'s value is still the external data it was loaded with."""
        return t.data_location == TensorProto.EXTERNAL and id(t) not in self.mf.pending

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is a constant tensor (initializer), else None."""
        if name in self.extra:
            return self.extra[name]
        if name in self.initializers:
            return np.asarray(self.mf.read(self.initializers[name]))
        return None

    def _ran(self, piece: _Piece) -> None:
        """``piece`` has run: its nodes are done, and what no node still to run reads leaves the frontier."""
        self.done.update(id(n) for n in piece.nodes if n.op_type != "Constant")
        later: set[str] = set()
        for node in self.nodes:
            if id(node) not in self.done:
                later.update(node_reads(node))
        for name in [k for k in self.cache if k not in later]:
            for a in self.cache.pop(name):
                if a is not None:
                    self.spill.release(a)

    def mirror(self, leader: StagedRunner, targets: Sequence[str]) -> _Piece | None:
        """This runner's piece for ``targets`` when it would compute exactly what ``leader``'s computes
        (then :meth:`adopt` takes ``leader``'s values instead of running it), else None.

        So it is when both pieces are the same nodes, reading the same feeds, constants of the same
        stored values (neither written since the load) and, for the rest, the very arrays ``leader``
        holds (shared by an earlier :meth:`adopt`): ``asym``'s dense model until a pruned layer is
        upstream (MiniLM's embeddings), whose own session would give the same values again.
        """
        if (
            self.fake_quant is not None
            or leader.fake_quant is not None
            or len(self.feeds) != len(leader.feeds)
            or any(a is not b for a, b in zip(self.feeds, leader.feeds, strict=True))
            or len(self.nodes) != len(leader.nodes)  # no node inserted into either
            or self.extra
            or leader.extra
        ):
            return None
        targets = list(dict.fromkeys(targets))
        mine, theirs = self._plan(targets), leader._plan(targets)
        if (mine.inputs, mine.outputs, mine.frontier, mine.initializers) != (
            theirs.inputs, theirs.outputs, theirs.frontier, theirs.initializers,
        ) or len(mine.nodes) != len(theirs.nodes):  # fmt: skip
            return None
        if any(a != b for a, b in zip(mine.nodes, theirs.nodes, strict=True)):
            return None
        produced = {o for n in mine.nodes for o in n.output if o}
        for name in dict.fromkeys([*mine.inputs, *(t for t in targets if t not in produced), *mine.initializers]):
            if name in self.cache or name in leader.cache:
                mine_v, theirs_v = self.cache.get(name), leader.cache.get(name)
                if mine_v is None or theirs_v is None or any(a is not b for a, b in zip(mine_v, theirs_v, strict=True)):
                    return None
            elif name in self.initializers or name in leader.initializers:
                if not self._same_constant(leader, name):
                    return None
            elif name not in self.graph_inputs or name not in leader.graph_inputs:
                return None
        return mine

    def _same_constant(self, leader: StagedRunner, name: str) -> bool:
        mine, theirs = self.initializers.get(name), leader.initializers.get(name)
        if mine is None or theirs is None or id(mine) in self.mf.pending or id(theirs) in leader.mf.pending:
            return False
        if mine.data_location == TensorProto.EXTERNAL and self.mf.base_dir != leader.mf.base_dir:
            return False
        if mine == theirs:
            return True
        # the same bytes held apart: asym's dense copy of an inline model reads them from the model's
        # file (copy_model_file(read_only=True)) where the pruned model holds them inline
        if mine.data_type != theirs.data_type or mine.dims != theirs.dims:
            return False
        a, b = np.asarray(self.mf.read(mine)), np.asarray(leader.mf.read(theirs))
        return a.dtype == b.dtype and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))

    def adopt(self, leader: StagedRunner, piece: _Piece) -> None:
        """Take ``leader``'s values of the stage that :meth:`mirror` matched (``piece``, this runner's
        plan of it, which ``leader`` has now run) as this runner's own: the same arrays on the
        frontier (kept through this runner's spill, which counts them as it counts its own)."""
        for name in piece.frontier:
            values = leader.cache.get(name)
            if values is not None:
                self.cache[name] = [
                    a if a is None or isinstance(a, np.memmap) else self.spill.keep(a) for a in values
                ]  # fmt: skip
        self._ran(piece)

    def iter_stage(self, targets: Sequence[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield ``(sample index, {target: value})`` for every calibration sample.

        Every target must be computable from graph inputs, constants and nodes that do not
        depend on anything the caller will still change. The generator must be consumed to
        the end (the frontier is updated sample by sample and closed when it finishes).
        """
        targets = list(dict.fromkeys(targets))
        t0 = time.perf_counter()
        piece = self._plan(targets)
        sess = self._build(piece) if piece.nodes else None
        if sess is not None:
            sess = model_session(self.mf, sess, self.threads)
        self.stats["build_s"] += time.perf_counter() - t0
        self.stats["pieces"] += 1 if piece.nodes else 0
        self.stats["nodes"] += len(piece.nodes)
        n = len(self.feeds)
        for name in piece.frontier:
            self.cache[name] = [None] * n
        # what nothing after this piece reads leaves the frontier sample by sample, once the sample has
        # run, not all at the end: the spill's budget then holds the new values rather than spent ones
        done = self.done | {id(node) for node in piece.nodes}
        later = {r for node in self.nodes if id(node) not in done for r in node_reads(node)}
        spent = [name for name in self.cache if name not in later and name not in piece.frontier]
        run_s = 0.0
        for i, feed in enumerate(self.feeds):
            values: dict[str, np.ndarray] = {}
            if sess is not None:
                fd = {k: feed[k] for k in piece.inputs if k in self.graph_inputs}
                fd.update({k: cast(np.ndarray, self.cache[k][i]) for k in piece.inputs if k not in self.graph_inputs})
                t1 = time.perf_counter()
                outs = _run(sess, piece.outputs, fd, sample_number(feed, i))
                run_s += time.perf_counter() - t1
                values = dict(zip(piece.outputs, outs, strict=True))
                for name in piece.frontier:
                    if not isinstance(values[name], np.ndarray):
                        raise OnnxSparseError(
                            f"intermediate value {name!r} is not a tensor; calibration cannot split the graph there"
                        )
                    self.cache[name][i] = self.spill.keep(values[name])
            result = {}
            for t in targets:
                if t in values:
                    result[t] = values[t]
                elif t in self.cache:
                    result[t] = cast(np.ndarray, self.cache[t][i])
                elif t in self.graph_inputs:
                    result[t] = feed[t]
                else:
                    const = self.constant(t)
                    assert const is not None, t
                    result[t] = const
            for name in spent:  # (the result still holds what it gives)
                spent_value, self.cache[name][i] = self.cache[name][i], None
                if spent_value is not None:
                    self.spill.release(spent_value)
            yield i, result
        sess = None  # the piece's session (and its packed weights) goes now, not with the generator
        self.stats["run_s"] += run_s
        self._ran(piece)
        logger.debug(
            "capture piece: %d nodes, %d inputs, %d outputs, frontier %d tensors (%.1f MB), run %.2fs",
            len(piece.nodes),
            len(piece.inputs),
            len(piece.outputs),
            len(self.cache),
            sum(a.nbytes for v in self.cache.values() for a in v if a is not None) / 1e6,
            run_s,
        )


# ---------------------------------------------------------------------------- inside If/Loop/Scan bodies

_BODY_OPS = ("If", "Loop", "Scan")


def body_path(model: onnx.ModelProto, node: onnx.NodeProto) -> list[tuple[onnx.NodeProto, str, int]] | None:
    """Where ``node`` lives: the chain ``(owner node, attribute name, index in GRAPHS)`` from the main
    graph down to the If/Loop/Scan body that holds it (``[]`` in the main graph; None when it is not
    in the main graph's tree, e.g. inside a model-local function). Found by identity."""

    def search(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, str, int]] | None:
        for n in graph.node:
            if n is node:
                return []
        for n in graph.node:
            for a in n.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for k, sub in enumerate(subs):
                    found = search(sub)
                    if found is not None:
                        return [(n, a.name, k), *found]
        return None

    return search(model.graph)


def _subgraph(owner: onnx.NodeProto, attr: str, index: int) -> onnx.GraphProto:
    a = next(a for a in owner.attribute if a.name == attr)
    return a.g if a.type == onnx.AttributeProto.GRAPH else a.graphs[index]


def body_producers(model: onnx.ModelProto, node: onnx.NodeProto) -> dict[str, onnx.NodeProto] | None:
    """Who produces each name ``node`` can see: its own graph's nodes over every enclosing graph's
    (None when ``node`` is not in the main graph's tree)."""
    path = body_path(model, node)
    if path is None:
        return None
    graphs = [model.graph] + [_subgraph(owner, attr, k) for owner, attr, k in path]
    out: dict[str, onnx.NodeProto] = {}
    for g in graphs:  # inner scopes override outer ones
        out.update({o: n for n in g.node for o in n.output if o})
    return out


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value shape inference can type, in every graph (names are scoped
    uniquely enough for activations: an inner name shadowing an outer one is invalid ONNX)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a model inference cannot type: fall back to float below
        return {}
    out: dict[str, int] = {}

    def walk(g: onnx.GraphProto) -> None:
        for vi in [*g.value_info, *g.input, *g.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                out.setdefault(vi.name, vi.type.tensor_type.elem_type)
        for n in g.node:
            for a in n.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    walk(sub)

    walk(inferred.graph)
    return out


def expose_body_values(
    model: onnx.ModelProto, targets: Sequence[tuple[list[tuple[onnx.NodeProto, str, int]], str]]
) -> tuple[onnx.ModelProto, list[tuple[str, int]]]:
    """A copy of ``model`` in which each target value, defined inside an If/Loop/Scan body, is also a
    main-graph output.

    Each target is ``(body_path(model, node), value name)``. The value becomes an extra output of
    its body and of the owning node, level by level up to the main graph: an If's other branch
    gives an empty tensor (so an empty result means "this branch was not taken"), a Loop or
    Scan body gives it as a new scan output (every iteration's value, stacked).

    Returns:
        The copy and, per target, the main-graph output name and how many loop levels stacked
        it (leading axes to merge into the batch).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = _elem_types(model)
    # The same chain of nodes in the copy (same positions; found through the original's indices).
    used = {o.name for o in model.graph.output}
    counter = [0]

    def fresh(stem: str) -> str:
        counter[0] += 1
        name = f"onnx_sparse_capture_{counter[0]}_{stem}"
        while name in used:
            counter[0] += 1
            name = f"onnx_sparse_capture_{counter[0]}_{stem}"
        used.add(name)
        return name

    results: list[tuple[str, int]] = []
    for path, value in targets:
        # walk the copy along the path (by node position in each graph)
        graphs = [out.graph]
        owners: list[tuple[onnx.NodeProto, str, int]] = []
        src_graphs = [model.graph]
        for owner, attr, k in path:
            pos = next(i for i, n in enumerate(src_graphs[-1].node) if n is owner)
            copy_owner = graphs[-1].node[pos]
            owners.append((copy_owner, attr, k))
            graphs.append(_subgraph(copy_owner, attr, k))
            src_graphs.append(_subgraph(owner, attr, k))
        elem = types.get(value, TensorProto.FLOAT)
        # An Identity inside the innermost body: the value may be an outer-scope one, which a body
        # may not return as it is.
        name, loops = fresh("value"), 0
        graphs[-1].node.append(onnx.helper.make_node("Identity", [value], [name]))
        for depth in range(len(owners) - 1, -1, -1):
            owner, attr, _ = owners[depth]
            body = graphs[depth + 1]
            body.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            if owner.op_type == "If":
                other_attr = "else_branch" if attr == "then_branch" else "then_branch"
                other = _subgraph(owner, other_attr, 0)
                empty = fresh("none")
                other.node.append(
                    onnx.helper.make_node(
                        "Constant",
                        [],
                        [empty],
                        value=numpy_helper.from_array(
                            np.zeros((0,), onnx.helper.tensor_dtype_to_np_dtype(elem)), empty
                        ),
                    )
                )
                other.output.append(onnx.helper.make_tensor_value_info(empty, elem, None))
            elif owner.op_type in ("Loop", "Scan"):
                loops += 1
                if owner.op_type == "Scan":
                    for a in owner.attribute:
                        if a.name in ("scan_output_axes", "scan_output_directions"):
                            a.ints.append(0)
            else:
                raise OnnxSparseError(f"cannot capture inside a {owner.op_type} body", hint="only If/Loop/Scan")
            name_up = fresh(value.replace("/", "_")[-40:])
            owner.output.append(name_up)
            name = name_up
        out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        results.append((name, loops))
    return out, results


def iter_body_values(
    mf: ModelFile,
    feeds: Sequence[Mapping[str, np.ndarray]],
    targets: Sequence[tuple[onnx.NodeProto, str]],
    threads: int | None = None,
    like: onnx.ModelProto | None = None,
) -> Iterator[tuple[int, list[np.ndarray | None]]]:
    """Per calibration sample, the value each ``(node inside a body, value name)`` really had in a
    whole-model run of ``mf`` as it is now (current weights): the array, with the iterations of
    enclosing loops merged into its first axis, or None when the sample never reached it (an If
    branch not taken, a loop that ran zero times). ``like``: the model the target nodes belong to,
    when that is a structural copy of ``mf.model`` (the dense model of ``asym``)."""
    model = inline_model(mf, keep_external=True)
    paths = []
    for node, value in targets:
        path = body_path(like if like is not None else mf.model, node)
        if not path:
            raise AssertionError(f"{value!r}: not inside an If/Loop/Scan body")
        if like is not None:
            path = _same_path(like, mf.model, path)
        paths.append((_same_path(mf.model, model, path), value))
    exposed, outs = expose_body_values(model, paths)
    del model
    names = [n for n, _ in outs]
    sess = model_session(mf, exposed, threads)
    for i, feed in enumerate(feeds):
        values = _run(sess, names, feed, sample_number(feed, i))
        result: list[np.ndarray | None] = []
        for v, (_, loops) in zip(values, outs, strict=True):
            a = np.asarray(v)
            if a.size == 0:
                result.append(None)
                continue
            if loops:
                a = a.reshape((-1, *a.shape[loops + 1 :])) if a.ndim > loops + 1 else a.reshape(-1)
            result.append(a)
        yield i, result


def _same_path(
    src: onnx.ModelProto, dst: onnx.ModelProto, path: list[tuple[onnx.NodeProto, str, int]]
) -> list[tuple[onnx.NodeProto, str, int]]:
    """``path`` (in ``src``) as the same chain of nodes in ``dst``, a structural copy of ``src``."""
    out = []
    g_src, g_dst = src.graph, dst.graph
    for owner, attr, k in path:
        pos = next(i for i, n in enumerate(g_src.node) if n is owner)
        owner_dst = g_dst.node[pos]
        out.append((owner_dst, attr, k))
        g_src, g_dst = _subgraph(owner, attr, k), _subgraph(owner_dst, attr, k)
    return out
