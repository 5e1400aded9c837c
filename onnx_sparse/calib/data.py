"""Calibration feeds, the Polygraphy way.

A calibration set is a list of *feeds*: ``{input name: numpy array}``, one per model run.
They come from (first match wins):

* ``--load-inputs FILE...``: Polygraphy JSON (``polygraphy run --save-inputs``; a JSON list of
  feeds, or a folder of per-iteration files), read with Polygraphy's own loader;
* ``--data-loader-script SCRIPT[:FUNC]``: a Python script whose function (default
  ``load_data``) returns an iterable of feeds, imported with Polygraphy's helper;
* otherwise Polygraphy's seeded random ``DataLoader`` (``--seed``, ``--iterations``,
  ``--input-shapes name:[1,3,224,224]`` for dynamic dimensions). This is the last resort and
  says so loudly: pruning calibrated on noise is not calibrated, and any accuracy number
  measured on it means nothing.

Every feed is checked against the model's inputs (names, dtypes, ranks, fixed dimensions)
before anything runs, so a bad data set fails early with an :class:`OnnxSparseError` that
names the feed, the input and what was expected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_sparse.errors import OnnxSparseError

__all__ = [
    "Feed",
    "Sample",
    "sample_number",
    "require_finite",
    "InputSpec",
    "RANDOM_DATA_WARNING",
    "as_array",
    "model_inputs",
    "parse_input_shapes",
    "load_inputs",
    "load_data_script",
    "random_feeds",
    "random_data_shapes",
    "validate_feeds",
    "split_holdout",
    "load_calibration",
]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

RANDOM_DATA_WARNING = (
    "NO CALIBRATION DATA GIVEN: using Polygraphy's seeded RANDOM inputs. The pruned weights are fitted to "
    "noise and any accuracy or fidelity number measured on it says nothing about real inputs. "
    "Pass --load-inputs or --data-loader-script with real samples before trusting the result."
)


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, and shape (int for fixed dims, str/None for dynamic ones)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of the main graph (initializers listed as inputs are left out)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise OnnxSparseError(
                f"model input {vi.name!r} is not a tensor",
                hint="calibration supports tensor inputs only",
            )
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, ValueError, TypeError) as exc:
            raise OnnxSparseError(f"model input {vi.name!r} has an unsupported element type {tt.elem_type}") from exc
        shape = None
        if tt.HasField("shape"):
            dims: list[int | str | None] = []
            for d in tt.shape.dim:
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            shape = tuple(dims)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


def _polygraphy_call(
    what: str, fn: Callable[[], Any], hint: str | None = None, also: tuple[type[BaseException], ...] = ()
) -> Any:
    """Run a Polygraphy helper quietly, turning its exceptions (and ``also``) into OnnxSparseError."""
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):  # Polygraphy's INFO lines would repeat ours
            return fn()
    except (PolygraphyException, *also) as exc:
        text = " ".join(str(exc).split())
        raise OnnxSparseError(f"{what}: {type(exc).__name__}: {text}", hint=hint) from exc


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse Polygraphy ``--input-shapes`` arguments (``name:[1,3,224,224]``) with Polygraphy's parser.

    Raises:
        OnnxSparseError: A shape that is malformed or not fully static.
    """
    if not specs:
        return {}
    from polygraphy.tools.args.util import util as args_util

    meta = _polygraphy_call(
        "--input-shapes",
        lambda: args_util.parse_meta(list(specs), includes_shape=True, includes_dtype=False),
        hint="use Polygraphy's syntax, e.g. --input-shapes x:[1,3,224,224] ids:[1,128]",
    )
    out: dict[str, tuple[int, ...]] = {}
    for name, (_, shape) in meta.items():
        if shape is None:
            raise OnnxSparseError(f"--input-shapes {name}: no shape given", hint="write name:[d0,d1,...]")
        dims = tuple(shape)
        if not all(isinstance(d, int) and d > 0 for d in dims):
            raise OnnxSparseError(
                f"--input-shapes {name}:{list(dims)} is not a static shape",
                hint="give a positive integer for every dimension",
            )
        out[name] = dims
    return out


def load_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[Feed]:
    """Feeds from Polygraphy JSON input files (``--save-inputs`` output), in order.

    Each path is a JSON list of feeds, a single feed, or (where Polygraphy supports it) a
    folder of per-iteration files.
    """
    for p in paths:
        if not Path(p).exists():
            raise OnnxSparseError(f"--load-inputs {p}: no such file", hint="check the path")
    try:
        from polygraphy.comparator import StreamingDataLoader
    except ImportError:  # older Polygraphy: whole files only
        StreamingDataLoader = None  # noqa: N806

    def read() -> list[Any]:
        if StreamingDataLoader is not None:
            return list(StreamingDataLoader([str(p) for p in paths], allow_dirs=True))
        from polygraphy.json import load_json

        out: list[Any] = []
        for p in paths:
            data = load_json(str(p), description="input data")
            out.extend(data if isinstance(data, list) else [data])
        return out

    feeds = _polygraphy_call(
        f"--load-inputs {', '.join(map(str, paths))}",
        read,
        hint="the file must be Polygraphy JSON, e.g. written by `polygraphy run --save-inputs` or "
        "polygraphy.json.save_json([{name: array}, ...], path)",
        also=(ValueError, TypeError, KeyError, OSError),
    )
    return [_as_feed(f, f"--load-inputs feed {i}") for i, f in enumerate(feeds)]


def load_data_script(spec: str) -> list[Feed]:
    """Feeds from ``SCRIPT[:FUNC]`` (default ``load_data``), imported with Polygraphy's helper."""
    from polygraphy import mod
    from polygraphy.tools.args.util import util as args_util

    script, func_name = args_util.parse_script_and_func_name(spec, default_func_name="load_data")
    if not script or not Path(script).is_file():
        raise OnnxSparseError(f"--data-loader-script {spec}: no such file {script!r}", hint="check the path")
    func = _polygraphy_call(
        f"--data-loader-script {spec}",
        lambda: mod.import_from_script(script, name=func_name),
        hint=f"the script must define a function {func_name}() returning an iterable of {{input name: array}}",
    )
    if not callable(func):
        raise OnnxSparseError(f"--data-loader-script {spec}: {func_name} is not callable")
    try:
        data = func()
        feeds = list(data)
    except OnnxSparseError:
        raise
    except Exception as exc:  # the user's code
        raise OnnxSparseError(
            f"--data-loader-script {spec}: {func_name}() failed: {type(exc).__name__}: {exc}",
            hint="run the script on its own to debug it",
        ) from exc
    return [_as_feed(f, f"--data-loader-script feed {i}") for i, f in enumerate(feeds)]


def random_feeds(
    model: onnx.ModelProto,
    *,
    seed: int | None = None,
    iterations: int = 8,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    warn: bool = True,
) -> list[Feed]:
    """Seeded random feeds from Polygraphy's ``DataLoader`` (logs :data:`RANDOM_DATA_WARNING` unless ``warn`` is False).

    Dynamic dimensions take their size from ``input_shapes``; without it Polygraphy picks
    its default (1) and warns. Rank-0 inputs get rank-0 values.
    """
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import DataLoader

    specs = model_inputs(model)
    shapes = dict(input_shapes or {})
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise OnnxSparseError(
            f"--input-shapes names unknown inputs {unknown}",
            hint=f"the model's inputs are {[s.name for s in specs]}",
        )
    meta = TensorMetadata()
    for name, shape in random_data_shapes(specs, shapes).items():
        meta.add(name, dtype=next(s.dtype for s in specs if s.name == name), shape=shape)
    if warn:
        logger.warning("%s", RANDOM_DATA_WARNING)
    feeds = _polygraphy_call(
        "random data", lambda: list(DataLoader(seed=seed, iterations=iterations, input_metadata=meta))
    )
    return [_as_feed(f, f"random feed {i}") for i, f in enumerate(feeds)]


def random_data_shapes(
    specs: Sequence[InputSpec], input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Static shapes for random data: ``input_shapes`` where given, else the model's, dynamic dims as 1.

    When an input has dynamic dimensions and no given shape, logs ONE warning that names
    ``--input-shapes`` with an example built from the model's inputs (instead of Polygraphy's
    "Dynamic shapes cannot be used to generate inference data", once per sample). Size 1 is
    what Polygraphy would pick.
    """
    given = dict(input_shapes or {})
    out: dict[str, tuple[int, ...]] = {}
    dynamic: list[InputSpec] = []
    for s in specs:
        if s.name in given:
            out[s.name] = tuple(int(d) for d in given[s.name])
            continue
        dims = s.shape or ()
        if any(not isinstance(d, int) for d in dims):
            dynamic.append(s)
        out[s.name] = tuple(d if isinstance(d, int) else 1 for d in dims)
    if dynamic:
        names = ", ".join(f"{s.name} {_fmt_shape(s.shape or ())}" for s in dynamic)
        batch_only = all(isinstance(d, int) for s in dynamic for d in (s.shape or ())[1:])
        logger.log(
            logging.INFO if batch_only else logging.WARNING,
            "dynamic input dimensions without --input-shapes (%s): random data uses size 1 for each%s; "
            "give real sizes, e.g. --input-shapes %s",
            names,
            " (a batch of one)" if batch_only else " (a sequence of one token, an image one pixel high)",
            input_shapes_example(specs, given, batch=8 if batch_only else 1),
        )
    return out


def input_shapes_example(
    specs: Sequence[InputSpec], given: Mapping[str, Sequence[int]] | None = None, batch: int = 1
) -> str:
    """An ``--input-shapes`` value for ``specs``: fixed dims kept, a dynamic batch as ``batch``, other dynamic
    dims as 224 for images (rank 4) and 128 otherwise (a sequence length)."""
    parts = []
    for s in specs:
        if given and s.name in given:
            dims: Sequence[int | str | None] = tuple(given[s.name])
        else:
            rank = len(s.shape or ())
            guess = 224 if rank == 4 else 128
            dims = [d if isinstance(d, int) else (batch if i == 0 else guess) for i, d in enumerate(s.shape or ())]
        parts.append(f"{s.name}:[{','.join(str(d) for d in dims)}]")
    return " ".join(parts)


class Sample(dict):  # type: ignore[type-arg]  # dict[str, np.ndarray], as Feed
    """A validated feed (input name -> array) that remembers its position in the data the user gave
    (``index``): a message about it names the sample the user knows, also where the feed is one of
    a subset (the fitting or the held-out samples)."""

    __slots__ = ("index",)

    def __init__(self, values: Mapping[str, np.ndarray], index: int) -> None:
        super().__init__(values)
        self.index = index


def require_finite(values: Iterable[np.ndarray], tensor: str, sample: int) -> None:
    """Refuse calibration values holding inf or NaN: ``values`` are one sample's arrays of ``tensor`` (its
    value in each model that computes it, or its largest ``|x|`` per channel). Checked through each
    array's largest and smallest value, which any inf or NaN reaches, without a boolean copy. Every
    statistic built on such a value (Gram matrices, means, activation ranges) would be NaN, and the
    weights, biases and scales written from them with it.

    Raises:
        OnnxSparseError: naming the tensor and the calibration sample.
    """
    for v in values:
        if v.size and not (np.isfinite(v.max()) and np.isfinite(v.min())):
            raise OnnxSparseError(
                f"calibration sample {sample}: tensor {tensor!r} holds inf or NaN",
                hint="calibration needs finite values: check that sample (an inf or NaN input) or the model's "
                "arithmetic on it (an overflow)",
            )


def sample_number(feed: Mapping[str, Any], position: int) -> int:
    """The user's number of ``feed`` (a :class:`Sample`), else its ``position`` in the list at hand."""
    return int(getattr(feed, "index", position))


def as_array(value: Any) -> np.ndarray:
    """The one normaliser of a feed value: a C-contiguous numpy array of the same shape.

    Rank 0 stays rank 0 (a sample rate, a threshold): ``np.ascontiguousarray`` would return
    at least one dimension and turn ``()`` into ``(1,)``, which the model then refuses.
    """
    return np.asarray(value, order="C")


def _as_feed(obj: Any, where: str) -> Feed:
    if not isinstance(obj, Mapping):
        raise OnnxSparseError(
            f"{where} is a {type(obj).__name__}, not a mapping of input name to array",
            hint="each sample must be a dict {input name: numpy array}",
        )
    return {str(k): as_array(v) for k, v in obj.items()}


def validate_feeds(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, Any]],
    limit: int | None = None,
    what: str = "calibration feed",
) -> list[Feed]:
    """Check ``feeds`` against the model's inputs and return them as contiguous numpy arrays (:func:`as_array`).

    Args:
        model: The model (only its inputs are read).
        feeds: The samples.
        limit: Keep at most this many feeds (``--calib-samples``).
        what: How errors name a feed (``"calibration feed"``, ``"input feed"``).

    Raises:
        OnnxSparseError: No feeds; a feed that is not a mapping; a missing or unknown input;
            a dtype, rank or fixed dimension that does not match.
    """
    specs = {s.name: s for s in model_inputs(model)}
    out: list[Feed] = []
    for i, raw in enumerate(feeds):
        if limit is not None and len(out) >= limit:
            break
        feed = _as_feed(raw, f"{what} {i}")
        missing = [n for n in specs if n not in feed]
        extra = [n for n in feed if n not in specs]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unknown {extra}")
            raise OnnxSparseError(
                f"{what} {i}: {' and '.join(parts)} inputs",
                hint=f"the model's inputs are {list(specs)}",
            )
        for name, spec in specs.items():
            arr = feed[name]
            if arr.dtype != spec.dtype:
                raise OnnxSparseError(
                    f"{what} {i}: input {name!r} has dtype {arr.dtype}, the model expects {spec.dtype}",
                    hint=f"convert it in your data (array.astype(np.{spec.dtype.name}))",
                )
            if spec.shape is not None:
                if arr.ndim != len(spec.shape):
                    raise OnnxSparseError(
                        f"{what} {i}: input {name!r} has shape {arr.shape}, the model expects rank "
                        f"{len(spec.shape)} {_fmt_shape(spec.shape)}",
                    )
                for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
                    if isinstance(want, int) and got != want:
                        raise OnnxSparseError(
                            f"{what} {i}: input {name!r} has shape {arr.shape}, the model expects "
                            f"{_fmt_shape(spec.shape)} (axis {axis} must be {want})",
                        )
        out.append(Sample(feed, i))
    if not out:
        raise OnnxSparseError(f"the set of {what}s is empty", hint="give at least one sample")
    return out


def split_holdout(feeds: Sequence[Feed], fraction: float) -> tuple[list[Feed], list[Feed]]:
    """Split calibration feeds into ``(fit, held_out)``: every k-th feed is held out, ``k = round(1 / fraction)``.

    Deterministic and interleaved (feeds 0..k-2 fit, feed k-1 held out, and so on), so a
    calibration list ordered by source or by kind gives both parts the same mix. With
    ``fraction`` 0, or fewer than 2 feeds, nothing is held out. A feed is the unit: its batch
    is never split.

    Raises:
        OnnxSparseError: ``fraction`` outside [0, 0.5].
    """
    if not 0.0 <= fraction <= 0.5:
        raise OnnxSparseError(f"the held-out share must be in [0, 0.5], got {fraction}")
    if fraction == 0.0 or len(feeds) < 2:
        return list(feeds), []
    k = max(2, round(1.0 / fraction))
    held = [f for i, f in enumerate(feeds) if i % k == k - 1]
    if not held:  # fewer feeds than k: hold out the last one
        return list(feeds[:-1]), [feeds[-1]]
    return [f for i, f in enumerate(feeds) if i % k != k - 1], held


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def load_calibration(
    model: onnx.ModelProto,
    *,
    load_inputs_paths: Sequence[str | os.PathLike[str]] = (),
    data_loader_script: str | None = None,
    input_shapes: Sequence[str] = (),
    seed: int | None = None,
    iterations: int | None = None,
    limit: int | None = None,
) -> tuple[list[Feed], bool]:
    """The calibration set the CLI options describe, validated against ``model``.

    Returns:
        ``(feeds, real)``: ``real`` is False when the feeds are random. The caller owns the
        warning then (:data:`RANDOM_DATA_WARNING`, once per command: the CLI logs it as the
        run's last word), so it is not logged here as well.
    """
    if load_inputs_paths and data_loader_script:
        raise OnnxSparseError(
            "both --load-inputs and --data-loader-script were given", hint="pass one source of calibration data"
        )
    if load_inputs_paths or data_loader_script:
        for flag, value in (("--seed", seed), ("--iterations", iterations), ("--input-shapes", input_shapes)):
            if value:
                logger.warning("%s is ignored: it applies to random data only", flag)
        feeds = load_inputs(load_inputs_paths) if load_inputs_paths else load_data_script(str(data_loader_script))
        real = True
    else:
        feeds = random_feeds(
            model,
            seed=seed,
            iterations=iterations or 8,
            input_shapes=parse_input_shapes(list(input_shapes)),
            warn=False,
        )
        real = False
    feeds = validate_feeds(model, feeds, limit=limit)
    logger.info("calibration data: %d sample(s)%s", len(feeds), "" if real else " of RANDOM data")
    return feeds, real
