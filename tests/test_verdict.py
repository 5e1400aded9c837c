"""Our per-node prediction against TensorRT's eligible/picked lists (no TensorRT needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_sparse.graph.locate import find_weight_sites
from onnx_sparse.handoff.trtlog import ELIGIBLE_MARKER, PICKED_MARKER, SparsityLog, parse_trt_log
from onnx_sparse.handoff.verdict import disagreements, format_verdict, reconcile

MODELS = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Site:
    """The part of WeightSite that reconcile reads."""

    node: str
    op: str
    eligible: bool
    reason: str = ""
    likely_sparse_kernel: bool = False
    node_proto: onnx.NodeProto | None = None


def log(eligible: list[str] | None, picked: list[str] | None) -> SparsityLog:
    return SparsityLog(
        eligible=list(eligible or []),
        picked=list(picked or []),
        eligible_seen=eligible is not None,
        picked_seen=picked is not None,
    )


def by_node(rows):
    return {r.node: r for r in rows}


NODES = ["conv1", "relu1", "conv2", "fc"]


def test_agreement_has_no_flags() -> None:
    sites = [Site("conv1", "Conv", True, likely_sparse_kernel=True), Site("conv2", "Conv", True)]
    rows = reconcile(sites, log(["conv1 + relu1", "conv2"], ["conv1 + relu1"]), NODES)
    assert [r.node for r in rows] == ["conv1", "conv2"]
    r1, r2 = rows
    assert (r1.trt_eligible, r1.trt_picked, r1.layers) == (True, True, ("conv1 + relu1",))
    assert (r2.trt_eligible, r2.trt_picked) == (True, False)
    assert r1.agrees and r2.agrees
    assert disagreements(rows) == []


def test_we_say_eligible_trt_does_not() -> None:
    rows = reconcile([Site("fc", "MatMul", True, likely_sparse_kernel=True)], log([], []), NODES)
    (row,) = rows
    assert row.trt_eligible is False and row.trt_picked is False
    assert row.flags == ("we call it eligible; TensorRT did not list it as eligible",)


def test_trt_eligible_where_we_ruled_it_out() -> None:
    site = Site("conv2", "Conv", False, reason="C=6 is not a multiple of 4")
    (row,) = reconcile([site], log(["conv2"], []), NODES)
    assert len(row.flags) == 1
    assert "we ruled it out: C=6 is not a multiple of 4" in row.flags[0]


def test_expected_sparse_kernel_but_dense_picked() -> None:
    (row,) = reconcile([Site("conv1", "Conv", True, likely_sparse_kernel=True)], log(["conv1"], []), NODES)
    assert row.flags == ("we expected a sparse kernel; TensorRT ran it dense (dense timed faster)",)


def test_sparse_picked_where_we_expected_dense() -> None:
    (row,) = reconcile([Site("conv1", "Conv", True, likely_sparse_kernel=False)], log(["conv1"], ["conv1"]), NODES)
    assert row.flags == ("TensorRT picked a sparse kernel where we expected dense",)


def test_picked_without_eligible_is_flagged() -> None:
    (row,) = reconcile([Site("conv1", "Conv", True, likely_sparse_kernel=True)], log([], ["conv1"]), NODES)
    assert "did not list as eligible" in row.flags[-1]


def test_no_sparsity_lines_means_unknown_and_no_flags() -> None:
    rows = reconcile([Site("conv1", "Conv", True, likely_sparse_kernel=True)], log(None, None), NODES)
    assert rows[0].trt_eligible is None and rows[0].trt_picked is None
    assert rows[0].agrees


def test_only_eligible_line_seen() -> None:
    (row,) = reconcile([Site("conv1", "Conv", True, likely_sparse_kernel=True)], log(["conv1"], None), NODES)
    assert (row.trt_eligible, row.trt_picked) == (True, None)
    assert row.agrees


def test_unmatched_layers_get_their_own_rows() -> None:
    rows = reconcile([Site("conv1", "Conv", True)], log(["conv1", "relu1", "Conv_404"], []), NODES)
    extra = [r for r in rows if not r.node]
    assert [r.layers for r in extra] == [("relu1",), ("Conv_404",)]
    assert "hold no weight we know of" in extra[0].flags[0]
    assert extra[1].flags == ("TensorRT eligible layer matches no ONNX node",)
    assert extra[1].trt_eligible is True and extra[1].trt_picked is False


def test_foreign_node_range_is_not_flagged() -> None:
    nodes = ["ln0", "q_proj", "k_proj", "softmax", "ln1"]
    sites = [Site("q_proj", "MatMul", True, likely_sparse_kernel=True), Site("k_proj", "MatMul", True)]
    rows = reconcile(sites, log(["{ForeignNode[ln0...ln1]}"], []), nodes)
    assert [r.node for r in rows if r.node] == ["q_proj", "k_proj"]
    assert all(r.in_range and r.agrees for r in rows if r.node)
    assert "in range" in format_verdict(rows)


def test_several_sites_on_one_node_merge() -> None:
    sites = [Site("gemm", "Gemm", False, reason="A: rank 1"), Site("gemm", "Gemm", True)]
    (row,) = reconcile(sites, log(["gemm"], []), ["gemm"])
    assert row.eligible is True and row.agrees


def test_format_marks_disagreements() -> None:
    rows = reconcile(
        [Site("conv1", "Conv", True, likely_sparse_kernel=True), Site("fc", "MatMul", True)],
        log(["conv1"], ["conv1"]),
        NODES,
    )
    text = format_verdict(rows)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["node", "op"]
    fc_line = next(line for line in lines if " fc " in line)
    assert fc_line.startswith("!")
    conv_line = next(line for line in lines if "conv1" in line)
    assert not conv_line.startswith("!")
    assert rows[1].to_json()["flags"] == ["we call it eligible; TensorRT did not list it as eligible"]


def _unnamed_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm_out"]), helper.make_node("Relu", ["mm_out"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_real_sites_unnamed_node_via_node_of() -> None:
    model = _unnamed_model()
    sites = find_weight_sites(model)
    assert [s.node for s in sites] == ["MatMul_0"]
    names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]
    text = f"[V] {ELIGIBLE_MARKER} node_of_mm_out + node_of_y\n[V] {PICKED_MARKER}\n"
    (row,) = reconcile(sites, parse_trt_log(text), names)
    assert row.node == "MatMul_0" and row.trt_eligible is True and row.trt_picked is False
    assert row.agrees  # 16x8 is too small for a sparse kernel: dense is what we expect


def test_real_sites_on_the_mlp_fixture() -> None:
    model = onnx.load(str(MODELS / "mlp.onnx"))
    sites = find_weight_sites(model)
    names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]
    eligible = [s.node for s in sites if s.eligible]
    text = f"[I] [TRT] {ELIGIBLE_MARKER} {', '.join(eligible)}\n[I] [TRT] {PICKED_MARKER}\n"
    rows = reconcile(sites, parse_trt_log(text), names)
    assert {r.node for r in rows} == {s.node for s in sites}
    assert disagreements(rows) == []
    not_eligible = [r for r in rows if not r.eligible]
    assert not_eligible and all(r.trt_eligible is False for r in not_eligible)


# --------------------------------------------------------------------------- TensorRT 10/11 and the engine inspector


def test_counts_without_names_leave_per_node_unknown_unless_the_inspector_says() -> None:
    from onnx_sparse.handoff.trt import EngineLayer

    counted = parse_trt_log("(Sparsity) Found 2 layer(s) eligible to use sparse tactics\n"
                            "(Sparsity) Chose 1 layer(s) using sparse tactics\n")  # fmt: skip
    sites = [Site("conv1", "Conv", True, likely_sparse_kernel=True), Site("fc", "MatMul", True)]
    rows = by_node(reconcile(sites, counted, NODES))
    assert rows["conv1"].trt_eligible is None and rows["conv1"].trt_picked is None and rows["conv1"].agrees
    layers = [
        EngineLayer("conv1 + relu1", "sm80_xmma_fprop_sparse_conv_interleaved_i8i8_i8i32_f32", True),
        EngineLayer("fc", "sm80_xmma_gemm_i8i8_i8i32_f32_tn_n_tilesize64x64x64", True),
    ]
    rows = by_node(reconcile(sites, counted, NODES, engine_layers=layers))
    assert (rows["conv1"].trt_eligible, rows["conv1"].trt_picked, rows["conv1"].tactic_sparse) == (True, True, True)
    assert rows["conv1"].tactic.startswith("sm80_xmma_fprop_sparse")
    assert (rows["fc"].trt_eligible, rows["fc"].trt_picked, rows["fc"].tactic_sparse) == (True, False, False)
    assert rows["conv1"].agrees and rows["fc"].agrees
    text = format_verdict(list(rows.values()))
    assert "tactic" in text and "TRT chose" in text


def test_zero_chosen_marks_every_node_dense() -> None:
    zero = parse_trt_log("(Sparsity) Found 0 layer(s) eligible to use sparse tactics\n"
                         "(Sparsity) Chose 0 layer(s) using sparse tactics\n")  # fmt: skip
    (row,) = reconcile([Site("conv1", "Conv", True, likely_sparse_kernel=True)], zero, NODES)
    assert (row.trt_eligible, row.trt_picked) == (False, False)
    assert any("did not list it" in f for f in row.flags)


def test_log_and_tactic_disagreement_is_flagged() -> None:
    from onnx_sparse.handoff.trt import EngineLayer

    named = parse_trt_log("(Sparsity) Found 1 layer(s) eligible to use sparse tactics: conv1\n"
                          "(Sparsity) Chose 1 layer(s) using sparse tactics: conv1\n")  # fmt: skip
    dense_tactic = [EngineLayer("conv1", "sm80_xmma_fprop_implicit_gemm_i8i8", False)]
    (row,) = reconcile(
        [Site("conv1", "Conv", True, likely_sparse_kernel=True)], named, NODES, engine_layers=dense_tactic
    )
    assert row.trt_picked is True and row.tactic_sparse is False
    assert any("tactic disagree" in f for f in row.flags)


def test_sparse_int8_column_from_sites() -> None:
    pruned_q = MODELS / "qdq_conv.onnx"
    sites = find_weight_sites(onnx.load(pruned_q))
    (row,) = reconcile(sites, log(None, None), ["conv"])
    assert row.sparse_int8 is False  # its output is a float model output
    assert row.to_json()["sparse_int8_possible"] is False
