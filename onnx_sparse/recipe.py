"""The pruning recipe: every setting of one prune, in one typed, immutable, validated object.

A :class:`Recipe` is built once (from CLI flags, from the Python API's keywords, from the
Polygraphy plugin's flags, or from a JSON file), validated in its constructor, and then read
by every layer below: :func:`onnx_sparse.passes.factory.make_prune_pass` picks the pass, the
passes take it in their constructor, and the output model records it in its metadata
(:func:`provenance`), so a pruned model says how it was made.

>>> from onnx_sparse.recipe import Recipe
>>> r = Recipe(method="sparsegpt", exclude=("head",), bias_correction=True)
>>> Recipe.from_json(r.to_json()) == r
True

``method=None`` means "the default": :meth:`Recipe.resolve` turns it into
:data:`DEFAULT_CALIBRATED` (asym + bias correction + head refit, what measured best on the
project's real models) when calibration data is given, and into plain magnitude pruning
otherwise. ``bias_correction`` and ``refit_head`` left at None follow the same default; an
explicit True or False always wins. A saved recipe is always resolved, so it reproduces the
same prune without depending on the defaults of a later version.

JSON (:meth:`Recipe.to_json`, :meth:`Recipe.from_json`, :meth:`Recipe.load`, :meth:`Recipe.save`):
one object, keys as the field names below plus ``"format": 1``; unknown keys are refused (a
typo must not silently fall back to a default). New settings (INT8, ...) are new fields with
defaults that keep older files valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from onnx_sparse.errors import OnnxSparseError

__all__ = [
    "METHODS",
    "DATA_METHODS",
    "OPS",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_CALIBRATED",
    "FORMAT",
    "Recipe",
    "compile_patterns",
    "calibration_digest",
    "provenance",
    "read_provenance",
    "META_RECIPE",
    "META_VERSION",
    "META_CALIBRATION",
]

#: Pruning methods (see :mod:`onnx_sparse.passes.calibrated`).
METHODS = ("magnitude", "wanda", "sparsegpt", "asym")
#: Methods that need calibration data.
DATA_METHODS = ("wanda", "sparsegpt", "asym")
#: Op types a selection may name.
OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Activation rows per calibration sample and layer (a seeded subsample beyond that).
DEFAULT_MAX_ROWS = 20_000
#: Version of the JSON form.
FORMAT = 1

#: Metadata keys of the output model (:func:`provenance`).
META_RECIPE = "onnx_sparse.recipe"
META_VERSION = "onnx_sparse.version"
META_CALIBRATION = "onnx_sparse.calibration"


def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern[str]]:
    """Compile layer-selection regexes; a bad one is a clear error naming the option."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise OnnxSparseError(
                f"{what} {p!r}: not a valid regular expression ({exc})",
                hint="Python regular expressions, matched anywhere in the node name (re.search)",
            ) from None
    return out


@dataclass(frozen=True)
class Recipe:
    """How to prune a model to 2:4.

    Attributes:
        method: ``magnitude``, ``wanda``, ``sparsegpt``, ``asym``, or None for the default
            (module docstring).
        include / exclude: Node-name regular expressions: only / never these nodes.
        ops: Only these op types (empty: all of :data:`OPS`).
        min_channels: Only layers whose input and output channels are both at least this.
        bias_correction: Correct (or add) biases to keep each output's mean (needs data).
            None: the default's choice.
        refit_head: Refit a pruned softmax head to the dense probabilities by KL divergence
            (needs data). None: the default's choice.
        damp: SparseGPT relative damping (``lambda = damp * mean(diag H)``).
        refit_confirm: ``asym``: the refit's ridge damping is chosen by cross-validation of the dense
            refit's held-out error; with ``k > 0`` the ``k`` best candidates are then decided by the
            pruned refit's held-out error (closer to what the layer will compute, dearer).
        blocksize: SparseGPT lazy-update block size (a multiple of 4).
        max_rows: Activation rows per calibration sample and layer (None: all).
        seed: Seed of the row subsampling (and of the head refit's held-out split).
        row_mask: Graph input whose zeros mark padding (``attention_mask``).
        calib_samples: Use at most this many calibration samples (None: all).
        sensitivity: Measure each layer pruned alone before pruning (reported).
        target_cosine: Prune the most work that keeps every float output's cosine to the
            dense model at or above this on held-out calibration feeds (None: prune all).
        holdout: With a target: share of the calibration feeds kept out of fitting.
        fc_layout: First store fully-connected weights as ``[K_out, C_in]``.
        annotate: Write the verdict and result into the nodes' metadata.
        int8: Then quantize the pruned model to INT8 Q/DQ on the same calibration data (the CLI's
            ``prune --int8``; in Python, :func:`onnx_sparse.quant.quantize_file` with
            :meth:`quantize_options`).
        int8_calibration / int8_percentile / int8_layers / int8_max_error / int8_smooth /
            int8_target_cosine: the quantization settings (:class:`onnx_sparse.quant.QuantizeOptions`:
            ``calibration``, ``percentile``, ``layers``, ``max_error``, ``smooth``, ``target_cosine``);
            the layer selection above and ``holdout`` / ``seed`` apply to it too.
        int8_joint: With ``int8``: SparseGPT's walk rounds the INT8 layers' kept weights onto their
            INT8 grids as it fixes them (one reconstruction for pruning and rounding), and the Q/DQ
            weights hold exactly those integers. Off by default: on real models it did not beat
            rounding the FP32 prune's weights afterwards, and on PP-OCR cls it moved far more of the
            model's decisions (README, "INT8").
        int8_fit_quantized: With ``int8``: the calibration computes every layer's input through the
            INT8 rounding of everything upstream and rounds the layer's own input as its Q/DQ will
            (scales chosen on the dense model), so each refit and bias correction answer pruning and
            quantization error together (:mod:`onnx_sparse.calib.fakequant`).
    """

    method: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    min_channels: int = 0
    bias_correction: bool | None = None
    refit_head: bool | None = None
    damp: float = 0.01
    refit_confirm: int = 0
    blocksize: int = 128
    max_rows: int | None = DEFAULT_MAX_ROWS
    seed: int = 0
    row_mask: str | None = None
    calib_samples: int | None = None
    sensitivity: bool = False
    target_cosine: float | None = None
    holdout: float = 0.25
    fc_layout: bool = False
    annotate: bool = False
    int8: bool = False
    int8_calibration: str = "search"
    int8_percentile: float = 99.999
    int8_layers: str = "eligible"
    int8_max_error: float | None = None
    int8_smooth: bool = True
    int8_joint: bool = False
    int8_fit_quantized: bool = False
    int8_target_cosine: float | None = 0.99

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "ops"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple):
                raise OnnxSparseError(f"recipe: {name} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name, kind in _TYPES.items():
            _check_type(name, getattr(self, name), kind)
        if self.method is not None and self.method not in METHODS:
            raise OnnxSparseError(f"unknown pruning method {self.method!r}", hint=f"choose one of {', '.join(METHODS)}")
        for name in ("include", "exclude"):
            compile_patterns(getattr(self, name), f"--{name}")
        bad = [op for op in self.ops if op not in OPS]
        if bad:
            raise OnnxSparseError(f"unknown op type(s) {bad}", hint=f"choose among {', '.join(OPS)}")
        if self.min_channels < 0:
            raise OnnxSparseError(f"--min-channels must be >= 0, got {self.min_channels}")
        if not self.damp >= 0:
            raise OnnxSparseError(f"--damp must be non-negative, got {self.damp}")
        if self.refit_confirm < 0:
            raise OnnxSparseError(f"--refit-confirm must be >= 0, got {self.refit_confirm}")
        if self.blocksize < 4 or self.blocksize % 4:
            raise OnnxSparseError(f"--blocksize must be a positive multiple of 4, got {self.blocksize}")
        if self.max_rows is not None and self.max_rows < 1:
            raise OnnxSparseError(f"--max-rows must be positive, got {self.max_rows}")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise OnnxSparseError(f"--calib-samples must be positive, got {self.calib_samples}")
        if self.target_cosine is not None and not -1.0 <= self.target_cosine <= 1.0:
            raise OnnxSparseError(f"--target-cosine must be in [-1, 1], got {self.target_cosine}")
        if not 0.0 <= self.holdout <= 0.5:
            raise OnnxSparseError(f"--holdout: the held-out share must be in [0, 0.5], got {self.holdout}")
        if self.int8 or any(getattr(self, f.name) != f.default for f in fields(self) if f.name.startswith("int8_")):
            self.quantize_options()  # validated where the rules live

    def quantize_options(self) -> Any:
        """The :class:`onnx_sparse.quant.QuantizeOptions` of this recipe (INT8 settings and layer selection)."""
        from onnx_sparse.quant import QuantizeOptions

        return QuantizeOptions(
            calibration=self.int8_calibration,
            percentile=self.int8_percentile,
            layers=self.int8_layers,
            max_error=self.int8_max_error,
            include=self.include,
            exclude=self.exclude,
            ops=self.ops,
            smooth=self.int8_smooth,
            target_cosine=self.int8_target_cosine,
            holdout=self.holdout,
            seed=self.seed,
        )

    # ------------------------------------------------------------------ defaults

    def resolve(self, has_data: bool) -> Recipe:
        """This recipe with the defaults filled in (``method``, ``bias_correction``, ``refit_head``).

        ``method=None`` with data gives :data:`DEFAULT_CALIBRATED`'s method, bias correction
        and head refit (each unless set explicitly); without data, plain magnitude. A recipe
        that names its method keeps it, and its unset switches become False.
        """
        if self.method is None and has_data:
            base = DEFAULT_CALIBRATED
            return dataclasses.replace(
                self,
                method=base.method,
                bias_correction=base.bias_correction if self.bias_correction is None else self.bias_correction,
                refit_head=base.refit_head if self.refit_head is None else self.refit_head,
            )
        return dataclasses.replace(
            self,
            method=self.method or "magnitude",
            bias_correction=bool(self.bias_correction),
            refit_head=bool(self.refit_head),
        )

    @property
    def needs_data(self) -> bool:
        """Whether pruning with this (resolved) recipe needs calibration data."""
        return (
            self.method in DATA_METHODS
            or bool(self.bias_correction)
            or bool(self.refit_head)
            or self.sensitivity
            or self.target_cosine is not None
        )

    @property
    def selection(self) -> dict[str, Any]:
        """The layer selection as keywords of :class:`onnx_sparse.passes.prune.PrunePass`."""
        return dict(include=self.include, exclude=self.exclude, ops=self.ops, min_channels=self.min_channels)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (validated again)."""
        unknown = sorted(set(changes) - set(_TYPES))
        if unknown:
            raise OnnxSparseError(f"recipe: unknown setting(s) {unknown}", hint=f"known: {', '.join(_TYPES)}")
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A short human description: ``asym + bias correction + head refit``."""
        parts = [self.method or "default"]
        if self.bias_correction:
            parts.append("bias correction")
        if self.refit_head:
            parts.append("head refit")
        if self.target_cosine is not None:
            parts.append(f"target cosine {self.target_cosine:g}")
        elif self.sensitivity:
            parts.append("sensitivity")
        return " + ".join(parts)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, in field order, with ``"format"`` first."""
        out: dict[str, Any] = {"format": FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self, indent: int | None = None) -> str:
        """Canonical JSON (same recipe, same text: it goes into model metadata)."""
        sep = (",", ": ") if indent else (",", ":")
        return json.dumps(self.to_dict(), indent=indent, separators=sep, allow_nan=False)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "recipe") -> Recipe:
        """The recipe of a JSON object (unknown keys and wrong types are refused)."""
        if not isinstance(doc, Mapping):
            raise OnnxSparseError(f"{where}: a recipe is a JSON object, got {type(doc).__name__}")
        fmt = doc.get("format", FORMAT)
        if fmt != FORMAT:
            raise OnnxSparseError(
                f"{where}: recipe format {fmt!r} is not supported (this onnx-sparse reads format {FORMAT})"
            )
        items = {k: v for k, v in doc.items() if k != "format"}
        unknown = sorted(set(items) - set(_TYPES))
        if unknown:
            raise OnnxSparseError(f"{where}: unknown recipe key(s) {unknown}", hint=f"known: {', '.join(_TYPES)}")
        try:
            return cls(**items)
        except OnnxSparseError as exc:
            raise OnnxSparseError(f"{where}: {exc.message}", hint=exc.hint) from None

    @classmethod
    def from_json(cls, text: str, where: str = "recipe") -> Recipe:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OnnxSparseError(f"{where}: not valid JSON: {exc}") from None
        return cls.from_dict(doc, where)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        """Read a recipe file (``prune --recipe``)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise OnnxSparseError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
        return cls.from_json(text, str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this recipe as JSON (``prune --save-recipe``), atomically."""
        from onnx_sparse.report import write_json

        write_json(path, self.to_dict())


# Field -> accepted JSON/Python types ("str*": tuple of str; "?": None allowed).
_TYPES: dict[str, str] = {
    "method": "str?",
    "include": "str*",
    "exclude": "str*",
    "ops": "str*",
    "min_channels": "int",
    "bias_correction": "bool?",
    "refit_head": "bool?",
    "damp": "float",
    "refit_confirm": "int",
    "blocksize": "int",
    "max_rows": "int?",
    "seed": "int",
    "row_mask": "str?",
    "calib_samples": "int?",
    "sensitivity": "bool",
    "target_cosine": "float?",
    "holdout": "float",
    "fc_layout": "bool",
    "annotate": "bool",
    "int8": "bool",
    "int8_calibration": "str",
    "int8_percentile": "float",
    "int8_layers": "str",
    "int8_max_error": "float?",
    "int8_smooth": "bool",
    "int8_joint": "bool",
    "int8_fit_quantized": "bool",
    "int8_target_cosine": "float?",
}
assert list(_TYPES) == [f.name for f in fields(Recipe)], "keep _TYPES in step with Recipe"


def _check_type(name: str, value: Any, kind: str) -> None:
    if kind.endswith("?"):
        if value is None:
            return
        kind = kind[:-1]
    if kind == "str*":
        ok = all(isinstance(v, str) for v in value)
    elif kind == "bool":
        ok = isinstance(value, bool | np.bool_)
    elif kind == "int":
        ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        ok = ok and bool(np.isfinite(value))
    else:
        ok = isinstance(value, str)
    if not ok:
        want = {"str*": "a list of strings", "bool": "true or false", "int": "an integer",
                "float": "a finite number", "str": "a string"}[kind]  # fmt: skip
        raise OnnxSparseError(f"recipe: {name} must be {want}{' or null' if name in _NULLABLE else ''}, got {value!r}")


_NULLABLE = {k for k, v in _TYPES.items() if v.endswith("?")}

#: The recipe with calibration data and no method: it closed the most of magnitude pruning's
#: accuracy gap on the project's real models (README, "Which recipe").
DEFAULT_CALIBRATED = Recipe(method="asym", bias_correction=True, refit_head=True)


# --------------------------------------------------------------------------------------
# provenance


def calibration_digest(feeds: Sequence[Mapping[str, Any]]) -> str:
    """``sha256:<hex>`` of calibration feeds: per feed, per input name (sorted), the name,
    dtype, shape and C-order bytes. The same data gives the same digest, whatever the batching
    in memory."""
    h = hashlib.sha256()
    for feed in feeds:
        h.update(b"feed")
        for name in sorted(feed):
            a = np.asarray(feed[name])  # not ascontiguousarray: it turns a rank-0 feed into shape (1,)
            h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
            h.update(a.tobytes(order="C"))
    return "sha256:" + h.hexdigest()


def provenance(recipe: Recipe, calibration: Sequence[Mapping[str, Any]] | None) -> dict[str, str]:
    """The metadata a pruned model carries: the (resolved) recipe, the onnx-sparse version,
    and the calibration data's digest and sample count (only when data was used)."""
    from onnx_sparse import __version__

    out = {META_VERSION: __version__, META_RECIPE: recipe.to_json()}
    if calibration is not None:
        out[META_CALIBRATION] = json.dumps(
            {"samples": len(calibration), "digest": calibration_digest(calibration)}, separators=(",", ":")
        )
    return out


def read_provenance(props: Mapping[str, str]) -> dict[str, Any] | None:
    """What :func:`provenance` wrote, from a model's ``metadata_props`` (None if absent)."""
    if META_RECIPE not in props and META_VERSION not in props:
        return None
    out: dict[str, Any] = {"version": props.get(META_VERSION)}
    try:
        out["recipe"] = json.loads(props[META_RECIPE]) if META_RECIPE in props else None
    except json.JSONDecodeError:
        out["recipe"] = props[META_RECIPE]
    if META_CALIBRATION in props:
        try:
            out["calibration"] = json.loads(props[META_CALIBRATION])
        except json.JSONDecodeError:
            out["calibration"] = props[META_CALIBRATION]
    return out
