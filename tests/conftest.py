"""Shared fixtures: the case models and what each must give, a CLI runner, onnxruntime helpers, real models.

``EXPECTED`` restates the expectations written in each case model's graph ``doc_string``
(built by ``tools/make_models.py``): per weight-bearing node, its display name, whether it is
eligible, a substring of the reason when it is not, the stored weight, its shape and the
axis of the STORED tensor along which groups of 4 run.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"

if str(REPO) not in sys.path:  # plain `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Expect:
    """One weight-bearing node of a case model, as its doc string states it."""

    node: str
    op: str
    eligible: bool
    weight: str
    shape: tuple[int, ...]
    axis: int
    reason: str = ""  # substring of the reason (not eligible only)
    dtype: str = "float32"
    source: str = "initializer"


E = Expect
EXPECTED: dict[str, list[Expect]] = {
    "conv_bn_folded.onnx": [
        E("conv1", "Conv", True, "conv1.weight", (32, 16, 3, 3), 1),
        E("conv2", "Conv", True, "conv2.weight", (64, 32, 1, 1), 1),
    ],
    "grouped_depthwise.onnx": [
        E("gconv", "Conv", True, "gconv.weight", (12, 8, 3, 3), 1),
        E("dwconv", "Conv", False, "dwconv.weight", (12, 1, 3, 3), 1, "depthwise"),
        E("g6conv", "Conv", False, "g6conv.weight", (16, 6, 3, 3), 1, "C/group=6 is not a multiple of 4"),
    ],
    "mlp.onnx": [
        E("fc0", "MatMul", True, "fc0.weight", (64, 32), 0),
        E("Gemm_1", "Gemm", True, "fc1.weight", (32, 16), 0),
        E("Gemm_3", "Gemm", True, "fc2.weight", (8, 16), 1),
        E("bmm", "MatMul", False, "bmm.weight", (2, 16, 8), 1, "batched MatMul"),
    ],
    "gemm_const_a.onnx": [
        E("gemm_a", "Gemm", True, "gemm_a.weight", (12, 8), 0),
    ],
    "shared_agree.onnx": [
        E("mm1", "MatMul", True, "shared.weight", (16, 16), 0),
        E("mm2", "MatMul", True, "shared.weight", (16, 16), 0),
    ],
    "shared_conflict.onnx": [
        E("mm", "MatMul", False, "shared.weight", (16, 16), 0, "gemm"),
        E("gemm", "Gemm", False, "shared.weight", (16, 16), 1, "mm"),
    ],
    "qdq_conv.onnx": [
        E("conv", "Conv", True, "conv.weight_q", (32, 16, 3, 3), 1, dtype="int8"),
    ],
    "qdq_conv_zp.onnx": [
        E("conv", "Conv", False, "conv.weight_q", (32, 16, 3, 3), 1, "zero point", dtype="int8"),
    ],
    "q_float_conv.onnx": [
        E("conv", "Conv", True, "conv.weight", (32, 16, 3, 3), 1),
    ],
    "fp16_cast.onnx": [
        E("conv", "Conv", True, "conv.weight", (16, 8, 3, 3), 1, dtype="float16"),
        E("fc", "MatMul", True, "fc.weight", (32, 16), 0, dtype="float16"),
    ],
    "constant_nodes.onnx": [
        E("conv", "Conv", True, "conv.weight", (16, 8, 3, 3), 1, source="constant"),
        E("fc", "MatMul", True, "fc.weight", (16, 8), 0, source="constant"),
    ],
    "transpose_120.onnx": [
        E("conv_a", "Conv", True, "conva.weight", (16, 3, 8), 0),
        E("conv_b", "Conv", True, "convb.weight", (3, 8, 16), 2),
        E("fc", "MatMul", True, "fc.weight", (8, 16), 1),
    ],
    "if_subgraph.onnx": [
        E("if/then_branch/then_mm_outer", "MatMul", True, "outer.weight", (16, 16), 0, source="outer_initializer"),
        E("if/then_branch/then_mm_local", "MatMul", True, "then.weight", (16, 16), 0),
        E("if/else_branch/else_mm_outer", "MatMul", True, "outer.weight", (16, 16), 0, source="outer_initializer"),
        E("if/else_branch/else_mm_local", "MatMul", True, "else.weight", (16, 16), 0),
    ],
    "conv_transpose.onnx": [
        E("deconv", "ConvTranspose", False, "deconv.weight", (16, 8, 2, 2), 0, "ConvTranspose"),
        E("conv", "Conv", True, "conv.weight", (16, 8, 3, 3), 1),
    ],
    "not_div4.onnx": [
        E("conv", "Conv", False, "conv.weight", (8, 6, 3, 3), 1, "C=6 is not a multiple of 4"),
        E("fc", "MatMul", False, "fc.weight", (10, 8), 0, "K=10 is not a multiple of 4"),
    ],
    "custom_domain.onnx": [
        E("fc1", "MatMul", True, "fc1.weight", (16, 32), 0),
        E("local.Proj/proj_mm", "MatMul", True, "proj.weight", (32, 16), 0, source="constant"),
    ],
    "dynamic_shapes.onnx": [
        E("proj", "MatMul", True, "proj.weight", (16, 32), 0),
    ],
}
del E

CASE_MODELS = sorted(EXPECTED)


def case_path(name: str) -> Path:
    return MODELS_DIR / name


def pruned_weights(name: str) -> set[str]:
    """Stored weights of ``name`` that a full prune must change (every eligible one)."""
    return {e.weight for e in EXPECTED[name] if e.eligible}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- tensors


def named_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every stored tensor with a key: initializer name or Constant output, prefixed by its graph."""

    def from_graph(g: onnx.GraphProto, prefix: str) -> Iterator[tuple[str, onnx.TensorProto]]:
        for t in g.initializer:
            yield prefix + t.name, t
        yield from from_nodes(g.node, prefix)

    def from_nodes(nodes, prefix: str) -> Iterator[tuple[str, onnx.TensorProto]]:
        for i, node in enumerate(nodes):
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield prefix + (node.output[0] if node.op_type == "Constant" else f"{i}.{a.name}"), a.t
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from from_graph(a.g, f"{prefix}{node.name or i}/{a.name}/")

    yield from from_graph(model.graph, "")
    for fn in model.functions:
        yield from from_nodes(fn.node, f"{fn.domain}.{fn.name}/")


def without_provenance(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the provenance keys a prune writes (onnx_sparse.recipe/version/calibration)."""
    from onnx_sparse.recipe import META_CALIBRATION, META_RECIPE, META_VERSION

    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [p for p in out.metadata_props if p.key not in (META_RECIPE, META_VERSION, META_CALIBRATION)]
    del out.metadata_props[:]
    out.metadata_props.extend(keep)
    return out


def tensor_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = dict(named_tensors(model))
    assert len(out) == len(list(named_tensors(model))), "tensor keys are not unique"
    return out


def stored_weight(model: onnx.ModelProto, weight: str) -> np.ndarray:
    """The value of the stored tensor named ``weight`` (its key without the scope prefix)."""
    hits = [t for key, t in named_tensors(model) if key == weight or key.endswith("/" + weight)]
    assert len(hits) == 1, f"{weight}: {len(hits)} tensors"
    return onnx.numpy_helper.to_array(hits[0])


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], tuple[int, str]]:
    """Run ``onnx-sparse ARGV`` in-process; returns (exit status, stdout)."""
    from onnx_sparse.cli.main import main

    def run(argv: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        logger = logging.getLogger("onnx_sparse")
        saved = (list(logger.handlers), logger.level, logger.propagate)
        try:
            rc = main([str(a) for a in argv])
        finally:
            # main() installs a handler on the captured stdout; do not leave it behind.
            logger.handlers[:], logger.level, logger.propagate = saved
        out = capsys.readouterr()
        return rc, out.out + out.err

    return run


def resident_kb(marker: str) -> int:
    """Resident kB of this process's mappings whose path contains ``marker`` (deleted files included;
    /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = marker in line
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def error_lines(output: str) -> list[str]:
    """``[E]`` lines other than the closing ``FAILED`` line."""
    return [line for line in output.splitlines() if line.startswith("[E]") and not line.startswith("[E] FAILED")]


# --------------------------------------------------------------------------- onnxruntime


def _session(model: Path | onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def random_feed(model: Path | onnx.ModelProto, seed: int = 0, dims: int = 3) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (symbolic dims -> ``dims``; bool inputs True)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in _session(model).get_inputs():
        shape = [d if isinstance(d, int) else dims for d in inp.shape]
        if inp.type == "tensor(bool)":
            feed[inp.name] = np.ones(shape, dtype=bool)
        elif inp.type == "tensor(float)":
            feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            raise AssertionError(f"no random data for {inp.name}: {inp.type}")
    return feed


def ort_run(model: Path | onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` in onnxruntime (CPU, default optimizations)."""
    return _session(model).run(None, feed)


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="session")
def real_model() -> Callable[[str], Path]:
    """``real_model(name)``: path of a real trained model; skips the test if it cannot be fetched."""
    from tools import realmodels

    def get(name: str) -> Path:
        try:
            return realmodels.model_path(name)
        except realmodels.FetchError as err:
            pytest.skip(f"real model {name!r} not available: {err}")

    return get
