"""How the per-layer linear algebra uses the machine's cores (BLAS threads and worker threads).

Two regimes, one owner:

* The large ``X^T X`` products of the statistics run in BLAS with every thread (nothing here).
* The per-layer solves (Cholesky factorisations, triangular solves, SparseGPT's column walk)
  are mid-sized: multi-threaded BLAS on them gains little on an idle machine and, on a busy
  one, OpenBLAS threads that wait for each other made them up to 100x slower (PP-OCRv4 det on
  two loaded cores: 38 s with the library's threads, 9 s with one). So they run with **one
  BLAS thread per Python thread** (:func:`one_blas_thread`), and independent solves run side
  by side in worker threads instead (:func:`parallel_map`, :func:`Background`): cross-validation
  folds, the factorisation SparseGPT needs while the refit is chosen, the layers of one stage.
  numpy and scipy release the GIL inside LAPACK and BLAS, so the workers really run at once;
  on a loaded machine they degrade to taking turns, never to waiting on each other.

numpy's and scipy's wheels each bundle their own OpenBLAS; both are limited. The limit is
per thread (``openblas_set_num_threads_local``), so each worker sets its own.
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

__all__ = ["one_blas_thread", "workers", "parallel_map", "Background"]

T = TypeVar("T")
R = TypeVar("R")

_state = threading.local()


@functools.lru_cache(maxsize=1)
def _local_thread_setters() -> tuple[Any, ...]:
    import ctypes
    import glob

    import scipy

    found = []
    for pkg in (np, scipy):
        if pkg.__file__ is None:
            continue
        libs = os.path.join(os.path.dirname(os.path.dirname(pkg.__file__)), f"{pkg.__name__}.libs")
        for path in sorted(
            glob.glob(os.path.join(libs, "libscipy_openblas*.so*")) + glob.glob(os.path.join(libs, "libopenblas*.so*"))
        ):
            try:
                lib = ctypes.CDLL(path)
                fn = lib.openblas_set_num_threads_local
            except (OSError, AttributeError):
                continue
            fn.argtypes = [ctypes.c_int]
            fn.restype = ctypes.c_int
            found.append(fn)
            break
    return tuple(found)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with one OpenBLAS thread in this thread, in numpy's and in scipy's OpenBLAS
    (best effort: a no-op for a library without ``openblas_set_num_threads_local``)."""
    fns = _local_thread_setters()
    olds = [fn(1) for fn in fns]
    try:
        yield
    finally:
        for fn, old in zip(fns, olds, strict=True):
            fn(old if old > 0 else 0)


def workers() -> int:
    """Worker threads for independent solves: the cores this process may use (1 inside a worker,
    so that nested parallel sections run in line instead of multiplying the threads)."""
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
        with one_blas_thread():
            return fn(*args)
    finally:
        _state.inside = before


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, run in :func:`workers` threads with one BLAS thread each.

    The results come back in the order of ``items`` whatever finishes first, so the outcome
    is the same as the loop's. The first exception is raised (after every task ended).
    """
    todo: Sequence[T] = list(items)
    n = min(len(todo), workers())
    if n <= 1:
        with one_blas_thread():
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
    factorisation while the refit damping is cross-validated.
    """

    def __init__(self, fn: Callable[..., R], *args: Any) -> None:
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
