#!/usr/bin/env python3
"""GPU check: dense vs 2:4 sparse matmul at real layer shapes, and TensorRT's verdict where present.

For each eligible Gemm/MatMul weight (of MODEL, or of a synthetic BERT/LLaMA-like layer set) it
times, with CUDA events, the dense fp16 ``torch.mm(W, X^T)`` against the same product with ``W``
converted by ``torch.sparse.to_sparse_semi_structured`` (2:4 along the input channels, the
reduction axis; ``W`` is ``[out, in]``, ``X`` is ``[tokens, in]``), on every semi-structured
backend PyTorch has (cuSPARSELt and CUTLASS, chosen with ``SparseSemiStructuredTensor.
_FORCE_CUTLASS``), and checks that both give the same numbers. Each product is timed twice: eager
(what a PyTorch program pays, host work included) and replayed from a CUDA graph (the kernels
alone). On an H100 with PyTorch 2.11 / cuSPARSELt 0.8, eager sparse calls carried about 0.4-0.8 ms
of host work each, so only the graph column says whether the sparse kernel beats cuBLAS (there:
1.0-1.4x for 4096x4096 and 4096x11008 layers, below 1x for 768-wide ones); PyTorch's CUTLASS 2:4
kernels run on SM 8.x only and are skipped elsewhere. Where TensorRT is importable it
then builds the dense and the sparse engine of a model (MODEL, or a synthetic fp16 MLP chain)
with :mod:`onnx_sparse.handoff.trt`, times both and prints our per-node prediction against
TensorRT's eligible/picked lists.

INT8 (``--precision int8`` or ``both``): the same per-layer comparison for INT8 x INT8, the
kernel TensorRT runs for a layer that is INT8 in, weight and out: the sparse product is
``to_sparse_semi_structured`` of an int8 weight (cuSPARSELt; int8 output, saturated), the dense
baseline ``torch._int_mm`` (cuBLAS int8 GEMM, int32 output). Correctness: the sparse result must
equal the dense int32 result clamped to int8 exactly (weights and inputs in {-1, 0, 1}). Shapes:
:func:`int8_layers` (the real models' MatMul/Gemm shapes, BERT-base/large, LLaMA-7B).

Runs offline, one case at a time (a failing case prints its error and the run goes on), and
stops starting new cases when ``--budget`` seconds have passed (default 150: the whole run fits
in 3 minutes on an H100).

Usage::

    python tools/gpu_check.py [MODEL.onnx] [--tokens 2048,8192] [--iterations 20] [--no-trt]

Exit status: 0 checks ran and sparse results agreed with dense; 1 a numerical disagreement;
2 nothing could be checked (no PyTorch, or no CUDA device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# (name, out_features, in_features): BERT-base and LLaMA-7B projections.
SYNTHETIC = (
    ("bert.attention.self.query", 768, 768),
    ("bert.intermediate.dense", 3072, 768),
    ("bert.output.dense", 768, 3072),
    ("llama.self_attn.o_proj", 4096, 4096),
    ("llama.mlp.up_proj", 11008, 4096),
    ("llama.mlp.down_proj", 4096, 11008),
)
# INT8 shapes (name, out_features, in_features): the real models' fully connected layers
# (MiniLM-L3: hidden 384, FFN 1536; magika's dense head), BERT-base, BERT-large, LLaMA-7B.
INT8_SHAPES = (
    ("minilm_l3.attention.qkvo", 384, 384),
    ("minilm_l3.intermediate", 1536, 384),
    ("minilm_l3.output", 384, 1536),
    ("magika.dense", 512, 256),
    ("bert-base.attention", 768, 768),
    ("bert-base.intermediate", 3072, 768),
    ("bert-base.output", 768, 3072),
    ("bert-large.attention", 1024, 1024),
    ("bert-large.intermediate", 4096, 1024),
    ("bert-large.output", 1024, 4096),
    ("llama.self_attn.o_proj", 4096, 4096),
    ("llama.mlp.up_proj", 11008, 4096),
    ("llama.mlp.down_proj", 4096, 11008),
)
PRECISIONS = ("fp16", "int8")
# Synthetic TensorRT model: a chain of MatMul -> Relu with these widths (kept small enough to
# build twice within the budget).
TRT_CHAIN = (768, 768, 3072, 768, 4096, 4096)
TRT_TOKENS = 2048
REL_TOL = 1e-2  # relative L2 difference allowed between sparse and dense fp16 results


@dataclass
class Layer:
    name: str
    op: str
    out_features: int
    in_features: int
    weight: Any = None  # numpy [out, in] or None (random)
    source: str = "synthetic"


@dataclass
class Row:
    layer: str
    shape: str
    tokens: int
    backend: str
    precision: str = "fp16"
    dense_ms: float | None = None
    sparse_ms: float | None = None
    speedup: float | None = None
    dense_graph_ms: float | None = None
    sparse_graph_ms: float | None = None
    graph_speedup: float | None = None
    rel_err: float | None = None
    status: str = ""


def say(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- layers


def layers_from_model(path: Path) -> list[Layer]:
    """Eligible 2-D Gemm/MatMul weights of ``path`` as ``[out, in]`` (onnx_sparse's locator,
    else every MatMul/Gemm whose second input is a 2-D float initializer)."""
    import numpy as np

    try:
        from onnx_sparse.graph.locate import find_weight_sites
        from onnx_sparse.graph.weights import read_weight
        from onnx_sparse.io import load_model

        mf = load_model(path)
        layers = []
        for s in find_weight_sites(mf.model):
            if s.op not in ("MatMul", "Gemm") or not s.eligible or len(s.shape) != 2 or s.axis is None:
                continue
            w = np.asarray(read_weight(s, mf))
            if w.dtype.kind != "f":  # int8/fp8 behind DequantizeLinear: shapes only
                w = None
                out_f, in_f = (s.shape[1 - s.axis], s.shape[s.axis])
            else:
                w = np.moveaxis(w.astype(np.float32), s.axis, -1)  # reduction axis last: [out, in]
                out_f, in_f = w.shape
            layers.append(Layer(s.node, s.op, int(out_f), int(in_f), w, source="onnx_sparse"))
        return layers
    except ImportError as exc:
        say(f"[W] onnx_sparse locator unavailable ({exc}); enumerating MatMul/Gemm initializers")
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    layers = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim != 2 or w.dtype.kind != "f":
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        w = w.astype(np.float32) if trans_b else w.T.astype(np.float32)  # -> [out, in]
        layers.append(Layer(node.name or f"{node.op_type}_{i}", node.op_type, w.shape[0], w.shape[1], w, "initializer"))
    return layers


# --------------------------------------------------------------------------- PyTorch timing


def bench(torch: Any, fn: Any, iterations: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` over ``iterations`` CUDA-event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_graph(torch: Any, fn: Any, iterations: int, warmup: int, reps: int = 10) -> float | None:
    """Median milliseconds of one ``fn()`` replayed from a CUDA graph (``reps`` calls per graph),
    i.e. without Python and launch overhead; None if ``fn`` cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        for _ in range(warmup):
            graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(iterations):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
        del graph
        return statistics.median(times)
    except Exception as exc:
        say(f"[W] CUDA graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        return None


def prune_2_4_torch(torch: Any, w: Any) -> Any:
    """Keep the 2 largest |w| in each group of 4 along the last axis (input channels)."""
    out_f, in_f = w.shape
    groups = w.reshape(out_f, in_f // 4, 4)
    idx = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return (groups * mask).reshape(out_f, in_f).contiguous()


def backends(torch: Any) -> list[str]:
    names = []
    try:
        from torch.backends import cusparselt

        if cusparselt.is_available():
            names.append("cusparselt")
    except Exception:
        pass
    names.append("cutlass")
    return names


def sparse_backend_version(torch: Any) -> str:
    try:
        from torch.backends import cusparselt

        return f"cuSPARSELt {cusparselt.version()}" if cusparselt.is_available() else "cuSPARSELt not available"
    except Exception as exc:
        return f"cuSPARSELt unknown ({type(exc).__name__})"


def torch_cases(torch: Any, layers: list[Layer], tokens: list[int], args: argparse.Namespace, t0: float) -> list[Row]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    rows: list[Row] = []
    names = backends(torch)
    cap = torch.cuda.get_device_capability(0)
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in layers:
        shape = f"{layer.out_features}x{layer.in_features}"
        if time.monotonic() - t0 > args.budget:
            rows.append(Row(layer.name, shape, 0, "-", status="skipped: time budget used up"))
            continue
        try:
            if layer.in_features % 64 or layer.out_features % 32:
                rows.append(Row(layer.name, shape, 0, "-", status="skipped: needs out % 32 == 0 and in % 64 == 0"))
                continue
            if layer.weight is not None:
                w = torch.from_numpy(layer.weight).to("cuda", torch.float16)
            else:
                w = torch.randn(layer.out_features, layer.in_features, generator=gen, device="cuda")
                w = (w / layer.in_features**0.5).half()
            w = prune_2_4_torch(torch, w)
            for t in tokens:
                try:
                    x = torch.randn(t, layer.in_features, generator=gen, device="cuda").half()
                    xt = x.t().contiguous()  # [in, tokens]: the dense operand, laid out once
                    ref = torch.mm(w, xt)
                    dense_ms = bench(torch, lambda w=w, xt=xt: torch.mm(w, xt), args.iterations, args.warmup)
                    dense_graph_ms = bench_graph(
                        torch, lambda w=w, xt=xt: torch.mm(w, xt), args.iterations, args.warmup
                    )
                except Exception as exc:  # e.g. out of memory at 8192 tokens
                    rows.append(Row(layer.name, shape, t, "dense", status=f"FAILED: {type(exc).__name__}: {exc}"))
                    continue
                for name in names:
                    row = Row(layer.name, shape, t, name, dense_ms=dense_ms, dense_graph_ms=dense_graph_ms)
                    if name == "cutlass" and cap[0] != 8:
                        row.status = (
                            f"skipped: PyTorch's CUTLASS 2:4 kernels run on SM 8.x only (this is SM {cap[0]}.{cap[1]})"
                        )
                        rows.append(row)
                        continue
                    try:
                        SparseSemiStructuredTensor._FORCE_CUTLASS = name == "cutlass"
                        ws = to_sparse_semi_structured(w)
                        out = torch.mm(ws, xt)
                        row.rel_err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
                        row.sparse_ms = bench(
                            torch, lambda ws=ws, xt=xt: torch.mm(ws, xt), args.iterations, args.warmup
                        )
                        row.speedup = dense_ms / row.sparse_ms
                        row.sparse_graph_ms = bench_graph(
                            torch, lambda ws=ws, xt=xt: torch.mm(ws, xt), args.iterations, args.warmup
                        )
                        if row.sparse_graph_ms and dense_graph_ms:
                            row.graph_speedup = dense_graph_ms / row.sparse_graph_ms
                        row.status = "ok" if row.rel_err <= REL_TOL else f"MISMATCH (rel err > {REL_TOL})"
                        del ws, out
                    except Exception as exc:
                        row.status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    finally:
                        SparseSemiStructuredTensor._FORCE_CUTLASS = forced
                    rows.append(row)
                del x, xt, ref
            del w
            torch.cuda.empty_cache()
        except Exception as exc:
            rows.append(Row(layer.name, shape, 0, "-", status=f"FAILED: {type(exc).__name__}: {exc}"))
            if args.verbose:
                traceback.print_exc()
    return rows


def int8_layers(model_layers: list[Layer] | None = None) -> list[Layer]:
    """The INT8 cases: each distinct shape of ``model_layers`` (if given), then :data:`INT8_SHAPES`."""
    out: list[Layer] = []
    seen: set[tuple[int, int]] = set()
    for layer in list(model_layers or []) + [Layer(n, "MatMul", o, i) for n, o, i in INT8_SHAPES]:
        key = (layer.out_features, layer.in_features)
        if key not in seen:
            seen.add(key)
            out.append(Layer(layer.name, layer.op, layer.out_features, layer.in_features, None, layer.source))
    return out


def int8_mismatch(out: Any, dense_int32: Any) -> float:
    """Share of entries where a sparse INT8 GEMM result ``out`` differs from the dense int32 result.

    An int8 ``out`` may hold the int32 result saturated to [-128, 127] or wrapped modulo 256 (the
    kernels' documentation does not say which); an entry matches if it equals either. Takes numpy
    arrays or torch tensors.
    """
    if not str(out.dtype).endswith("int8"):
        same = out == dense_int32
    else:
        sat = dense_int32.clip(-128, 127)
        wrap = (dense_int32 + 128) % 256 - 128
        wide = out.astype("int32") if hasattr(out, "astype") else out.to(dense_int32.dtype)
        same = (wide == sat) | (wide == wrap)
    return 1.0 - float(same.mean() if hasattr(same, "astype") else same.float().mean())


def int8_cases(torch: Any, layers: list[Layer], tokens: list[int], args: argparse.Namespace, t0: float) -> list[Row]:
    """INT8 x INT8: cuSPARSELt 2:4 (int8 out) vs cuBLAS ``torch._int_mm`` (int32 out), per layer and token count."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    rows: list[Row] = []
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in layers:
        shape = f"{layer.out_features}x{layer.in_features}"
        if time.monotonic() - t0 > args.budget:
            rows.append(Row(layer.name, shape, 0, "-", "int8", status="skipped: time budget used up"))
            continue
        if layer.in_features % 64 or layer.out_features % 32:
            rows.append(Row(layer.name, shape, 0, "-", "int8", status="skipped: needs out % 32 == 0 and in % 64 == 0"))
            continue
        try:
            w = torch.randint(-1, 2, (layer.out_features, layer.in_features), generator=gen, device="cuda")
            w = prune_2_4_torch(torch, w.float()).to(torch.int8)
            for t in tokens:
                row = Row(layer.name, shape, t, "cusparselt", "int8")
                try:
                    x = torch.randint(-1, 2, (t, layer.in_features), generator=gen, device="cuda").to(torch.int8)
                    xt = x.t().contiguous()  # row-major [in, tokens] for cuBLAS
                    xcol = x.t()  # the same values column-major, as PyTorch's int8 semi-structured tests pass them
                    dense = torch._int_mm(w, xt)  # [out, tokens] int32
                    row.dense_ms = bench(torch, lambda w=w, xt=xt: torch._int_mm(w, xt), args.iterations, args.warmup)
                    row.dense_graph_ms = bench_graph(
                        torch, lambda w=w, xt=xt: torch._int_mm(w, xt), args.iterations, args.warmup
                    )
                    SparseSemiStructuredTensor._FORCE_CUTLASS = False
                    ws = to_sparse_semi_structured(w)
                    out = torch.mm(ws, xcol)
                    row.rel_err = int8_mismatch(out, dense)  # share of differing entries
                    row.sparse_ms = bench(
                        torch, lambda ws=ws, xcol=xcol: torch.mm(ws, xcol), args.iterations, args.warmup
                    )
                    row.speedup = row.dense_ms / row.sparse_ms
                    row.sparse_graph_ms = bench_graph(
                        torch, lambda ws=ws, xcol=xcol: torch.mm(ws, xcol), args.iterations, args.warmup
                    )
                    if row.sparse_graph_ms and row.dense_graph_ms:
                        row.graph_speedup = row.dense_graph_ms / row.sparse_graph_ms
                    row.status = "ok" if row.rel_err == 0.0 else "MISMATCH (int8 results differ)"
                    del x, xt, xcol, dense, ws, out
                except Exception as exc:
                    row.status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                finally:
                    SparseSemiStructuredTensor._FORCE_CUTLASS = forced
                rows.append(row)
            del w
            torch.cuda.empty_cache()
        except Exception as exc:
            rows.append(Row(layer.name, shape, 0, "-", "int8", status=f"FAILED: {type(exc).__name__}: {exc}"))
            if args.verbose:
                traceback.print_exc()
    return rows


def print_rows(rows: list[Row]) -> None:
    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    table = [("layer", "shape [out x in]", "tokens", "precision", "backend", "dense ms", "sparse ms", "speedup",
              "dense graph ms", "sparse graph ms", "graph speedup", "rel err", "status")]  # fmt: skip
    for r in rows:
        table.append((r.layer, r.shape, str(r.tokens or "-"), r.precision, r.backend, f(r.dense_ms, ".4f"),
                      f(r.sparse_ms, ".4f"),
                      f(r.speedup, ".2f") + ("x" if r.speedup else ""), f(r.dense_graph_ms, ".4f"),
                      f(r.sparse_graph_ms, ".4f"), f(r.graph_speedup, ".2f") + ("x" if r.graph_speedup else ""),
                      f(r.rel_err, ".1e"), r.status))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        say("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            say("  ".join("-" * w for w in widths))


# --------------------------------------------------------------------------- TensorRT


def synthetic_trt_model(path: Path) -> Path:
    """An fp16 MatMul -> Relu chain over TRT_CHAIN widths, weights 2:4 along the input axis."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnx_sparse.core.nm import prune_2_4

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "x"
    for i, (k, n) in enumerate(zip(TRT_CHAIN[:-1], TRT_CHAIN[1:], strict=True)):
        w = prune_2_4((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), axis=0)
        inits.append(numpy_helper.from_array(w.astype(np.float16), f"fc{i}.weight"))
        nodes.append(helper.make_node("MatMul", [prev, f"fc{i}.weight"], [f"h{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [TRT_TOKENS, TRT_CHAIN[0]])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT16, [TRT_TOKENS, TRT_CHAIN[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def trt_check(model: Path | None, args: argparse.Namespace, t0: float) -> dict[str, Any]:
    from onnx_sparse.handoff import trt

    version = trt.trt_version()
    if version is None:
        say("TensorRT: not installed; skipped the engine builds")
        return {"tensorrt": None}
    say(f"TensorRT {version}")
    from onnx_sparse.graph.locate import find_weight_sites
    from onnx_sparse.handoff.trtlog import parse_trt_log
    from onnx_sparse.handoff.verdict import disagreements, format_verdict, reconcile
    from onnx_sparse.io import load_model

    result: dict[str, Any] = {"tensorrt": version}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        path = model or synthetic_trt_model(Path(work) / "mlp_chain.onnx")
        plan = trt.plan_precision(path, True, work)
        say(f"model: {path.name}; {plan.note}")
        built = load_model(plan.path).model
        sites = find_weight_sites(built)
        names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(built.graph.node)]
        timings: dict[str, float] = {}
        log = None
        for sparse in (True, False):
            kind = "sparse" if sparse else "dense"
            if time.monotonic() - t0 > args.budget:
                say(f"TensorRT {kind} engine: skipped (time budget used up)")
                continue
            try:
                t = time.monotonic()
                eng = trt.build_engine(plan.path, sparse=sparse, fp16=plan.fp16, int8=plan.int8)
                say(f"TensorRT {kind} engine built in {time.monotonic() - t:.1f} s")
                timings[kind] = trt.time_engine(eng.engine, iterations=args.iterations, warmup=args.warmup)
                say(f"TensorRT {kind} engine: median {timings[kind]:.4f} ms")
                if sparse:
                    log = eng.log
            except Exception as exc:
                say(f"TensorRT {kind} engine: FAILED: {type(exc).__name__}: {exc}")
        if "sparse" in timings and "dense" in timings:
            say(f"TensorRT speedup (dense/sparse): {timings['dense'] / timings['sparse']:.3f}x")
        result.update({f"{k}_ms": v for k, v in timings.items()})
        if log is not None:
            parsed = parse_trt_log(log)
            if not parsed.found:
                say("builder log: no (Sparsity) lines")
            rows = reconcile(sites, parsed, names)
            say(format_verdict(rows))
            say(f"disagreements: {len(disagreements(rows))}")
            result.update(trt_eligible=parsed.eligible, trt_picked=parsed.picked, nodes=[r.to_json() for r in rows])
    return result


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="ONNX model (default: synthetic LLM/BERT-like shapes).")
    parser.add_argument("--tokens", default="2048,8192", help="Token counts (rows of X), comma separated.")
    parser.add_argument("--iterations", type=int, default=20, help="Timed runs per case (median reported).")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed runs before timing.")
    parser.add_argument("--budget", type=float, default=150.0, help="Start no new case after this many seconds.")
    parser.add_argument("--max-layers", type=int, default=12, help="At most this many layers of MODEL.")
    parser.add_argument("--no-trt", action="store_true", help="Skip the TensorRT part.")
    parser.add_argument(
        "--precision",
        choices=("fp16", "int8", "both"),
        default="both",
        help="fp16: half-precision 2:4 vs dense; int8: INT8 x INT8 2:4 vs dense (the INT8_SHAPES set); both (default).",
    )
    parser.add_argument(
        "--dump-layers",
        type=Path,
        metavar="JSON",
        help="Only write the eligible layer shapes of MODEL (or of each --model-list entry) to JSON and exit "
        "(runs on the CPU; for a GPU machine that has PyTorch but not onnx).",
    )
    parser.add_argument("--model-list", nargs="*", type=Path, default=[], help="More models for --dump-layers.")
    parser.add_argument(
        "--layers-json", type=Path, help="Time the layer shapes written by --dump-layers instead of reading MODEL."
    )
    parser.add_argument("--json", type=Path, help="Also write the results as JSON.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Tracebacks for failed cases.")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    if args.dump_layers:
        models = ([args.model] if args.model else []) + list(args.model_list)
        by_shape: dict[tuple[str, int, int], dict[str, Any]] = {}
        for m in models:
            for layer in layers_from_model(m):
                key = (m.stem, layer.out_features, layer.in_features)
                entry = by_shape.setdefault(
                    key, {"name": f"{m.stem}/{layer.name}", "op": layer.op, "out": key[1], "in": key[2], "count": 0}
                )
                entry["count"] += 1  # layers of this model with the same shape time the same
        shapes = list(by_shape.values())
        args.dump_layers.write_text(json.dumps(shapes, indent=1))
        say(f"wrote {len(shapes)} layer shapes from {len(models)} model(s) to {args.dump_layers}")
        return 0
    warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor is in prototype stage.*")

    say(f"python {sys.version.split()[0]}")
    try:
        import torch
    except ImportError:
        say("PyTorch is not installed: no CUDA device to check on; nothing checked")
        return 2
    say(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    if not torch.cuda.is_available():
        say("no CUDA device: nothing checked (this check needs an NVIDIA GPU with sparse tensor cores, SM 8.0+)")
        return 2
    cap = torch.cuda.get_device_capability(0)
    say(f"device: {torch.cuda.get_device_name(0)} (SM {cap[0]}.{cap[1]}); {sparse_backend_version(torch)}")
    if cap < (8, 0):
        say("[W] sparse tensor cores need SM 8.0 (Ampere) or newer: sparse cases will fail")

    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    if args.layers_json is not None:
        layers = [
            Layer(d["name"], d["op"], int(d["out"]), int(d["in"]), source=str(args.layers_json))
            for d in json.loads(args.layers_json.read_text())
        ][: args.max_layers]
    elif args.model is not None:
        try:
            layers = layers_from_model(args.model)[: args.max_layers]
        except Exception as exc:
            say(f"could not read {args.model}: {type(exc).__name__}: {exc}; using the synthetic shapes")
            layers = []
        if not layers:
            say(f"no eligible 2-D Gemm/MatMul weights in {args.model}; using the synthetic shapes")
    else:
        layers = []
    if not layers:
        layers = [Layer(name, "MatMul", out_f, in_f) for name, out_f, in_f in SYNTHETIC]

    rows: list[Row] = []
    if args.precision in ("fp16", "both"):
        say(f"\n== PyTorch: dense torch.mm vs to_sparse_semi_structured (fp16), {len(layers)} layers, tokens {tokens}")
        rows += torch_cases(torch, layers, tokens, args, t0)
        print_rows(rows)
    if args.precision in ("int8", "both"):
        i8 = int8_layers([x for x in layers if x.source != "synthetic"])
        say(f"\n== PyTorch: INT8 x INT8, torch._int_mm vs to_sparse_semi_structured (cuSPARSELt), {len(i8)} layers")
        int8_rows = int8_cases(torch, i8, tokens, args, t0)
        print_rows(int8_rows)
        rows += int8_rows
    trt_result: dict[str, Any] = {}
    if not args.no_trt:
        say("\n== TensorRT: dense vs sparse engine")
        try:
            trt_result = trt_check(args.model, args, t0)
        except Exception as exc:
            say(f"TensorRT part FAILED: {type(exc).__name__}: {exc}")
            if args.verbose:
                traceback.print_exc()
    if args.json:
        args.json.write_text(json.dumps({"torch": [asdict(r) for r in rows], "tensorrt": trt_result}, indent=2))
    mismatches = [r for r in rows if r.status.startswith("MISMATCH")]
    ok = [r for r in rows if r.status == "ok"]
    say(f"\n{len(ok)} sparse cases ok, {len(mismatches)} mismatches, "
        f"{len(rows) - len(ok) - len(mismatches)} failed/skipped; {time.monotonic() - t0:.1f} s")  # fmt: skip
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
