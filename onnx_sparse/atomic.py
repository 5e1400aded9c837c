"""Temporary files and folders beside an output, and the cleanup of ones a killed run left.

Every output is first written under a hidden temporary name in the output's own folder
(``.onnx-sparse-<pid>-<host>-XXXX``) and renamed into place when complete, so a reader never
sees half a file. The process id and a tag of the host are in the name: a later run in the
same folder removes the temporaries of processes on this host that no longer exist (a
``kill -9``, a power cut), and reports other old ones it cannot judge. SIGTERM is turned into
a clean exit by the CLI, so ``finally`` blocks remove the temporaries of a terminated run.

Files we create get the permissions the umask gives (like ``open()``), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from onnx_sparse.errors import OnnxSparseError

__all__ = ["PREFIX", "temp_dir", "temp_file", "clean_stale", "others_writing", "umask_mode"]

logger = logging.getLogger(__name__)

PREFIX = ".onnx-sparse-"
_STALE_NOTICE_S = 24 * 3600
_NAME = re.compile(re.escape(PREFIX) + r"(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{6})-")


def _host_tag() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()


def _prefix() -> str:
    return f"{PREFIX}{os.getpid()}-{_host_tag()}-"


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process umask applied (what ``open()`` would give a new file)."""
    current = os.umask(0o022)
    os.umask(current)
    return mode & ~current


def temp_dir(folder: Path) -> Path:
    """A new private temporary folder inside ``folder`` (named with our pid and host)."""
    try:
        return Path(tempfile.mkdtemp(prefix=_prefix(), dir=folder))
    except OSError as exc:
        raise OnnxSparseError(f"{folder}: cannot create a temporary folder ({exc.strerror})") from exc


def temp_file(folder: Path, suffix: str = "") -> tuple[int, Path]:
    """A new temporary file inside ``folder`` (open fd and path), with umask permissions."""
    try:
        fd, name = tempfile.mkstemp(prefix=_prefix(), suffix=suffix, dir=folder)
    except OSError as exc:
        raise OnnxSparseError(f"{folder}: cannot create a temporary file ({exc.strerror})") from exc
    if hasattr(os, "fchmod"):  # POSIX; elsewhere mkstemp's mode is what the platform gives
        os.fchmod(fd, umask_mode())
    return fd, Path(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OverflowError:
        return False
    return True


def others_writing(folder: Path) -> bool:
    """Whether ``folder`` holds a temporary of another run (a live one, one of another host, or one
    whose owner cannot be told): that run may be between placing a file and renaming its model."""
    try:
        names = [e.name for e in os.scandir(folder) if e.name.startswith(PREFIX)]
    except OSError:
        return True
    mine = _prefix()
    return any(not name.startswith(mine) for name in names)


def clean_stale(folder: Path) -> list[Path]:
    """Remove our temporaries in ``folder`` left by dead processes of this host; returns them.

    Temporaries that are not provably dead (another host, an older naming) are only reported
    (a warning) once they are older than a day.
    """
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(PREFIX)]
    except OSError:
        return removed
    host = _host_tag()
    for entry in entries:
        m = _NAME.match(entry.name)
        path = Path(entry.path)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            if not path.exists():
                removed.append(path)
                logger.info("removed %s, left behind by a killed onnx-sparse run", path)
            continue
        with contextlib.suppress(OSError):
            if time.time() - entry.stat(follow_symlinks=False).st_mtime > _STALE_NOTICE_S:
                logger.warning("%s looks like a temporary left by an interrupted onnx-sparse run; remove it", path)
    return removed
