"""The one owner of onnxruntime sessions: how they are opened, how quiet they are, what a failure means.

Every onnxruntime session onnx-sparse opens (calibration captures, output checks, INT8 error
probes, weight paths, compare's runners) comes from :func:`session`, and every run on the
user's data goes through :func:`run` or :func:`user_error`, so that:

* onnxruntime's own C++ logger stays silent (severity FATAL) unless ``-v`` is given (the
  ``onnx_sparse`` logger at DEBUG: then errors show). Without this, a failure prints a raw,
  coloured ``[E:onnxruntime:, sequential_executor.cc:...]`` line next to our one ``[E]`` line.
  The process-wide default (:func:`quiet`) also covers sessions that onnxruntime's own
  quantizer opens.
* a model that cannot run on the data given (a shape it cannot take, a value out of range)
  is the user's input problem: :class:`~onnx_sparse.errors.OnnxSparseError`, so exit 2 with one
  line and the hint to give real data or real sizes (:data:`DATA_HINT`), never an internal
  error.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnx_sparse.errors import OnnxSparseError, first_line
from onnx_sparse.protofields import copy_fields

__all__ = [
    "DATA_HINT",
    "IN_PLACE_BYTES",
    "ModelBytes",
    "severity",
    "quiet",
    "session",
    "model_bytes",
    "array_type",
    "with_outputs",
    "run",
    "is_ort_error",
    "user_error",
    "message",
]

logger = logging.getLogger(__name__)

DATA_HINT = (
    "check that the inputs have the shapes and values the model expects: pass real samples with "
    "--load-inputs or --data-loader-script, or real sizes for dynamic inputs with --input-shapes"
)

#: Initializers at least this large (bytes) reach a session opened on :func:`model_bytes` as arrays it reads in place.
IN_PLACE_BYTES = 1 << 20

_VERBOSE = 3  # ERROR: under -v, onnxruntime's own error lines are shown
_QUIET = 4  # FATAL: nothing onnxruntime logs reaches the terminal


def severity() -> int:
    """onnxruntime's log severity for this process now: errors under ``-v``, fatal only otherwise."""
    return _VERBOSE if logging.getLogger("onnx_sparse").isEnabledFor(logging.DEBUG) else _QUIET


def quiet() -> None:
    """Set onnxruntime's process-wide default logger to :func:`severity` (sessions onnxruntime opens itself)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(severity())


def session(
    model: Any,
    *,
    what: str = "the model",
    threads: int | None = None,
    optimize: bool = True,
    prepack: bool = True,
    spin: bool = True,
    providers: Sequence[Any] | None = None,
    hint: str | None = None,
    external_folder: str | os.PathLike[str] | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` (CPU unless ``providers``) with onnxruntime's logging quieted.

    Args:
        model: An ``onnx.ModelProto``, serialized bytes, a path, or :class:`ModelBytes` (its large
            initializers read in place from its arrays, which the session keeps alive).
        what: Names the model in the error (``"the output"``, ``"the dense model"``).
        threads: Intra-op threads (None: onnxruntime's default).
        optimize: False: no graph optimizations (for checks and probes).
        prepack: False: no weight prepacking (opening is the whole job).
        spin: False: worker threads do not spin between runs (calibration alternates runs with numpy).
        providers: Execution providers (default CPU).
        hint: The error's hint (default: how to make onnxruntime accept the model).
        external_folder: For a model given in memory whose tensors are external data: the folder
            their locations are relative to (onnxruntime maps the files itself; no copy here).

    Raises:
        OnnxSparseError: onnxruntime cannot open the model.
    """
    import onnxruntime as ort

    quiet()
    opts = ort.SessionOptions()
    opts.log_severity_level = severity()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    if external_folder is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_folder))
    arrays: list[Any] = []
    if isinstance(model, ModelBytes):
        source: Any = model.data
        if model.initializers:
            arrays = [ort.OrtValue.ortvalue_from_numpy(a) for a in model.initializers.values()]
            opts.add_external_initializers(list(model.initializers), arrays)
    elif isinstance(model, os.PathLike):
        source = str(model)
    elif isinstance(model, (str, bytes)):
        source = model
    else:
        source = model.SerializeToString()
    try:
        sess = ort.InferenceSession(source, sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise OnnxSparseError(
            f"onnxruntime cannot open {what}: {first_line(exc)}",
            hint=hint or "the model must load in onnxruntime on the CPU; custom operators must be registered there",
        ) from exc
    if arrays:
        sess._onnx_sparse_initializers = arrays  # onnxruntime reads them for as long as the session lives
    return sess


@dataclass(frozen=True)
class ModelBytes:
    """A model serialized without the data of its large initializers, and that data as arrays.

    A session opened on it (:func:`session`) reads the arrays in place (onnxruntime's external
    initializers), so a large model's weights are not serialized into the bytes, parsed back and
    copied into the session: the INT8 steps open several sessions of a model whose weights
    dominate it (MiniLM's 47 MB embedding), each of those copies costing about as much as the
    session's own work.
    """

    data: bytes
    initializers: Mapping[str, np.ndarray]


# onnx TensorProto data types whose raw data numpy reads as it is (little-endian): FLOAT, UINT8, INT8,
# UINT16, INT16, INT32, INT64, FLOAT16, DOUBLE, UINT32, UINT64
_IN_PLACE_TYPES = dict(
    zip((1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13), "<f4 u1 i1 <u2 <i2 <i4 <i8 <f2 <f8 <u4 <u8".split(), strict=True)
)


def _in_place(t: Any, min_bytes: int) -> bool:
    """Whether tensor ``t``'s data can go to a session as an array: inline raw data of a plain numeric type,
    at least ``min_bytes`` (from its shape, without reading the data)."""
    kind = _IN_PLACE_TYPES.get(t.data_type)
    if kind is None or t.data_location != 0 or len(t.external_data) or not t.HasField("raw_data"):  # 0: DEFAULT
        return False
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(kind).itemsize >= min_bytes


def array_type(data_type: int) -> np.dtype | None:
    """The numpy dtype a session reads in place for onnx TensorProto type ``data_type`` (None: none)."""
    kind = _IN_PLACE_TYPES.get(data_type)
    return None if kind is None else np.dtype(kind)


def model_bytes(
    model: Any, min_bytes: int = IN_PLACE_BYTES, *, values: Mapping[str, np.ndarray] | None = None
) -> ModelBytes:
    """``model`` (an ``onnx.ModelProto``) as :class:`ModelBytes`: the main graph's initializers of at least
    ``min_bytes`` become arrays (one copy of their data, no copy of the model), the rest is serialized.
    The model itself is not touched; a session on the result computes what one on the model does.

    ``values``: main-graph initializers (by name) whose value is this array instead of what the model
    holds (C-contiguous, of :func:`array_type`; read in place, whatever their size or location)."""
    import onnx

    graph = model.graph
    values = values or {}
    if not values and not any(_in_place(t, min_bytes) for t in graph.initializer):
        return ModelBytes(model.SerializeToString(), {})
    lean = onnx.ModelProto()
    copy_fields(model, lean, "graph")
    copy_fields(graph, lean.graph, "initializer")
    arrays: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        given = values.get(t.name)
        if given is not None:
            if given.dtype != array_type(t.data_type) or not given.flags.c_contiguous:
                raise ValueError(f"tensor {t.name!r}: a value of dtype {given.dtype} cannot be read in place")
            arrays[t.name] = given
        elif not _in_place(t, min_bytes):
            lean.graph.initializer.append(t)
            continue
        else:
            arrays[t.name] = np.frombuffer(t.raw_data, dtype=array_type(t.data_type)).reshape(tuple(t.dims))
        stub = lean.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="onnx-sparse-in-memory")  # never read: given as arrays
    return ModelBytes(lean.SerializeToString(), arrays)


def with_outputs(model: Any, names: Iterable[str], serialized: bytes | ModelBytes | None = None) -> Any:
    """``model`` (an ``onnx.ModelProto``) serialized with ``names`` added to its graph outputs (the ones
    it does not have yet, untyped), for a session that exposes inner tensors, without copying the model.

    Protobuf parses a message followed by another as their merge, a repeated field of the second
    appended to the first's: the bytes are the model's then a model holding only the new outputs.
    ``serialized``: ``model.SerializeToString()`` or :func:`model_bytes` ``(model)``, when the caller
    already has it (the result is then of the same kind).
    """
    import onnx

    existing = {o.name for o in model.graph.output}
    extra = onnx.ModelProto()
    for name in names:
        if name not in existing:
            extra.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)
    head = model.SerializeToString() if serialized is None else serialized
    if not len(extra.graph.output):
        return head
    if isinstance(head, ModelBytes):
        return ModelBytes(head.data + extra.SerializeToString(), head.initializers)
    return head + extra.SerializeToString()


def run(sess: Any, names: Sequence[str] | None, feed: Mapping[str, np.ndarray], *, where: str) -> list[Any]:
    """``sess.run(names, feed)``; a failure is the user's data problem (:func:`user_error`)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = severity()
    try:
        return sess.run(None if names is None else list(names), dict(feed), options)
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise user_error(exc, where) from exc


def is_ort_error(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by onnxruntime (its C++ status errors: InvalidArgument, Fail, ...)."""
    return type(exc).__module__.startswith("onnxruntime")


def user_error(exc: BaseException, where: str) -> OnnxSparseError:
    """The one-line error for onnxruntime failing while running a model on the user's data."""
    return OnnxSparseError(f"onnxruntime failed on {where}: {message(exc)}", hint=DATA_HINT)


_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ")


def message(exc: BaseException) -> str:
    """onnxruntime's error in one short line: the status prefix dropped, and of the chain of
    ``while running If node ... Status Message: while running Pad node ...`` only the innermost
    node and its message."""
    text = _STATUS.sub("", first_line(exc))
    nodes = list(_NODE.finditer(text))
    if not nodes:
        return text
    last = nodes[-1]
    return f"{last.group(1)} node {last.group(2)!r}: {text[last.end() :]}"
