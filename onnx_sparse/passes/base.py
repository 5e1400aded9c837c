"""Passes: callable objects that take a model and return a :class:`PassResult`.

A pass declares whether it changes its input (``in_place``) or works on a copy; the base
class holds it to that. :class:`Sequential` composes passes and names the one that failed.
Passes work on :class:`onnx_sparse.io.ModelFile` (a ModelProto plus where its external
data lives); :func:`as_model_file` also accepts a ModelProto or an onnx-graphsurgeon graph.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnx_sparse.core import blas
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.io import ModelFile, iter_tensors

__all__ = ["PassResult", "Pass", "Sequential", "as_model_file", "copy_model_file"]

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass returns: the model, whether it changed, and per-layer records for the report."""

    model: ModelFile
    modified: bool
    records: list[Any] = field(default_factory=list)


def unique_name(used: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... whichever is not in ``used`` (then added to it)."""
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def copy_model_file(mf: ModelFile, *, read_only: bool = False) -> ModelFile:
    """A deep copy of the ModelProto; external data and pending new values (read-only) are shared.

    ``read_only``: the copy is only read (``asym``'s dense model): the large inline weights of a
    model loaded from a file that still hold that file's bytes are read from the file (memory-mapped,
    :func:`onnx_sparse.fileview.file_refs`) instead of copied, so they are not held twice."""
    from onnx_sparse.fileview import file_refs

    viewed = (
        file_refs(mf.model, mf.path, mf.base_dir, mf.ident)
        if read_only and mf.path is not None and mf.base_dir is not None and not mf.pending
        else None
    )
    if viewed is not None:
        model, pinned = viewed
        data_ids = {**mf.data_ids, **pinned}
        return ModelFile(model=model, base_dir=mf.base_dir, path=mf.path, ident=mf.ident, data_ids=data_ids)
    model = onnx.ModelProto()
    model.CopyFrom(mf.model)
    # the same files, checked at load: the copy's reads are held to the same identities
    copy = ModelFile(model=model, base_dir=mf.base_dir, path=mf.path, ident=mf.ident, data_ids=dict(mf.data_ids))
    if mf.pending:
        # The copy has the same tensors in the same order: carry the pending values across.
        for old, new in zip(iter_tensors(mf.model), iter_tensors(model), strict=True):
            if id(old) in mf.pending:
                copy.pending[id(new)] = (new, mf.pending[id(old)][1])
    return copy


def as_model_file(model: Any) -> ModelFile:
    """Accept a ModelFile, a ModelProto or an onnx-graphsurgeon Graph."""
    if isinstance(model, ModelFile):
        return model
    if isinstance(model, onnx.ModelProto):
        return ModelFile(model=model)
    try:
        import onnx_graphsurgeon as gs
    except ImportError:  # pragma: no cover - a hard dependency
        gs = None
    if gs is not None and isinstance(model, gs.Graph):
        return ModelFile(model=gs.export_onnx(model))
    raise OnnxSparseError(f"expected an ONNX ModelProto, an onnx-graphsurgeon Graph or a ModelFile, got {type(model)}")


class Pass:
    """Base class. Subclasses implement :meth:`call`; ``in_place`` says whether they mutate."""

    in_place: bool = False
    #: Whether the pass computes with BLAS (then it runs inside :func:`onnx_sparse.core.blas.single_threaded`,
    #: so that its numbers do not depend on the cores; passes without BLAS skip importing it).
    numeric: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, mf: ModelFile) -> None:
        """Preconditions (raise OnnxSparseError)."""

    def ensures(self, result: PassResult) -> None:
        """Postconditions (raise OnnxSparseError or AssertionError)."""

    def call(self, mf: ModelFile) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: Any, *, consume: bool = False) -> PassResult:
        """Run the pass on ``model``, which it leaves as it was unless the pass is in place.

        ``consume``: the caller gives ``model`` up (it never reads it again), so the pass works on
        it rather than on a copy: a model loaded for one run then never holds its weights twice.
        """
        mf = as_model_file(model)
        self.requires(mf)
        direct = self.in_place or consume
        before = mf.model.SerializeToString(deterministic=True) if not direct and _small(mf) else None
        with blas.single_threaded() if self.numeric else contextlib.nullcontext():
            result = self.call(mf if direct else copy_model_file(mf))
        if before is not None:
            assert mf.model.SerializeToString(deterministic=True) == before, f"{self.name} changed its input"
        self.ensures(result)
        return result


def _small(mf: ModelFile) -> bool:
    return mf.model.ByteSize() < (64 << 20)


class Sequential(Pass):
    """Run passes one after another; ``modified`` is true if any pass changed the model."""

    in_place = True  # each member keeps its own promise; Sequential adds no copy

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def call(self, mf: ModelFile) -> PassResult:
        modified = False
        records: list[Any] = []
        for i, p in enumerate(self.passes):
            try:
                result = p(mf)
            except OnnxSparseError as exc:
                done = ", ".join(q.name for q in self.passes[:i]) or "none"
                raise OnnxSparseError(f"{p.name} failed (after: {done}): {exc.message}", exc.hint) from exc
            mf = result.model
            modified |= result.modified
            records.extend(result.records)
        return PassResult(mf, modified, records)
