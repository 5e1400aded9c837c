"""core/blas: worker threads over fixed pieces, BLAS single-threaded process-wide, results independent of both."""

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
    with blas.single_threaded():
        job = blas.Background(np.linalg.inv, a)
        np.testing.assert_allclose(job.result() @ a, np.eye(50), atol=1e-8)
        bad = blas.Background(np.linalg.inv, np.zeros((3, 3)))
        with pytest.raises(np.linalg.LinAlgError):
            bad.result()


def test_background_outside_a_single_threaded_block_is_refused() -> None:
    # the caller's own BLAS calls would run multi-threaded while the background work runs
    with pytest.raises(RuntimeError, match="single_threaded"):
        blas.Background(np.linalg.inv, np.eye(3))


def _blas_threads() -> list[int]:
    import threadpoolctl

    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]


def test_single_threaded_is_process_wide_nests_and_restores() -> None:
    import scipy.linalg  # noqa: F401  (its OpenBLAS is a library of its own)

    before = _blas_threads()
    seen: list[list[int]] = []
    with blas.single_threaded():
        assert blas.is_single_threaded()
        with blas.single_threaded():
            pass
        assert blas.is_single_threaded()  # the inner block did not end the outer one
        # another thread of the process sees the setting too (OpenBLAS's setting is process-wide)
        t = threading.Thread(target=lambda: seen.append(_blas_threads()))
        t.start()
        t.join()
        assert _blas_threads() == [1] * len(before)
    assert seen == [[1] * len(before)]
    assert not blas.is_single_threaded()
    assert _blas_threads() == before


def test_deterministic_decorator_runs_single_threaded() -> None:
    @blas.deterministic
    def inside() -> bool:
        return blas.is_single_threaded()

    assert inside() and not blas.is_single_threaded()


@pytest.mark.parametrize(
    ("n", "p", "q", "sym", "dtype"),
    [
        (5000, 27, 27, True, np.float32),  # narrow, tall: pieces of rows
        (300, 64, 64, True, np.float32),  # one piece
        (700, 768, 768, True, np.float32),  # wide: output blocks, upper triangle mirrored
        (700, 600, 520, False, np.float64),  # wide, not symmetric
        (9000, 40, 33, False, np.float32),  # narrow, not symmetric
        (0, 8, 8, True, np.float32),
    ],
)
def test_add_gram_is_the_product_and_the_same_for_any_number_of_workers(monkeypatch, n, p, q, sym, dtype) -> None:
    rng = np.random.default_rng(n + p)
    a = rng.standard_normal((n, p)).astype(dtype)
    b = None if sym else rng.standard_normal((n, q)).astype(dtype)
    want = a.astype(np.float64).T @ (a if b is None else b).astype(np.float64)
    got = {}
    for threads in ("1", "2", "3", "4"):
        monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", threads)
        acc = np.full((p, q if not sym else p), 0.5)
        blas.add_gram(acc, a, b, scale=2.0)
        got[threads] = acc
    tol = 1e-3 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(got["1"], 0.5 + 2.0 * want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))
    for threads in ("2", "3", "4"):
        assert np.array_equal(got[threads], got["1"]), threads
    if sym:
        assert np.array_equal(got["1"], got["1"].T)


@pytest.mark.parametrize(("n", "p"), [(5000, 27), (300, 64), (700, 768)])
def test_add_gram_minus_a_is_the_product_with_the_difference_to_the_bit(monkeypatch, n, p) -> None:
    """``minus_a`` takes ``b - a`` piece by piece in the workers of a narrow product (once for a
    wide one): exactly the sums of the product with the difference made first, on any number of
    workers."""
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, p)).astype(np.float32)
    b = (a + 0.1 * rng.standard_normal((n, p))).astype(np.float32)
    want = np.full((p, p), 0.25)
    blas.add_gram(want, a, b - a)
    for threads in ("1", "3"):
        monkeypatch.setenv("ONNX_SPARSE_SOLVE_THREADS", threads)
        acc = np.full((p, p), 0.25)
        blas.add_gram(acc, a, b, minus_a=True)
        assert np.array_equal(acc, want), threads
    with pytest.raises(ValueError, match="minus_a"):
        blas.add_gram(np.zeros((p, p)), a, None, minus_a=True)


def test_add_gram_checks_shapes() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        blas.add_gram(np.zeros((3, 3)), np.zeros((5, 3)), np.zeros((4, 3)))


def test_numeric_passes_run_single_threaded_and_plain_ones_do_not() -> None:
    import onnx

    from onnx_sparse.passes.base import Pass, PassResult
    from onnx_sparse.passes.calibrated import CalibratedPrunePass
    from onnx_sparse.passes.prune import PrunePass
    from onnx_sparse.passes.sensitivity import SensitivityPrunePass

    assert CalibratedPrunePass.numeric and SensitivityPrunePass.numeric and not PrunePass.numeric
    seen = []

    class Probe(Pass):
        in_place = True

        def call(self, mf):
            seen.append(blas.is_single_threaded())
            return PassResult(mf, False)

    class NumericProbe(Probe):
        numeric = True

    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    Probe()(model)
    NumericProbe()(model)
    assert seen == [False, True] and not blas.is_single_threaded()
