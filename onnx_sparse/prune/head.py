"""Refit a pruned softmax head to the dense model's probabilities (KL divergence).

Layer-wise methods (Wanda, SparseGPT, asym) make each layer's *output* close in squared
error. For the layer whose output, plus a constant bias, *is* the input of a softmax
that the model returns (a classifier head), that is only a proxy: what matters is the
probabilities, and squared error on the logits spends effort on classes nobody picks while a
near tie between the top two flips. For that one layer the model's own loss is available
exactly, so we minimise it: with ``z = W x + b`` and the dense probabilities ``p``,

    minimise  mean over rows of  KL(p || softmax(W' x + b'))

over the **kept** entries of ``W'`` (the 2:4 mask stays as the layer-wise method chose it)
and the bias ``b'``, starting from the layer-wise fit. The inputs ``x`` are the head's
inputs in the already pruned model, so the refit also absorbs the error of every earlier
layer. Full-batch Adam with step sizes relative to the weights' scale; the rows of some
calibration samples are held out and the iterate with the smallest held-out KL is kept
(early stopping is the only regulariser: with few samples the fit would otherwise learn
them). If no step improves the held-out KL, the layer-wise fit is kept unchanged.

The gradient of the mean KL with respect to the logits is ``(q - p) / n``, so one step is
two matrix products of the rows with the weight. The products and the softmax run in
float32 (twice as fast; the network itself runs in float32), the Adam state, the parameters
and the held-out KL that chooses the step in float64.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from onnx_sparse.core import blas

__all__ = ["HeadFit", "softmax", "mean_kl", "refit_softmax_head"]

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class HeadFit:
    """What a refit did: steps run, held-out KL and top-1 agreement with the dense model
    before and after (``improved`` False means the layer-wise fit was kept), time."""

    steps: int
    best_step: int
    kl_before: float
    kl_after: float
    agree_before: float
    agree_after: float
    fit_rows: int
    held_out_rows: int
    seconds: float

    @property
    def improved(self) -> bool:
        return self.best_step > 0


#: Rows per piece of the refit's products (see :func:`refit_softmax_head`).
PIECE_ROWS = 256


def _pieces(n: int) -> list[slice]:
    return [slice(i, min(i + PIECE_ROWS, n)) for i in range(0, n, PIECE_ROWS)] or [slice(0, 0)]


def softmax(z: npt.ArrayLike) -> Array:
    """Softmax over the last axis (float64, shifted by the row maximum)."""
    a = np.asarray(z, dtype=np.float64)
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(z: Array) -> Array:
    s = z - z.max(axis=-1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def _log_p(pp: Array) -> Array:
    """``log p`` where ``p > 0``, else 0 (the terms of a KL divergence that count)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pp > 0, np.log(np.where(pp > 0, pp, 1.0)), 0.0)


def _mean_kl(pp: Array, lp: Array, logits: npt.ArrayLike) -> float:
    lq = _log_softmax(np.asarray(logits, dtype=np.float64))
    return float(np.mean(np.sum(pp * (lp - lq), axis=-1)))


def mean_kl(p: npt.ArrayLike, logits: npt.ArrayLike) -> float:
    """Mean over rows of ``KL(p || softmax(logits))`` (terms with ``p == 0`` count 0)."""
    pp = np.asarray(p, dtype=np.float64)
    return _mean_kl(pp, _log_p(pp), logits)


@blas.deterministic
def refit_softmax_head(
    w: npt.ArrayLike,
    b: npt.ArrayLike,
    x: npt.ArrayLike,
    p: npt.ArrayLike,
    held_out: npt.ArrayLike,
    *,
    steps: int = 2000,
    lr: float = 0.005,
    patience: int = 30,
) -> tuple[Array, Array, HeadFit]:
    """Refit the kept entries of a pruned head ``w`` ``[classes, features]`` and its bias.

    Args:
        w: The pruned (2:4) weight; its zeros stay zero.
        b: The bias ``[classes]`` (zeros when the layer has none).
        x: Input rows ``[rows, features]`` in the pruned model.
        p: The dense model's probabilities ``[rows, classes]`` for the same rows.
        held_out: Boolean ``[rows]``: rows only used to choose the step (need some of each).
        steps: Most Adam steps.
        lr: Adam step size, relative to the RMS of the kept weights.
        patience: The held-out KL is checked after every step; the run stops after
            ``patience`` steps without a new best. (On real heads the best step comes early,
            often within the first ten: Adam's first steps move every weight by about
            ``lr`` times the weights' scale, and the held-out rows soon stop agreeing; on
            the project's real heads 30 stops at the same best step as 100 did.)

    Returns:
        ``(w, b, info)``: the best weights by held-out KL (the inputs when nothing improved).
    """
    t0 = time.perf_counter()
    w0 = np.asarray(w, dtype=np.float64)
    b0 = np.asarray(b, dtype=np.float64).reshape(-1)
    xx = np.asarray(x, dtype=np.float64)
    pp = np.asarray(p, dtype=np.float64)
    val = np.asarray(held_out, dtype=bool).reshape(-1)
    if w0.ndim != 2 or b0.shape != (w0.shape[0],):
        raise ValueError(f"weight {w0.shape} and bias {b0.shape} do not match")
    if xx.shape != (val.size, w0.shape[1]) or pp.shape != (val.size, w0.shape[0]):
        raise ValueError(f"rows {xx.shape} and probabilities {pp.shape} do not match the weight {w0.shape}")
    if val.all() or not val.any():
        raise ValueError("held_out must mark some rows, but not all")
    f32 = np.float32
    xf, pf, xv, pv = xx[~val].astype(f32), pp[~val].astype(f32), xx[val].astype(f32), pp[val]
    n = xf.shape[0]
    keep = w0 != 0
    scale = float(np.sqrt(np.mean(w0[keep] ** 2))) if keep.any() else 1.0
    step_size = lr * (scale if scale > 0 else 1.0)

    # the products run in fixed pieces of rows side by side (BLAS is single-threaded during a
    # pass; the pieces depend on the shapes only, so the result does not depend on the cores)
    fit_pieces, held_pieces = _pieces(n), _pieces(xv.shape[0])
    lpv, top_v = _log_p(pv), pv.argmax(-1)  # the same at every step

    def held(wt: Array, bt: Array) -> tuple[float, float]:
        w32 = np.ascontiguousarray(wt.T, dtype=f32)
        z = np.concatenate(blas.parallel_map(lambda r: xv[r] @ w32, held_pieces)) + bt
        return _mean_kl(pv, lpv, z), float(np.mean(z.argmax(-1) == top_v))

    def gradient(wt: Array, bt: Array) -> tuple[Array, Array]:
        w32, b32 = np.ascontiguousarray(wt.T, dtype=f32), bt.astype(f32)

        def piece(r: slice) -> tuple[Array, Array]:
            # softmax(z) - p, over n, made in place in z (the same operations as with new arrays)
            g = xf[r] @ w32
            g += b32
            g -= g.max(axis=-1, keepdims=True)
            np.exp(g, out=g)
            g /= g.sum(axis=-1, keepdims=True)
            g -= pf[r]
            g /= np.float32(n)
            return (g.T @ xf[r]).astype(np.float64), g.sum(axis=0, dtype=np.float64)

        parts = blas.parallel_map(piece, fit_pieces)
        g_w, g_b = parts[0]
        for pw, pb in parts[1:]:  # summed in the pieces' order
            g_w += pw
            g_b += pb
        return g_w * keep, g_b

    kl0, agree0 = held(w0, b0)
    best = (kl0, 0, w0, b0, agree0)
    wt, bt = w0.copy(), b0.copy()
    m_w, v_w = np.zeros_like(wt), np.zeros_like(wt)
    m_b, v_b = np.zeros_like(bt), np.zeros_like(bt)
    beta1, beta2, eps = 0.9, 0.999, 1e-12
    # Adam's terms in two arrays per parameter, reused: the same operations, in the same order, as
    # ``m = beta1 m + (1 - beta1) g``, ``v = beta2 v + (1 - beta2) g g`` and
    # ``par -= step_size (m / c1) / (sqrt(v / c2) + eps)``
    work = {id(par): (np.empty_like(par), np.empty_like(par)) for par in (wt, bt)}
    since = 0
    done = 0
    for it in range(1, steps + 1):
        g_w, g_b = gradient(wt, bt)
        for par, grad, m, v in ((wt, g_w, m_w, v_w), (bt, g_b, m_b, v_b)):
            t1, t2 = work[id(par)]
            m *= beta1
            m += np.multiply(grad, 1 - beta1, out=t1)
            v *= beta2
            np.multiply(grad, 1 - beta2, out=t1)
            t1 *= grad
            v += t1
            np.multiply(step_size, np.divide(m, 1 - beta1**it, out=t1), out=t1)
            np.sqrt(np.divide(v, 1 - beta2**it, out=t2), out=t2)
            t2 += eps
            t1 /= t2
            par -= t1
        wt *= keep
        done = it
        kl, agree = held(wt, bt)
        if kl < best[0]:
            best = (kl, it, wt.copy(), bt.copy(), agree)
            since = 0
        else:
            since += 1
            if since >= patience:
                break
    kl_best, step, w_best, b_best, agree_best = best
    info = HeadFit(
        steps=done,
        best_step=step,
        kl_before=kl0,
        kl_after=kl_best,
        agree_before=agree0,
        agree_after=agree_best,
        fit_rows=n,
        held_out_rows=int(val.sum()),
        seconds=time.perf_counter() - t0,
    )
    return w_best, b_best, info
