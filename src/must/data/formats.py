"""Write rendered samples to disk in standard formats, readable by :mod:`must.data.readers`
and by the usual tools (ImageFolder, pycocotools, any PNG viewer).

Layout of a dataset folder ``ROOT`` (``{split}`` is train/val/test, ``{key}`` a sample's name):

- ``images/{split}/{key}.png``, or ``images/{split}/{class_name}/{key}.png`` (ImageFolder)
  when classification is among the tasks; RGB, 8 bits;
- ``detection/{split}.json``: COCO (boxes [x, y, w, h] in pixels, category ids from 1, instance
  masks as compressed RLE, ``file_name`` relative to ``images/{split}``);
- ``segmentation/{split}/{key}.png``: mode P (VOC palette), value = class index, 255 = ignore;
- ``depth/{split}/{key}.png``: 16-bit grayscale, value = round(metres * scale), 0 = invalid;
- ``normals/{split}/{key}.png``: RGB, v = round((n + 1) / 2 * 255), (0, 0, 0) = invalid;
- ``manifest.json``: the :class:`~must.data.spec.DatasetSpec` of it all, written last, so its
  presence means the dataset is complete.

Every file is written under a temporary name (a dot file ending in ``.tmp``) and renamed,
so an interrupted render never leaves a truncated file under a final name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from must.data.sample import SceneSample
from must.data.spec import TASKS, dataset_spec_type
from must.errors import ConfigError, DataError
from must.files import write_atomic
from must.imageio import MAX_UINT16, encode_depth, encode_normals, save_png, voc_palette
from must.tasks import TASK_TYPES

__all__ = [
    "MAX_UINT16",
    "WriteOptions",
    "encode_depth",
    "encode_normals",
    "finish_dataset",
    "save_json",
    "save_png",
    "voc_palette",
    "write_sample",
]

# must.files.temporary_name's names, and the older ``.NAME.PID.RANDOM.tmp``.
_TMP_NAME = re.compile(r"^\..+\.(?:[0-9a-f]{8}-\d+-|\d+\.)[0-9a-f]{8}\.tmp$")


@dataclass
class WriteOptions:
    """What to write for each sample, and the label vocabularies (picklable, for workers):
    ``classes`` maps a task to its class names (a task without classes has no entry)."""

    tasks: list[str]
    classes: dict[str, list[str]] = field(default_factory=dict)
    ignore_index: int = 255
    depth_scale: float = 1000.0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
        if not 0 <= self.ignore_index <= 255:
            raise ConfigError(f"ignore_index must fit in 8 bits (0..255), got {self.ignore_index}")
        if not self.depth_scale > 0:
            raise ConfigError(f"depth_scale must be positive, got {self.depth_scale}")
        for task in self.ordered_tasks():
            TASK_TYPES[task].check_render_options(self.classes_of(task), self)

    def classes_of(self, task: str) -> list[str]:
        return list(self.classes.get(task) or [])

    def ordered_tasks(self) -> list[str]:
        """The tasks to write, in the registry's order (the files and manifest keep it)."""
        return [t for t in TASK_TYPES if t in self.tasks]


def save_json(obj, path: Path, indent: int | None = None) -> None:
    text = json.dumps(obj, indent=indent)
    write_atomic(path, lambda tmp: tmp.write_text(text))


def _image_relpath(key: str, sample: SceneSample, opts: WriteOptions, where: Path) -> str:
    """Path of the image relative to ``images/{split}``: in the folder a task names (e.g.
    ImageFolder when classifying), else flat."""
    for task in opts.ordered_tasks():
        folder = TASK_TYPES[task].rendered_image_folder(sample, opts, where)
        if folder is not None:
            return f"{folder}/{key}.png"
    return f"{key}.png"


def write_sample(root: Path, split: str, key: str, sample: SceneSample, opts: WriteOptions) -> dict:
    """Write the image and the label files of one sample under ``root``.

    Safe to call from several processes at once for different keys. Returns a small
    picklable record for :func:`finish_dataset`: ``key``, ``file_name`` (relative to
    ``images/{split}``), ``width``, ``height`` and what each task's ``write_label_file``
    returned (depth: ``depth_overflow``, pixels written as invalid because they were too far
    for 16 bits; detection: ``annotations``, COCO annotations without ids).
    """
    root = Path(root)
    images_root = root / "images" / split
    height, width = sample.image.shape[:2]
    rel = _image_relpath(key, sample, opts, images_root / key)
    # A previous render into this folder may have put this key under another folder (or
    # flat): remove it, or the reader would see two images with one stem.
    folders = [
        f
        for task, kind in TASK_TYPES.items()
        for f in kind.image_folder_names(opts.classes_of(task))
    ]
    for other in {f"{key}.png", *(f"{c}/{key}.png" for c in folders)} - {rel}:
        (images_root / other).unlink(missing_ok=True)
    save_png(Image.fromarray(np.ascontiguousarray(sample.image, np.uint8)), images_root / rel)

    record: dict = {"key": key, "file_name": rel, "width": int(width), "height": int(height)}
    for task in opts.ordered_tasks():
        kind = TASK_TYPES[task]
        record.update(kind.write_label_file(sample, root, split, key, opts, images_root / rel))
    return record


def _remove_temporaries(root: Path) -> None:
    """Delete the temporary files an interrupted render may have left behind."""
    for folder, _, files in os.walk(root):
        for name in files:
            if _TMP_NAME.match(name):
                Path(folder, name).unlink(missing_ok=True)


def finish_dataset(
    root: Path, records: dict[str, list[dict]], opts: WriteOptions, name: str, meta: dict
) -> Path:
    """Write the COCO JSONs and, last, ``manifest.json``; returns the manifest's path.

    ``records`` maps each split to the records :func:`write_sample` returned, in the order
    that fixes the COCO ids (images and annotations numbered from 1 in that order).
    """
    root = Path(root)
    splits = {}
    tasks = opts.ordered_tasks()
    for split, recs in records.items():
        seen: dict[str, str] = {}
        for rec in recs:
            if rec["key"] in seen:
                raise DataError(
                    root / "images" / split,
                    f"key {rec['key']!r} written twice ({seen[rec['key']]}, {rec['file_name']})",
                )
            seen[rec["key"]] = rec["file_name"]
        entry: dict = {"images": f"images/{split}"}
        for task in tasks:
            entry[task] = TASK_TYPES[task].rendered_source(split, recs, root, opts)
        splits[split] = entry

    classes = {t: opts.classes_of(t) for t in tasks if TASK_TYPES[t].needs_classes}
    formats = {"images": "PNG, 8-bit RGB"}
    formats.update({t: TASK_TYPES[t].rendered_format(records, opts) for t in tasks})
    full_meta = {
        **meta,
        "num_images": {split: len(recs) for split, recs in records.items()},
        "formats": formats,
    }
    spec = dataset_spec_type().model_validate(
        {"name": name, "splits": splits, "classes": classes, "meta": full_meta}
    )
    _remove_temporaries(root)
    manifest = root / "manifest.json"
    save_json(spec.model_dump(mode="json", exclude_none=True), manifest, indent=2)
    return manifest
