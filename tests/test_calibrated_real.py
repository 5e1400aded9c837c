"""Calibrated pruning on real trained models (marked ``real``; skipped when a model cannot be fetched).

* magika (file-type classifier, int32 bytes ``[N, 2048]``): fed the bytes of files from the
  Python standard library, feature extraction as magika 1.0.3 does it (``standard_v3_3``
  config: the first 1024 bytes after ``lstrip()`` of the first 4096, padded after with 256;
  the last 1024 of the ``rstrip()``-ed last 4096, padded before). Calibrated on a quarter of
  the files, judged on the other three quarters: SparseGPT must agree with the dense model's
  top-1 label more often than magnitude pruning does.
* The benchmark (``ONNX_SPARSE_BENCH=1``): SparseGPT on MiniLM-L3 with 32 sentences and on
  PP-OCRv4 det with 8 images; prints the times.
"""

from __future__ import annotations

import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_sparse.calib.capture import inline_model, run_model
from onnx_sparse.io import load_model
from onnx_sparse.passes.calibrated import CalibratedPrunePass
from onnx_sparse.passes.prune import PrunePass

pytestmark = pytest.mark.real

_BEG, _END, _BLOCK, _PAD = 1024, 1024, 4096, 256
_PER_EXTENSION = 30


def magika_features(path: Path) -> np.ndarray:
    data = path.read_bytes()
    n = min(_BLOCK, len(data))
    head = data[:n].lstrip()[:_BEG]
    tail = data[len(data) - n :].rstrip()
    tail = tail[max(0, len(tail) - _END) :]
    return np.array(list(head) + [_PAD] * (_BEG - len(head)) + [_PAD] * (_END - len(tail)) + list(tail), np.int32)


def stdlib_files() -> list[Path]:
    """Up to 30 files (over 64 bytes) per file extension of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    by_ext: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            ext = path.suffix
            if not ext or path.is_symlink() or len(by_ext.setdefault(ext, [])) >= _PER_EXTENSION:
                continue
            if path.stat().st_size > 64:
                by_ext[ext].append(path)
    return [p for ext in sorted(by_ext) for p in by_ext[ext]]


def test_magika_sparsegpt_beats_magnitude_on_top1(real_model) -> None:
    mf = load_model(real_model("magika"))
    files = stdlib_files()
    calib = [magika_features(p) for i, p in enumerate(files) if i % 4 == 0]
    held = [magika_features(p) for i, p in enumerate(files) if i % 4 != 0]
    assert len(calib) > 100 and len(held) > 300
    feeds = [{"bytes": np.stack(calib[i : i + 16])} for i in range(0, len(calib), 16)]
    evaluation = [{"bytes": np.stack(held)}]

    def scores(model: onnx.ModelProto) -> np.ndarray:
        return next(run_model(model, evaluation))["target_label"]

    dense = scores(inline_model(mf))

    def top1(model: onnx.ModelProto) -> float:
        return float(np.mean(scores(model).argmax(1) == dense.argmax(1)))

    magnitude = top1(PrunePass()(mf).model.model)
    result = CalibratedPrunePass("sparsegpt", feeds)(mf)
    sparsegpt = top1(inline_model(result.model))
    assert {r.method for r in result.records} == {"sparsegpt"}
    assert sparsegpt > magnitude + 0.005, (sparsegpt, magnitude)


def _bench_enabled() -> bool:
    return os.environ.get("ONNX_SPARSE_BENCH") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not _bench_enabled(), reason="benchmark: set ONNX_SPARSE_BENCH=1")
def test_benchmark_sparsegpt_minilm_and_det(real_model, capsys) -> None:
    from skimage import data as skdata
    from skimage import transform
    from tokenizers import Tokenizer

    from tools.realmodels import tokenizer_json

    tok = Tokenizer.from_file(str(tokenizer_json()))
    tok.no_padding()
    tok.enable_truncation(max_length=128)
    docs = [m.__doc__ or "" for m in (os, time, sysconfig, np, onnx, pytest)]
    sentences = [" ".join(s.split()) for d in docs for s in d.split(".") if 20 < len(" ".join(s.split())) < 300][:32]
    minilm = [
        {"input_ids": np.array([e.ids], np.int64), "attention_mask": np.array([e.attention_mask], np.int64)}
        for e in tok.encode_batch(sentences)
    ]
    images = []
    for name in ("page", "text", "coffee", "chelsea", "astronaut", "camera", "rocket", "hubble_deep_field"):
        img = getattr(skdata, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        img = transform.resize(img.astype(np.float32) / 255, (640, 640), anti_aliasing=True).astype(np.float32)
        img = (img - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        images.append({"x": np.ascontiguousarray(img.transpose(2, 0, 1)[None])})
    lines = []
    for name, feeds in (("minilm_l3", minilm), ("ppocr_det", images)):
        mf = load_model(real_model(name))
        start = time.perf_counter()
        CalibratedPrunePass("sparsegpt", feeds)(mf)
        lines.append(f"{name}: sparsegpt on {len(feeds)} samples in {time.perf_counter() - start:.1f}s")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
