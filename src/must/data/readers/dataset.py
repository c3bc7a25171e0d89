"""The reader of one split: images indexed once, each task's labels from its format's
:class:`~must.data.readers.common.LabelSource`, composed into sample dicts."""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from tqdm import tqdm

# The built-in formats register themselves on import.
import must.data.readers.classes
import must.data.readers.coco
import must.data.readers.files  # noqa: F401
from must.data.readers.common import (
    FORMATS,
    Entry,
    LabelSource,
    image_keys,
    listing,
    rel_key,
    strip_ext,
    walk_files,
)
from must.data.spec import TASKS, find_manifest, load_spec
from must.errors import ConfigError, DataError
from must.imageio import IMAGE_EXTENSIONS, read_image
from must.tasks import TASK_TYPES

_MAX_LISTED_SKIPS = 50


class MultiTaskDataset(Dataset):
    """Samples of one split as dicts of TVTensors (see the module docstring for the layout).

    A sample holds ``key``, ``image`` (uint8 (3, H, W) RGB) and, for each task labelled for that
    image: ``classification`` (int64 scalar), ``boxes`` (XYXY float32 (N, 4)), ``box_labels``
    (int64 (N,)), ``instance_masks`` (uint8 (N, H, W)), ``segmentation`` (int64 (H, W), the
    ignore value where unlabelled), ``depth`` (float32 (1, H, W) metres, 0 = invalid),
    ``normals`` (float32 (3, H, W), 0 = invalid). ``transform`` is applied to the dict.

    ``on_error="raise"``: the constructor checks what is cheap (the annotations, which files
    exist) and ``__getitem__`` raises a :class:`DataError` naming the file it cannot decode.
    ``on_error="skip"``: the constructor also decodes every file once, drops what is bad (a bad
    annotation alone, or the whole sample for a bad image or label file) and lists it in
    ``skipped`` as (file, reason); ``report()`` summarises.

    ``tasks`` restricts the labels read (default: every task the split describes).
    ``subset`` keeps a seeded random subset of the images (a count, or a fraction in (0, 1]);
    ``subset`` is then ``{"images", "of", "seed"}`` on the reader, else None.
    ``masks``: decode ``instance_masks`` (off by default: no head reads them, and decoding
    every mask of every image is costly; drawing and random crops ask for them). Without
    them, skip mode checks each mask's structure without decoding it.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        tasks: list[str] | None = None,
        show_progress: bool = False,
        subset: int | float | None = None,
        subset_seed: int = 0,
        masks: bool = False,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.manifest = find_manifest(root)
        spec, base = load_spec(self.manifest)
        if split not in spec.splits:
            raise ConfigError(
                f"{self.manifest}: no split {split!r}; available splits: "
                f"{', '.join(spec.splits) or '(none)'}"
            )
        if tasks is not None:
            unknown = [t for t in tasks if t not in TASKS]
            if unknown:
                raise ConfigError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
        self.spec = spec
        self.name = spec.name
        self.split = split
        self.base = base
        self.transform = transform
        self.on_error = on_error
        self.masks = masks
        self.resize = "square"  # how training fits the images (make_dataset decides)
        self.skipped: list[tuple[str, str]] = []
        self.notes: list[str] = []  # warnings: legal but suspicious data
        self.unusable: dict[str, str] = {}  # task -> why its labels could not be used at all
        self.source = spec.splits[split]
        self.tasks = [t for t in self.source.tasks() if tasks is None or t in tasks]
        self.images_root = base / self.source.images
        self.classes: dict[str, list[str]] = {}
        self.json_cache: dict[Path, Any] = {}  # COCO files read once per reader
        self.bad: set[str] = set()  # keys whose sample is dropped
        self.no_labels_noted: set[str] = set()

        entries = self._index_images()
        self._sources: dict[str, LabelSource] = {}
        for task in self.tasks:
            if TASK_TYPES[task].source_type is None:
                raise ConfigError(
                    f"{self.manifest}: {TASK_TYPES[task].file_hook_missing('source_type')}"
                )
            fmt = getattr(getattr(self.source, task), "format", None)
            if fmt not in FORMATS:
                raise ConfigError(
                    f"{self.manifest}: splits.{split}.{task}.format {fmt!r} has no reader; "
                    f"known formats: {', '.join(FORMATS)}"
                )
            self._sources[task] = FORMATS[fmt](self, task)
        for task in list(self.tasks):
            self._sources[task].index(entries)
        self.json_cache.clear()
        self._entries = [e for e in entries.values() if e.key not in self.bad]
        self.subset: dict[str, int] | None = None
        self.num_unselected = 0
        if subset is not None:
            self._take_subset(subset, subset_seed)
        if on_error == "skip":
            self._validate(show_progress)
        self._warn_suspicious()

    # ----------------------------------------------------------------------------- indexing

    def _take_subset(self, subset: int | float, seed: int) -> None:
        """Keep a random subset of the indexed images: ``subset`` images (an int) or that
        fraction of them (a float in (0, 1]). The draw ranks keys by a seeded hash, so a seed
        always picks the same images, and adding files to the folder keeps most of them."""
        available = len(self._entries)
        if isinstance(subset, float):
            if not 0 < subset <= 1:
                raise ConfigError(f"subset fraction must be in (0, 1], got {subset}")
            wanted = max(1, round(available * subset))
        else:
            if subset < 1:
                raise ConfigError(f"subset must be at least 1 image, got {subset}")
            wanted = subset
        if wanted < available:
            rank = sorted(
                range(available),
                key=lambda i: hashlib.blake2b(
                    f"{seed}\0{self._entries[i].key}".encode(), digest_size=8
                ).digest(),
            )
            chosen = set(rank[:wanted])
            self._entries = [e for i, e in enumerate(self._entries) if i in chosen]
        self.num_unselected = available - len(self._entries)
        self.subset = {"images": len(self._entries), "of": available, "seed": seed}

    @property
    def subset_text(self) -> str | None:
        """``random subset of K of N images (seed S)``, or None when every image is used."""
        if self.subset is None:
            return None
        s = self.subset
        return f"random subset of {s['images']} of {s['of']} images (seed {s['seed']})"

    def _warn_suspicious(self) -> None:
        """Notes on data that is legal but probably not what was meant."""
        for task in self.tasks:
            self.notes.extend(self._sources[task].notes())
        for task, n in self.label_counts().items():
            if n == 0 and task not in self.no_labels_noted:
                self.notes.append(f"{task}: no image of split {self.split!r} has a {task} label")

    def problem(self, path: Path | str, problem: str) -> None:
        """Raise in raise mode; in skip mode, record it (the caller drops the bad part)."""
        if self.on_error == "raise":
            raise DataError(path, problem)
        self.skipped.append((str(path), problem))

    def label_roots(self) -> set[Path]:
        """Label folders of any split (resolved): left out when they lie inside an images folder."""
        roots = set()
        for split in self.spec.splits.values():
            for task in split.tasks():
                root = getattr(getattr(split, task), "root", None)
                if root is not None:
                    roots.add((self.base / root).resolve())
        roots.discard(self.images_root.resolve())
        return roots

    def fail(self, labels: LabelSource, path: Path, problem: str) -> None:
        """A task's annotation file is unusable: raise, or (skip mode) drop the task."""
        task = labels.task
        self.problem(path, problem)
        self.unusable[task] = f"{path}: {problem}"
        self.tasks.remove(task)
        labels.clear()
        self.classes.pop(task, None)
        self.notes.append(f"{task}: annotation file unusable; no image has {task} labels")

    def _index_images(self) -> dict[str, Entry]:
        """Every image file, keyed by its file stem, or, where images of the split share a
        stem (CIFAR-style ``cat/0001.png``, ``dog/0001.png``), by its path under the images
        folder without extension (``cat/0001``)."""
        root = self.images_root
        if not root.is_dir():
            raise DataError(root, "images folder not found")
        files = walk_files(root, IMAGE_EXTENSIONS, self.label_roots())
        self.num_found = len(files)
        if not files:
            raise DataError(
                root, f"no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found"
            )
        groups: dict[str, list[Path]] = {}
        for key, path in zip(image_keys(files, root), files, strict=True):
            groups.setdefault(key, []).append(path)
        entries: dict[str, Entry] = {}
        self.by_rel: dict[str, str] = {}  # path under the images folder, no extension -> key
        self.by_stem: dict[str, list[str]] = {}  # file stem -> keys
        for key, paths in groups.items():
            entries[key] = Entry(key=key, image=paths[0])
            self.by_rel[rel_key(paths[0], root)] = key
            self.by_stem.setdefault(paths[0].stem, []).append(key)
            if len(paths) > 1:  # the same name with two extensions in one folder
                problem = f"duplicate image {key!r}: {' and '.join(map(str, paths))}"
                for path in paths:
                    self.problem(path, problem)
                self.bad.add(key)
        return entries

    def match(self, name: str) -> tuple[str | None, list[str]]:
        """The key of the image a label source names (a path under the images folder, with or
        without extension, or a bare file name): by path, else by file stem when only one
        image has it. Returns the key (or None) and the candidates."""
        rel = posixpath.normpath(name.replace("\\", "/")).lstrip("/")
        key = self.by_rel.get(rel) or self.by_rel.get(strip_ext(rel))
        if key is not None:
            return key, [key]
        keys = self.by_stem.get(Path(strip_ext(rel)).name, [])
        return (keys[0] if len(keys) == 1 else None), keys

    def match_path(self, path: Path) -> tuple[str | None, list[str]]:
        """``_match`` for a file path (e.g. named in a pairs file): under the images folder it
        is matched by its path there, elsewhere by its stem."""
        rel = os.path.relpath(os.path.normpath(path), os.path.normpath(self.images_root))
        if rel.startswith(".."):
            rel = path.name
        return self.match(Path(rel).as_posix())

    # ----------------------------------------------------------------------------- decoding

    def _read(
        self, entry: Entry, bad_anns: dict[str, list] | None = None, masks: bool | None = None
    ) -> dict[str, Any]:
        """Decode one sample: ``key``, ``image`` and ``labels`` (task -> NumPy entries),
        instance masks when ``masks`` (default: the reader's setting). Annotation problems are
        raised, or appended to ``bad_anns[task]`` as (position, problem), the annotation left
        out."""
        image = read_image(entry.image)
        height, width = image.shape[:2]
        masks = self.masks if masks is None else masks
        labels = {}
        for task in self.tasks:
            bad = None if bad_anns is None else bad_anns.setdefault(task, [])
            found = self._sources[task].read(entry, (width, height), bad, masks)
            if found is not None:
                labels[task] = found
        return {"key": entry.key, "image": image, "labels": labels}

    def _validate(self, show_progress: bool) -> None:
        """Skip mode: decode every sample once; drop bad samples and bad annotations."""

        def attempt(entry: Entry):
            bad_anns: dict[str, list] = {}
            try:
                # Masks decoded only when they are read (else their structure is checked).
                sample = self._read(entry, bad_anns)
            except DataError as err:
                return err, bad_anns, None
            except Exception as err:  # anything else still names the sample's image
                return DataError(entry.image, f"{type(err).__name__}: {err}"), bad_anns, None
            return None, bad_anns, sample

        workers = max(1, min(8, os.cpu_count() or 1))
        kept = []
        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(attempt, self._entries)
            bar = tqdm(
                results,
                total=len(self._entries),
                desc=f"check {self.name}/{self.split}",
                unit="img",
                disable=not show_progress,
            )
            for entry, (error, bad_anns, sample) in zip(self._entries, bar, strict=True):
                if error is not None:
                    self.skipped.append((error.path, error.problem))
                    continue
                for task, problems in bad_anns.items():
                    if problems:
                        source = self._sources[task]
                        for _, problem in problems:
                            self.skipped.append((str(source.path), problem))
                        source.drop_annotations(entry.key, sample["labels"][task])
                kept.append(entry)
        self._entries = kept

    # ----------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self._entries]

    @property
    def image_paths(self) -> list[Path]:
        """The image file of each sample, in the order of ``keys``."""
        return [e.image for e in self._entries]

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self._read(self._entries[index])
        height, width = raw["image"].shape[:2]
        sample: dict[str, Any] = {
            "key": raw["key"],
            "image": tv_tensors.Image(
                torch.from_numpy(np.ascontiguousarray(raw["image"].transpose(2, 0, 1)))
            ),
        }
        for task, labels in raw["labels"].items():
            sample.update(TASK_TYPES[task].label_entries(labels, (height, width)))
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def _has_label(self, entry: Entry, task: str) -> bool:
        return self._sources[task].has(entry.key)

    def label_counts(self) -> dict[str, int]:
        """How many of the kept images have a label for each task."""
        return {t: sum(self._has_label(e, t) for e in self._entries) for t in self.tasks}

    def unlabelled(self, task: str) -> list[Path]:
        """The image files of the kept samples that have no label of ``task``."""
        return [e.image for e in self._entries if not self._has_label(e, task)]

    def report(self) -> str:
        """A summary: images, labels per task, notes, and every skipped file with its reason."""
        lines = [
            f"{self.name} [{self.split}]: {len(self)} images under {self.images_root} "
            f"(checked: {'every file decoded' if self.on_error == 'skip' else 'index only'})"
        ]
        for task, n in self.label_counts().items():
            line = f"  {task}: {n} labelled"
            if task in self.classes:
                line += f", {len(self.classes[task])} classes"
            line += self._sources[task].summary(self.keys)
            if 0 < n < len(self):
                lacking = [
                    p.relative_to(self.images_root).as_posix() for p in self.unlabelled(task)
                ]
                line += f"; {len(lacking)} image(s) without a {task} label: {listing(lacking)}"
            lines.append(line)
        if self.subset is not None:
            lines.append(f"  {self.subset_text}")
        lines.extend(f"  warning: {n}" for n in self.notes)
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} ({self.dropped_text()}):")
            lines.extend(f"    {line}" for line in _listed(self.skipped))
        else:
            lines.append("  nothing skipped")
        return "\n".join(lines)

    @property
    def num_dropped(self) -> int:
        """Image files found but left out (bad image or label files, duplicate names); images
        left out of a subset are not counted."""
        return self.num_found - self.num_unselected - len(self)

    def dropped_text(self) -> str:
        return f"{self.num_dropped} of {self.num_found} images dropped"


def _listed(skipped: list[tuple[str, str]], limit: int = _MAX_LISTED_SKIPS) -> list[str]:
    lines = [f"{path}: {reason}" for path, reason in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"... and {len(skipped) - limit} more")
    return lines


def skip_report(datasets: list[MultiTaskDataset]) -> str:
    """What skip mode dropped from these datasets (one line per problem, by split), for the
    end of a run; empty when nothing was skipped."""
    lines = []
    for ds in datasets:
        if ds.skipped:
            lines.append(
                f"{ds.name} [{ds.split}]: skipped {len(ds.skipped)} ({ds.dropped_text()}):"
            )
            lines.extend(f"  {line}" for line in _listed(ds.skipped))
    return "\n".join(lines)
