"""Checks on where a verb will write, made before any work starts, so that a bad ``--out``
costs one line instead of a traceback after minutes of training."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from must.errors import MustError


class OutputPathError(MustError):
    """An output path that cannot be written; the message starts with the path."""


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path.cwd()


def _probe_writable(folder: Path, shown: Path) -> None:
    # A real write, not os.access: it also catches read-only mounts, and it holds for root.
    try:
        fd, name = tempfile.mkstemp(prefix=".must-write-check-", dir=folder)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = "" if folder == shown else f" ({folder}: {reason.lower()})"
        raise OutputPathError(f"{shown}: not writable{where}") from err
    os.close(fd)
    os.unlink(name)


def output_dir(path: str | Path) -> Path:
    """``path`` is a folder, or one we can create; else one line naming it. An existing folder
    is not probed: a verb whose work is already done there writes nothing (and a write that
    fails later is still reported in one line by the CLI)."""
    path = Path(path)
    if path.is_dir():
        return path
    base = _existing_ancestor(path)
    if not base.is_dir():
        what = path if base == path else f"{path} (its parent {base})"
        raise OutputPathError(f"{what}: exists and is not a directory")
    _probe_writable(base, path)
    return path


def output_file(path: str | Path) -> Path:
    """``path`` names a file we can create or replace; else one line naming it."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path}: is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{path}: not writable")
    folder = path.parent
    if folder.is_dir():
        _probe_writable(folder, path)  # the file will be written: its folder must take it
    else:
        output_dir(folder)
    return path
