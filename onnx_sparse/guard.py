"""Checks every command runs before any work: no output may replace an input or another output.

:func:`check_run_paths` takes every file a run will read (models and, through their external
data entries, their data files; calibration and saved-output JSON; scripts) and every file it
will write (``-o``, the model's data file, ``--report``, ``--json``, ``--save-outputs``, ...)
and refuses, with one line naming both, any write that is the same file as a read (symlinks and
hard links included) or as another write. It also checks what is cheap to check and costly to
find out late: each output folder exists and is writable, and each JSON input decodes (no
pickles: onnx-sparse never unpickles; no nesting deep enough to exhaust the stack).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from onnx_sparse.atomic import check_writable_folder
from onnx_sparse.errors import OnnxSparseError, first_line

if TYPE_CHECKING:
    from onnx_sparse.io import ModelFile

__all__ = ["check_run_paths", "check_json_input"]

_FOLDER_OUTPUTS = ("--save-inputs",)  # Polygraphy writes one file per iteration into a folder path
_PICKLE_MAGIC = (b"\x80", b"(dp", b"(lp", b"cnumpy")

Labelled = tuple[str, "str | os.PathLike[str] | None"]


def _key(path: Path) -> tuple[str, object]:
    """Identity of a file: (device, inode) if it exists, else its resolved path."""
    try:
        st = path.stat()
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(path)))
    return ("inode", (st.st_dev, st.st_ino))


def check_json_input(path: str | os.PathLike[str], what: str) -> None:
    """Refuse a JSON input that is not UTF-8 JSON, is a pickle, or nests too deep to decode.

    A folder (Polygraphy's per-iteration layout) is checked file by file.
    """
    p = Path(path)
    if p.is_dir():
        for child in sorted(p.glob("*.json")):
            check_json_input(child, what)
        return
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise OnnxSparseError(f"{what} {p}: cannot read ({exc.strerror})", hint="check the path") from None
    if raw.lstrip()[:5].startswith(_PICKLE_MAGIC):
        raise OnnxSparseError(
            f"{what} {p}: looks like a Python pickle; onnx-sparse reads JSON only and never unpickles",
            hint="save the data with `polygraphy run --save-inputs` or polygraphy.json.save_json",
        )
    try:
        json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise OnnxSparseError(
            f"{what} {p}: JSON nested too deeply to decode", hint="the file is not Polygraphy JSON"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise OnnxSparseError(
            f"{what} {p}: not valid JSON ({first_line(exc)})",
            hint="the file must be Polygraphy JSON, e.g. written by `polygraphy run --save-inputs`",
        ) from None


def check_run_paths(
    *,
    models: Sequence[str | os.PathLike[str] | None] = (),
    reads: Sequence[Labelled] = (),
    json_reads: Sequence[Labelled] = (),
    writes: Sequence[Labelled] = (),
    model_output: str | os.PathLike[str] | None = None,
    in_place: bool = False,
) -> list[ModelFile]:
    """Refuse a run whose outputs would replace one of its inputs or each other.

    Args:
        models: ONNX models the run reads (their external data files are read too).
        reads: other files the run reads, as (option, path).
        json_reads: JSON files (or folders of them) the run reads, also checked by :func:`check_json_input`.
        writes: files the run writes, as (option, path); None entries are skipped.
        model_output: the model the run writes (its data files, ``<name>.<hash>.data``, are outputs too).
        in_place: the model output may be the (first) input model.

    Returns:
        The models, loaded (external data checked, not read), in order, None entries left out: a
        caller that needs them uses these rather than parsing the files again.

    Raises:
        OnnxSparseError: one line naming the option and the file, before any work is done.
    """
    from onnx_sparse.io import data_files, load_model

    read_keys: dict[tuple[str, object], str] = {}
    loaded: list[ModelFile] = []
    for m in models:
        if m is None:
            continue
        mf = load_model(m)  # refuses foreign, short or inconsistent external data
        loaded.append(mf)
        read_keys.setdefault(_key(Path(m)), f"the input model {m}")
        for f in sorted(data_files(mf)):
            read_keys.setdefault(_key(f), f"the external data file {f} of {m}")
    for what, p in json_reads:
        if p is not None:
            check_json_input(p, what)
    for what, p in [*reads, *json_reads]:
        if p is not None:
            read_keys.setdefault(_key(Path(p)), f"{what} {p}")
    model_key = _key(Path(models[0])) if models and models[0] is not None else None

    all_writes = [(w, Path(p)) for w, p in writes if p is not None]
    if model_output is not None:
        all_writes.insert(0, ("-o", Path(model_output)))
    seen: dict[tuple[str, object], str] = {}
    data_name = None
    if model_output is not None:  # the output model's data files: <name>.<hash>.data (and the older <name>.data)
        out = Path(model_output)
        data_name = (os.path.realpath(out.parent), re.compile(re.escape(out.name) + r"(\.[0-9a-f]{16})?\.data"))
    for what, p in all_writes:
        check_writable_folder(p, what, folder_ok=what in _FOLDER_OUTPUTS)
        key = _key(p)
        if key in read_keys and not (in_place and what == "-o" and key == model_key):
            raise OnnxSparseError(
                f"{what} {p}: refusing to overwrite {read_keys[key]}",
                hint="write to another path"
                + (" (or pass --in-place to replace the model)" if key == model_key else ""),
            )
        if key in seen:
            raise OnnxSparseError(f"{what} {p} is the same file as {seen[key]}", hint="give each output its own path")
        if what != "-o" and data_name and data_name[0] == os.path.realpath(p.parent) and data_name[1].fullmatch(p.name):
            raise OnnxSparseError(
                f"{what} {p} is named like the data file of the output model", hint="write to another path"
            )
        seen[key] = f"{what} {p}"
    return loaded
