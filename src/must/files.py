"""Files: writing them so that a reader never sees half of one, their checksums, and reading
weights from elsewhere without running code. One home for what model files, datasets, run
summaries and backbones all need (the pseudo-label store keeps its own copies: its reader is
one self-contained file)."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from must.errors import ConfigError

if TYPE_CHECKING:
    import torch

# Temporaries are named after their writer (host, process, a random part): two processes
# writing the same folder at once never write through, or rename away, each other's temporary.
HOST = hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path`` that no other writer uses: ``.NAME.HOST-PID-RANDOM.tmp``."""
    return path.with_name(f".{path.name}.{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` then rename ``tmp`` over ``path`` (same folder, so readers see the old
    file or the new one, never a part); the temporary is removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- weights files
# torch is imported when a torch file is read: writing a dataset does not need it.


def old_format_message(old: Path) -> str:
    return (
        f"{old}: an older pickled must model file, refused because loading a pickle can run "
        f"code; if you trust where it came from, convert it with: must convert-model {old} "
        "--out DIR"
    )


def read_metadata(file: Path) -> dict[str, str] | None:
    """The metadata of a safetensors file (its header only; no tensor is read)."""
    try:
        with safe_open(str(file), "pt") as f:
            return f.metadata()
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{file}: not a readable safetensors file: {err}") from err


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), "pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{file}: cannot read its tensors: {err}") from err


def torch_load(file: str | Path, what: str = "file", mmap: bool = False) -> Any:
    """``torch.load`` of a file from elsewhere, restricted to tensors and plain values
    (``weights_only=True``): a pickle that names any other Python object is refused, so
    loading never runs code. Every failure is one line naming the file."""
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"{file}: refused: this {what} holds Python objects other than tensors and plain "
            "values, and loading it could run code"
        ) from err
    except Exception as err:  # truncated, not a torch file, unreadable: name the file
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"{file}: cannot read this {what} (damaged or incomplete?): {first}"
        ) from err
