"""core/blas: worker threads for independent solves, one BLAS thread each."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from onnx_sparse.core import blas


def test_parallel_map_keeps_the_order_and_runs_side_by_side(monkeypatch) -> None:
    monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", "2")
    seen: set[int] = set()
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=5)

    def work(i: int) -> int:
        with lock:
            seen.add(threading.get_ident())
        if i < 2:
            both.wait()  # the first two tasks must be running at the same time
        time.sleep(0.01 * (3 - i))  # later items finish first
        return i * i

    assert blas.parallel_map(work, range(4)) == [0, 1, 4, 9]
    assert len(seen) == 2


def test_the_worker_threads_are_reused_across_calls(monkeypatch) -> None:
    monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", "2")
    runs = [set(blas.parallel_map(lambda _: threading.get_ident(), range(6))) for _ in range(5)]
    everyone = set().union(*runs)
    assert threading.get_ident() not in everyone and len(everyone) <= 2


def test_nested_sections_run_in_line(monkeypatch) -> None:
    monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", "2")
    inner: list[int] = []

    def outer(i: int) -> int:
        inner.append(blas.workers())  # 1 inside a worker: no threads of threads
        return sum(blas.parallel_map(lambda j: j + i, range(3)))

    assert blas.parallel_map(outer, range(2)) == [3, 6]
    assert inner == [1, 1]
    assert blas.workers() == 2


def test_one_worker_is_a_plain_loop_and_errors_surface(monkeypatch) -> None:
    monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", "1")
    idents = {threading.get_ident()}
    assert blas.parallel_map(lambda i: (idents.add(threading.get_ident()), i)[1], range(3)) == [0, 1, 2]
    assert idents == {threading.get_ident()}
    monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", "2")

    def boom(i: int) -> int:
        if i == 1:
            raise ValueError("task 1 failed")
        return i

    with pytest.raises(ValueError, match="task 1 failed"):
        blas.parallel_map(boom, range(3))


@pytest.mark.parametrize("threads", ["1", "2"])
def test_background_gives_the_value_or_the_error(monkeypatch, threads) -> None:
    monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", threads)
    a = np.random.default_rng(0).standard_normal((50, 50))
    job = blas.Background(np.linalg.inv, a)
    np.testing.assert_allclose(job.result() @ a, np.eye(50), atol=1e-8)
    bad = blas.Background(np.linalg.inv, np.zeros((3, 3)))
    with pytest.raises(np.linalg.LinAlgError):
        bad.result()


def test_one_blas_thread_restores_the_setting() -> None:
    fns = blas._local_thread_setters()
    if not fns:
        pytest.skip("no OpenBLAS with per-thread settings in this numpy/scipy build")
    for fn in fns:
        fn(0)  # this thread: the library's default
    default = [fn(0) for fn in fns]  # each call returns the thread count it replaces
    with blas.one_blas_thread():
        inside = [fn(1) for fn in fns]
    assert inside == [1] * len(fns)
    assert [fn(0) for fn in fns] == default  # the default again after the block
