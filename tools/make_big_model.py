"""Write a large fp32 MatMul-chain model with external data, for benchmarks.

The model is ``x [N, dim] -> MatMul(w0) -> ... -> MatMul(w{layers-1}) -> y [N, dim]`` with
constant ``[dim, dim]`` weights drawn from a seeded normal distribution (scaled by
1/sqrt(dim) so activations keep their size). Weights are stored as ONNX external data:
``model.onnx`` plus ``model.onnx.data``, each TensorProto carrying ``data_location=EXTERNAL``
and ``location``/``offset``/``length`` entries, offsets aligned to 4096 bytes.

Weights are generated and written in row chunks, so the script never holds a whole weight
in memory; ``--dim 8192 --layers 9`` (2.4 GB, past protobuf's 2 GB limit) works the same way.

Usage::

    python tools/make_big_model.py                        # 8 x 4096: 134M params, ~537 MB
    python tools/make_big_model.py --dim 8192 --layers 9  # ~2.4 GB
    python tools/make_big_model.py --out DIR --no-check

Outputs go to ``.cache/big/matmul_<layers>x<dim>/`` by default and are never committed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["check_big_model", "write_big_model"]

OPSET = 17
IR_VERSION = 8
ALIGN = 4096
CHUNK_BYTES = 64 << 20  # rows per write: about 64 MB of float32
_REPO = Path(__file__).resolve().parent.parent


def _write_weight(f, rng: np.random.Generator, dim: int) -> None:
    """Stream one [dim, dim] float32 weight (little-endian, row-major) into ``f``, chunk by chunk."""
    scale = np.float32(1.0 / np.sqrt(dim))
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * dim))
    for row in range(0, dim, rows_per_chunk):
        rows = min(rows_per_chunk, dim - row)
        chunk = rng.standard_normal((rows, dim), dtype=np.float32)
        chunk *= scale
        f.write(chunk.astype("<f4", copy=False).tobytes())


def _external_tensor(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    """A float TensorProto whose bytes live in ``location`` (ONNX external-data convention)."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


def write_big_model(out_dir: Path, *, layers: int = 8, dim: int = 4096, seed: int = 0) -> Path:
    """Write ``model.onnx`` and ``model.onnx.data`` into ``out_dir``; return the model path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.onnx"
    data_name = model_path.name + ".data"
    weights = []
    with (out_dir / data_name).open("wb") as f:
        for layer in range(layers):
            f.write(b"\0" * (-f.tell() % ALIGN))
            offset = f.tell()
            _write_weight(f, np.random.default_rng([seed, layer]), dim)
            weights.append(_external_tensor(f"w{layer}", [dim, dim], data_name, offset, f.tell() - offset))
    nodes = [
        helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"matmul{i}")
        for i in range(layers)
    ]
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        f"matmul_chain_{layers}x{dim}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        initializer=weights,
        doc_string=(
            f"Benchmark model: {layers} chained MatMuls with constant [{dim},{dim}] fp32 weights "
            f"(seed {seed}), stored as external data in {data_name}. Every MatMul is eligible, axis 0."
        ),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    model.producer_name = "onnx_sparse/tools/make_big_model.py"
    model_path.write_bytes(model.SerializeToString())
    return model_path


def check_big_model(model_path: Path, *, run: bool = True) -> None:
    """ONNX checker on the path; optionally load in onnxruntime and compare one run with numpy.

    The numpy reference reads the weights through ``np.memmap`` one at a time, which also
    proves that every offset and length points at the right bytes.
    """
    onnx.checker.check_model(str(model_path))
    if not run:
        return
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(model_path, load_external_data=False)
    dim = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    x = np.random.default_rng(1).standard_normal((2, dim), dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    del session
    ref = x.astype(np.float64)
    for tensor in model.graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        weight = np.memmap(
            model_path.parent / info["location"],
            dtype="<f4",
            mode="r",
            offset=int(info["offset"]),
            shape=tuple(tensor.dims),
        )
        ref = ref @ weight
        del weight
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output directory (default: .cache/big/matmul_<layers>x<dim>)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime load and run")
    args = parser.parse_args(argv)
    out = args.out or _REPO / ".cache" / "big" / f"matmul_{args.layers}x{args.dim}"
    start = time.perf_counter()
    path = write_big_model(out, layers=args.layers, dim=args.dim, seed=args.seed)
    data = path.with_name(path.name + ".data")
    print(f"wrote {path} + {data.name} ({data.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f}s")
    check_big_model(path, run=not args.no_check)
    print("checker ok" + ("" if args.no_check else ", onnxruntime ok (matches numpy)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
