"""Class labels from class folders (ImageFolder: ``images/{split}/{class}/...``, with
per-class file numbering such as ``dog/001.png``, ``cat/001.png``) or from a class table
(``image class`` lines, e.g. ImageNet's ``LOC_val_solution.csv``)."""

from __future__ import annotations

from typing import Any

from must.data.readers.common import Entry, LabelSource, read_table, register_format
from must.data.spec import SplitSpec
from must.errors import DataError
from must.imageio import IMAGE_EXTENSIONS


@register_format("imagefolder")
class ClassLabels(LabelSource):
    def index(self, entries: dict[str, Entry]) -> None:
        r = self.reader
        self.labels: dict[str, int] = {}
        declared = r.spec.classes.get(self.task)
        own_rows = self._table(r.source) if self.source.labels else None
        if declared:
            names = list(declared)
        else:
            # Every split's classes, so that train and val agree on the indices even where a
            # class has no image in one of them.
            found = set()
            label_roots = r.label_roots()
            for split in r.spec.splits.values():
                src = getattr(split, self.task)
                if src is None:
                    continue
                if src.labels:
                    rows = own_rows if split is r.source else self._table(split)
                    found.update(c for _, _, c in rows)
                    continue
                split_root = r.base / split.images
                if split_root.is_dir():
                    found.update(
                        p.name
                        for p in split_root.iterdir()
                        if p.is_dir()
                        and not p.name.startswith(".")
                        and p.resolve() not in label_roots
                    )
            names = sorted(found)
        r.classes[self.task] = names
        index = {name: i for i, name in enumerate(names)}
        if own_rows is not None:
            return self._from_table(own_rows, index, names)
        outside = 0
        for entry in entries.values():
            parts = entry.image.relative_to(r.images_root).parts
            if len(parts) < 2:
                outside += 1
                continue
            label = index.get(parts[0])
            if label is None:
                r.problem(
                    entry.image,
                    f"class folder {parts[0]!r} is not among the declared {self.task} "
                    f"classes {names}",
                )
                r.bad.add(entry.key)
                continue
            self.labels[entry.key] = label
        if outside:
            r.notes.append(
                f"{self.task}: {outside} image(s) outside class folders (no class label)"
            )

    def _table(self, split: SplitSpec) -> list[tuple[int, str, str]]:
        """(line, image, class) rows of a split's labels file; a first line that names no
        image file of the split is a header, left out."""
        r = self.reader
        path = r.base / getattr(split, self.task).labels
        rows = []
        for number, fields in read_table(path, f"{self.task} labels file"):
            if len(fields) < 2 or not fields[1].split():
                raise DataError(path, f"line {number}: expected an image and a class")
            rows.append((number, fields[0], fields[1].split()[0]))
        if rows and split is r.source:
            header = r.match(rows[0][1])[0] is None
        elif rows:
            first = r.base / split.images / rows[0][1]
            names = [first, *(first.with_name(first.name + e) for e in IMAGE_EXTENSIONS)]
            names += [first.with_name(first.name + e.upper()) for e in IMAGE_EXTENSIONS]
            header = not any(n.is_file() for n in names)
        return rows[1:] if rows and header else rows

    def _from_table(self, rows, index: dict[str, int], names: list[str]) -> None:
        r = self.reader
        path = r.base / self.source.labels
        unmatched = 0
        for number, image, cls in rows:
            key, _ = r.match(image)
            if key is None:
                unmatched += 1
                continue
            where = f"line {number} ({image})"
            label = self.labels.get(key)
            if cls not in index:
                r.problem(path, f"{where}: class {cls!r} is not among the {self.task} classes")
                r.bad.add(key)
            elif label is not None and label != index[cls]:
                r.problem(path, f"{where}: image labelled twice ({names[label]}, {cls})")
                r.bad.add(key)
            else:
                self.labels[key] = index[cls]
        if unmatched:
            r.notes.append(
                f"{self.task}: {unmatched} line(s) of {path.name} name no image of this split"
            )

    def has(self, key: str) -> bool:
        return key in self.labels

    def read(
        self, entry: Entry, image_size: tuple[int, int], bad_anns: list | None, masks: bool
    ) -> dict[str, Any] | None:
        label = self.labels.get(entry.key)
        return None if label is None else {self.kind.label_keys[0]: label}

    def notes(self) -> list[str]:
        names = self.reader.classes.get(self.task)
        if names is not None and len(names) == 1:
            return [
                f"{self.task}: a single class ({names[0]!r}): this trains a classifier of "
                "one class, which learns nothing (one folder per class is expected)"
            ]
        return []
