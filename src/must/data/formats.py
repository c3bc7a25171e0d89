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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from must.data.sample import SceneSample
from must.data.spec import (
    TASKS,
    ClassificationSource,
    DatasetSpec,
    DepthSource,
    DetectionSource,
    NormalsSource,
    SegmentationSource,
    SplitSpec,
)
from must.errors import ConfigError, DataError
from must.files import write_atomic

MAX_UINT16 = 65535
# Colour of the ignore value in VOC's own PNGs (the "void" object borders).
_VOC_IGNORE_COLOUR = (224, 224, 192)
# must.files.temporary_name's names, and the older ``.NAME.PID.RANDOM.tmp``.
_TMP_NAME = re.compile(r"^\..+\.(?:[0-9a-f]{8}-\d+-|\d+\.)[0-9a-f]{8}\.tmp$")


@dataclass
class WriteOptions:
    """What to write for each sample, and the label vocabularies (picklable, for workers)."""

    tasks: list[str]
    classification_classes: list[str]
    detection_classes: list[str]
    segmentation_classes: list[str]
    ignore_index: int = 255
    depth_scale: float = 1000.0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
        if not 0 <= self.ignore_index <= 255:
            raise ConfigError(f"ignore_index must fit in 8 bits (0..255), got {self.ignore_index}")
        if "segmentation" in self.tasks and len(self.segmentation_classes) > self.ignore_index:
            raise ConfigError(
                f"{len(self.segmentation_classes)} segmentation classes do not fit in an 8-bit "
                f"PNG below the ignore value {self.ignore_index}"
            )
        if not self.depth_scale > 0:
            raise ConfigError(f"depth_scale must be positive, got {self.depth_scale}")
        if "classification" in self.tasks:
            for name in self.classification_classes:
                if not _is_folder_name(name):
                    raise ConfigError(
                        f"classification class {name!r} cannot be used as a folder name"
                    )


def _is_folder_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def voc_palette(ignore_index: int = 255) -> list[int]:
    """PASCAL VOC's colour map (768 ints for ``Image.putpalette``); ignore drawn like VOC's."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[ignore_index] = _VOC_IGNORE_COLOUR
    return pal.reshape(-1).tolist()


def save_png(image: Image.Image, path: Path) -> None:
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def save_json(obj, path: Path, indent: int | None = None) -> None:
    text = json.dumps(obj, indent=indent)
    write_atomic(path, lambda tmp: tmp.write_text(text))


def encode_depth(depth: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
    """Metres -> uint16 ``round(d * scale)``; 0 = invalid. Values that would overflow (and
    negative or non-finite ones) become 0; returns the array and the count of overflows."""
    value = np.rint(np.nan_to_num(depth.astype(np.float64), nan=0.0, posinf=0.0) * scale)
    overflow = value > MAX_UINT16
    value[overflow | (value < 0)] = 0
    return value.astype(np.uint16), int(overflow.sum())


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals (H, W, 3) -> uint8 ``round((n + 1) / 2 * 255)``; all-zero (invalid) -> 0."""
    n = np.nan_to_num(normals.astype(np.float32), nan=0.0)
    invalid = ~n.any(axis=-1)
    rgb = np.rint((np.clip(n, -1, 1) + 1) * 127.5).astype(np.uint8)
    rgb[invalid] = 0
    return rgb


def _image_relpath(key: str, sample: SceneSample, opts: WriteOptions, where: Path) -> str:
    """Path of the image relative to ``images/{split}``: ImageFolder when classifying."""
    if "classification" not in opts.tasks:
        return f"{key}.png"
    label = int(sample.image_label)
    if not 0 <= label < len(opts.classification_classes):
        raise DataError(
            where,
            f"image_label {label} is not an index of the "
            f"{len(opts.classification_classes)} classification classes",
        )
    return f"{opts.classification_classes[label]}/{key}.png"


def write_sample(root: Path, split: str, key: str, sample: SceneSample, opts: WriteOptions) -> dict:
    """Write the image and the label files of one sample under ``root``.

    Safe to call from several processes at once for different keys. Returns a small
    picklable record for :func:`finish_dataset`: ``key``, ``file_name`` (relative to
    ``images/{split}``), ``width``, ``height``, ``depth_overflow`` (pixels written as invalid
    because they were too far for 16 bits) and, with detection, ``annotations`` (COCO
    annotations without ids).
    """
    root = Path(root)
    images_root = root / "images" / split
    height, width = sample.image.shape[:2]
    rel = _image_relpath(key, sample, opts, images_root / key)
    # A previous render into this folder may have put this key under another class folder
    # (or flat): remove it, or the reader would see two images with one stem.
    folders = [c for c in opts.classification_classes if _is_folder_name(c)]
    for other in {f"{key}.png", *(f"{c}/{key}.png" for c in folders)} - {rel}:
        (images_root / other).unlink(missing_ok=True)
    save_png(Image.fromarray(np.ascontiguousarray(sample.image, np.uint8)), images_root / rel)

    record: dict = {
        "key": key,
        "file_name": rel,
        "width": int(width),
        "height": int(height),
        "depth_overflow": 0,
    }
    if "detection" in opts.tasks:
        record["annotations"] = _annotations(sample, opts, images_root / rel)
    if "segmentation" in opts.tasks:
        path = root / "segmentation" / split / f"{key}.png"
        sem = np.asarray(sample.semantic)
        if sem.size and int(sem.max()) >= len(opts.segmentation_classes):
            raise DataError(
                path,
                f"semantic class {int(sem.max())} >= {len(opts.segmentation_classes)} "
                "segmentation classes",
            )
        img = Image.frombytes("P", (width, height), np.ascontiguousarray(sem, np.uint8).tobytes())
        img.putpalette(voc_palette(opts.ignore_index))
        save_png(img, path)
    if "depth" in opts.tasks:
        value, overflow = encode_depth(np.asarray(sample.depth), opts.depth_scale)
        record["depth_overflow"] = overflow
        save_png(Image.fromarray(value), root / "depth" / split / f"{key}.png")
    if "normals" in opts.tasks:
        rgb = encode_normals(np.asarray(sample.normals))
        save_png(Image.fromarray(rgb), root / "normals" / split / f"{key}.png")
    return record


def _annotations(sample: SceneSample, opts: WriteOptions, where: Path) -> list[dict]:
    masks = sample.instance_masks()
    anns = []
    for box, label, mask in zip(sample.boxes, sample.box_labels, masks, strict=True):
        label = int(label)
        if not 0 <= label < len(opts.detection_classes):
            raise DataError(
                where,
                f"box label {label} is not an index of the {len(opts.detection_classes)} "
                "detection classes",
            )
        x1, y1, x2, y2 = (float(v) for v in box)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        anns.append(
            {
                "category_id": label + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
            }
        )
    return anns


def _coco(records: list[dict], classes: list[str]) -> dict:
    images, annotations = [], []
    for image_id, rec in enumerate(records, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": rec["file_name"],
                "width": rec["width"],
                "height": rec["height"],
            }
        )
        for ann in rec.get("annotations", []):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


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
    overflow = 0
    for split, recs in records.items():
        seen: dict[str, str] = {}
        for rec in recs:
            if rec["key"] in seen:
                raise DataError(
                    root / "images" / split,
                    f"key {rec['key']!r} written twice ({seen[rec['key']]}, {rec['file_name']})",
                )
            seen[rec["key"]] = rec["file_name"]
            overflow += int(rec.get("depth_overflow", 0))
        entry: dict = {"images": f"images/{split}"}
        if "classification" in opts.tasks:
            entry["classification"] = ClassificationSource()
        if "detection" in opts.tasks:
            path = f"detection/{split}.json"
            save_json(_coco(recs, opts.detection_classes), root / path)
            entry["detection"] = DetectionSource(annotations=path)
        if "segmentation" in opts.tasks:
            entry["segmentation"] = SegmentationSource(
                root=f"segmentation/{split}", ignore_index=opts.ignore_index
            )
        if "depth" in opts.tasks:
            entry["depth"] = DepthSource(root=f"depth/{split}", scale=opts.depth_scale)
        if "normals" in opts.tasks:
            entry["normals"] = NormalsSource(root=f"normals/{split}", format="png")
        splits[split] = SplitSpec(**entry)

    classes = {}
    for task, names in (
        ("classification", opts.classification_classes),
        ("detection", opts.detection_classes),
        ("segmentation", opts.segmentation_classes),
    ):
        if task in opts.tasks:
            classes[task] = list(names)
    formats = {
        "images": "PNG, 8-bit RGB",
        "classification": "ImageFolder: images/{split}/{class_name}/{key}.png",
        "detection": "COCO JSON; category_id = class index + 1; bbox [x, y, w, h] pixels; "
        "segmentation: compressed RLE",
        "segmentation": {
            "encoding": "PNG mode P (VOC palette), value = class index",
            "ignore_index": opts.ignore_index,
        },
        "depth": {
            "encoding": "16-bit grayscale PNG, metres = value / scale, 0 = invalid",
            "scale": opts.depth_scale,
            "overflow_pixels": overflow,
        },
        "normals": {
            "encoding": "8-bit RGB PNG, n = v / 255 * 2 - 1, (0, 0, 0) = invalid",
            "frame": "camera: x right, y down, z forward",
        },
    }
    full_meta = {
        **meta,
        "num_images": {split: len(recs) for split, recs in records.items()},
        "formats": {k: v for k, v in formats.items() if k == "images" or k in opts.tasks},
    }
    spec = DatasetSpec(name=name, splits=splits, classes=classes, meta=full_meta)
    _remove_temporaries(root)
    manifest = root / "manifest.json"
    save_json(spec.model_dump(mode="json", exclude_none=True), manifest, indent=2)
    return manifest
