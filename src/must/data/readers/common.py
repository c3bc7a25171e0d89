"""What every label format shares: the image index entries, file walking and keys, tables,
and :class:`LabelSource`, the small protocol each format implements."""

from __future__ import annotations

import csv
import math
import os
import posixpath
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from must.errors import DataError
from must.tasks import TASK_TYPES

if TYPE_CHECKING:
    from must.data.readers.dataset import MultiTaskDataset


@dataclass
class Entry:
    """One image of the split."""

    key: str
    image: Path


def listing(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` names, and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def strip_ext(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def rel_key(path: Path, root: Path) -> str:
    """``path`` under ``root`` without its extension, '/'-separated: ``cat/0001``."""
    return strip_ext(path.relative_to(root).as_posix())


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def walk_files(
    root: Path, extensions: tuple[str, ...], prune: frozenset[Path] | set[Path] = frozenset()
) -> list[Path]:
    """Files under ``root`` with one of ``extensions`` (any case), sorted by relative path;
    dot files and folders and the (resolved) folders in ``prune`` are left out. Symbolic links
    to files and folders are followed (each real folder is entered once: no loops); the paths
    returned stay under ``root`` as written, links unresolved."""
    found = []
    visited: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in visited:
            dirs[:] = []  # a link back to a folder already walked
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs[:] = [
            d for d in dirs if not d.startswith(".") and Path(folder, d).resolve() not in prune
        ]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(Path(folder, name))
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


def image_keys(files: Sequence[Path], root: Path) -> list[str]:
    """The sample key of each image file under ``root``: its file stem, or, where several of
    ``files`` share a stem (per-class numbering), its path under ``root`` without extension."""
    stems = Counter(p.stem for p in files)
    return [p.stem if stems[p.stem] == 1 else rel_key(p, root) for p in files]


def read_table(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a text or CSV file; blank lines and ``#`` comments left
    out. Fields are comma-separated in ``.csv`` files (and lines with a comma), else
    whitespace-separated."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(path, f"{what} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read the {what}: {err}") from err
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if path.suffix.lower() == ".csv" or "," in line:
            fields = [f.strip() for f in next(csv.reader([line]))]
        else:
            fields = line.split()
        rows.append((number, fields))
    return rows


class LabelSource:
    """The labels of one task in one format, for the images of one split: ``index`` finds
    them (problems go through the reader: raised, or skipped), ``has`` says which images have
    one, ``read`` decodes one image's as NumPy entries (sample-dict keys of the task)."""

    def __init__(self, reader: MultiTaskDataset, task: str) -> None:
        self.reader = reader
        self.task = task
        self.kind = TASK_TYPES[task]
        self.source = getattr(reader.source, task)
        self.path: Path | None = None  # the one label file annotation problems name, if any

    def index(self, entries: dict[str, Entry]) -> None:
        raise NotImplementedError

    def has(self, key: str) -> bool:
        raise NotImplementedError

    def read(
        self,
        entry: Entry,
        image_size: tuple[int, int],
        bad_anns: list | None,
        masks: bool,
    ) -> dict[str, Any] | None:
        """``image_size`` is (W, H). None when the image has no label of this task. Annotation
        problems are raised, or appended to ``bad_anns`` as (position, problem)."""
        raise NotImplementedError

    def drop_annotations(self, key: str, labels: dict[str, Any]) -> None:
        """Keep only the annotations ``labels`` (this source's ``read``) holds."""

    def notes(self) -> list[str]:
        """Warnings about legal but suspicious labels, once the images are chosen."""
        return []

    def summary(self, keys: list[str]) -> str:
        """More of the report's line for this task (``, 4 boxes``), over the kept ``keys``."""
        return ""

    def clear(self) -> None:
        """Forget every label (the task's annotation file is unusable)."""


# The reader of each label format a dataset description may name (a source's ``format:``).
FORMATS: dict[str, type[LabelSource]] = {}


def register_format(*names: str):
    """Class decorator: ``cls`` (a :class:`LabelSource`) reads the labels of sources whose
    ``format`` is one of ``names``; a name already taken is refused."""

    def add(cls: type[LabelSource]) -> type[LabelSource]:
        for name in names:
            if name in FORMATS:
                raise ValueError(f"label format {name!r} is registered twice")
            FORMATS[name] = cls
        return cls

    return add
