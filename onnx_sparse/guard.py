"""Checks every command runs before any work: no output may replace an input or another output.

:func:`output_path` is the one rule for a path a command will write: its folder, as written,
must exist (the operating system resolves it, so ``nosuchdir/../m.onnx`` is refused rather
than read as ``m.onnx``), be a folder and be writable; the path is then resolved once, and
that resolved path is both what is compared here and what the writers (``save_model``,
``write_json``) write.

:func:`check_run_paths` takes every file a run will read (models and, through their external
data entries, their data files; calibration and saved-output JSON; scripts) and every file it
will write (``-o``, the model's data file, ``--report``, ``--json``, ``--save-outputs``, ...)
and refuses, with one line naming both, any write that is the same file as a read (symlinks and
hard links included) or as another write. Models are compared by the identity of the file that
was opened and read, not by their path. It also checks what is cheap to check and costly to
find out late: each JSON input decodes (no pickles: onnx-sparse never unpickles; no nesting
deep enough to exhaust the stack).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from onnx_sparse.errors import OnnxSparseError, first_line

if TYPE_CHECKING:
    from onnx_sparse.io import ModelFile

__all__ = ["check_run_paths", "check_json_input", "output_path"]

_FOLDER_OUTPUTS = ("--save-inputs",)  # Polygraphy writes one file per iteration into a folder path
_PICKLE_MAGIC = (b"\x80", b"(dp", b"(lp", b"cnumpy")

Labelled = tuple[str, "str | os.PathLike[str] | None"]


def output_path(path: str | os.PathLike[str], what: str = "output", folder_ok: bool = False) -> Path:
    """The resolved path a command writes for ``path``: the one rule for every output.

    The folder is taken as written and resolved by the operating system: it must exist (a
    missing component is refused even when a ``..`` after it would cancel it out), be a
    folder and be writable. The result is the folder's real path joined with the file name,
    so the guard compares, and the writers write, the same file. Unless ``folder_ok``, the
    path must not name a folder.

    Raises:
        OnnxSparseError: one line naming the option and the path, with a hint.
    """
    out = Path(path)
    if out.name in ("", ".", ".."):
        raise OnnxSparseError(f"{out}: not a file name ({what})", hint="give a file path, e.g. out/model.onnx")
    written = out.parent  # Path("m.onnx").parent is Path(".")
    try:
        st = os.stat(written)  # the OS walks the folder as written: nosuchdir/.. fails here
    except (FileNotFoundError, NotADirectoryError):
        missing = _first_missing(written)
        raise OnnxSparseError(
            f"{out}: output folder does not exist ({what})",
            hint=f"{missing} is not there: create it, or give a path without it",
        ) from None
    except OSError as exc:
        raise OnnxSparseError(
            f"{out}: output folder {written} cannot be used ({exc.strerror or exc}) ({what})",
            hint="choose another path",
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise OnnxSparseError(f"{out}: {written} is not a folder ({what})", hint="choose another path")
    folder = Path(os.path.realpath(written))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxSparseError(f"{out}: output folder {folder} is not writable ({what})", hint="choose another path")
    final = folder / out.name
    if final.is_dir() and not folder_ok:
        raise OnnxSparseError(f"{out}: is a folder ({what})", hint="give a file path")
    return final


def _first_missing(folder: Path) -> Path:
    """The shortest leading part of ``folder`` (as written) that is not an existing folder."""
    part = Path(folder.anchor) if folder.is_absolute() else Path()
    for name in folder.parts[1 if folder.is_absolute() else 0 :]:
        part = part / name
        if not part.is_dir():
            return part
    return folder


def _key(path: Path) -> tuple[str, object]:
    """Identity of a file: (device, inode) if it exists, else its path (already resolved)."""
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
    if raw.lstrip().startswith(_PICKLE_MAGIC):
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
    models: Sequence[str | os.PathLike[str] | ModelFile | None] = (),
    reads: Sequence[Labelled] = (),
    json_reads: Sequence[Labelled] = (),
    writes: Sequence[Labelled] = (),
    model_output: str | os.PathLike[str] | None = None,
    in_place: bool = False,
) -> list[ModelFile]:
    """Refuse a run whose outputs would replace one of its inputs or each other.

    Args:
        models: ONNX models the run reads (their external data files are read too): paths, or
            models :func:`onnx_sparse.io.load_model` already loaded (not read again).
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
    from onnx_sparse.io import ModelFile, load_model

    read_keys: dict[tuple[str, object], str] = {}
    loaded: list[ModelFile] = []
    model_key = None
    for m in models:
        if m is None:
            continue
        mf = m if isinstance(m, ModelFile) else load_model(m)  # refuses foreign, short or inconsistent data
        loaded.append(mf)
        label = mf.path if mf.path is not None else "(in memory)"
        # the file that was opened and read, whatever its path points at now
        key = ("inode", mf.ident) if mf.ident is not None else _key(mf.path) if mf.path is not None else None
        model_key = key if model_key is None else model_key
        if key is not None:
            read_keys.setdefault(key, f"the input model {label}")
        for f, version in sorted(mf.data_ids.items()):
            read_keys.setdefault(("inode", version[:2]), f"the external data file {f} of {label}")
    for what, p in json_reads:
        if p is not None:
            check_json_input(p, what)
    for what, p in [*reads, *json_reads]:
        if p is not None:
            read_keys.setdefault(_key(Path(p)), f"{what} {p}")

    all_writes = [(w, p) for w, p in writes if p is not None]
    if model_output is not None:
        all_writes.insert(0, ("-o", model_output))
    seen: dict[tuple[str, object], str] = {}
    data_name = None
    if model_output is not None:  # the output model's data files: <name>.<hash>.data (and the older <name>.data)
        out = output_path(model_output, "-o")
        data_name = (out.parent, re.compile(re.escape(out.name) + r"(\.[0-9a-f]{16})?\.data"))
    for what, written in all_writes:
        p = output_path(written, what, folder_ok=what in _FOLDER_OUTPUTS)
        key = _key(p)
        if key in read_keys and not (in_place and what == "-o" and key == model_key):
            raise OnnxSparseError(
                f"{what} {written}: refusing to overwrite {read_keys[key]}",
                hint="write to another path"
                + (" (or pass --in-place to replace the model)" if key == model_key else ""),
            )
        if key in seen:
            raise OnnxSparseError(
                f"{what} {written} is the same file as {seen[key]}", hint="give each output its own path"
            )
        if what != "-o" and data_name and data_name[0] == p.parent and data_name[1].fullmatch(p.name):
            raise OnnxSparseError(
                f"{what} {written} is named like the data file of the output model", hint="write to another path"
            )
        seen[key] = f"{what} {written}"
    return loaded
