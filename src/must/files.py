"""Writing files so that a reader never sees half of one, and their checksums: one home for
what the model files, datasets, run summaries and the pseudo-label store all need."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

# Temporaries are named after their writer (host, process, a random part): two processes
# writing the same folder at once never write through, or rename away, each other's temporary.
HOST = hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def temporary_name(path: Path, hidden: bool = True) -> Path:
    """A name beside ``path`` that no other writer uses: ``[.]NAME.HOST-PID-RANDOM.tmp``
    (the store keeps its temporaries visible, so that it can find and clean its own)."""
    dot = "." if hidden else ""
    return path.with_name(f"{dot}{path.name}.{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to disk (best effort: some filesystems cannot)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(
    path: str | Path, write: Callable[[Path], object], fsync: bool = False, hidden: bool = True
) -> Path:
    """``write(tmp)`` then rename ``tmp`` over ``path`` (same folder, so readers see the old
    file or the new one, never a part); the temporary is removed on any failure. ``fsync``
    flushes the bytes before the rename, for files a crash must not leave empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, hidden)
    try:
        write(tmp)
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(
    path: str | Path, data: bytes, fsync: bool = False, hidden: bool = True
) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), fsync, hidden)


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
