"""TensorRT through Polygraphy: build dense and sparse engines, keep the builder log, time them.

Nothing here imports TensorRT (or Polygraphy's TensorRT backend) at module level, so the
package imports on machines without it; :func:`trt_version` says whether it is there.

Precision flags: TensorRT 10.12 deprecated weak typing (the FP16/INT8/BF16/FP8 builder flags)
and TensorRT 11 removed them; networks are strongly typed and precision comes from the model
(fp16 tensors, or explicit Q/DQ). So on TensorRT >= 11 an fp16 engine needs an fp16 model
(:func:`onnx_sparse.passes.fp16.to_fp16`), and :func:`build_engine` refuses ``fp16``/``int8``.
``SPARSE_WEIGHTS`` exists in both. :func:`plan_precision` makes that choice for a model file.

Builder log: Polygraphy routes TensorRT's log through its own logger (TensorRT INFO at
Polygraphy VERBOSE, TensorRT VERBOSE at EXTRA_VERBOSE). :func:`capture_polygraphy_log` lowers
Polygraphy's threshold for the duration and sends its messages through Python logging into a
list instead of stdout, which gives the whole builder log as text, including the
``(Sparsity)`` lines :mod:`onnx_sparse.handoff.trtlog` reads. Messages Polygraphy would
have shown are passed on to this module's logger (Polygraphy VERBOSE as DEBUG).
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from onnx_sparse.errors import OnnxSparseError, first_line

__all__ = [
    "PRECISION_FLAGS_REMOVED_IN",
    "PRECISION_FLAGS_DEPRECATED_IN",
    "TRT_INSTALL_HINT",
    "trt_version",
    "has_precision_flags",
    "require_trt",
    "capture_polygraphy_log",
    "LogLine",
    "EngineBuild",
    "build_engine",
    "time_engine",
    "PrecisionPlan",
    "plan_precision",
    "EngineLayer",
    "parse_layer_info",
    "engine_layers",
]

logger = logging.getLogger(__name__)

PRECISION_FLAGS_DEPRECATED_IN = (10, 12)
PRECISION_FLAGS_REMOVED_IN = (11, 0)
TRT_INSTALL_HINT = (
    "install TensorRT on a machine with an NVIDIA GPU (`pip install tensorrt`, or NVIDIA's TensorRT "
    "container); `onnx-sparse compare --onnxrt` works without it"
)


def trt_version() -> str | None:
    """The installed TensorRT version string (``tensorrt.__version__``), or None if it is not importable."""
    try:
        import tensorrt
    except Exception:  # ImportError, or a broken install (missing shared libraries)
        return None
    return str(getattr(tensorrt, "__version__", "0"))


def _major_minor(version: str) -> tuple[int, int]:
    nums: list[int] = []
    for part in version.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    while len(nums) < 2:
        nums.append(0)
    return nums[0], nums[1]


def has_precision_flags(version: str) -> bool:
    """Whether this TensorRT version has the FP16/INT8 builder flags (True before 11.0).

    They are deprecated since 10.12 (weak typing) and gone in 11.0 (strongly typed networks).
    """
    return _major_minor(version) < PRECISION_FLAGS_REMOVED_IN


def require_trt() -> str:
    """The TensorRT version; raises OnnxSparseError (with how to get it) when it is not installed."""
    version = trt_version()
    if version is None:
        raise OnnxSparseError("TensorRT is not installed (cannot import tensorrt)", hint=TRT_INSTALL_HINT)
    return version


# --------------------------------------------------------------------------- log capture

_LETTERS = ("[U] ", "[S] ", "[X] ", "[V] ", "[I] ", "[W] ", "[E] ", "[!] ")


@dataclass(frozen=True)
class LogLine:
    """One Polygraphy log message: its Python logging level and its text (letter prefix included)."""

    level: int
    text: str

    @property
    def message(self) -> str:
        """The text without Polygraphy's ``[V] `` letter."""
        for letter in _LETTERS:
            if self.text.startswith(letter):
                return self.text[len(letter) :]
        return self.text


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[LogLine], forward_level: int, to: logging.Logger) -> None:
        super().__init__(level=1)
        self.lines = lines
        self.forward_level = forward_level
        self.to = to

    def emit(self, record: logging.LogRecord) -> None:
        line = LogLine(record.levelno, record.getMessage())
        self.lines.append(line)
        if record.levelno >= self.forward_level:
            level = logging.DEBUG if record.levelno < logging.INFO else min(record.levelno, logging.CRITICAL)
            if logging.INFO < level < logging.WARNING:  # Polygraphy START/FINISH
                level = logging.INFO
            self.to.log(level, "%s", line.message)


@contextlib.contextmanager
def capture_polygraphy_log(
    forward_level: int = logging.DEBUG,
    severity: int | None = None,
    to: logging.Logger | None = None,
) -> Iterator[list[LogLine]]:
    """Collect Polygraphy's (and so TensorRT's) log messages instead of printing them.

    Args:
        forward_level: messages at or above this Python logging level are also passed on to
            ``to`` (Polygraphy VERBOSE as DEBUG, INFO/START/FINISH as INFO).
        severity: Polygraphy severity threshold while capturing; default EXTRA_VERBOSE, which
            includes TensorRT's INFO and VERBOSE messages.
        to: the logger messages are passed on to (default: this module's).

    Yields:
        The list the messages are appended to, in order.
    """
    from polygraphy.logger import G_LOGGER

    lines: list[LogLine] = []
    py_logger = logging.getLogger("Polygraphy")
    handler = _ListHandler(lines, forward_level, to or logger)
    saved = (
        G_LOGGER.use_python_logging_system,
        G_LOGGER.colors,
        py_logger.level,
        py_logger.propagate,
    )
    py_logger.addHandler(handler)
    py_logger.setLevel(1)
    py_logger.propagate = False
    G_LOGGER.colors = False
    G_LOGGER.use_python_logging_system = True
    try:
        with G_LOGGER.verbosity(G_LOGGER.EXTRA_VERBOSE if severity is None else severity):
            yield lines
    finally:
        G_LOGGER.use_python_logging_system = saved[0]
        G_LOGGER.colors = saved[1]
        py_logger.setLevel(saved[2])
        py_logger.propagate = saved[3]
        py_logger.removeHandler(handler)


# --------------------------------------------------------------------------- build


class EngineBuild(NamedTuple):
    """A built engine (serialized bytes, or the path it was saved to) and the builder log text."""

    engine: bytes | Path
    log: str


def build_engine(
    model_path: str | os.PathLike[str],
    sparse: bool = True,
    *,
    fp16: bool = False,
    int8: bool = False,
    save_path: str | os.PathLike[str] | None = None,
    strongly_typed: bool | None = None,
    detailed: bool = True,
) -> EngineBuild:
    """Build a TensorRT engine from an ONNX file with Polygraphy, capturing the builder log.

    Args:
        model_path: the ONNX model (external data beside it).
        sparse: set ``SPARSE_WEIGHTS`` (``CreateConfig(sparse_weights=True)``).
        fp16, int8: precision flags; TensorRT < 11 only (int8 for Q/DQ models: no calibration).
        save_path: write the serialized engine there and return its path instead of the bytes.
        strongly_typed: build a strongly typed network (TensorRT 11 always does).
        detailed: ``profilingVerbosity=DETAILED``, so the engine inspector reports each layer's
            tactic (:func:`engine_layers`).

    Returns:
        :class:`EngineBuild`: the engine (bytes, or ``save_path``) and the builder log.

    Raises:
        OnnxSparseError: TensorRT missing, precision flags on TensorRT >= 11, or the build failed.
    """
    version = require_trt()
    if (fp16 or int8) and not has_precision_flags(version):
        raise OnnxSparseError(
            f"TensorRT {version} has no FP16/INT8 builder flags (removed in 11.0; networks are strongly typed)",
            hint="convert the model to fp16 first (onnx_sparse.passes.fp16.to_fp16, or `onnx-sparse build --fp16`)",
        )
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    path = Path(model_path)
    if not path.is_file():
        raise OnnxSparseError(f"{path}: no such file", hint="check the model path")
    network = NetworkFromOnnxPath(str(path), strongly_typed=strongly_typed)
    extra: dict[str, Any] = {}
    if detailed:
        import tensorrt

        extra["profiling_verbosity"] = tensorrt.ProfilingVerbosity.DETAILED
    # int8 here is explicit quantization (a Q/DQ model); no calibrator is ever set.
    config = CreateConfig(sparse_weights=sparse, fp16=fp16 or None, int8=int8 or None, **extra)
    what = f"{'sparse' if sparse else 'dense'} engine for {path.name}"
    flags = "".join(f", {name}" for name, on in (("FP16", fp16), ("INT8", int8)) if on)
    logger.info("building the %s (TensorRT %s%s)", what, version, flags)
    with capture_polygraphy_log() as lines:
        try:
            engine = EngineBytesFromNetwork(network, config=config)()
        except PolygraphyException as exc:
            raise OnnxSparseError(
                f"TensorRT could not build the {what}: {first_line(exc)}",
                hint="rerun with -v to see the builder log",
            ) from exc
        except (TypeError, RuntimeError) as exc:  # e.g. no GPU: "factory function returned nullptr"
            raise OnnxSparseError(
                f"TensorRT could not start building the {what}: {exc}",
                hint="TensorRT needs an NVIDIA GPU and driver (NVIDIA/TensorRT#2913)",
            ) from exc
    log = "\n".join(line.text for line in lines)
    if save_path is not None:
        out = Path(save_path)
        _write_atomic(out, bytes(engine))
        logger.info("saved %s to %s", what, out)
        return EngineBuild(out, log)
    return EngineBuild(bytes(engine), log)


def _write_atomic(path: Path, data: bytes) -> None:
    folder = path.resolve().parent
    if not folder.is_dir():
        raise OnnxSparseError(f"{path}: output folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".onnx-sparse-", suffix=".engine", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _engine_loader(engine: Any):
    from polygraphy.backend.trt import EngineFromBytes, EngineFromPath

    if isinstance(engine, EngineBuild):
        engine = engine.engine
    if isinstance(engine, (bytes, bytearray, memoryview)):
        return EngineFromBytes(bytes(engine))
    if isinstance(engine, (str, os.PathLike)):
        return EngineFromPath(str(engine))
    return engine  # an ICudaEngine (or a callable returning one)


def time_engine(
    engine: Any,
    inputs: Mapping[str, Any] | None = None,
    iterations: int = 100,
    warmup: int = 10,
) -> float:
    """Median latency of one inference, in milliseconds, with Polygraphy's TrtRunner.

    Inputs are copied to the GPU once; outputs stay on the GPU, so the time is execution plus
    synchronization, not host transfers.

    Args:
        engine: engine bytes, a path to a serialized engine, an :class:`EngineBuild`, or an
            ``ICudaEngine``.
        inputs: feed dict (name -> numpy array); default: Polygraphy's seeded ``DataLoader``
            for the engine's input shapes.
        iterations: timed inferences (at least 1); warmup: untimed ones before.
    """
    require_trt()
    import numpy as np
    from polygraphy import cuda
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.comparator import DataLoader
    from polygraphy.datatype import DataType

    if iterations < 1:
        raise OnnxSparseError(f"iterations must be at least 1, got {iterations}")
    from polygraphy.logger import G_LOGGER

    with (
        capture_polygraphy_log(forward_level=logging.WARNING, severity=G_LOGGER.INFO),
        contextlib.ExitStack() as stack,
    ):
        runner = stack.enter_context(TrtRunner(_engine_loader(engine), name="timing"))
        if inputs is None:
            loader = DataLoader()
            loader.input_metadata = runner.get_input_metadata()
            inputs = loader[0]
        feed = {}
        for name, value in inputs.items():
            arr = np.ascontiguousarray(value)
            dev = cuda.DeviceArray(shape=arr.shape, dtype=DataType.from_dtype(arr.dtype))
            stack.callback(dev.free)
            feed[name] = dev.copy_from(arr)
        for _ in range(warmup):
            runner.infer(feed, copy_outputs_to_host=False)
        times = []
        for _ in range(iterations):
            runner.infer(feed, check_inputs=False, copy_outputs_to_host=False)
            times.append(runner.last_inference_time())
    return 1000.0 * statistics.median(times)


# --------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class PrecisionPlan:
    """How to get fp16/int8 kernels out of one TensorRT version for one model.

    Attributes:
        path: the model file to build (a converted fp16 copy when ``converted``).
        fp16, int8: builder flags to set (TensorRT < 11 only; int8 only for a Q/DQ model).
        converted: the model was converted to fp16 for a strongly typed build.
        note: one line on what was decided, for the log.
        strongly_typed: build a strongly typed network (TensorRT >= 11).
        qdq: the model is explicitly quantized (Q/DQ).
    """

    path: Path
    fp16: bool
    int8: bool
    converted: bool
    note: str
    strongly_typed: bool = False
    qdq: bool = False


INT8_NEEDS_QDQ_HINT = (
    "quantize it first: `onnx-sparse quantize MODEL -o MODEL.int8.onnx --load-inputs calib.json` "
    "(or `onnx-sparse prune ... --int8`); implicit INT8 calibration in TensorRT is not used"
)


def plan_precision(
    model_path: str | os.PathLike[str],
    fp16: bool,
    workdir: str | os.PathLike[str],
    *,
    int8: bool = False,
    version: str | None = None,
) -> PrecisionPlan:
    """Decide flags or conversion for ``fp16``/``int8`` on the installed TensorRT (or ``version``).

    * ``int8`` needs an explicitly quantized (Q/DQ) model: INT8 always comes from the model's
      Q/DQ, never from TensorRT's implicit calibration.
    * TensorRT < 11: ``fp16`` sets the FP16 flag; a Q/DQ model gets the INT8 flag (explicit
      quantization needs it; no calibrator is set).
    * TensorRT >= 11: strongly typed, no flags. A Q/DQ model builds as it is (its float parts in
      fp32 unless ``fp16``); ``fp16`` converts the float parts to fp16 (into ``workdir``) with
      :func:`onnx_sparse.passes.fp16.to_fp16`.
    """
    version = version or require_trt()
    from onnx_sparse.io import load_model
    from onnx_sparse.passes.fp16 import has_qdq, is_fp16

    path = Path(model_path)
    mf = load_model(path)
    qdq = has_qdq(mf.model)
    if int8 and not qdq:
        raise OnnxSparseError(f"--int8: {path} has no QuantizeLinear/DequantizeLinear", hint=INT8_NEEDS_QDQ_HINT)
    if has_precision_flags(version):
        flags = [name for name, on in (("FP16", fp16), ("INT8", qdq)) if on]
        if flags:
            note = (
                f"TensorRT {version}: builder flags {'+'.join(flags)}{' (Q/DQ model, no calibration)' if qdq else ''}"
            )
        else:
            note = f"TensorRT {version}: fp32 build; TensorRT runs sparse kernels only in FP16 or INT8 (pass --fp16)"
        return PrecisionPlan(path, fp16=fp16, int8=qdq, converted=False, note=note, qdq=qdq)
    typed = f"TensorRT {version} (strongly typed, no precision flags)"
    if not fp16 or is_fp16(mf.model):
        if qdq:
            why = "INT8 from the model's Q/DQ" + ("" if not fp16 else ", float parts already fp16")
        elif is_fp16(mf.model):
            why = "model already fp16"
        else:
            why = "fp32 tensors stay fp32 (pass --fp16 for sparse kernels)"
        return PrecisionPlan(path, False, False, False, f"{typed}: {why}", strongly_typed=True, qdq=qdq)
    from onnx_sparse.io import save_model
    from onnx_sparse.passes.fp16 import Fp16Pass

    result = Fp16Pass()(mf)
    out = Path(workdir) / (path.stem + ".fp16.onnx")
    save_model(result.model, out, verify=False)
    what = "float parts converted to fp16, INT8 from the model's Q/DQ" if qdq else "model converted to fp16"
    return PrecisionPlan(out, False, False, True, f"{typed}: {what}", strongly_typed=True, qdq=qdq)


# --------------------------------------------------------------------------- engine inspector


@dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine, from the engine inspector (``IEngineInspector``, JSON).

    Attributes:
        name: the TensorRT layer name (the same names the builder log uses).
        tactic: ``TacticName`` ("" unless built with ``profilingVerbosity=DETAILED``).
        sparse_weights: ``HasSparseWeights`` where the layer reports it, else None.
    """

    name: str
    tactic: str = ""
    sparse_weights: bool | None = None

    @property
    def sparse_tactic(self) -> bool:
        """Whether the chosen tactic is a sparse kernel (its name says ``sparse``)."""
        return "sparse" in self.tactic.lower()


def parse_layer_info(info: str | Mapping[str, Any]) -> list[EngineLayer]:
    """The layers of the inspector's JSON (``{"Layers": [...]}``; items are dicts when DETAILED,
    names only otherwise)."""
    import json

    doc = json.loads(info) if isinstance(info, str) else info
    layers = doc.get("Layers", []) if isinstance(doc, Mapping) else []
    out = []
    for item in layers:
        if isinstance(item, str):
            out.append(EngineLayer(item))
        elif isinstance(item, Mapping):
            sw = item.get("HasSparseWeights")
            out.append(
                EngineLayer(
                    str(item.get("Name", "")), str(item.get("TacticName", "") or ""), None if sw is None else bool(sw)
                )
            )
    return out


def engine_layers(engine: Any) -> list[EngineLayer]:
    """Per-layer tactic names of a built engine (bytes, path, :class:`EngineBuild` or ``ICudaEngine``)."""
    require_trt()
    import tensorrt

    loaded = _engine_loader(engine)
    cuda_engine = loaded() if callable(loaded) else loaded
    inspector = cuda_engine.create_engine_inspector()
    return parse_layer_info(inspector.get_engine_information(tensorrt.LayerInformationFormat.JSON))
