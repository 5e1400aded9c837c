"""The CPU-side parts of tools/gpu_check.py's INT8 check (the timing itself needs an NVIDIA GPU)."""

from __future__ import annotations

import numpy as np

from tools import gpu_check


def test_int8_shapes_cover_real_models_bert_and_llm() -> None:
    layers = gpu_check.int8_layers()
    shapes = {(x.out_features, x.in_features) for x in layers}
    assert {(1536, 384), (384, 1536), (384, 384)} <= shapes  # MiniLM-L3
    assert {(3072, 768), (4096, 1024), (1024, 4096)} <= shapes  # BERT-base / large
    assert {(11008, 4096), (4096, 11008), (4096, 4096)} <= shapes  # LLaMA-7B
    assert len(shapes) == len(layers)  # each shape once


def test_int8_shapes_put_model_layers_first_without_repeats() -> None:
    model = [gpu_check.Layer("fc", "Gemm", 384, 384, np.zeros((384, 384)), "m"),
             gpu_check.Layer("new", "MatMul", 640, 128, None, "m")]  # fmt: skip
    layers = gpu_check.int8_layers(model)
    assert [x.name for x in layers[:2]] == ["fc", "new"] and all(x.weight is None for x in layers)
    assert sum((x.out_features, x.in_features) == (384, 384) for x in layers) == 1


def test_int8_mismatch_saturates_like_an_int8_out_kernel() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(-1, 2, (64, 256)).astype(np.int8)
    x = np.full((256, 8), 1, np.int8)
    dense = w.astype(np.int32) @ x.astype(np.int32)
    dense[0, 0] = 1000  # a product past int8's range
    out = dense.clip(-128, 127).astype(np.int8)
    assert gpu_check.int8_mismatch(out, dense) == 0.0
    assert gpu_check.int8_mismatch(dense.astype(np.int32), dense) == 0.0
    wrapped = ((dense + 128) % 256 - 128).astype(np.int8)  # a kernel that wraps instead of saturating
    assert gpu_check.int8_mismatch(wrapped, dense) == 0.0
    bad = out.copy()
    bad[1, 1] += 1
    assert abs(gpu_check.int8_mismatch(bad, dense) - 1 / dense.size) < 1e-12


def test_table_has_a_precision_column(capsys) -> None:
    rows = [gpu_check.Row("a", "384x384", 2048, "cusparselt", "int8", 0.1, 0.2, 0.5, status="ok"),
            gpu_check.Row("b", "768x768", 2048, "cusparselt", status="ok")]  # fmt: skip
    gpu_check.print_rows(rows)
    lines = capsys.readouterr().out.splitlines()
    assert "precision" in lines[0] and " int8 " in lines[2] and " fp16 " in lines[3]
