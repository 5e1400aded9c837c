"""Edges of onnx_sparse.recipe the mutation run found unpinned: validation bounds, describe(), the
canonical JSON of the metadata, the calibration digest and reading provenance back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnx_sparse import Recipe
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.recipe import META_RECIPE, META_VERSION, calibration_digest, read_provenance


@pytest.mark.parametrize(
    ("field", "ok", "bad"),
    [("blocksize", 4, 2), ("blocksize", 8, 6), ("holdout", 0.0, -0.1), ("holdout", 0.5, 0.51)],
)
def test_validation_bounds_are_inclusive(field: str, ok, bad) -> None:
    assert getattr(Recipe(**{field: ok}), field) == ok
    with pytest.raises(OnnxSparseError, match=field):
        Recipe(**{field: bad})


def test_describe() -> None:
    assert Recipe().describe() == "default"
    best = Recipe(method="asym", bias_correction=True, refit_head=True)
    assert best.describe() == "asym + bias correction + head refit"  # the README's name for it
    assert Recipe(method="sparsegpt", target_cosine=0.98).describe() == "sparsegpt + target cosine 0.98"


def test_metadata_json_is_compact_and_file_json_is_indented() -> None:
    """The recipe in a model's metadata is canonical (no spaces): the same recipe, the same bytes."""
    compact = Recipe().to_json()
    assert compact.startswith('{"format":1,"method":null,"include":[]') and " " not in compact
    assert '"format": 1,\n' in Recipe().to_json(indent=1)


def test_a_missing_recipe_file_says_why(tmp_path: Path) -> None:
    with pytest.raises(OnnxSparseError, match="cannot read the recipe: No such file or directory"):
        Recipe.load(tmp_path / "missing.json")


def test_calibration_digest_depends_on_names_values_and_order_of_feeds() -> None:
    a, b = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    digest = calibration_digest([{"x": a}])
    assert digest.startswith("sha256:") and digest == calibration_digest([{"x": a.copy()}])
    assert digest != calibration_digest([{"x": b}])
    assert digest != calibration_digest([{"y": a}])
    assert calibration_digest([{"x": a}, {"x": b}]) != calibration_digest([{"x": b}, {"x": a}])
    # the shape is part of the data: a rank-0 feed (a sample rate) is not the same as shape (1,) or (1, 1)
    scalar = calibration_digest([{"sr": np.array(16000, np.int64)}])
    assert scalar != calibration_digest([{"sr": np.array([16000], np.int64)}])
    assert scalar != calibration_digest([{"sr": np.array([[16000]], np.int64)}])
    # the layout in memory is not: a transposed (non-contiguous) view digests as its C-order copy
    t = np.arange(6, dtype=np.float32).reshape(3, 2).T
    assert calibration_digest([{"x": t}]) == calibration_digest([{"x": np.ascontiguousarray(t)}])


def test_read_provenance_of_partial_or_broken_metadata() -> None:
    assert read_provenance({}) is None
    assert read_provenance({META_VERSION: "0.1.0"}) == {"version": "0.1.0", "recipe": None}
    assert read_provenance({META_RECIPE: "{not json"}) == {"version": None, "recipe": "{not json"}


@pytest.mark.parametrize(
    ("settings", "needs"),
    [
        ({}, False),
        ({"method": "wanda"}, True),
        ({"bias_correction": True}, True),
        ({"refit_head": True}, True),
        ({"sensitivity": True}, True),
        ({"target_cosine": 0.98}, True),
    ],
)
def test_needs_data(settings: dict, needs: bool) -> None:
    """Without data, each of these must be refused up front (magnitude alone needs none)."""
    assert Recipe(**settings).resolve(has_data=False).needs_data is needs
