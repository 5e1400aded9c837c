"""Benchmark calibrated pruning (sparsegpt vs the best recipe) on BERT-shaped encoders.

Builds encoders with random weights (onnx.helper, opset 17): each layer is a BERT layer
(Q/K/V/O projections with bias, multi-head attention, residual + LayerNormalization, FFN
up + erf-GELU + down, residual + LayerNormalization); the input is the embedding output
``x [batch, seq, hidden]``, so every MatMul weight is prunable. Sizes:

* ``base-L``: hidden 768, FFN 3072, 12 heads, ``L`` layers (``--layers 2 4 8 12``);
* ``large``: hidden 1024, FFN 4096, 16 heads, 24 layers (``large-L``: ``L``), external data;
* ``big``: (hidden 2048, FFN 8192, 16 heads, enough layers for > 2 GB of
  weights), external data. Give it ``--samples 72`` (9,216 rows): with 4,096 rows its
  8,192-wide layers are row-starved, and their damping is then cross-validated (about 30 s
  more per layer), which measures the starved path rather than the usual one;
* ``huge``: the ``big`` layer, 20 of them: 4.03 GB of external data, the size that shows
  whether memory stays within the weights plus a fixed amount (``--samples 72`` too).

Models with external data are written tensor by tensor into their data file (never held
whole in memory, so even ``huge`` is written on a small machine).

Calibration: ``--samples`` sequences of ``--seq`` tokens (default 32 x 128 = 4,096 rows),
standard normal, seeded. Each (model, method) run is its own subprocess (``--run-one``), so its
peak RSS (its ``VmHWM``) is its own; the wall time covers start-up, load, prune and save.
The child also reports the in-process prune time. Methods: ``sparsegpt`` (plain) and
``best`` (``asym`` + bias correction + head refit); ``asym`` and ``wanda`` are there too.

Usage::

    python tools/bench_calibrated.py --sizes base-2 base-4 --methods sparsegpt best --repeats 3
    python tools/bench_calibrated.py --sizes large --methods sparsegpt best --repeats 1
    python tools/bench_calibrated.py --sizes big --methods sparsegpt --samples 72 --repeats 1

Reports per size and method (the methods alternated run by run): median wall time, prune time,
prune CPU seconds (user + system of the process, all threads: the steadier figure on a loaded
machine), peak RSS, seconds per layer and the ratios to sparsegpt (same size), as a table and
optionally ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_common import REPO, fmt_bytes, loadavg, machine_info, proc_status, run_measured  # noqa: E402

WORKDIR = REPO / ".cache" / "bench" / "calibrated"
METHODS = {
    "sparsegpt": {"method": "sparsegpt"},
    "asym": {"method": "asym"},
    "best": {"method": "asym", "bias_correction": True, "refit_head": True},
    "wanda": {"method": "wanda"},
}
SHAPES = {"base": (768, 3072, 12), "large": (1024, 4096, 16), "big": (2048, 8192, 16), "huge": (2048, 8192, 16)}
#: Tensors from this size on go to the data file (``large``, ``big``, ``huge``), at this alignment.
EXTERNAL_FROM = 1024
ALIGN = 4096


def _size(spec: str) -> tuple[str, int]:
    """``base-4`` -> (``base``, 4); ``large`` -> 24 layers; ``big`` -> > 2 GB of weights; ``huge`` -> 20
    ``big`` layers (4 GB); ``large-2``: 2 layers."""
    kind, _, n = spec.partition("-")
    if kind not in SHAPES or (n and not n.isdigit()) or (kind == "base" and not n):
        raise argparse.ArgumentTypeError(f"unknown size {spec!r} (base-L, large[-L], big[-L] or huge[-L])")
    if n:
        return kind, int(n)
    if kind == "large":
        return "large", 24
    if kind == "huge":
        return "huge", 20
    hidden, ffn, _ = SHAPES["big"]
    per_layer = (4 * hidden * hidden + 2 * hidden * ffn) * 4
    return "big", math.ceil(2.2e9 / per_layer)


def build_encoder(kind: str, layers: int, seed: int = 0, data: Path | None = None) -> onnx.ModelProto:
    """A BERT-shaped encoder with random weights (see the module docstring).

    ``data``: write every tensor of :data:`EXTERNAL_FROM` bytes or more into this file as it
    is drawn (the model then refers to it by name, offset and length), so the weights are
    never in memory together.
    """
    hidden, ffn, heads = SHAPES[kind]
    head = hidden // heads
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    sink = data.open("wb") if data is not None else None

    def const(name: str, value: np.ndarray) -> str:
        if sink is None or value.nbytes < EXTERNAL_FROM:
            inits.append(numpy_helper.from_array(value, name))
            return name
        assert data is not None
        sink.write(b"\0" * (-sink.tell() % ALIGN))
        offset = sink.tell()
        sink.write(np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, v in (("location", data.name), ("offset", offset), ("length", value.nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(v)
        inits.append(t)
        return name

    def dense(x: str, name: str, fan_in: int, fan_out: int) -> str:
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (0.02 * rng.standard_normal(fan_out)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [x, const(f"{name}.w", w)], [f"{name}.mm"], name=f"{name}_MatMul"))
        nodes.append(helper.make_node("Add", [f"{name}.mm", const(f"{name}.b", b)], [name], name=f"{name}_Add"))
        return name

    def layernorm(x: str, name: str) -> str:
        g = const(f"{name}.g", np.ones(hidden, np.float32))
        b = const(f"{name}.b", np.zeros(hidden, np.float32))
        nodes.append(helper.make_node("LayerNormalization", [x, g, b], [name], name=name, axis=-1, epsilon=1e-12))
        return name

    split = const("shape.split", np.array([0, 0, heads, head], np.int64))
    merge = const("shape.merge", np.array([0, 0, hidden], np.int64))
    scale = const("attn.scale", np.array(1.0 / np.sqrt(head), np.float32))
    half = const("gelu.half", np.array(0.5, np.float32))
    one = const("gelu.one", np.array(1.0, np.float32))
    rsqrt2 = const("gelu.rsqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    x = "x"
    for i in range(layers):
        p = f"l{i}"
        q, k, v = (dense(x, f"{p}.{n}", hidden, hidden) for n in ("q", "k", "v"))
        for n, t in (("q", q), ("k", k), ("v", v)):
            nodes.append(helper.make_node("Reshape", [t, split], [f"{p}.{n}.r"]))
            perm = [0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]
            nodes.append(helper.make_node("Transpose", [f"{p}.{n}.r"], [f"{p}.{n}.t"], perm=perm))
        nodes.append(helper.make_node("MatMul", [f"{p}.q.t", f"{p}.k.t"], [f"{p}.s"]))
        nodes.append(helper.make_node("Mul", [f"{p}.s", scale], [f"{p}.ss"]))
        nodes.append(helper.make_node("Softmax", [f"{p}.ss"], [f"{p}.a"], axis=-1))
        nodes.append(helper.make_node("MatMul", [f"{p}.a", f"{p}.v.t"], [f"{p}.c"]))
        nodes.append(helper.make_node("Transpose", [f"{p}.c"], [f"{p}.ct"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"{p}.ct", merge], [f"{p}.cm"]))
        o = dense(f"{p}.cm", f"{p}.o", hidden, hidden)
        nodes.append(helper.make_node("Add", [o, x], [f"{p}.r1"]))
        h = layernorm(f"{p}.r1", f"{p}.ln1")
        u = dense(h, f"{p}.up", hidden, ffn)
        nodes.append(helper.make_node("Mul", [u, rsqrt2], [f"{p}.g0"]))
        nodes.append(helper.make_node("Erf", [f"{p}.g0"], [f"{p}.g1"]))
        nodes.append(helper.make_node("Add", [f"{p}.g1", one], [f"{p}.g2"]))
        nodes.append(helper.make_node("Mul", [u, f"{p}.g2"], [f"{p}.g3"]))
        nodes.append(helper.make_node("Mul", [f"{p}.g3", half], [f"{p}.gelu"]))
        d = dense(f"{p}.gelu", f"{p}.down", ffn, hidden)
        nodes.append(helper.make_node("Add", [d, h], [f"{p}.r2"]))
        x = layernorm(f"{p}.r2", f"{p}.ln2")
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        f"bert_{kind}_{layers}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if sink is not None:
        sink.close()
    return model


def write_model(kind: str, layers: int, out_dir: Path) -> Path:
    """Write the encoder (external data beside it, streamed, for ``large``/``big``/``huge``); reuse
    an existing file."""
    path = out_dir / f"bert_{kind}_{layers}" / "model.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("model.onnx.partial")
    if kind == "base":
        onnx.save(build_encoder(kind, layers), tmp)
    else:
        model = build_encoder(kind, layers, data=path.with_name("model.onnx.data"))
        tmp.write_bytes(model.SerializeToString())
    tmp.rename(path)  # last: an interrupted write leaves no model to reuse
    return path


def feeds(hidden: int, samples: int, seq: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, seq, hidden)).astype(np.float32)} for _ in range(samples)]


def run_one(model_path: Path, method: str, hidden: int, samples: int, seq: int, out: Path) -> None:
    """Child process: prune ``model_path`` into ``out`` with ``method``; print the times as JSON.

    The hidden size comes from the parent: loading the model here to read it would keep an inline
    model's weights in this process through the prune and add them to its peak RSS.
    """
    from onnx_sparse import api

    t0 = time.perf_counter()
    cal = feeds(hidden, samples, seq)
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    t1, c1 = time.perf_counter(), time.process_time()
    api.prune_file(model_path, out, calibration=cal, verify=False, **METHODS[method])  # type: ignore[arg-type]
    cpu = time.process_time() - c1
    times = {"setup_s": t1 - t0, "prune_s": time.perf_counter() - t1, "prune_cpu_s": cpu}
    print(json.dumps({**times, "vmhwm": _own_high_water()}))


def _own_high_water() -> int:
    """This process's own peak resident set (``VmHWM``; 0 where unsupported). Not ``ru_maxrss``:
    Linux carries the parent's resident set at the fork into the child's ``ru_maxrss`` across
    ``exec``, so a parent that built an inline model would lend its size to every run it starts."""
    try:
        return proc_status("VmHWM").get("VmHWM", 0)
    except OSError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["base-2", "base-4", "base-8", "base-12"])
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "best"], choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--run-one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        run_one(
            Path(args.run_one[0]),
            args.run_one[1],
            args.hidden,
            args.samples,
            args.seq,
            args.workdir / "out" / "model.onnx",
        )
        return 0
    rows = []
    for spec in args.sizes:
        kind, layers = _size(spec)
        path = write_model(kind, layers, args.workdir)
        wbytes = sum(p.stat().st_size for p in path.parent.iterdir())
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for _ in range(args.repeats):  # alternate the methods, so a change of load hits both
            for method in args.methods:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", str(path), method,
                       "--hidden", str(SHAPES[kind][0]), "--samples", str(args.samples), "--seq", str(args.seq),
                       "--workdir", str(args.workdir)]  # fmt: skip
                res = run_measured(f"{spec}/{method}", cmd)
                inner = {}
                if res.rc == 0:
                    inner = json.loads(res.output_tail.strip().splitlines()[-1])
                else:
                    print(f"{spec} {method}: failed (rc {res.rc}):\n{res.output_tail}", file=sys.stderr)
                rss = inner.get("vmhwm") or res.peak_rss_bytes
                runs[method].append({"wall_s": res.wall_s, "rss": rss, "rc": res.rc,
                                     "load": res.loadavg_before, **inner})  # fmt: skip
                cpu = inner.get("prune_cpu_s", float("nan"))
                print(f"  {spec} {method}: {res.wall_s:.1f}s, prune CPU {cpu:.1f}s, peak {fmt_bytes(rss)}",
                      flush=True)  # fmt: skip
        for method in args.methods:
            ok = [r for r in runs[method] if r["rc"] == 0]
            row = {"size": spec, "layers": layers, "method": method, "weight_bytes": wbytes, "runs": runs[method]}
            if ok:
                row["wall_s"] = statistics.median(r["wall_s"] for r in ok)
                row["prune_s"] = statistics.median(r["prune_s"] for r in ok)
                row["prune_cpu_s"] = statistics.median(r["prune_cpu_s"] for r in ok)
                row["peak_rss"] = max(r["rss"] for r in ok)
            rows.append(row)
        if not args.keep and kind != "base":
            shutil.rmtree(path.parent, ignore_errors=True)
    base = {r["size"]: r.get("prune_s") for r in rows if r["method"] == "sparsegpt"}
    base_cpu = {r["size"]: r.get("prune_cpu_s") for r in rows if r["method"] == "sparsegpt"}
    print(f"\n{args.samples} x {args.seq} calibration rows, median of {args.repeats}; load {loadavg()}")
    print("| size | layers | method | wall s | prune s | prune CPU s | s/layer | peak RSS | weights | RSS - weights | "
          "x sparsegpt (prune s) | x sparsegpt (CPU s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "wall_s" not in r:
            print(f"| {r['size']} | {r['layers']} | {r['method']} | failed | | | | | | | | |")
            continue
        ratio = r["prune_s"] / base[r["size"]] if base.get(r["size"]) else float("nan")
        ratio_cpu = r["prune_cpu_s"] / base_cpu[r["size"]] if base_cpu.get(r["size"]) else float("nan")
        print(f"| {r['size']} | {r['layers']} | {r['method']} | {r['wall_s']:.1f} | {r['prune_s']:.1f} | "
              f"{r['prune_cpu_s']:.1f} | {r['prune_s'] / r['layers']:.2f} | {fmt_bytes(r['peak_rss'])} | "
              f"{fmt_bytes(r['weight_bytes'])} | {fmt_bytes(r['peak_rss'] - r['weight_bytes'])} | {ratio:.2f} | "
              f"{ratio_cpu:.2f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
