"""``polygraphy run MODEL --onnx-sparse-prune``: prune to 2:4 on the fly, inside Polygraphy's ONNX loading chain.

The entry point :func:`export_argument_groups` is registered under ``polygraphy.run.plugins``
(pyproject.toml), so once onnx-sparse is installed every ``polygraphy run`` accepts::

    polygraphy run model.onnx --onnxrt [--trt --sparse-weights] --onnx-sparse-prune \\
        [--onnx-sparse-method magnitude|wanda|sparsegpt|asym] [--onnx-sparse-fc-layout] \\
        [--onnx-sparse-include RE ...] [--onnx-sparse-exclude RE ...]

and every backend runs the pruned model. ``--gen-script`` writes a script that builds the same
chain with :class:`PruneOnnx`, and ``--save-onnx`` saves the pruned model.

The flags build one :class:`onnx_sparse.recipe.Recipe` (validated at parse time);
``--onnx-sparse-recipe r.json`` starts from a saved recipe and the flags override it.
``--onnx-sparse-runners trt`` prunes for the named runners only (by option, or by position
counting from 1), so ``--onnxrt --trt --sparse-weights --onnx-sparse-prune --onnx-sparse-runners
trt`` compares dense ONNX-Runtime with the sparse TensorRT engine in one run: each runner adds
itself to the script in turn, and the hook below leaves :class:`PruneOnnx` out of the chain of
the runners not named. ``--onnx-sparse-save PATH`` keeps the pruned model (``--save-onnx``
sits in the shared chain and would save whichever model was loaded last).

How the pass gets into the chain. Polygraphy has no extension point inside its ONNX loading
chain. ``run``'s runners ask ``OnnxLoadArgs.must_use_onnx_loader()`` whether the model needs
the loader chain; if not, they read the file themselves (``SessionFromOnnx(path)``,
``NetworkFromOnnxPath(path)``), and a transform would never be seen. ``--fp-to-fp16`` is the
model: it makes ``must_use_onnx_loader()`` true, so ONNX-Runtime gets
``SessionFromOnnx(BytesFromOnnx(...))`` and TensorRT ``NetworkFromOnnxBytes(BytesFromOnnx(...))``,
and ``OnnxLoadArgs.add_to_script()`` adds ``ConvertToFp16`` to the chain. With
``--onnx-sparse-prune``, :class:`OnnxSparsePruneArgs` does the same to *this run's*
``OnnxLoadArgs`` object (instance attributes set at parse time; nothing global, no Polygraphy
class is changed):

* ``must_use_onnx_loader()`` answers True, so no backend reads the dense file;
* ``add_to_script()`` adds :class:`PruneOnnx` right where the chain loads the model file
  (after ``OnnxFromPath``, or after ``InferShapes`` with ``--shape-inference``: that is the
  first thing ``OnnxLoadArgs`` asks ``OnnxInferShapesArgs`` to add). Everything after it,
  ``--onnx-outputs``, ``--fp-to-fp16``, ``--save-onnx`` and the serialization for the
  backends, works on the pruned model.

If that spot is not found (a TensorFlow model, a Polygraphy whose ``OnnxLoadArgs`` no longer
starts that way) the command fails rather than run the dense model.

Calibration data. ``wanda``, ``sparsegpt``, ``asym`` and ``--onnx-sparse-bias-correction``
need activations. They come from Polygraphy's own data loader options, the ones that feed
the inference: ``--load-inputs``, ``--data-loader-script``, or else Polygraphy's seeded
random ``DataLoader`` (``--seed``, ``--iterations``, ``--val-range``, ``--input-shapes``).
Random data is a smoke test only and is said loudly. The calibration samples are then the
inference inputs too, so the comparison of ``run`` measures the fit on its own calibration
set, not on unseen data.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from polygraphy import mod, util
from polygraphy.backend.base import BaseLoader
from polygraphy.logger import G_LOGGER
from polygraphy.tools.args import util as args_util
from polygraphy.tools.args.backend.onnx.loader import OnnxInferShapesArgs, OnnxLoadArgs
from polygraphy.tools.args.base import BaseArgs, BaseRunnerArgs
from polygraphy.tools.args.comparator.data_loader import DataLoaderArgs
from polygraphy.tools.args.model import ModelArgs
from polygraphy.tools.script import make_invocable

from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.recipe import DATA_METHODS, METHODS, OPS, Recipe

# mod.export adds PruneOnnx and its eager twin prune_onnx (funcify) to __all__.
__all__ = ["METHODS", "DATA_METHODS", "OnnxSparsePruneArgs", "export_argument_groups"]  # METHODS: from the recipe

logger = logging.getLogger(__name__)

_OPS = OPS
_HOOK = "_onnx_sparse_hook"  # marks the functions this module sets on an OnnxLoadArgs instance


# --------------------------------------------------------------------------------------
# the loader


@mod.export(funcify=True)
class PruneOnnx(BaseLoader):
    """Functor that prunes every eligible Conv/ConvTranspose/Gemm/MatMul weight of an ONNX model to 2:4.

    A Polygraphy loader: it stores its inputs and does the work when called, so it chains like
    ``ConvertToFp16``::

        build = SessionFromOnnx(BytesFromOnnx(PruneOnnx(OnnxFromPath("model.onnx"))))

    The model it is given is not changed (:func:`onnx_sparse.api.prune` is functional).
    """

    def __init__(
        self,
        model: Any,
        method: str | None = None,
        fc_layout: bool | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        ops: Sequence[str] | None = None,
        min_channels: int | None = None,
        bias_correction: bool | None = None,
        data_loader: Any = None,
        recipe: Any = None,
        save: str | None = None,
    ) -> None:
        """Prune an ONNX model to 2:4.

        Args:
            model (Union[onnx.ModelProto, Callable() -> onnx.ModelProto]):
                    An ONNX model or a callable that returns one (e.g. ``OnnxFromPath``).
            method (str):
                    ``magnitude`` (default, no data), ``wanda``, ``sparsegpt`` or ``asym``
                    (calibrated: see :mod:`onnx_sparse.passes.calibrated`).
            fc_layout (bool):
                    First store FC weights as ``[K_out, C_in]`` (MatMul -> Gemm transB=1).
                    Defaults to False.
            include (Sequence[str]): Only nodes whose name matches one of these regular expressions.
            exclude (Sequence[str]): Skip nodes whose name matches one of these regular expressions.
            ops (Sequence[str]): Only these op types.
            min_channels (int): Only layers whose input and output channels are both at least this.
            bias_correction (bool):
                    Correct biases for the mean shift pruning causes (needs data). Defaults to False.
            data_loader (Sequence[Dict[str, numpy.ndarray]]):
                    Calibration samples, for a method that needs them: anything Polygraphy's
                    ``Comparator.run`` takes as a data loader (a list of feed dicts, a
                    ``StreamingDataLoader``, a generator, a ``DataLoader``: given the model's
                    input metadata, like a runner gives it). Defaults to Polygraphy's
                    seeded random ``DataLoader()``, a smoke test only.
            recipe (Union[onnx_sparse.Recipe, str]):
                    A whole recipe (or its JSON text, or a path to a JSON file). The other
                    options, where given, override its values. Without a method the recipe
                    resolves as without data: magnitude.
            save (str):
                    Also save the pruned model here (atomic, verified). Defaults to None.
        """
        self._model = model
        if method is not None and method not in METHODS:
            G_LOGGER.critical(f"PruneOnnx: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        try:
            base = _as_recipe(recipe)
            given = dict(method=method, fc_layout=fc_layout, include=include, exclude=exclude, ops=ops,
                         min_channels=min_channels, bias_correction=bias_correction)  # fmt: skip
            self.recipe = base.replace(**{k: v for k, v in given.items() if v is not None}).resolve(has_data=False)
        except OnnxSparseError as exc:
            G_LOGGER.critical(f"PruneOnnx: {exc}")
        self.data_loader = data_loader
        self.save = save
        # A calibrated result is computed once and copied to later calls: ``run --onnxrt --trt``
        # calls the chain once per backend, and both must see the same weights (and pay once).
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def method(self) -> str:
        assert self.recipe.method is not None
        return self.recipe.method

    @property
    def needs_data(self) -> bool:
        return self.recipe.needs_data

    @util.check_called_by("__call__")
    def call_impl(self) -> Any:
        """
        Returns:
            onnx.ModelProto: The pruned model (a new object).
        """
        if not self.needs_data and self.save is None:
            return self._prune()
        import onnx

        with self._lock:
            if "model" not in self._cache:
                self._cache["model"] = self._prune()
                if self.save is not None:
                    self._save(self._cache["model"])
            out = onnx.ModelProto()
            out.CopyFrom(self._cache["model"])
            return out

    def _prune(self) -> Any:
        from onnx_sparse.api import prune

        model, _ = util.invoke_if_callable(self._model)
        with _polygraphy_logging(), _as_polygraphy_errors():
            G_LOGGER.info(
                f"onnx-sparse: pruning to 2:4 ({self.recipe.describe()}{', fc-layout' if self.recipe.fc_layout else ''})"
            )
            return prune(
                model,
                self.recipe,
                # called with the model once the pass needs the data (after --onnx-sparse-fc-layout)
                calibration=self._calibration_feeds if self.needs_data else None,
            )

    def _save(self, model: Any) -> None:
        import onnx

        from onnx_sparse.io import ModelFile, save_model

        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        with _polygraphy_logging(), _as_polygraphy_errors():
            path = save_model(ModelFile(model=copy), str(self.save))
            G_LOGGER.info(f"onnx-sparse: saved the pruned model to {path}")

    def _calibration_feeds(self, model: Any) -> list[dict[str, Any]]:
        """The calibration samples for ``model`` (called by the calibrated pass)."""
        from polygraphy.backend.onnx import util as onnx_util
        from polygraphy.comparator import DataLoader

        loader = self.data_loader
        if loader is None:
            loader = DataLoader()
        if isinstance(loader, DataLoader):
            from onnx_sparse.calib.data import RANDOM_DATA_WARNING

            # What a runner does for the comparator: give the loader the model's inputs
            # (on a copy, so that the loader shared with the comparator is left as it was).
            loader = copy.copy(loader)
            loader.input_metadata = onnx_util.get_input_metadata(model.graph)
            logger.warning("%s", RANDOM_DATA_WARNING)
        feeds = list(loader)
        logger.info(
            "calibration data: %d sample(s) from the Polygraphy data loader%s",
            len(feeds),
            " (RANDOM)" if isinstance(self.data_loader, DataLoader) or self.data_loader is None else "",
        )
        return feeds


def _as_recipe(recipe: Any) -> Recipe:
    """A Recipe from a Recipe, its JSON text, a path to a JSON file, or None (the defaults)."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    text = str(recipe)
    return Recipe.from_json(text) if text.lstrip().startswith("{") else Recipe.load(text)


# --------------------------------------------------------------------------------------
# logging and errors inside Polygraphy


class _ToPolygraphy(logging.Handler):
    """Forward onnx_sparse log records to Polygraphy's logger (its -v/-q and [I]/[W] framing)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            G_LOGGER.log(self.format(record), severity=min(record.levelno, G_LOGGER.ERROR))
        except Exception:  # a logging failure must not break the run
            self.handleError(record)


@contextlib.contextmanager
def _polygraphy_logging() -> Iterator[None]:
    """Route the ``onnx_sparse`` loggers to G_LOGGER while the pass runs (undone afterwards).

    Left alone where the application gave ``onnx_sparse`` handlers of its own.
    """
    root = logging.getLogger("onnx_sparse")
    if any(not isinstance(h, logging.NullHandler) for h in root.handlers):
        yield
        return
    handler = _ToPolygraphy()
    saved = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # G_LOGGER decides what shows
    root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


@contextlib.contextmanager
def _as_polygraphy_errors() -> Iterator[None]:
    """A user error becomes Polygraphy's ``[!]`` line and a FAILED run, not a traceback."""
    try:
        yield
    except OnnxSparseError as exc:
        G_LOGGER.critical(f"onnx-sparse: {exc}")


# --------------------------------------------------------------------------------------
# the argument group


class OnnxSparsePruneArgs(BaseArgs):
    """
    onnx-sparse 2:4 Pruning: pruning the ONNX model's weights to NVIDIA's 2-of-4 structured sparsity before any backend sees it (onnx-sparse plugin)

    Depends on:

        - OnnxLoadArgs: its loading chain gets the PruneOnnx loader
        - OnnxInferShapesArgs: the point in that chain where the model file is loaded
        - ModelArgs
        - DataLoaderArgs: calibration data, for calibrated methods
    """

    def add_parser_args_impl(self) -> None:
        self.group.add_argument(
            "--onnx-sparse-prune",
            help="Prune every eligible Conv/ConvTranspose/Gemm/MatMul weight to 2:4 while loading the ONNX "
            "model, so that every backend (--onnxrt, --trt, ...) runs the pruned model. It is added to "
            "Polygraphy's ONNX loader chain right after the model is loaded (before --onnx-outputs, "
            "--fp-to-fp16 and --save-onnx, which therefore saves the pruned model). TensorRT uses 2:4 "
            "kernels only with --sparse-weights.",
            action="store_true",
            default=None,
        )
        self.group.add_argument(
            "--onnx-sparse-method",
            help="How to choose the 2 weights kept in each group of 4. 'magnitude' (default): the two "
            "largest |w|, no data. 'wanda', 'sparsegpt', 'asym': calibrated on activations, which come "
            "from Polygraphy's data loader options (--load-inputs, --data-loader-script; without them "
            "Polygraphy's seeded RANDOM data from --seed/--iterations/--val-range/--input-shapes, which "
            "is only a smoke test). The calibration samples are then also the inference inputs.",
            choices=METHODS,
            default=None,
        )
        self.group.add_argument(
            "--onnx-sparse-fc-layout",
            help="First store fully-connected weights as [K_out, C_in] (MatMul -> Gemm transB=1), so that "
            "groups of 4 run along the contiguous axis.",
            action="store_true",
            default=None,
        )
        self.group.add_argument(
            "--onnx-sparse-include",
            help="Only prune nodes whose name matches one of these regular expressions.",
            nargs="+",
            action="extend",
            metavar="REGEX",
            default=None,
        )
        self.group.add_argument(
            "--onnx-sparse-exclude",
            help="Do not prune nodes whose name matches one of these regular expressions.",
            nargs="+",
            action="extend",
            metavar="REGEX",
            default=None,
        )
        self.group.add_argument(
            "--onnx-sparse-ops",
            help="Only prune these op types.",
            nargs="+",
            action="extend",
            choices=_OPS,
            default=None,
        )
        self.group.add_argument(
            "--onnx-sparse-min-channels",
            help="Only prune layers whose input (reduction) and output channels are both at least N.",
            type=int,
            metavar="N",
            default=None,
        )
        self.group.add_argument(
            "--onnx-sparse-bias-correction",
            help="Correct (or add) biases so that each output keeps its mean on the calibration data "
            "(needs data, like the calibrated methods).",
            action="store_true",
            default=None,
        )
        self.group.add_argument(
            "--onnx-sparse-recipe",
            help="Read the pruning recipe from this JSON file (as `onnx-sparse prune --save-recipe` writes it); "
            "the --onnx-sparse-* options above, where given, override its values.",
            metavar="PATH",
            default=None,
        )
        self.group.add_argument(
            "--onnx-sparse-runners",
            help="Prune only for these runners; the others run the dense model, so one run compares dense "
            "and sparse (e.g. --onnxrt --trt --onnx-sparse-runners trt: dense ONNX-Runtime against the sparse "
            "TensorRT engine). A runner is named by its option without dashes (trt, onnxrt: every runner of "
            "that kind) or by its position among the runners given, counting from 1 (--onnxrt --onnxrt "
            "--onnx-sparse-runners 2: dense against pruned ONNX-Runtime). Default: every runner.",
            nargs="+",
            action="extend",
            metavar="RUNNER",
            default=None,
        )
        self.group.add_argument(
            "--onnx-sparse-save",
            help="Also save the pruned model here (atomic, checked by onnx.checker and onnxruntime). Unlike "
            "--save-onnx, it saves the pruned model even when some runners run the dense one.",
            metavar="PATH",
            default=None,
        )

    def parse_impl(self, args: Any) -> None:
        """
        Parses command-line arguments and populates the following attributes:

        Attributes:
            prune (bool): Whether to prune the model in the ONNX loading chain.
            method (str): The pruning method.
            fc_layout (bool): Whether to store FC weights as [K_out, C_in] first.
            include (List[str]): Node-name regular expressions to prune only.
            exclude (List[str]): Node-name regular expressions to skip.
            ops (List[str]): Op types to prune only.
            min_channels (int): Minimum input and output channels of a pruned layer.
            bias_correction (bool): Whether to correct biases.
        """
        self.prune = bool(args_util.get(args, "onnx_sparse_prune"))
        self.method = args_util.get(args, "onnx_sparse_method")
        self.fc_layout = args_util.get(args, "onnx_sparse_fc_layout")
        self.include = args_util.get(args, "onnx_sparse_include")
        self.exclude = args_util.get(args, "onnx_sparse_exclude")
        self.ops = args_util.get(args, "onnx_sparse_ops")
        self.min_channels = args_util.get(args, "onnx_sparse_min_channels")
        self.bias_correction = args_util.get(args, "onnx_sparse_bias_correction")
        self.recipe_path = args_util.get(args, "onnx_sparse_recipe")
        self.runners = args_util.get(args, "onnx_sparse_runners")
        self.save = args_util.get(args, "onnx_sparse_save")

        options = {
            "--onnx-sparse-method": self.method,
            "--onnx-sparse-fc-layout": self.fc_layout,
            "--onnx-sparse-include": self.include,
            "--onnx-sparse-exclude": self.exclude,
            "--onnx-sparse-ops": self.ops,
            "--onnx-sparse-min-channels": self.min_channels,
            "--onnx-sparse-bias-correction": self.bias_correction,
            "--onnx-sparse-recipe": self.recipe_path,
            "--onnx-sparse-runners": self.runners,
            "--onnx-sparse-save": self.save,
        }
        given = [flag for flag, value in options.items() if value is not None]
        if given and not self.prune:
            G_LOGGER.critical(f"{', '.join(given)} given without --onnx-sparse-prune: nothing would be pruned")
        # One Recipe from the flags (and the file), validated here, once: a bad regex or value fails at parse time.
        try:
            base = Recipe.load(self.recipe_path) if self.recipe_path else Recipe()
            flags = dict(method=self.method, fc_layout=self.fc_layout, include=self.include, exclude=self.exclude,
                         ops=self.ops, min_channels=self.min_channels, bias_correction=self.bias_correction)  # fmt: skip
            self.recipe = base.replace(**{k: v for k, v in flags.items() if v is not None}).resolve(has_data=False)
        except OnnxSparseError as exc:
            G_LOGGER.critical(f"onnx-sparse: {exc}")
        self.positions: set[int] | None = None  # runner positions (1-based) that get the pruned model

        if OnnxLoadArgs not in self.arg_groups:  # only `polygraphy run` loads plugins; be safe anyway
            return
        onnx_args = self.arg_groups[OnnxLoadArgs]
        _unhook(onnx_args)
        if not self.prune:
            return
        if args_util.get(args, "ignore_external_data"):
            G_LOGGER.critical("--onnx-sparse-prune needs the weights: drop --ignore-external-data")
        model_args = self.arg_groups[ModelArgs]
        if model_args.path and model_args.model_type is not None and not model_args.model_type.is_onnx():
            G_LOGGER.critical(
                f"--onnx-sparse-prune works on ONNX models; {model_args.path} is a {model_args.model_type} model"
            )
        _hook(onnx_args, self)
        self._select_runners()
        self._hint_sparse_weights(args)

    @property
    def needs_data(self) -> bool:
        return self.recipe.needs_data

    def _run_runners(self) -> list[str]:
        """The runner options of this run, in order (``["onnxrt", "trt"]``)."""
        from polygraphy.tools.args.backend.runner_select import RunnerSelectArgs

        if RunnerSelectArgs not in self.arg_groups:
            return []
        return list(self.arg_groups[RunnerSelectArgs].runners.keys())

    def _select_runners(self) -> None:
        """Resolve --onnx-sparse-runners to runner positions and mark, while each runner adds itself
        to the script, whether it is one of them (see :func:`_hook`)."""
        if self.runners is None:
            return
        order = self._run_runners()
        positions: set[int] = set()
        for name in self.runners:
            if name.isdigit():
                k = int(name)
                if not 1 <= k <= len(order):
                    G_LOGGER.critical(
                        f"--onnx-sparse-runners {name}: this run has {len(order)} runner(s) ({', '.join(order)})"
                    )
                positions.add(k)
            else:
                hits = {k for k, opt in enumerate(order, 1) if opt == name}
                if not hits:
                    G_LOGGER.critical(
                        f"--onnx-sparse-runners {name}: not a runner of this run "
                        f"(runners: {', '.join(order) or 'none'}; name them by option, e.g. trt, or by position)"
                    )
                positions |= hits
        self.positions = positions
        dense = [f"{k}:{opt}" for k, opt in enumerate(order, 1) if k not in positions]
        sparse = [f"{k}:{opt}" for k, opt in enumerate(order, 1) if k in positions]
        G_LOGGER.info(
            f"onnx-sparse: pruned model for runner(s) {', '.join(sparse)}; dense for {', '.join(dense) or 'none'}"
        )
        counter = {"k": 0}
        seen: set[int] = set()
        for group in self.arg_groups.values():
            if isinstance(group, BaseRunnerArgs) and id(group) not in seen:
                seen.add(id(group))
                _mark_runner(group, self, counter)

    def prunes_current_runner(self) -> bool:
        """Whether the runner now being added to the script gets the pruned model."""
        return self.positions is None or self.current_runner in self.positions

    current_runner = 0

    def _hint_sparse_weights(self, args: Any) -> None:
        order = self._run_runners()
        pruned = [opt for k, opt in enumerate(order, 1) if self.positions is None or k in self.positions]
        if "trt" in pruned and not args_util.get(args, "sparse_weights"):
            G_LOGGER.warning(
                "--onnx-sparse-prune with --trt but without --sparse-weights: TensorRT will run the pruned "
                "weights with dense kernels. Add --sparse-weights to let it pick 2:4 kernels."
            )

    def add_to_script_impl(self, script: Any, loader_name: Any) -> Any:
        """
        Args:
            loader_name (str): The name of a loader (or a path) that gives the ONNX model to prune.

        Returns:
            str: The name of the ``PruneOnnx`` loader added to the script
            (``loader_name`` unchanged when pruning is off).
        """
        if not self.prune:
            return loader_name
        data_loader = None
        if self.needs_data and DataLoaderArgs in self.arg_groups:
            # The comparator's own data loader (same data; the script defines it once).
            data_loader = self.arg_groups[DataLoaderArgs].add_to_script(script)
        script.add_import(imports=["PruneOnnx"], frm="onnx_sparse.handoff.plugin")
        return script.add_loader(
            make_invocable(
                "PruneOnnx",
                loader_name,
                method=self.method,
                fc_layout=self.fc_layout,
                include=self.include,
                exclude=self.exclude,
                ops=self.ops,
                min_channels=self.min_channels,
                bias_correction=self.bias_correction,
                data_loader=data_loader,
                recipe=self.recipe_path,
                save=self.save,
            ),
            "prune_onnx",
        )


# --------------------------------------------------------------------------------------
# the hook on this run's OnnxLoadArgs


def _mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, _HOOK, True)
    return fn


def _unhook(onnx_args: OnnxLoadArgs) -> None:
    """Remove what :func:`_hook` set on this instance (the class methods show through again)."""
    for name in ("must_use_onnx_loader", "add_to_script_impl"):
        if getattr(vars(onnx_args).get(name), _HOOK, False):
            delattr(onnx_args, name)


def _hook(onnx_args: OnnxLoadArgs, prune_args: OnnxSparsePruneArgs) -> None:
    """Put :class:`PruneOnnx` into the loading chain of ``onnx_args`` (see the module docstring)."""
    original_add = onnx_args.add_to_script_impl
    infer_args = onnx_args.arg_groups[OnnxInferShapesArgs] if OnnxInferShapesArgs in onnx_args.arg_groups else None

    @_mark
    def must_use_onnx_loader(*args: Any, **kwargs: Any) -> bool:
        return True  # as --fp-to-fp16 does: the backends must take the (pruning) loader chain

    @_mark
    def add_to_script_impl(script: Any, *args: Any, **kwargs: Any) -> Any:
        model_path = onnx_args.arg_groups[ModelArgs].path
        added: list[Any] = []
        dense: list[Any] = []
        if infer_args is None:
            return _not_found(model_path)
        original_infer = infer_args.add_to_script_impl

        def infer_then_prune(script_: Any, loader_name: Any, *a: Any, **k: Any) -> Any:
            out = original_infer(script_, loader_name, *a, **k)
            if added or loader_name != model_path:
                return out  # not the call that starts OnnxLoadArgs' chain
            if not prune_args.prunes_current_runner():
                dense.append(out)  # --onnx-sparse-runners: this runner runs the dense model
                return out
            if out == loader_name:  # no shape inference: load the file as OnnxLoadArgs would
                script_.add_import(imports=["OnnxFromPath"], frm="polygraphy.backend.onnx")
                out = script_.add_loader(
                    make_invocable(
                        "OnnxFromPath",
                        model_path,
                        external_data_dir=onnx_args.external_data_dir,
                        ignore_external_data=onnx_args.ignore_external_data,
                    ),
                    "load_onnx",
                )
            out = prune_args.add_to_script(script_, out)
            added.append(out)
            return out

        with _instance_attr(infer_args, "add_to_script_impl", infer_then_prune):
            name = original_add(script, *args, **kwargs)
        if not added and not dense:
            return _not_found(model_path)
        return name

    onnx_args.must_use_onnx_loader = must_use_onnx_loader  # type: ignore[method-assign]
    onnx_args.add_to_script_impl = add_to_script_impl  # type: ignore[method-assign]


def _mark_runner(group: BaseRunnerArgs, prune_args: OnnxSparsePruneArgs, counter: dict[str, int]) -> None:
    """Count this runner group's additions to the script (``RunnerSelectArgs`` adds the runners one
    by one, in command-line order), so that the loader hook knows which runner it is building."""
    if getattr(vars(group).get("add_to_script_impl"), _HOOK, False):
        delattr(group, "add_to_script_impl")  # an earlier parse's mark
    original = group.add_to_script_impl

    @_mark
    def add_to_script_impl(script: Any, *args: Any, **kwargs: Any) -> Any:
        counter["k"] += 1
        prune_args.current_runner = counter["k"]
        try:
            return original(script, *args, **kwargs)
        finally:
            prune_args.current_runner = 0

    group.add_to_script_impl = add_to_script_impl  # type: ignore[method-assign]


def _not_found(model_path: Any) -> Any:
    G_LOGGER.critical(
        f"--onnx-sparse-prune: could not find where Polygraphy loads the ONNX model {model_path} "
        "(only ONNX model files are supported; this Polygraphy version may load them differently)"
    )


@contextlib.contextmanager
def _instance_attr(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name`` for the duration of the block, then restore exactly what was there."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


# --------------------------------------------------------------------------------------
# entry point


def export_argument_groups() -> list[BaseArgs]:
    """Entry point of the ``polygraphy.run.plugins`` group: the argument groups this plugin adds."""
    return [OnnxSparsePruneArgs()]
