"""Atomic writes: a reader sees the old file (or directory) or the complete new one, never a half-written one."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Callable


def write_file_atomic(path: Path, write: Callable[[IO], None], *, text: bool = False) -> Path:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then rename it onto ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8", "newline": ""} if text else {})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def replace_directory(staged: Path, final: Path) -> Path:
    """Move the complete directory ``staged`` to ``final``, replacing what is there (moved aside, then removed).

    ``staged`` must be on the same file system as ``final`` (make it a sibling).
    """
    staged, final = Path(staged), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def staging_directory(final: Path) -> Path:
    """A new empty sibling of ``final`` to build a directory in before :func:`replace_directory`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp
