"""The committed fixtures in models/ are what tools/make_models.py builds, and they all run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"
if str(REPO) not in sys.path:  # plain `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(REPO))

from tools import make_models, realmodels  # noqa: E402

NAMES = [name for name, _ in make_models.MODELS]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    make_models.write_all(out)
    return out


def test_committed_set_matches_generator() -> None:
    assert sorted(p.name for p in MODELS_DIR.glob("*.onnx")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_regenerated_is_byte_identical(name: str, regenerated: Path) -> None:
    assert (regenerated / name).read_bytes() == (MODELS_DIR / name).read_bytes(), (
        f"{name} differs from what tools/make_models.py builds; rerun it and commit models/"
    )


@pytest.mark.parametrize("name", NAMES)
def test_checker_and_onnxruntime(name: str) -> None:
    path = MODELS_DIR / name
    make_models.check_model(path)
    assert make_models.run_model(path)


@pytest.mark.parametrize("name", NAMES)
def test_small_documented_and_no_zero_weights(name: str) -> None:
    path = MODELS_DIR / name
    assert path.stat().st_size < 200_000
    model = onnx.load(path)
    assert model.graph.doc_string.startswith("Expect:")
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.name == "value"]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                tensors += list(attr.g.initializer)
    for function in model.functions:
        tensors += [a.t for node in function.node for a in node.attribute if a.name == "value"]
    for tensor in tensors:
        array = numpy_helper.to_array(tensor)
        if "zero_point" in tensor.name or array.ndim < 2:
            continue  # zero points and scalars (activation Q/DQ) are legitimately zero
        assert np.all(array != 0), f"{name}: {tensor.name} has zeros"


def test_unnamed_gemms_only_in_mlp() -> None:
    for name in NAMES:
        model = onnx.load(MODELS_DIR / name)
        unnamed = [n.op_type for n in model.graph.node if not n.name]
        assert unnamed == (["Gemm", "Gemm"] if name == "mlp.onnx" else []), name


def test_custom_domain_features() -> None:
    model = onnx.load(MODELS_DIR / "custom_domain.onnx")
    assert model.ir_version == 10
    assert {o.domain for o in model.opset_import} == {"", "com.microsoft", "local"}
    assert model.metadata_props and model.graph.value_info and model.functions
    assert model.graph.node[0].metadata_props[0].key == "origin"


@pytest.mark.real
@pytest.mark.parametrize("name", list(realmodels.MODELS))
def test_real_model_fetch_and_load(name: str) -> None:
    import onnxruntime as ort

    try:
        path = realmodels.model_path(name)
    except realmodels.FetchError as err:
        pytest.skip(str(err))
    assert path.stat().st_size > 100_000
    options = ort.SessionOptions()
    options.log_severity_level = 3
    assert ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).get_inputs()


@pytest.mark.real
def test_tokenizer_json() -> None:
    import json

    try:
        path = realmodels.tokenizer_json()
    except realmodels.FetchError as err:
        pytest.skip(str(err))
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    assert tokenizer["model"]["type"] == "WordPiece" and len(tokenizer["model"]["vocab"]) == 30522


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(realmodels.CACHE_ENV, str(tmp_path))
    assert realmodels.cache_dir() == tmp_path.resolve()
    with pytest.raises(KeyError):
        realmodels.model_path("no_such_model")
