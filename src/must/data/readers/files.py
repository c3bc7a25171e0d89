"""Dense per-image label files (class-map PNGs, 16-bit depth PNGs in millimetres as NYU and
TUM store them, normals PNGs or .npy): found in a label folder mirroring the images folder
(else by file stem), or listed in a pairs file (TUM ``associations.txt``). Each file is
decoded by its task's ``read_label_file``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from must.data.readers.common import (
    Entry,
    LabelSource,
    listing,
    read_table,
    register_format,
    rel_key,
    walk_files,
)
from must.errors import ConfigError, DataError
from must.imageio import IMAGE_EXTENSIONS
from must.tasks.base import Task


@register_format("png", "png16", "npy")
class LabelFiles(LabelSource):
    def index(self, entries: dict[str, Entry]) -> None:
        """Label files matched to images by their path under the label folder (mirroring the
        image tree), else by file stem; or listed in a pairs file."""
        r, task, src = self.reader, self.task, self.source
        if self.kind.read_label_file.__func__ is Task.read_label_file.__func__:
            raise ConfigError(
                f"{r.manifest}: {task} labels are asked for, but "
                + self.kind.file_hook_missing("read_label_file")
            )
        self.files: dict[str, Path] = {}
        self.classes: list[str] = []
        if self.kind.needs_classes:
            names = r.spec.classes.get(task)
            if not names:
                raise ConfigError(
                    f"{r.manifest}: classes.{task} is required (the class maps hold "
                    "only indices): list the class names in index order"
                )
            self.classes = r.classes[task] = list(names)
        ext = self.kind.label_file_suffix(src)
        if getattr(src, "pairs", None) is not None:
            return self._index_pairs(entries, r.base / src.pairs, ext)
        root = r.base / src.root
        if not root.is_dir():
            msg = f"{task}: label folder {root} not found; no image has {task} labels"
            r.notes.append(msg)
            r.no_labels_noted.add(task)
            warnings.warn(msg, stacklevel=3)
            return
        every = walk_files(root, ("",))
        found: dict[str, Path] = {}
        by_stem: dict[str, list[Path]] = {}
        for path in every:
            if path.suffix.lower() != ext:
                continue
            key = r.by_rel.get(rel_key(path, root))
            if key is not None and key not in found:
                found[key] = path
            else:
                by_stem.setdefault(path.stem, []).append(path)
        for stem, paths in by_stem.items():
            keys = [k for k in r.by_stem.get(stem, []) if k not in found]
            if not keys:
                continue  # a label of an image of another split (or none)
            if len(keys) > 1:
                r.problem(
                    paths[0],
                    f"{task} label file matches {len(keys)} images by file stem "
                    f"({listing([str(entries[k].image) for k in keys])}); put the label files "
                    f"in folders that mirror the images folder",
                )
                continue
            if len(paths) > 1:
                problem = f"duplicate {task} label file stem {stem!r}: " + " and ".join(
                    map(str, paths)
                )
                for path in paths[1:]:
                    r.problem(path, problem)
                r.bad.add(keys[0])
                continue
            found[keys[0]] = paths[0]
        self.files.update(found)
        # A label file of another format for an image of this split would otherwise be
        # ignored without a word (e.g. a depth .npy where the source says png16).
        for path in every:
            if path.suffix.lower() == ext:
                continue
            key = r.by_rel.get(rel_key(path, root))
            if key is None:
                key, _ = r.match(path.name)
            if key is not None and key not in found:
                r.problem(
                    path,
                    f"{task} label file is not a {ext} file (the dataset description says "
                    f"{task} format {src.format!r}): convert it, or change the format",
                )
                r.bad.add(key)

    def _index_pairs(self, entries: dict[str, Entry], path: Path, ext: str) -> None:
        """A pairs file: ``image label`` per line (TUM ``associations.txt``: ``time image
        time label``; either order; a CSV of two columns). Paths are relative to the file."""
        r, task = self.reader, self.task
        unmatched = 0
        first = True
        for number, fields in read_table(path, "pairs file"):
            names = [fields[1], fields[3]] if len(fields) == 4 else fields
            if len(names) != 2:
                raise DataError(
                    path,
                    f"line {number}: expected 'image {task}' or 'time image time {task}' "
                    f"(got {len(fields)} fields)",
                )
            header, first = first and not names[0].lower().endswith(IMAGE_EXTENSIONS), False
            if header:
                continue
            a, b = (path.parent / n for n in names)
            key, _ = r.match_path(a)
            label = b
            if key is None:
                key, _ = r.match_path(b)
                label = a
            if key is None:
                unmatched += 1
                continue
            where = f"line {number}"
            if key in self.files:
                r.problem(path, f"{where}: image {entries[key].image} is paired twice")
                r.bad.add(key)
            elif label.suffix.lower() != ext:
                r.problem(path, f"{where}: {task} file {label} is not a {ext} file")
                r.bad.add(key)
            elif not label.is_file():
                r.problem(path, f"{where}: {task} file {label} not found")
                r.bad.add(key)
            else:
                self.files[key] = label
        if unmatched:
            r.notes.append(
                f"{task}: {unmatched} line(s) of {path.name} name no image of this split"
            )

    def has(self, key: str) -> bool:
        return key in self.files

    def read(
        self, entry: Entry, image_size: tuple[int, int], bad_anns: list | None, masks: bool
    ) -> dict[str, Any] | None:
        path = self.files.get(entry.key)
        if path is None:
            return None
        return self.kind.read_label_file(path, image_size, self.source, self.classes)
