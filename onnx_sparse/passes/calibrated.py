"""Calibrated one-shot 2:4 pruning: Wanda, SparseGPT and asymmetric SparseGPT, layer by layer.

:class:`CalibratedPrunePass` runs the model on a calibration set with onnxruntime and prunes
every selected eligible layer in dependency order (:func:`onnx_sparse.calib.capture.schedule`):
each layer is fitted to the activations of the model *as pruned so far*, the way SparseGPT and
Wanda do it. Methods:

* ``magnitude``: keep the two largest ``|w|`` of each group of 4 (no data needed, except for
  bias correction);
* ``wanda``: keep the two best ``|W_ij| * ||X_j||`` (Sun et al., 2023); weights not updated;
* ``sparsegpt``: choose the mask and update the kept weights from ``H = 2/n X^T X`` of the
  layer's input in the pruned model (Frantar & Alistarh, 2023);
* ``asym``: asymmetric reconstruction: first refit the dense weights so that the layer,
  fed the inputs it sees in the PRUNED model, reproduces the DENSE model's output of that
  layer (ridge, damping chosen per layer by K-fold cross-validation over the calibration
  samples, scoring the dense refit: :func:`onnx_sparse.prune.select.ridge_cv_scores`), then
  SparseGPT once on the refit weights. Needs captures of both models.

Weights are read and written through their stored tensors (:mod:`onnx_sparse.calib.layers`
explains the matrix view, and what happens to fp16/bf16 and quantized weights), with
:func:`onnx_sparse.passes.prune.apply_site`, like magnitude pruning.

Layers inside If/Loop/Scan bodies are fitted first, on the activations their bodies really see
(:mod:`onnx_sparse.passes.bodies`; one no calibration sample reaches is pruned by magnitude and
says so). Layers that cannot be calibrated (inside model-local functions, a constant Gemm ``A``,
a weight path that is not a pure permutation, a shared weight whose users feed each other)
are pruned by magnitude *before* calibration starts, so that every calibrated layer sees them
as they will be; each such layer gets a log line saying why.

Bias correction (``bias_correction=True``): ``b' = b + (W - W') E[x]`` with ``E[x]`` the mean
input in the pruned model (over im2col rows for a Conv, so zero padding counts), which keeps
every output's mean on the calibration data; for ``asym`` the target is the dense model's
mean, ``b' = b + W E[x_dense] - W' E[x_pruned]``. Where the node has no bias one is added: a
third input for Conv, the ``C`` input for Gemm (divided by ``beta``), and for MatMul either the
constant of the ``Add`` that follows it (when that Add is its only consumer) or a new ``Add``
inserted right after it (the MatMul's output is renamed, the Add takes over the old name, so
consumers and graph outputs need no rewiring). A bias that is shared, computed or quantized
is left alone (logged).

Row budget: each calibration sample contributes at most ``max_rows`` rows per layer (default
20,000), a seeded uniform subset; that bounds the cost of ``X^T X`` on large feature maps.

Row-starved layers: a SparseGPT layer that saw fewer rows than it has input features (an FC
head fed one row per sample, a squeeze-excitation conv) has a singular ``X^T X`` and the usual
1% damping lets its weight update overfit the calibration rows. Its damping is then chosen
by cross-validation over calibration samples (:data:`DAMP_GRID`, :data:`~onnx_sparse.calib.stats.CV_FOLDS`), which
on magika's classifier head took held-out top-1 agreement from below magnitude pruning's
to above it. On a wide layer that cross-validation walks a seeded subset of the output rows
and holds out fewer folds (:func:`~onnx_sparse.prune.select.choose_damp`).

Speed and reproducibility: BLAS runs single-threaded during the pass and independent work
runs side by side in worker threads, in pieces fixed by the shapes: the layers of one stage,
the cross-validation folds, SparseGPT's factorisation while ``asym`` chooses its refit, blocks
of the ``X^T X`` products (:mod:`onnx_sparse.core.blas` says why: the result must not depend
on the number of cores).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import onnx

from onnx_sparse.calib.capture import StagedRunner, body_producers, prefetch, run_model, schedule
from onnx_sparse.calib.data import require_finite, sample_number, validate_feeds
from onnx_sparse.calib.fakequant import FakeQuant
from onnx_sparse.calib.layers import LayerView, Unsupported, layer_view
from onnx_sparse.calib.spill import Spill, trim_heap
from onnx_sparse.calib.stats import LayerStats, Scratch
from onnx_sparse.core import blas, nm
from onnx_sparse.core.hessian import PairedStats
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.graph.locate import WeightSite, find_weight_sites
from onnx_sparse.graph.weights import read_weight, require_finite_weight, zero_value
from onnx_sparse.io import ModelFile
from onnx_sparse.passes.base import Pass, PassResult, copy_model_file
from onnx_sparse.passes.bias_write import shift_bias
from onnx_sparse.passes.bodies import fit_bodies, in_body
from onnx_sparse.passes.head import HeadLayer, head_candidates, head_tensors, refit_heads, softmax_heads
from onnx_sparse.passes.prune import PrunePass, SiteRecord, apply_site, group_by_tensor, totals
from onnx_sparse.progress import Progress, line
from onnx_sparse.prune.bias import bias_shift
from onnx_sparse.prune.select import InputFolds, asymmetric_cv_2_4, choose_damp
from onnx_sparse.prune.sparsegpt import InverseFactor, inverse_factor, prune_with_factor, sparsegpt_2_4
from onnx_sparse.prune.wanda import wanda_2_4
from onnx_sparse.recipe import DATA_METHODS, DEFAULT_CALIBRATED, DEFAULT_MAX_ROWS, METHODS, Recipe

__all__ = [
    "METHODS",
    "DATA_METHODS",
    "DEFAULT_MAX_ROWS",
    "CalibratedSiteRecord",
    "CalibratedPrunePass",
    "Calibrator",
    "LayerGroup",
    "LayerFit",
    "LayerStats",
]

logger = logging.getLogger(__name__)


FeedSource = Sequence[Mapping[str, np.ndarray]] | Callable[[onnx.ModelProto], Sequence[Mapping[str, np.ndarray]]]


@dataclass(frozen=True)
class CalibratedSiteRecord(SiteRecord):
    """A :class:`SiteRecord` with what calibration did.

    Attributes:
        rows: Activation rows the statistics were built from (after subsampling).
        loss: SparseGPT's estimate of the added output error (None for other methods).
        damp: The SparseGPT damping cross-validation chose for a row-starved layer (else None).
        refit_damp: The ridge damping cross-validation chose (``asym``; ``inf``: no refit).
        bias_corrected: Whether a bias was corrected or added.
        head_refit: For a softmax head refitted by KL divergence (``refit_head``): held-out
            KL and top-1 agreement with the dense model before and after, and the steps.
        seconds: Time spent on this tensor (statistics and solve, capture excluded).
        note: Why the method fell back to magnitude, if it did.
    """

    rows: int = 0
    loss: float | None = None
    damp: float | None = None
    refit_damp: float | None = None
    bias_corrected: bool = False
    head_refit: dict[str, float] | None = None
    seconds: float = 0.0
    note: str = ""


def _record(base: SiteRecord, **extra: Any) -> CalibratedSiteRecord:
    return CalibratedSiteRecord(**{f.name: getattr(base, f.name) for f in fields(SiteRecord)}, **extra)


#: Relative dampings tried for row-starved layers (values below ``damp`` are skipped).
DAMP_GRID: tuple[float, ...] = (0.01, 0.1, 1.0)


# --------------------------------------------------------------------------------------
# the engine


@dataclass
class LayerGroup:
    key: int
    sites: list[WeightSite]
    view: LayerView | None = None
    note: str = ""


@dataclass(frozen=True)
class LayerFit:
    """What solving one group gave: the method used, the stored tensor before and after, the
    rows and loss, the chosen refit damping, the time, a fallback note and the statistics."""

    group: LayerGroup
    method: str
    stored: np.ndarray
    new: np.ndarray
    rows: int
    loss: float | None
    refit_damp: float | None
    seconds: float
    note: str
    acc: LayerStats | None
    damp: float | None = None
    int8_scale: np.ndarray | None = None  # per output channel, when the joint INT8 walk rounded the weights


def _drain(gen: Iterator[Any]) -> None:
    for _ in gen:
        pass


def _input_key(g: LayerGroup) -> tuple[Any, ...]:
    """What makes two groups' statistics the same: the activations their sites read and how the
    view turns them into rows (groups with equal keys share one :class:`LayerStats`)."""
    v = g.view
    assert v is not None
    return (
        tuple(s.activation for s in g.sites), v.kind, v.groups, v.cols, v.trans_a,
        v.kernel_shape, v.strides, v.dilations, v.pads, v.auto_pad,
    )  # fmt: skip


class SharedInput:
    """What the groups that read one input compute once (:meth:`Calibrator.solve`): the
    cross-validation folds of ``asym`` (:class:`~onnx_sparse.prune.select.InputFolds`) and
    SparseGPT's factor, per conv group (and damping). The groups are solved one after the
    other, each with the very factorisations it would otherwise make itself."""

    def __init__(self, users: int) -> None:
        self.users = users
        #: per conv group, the folds the first weight prepared (:meth:`Calibrator._folds`)
        self.folds: dict[int, InputFolds] = {}
        self._factors: dict[tuple[int, float], InverseFactor] = {}

    def factor(self, g: int, damp: float, make: Callable[[], InverseFactor]) -> InverseFactor:
        """SparseGPT's factor of group ``g``'s input at ``damp`` (made by ``make`` the first time)."""
        key = (g, damp)
        if key not in self._factors:
            self._factors[key] = make()
        return self._factors[key]


class Calibrator:
    """Layer-by-layer calibration of selected tensor groups (the engine behind the passes).

    Args:
        method: One of :data:`METHODS`.
        damp: SparseGPT relative damping.
        refit_confirm: ``asym``: the refit dampings the pruned refit's held-out error decides
            between (:func:`~onnx_sparse.prune.select.choose_refit_damp`'s ``confirm``).
        blocksize: SparseGPT block size.
        max_rows: Row budget per sample and layer (None: all rows).
        seed: Seed of the row subsampling.
        folds: Cross-validation folds for ``asym`` (at most the number of samples).
        threads: onnxruntime intra-op threads (None: its default).
        row_mask: Name of a graph input that marks padding with 0 (``attention_mask``
            ``[batch, seq]``): rows of MatMul/Gemm inputs shaped ``[batch, seq, features]`` at
            those positions are left out of every statistic. Padded tokens are not data; in
            a padded batch they can outnumber the real ones.
        spill_budget: Bytes of captured activations (both models' frontiers) kept in memory;
            the rest goes to memory-mapped files (None: :func:`onnx_sparse.calib.spill.default_budget`).
    """

    def __init__(
        self,
        method: str = "sparsegpt",
        *,
        damp: float = 0.01,
        refit_confirm: int = 0,
        blocksize: int = 128,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        seed: int = 0,
        folds: int = 4,
        threads: int | None = None,
        row_mask: str | None = None,
        spill_budget: int | None = None,
        int8_nodes: Mapping[str, np.ndarray | None] | None = None,
    ) -> None:
        if method not in METHODS:
            raise OnnxSparseError(f"unknown pruning method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
        if not damp >= 0:
            raise OnnxSparseError(f"--damp must be non-negative, got {damp}")
        if blocksize < 4 or blocksize % 4:
            raise OnnxSparseError(f"--blocksize must be a positive multiple of 4, got {blocksize}")
        if max_rows is not None and max_rows < 1:
            raise OnnxSparseError(f"max_rows must be positive, got {max_rows}")
        self.method = method
        if refit_confirm < 0:
            raise OnnxSparseError(f"--refit-confirm must be >= 0, got {refit_confirm}")
        self.damp = damp
        self.refit_confirm = refit_confirm
        self.blocksize = blocksize
        self.max_rows = max_rows
        self.seed = seed
        self.folds = folds
        self.threads = threads
        self.row_mask = row_mask
        self.spill_budget = spill_budget
        # layers that will be INT8 (-> the per-input-channel rescaling their weight will get, or None):
        # SparseGPT's walk rounds their kept weights onto INT8 grids (joint walk)
        self.int8_nodes: Mapping[str, np.ndarray | None] = int8_nodes or {}
        # tensors rounded to INT8 as the sparse INT8 model will round them: each layer is fitted on
        # its input as it will be, computed through everything upstream as it will be
        self.fake_quant: FakeQuant | None = None
        self.last_spill: Spill | None = None  # the last run's (for its counters)
        # the last run's ``tail`` values, per sample, in the pruned and the dense model
        self.last_tail: list[dict[str, np.ndarray]] = []
        self.last_tail_dense: list[dict[str, np.ndarray]] = []

    # ---------------------------------------------------------------- planning

    @staticmethod
    def groups(
        mf: ModelFile, sites: Sequence[WeightSite], bodies: bool = False
    ) -> tuple[list[LayerGroup], list[LayerGroup]]:
        """Split tensor groups into calibratable ones (with their view) and magnitude fallbacks.

        ``bodies``: layers inside If/Loop/Scan bodies are calibratable too (the caller fits them
        with :func:`onnx_sparse.passes.bodies.fit_bodies`); otherwise they are fallbacks."""
        producers = {o: n for n in mf.model.graph.node for o in n.output if o}
        ok, fallback = [], []
        for k, members in enumerate(group_by_tensor(sites)):
            grp = LayerGroup(k, list(members))
            try:
                views = [_view(s, mf, producers, bodies) for s in members]
                first = views[0]
                for v in views[1:]:
                    if (
                        v.kind != first.kind
                        or v.groups != first.groups
                        or not all(np.array_equal(a, b) for a, b in zip(v.index, first.index, strict=True))
                    ):
                        raise Unsupported(f"{v.site.node}: shares its weight with {first.site.node} in another layout")
                grp.view = first
                grp.sites = members
                ok.append(grp)
            except Unsupported as exc:
                grp.note = str(exc)
                fallback.append(grp)
        return ok, fallback

    # ---------------------------------------------------------------- solving

    def solve(
        self, grp: LayerGroup, acc: LayerStats | None, mf: ModelFile, t0: float, shared: SharedInput | None = None
    ) -> LayerFit:
        """The new stored weight of one group from its statistics (magnitude without a view or data).

        ``shared``: what the groups that read the same input (and so share ``acc``) compute once."""
        if acc is not None:
            acc.flush()
        with blas.single_threaded():
            return self._solve(grp, acc, mf, t0, shared)

    def _solve(
        self, grp: LayerGroup, acc: LayerStats | None, mf: ModelFile, t0: float, shared: SharedInput | None
    ) -> LayerFit:
        site = grp.sites[0]
        view = grp.view
        stored = np.array(read_weight(site, mf, mmap=False))
        if acc is not None:
            require_finite_weight(stored, site.weight, f"pruning with calibration data ({self.method})")
        zero = zero_value(site)
        loss: float | None = None
        refit: float | None = None
        chosen: float | None = None
        int8_scale: np.ndarray | None = None
        note = grp.note
        method = self.method
        if view is None:
            method = "magnitude"
        elif acc is None and method in DATA_METHODS:
            note = grp.note or "no statistics"
            method = "magnitude"
        elif acc is not None and acc.rows == 0 and method in DATA_METHODS:
            note = "no activation rows were captured"
            method = "magnitude"
        if view is None or method == "magnitude":
            assert site.axis is not None
            new = nm.prune_2_4(stored, site.axis, zero=zero)
        else:
            assert acc is not None
            mats = view.matrices(stored)
            out = []
            losses = []
            joint = (
                bool(self.int8_nodes)
                and all(s.node in self.int8_nodes for s in grp.sites)
                and not view.mask_only
                and view.requant is None
                and stored.dtype == np.float32
            )
            scales: list[np.ndarray] = []
            cols = self._int8_columns(grp, view) if joint else None
            for g, w in enumerate(mats):
                if method == "wanda":
                    assert acc.stats is not None
                    out.append(wanda_2_4(w, acc.stats[g].col_norm))
                elif method == "sparsegpt":
                    assert acc.stats is not None
                    st = acc.stats[g]
                    damp = self.damp
                    if acc.raw is not None and len({f for f, _ in acc.raw}) > 1:
                        assert st.xtx is not None
                        damp = self._cv_damp(w, st.xtx, [(f, rows[g]) for f, rows in acc.raw])
                        chosen = damp if chosen is None else max(chosen, damp)
                    if shared is not None:  # one factor for every weight that reads this input
                        factor = shared.factor(g, damp, lambda st=st, w=w, damp=damp: inverse_factor(
                            st.hessian(damp=0.0), w.shape[1], damp=damp, dead=st.dead))  # fmt: skip
                        new_w, info = prune_with_factor(w, factor, self.blocksize, int8=joint, col_scale=cols)
                    else:
                        new_w, info = sparsegpt_2_4(
                            w, st.hessian(damp=0.0), blocksize=self.blocksize, damp=damp, dead=st.dead, int8=joint,
                            col_scale=cols,
                        )  # fmt: skip
                    out.append(new_w)
                    if info.scale is not None:
                        scales.append(info.scale)
                    losses.append(info.loss)
                else:
                    assert acc.paired is not None
                    # the folds prepared once for every weight that reads this input
                    inputs = self._folds(acc, g, shared)
                    if inputs is not None:
                        n_rows = inputs.every.n
                        new_w, info, cv = asymmetric_cv_2_4(
                            w,
                            confirm=self.refit_confirm,
                            blocksize=self.blocksize,
                            damp=self.damp,
                            inputs=inputs,
                            int8=joint,
                            col_scale=cols,
                            offset=acc.offsets.get(grp.key) if acc.project is not None else None,
                        )
                        refit = cv.damp if refit is None else max(refit, cv.damp)
                    else:
                        slots = acc.paired[g]
                        n_rows = sum(f.n for f in slots)
                        every = PairedStats.total([f for f in slots if f.n > 0])
                        new_w, info = sparsegpt_2_4(
                            w, every.pp, blocksize=self.blocksize, damp=self.damp, int8=joint, col_scale=cols
                        )
                        note = note or "one calibration sample: no cross-validation, plain SparseGPT"
                    out.append(new_w)
                    if info.scale is not None:
                        scales.append(info.scale)
                    # H was X^T X here, not 2/n X^T X: rescale the loss to SparseGPT's units
                    losses.append(info.loss * 2.0 / max(1, n_rows))
            loss = float(sum(losses)) if losses else None
            new = view.to_stored(out, stored, zero)
            if scales and len(scales) == len(mats):
                int8_scale = np.concatenate(scales)
        assert site.axis is not None
        assert nm.is_2_4(new, site.axis, zero), f"{site.node}: calibrated weight is not 2:4 along axis {site.axis}"
        return LayerFit(
            grp, method, stored, new, acc.rows if acc else 0, loss, refit, time.perf_counter() - t0, note, acc, chosen,
            int8_scale,
        )  # fmt: skip

    def _folds(self, acc: LayerStats, g: int, shared: SharedInput | None) -> InputFolds | None:
        """Group ``g``'s cross-validation folds (from ``shared`` when an earlier weight of the same
        input made them), or None when there are too few for a cross-validation. The folds take the
        statistics over (``acc`` lets go of them), so that what the cross-validation no longer
        needs is freed during the solve (:class:`~onnx_sparse.prune.select.InputFolds`)."""
        if shared is not None and g in shared.folds:
            return shared.folds[g]
        assert acc.paired is not None
        slots = acc.paired[g]
        held, rest = (slots, None) if len(slots) == acc.held else (slots[: acc.held], slots[acc.held])
        folds = [f for f in held if f.n > 0]
        if not (len(folds) >= 2 or (folds and rest is not None and rest.n > 0)):
            return None
        inputs = InputFolds(folds, rest, self.damp, users=shared.users if shared is not None else 1)
        acc.paired[g] = []
        if shared is not None:
            shared.folds[g] = inputs
        return inputs

    def _projection(
        self, grps: Sequence[LayerGroup], mf: ModelFile
    ) -> tuple[list[np.ndarray] | None, dict[int, int] | None]:
        """``asym``: the dense weights of the groups that read one input, stacked per conv group, for
        statistics that hold ``pq W^T`` instead of ``pq`` (:class:`LayerStats`' ``project``), with
        each group's first row; (None, None) where ``pq`` itself is cheaper to gather (``2 out >=
        cols``: the products cost ``2 n cols out`` against ``n cols^2``) or is read whole (the
        pruned refit's scores, ``refit_confirm``)."""
        view = grps[0].view
        if self.method != "asym" or self.refit_confirm or view is None:
            return None, None
        if 2 * sum(g.view.rows_per_group if g.view is not None else view.cols for g in grps) >= view.cols:
            return None, None  # (decided on the shapes: no weight is read for it)
        mats = [view.matrices(np.asarray(read_weight(g.sites[0], mf))) for g in grps]
        offsets, at = {}, 0
        for g, m in zip(grps, mats, strict=True):
            offsets[g.key] = at
            at += m[0].shape[0]
        return [np.concatenate([m[k] for m in mats]) for k in range(view.groups)], offsets

    def _int8_columns(self, grp: LayerGroup, view: LayerView) -> np.ndarray | None:
        """The per-column scaling the group's weight will be stored with (its input channels' rescaling,
        tiled over a Conv's kernel positions), or None."""
        v = self.int8_nodes.get(grp.sites[0].node)
        if v is None:
            return None
        v = np.asarray(v, dtype=np.float64).ravel()
        if view.cols % v.size:
            return None
        return np.tile(v, view.cols // v.size)

    def _cv_damp(self, w: np.ndarray, xtx: np.ndarray, rows: Sequence[tuple[int, np.ndarray]]) -> float:
        """SparseGPT damping for a row-starved layer (:func:`~onnx_sparse.prune.select.choose_damp`
        over the folds of calibration samples; values below ``damp`` are not tried)."""
        folds = sorted({f for f, _ in rows})
        data = [np.concatenate([r for g, r in rows if g == f]) for f in folds]
        grid = sorted({d for d in DAMP_GRID if d >= self.damp} | {self.damp})
        return choose_damp(w, xtx, data, grid, blocksize=self.blocksize)[0]

    # ---------------------------------------------------------------- the loop

    def check_row_mask(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Raise when the padding mask (``row_mask``) is not one of the calibration inputs."""
        if self.row_mask is not None and feeds and self.row_mask not in feeds[0]:
            raise OnnxSparseError(
                f"--mask-input {self.row_mask!r} is not an input of the model",
                hint=f"the inputs are {list(feeds[0])}",
            )

    def run(
        self,
        mf: ModelFile,
        groups: Sequence[LayerGroup],
        feeds: Sequence[Mapping[str, np.ndarray]],
        *,
        apply: Callable[[LayerFit, StagedRunner], None] | None,
        dense: ModelFile | None = None,
        means: bool = False,
        tail: Sequence[str] = (),
    ) -> Iterator[LayerFit]:
        """Capture and solve ``groups`` stage by stage, yielding each fit.

        Args:
            mf: The model captures run on. With ``apply``, ``apply(fit, runner)`` is called
                for every fit before the next stage is captured (sequential calibration);
                without it nothing is written and every layer sees dense inputs.
            groups: Calibratable groups (from :meth:`groups`).
            feeds: Validated calibration samples.
            dense: The dense model, for ``asym`` (required then).
            means: Also collect ``E[x]`` per member (bias correction).
            tail: Tensors to compute after the last stage, per sample, in the pruned model
                (:attr:`last_tail`) and, for ``asym``, in the dense one (:attr:`last_tail_dense`):
                only the nodes not run yet run (e.g. what a softmax-head refit reads). Both stay
                empty when a runner can no longer give them (:meth:`StagedRunner.computable`).
        """
        if self.method == "asym" and dense is None:
            raise AssertionError("asym needs the dense model")
        self.check_row_mask(feeds)
        self.last_tail, self.last_tail_dense = [], []
        sched = schedule(list(mf.model.graph.node), [[(s.node_proto, s.activation) for s in g.sites] for g in groups])
        spill = self.last_spill = Spill(self.spill_budget)  # one memory budget for both models' frontiers
        runner = StagedRunner(mf, feeds, threads=self.threads, spill=spill, fake_quant=self.fake_quant)
        fq = self.fake_quant
        dense_runner = (
            StagedRunner(dense, feeds, threads=self.threads, spill=spill) if self.method == "asym" and dense else None
        )
        for k in sched.cyclic:
            groups[k].note = f"{groups[k].sites[0].node}: its weight is shared by layers that feed each other"
            fit = self.solve(_with_view(groups[k], None), None, mf, time.perf_counter())
            if apply is not None:
                apply(fit, runner)
            yield fit
        scratch = Scratch()  # the flushes' joined rows, reused through a stage's capture
        for stage in sched.stages:
            members = [groups[k] for k in stage]
            targets = [s.activation for g in members for s in g.sites]
            needs_data = self.method in DATA_METHODS or means
            # groups that read the same input the same way (Q, K and V) share one set of statistics
            accs: dict[int, LayerStats | None] = {}
            lead: dict[Any, int] = {}  # group key -> the key of the first group of its input
            readers: dict[int, list[LayerGroup]] = {}  # the first group's key -> the groups of its input
            for g in members:
                if not needs_data or g.view is None:
                    accs[g.key] = None
                    continue
                rounded = tuple(fq is not None and fq.reads(s.node, s.activation) for s in g.sites)
                first = lead.setdefault((_input_key(g), rounded), g.key)
                lead[g.key] = first
                readers.setdefault(first, []).append(g)
            for grps in readers.values():
                g = grps[0]
                project, offsets = self._projection(grps, mf)
                acc = LayerStats(
                    g.key, g.view, len(g.sites), self.method, len(feeds), self.folds, self.max_rows, self.seed, means,
                    scratch, project, offsets,
                )  # fmt: skip
                for h in grps:
                    accs[h.key] = acc
            if needs_data:
                t_cap = time.perf_counter()
                # until a pruned layer is upstream, the dense model computes what the pruned one does: the
                # pruned model's values serve both (no second session, e.g. MiniLM's embeddings)
                mirrored = dense_runner.mirror(runner, targets) if dense_runner is not None else None
                # both models' runs in threads of their own, overlapping each other and the statistics
                gen = prefetch(runner.iter_stage(targets))
                dgen = (
                    prefetch(dense_runner.iter_stage(targets))
                    if dense_runner is not None and mirrored is None
                    else None
                )
                for i, acts in gen:
                    dacts = next(dgen)[1] if dgen is not None else acts if mirrored is not None else None
                    keep = feeds[i][self.row_mask] if self.row_mask is not None else None
                    for g in members:
                        acc = accs[g.key]
                        if acc is None or lead[g.key] != g.key:
                            continue  # no statistics, or the first group of its input gathers them
                        for m, s in enumerate(g.sites):
                            x = acts[s.activation]
                            xd = dacts[s.activation] if dacts else None
                            both = (x, xd) if xd is not None and xd is not x else (x,)
                            require_finite(both, s.activation, sample_number(feeds[i], i))
                            if fq is not None and fq.reads(s.node, s.activation):
                                x = fq.apply(s.activation, x)  # the input as the INT8 layer will read it
                            try:
                                acc.update(m, i, x, xd, keep)
                            except Unsupported as exc:
                                for h in members:
                                    if accs[h.key] is acc:
                                        h.note = str(exc)
                                        accs[h.key] = None
                                break
                if dgen is not None:
                    _drain(dgen)
                if mirrored is not None:
                    assert dense_runner is not None
                    dense_runner.adopt(runner, mirrored)
                logger.debug("stage of %d tensor(s): capture %.2fs", len(members), time.perf_counter() - t_cap)
            for acc in {id(a): a for a in accs.values() if a is not None}.values():
                acc.flush()  # the last products, in blocks side by side
            scratch.clear()
            trim_heap()  # what the capture freed goes back before the solves allocate theirs
            # the inputs of a stage are independent: solved side by side, applied in order; the groups
            # that share an input one after the other, sharing what only depends on the input
            jobs: dict[int, list[LayerGroup]] = {}
            for g in members:
                acc = accs[g.key]
                jobs.setdefault(id(acc) if acc is not None else -1 - g.key, []).append(g)

            def solve_input(grps: list[LayerGroup], accs: dict[int, LayerStats | None] = accs) -> list[LayerFit]:
                acc = accs[grps[0].key]
                shared = SharedInput(len(grps)) if acc is not None and len(grps) > 1 else None
                return [self.solve(g, acc, mf, time.perf_counter(), shared) for g in grps]

            fits = {f.group.key: f for part in blas.parallel_map(solve_input, list(jobs.values())) for f in part}
            for g in members:
                fit = fits.pop(g.key)
                if apply is not None:
                    apply(fit, runner)
                accs[g.key] = None  # free the statistics
                yield fit
            del fits, jobs, fit  # the stage's statistics must not live on through the next capture
            trim_heap()
        if tail and all(r.computable(tail) for r in (runner, dense_runner) if r is not None):
            self.last_tail = [values for _, values in runner.iter_stage(tail)]
            if dense_runner is not None:
                self.last_tail_dense = [values for _, values in dense_runner.iter_stage(tail)]
        if apply is not None:
            runner.commit()
        spill.close()
        logger.debug(
            "capture: %d pieces, build %.2fs, onnxruntime %.2fs, %.0f MB of activations spilled to disk",
            runner.stats["pieces"],
            runner.stats["build_s"],
            runner.stats["run_s"],
            spill.spilled / 1e6,
        )


def _refit_words(refit_damp: float | None) -> str:
    """The per-layer log words for ``asym``'s dense refit (see :attr:`CalibratedSiteRecord.refit_damp`)."""
    if refit_damp is None:
        return ""
    if refit_damp == float("inf"):
        return ", no dense refit (cross-validation kept the dense weights)"
    return f", dense refit with ridge damp {refit_damp:g} (cross-validated)"


def _view(site: WeightSite, mf: ModelFile, producers: Mapping[str, onnx.NodeProto], bodies: bool) -> LayerView:
    """``site``'s matrix view; inside an If/Loop/Scan body (with ``bodies``) from its own scope's producers."""
    if not site.scope or not bodies:
        return layer_view(site, mf, producers)
    own = body_producers(mf.model, site.node_proto)
    if own is None:
        raise Unsupported(f"{site.node}: inside a function ({site.scope})")
    return layer_view(site, mf, own, in_body=True)


def _with_view(g: LayerGroup, view: LayerView | None) -> LayerGroup:
    g.view = view
    return g


# --------------------------------------------------------------------------------------
# bias correction


def _apply_bias(fit: LayerFit, runner: StagedRunner, mf: ModelFile, method: str) -> bool:
    """Correct (or add) the bias of every node that uses the group's weight."""
    acc = fit.acc
    view = fit.group.view
    if acc is None or acc.mean_p is None or view is None or acc.x_dtype is None:
        return False
    old = view.matrices(fit.stored)
    new = view.matrices(fit.new)
    done = False
    for m, site in enumerate(fit.group.sites):
        if method == "asym" and acc.mean_d is not None:
            parts = [
                o @ acc.mean_d[m][g].mean - w @ acc.mean_p[m][g].mean
                for g, (o, w) in enumerate(zip(old, new, strict=True))
            ]
        else:
            parts = [bias_shift(o, w, acc.mean_p[m][g].mean) for g, (o, w) in enumerate(zip(old, new, strict=True))]
        shift = np.concatenate(parts)
        if not np.any(shift):
            continue
        dtype = acc.x_dtype if acc.x_dtype.kind == "f" or acc.x_dtype.name == "bfloat16" else np.dtype(np.float32)
        why = shift_bias(site, view, shift, runner, mf, dtype)
        if why:
            logger.info("bias not corrected: %s", why)
        else:
            done = True
    return done


# --------------------------------------------------------------------------------------
# the pass


class CalibratedPrunePass(Pass):
    """Prune every selected eligible layer to 2:4 with a calibrated method (functional pass).

    Args:
        recipe: The :class:`~onnx_sparse.recipe.Recipe` (its method, selection, calibration
            settings, ``bias_correction`` and ``refit_head`` are used; a recipe without a
            method is resolved as with data). A method name instead, with the recipe's
            fields as keywords in ``options``, builds one (the older keyword form).
        feeds: Calibration samples (``{input name: array}``), or a callable that makes them
            from the model (called once per run). Not needed for plain magnitude.
        sites: Only these node names (a shared weight needs all its nodes listed).
        folds: Cross-validation folds for ``asym``.
        threads: onnxruntime intra-op threads.
        on_fit: Called with every :class:`LayerFit` after it is written (inspection, tests).
        int8_nodes: Layers that will be INT8 (``prune --int8``): SparseGPT's walk rounds their kept
            weights onto per-output-channel INT8 grids as it fixes them (the joint walk of
            :mod:`onnx_sparse.prune.sparsegpt`); each fit carries the scales (``LayerFit.int8_scale``).
            A mapping gives, per layer, the per-input-channel rescaling its weight will be stored
            with after the prune (:mod:`onnx_sparse.quant.smooth`), or None.

    Cases: eligible main-graph layer -> calibrated; not calibratable -> magnitude (logged);
    not eligible or not selected -> untouched; no weight changed -> ``modified`` False.
    """

    numeric = True

    in_place = False

    def __init__(
        self,
        recipe: Recipe | str = "sparsegpt",
        feeds: FeedSource | None = None,
        *,
        sites: Iterable[str] | None = None,
        folds: int = 4,
        threads: int | None = None,
        on_fit: Callable[[LayerFit], None] | None = None,
        int8_nodes: Mapping[str, np.ndarray | None] | Iterable[str] = (),
        **options: Any,
    ) -> None:
        if isinstance(recipe, Recipe):
            if options:
                raise TypeError(f"pass either a Recipe or keyword options, not both ({sorted(options)})")
        else:
            recipe = Recipe(method=recipe, **options)
        recipe = recipe.resolve(has_data=True)
        self.recipe = recipe
        self.on_fit = on_fit
        method = recipe.method
        assert method is not None
        self.engine = Calibrator(
            method,
            damp=recipe.damp,
            refit_confirm=recipe.refit_confirm,
            blocksize=recipe.blocksize,
            max_rows=recipe.max_rows,
            seed=recipe.seed,
            folds=folds,
            threads=threads,
            row_mask=recipe.row_mask,
            int8_nodes=dict(int8_nodes) if isinstance(int8_nodes, Mapping) else dict.fromkeys(int8_nodes),
        )
        self.method = method
        bias_correction, refit_head = bool(recipe.bias_correction), bool(recipe.refit_head)
        if (method in DATA_METHODS or bias_correction or refit_head) and feeds is None:
            extra = " with bias correction" if bias_correction else " with a head refit" if refit_head else ""
            raise OnnxSparseError(
                f"{method}{extra} needs calibration data",
                hint="pass calibration feeds (a list of {input name: array}); "
                "onnx_sparse.calib.data.random_feeds(model) makes random ones for a smoke test",
            )
        self.feeds = feeds
        self.bias_correction = bias_correction
        self.refit_head = refit_head
        self.selection = recipe.selection
        self.sites = None if sites is None else set(sites)

    def selected_sites(self, mf: ModelFile) -> list[WeightSite]:
        """Selected eligible sites (a shared weight only when all its nodes are selected)."""
        sites = PrunePass(**self.selection).selected_sites(mf)
        if self.sites is None:
            return sites
        out = []
        for grp in group_by_tensor(sites):
            if all(s.node in self.sites for s in grp):
                out.extend(grp)
        return out

    def resolve_feeds(self, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
        """The validated calibration samples for ``model``."""
        feeds = self.feeds(model) if callable(self.feeds) else self.feeds
        assert feeds is not None
        return validate_feeds(model, feeds)

    def call(self, mf: ModelFile) -> PassResult:
        t_start = time.perf_counter()
        sites = self.selected_sites(mf)
        method = self.method
        if not sites:
            logger.warning("no eligible layers selected: nothing to prune")
            return PassResult(mf, False, [])
        needs_data = method in DATA_METHODS or self.bias_correction or self.refit_head
        feeds = self.resolve_feeds(mf.model) if needs_data else []
        # read only: an inline model's dense weights are read from its file, not copied
        dense = copy_model_file(mf, read_only=True) if method == "asym" else None
        groups, fallback = self.engine.groups(mf, sites, bodies=True)
        bodies = [g for g in groups if in_body(g)]  # fitted first, on what their bodies see
        groups = [g for g in groups if not in_body(g)]
        heads = head_candidates(mf, [(g.sites, g.view) for g in groups]) if self.refit_head else []
        # one sample screens the candidates: most models have no softmax head, and what the refit
        # needs over every sample (below) is not free
        if heads and feeds:
            self.engine.check_row_mask(feeds)
            heads = softmax_heads(mf, heads, feeds[0], threads=self.engine.threads, row_mask=self.engine.row_mask)
        # what the head refit reads comes from the staged capture, after the last stage (only the
        # nodes after the last pruned layer run again); asym's dense capture gives the dense outputs
        tail = head_tensors(mf, heads, feeds[0]) if heads else []
        dense_outputs: Sequence[Mapping[str, np.ndarray]] = (
            list(run_model(mf, feeds, self.engine.threads)) if heads and dense is None else []
        )
        records: list[SiteRecord] = []
        # Layers that cannot be calibrated are pruned first, so the others see them as final.
        for grp in fallback:
            logger.info("%s", line(f"magnitude instead of {method}:", grp.note))
            fit = self.engine.solve(_with_view(grp, None), None, mf, time.perf_counter())
            rec = apply_site(grp.sites[0], grp.sites, mf, fit.new, "magnitude", original=fit.stored)
            records.append(_record(rec, note=grp.note))
        total = len(groups) + len(bodies)
        done = 0

        def apply(fit: LayerFit, runner: StagedRunner | None) -> None:
            nonlocal done
            grp = fit.group
            used = fit.method
            rec = apply_site(grp.sites[0], grp.sites, mf, fit.new, used, original=fit.stored)
            # bias edits are main-graph nodes: none inside If/Loop bodies (runner None)
            corrected = _apply_bias(fit, runner, mf, method) if self.bias_correction and runner is not None else False
            done += 1
            if fit.note:
                logger.info("%s", line("", f"{grp.sites[0].node}:", fit.note))
            extra = f", loss {fit.loss:.4g}" if fit.loss is not None else ""
            extra += _refit_words(fit.refit_damp)
            extra += f", damp {fit.damp:g} by cross-validation" if fit.damp is not None else ""
            if fit.method in ("sparsegpt", "asym") and grp.view is not None and fit.rows < grp.view.cols:
                starved.append(f"{grp.sites[0].node} ({fit.rows} rows < {grp.view.cols} inputs)")
                extra += f", starved: rows < {grp.view.cols} inputs"
            if fit.acc is not None and fit.acc.masked:
                extra += f", padding left out of {fit.acc.masked} samples"
            names = ",".join(s.node for s in grp.sites)  # full under -v and in the JSON report
            logger.info("%s", line(f"[{done}/{total}]", names, f"{used} {fit.seconds:.2f}s ({fit.rows} rows{extra})"))
            if self.on_fit is not None:
                self.on_fit(fit)
            records.append(
                _record(
                    rec,
                    rows=fit.rows,
                    loss=fit.loss,
                    damp=fit.damp,
                    refit_damp=fit.refit_damp,
                    bias_corrected=corrected,
                    seconds=fit.seconds,
                    note=fit.note,
                )
            )

        starved: list[str] = []
        for _ in fit_bodies(self.engine, mf, bodies, feeds, dense, lambda fit: apply(fit, None)):
            pass
        if groups:
            with Progress(total, method) as bar:
                run = self.engine.run(
                    mf, groups, feeds, apply=apply, dense=dense, means=self.bias_correction, tail=tail
                )
                for fit in run:
                    bar.update(note=",".join(s.node for s in fit.group.sites))
                    # not held while the next stage is captured and solved (its weights, old and new)
                    del fit
        if starved:
            logger.warning(
                "%d layer(s) were fitted on fewer activation rows than their input width, so the %s fit is "
                "underdetermined (damping chosen by cross-validation over samples limits the harm): %s. "
                "Give more calibration samples (more feeds, or --iterations with random data), longer sequences "
                "or larger inputs, or leave these layers out (--exclude).",
                len(starved), method, ", ".join(starved[:8]) + (f", and {len(starved) - 8} more" if len(starved) > 8 else ""),
            )  # fmt: skip
        if self.refit_head:
            if heads and dense is not None:
                outputs = [o.name for o in mf.model.graph.output]
                dense_outputs = (
                    [{k: v[k] for k in outputs} for v in self.engine.last_tail_dense]
                    if self.engine.last_tail_dense
                    else list(run_model(dense, feeds, self.engine.threads))
                )
            self._refit_heads(mf, heads, feeds, dense_outputs, records, self.engine.last_tail or None)
        modified = any(r.groups_changed for r in records) or any(getattr(r, "bias_corrected", False) for r in records)
        t = totals(records)
        logger.info(
            "%s: pruned %d tensors (%d layers, %d parameters) in %.1fs: %d of %d groups changed, retained magnitude %.4f",
            method, t["tensors"], t["layers"], t["params"], time.perf_counter() - t_start, t["groups_changed"],
            t["groups"], t["retained_magnitude"],
        )  # fmt: skip
        return PassResult(mf, modified, records)

    def _refit_heads(
        self,
        mf: ModelFile,
        heads: Sequence[HeadLayer],
        feeds: Sequence[Mapping[str, np.ndarray]],
        dense_outputs: Sequence[Mapping[str, np.ndarray]],
        records: list[SiteRecord],
        pruned: Sequence[Mapping[str, np.ndarray]] | None,
    ) -> None:
        done = 0
        engine = self.engine
        for res in refit_heads(
            mf, heads, feeds, dense_outputs, threads=engine.threads, seed=engine.seed, row_mask=engine.row_mask,
            pruned=pruned,
        ):  # fmt: skip
            layer, info = res.layer, res.fit
            if info is None:
                logger.debug("%s: not a softmax head: %s", layer.site.node, res.note)
                continue
            logger.info(
                "softmax head %s refit by KL divergence: held-out KL %.4g -> %.4g, top-1 agreement %.4f -> %.4f "
                "(%d held-out rows, step %d of %d, %.1fs)%s",
                layer.site.node, info.kl_before, info.kl_after, info.agree_before, info.agree_after,
                info.held_out_rows, info.best_step, info.steps, info.seconds, f": {res.note}" if res.note else "",
            )  # fmt: skip
            done += 1
            if res.new_stored is None:
                continue
            at = next(i for i, r in enumerate(records) if r.nodes == tuple(s.node for s in layer.sharers))
            old = records[at]
            assert layer.dense is not None  # copied by the screen
            rec = apply_site(layer.site, layer.sharers, mf, res.new_stored, old.method, original=layer.dense)
            base = {f.name for f in fields(SiteRecord)}
            extra = {f.name: getattr(old, f.name) for f in fields(CalibratedSiteRecord) if f.name not in base}
            extra["head_refit"] = {
                "kl_before": info.kl_before, "kl_after": info.kl_after, "agree_before": info.agree_before,
                "agree_after": info.agree_after, "best_step": info.best_step, "held_out_rows": info.held_out_rows,
            }  # fmt: skip
            records[at] = _record(rec, **extra)
        if not done:
            # Asked for: a warning. Part of the default recipe (which refits a head where there is one): info.
            r, d = self.recipe, DEFAULT_CALIBRATED
            default = (r.method, r.bias_correction, r.refit_head) == (d.method, d.bias_correction, d.refit_head)
            logger.log(
                logging.INFO if default else logging.WARNING,
                "%s: no pruned layer feeds a softmax that the model returns; nothing refitted",
                "head refit (default recipe)" if default else "--refit-head",
            )

    def ensures(self, result: PassResult) -> None:
        nodes = {n for r in result.records if isinstance(r, SiteRecord) for n in r.nodes}
        for site in find_weight_sites(result.model.model, macs=False):
            if site.node in nodes and site.eligible:
                w = read_weight(site, result.model)
                if not nm.is_2_4(w, site.axis, zero_value(site)):
                    raise AssertionError(f"{site.node}: weight {site.weight} is not 2:4 after pruning")
                result.model.release(site.tensor)
