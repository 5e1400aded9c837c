"""Tests for onnx_sparse.calib.capture: stage schedule and the frontier-keeping staged runner."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import case_path, resident_kb
from test_calibrated_models import conv_data, convnet, mlp, mlp_data, qkv, run

from onnx_sparse.calib.capture import StagedRunner, inline_model, node_reads, run_model, schedule
from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.io import ModelFile, load_model


def _groups(model: onnx.ModelProto):
    sites = [s for s in find_weight_sites(model, macs=False) if s.eligible]
    return sites, [[(s.node_proto, s.activation)] for s in sites]


def _stage_names(model: onnx.ModelProto) -> list[list[str]]:
    sites, groups = _groups(model)
    sched = schedule(list(model.graph.node), groups)
    return [[sites[k].node for k in stage] for stage in sched.stages]


def test_schedule_shared_input_is_one_stage() -> None:
    assert _stage_names(qkv()) == [["q", "k", "v"], ["o"]]


def test_schedule_chain() -> None:
    assert _stage_names(mlp()) == [["fc1"], ["fc2"], ["fc3"]]
    assert _stage_names(convnet()) == [["conv1"], ["conv2"], ["conv3"], ["conv4"]]


def test_schedule_ignores_node_order() -> None:
    m = qkv()
    nodes = list(m.graph.node)[::-1]
    sites, groups = _groups(m)
    sched = schedule(nodes, groups)
    assert [[sites[k].node for k in st] for st in sched.stages] == [["q", "k", "v"], ["o"]]


def test_schedule_cyclic_shared_weight() -> None:
    m = onnx.load(case_path("shared_agree.onnx"))  # y = (x @ W) @ W
    sites = [s for s in find_weight_sites(m, macs=False) if s.eligible]
    sched = schedule(list(m.graph.node), [[(s.node_proto, s.activation) for s in sites]])
    assert sched.cyclic == (0,) and sched.stages == ()


def test_node_reads_include_subgraph_outer_names() -> None:
    m = onnx.load(case_path("if_subgraph.onnx"))
    if_node = next(n for n in m.graph.node if n.op_type == "If")
    assert "outer.weight" in node_reads(if_node)


def _intermediates(model: onnx.ModelProto, names: list[str], feeds) -> list[dict[str, np.ndarray]]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.add().name = n
    return list(run_model(m, feeds))


def test_runner_stages_match_full_model_and_run_each_node_once() -> None:
    model = convnet()
    feeds = conv_data(0, 3)
    mf = ModelFile(model)
    runner = StagedRunner(mf, feeds)
    stages = [["x"], ["a1"], ["a2"], ["a3"]]
    full = _intermediates(model, ["a1", "a2", "a3"], feeds)
    for targets in stages:
        for i, got in runner.iter_stage(targets):
            for t in targets:
                want = feeds[i]["x"] if t == "x" else full[i][t]
                np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-6)
        # Only what later nodes read is kept.
        assert set(runner.cache) <= set(targets)
    # conv1..3 + relu1..3 ran exactly once in total; conv4 never (nothing asked for its output).
    assert runner.stats["nodes"] == 6


def test_runner_knows_what_it_can_still_compute() -> None:
    model = convnet()
    feeds = conv_data(0, 2)
    runner = StagedRunner(ModelFile(model), feeds)
    out = model.graph.output[0].name
    assert runner.computable(["x", "a1", "a3", out])
    for _ in runner.iter_stage(["a2"]):
        pass
    # a1 ran and nothing still to run reads it: dropped; a2 is on the frontier; a3 and the
    # output are made by nodes that have not run
    assert not runner.computable(["a1"])
    assert runner.computable(["a2", "a3", out, "x"])
    full = _intermediates(model, ["a3"], feeds)
    for i, got in runner.iter_stage(["a3", out]):
        np.testing.assert_allclose(got["a3"], full[i]["a3"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[out], full[i][out], rtol=1e-5, atol=1e-6)
    assert not runner.computable(["no_such_tensor"])


def test_runner_sees_weights_written_between_stages() -> None:
    model = mlp()
    feeds = mlp_data(0, 2)
    mf = ModelFile(model)
    runner = StagedRunner(mf, feeds)
    for _ in runner.iter_stage(["x"]):
        pass
    w1 = next(t for t in mf.model.graph.initializer if t.name == "w1")
    mf.write(w1, np.zeros((32, 64), np.float32))
    got = [v["a1"] for _, v in runner.iter_stage(["a1"])]
    b1 = onnx.numpy_helper.to_array(next(t for t in mf.model.graph.initializer if t.name == "b1"))
    np.testing.assert_allclose(got[0], np.broadcast_to(np.maximum(b1, 0), (16, 64)), rtol=1e-6)


def test_runner_insert_and_commit() -> None:
    model = mlp()
    feeds = mlp_data(0, 1)
    mf = ModelFile(mlp())
    runner = StagedRunner(mf, feeds)
    fc2 = next(n for n in runner.nodes if n.name == "fc2")
    fc2.output[0] = "h2_pre"
    runner.node_changed(fc2)
    runner.set_initializer("extra_b", np.full(64, 1.0, np.float32))
    runner.insert_after(fc2, onnx.helper.make_node("Add", ["h2_pre", "extra_b"], ["h2"], name="added"))
    got = [v["a2"] for _, v in runner.iter_stage(["a2"])][0]
    runner.commit()
    onnx.checker.check_model(mf.model)
    names = [n.name for n in mf.model.graph.node]
    assert names.index("added") == names.index("fc2") + 1
    full = _intermediates(mf.model, ["a2"], feeds)[0]["a2"]
    np.testing.assert_allclose(got, full, rtol=1e-6)
    dense = _intermediates(model, ["a2"], feeds)[0]["a2"]
    assert not np.allclose(dense, full)


def test_inline_model_loads_external_data(tmp_path) -> None:
    model = mlp()
    onnx.save(mlp(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    mf = load_model(tmp_path / "m.onnx")
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in mf.model.graph.initializer)
    feeds = mlp_data(0, 1)
    np.testing.assert_allclose(run(inline_model(mf), feeds)[0], run(model, feeds)[0], rtol=1e-6)
    runner = StagedRunner(mf, feeds)
    (_, got), *_ = list(runner.iter_stage(["a2"]))
    assert got["a2"].shape == (16, 64)


def test_sessions_map_external_data_instead_of_copying_it(tmp_path, monkeypatch) -> None:
    """Whole-model sessions and staged pieces hand the external tensors that still hold their
    values to onnxruntime by reference (it maps the file); a value written since the load is
    copied in; onnxruntime refusing the references falls back to reading them in. The outputs are
    those of the fully inlined model, to the bit."""
    from onnx_sparse.calib import capture
    from onnx_sparse.errors import OnnxSparseError

    onnx.save(mlp(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    mf = load_model(tmp_path / "m.onnx")
    feeds = mlp_data(0, 2)
    w = next(t for t in mf.model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    mf.write(w, np.asarray(mf.read(w)) * 0.5)  # pending: the file still holds the old value
    kept = inline_model(mf, keep_external=True)
    kinds = {t.name: t.data_location for t in kept.graph.initializer}
    assert kinds[w.name] == onnx.TensorProto.DEFAULT  # the new value, inline
    assert sum(k == onnx.TensorProto.EXTERNAL for k in kinds.values()) == len(kinds) - 1
    want = list(run_model(inline_model(mf), feeds))  # every value inline: the reference
    folders = []
    real = capture._session

    def spy(model, threads=None, folder=None, **kw):
        folders.append(folder)
        return real(model, threads, folder, **kw)

    monkeypatch.setattr(capture, "_session", spy)
    got = list(run_model(mf, feeds))
    assert folders == [mf.base_dir]
    for a, b in zip(want, got, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    runner = StagedRunner(mf, feeds)
    piece = runner._build(runner._plan(["a2"]))
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in piece.graph.initializer)

    def refuse(model, threads=None, folder=None, **kw):
        if folder is not None:
            raise OnnxSparseError("onnxruntime cannot open the model: external data path refused")
        return real(model, threads, folder, **kw)

    monkeypatch.setattr(capture, "_session", refuse)
    again = list(run_model(mf, feeds))
    for a, b in zip(want, again, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_prefetch_gives_the_items_in_order_and_each_error_in_its_place() -> None:
    import threading

    from onnx_sparse.calib.capture import prefetch

    def items(fail_at: int | None):
        for i in range(6):
            if i == fail_at:
                raise ValueError(f"item {i}")
            yield i, threading.current_thread().name

    got = list(prefetch(items(None)))
    assert [i for i, _ in got] == list(range(6))
    assert {name for _, name in got} == {"onnx-sparse-capture"}  # made in the worker thread
    seen = []
    with pytest.raises(ValueError, match="item 3"):
        for i, _ in prefetch(items(3), ahead=1):
            seen.append(i)
    assert seen == [0, 1, 2]
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    stream = prefetch(endless())
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()  # the caller stops early: the worker stops and the source is closed
    assert closed == [True]


def test_runner_error_names_the_sample() -> None:
    from onnx_sparse.errors import OnnxSparseError

    runner = StagedRunner(ModelFile(mlp()), [{"x": np.zeros((2, 31), np.float32)}])
    with pytest.raises(OnnxSparseError, match="sample 0"):
        list(runner.iter_stage(["a1"]))


# --------------------------------------------------------------------------- spilling the frontier


def test_spill_keeps_in_memory_up_to_the_budget_then_maps_files(tmp_path, monkeypatch) -> None:
    from onnx_sparse.calib.spill import Spill

    monkeypatch.setenv("ONNX_SPARSE_SPILL_DIR", str(tmp_path))
    spill = Spill(budget=100)
    small = np.arange(10, dtype=np.float32)  # 40 bytes: kept
    big = np.arange(50, dtype=np.float32).reshape(5, 10)  # 200 bytes: over the budget
    assert spill.keep(small) is small and spill.in_memory == 40
    mapped = spill.keep(big)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, big)
    assert spill.spilled == 200 and spill.in_memory == 40
    # the files are unlinked as soon as they are mapped: nothing on disk, even before close
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    spill.release(small)
    assert spill.in_memory == 0
    assert spill.keep(small) is small  # room again
    spill.close()
    assert list(tmp_path.iterdir()) == []


def test_spill_budget_from_the_environment(monkeypatch) -> None:
    from onnx_sparse.calib.spill import default_budget

    monkeypatch.setenv("ONNX_SPARSE_SPILL_MB", "3")
    assert default_budget() == 3 << 20
    monkeypatch.setenv("ONNX_SPARSE_SPILL_MB", "lots")
    assert default_budget() > 0  # a bad value falls back to the default (with a warning)
    monkeypatch.delenv("ONNX_SPARSE_SPILL_MB")
    assert default_budget() > 0


def test_the_default_spill_budget_is_capped(monkeypatch) -> None:
    from onnx_sparse.calib import spill

    monkeypatch.delenv("ONNX_SPARSE_SPILL_MB", raising=False)
    assert 0 < spill.default_budget() <= spill.MAX_BUDGET
    spill.trim_heap()  # gives free heap pages back where the C library can; never fails


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="needs per-thread rusage (Linux)")
def test_spilling_writes_the_file_not_through_a_mapping(tmp_path, monkeypatch) -> None:
    """Issue 20: a spilled array is written with write(2), which copies it into the page cache
    without a page fault per 4 KB page of this process (writing through the mapping took one each:
    rec's best recipe spent ~1.5 s of system time on them); any dtype and layout comes back equal."""
    from onnx_sparse.calib.spill import Spill

    monkeypatch.setenv("ONNX_SPARSE_SPILL_DIR", str(tmp_path))
    value = np.random.default_rng(1).standard_normal((1024, 4096)).astype(np.float32)  # 16 MB: 4,096 pages
    spill = Spill(0)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    kept = spill.keep(value)
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    assert faults < 1000, faults
    np.testing.assert_array_equal(kept, value)
    for v in (value[:7, ::3], value[:64].astype(np.float16), np.arange(7, dtype=np.int64), np.ones((3, 0, 2))):
        back = spill.keep(v)
        assert back.dtype == v.dtype and back.shape == v.shape
        np.testing.assert_array_equal(back, v)
    spill.close()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_a_spilled_array_leaves_the_resident_set_until_read(tmp_path, monkeypatch) -> None:
    """Issue 20: a spilled frontier waits in the page cache (or its file) while the stage's
    statistics are gathered and solved, not in this process's resident set."""
    from onnx_sparse.calib.spill import Spill

    monkeypatch.setenv("ONNX_SPARSE_SPILL_DIR", str(tmp_path))
    value = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)  # 1 MB
    spill = Spill(0)
    kept = spill.keep(value)
    assert isinstance(kept, np.memmap)
    path = kept.filename
    assert resident_kb(path) < 64  # written, then given back (1,024 kB when kept)
    np.testing.assert_array_equal(kept, value)  # read back from the page cache or the file
    assert resident_kb(path) >= 1000
    del kept
    spill.close()


@pytest.mark.parametrize("method", ["sparsegpt", "asym"])
def test_spilled_calibration_gives_the_same_weights(method, tmp_path, monkeypatch) -> None:
    from onnx_sparse.passes.calibrated import CalibratedPrunePass

    model, feeds = mlp(), mlp_data(3, 8)
    kept = CalibratedPrunePass(method, feeds)(model)
    monkeypatch.setenv("ONNX_SPARSE_SPILL_MB", "0")  # every frontier array goes to a file
    monkeypatch.setenv("ONNX_SPARSE_SPILL_DIR", str(tmp_path))
    pass_ = CalibratedPrunePass(method, feeds)
    spilled = pass_(model)
    assert pass_.engine.last_spill is not None and pass_.engine.last_spill.spilled > 0
    for a, b in zip(kept.model.model.graph.initializer, spilled.model.model.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert list(tmp_path.iterdir()) == []  # nothing left behind
