"""The README and DESIGN.md stand on their own, and the glossary explains the words our output uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "DESIGN.md")

# Words that tables and log lines print, each with a piece of source that prints it.
WORDS = {
    "yes (large)": "onnx_sparse/cli/inspect.py",
    "source": "onnx_sparse/cli/inspect.py",
    "layout": "onnx_sparse/cli/inspect.py",
    "annotations": "onnx_sparse/cli/inspect.py",
    "groups changed": "onnx_sparse/cli/prune.py",
    "retained |w|": "onnx_sparse/cli/prune.py",
    "groups > 2 of 4": "onnx_sparse/cli/check.py",
    "refit damp": "onnx_sparse/passes/calibrated.py",
    "by cross-validation": "onnx_sparse/passes/calibrated.py",
    "loss": "onnx_sparse/passes/calibrated.py",
    "rows": "onnx_sparse/passes/calibrated.py",
    "padding left out": "onnx_sparse/passes/calibrated.py",
    "coverage": "onnx_sparse/passes/sensitivity.py",
    "rel L2": "onnx_sparse/cli/compare.py",
    "max |err|": "onnx_sparse/cli/compare.py",
    "top-1": "onnx_sparse/cli/compare.py",
    "(p)": "onnx_sparse/cli/compare.py",
    "elemwise": "onnx_sparse/cli/compare.py",
    "RANDOM data": "onnx_sparse/calib/data.py",
}


def _glossary() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Glossary")
    end = text.index("\n## ", start + 1)
    return text[start:end].replace("\\|", "|")


@pytest.mark.parametrize("doc", DOCS)
def test_docs_point_only_at_files_a_clone_has(doc: str) -> None:
    text = (REPO / doc).read_text()
    assert "../shared" not in text and "/work/" not in text
    for path in re.findall(r"`((?:tools|tests|models|onnx_sparse|\.ci)/[\w./-]+)`", text):
        path = path.split(":")[0]
        assert (REPO / path).exists(), f"{doc} names {path}, which the repository does not have"


def test_readme_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert "pip install -e '.[eval]' && python tools/demo.py" in text
    assert "pip install -e '.[dev]' && python -m pytest -q" in text
    assert "[dev,eval]" not in text
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -e '.[dev]' && python -m pytest -q" in ci


@pytest.mark.parametrize("word", sorted(WORDS))
def test_glossary_explains_every_word_we_print(word: str) -> None:
    source = (REPO / WORDS[word]).read_text()
    assert word.split(" (")[0].split(" |")[0] in source, f"{word!r} is no longer printed by {WORDS[word]}"
    assert word in _glossary(), f"the README glossary does not explain {word!r}"
