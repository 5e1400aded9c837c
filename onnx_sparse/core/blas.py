"""How the numeric work uses the machine's cores, and why its results do not depend on them.

The rule: **every floating-point result is a function of the model, the data and the recipe
only**, never of the number of cores, the thread settings or the timing. Two things would break
it, and this module owns both:

* **BLAS threads.** OpenBLAS splits a product or a factorisation across its threads in a way
  that changes the order of the floating-point sums: ``X^T X``, a Cholesky factor or a triangular
  inverse come out with different last bits on 1 and on 2 threads. Its per-thread setting
  (``openblas_set_num_threads_local``) is process-wide in the pthreads builds numpy and scipy
  ship, so a worker that lowered it changed how a concurrent call in another thread was split.
  So, inside :func:`single_threaded` (entered by every function here, by the passes and by the
  CLI), **every BLAS call of the process runs on one thread** (threadpoolctl, for numpy's and
  scipy's OpenBLAS alike), and the cores are used by our own workers instead.
* **How work is split.** Work runs side by side only in **fixed pieces** whose bounds depend on
  the shapes alone (:func:`parallel_map` returns results in the order of its items;
  :func:`add_gram` splits a product the same way on any machine and sums the pieces in a fixed
  order), never on the number of workers or on which finishes first.

The workers (:func:`parallel_map`, :func:`Background`) are threads: numpy and scipy release the
GIL inside BLAS and LAPACK, so they really run at once; on a loaded machine they degrade to
taking turns, never to waiting on each other (OpenBLAS threads that wait for each other made
mid-sized solves up to 100x slower on two loaded cores).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "single_threaded",
    "is_single_threaded",
    "deterministic",
    "workers",
    "parallel_map",
    "Background",
    "add_gram",
    "matmul_rows",
]

T = TypeVar("T")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

_state = threading.local()
_depth_lock = threading.Lock()
_depth = 0
_limiter: Any = None


@functools.lru_cache(maxsize=1)
def _controller() -> Any:
    # scipy's OpenBLAS is a library of its own: load it before threadpoolctl looks for libraries
    import scipy.linalg  # noqa: F401
    import threadpoolctl

    return threadpoolctl.ThreadpoolController()


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Every BLAS call of the process runs on one thread inside the block (re-entrant; the
    setting before the outermost block comes back after it).

    Process-wide, because OpenBLAS's thread setting is: other threads of the caller's process
    that use numpy's or scipy's BLAS meanwhile run single-threaded too.
    """
    global _depth, _limiter
    with _depth_lock:
        if _depth == 0:
            _limiter = _controller().limit(limits=1, user_api="blas")
        _depth += 1
    try:
        yield
    finally:
        with _depth_lock:
            _depth -= 1
            if _depth == 0:
                _limiter.restore_original_limits()
                _limiter = None


def is_single_threaded() -> bool:
    """Whether a :func:`single_threaded` block is active (in any thread of the process)."""
    return _depth > 0


def deterministic(fn: F) -> F:
    """Decorator: ``fn`` runs inside :func:`single_threaded` (for the public numeric entry points)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with single_threaded():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def workers() -> int:
    """Worker threads for independent pieces: the cores this process may use (1 inside a worker,
    so that nested parallel sections run in line instead of multiplying the threads).
    ``ONNX_SPARSE_SOLVE_THREADS`` overrides; it changes the speed, never the result."""
    if getattr(_state, "inside", False):
        return 1
    env = os.environ.get("ONNX_SPARSE_SOLVE_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _in_worker(fn: Callable[..., R], *args: Any) -> R:
    before = getattr(_state, "inside", False)
    _state.inside = True
    try:
        return fn(*args)
    finally:
        _state.inside = before


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, run in :func:`workers` threads, BLAS single-threaded.

    The results come back in the order of ``items`` whatever finishes first, so the outcome
    is the same as the loop's. The first exception is raised (after every task ended).
    """
    todo: Sequence[T] = list(items)
    with single_threaded():
        n = min(len(todo), workers())
        if n <= 1:
            return [fn(x) for x in todo]
        pool = _pool(workers())
        futures = [pool.submit(_in_worker, fn, x) for x in todo]
        concurrent.futures.wait(futures)
        return [f.result() for f in futures]


_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
    """One pool of ``n`` worker threads for the whole process (a pass calls :func:`parallel_map`
    thousands of times on a model of many small layers: starting threads each time cost 5 %).
    Tasks never wait on each other (a worker's own sections run in line), so sharing is safe."""
    with _pools_lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = concurrent.futures.ThreadPoolExecutor(
                max_workers=n, thread_name_prefix="onnx-sparse-solve"
            )
        return pool


class Background(Generic[R]):
    """``fn(*args)`` computed in a worker thread while the caller goes on (in line, on first
    :meth:`result`, when there is no spare core).

    Use it for work the caller will need later and does not depend on, e.g. SparseGPT's
    factorisation while the refit damping is cross-validated. It must be created inside
    :func:`single_threaded` (the caller's own BLAS calls meanwhile must be single-threaded
    too, or their split would depend on when the background work started).
    """

    def __init__(self, fn: Callable[..., R], *args: Any) -> None:
        if not is_single_threaded():
            raise RuntimeError("blas.Background needs a single_threaded() block around its caller")
        self._fn, self._args = fn, args
        self._thread: threading.Thread | None = None
        self._done = False
        self._value: R | None = None
        self._error: BaseException | None = None
        if workers() > 1:
            self._thread = threading.Thread(target=self._run, name="onnx-sparse-background", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._value = _in_worker(self._fn, *self._args)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        self._args = ()  # its inputs are not held on (a Gram matrix of a wide layer: 0.5 GB)
        self._done = True

    def result(self) -> R:
        """The value (computed now if it did not run in the background); re-raises its error."""
        if self._thread is not None:
            self._thread.join()
        elif not self._done:
            self._run()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


#: :func:`add_gram` splits products with at least this many columns into blocks of
#: :data:`GRAM_BLOCK` columns (output blocks, no extra sums); narrower ones into pieces of rows.
GRAM_WIDE = 512
GRAM_BLOCK = 256
#: Rows per piece of a narrow product (at most :data:`GRAM_PIECES` pieces).
GRAM_ROWS = 2048
GRAM_PIECES = 8


def _bounds(n: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(i + step, n)) for i in range(0, n, step)]


@deterministic
def matmul_rows(a: npt.NDArray, b: npt.NDArray) -> npt.NDArray:
    """``a @ b`` in fixed pieces of ``a``'s rows side by side (the pieces of :func:`add_gram`'s
    narrow products: they depend on the shapes only)."""
    n = a.shape[0]
    out = np.empty((n, b.shape[1]), dtype=np.result_type(a, b))
    pieces = _bounds(n, max(GRAM_ROWS, -(-n // GRAM_PIECES)))

    def piece(r: tuple[int, int]) -> None:
        np.matmul(a[r[0] : r[1]], b, out=out[r[0] : r[1]])

    parallel_map(piece, pieces)
    return out


@deterministic
def add_gram(
    acc: npt.NDArray[np.float64],
    a: npt.NDArray,
    b: npt.NDArray | None = None,
    scale: float = 1.0,
    *,
    minus_a: bool = False,
    work: npt.NDArray | None = None,
) -> None:
    """``acc += scale * a^T b`` (``b`` None: ``a^T a``; ``minus_a``: ``a^T (b - a)``), in pieces side by side.

    The pieces depend on the shapes only, so the sum is the same on any machine and any number
    of workers: a product with :data:`GRAM_WIDE` columns or more is split into output blocks of
    :data:`GRAM_BLOCK` columns (for ``a^T a`` only the blocks on and above the diagonal are
    multiplied); a narrower one into up to :data:`GRAM_PIECES` pieces of rows whose products are
    added to ``acc`` in order. Each block is multiplied in the rows' precision (float32 rows in
    float32 BLAS) and added in ``acc``'s (float64).

    Args:
        acc: ``[a.shape[1], b.shape[1]]`` accumulator, updated in place.
        a: Rows ``[n, p]``.
        b: Rows ``[n, q]`` paired with ``a``'s, or None for ``a`` itself.
        scale: Multiplies the product.
        minus_a: Multiply by ``b - a`` (``q == p``): a narrow product takes the difference piece by
            piece in its workers (the same values as one difference of the whole, made side by side).
        work: Where a wide product with ``minus_a`` writes ``b - a`` (an array of ``a``'s shape and
            dtype that the caller reuses; None: a new one). Fresh arrays of tens of MB cost a page
            fault per 4 KB on every call.
    """
    sym = b is None
    if minus_a and (b is None or b.shape != a.shape):
        raise ValueError("add_gram: minus_a needs b of a's shape")
    bb = a if b is None else b
    n, p = a.shape
    q = bb.shape[1]
    if acc.shape != (p, q) or bb.shape[0] != n:
        raise ValueError(f"add_gram: acc {acc.shape}, a {a.shape}, b {bb.shape} do not fit")
    if n == 0:
        return

    def add(target: npt.NDArray[np.float64], part: npt.NDArray) -> None:
        if scale == 1.0:
            target += part
        else:
            target += scale * part.astype(np.float64, copy=False)

    if min(p, q) >= GRAM_WIDE:
        if minus_a:  # every output block reads it: one difference of the whole
            bb = np.subtract(bb, a, out=work) if work is not None else bb - a
        rows_p, rows_q = _bounds(p, GRAM_BLOCK), _bounds(q, GRAM_BLOCK)
        blocks = [(i, j) for i in range(len(rows_p)) for j in range(len(rows_q)) if not sym or j >= i]

        def block(ij: tuple[int, int]) -> None:
            (i0, i1), (j0, j1) = rows_p[ij[0]], rows_q[ij[1]]
            left = a[:, i0:i1]
            part = left.T @ left if sym and ij[0] == ij[1] else left.T @ bb[:, j0:j1]
            add(acc[i0:i1, j0:j1], part)  # blocks are disjoint: added by the worker
            if sym and ij[0] != ij[1]:
                add(acc[j0:j1, i0:i1], part.T)

        parallel_map(block, blocks)
        return
    pieces = _bounds(n, max(GRAM_ROWS, -(-n // GRAM_PIECES)))
    if len(pieces) == 1:
        add(acc, a.T @ a if sym else a.T @ (bb - a if minus_a else bb))
        return

    def piece(r: tuple[int, int]) -> npt.NDArray:
        x = a[r[0] : r[1]]
        if sym:
            return x.T @ x
        y = bb[r[0] : r[1]]
        return x.T @ (y - x if minus_a else y)

    for part in parallel_map(piece, pieces):  # added in the pieces' order
        add(acc, part)
