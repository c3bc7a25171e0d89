"""Read a dataset described by a :class:`~must.data.spec.DatasetSpec` (a rendered dataset's
``manifest.json`` or a user's ``dataset.yaml``) into sample dicts for training.

The same reader serves rendered data and real data in the formats people already have:
ImageFolder trees, COCO JSON from annotation tools (RLE, uncompressed RLE or polygon masks),
VOC/ADE-style PNG class maps and NYU/KITTI-style 16-bit depth PNGs.

Images are every image file under the split's images folder (recursively, following
symbolic links, sorted by relative path; dot files and folders, and label folders nested
inside, are left out). A sample's key is its file stem, or, for images of the split that share
a stem (CIFAR-style ``cat/0001.png``, ``dog/0001.png``), its path under the images folder
without extension (``cat/0001``). A label file is matched to an image by its path under the
label folder (a tree mirroring the images folder), else by file stem when that names one
image; COCO ``file_name`` likewise. Labels are partial: an image without a label file for a
task simply has no entry for it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import posixpath
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors
from tqdm import tqdm

from must.data.spec import TASKS, SplitSpec, find_manifest, load_spec
from must.data.transforms import Depth, Normals
from must.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# How far (pixels) a COCO box may overshoot the image before it is an error; within it the
# box is clipped (real COCO has boxes overshooting by fractions of a pixel).
BOX_TOLERANCE = 1.0
_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_GREY16_MODES = _DEPTH_MODES
_MAX_UINT16 = 65535
_SEG_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I")
_FILE_TASKS = ("segmentation", "depth", "normals")
_MAX_LISTED_SKIPS = 50


@dataclass
class _Entry:
    """One image and where its labels are."""

    key: str
    image: Path
    label: int | None = None  # classification index
    files: dict[str, Path] = field(default_factory=dict)  # segmentation / depth / normals


@dataclass
class _Boxes:
    """The detection labels of one image, parsed from the COCO JSON once."""

    file_name: str
    width: int | None  # as the COCO JSON says (None when it does not)
    height: int | None
    ids: list  # annotation ids
    boxes: np.ndarray  # (N, 4) float32 XYXY, clipped when the size was known
    labels: np.ndarray  # (N,) int64
    segs: list  # per annotation: None (use the box), a list of polygons, or an RLE dict
    checked: bool  # boxes already checked against the image size
    crowd: list[bool]  # per annotation: COCO's ``iscrowd`` (detection keeps crowd regions)
    areas: list  # per annotation: COCO's ``area``, or None when absent


def _listing(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` names, and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _rel_key(path: Path, root: Path) -> str:
    """``path`` under ``root`` without its extension, '/'-separated: ``cat/0001``."""
    return _strip_ext(path.relative_to(root).as_posix())


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
    return [p.stem if stems[p.stem] == 1 else _rel_key(p, root) for p in files]


def _strip_ext(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _size_str(width: int, height: int) -> str:
    return f"{width}x{height}"


def _open_label(path: Path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
    except Exception as err:
        raise DataError(
            path, f"corrupt or unreadable {what} file ({type(err).__name__}: {err})"
        ) from err
    return img


def _check_size(path: Path, what: str, size: tuple[int, int], image_size: tuple[int, int]):
    if tuple(size) != tuple(image_size):
        raise DataError(
            path,
            f"{what} size {_size_str(*size)} differs from the image's {_size_str(*image_size)}",
        )


def _pixels(img: Image.Image, path: Path, what: str) -> np.ndarray:
    try:
        return np.array(img)
    except Exception as err:
        raise DataError(
            path, f"corrupt or unreadable {what} file ({type(err).__name__}: {err})"
        ) from err


def _grey16_to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """A 16-bit greyscale image (mode I;16*, or I holding 16-bit values) scaled by the type's
    range to 8 bits, ``round(v * 255 / 65535)``: PIL's own conversion would clip at 255."""
    grey = np.asarray(img).astype(np.int64)
    if grey.size and (grey.min() < 0 or grey.max() > _MAX_UINT16):
        raise DataError(
            path,
            f"image of mode {img.mode} has values {grey.min()}..{grey.max()}, outside the "
            "16-bit range 0..65535; save it as an 8- or 16-bit image",
        )
    grey8 = ((grey * 255 + _MAX_UINT16 // 2) // _MAX_UINT16).astype(np.uint8)
    return np.repeat(grey8[..., None], 3, axis=-1)


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; grayscale, palette and alpha images are converted, 16-bit
    greyscale is scaled to 8 bits by its range; float images (mode F) are refused."""
    try:
        with Image.open(path) as img:
            if img.mode in _GREY16_MODES:
                return _grey16_to_rgb(img, path)
            if img.mode == "F":
                raise DataError(
                    path,
                    "image of mode F (32-bit float) has no fixed value range to map to 8 bits; "
                    "save it as an 8- or 16-bit image",
                )
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.array(img)
    except DataError:
        raise
    except Exception as err:
        raise DataError(path, f"corrupt or unreadable image ({type(err).__name__}: {err})") from err


def read_segmentation(
    path: Path,
    image_size: tuple[int, int],
    num_classes: int,
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
) -> np.ndarray:
    """(H, W) int64 class map from a PNG of mode L or P (or 16-bit)."""
    with _open_label(path, "segmentation") as img:
        if img.mode not in _SEG_MODES:
            raise DataError(
                path,
                f"segmentation PNG has mode {img.mode} (colour-coded?); expected a class-index "
                "map of mode L or P",
            )
        _check_size(path, "segmentation", img.size, image_size)
        seg = _pixels(img, path, "segmentation").astype(np.int64)
    if reduce_zero_label:
        # ADE20K: 0 is "unlabeled", classes are 1..K (as mmsegmentation does it).
        unlabelled = (seg == 0) | (seg == ignore_index)
        seg -= 1
        seg[unlabelled] = ignore_index
    values = np.flatnonzero(np.bincount(seg.ravel(), minlength=1))
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        raise DataError(
            path,
            f"class index {int(bad.max())} >= number of classes {num_classes} "
            f"(and not the ignore value {ignore_index})",
        )
    return seg


def read_depth(
    path: Path,
    image_size: tuple[int, int],
    scale: float,
    invalid: Sequence[int] = (),
    max_depth: float | None = None,
) -> np.ndarray:
    """(H, W) float32 metres from a 16-bit PNG; 0 stays 0 (invalid), and so do the raw values
    in ``invalid`` and depths beyond ``max_depth`` metres."""
    with _open_label(path, "depth") as img:
        if img.mode not in _DEPTH_MODES:
            raise DataError(
                path,
                f"depth PNG has mode {img.mode} (not 16-bit); expected a 16-bit grayscale PNG",
            )
        _check_size(path, "depth", img.size, image_size)
        value = _pixels(img, path, "depth")
    depth = value.astype(np.float32) / np.float32(scale)
    if len(invalid):
        depth[np.isin(value, invalid)] = 0
    if max_depth is not None:
        depth[depth > max_depth] = 0
    return depth


def read_normals(path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) float32 normals from an 8-bit RGB PNG or a float (H, W, 3) .npy; invalid = 0."""
    if path.suffix.lower() == ".npy":
        try:
            normals = np.load(path, allow_pickle=False)
        except Exception as err:
            raise DataError(
                path, f"corrupt or unreadable normals file ({type(err).__name__}: {err})"
            ) from err
        if normals.ndim != 3 or normals.shape[-1] != 3:
            raise DataError(path, f"normals array has shape {normals.shape}; expected (H, W, 3)")
        _check_size(path, "normals", (normals.shape[1], normals.shape[0]), image_size)
        normals = np.ascontiguousarray(normals.transpose(2, 0, 1), np.float32)
        return np.nan_to_num(normals, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    with _open_label(path, "normals") as img:
        if img.mode != "RGB":
            raise DataError(path, f"normals PNG has mode {img.mode}; expected 8-bit RGB")
        _check_size(path, "normals", img.size, image_size)
        rgb = _pixels(img, path, "normals")
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    invalid = (chw[0] | chw[1] | chw[2]) == 0
    normals = chw.astype(np.float32)
    normals *= np.float32(2 / 255)
    normals -= np.float32(1)
    normals[:, invalid] = 0
    return normals


def _box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    mask[y1:y2, x1:x2] = 1
    return mask


def _rle(seg: Any, height: int, width: int) -> dict:
    """The compressed RLE of a checked polygon list or RLE dict (see ``_check_segmentation``)."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if list(seg["size"]) != [height, width]:
        raise ValueError(
            f"mask size {seg['size'][1]}x{seg['size'][0]} (RLE size [h, w] = "
            f"{list(seg['size'])}) differs from the image's {_size_str(width, height)}"
        )
    return mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg


def _decode_mask(seg: Any, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of one annotation (checked structure; see ``_check_segmentation``)."""
    if seg is None:
        return _box_mask(box, height, width)
    return np.ascontiguousarray(mask_utils.decode(_rle(seg, height, width)), np.uint8)


def _mask_area(seg: Any, box: np.ndarray, height: int, width: int) -> float:
    """Pixels in one annotation's mask without decoding it; the box's area when it has none
    (as pycocotools gives a box-only result)."""
    if seg is None:
        return float((box[2] - box[0]) * (box[3] - box[1]))
    return float(mask_utils.area(_rle(seg, height, width)))


def _check_segmentation(seg: Any) -> tuple[Any, str | None]:
    """A COCO ``segmentation`` made ready to decode: None (use the box), polygons with at least
    three points, or an RLE dict; or a problem."""
    if seg is None or seg == [] or seg == {}:
        return None, None
    if isinstance(seg, list):
        polys = []
        for poly in seg:
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                return None, "segmentation polygon is not a list of numbers"
            if len(poly) % 2:
                return None, f"segmentation polygon has an odd number of coordinates ({len(poly)})"
            if len(poly) >= 6:  # fewer than 3 points have no area: ignore them
                polys.append([float(v) for v in poly])
        return (polys or None), None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(v, int) and v > 0 for v in size)
        ):
            return None, "segmentation RLE has no valid 'size' [height, width]"
        if isinstance(counts, list):
            if not all(isinstance(v, int) and v >= 0 for v in counts):
                return None, "uncompressed RLE 'counts' must be non-negative integers"
            if sum(counts) != size[0] * size[1]:
                return None, f"uncompressed RLE counts sum to {sum(counts)}, not h*w"
            return {"size": list(size), "counts": counts}, None
        if isinstance(counts, (str, bytes)):
            return {"size": list(size), "counts": counts}, None
        return None, "segmentation RLE has no 'counts'"
    return None, "segmentation is neither a list of polygons nor an RLE dict"


def _fit_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """An XYXY box read before its image's size was known, checked and clipped against it
    now (raises ValueError with the problem)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    clipped, problem = _check_box([x1, y1, x2 - x1, y2 - y1], width, height)
    if problem is not None:
        raise ValueError(problem)
    return np.array(clipped, np.float32)


def _check_box(bbox: Any, width: int | None, height: int | None) -> tuple[list | None, str | None]:
    """COCO [x, y, w, h] -> XYXY, clipped to the image when its size is known; or a problem."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return None, f"bbox {bbox!r} is not four finite numbers [x, y, w, h]"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, f"box {bbox} has zero or negative width or height"
    x1, y1, x2, y2 = x, y, x + w, y + h
    if width is None or height is None:
        return [x1, y1, x2, y2], None
    tol = BOX_TOLERANCE
    outside = f"box {bbox} lies outside the {_size_str(width, height)} image"
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        return None, outside
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        return None, outside
    return [x1, y1, x2, y2], None


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
    every mask of every image is costly; drawing and random crops ask for them).
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
        self._det: dict[str, _Boxes] = {}
        self._det_json: Path | None = None
        self._seg: dict[str, _Boxes] = {}  # segmentation rasterised from COCO
        self._seg_json: Path | None = None
        self._seg_background = 0
        self._json: dict[Path, Any] = {}  # COCO files read once per reader
        self._bad: set[str] = set()  # keys whose sample is dropped
        self._no_labels_noted: set[str] = set()

        entries = self._index_images()
        if "classification" in self.tasks:
            self._index_classification(entries)
        for task in _FILE_TASKS:
            if task in self.tasks:
                if task == "segmentation" and self.source.segmentation.format == "coco":
                    self._index_coco_segmentation(entries)
                else:
                    self._index_label_files(task, entries)
        if "detection" in self.tasks:
            self._index_detection(entries)
        self._json.clear()
        self._entries = [e for e in entries.values() if e.key not in self._bad]
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
        names = self.classes.get("classification")
        if "classification" in self.tasks and names is not None and len(names) == 1:
            self.notes.append(
                f"classification: a single class ({names[0]!r}): this trains a classifier of "
                "one class, which learns nothing (one folder per class is expected)"
            )
        for task, n in self.label_counts().items():
            if n == 0 and task not in self._no_labels_noted:
                self.notes.append(f"{task}: no image of split {self.split!r} has a {task} label")

    def _problem(self, path: Path | str, problem: str) -> None:
        """Raise in raise mode; in skip mode, record it (the caller drops the bad part)."""
        if self.on_error == "raise":
            raise DataError(path, problem)
        self.skipped.append((str(path), problem))

    def _label_roots(self) -> set[Path]:
        """Label folders of any split (resolved): left out when they lie inside an images folder."""
        roots = set()
        for split in self.spec.splits.values():
            for task in _FILE_TASKS:
                src = getattr(split, task)
                if src is not None and getattr(src, "root", None) is not None:
                    roots.add((self.base / src.root).resolve())
        roots.discard(self.images_root.resolve())
        return roots

    def _index_images(self) -> dict[str, _Entry]:
        """Every image file, keyed by its file stem, or, where images of the split share a
        stem (CIFAR-style ``cat/0001.png``, ``dog/0001.png``), by its path under the images
        folder without extension (``cat/0001``)."""
        root = self.images_root
        if not root.is_dir():
            raise DataError(root, "images folder not found")
        files = walk_files(root, IMAGE_EXTENSIONS, self._label_roots())
        self.num_found = len(files)
        if not files:
            raise DataError(
                root, f"no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found"
            )
        groups: dict[str, list[Path]] = {}
        for key, path in zip(image_keys(files, root), files, strict=True):
            groups.setdefault(key, []).append(path)
        entries: dict[str, _Entry] = {}
        self._by_rel: dict[str, str] = {}  # path under the images folder, no extension -> key
        self._by_stem: dict[str, list[str]] = {}  # file stem -> keys
        for key, paths in groups.items():
            entries[key] = _Entry(key=key, image=paths[0])
            self._by_rel[_rel_key(paths[0], root)] = key
            self._by_stem.setdefault(paths[0].stem, []).append(key)
            if len(paths) > 1:  # the same name with two extensions in one folder
                problem = f"duplicate image {key!r}: {' and '.join(map(str, paths))}"
                for path in paths:
                    self._problem(path, problem)
                self._bad.add(key)
        return entries

    def _match(self, name: str) -> tuple[str | None, list[str]]:
        """The key of the image a label source names (a path under the images folder, with or
        without extension, or a bare file name): by path, else by file stem when only one
        image has it. Returns the key (or None) and the candidates."""
        rel = posixpath.normpath(name.replace("\\", "/")).lstrip("/")
        key = self._by_rel.get(rel) or self._by_rel.get(_strip_ext(rel))
        if key is not None:
            return key, [key]
        keys = self._by_stem.get(Path(_strip_ext(rel)).name, [])
        return (keys[0] if len(keys) == 1 else None), keys

    def _match_path(self, path: Path) -> tuple[str | None, list[str]]:
        """``_match`` for a file path (e.g. named in a pairs file): under the images folder it
        is matched by its path there, elsewhere by its stem."""
        rel = os.path.relpath(os.path.normpath(path), os.path.normpath(self.images_root))
        if rel.startswith(".."):
            rel = path.name
        return self._match(Path(rel).as_posix())

    def _read_table(self, path: Path, what: str) -> list[tuple[int, list[str]]]:
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

    def _class_label_file(self, split: SplitSpec) -> list[tuple[int, str, str]]:
        """(line, image, class) rows of a split's classification labels file; a first line
        that names no image file of the split is a header, left out."""
        path = self.base / split.classification.labels
        rows = []
        for number, fields in self._read_table(path, "classification labels file"):
            if len(fields) < 2 or not fields[1].split():
                raise DataError(path, f"line {number}: expected an image and a class")
            rows.append((number, fields[0], fields[1].split()[0]))
        if rows and split is self.source:
            header = self._match(rows[0][1])[0] is None
        elif rows:
            first = self.base / split.images / rows[0][1]
            names = [first, *(first.with_name(first.name + e) for e in IMAGE_EXTENSIONS)]
            names += [first.with_name(first.name + e.upper()) for e in IMAGE_EXTENSIONS]
            header = not any(n.is_file() for n in names)
        return rows[1:] if rows and header else rows

    def _index_classification(self, entries: dict[str, _Entry]) -> None:
        src = self.source.classification
        declared = self.spec.classes.get("classification")
        own_rows = self._class_label_file(self.source) if src.labels else None
        if declared:
            names = list(declared)
        else:
            # Every split's classes, so that train and val agree on the indices even where a
            # class has no image in one of them.
            found = set()
            label_roots = self._label_roots()
            for split in self.spec.splits.values():
                if split.classification is None:
                    continue
                if split.classification.labels:
                    rows = own_rows if split is self.source else self._class_label_file(split)
                    found.update(c for _, _, c in rows)
                    continue
                split_root = self.base / split.images
                if split_root.is_dir():
                    found.update(
                        p.name
                        for p in split_root.iterdir()
                        if p.is_dir()
                        and not p.name.startswith(".")
                        and p.resolve() not in label_roots
                    )
            names = sorted(found)
        self.classes["classification"] = names
        index = {name: i for i, name in enumerate(names)}
        if own_rows is not None:
            return self._classes_from_file(entries, own_rows, index, names)
        outside = 0
        for entry in entries.values():
            parts = entry.image.relative_to(self.images_root).parts
            if len(parts) < 2:
                outside += 1
                continue
            label = index.get(parts[0])
            if label is None:
                self._problem(
                    entry.image,
                    f"class folder {parts[0]!r} is not among the declared classification "
                    f"classes {names}",
                )
                self._bad.add(entry.key)
                continue
            entry.label = label
        if outside:
            self.notes.append(
                f"classification: {outside} image(s) outside class folders (no class label)"
            )

    def _classes_from_file(self, entries, rows, index: dict[str, int], names: list[str]) -> None:
        path = self.base / self.source.classification.labels
        unmatched = 0
        for number, image, cls in rows:
            key, _ = self._match(image)
            if key is None:
                unmatched += 1
                continue
            entry = entries[key]
            where = f"line {number} ({image})"
            if cls not in index:
                self._problem(
                    path, f"{where}: class {cls!r} is not among the classification classes"
                )
                self._bad.add(key)
            elif entry.label is not None and entry.label != index[cls]:
                self._problem(path, f"{where}: image labelled twice ({names[entry.label]}, {cls})")
                self._bad.add(key)
            else:
                entry.label = index[cls]
        if unmatched:
            self.notes.append(
                f"classification: {unmatched} line(s) of {path.name} name no image of this split"
            )

    def _index_label_files(self, task: str, entries: dict[str, _Entry]) -> None:
        """Label files of ``task``, matched to images by their path under the label folder
        (mirroring the image tree), else by file stem; or listed in a pairs file."""
        src = getattr(self.source, task)
        if task == "segmentation":
            names = self.spec.classes.get("segmentation")
            if not names:
                raise ConfigError(
                    f"{self.manifest}: classes.segmentation is required (the class maps hold "
                    "only indices): list the class names in index order"
                )
            self.classes["segmentation"] = list(names)
        ext = ".npy" if getattr(src, "format", "png") == "npy" else ".png"
        if getattr(src, "pairs", None) is not None:
            return self._index_pairs(task, entries, self.base / src.pairs, ext)
        root = self.base / src.root
        if not root.is_dir():
            msg = f"{task}: label folder {root} not found; no image has {task} labels"
            self.notes.append(msg)
            self._no_labels_noted.add(task)
            warnings.warn(msg, stacklevel=3)
            return
        every = walk_files(root, ("",))
        found: dict[str, Path] = {}
        by_stem: dict[str, list[Path]] = {}
        for path in every:
            if path.suffix.lower() != ext:
                continue
            key = self._by_rel.get(_rel_key(path, root))
            if key is not None and key not in found:
                found[key] = path
            else:
                by_stem.setdefault(path.stem, []).append(path)
        for stem, paths in by_stem.items():
            keys = [k for k in self._by_stem.get(stem, []) if k not in found]
            if not keys:
                continue  # a label of an image of another split (or none)
            if len(keys) > 1:
                self._problem(
                    paths[0],
                    f"{task} label file matches {len(keys)} images by file stem "
                    f"({_listing([str(entries[k].image) for k in keys])}); put the label files "
                    f"in folders that mirror the images folder",
                )
                continue
            if len(paths) > 1:
                problem = f"duplicate {task} label file stem {stem!r}: " + " and ".join(
                    map(str, paths)
                )
                for path in paths[1:]:
                    self._problem(path, problem)
                self._bad.add(keys[0])
                continue
            found[keys[0]] = paths[0]
        for key, path in found.items():
            entries[key].files[task] = path
        # A label file of another format for an image of this split would otherwise be
        # ignored without a word (e.g. a depth .npy where the source says png16).
        for path in every:
            if path.suffix.lower() == ext:
                continue
            key = self._by_rel.get(_rel_key(path, root))
            if key is None:
                key, _ = self._match(path.name)
            if key is not None and key not in found:
                self._problem(
                    path,
                    f"{task} label file is not a {ext} file (the dataset description says "
                    f"{task} format {src.format!r}): convert it, or change the format",
                )
                self._bad.add(key)

    def _index_pairs(self, task: str, entries: dict[str, _Entry], path: Path, ext: str) -> None:
        """A pairs file: ``image label`` per line (TUM ``associations.txt``: ``time image
        time label``; either order; a CSV of two columns). Paths are relative to the file."""
        unmatched = 0
        first = True
        for number, fields in self._read_table(path, "pairs file"):
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
            key, _ = self._match_path(a)
            label = b
            if key is None:
                key, _ = self._match_path(b)
                label = a
            if key is None:
                unmatched += 1
                continue
            where = f"line {number}"
            if task in entries[key].files:
                self._problem(path, f"{where}: image {entries[key].image} is paired twice")
                self._bad.add(key)
            elif label.suffix.lower() != ext:
                self._problem(path, f"{where}: {task} file {label} is not a {ext} file")
                self._bad.add(key)
            elif not label.is_file():
                self._problem(path, f"{where}: {task} file {label} not found")
                self._bad.add(key)
            else:
                entries[key].files[task] = label
        if unmatched:
            self.notes.append(
                f"{task}: {unmatched} line(s) of {path.name} name no image of this split"
            )

    def _fail_coco(self, task: str, path: Path, problem: str) -> None:
        """The annotation file is unusable: raise, or (skip mode) drop the task altogether."""
        self._problem(path, problem)
        self.unusable[task] = f"{path}: {problem}"
        self.tasks.remove(task)
        (self._det if task == "detection" else self._seg).clear()
        self.classes.pop(task, None)
        self.notes.append(f"{task}: annotation file unusable; no image has {task} labels")

    def _load_coco(self, task: str, path: Path) -> dict | None:
        """The COCO JSON at ``path``, checked at the top level; None when unusable."""
        if path not in self._json:
            try:
                self._json[path] = json.loads(path.read_bytes())
            except FileNotFoundError:
                self._json[path] = "COCO annotation file not found"
            except OSError as err:
                self._json[path] = f"cannot read the annotation file: {err}"
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                self._json[path] = f"not valid JSON: {err}"
        raw = self._json[path]
        if isinstance(raw, str):
            return self._fail_coco(task, path, raw)
        if not isinstance(raw, dict):
            return self._fail_coco(task, path, "not a COCO JSON object")
        for key in ("images", "annotations", "categories"):
            if not isinstance(raw.get(key), list):
                return self._fail_coco(task, path, f"missing required field {key!r} (a list)")
        return raw

    def _index_detection(self, entries: dict[str, _Entry]) -> None:
        path = self.base / self.source.detection.annotations
        self._det_json = path
        raw = self._load_coco("detection", path)
        if raw is not None:
            declared = self.spec.classes.get("detection")
            self._index_coco("detection", path, raw, entries, list(declared or []), None)

    def _index_coco_segmentation(self, entries: dict[str, _Entry]) -> None:
        src = self.source.segmentation
        path = self.base / src.annotations
        self._seg_json = path
        declared = list(self.spec.classes.get("segmentation") or [])
        if declared and src.background is not None and src.background not in declared:
            raise ConfigError(
                f"{self.manifest}: classes.segmentation has no class {src.background!r} for "
                "the pixels no annotation covers: add it, or set the segmentation source's "
                "background (to another class name, or null to ignore those pixels)"
            )
        raw = self._load_coco("segmentation", path)
        if raw is not None:
            self._index_coco("segmentation", path, raw, entries, declared, src.background)
        names = self.classes.get("segmentation", [])
        if len(names) > src.ignore_index >= 0:
            raise ConfigError(
                f"{self.manifest}: {len(names)} segmentation classes reach the ignore value "
                f"{src.ignore_index}; set segmentation.ignore_index above the class indices"
            )
        if src.background is not None and names:
            self._seg_background = names.index(src.background)
        else:
            self._seg_background = src.ignore_index

    def _index_coco(
        self,
        task: str,
        path: Path,
        raw: dict,
        entries: dict[str, _Entry],
        declared: list[str],
        background: str | None,
    ) -> None:
        """Categories, images and annotations of a COCO file, for detection or segmentation.
        Crowd regions are kept: detection scores detections on them as COCOeval does (neither
        hit nor miss), segmentation ignores their pixels."""
        # Categories: contiguous indices in sorted-id order, or by name into declared classes.
        cats: dict[int, str] = {}
        for i, cat in enumerate(raw["categories"]):
            where = f"category #{i}"
            if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
                self._problem(path, f"{where}: missing required field 'id'")
                continue
            if not isinstance(cat.get("name"), str):
                self._problem(path, f"category id {cat['id']}: missing required field 'name'")
                continue
            if cat["id"] in cats:
                self._problem(path, f"category id {cat['id']} is listed twice")
                continue
            cats[cat["id"]] = cat["name"]
        if declared:
            names = declared
        else:
            names = [cats[i] for i in sorted(cats)]
            if background is not None and background not in names:
                names.insert(0, background)
        by_name = {n: i for i, n in enumerate(names)}
        cat_index: dict[int, int] = {}
        for cid in sorted(cats):
            if cats[cid] not in by_name:
                self._problem(
                    path,
                    f"category id {cid} ({cats[cid]!r}) is not among the declared {task} classes",
                )
                continue
            cat_index[cid] = by_name[cats[cid]]
        self.classes[task] = names

        # Images, matched to image files by path under the images folder, else by stem.
        coco_images: dict[int, dict] = {}
        taken: dict[str, str] = {}  # key -> file_name
        missing = []
        for i, img in enumerate(raw["images"]):
            if not isinstance(img, dict) or not isinstance(img.get("id"), int):
                self._problem(path, f"image entry #{i}: missing required field 'id'")
                continue
            if not isinstance(img.get("file_name"), str) or not img["file_name"]:
                self._problem(path, f"image id {img['id']}: missing required field 'file_name'")
                continue
            if img["id"] in coco_images:
                self._problem(path, f"image id {img['id']} is listed twice")
                continue
            key, candidates = self._match(img["file_name"])
            if key is None and len(candidates) > 1:
                self._problem(
                    path,
                    f"image {img['file_name']} matches {len(candidates)} image files by file "
                    f"stem ({_listing([str(entries[k].image) for k in candidates])}); give its "
                    "path under the images folder as file_name",
                )
                continue
            if key is not None and key in taken:
                self._problem(
                    path, f"images {taken[key]} and {img['file_name']} are the same image file"
                )
                self._bad.add(key)
                continue
            if key is None:
                missing.append(img["file_name"])
            else:
                taken[key] = img["file_name"]
            w, h = img.get("width"), img.get("height")
            known = isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
            coco_images[img["id"]] = {
                "key": key,
                "file_name": img["file_name"],
                "width": w if known else None,
                "height": h if known else None,
                "anns": [],
            }
        if coco_images and not taken:
            return self._fail_coco(
                task,
                path,
                f"none of its {len(coco_images)} images matches an image file under "
                f"{self.images_root} (matched by path under that folder, else by file stem)",
            )
        if missing:
            self.notes.append(
                f"{task}: {len(missing)} image file(s) listed in {path.name} not found under "
                f"{self.images_root} (their annotations are ignored): {_listing(missing)}"
            )

        # Annotations.
        ann_ids: set = set()
        for i, ann in enumerate(raw["annotations"]):
            if not isinstance(ann, dict) or "id" not in ann:
                self._problem(path, f"annotation #{i}: missing required field 'id'")
                continue
            where = f"annotation id {ann['id']}"
            key = json.dumps(ann["id"])  # ids may be any JSON value; 1 and "1" differ
            if key in ann_ids:
                self._problem(path, f"{where} is listed twice (again at annotation #{i})")
                continue
            ann_ids.add(key)
            crowd = bool(ann.get("iscrowd", 0))
            if "image_id" not in ann:
                self._problem(path, f"{where}: missing required field 'image_id'")
                continue
            image = coco_images.get(ann["image_id"]) if isinstance(ann["image_id"], int) else None
            if image is None:
                self._problem(path, f"{where}: unknown image_id {ann['image_id']!r}")
                continue
            where += f" (image {image['file_name']})"
            absent = [k for k in ("category_id", "bbox") if k not in ann]
            if absent:
                self._problem(path, f"{where}: missing required field {absent[0]!r}")
                continue
            cid = ann["category_id"]
            # A crowd region of detection belongs to a class (it hides that class's objects).
            named = task == "detection" or not crowd
            if named and (not isinstance(cid, int) or cid not in cat_index):
                self._problem(path, f"{where}: unknown category_id {cid!r}")
                continue
            area = ann.get("area")
            if area is not None and not (_is_number(area) and area >= 0):
                self._problem(path, f"{where}: area {area!r} is not a number >= 0")
                continue
            box, problem = _check_box(ann["bbox"], image["width"], image["height"])
            if problem is None:
                seg, problem = _check_segmentation(ann.get("segmentation"))
            if (
                problem is None
                and isinstance(seg, dict)
                and image["width"] is not None
                and seg["size"] != [image["height"], image["width"]]
            ):
                problem = (
                    f"mask size {seg['size'][1]}x{seg['size'][0]} differs from the "
                    f"image's {_size_str(image['width'], image['height'])}"
                )
            if problem is not None:
                self._problem(path, f"{where}: {problem}")
                continue
            label = cat_index[cid] if named else -1
            image["anns"].append((ann["id"], box, label, seg, crowd, area))

        store = self._det if task == "detection" else self._seg
        for image in coco_images.values():
            if image["key"] is None:
                continue
            anns = image["anns"]
            store[image["key"]] = _Boxes(
                file_name=image["file_name"],
                width=image["width"],
                height=image["height"],
                ids=[a[0] for a in anns],
                boxes=np.array([a[1] for a in anns], np.float32).reshape(-1, 4),
                labels=np.array([a[2] for a in anns], np.int64),
                segs=[a[3] for a in anns],
                checked=image["width"] is not None,
                crowd=[a[4] for a in anns],
                areas=[a[5] for a in anns],
            )
        return None

    # ----------------------------------------------------------------------------- decoding

    def _read(
        self, entry: _Entry, bad_anns: list | None = None, masks: bool | None = None
    ) -> dict[str, Any]:
        """Decode one sample as NumPy arrays (instance masks when ``masks``, default: the
        reader's setting). Annotation problems are raised, or appended to ``bad_anns`` as
        (position, problem) with the annotation left out."""
        image = read_image(entry.image)
        height, width = image.shape[:2]
        size = (width, height)
        out: dict[str, Any] = {"key": entry.key, "image": image}
        if entry.label is not None:
            out["classification"] = entry.label
        det = self._det.get(entry.key)
        if det is not None:
            masks = self.masks if masks is None else masks
            out.update(self._read_detection(entry, det, height, width, bad_anns, masks))
        if "segmentation" in entry.files:
            src = self.source.segmentation
            out["segmentation"] = read_segmentation(
                entry.files["segmentation"],
                size,
                len(self.classes["segmentation"]),
                src.ignore_index,
                src.reduce_zero_label,
            )
        seg = self._seg.get(entry.key)
        if seg is not None:
            out["segmentation"] = self._rasterise(seg, height, width)
        if "depth" in entry.files:
            src = self.source.depth
            out["depth"] = read_depth(
                entry.files["depth"], size, src.scale, src.invalid, src.max_depth
            )
        if "normals" in entry.files:
            out["normals"] = read_normals(entry.files["normals"], size)
        return out

    def _rasterise(self, anns: _Boxes, height: int, width: int) -> np.ndarray:
        """The class map of one image from its COCO annotations: background where nothing is
        annotated, the ignore value over crowd regions and annotations without a mask, and
        instances painted largest first, so the smaller one wins where they overlap."""
        src = self.source.segmentation
        if anns.width is not None and (anns.width, anns.height) != (width, height):
            raise DataError(
                self._seg_json,
                f"image {anns.file_name}: the JSON says {_size_str(anns.width, anns.height)} "
                f"but the image file is {_size_str(width, height)}",
            )
        out = np.full((height, width), self._seg_background, np.int64)
        things = []
        for ann_id, box, label, seg in zip(
            anns.ids, anns.boxes, anns.labels, anns.segs, strict=True
        ):
            try:
                if not anns.checked:
                    box = _fit_box(box, width, height)
                mask = _decode_mask(seg, box, height, width).astype(bool)
            except Exception as err:
                raise DataError(
                    self._seg_json, f"annotation id {ann_id} (image {anns.file_name}): {err}"
                ) from err
            if label < 0 or seg is None:  # crowd, or only a box: which pixels is unknown
                out[mask] = src.ignore_index
            else:
                things.append((int(mask.sum()), label, mask))
        # Stable sort: of equal areas, the later annotation is painted last.
        for _, label, mask in sorted(things, key=lambda t: -t[0]):
            out[mask] = label
        return out

    def _read_detection(
        self,
        entry: _Entry,
        det: _Boxes,
        height: int,
        width: int,
        bad_anns: list | None,
        masks: bool,
    ) -> dict[str, np.ndarray]:
        """Boxes, labels and COCO areas of the objects, crowd regions apart, and (``masks``)
        the objects' instance masks. An absent ``area`` is the mask's, else the box's."""
        json_path = self._det_json
        if det.width is not None and (det.width, det.height) != (width, height):
            raise DataError(
                json_path,
                f"image {det.file_name}: the JSON says {_size_str(det.width, det.height)} but "
                f"{entry.image} is {_size_str(width, height)}",
            )
        objects: list[tuple[int, np.ndarray, float, np.ndarray | None]] = []
        crowd: list[int] = []
        crowd_boxes = []
        for i, (ann_id, box, seg) in enumerate(zip(det.ids, det.boxes, det.segs, strict=True)):
            try:
                if not det.checked:
                    box = _fit_box(box, width, height)
                if det.crowd[i]:
                    crowd.append(i)
                    crowd_boxes.append(box)
                    continue
                mask = _decode_mask(seg, box, height, width) if masks else None
                area = det.areas[i]
                if area is None:
                    area = _mask_area(seg, box, height, width)
            except Exception as err:
                problem = f"annotation id {ann_id} (image {det.file_name}): {err}"
                if bad_anns is None:
                    raise DataError(json_path, problem) from err
                bad_anns.append((i, problem))
                continue
            objects.append((i, box, float(area), mask))
        keep = [o[0] for o in objects]
        out = {
            "boxes": np.array([o[1] for o in objects], np.float32).reshape(-1, 4),
            "box_labels": det.labels[keep],
            "box_areas": np.array([o[2] for o in objects], np.float64),
            "crowd_boxes": np.array(crowd_boxes, np.float32).reshape(-1, 4),
            "crowd_labels": det.labels[crowd],
            "kept": np.array(sorted(keep + crowd), np.int64),  # annotation positions read
        }
        if masks:
            decoded = [o[3] for o in objects]
            out["instance_masks"] = (
                np.stack(decoded) if decoded else np.zeros((0, height, width), np.uint8)
            )
        return out

    def _validate(self, show_progress: bool) -> None:
        """Skip mode: decode every sample once; drop bad samples and bad annotations."""

        def attempt(entry: _Entry):
            bad_anns: list = []
            try:
                # Masks decoded once here, so a bad one is found whatever reads them later.
                sample = self._read(entry, bad_anns, masks=True)
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
                if bad_anns:
                    for _, problem in bad_anns:
                        self.skipped.append((str(self._det_json), problem))
                    self._drop_annotations(entry.key, sample)
                kept.append(entry)
        self._entries = kept

    def _drop_annotations(self, key: str, sample: dict[str, Any]) -> None:
        """Keep only the annotations ``sample`` read (its boxes checked and clipped)."""
        det = self._det[key]
        keep = sample["kept"].tolist()
        boxes = np.zeros((len(keep), 4), np.float32)
        crowd = np.array([det.crowd[i] for i in keep], bool)
        boxes[~crowd] = sample["boxes"]
        boxes[crowd] = sample["crowd_boxes"]
        self._det[key] = _Boxes(
            file_name=det.file_name,
            width=det.width,
            height=det.height,
            ids=[det.ids[i] for i in keep],
            boxes=boxes,
            labels=det.labels[keep],
            segs=[det.segs[i] for i in keep],
            checked=True,
            crowd=crowd.tolist(),
            areas=[det.areas[i] for i in keep],
        )

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
        if "classification" in raw:
            sample["classification"] = torch.tensor(raw["classification"], dtype=torch.int64)
        if "boxes" in raw:
            sample["boxes"] = tv_tensors.BoundingBoxes(
                torch.from_numpy(raw["boxes"]), format="XYXY", canvas_size=(height, width)
            )
            sample["box_labels"] = torch.from_numpy(raw["box_labels"])
            sample["box_areas"] = torch.from_numpy(raw["box_areas"])
            sample["crowd_boxes"] = tv_tensors.BoundingBoxes(
                torch.from_numpy(raw["crowd_boxes"]), format="XYXY", canvas_size=(height, width)
            )
            sample["crowd_labels"] = torch.from_numpy(raw["crowd_labels"])
            if "instance_masks" in raw:
                masks = torch.from_numpy(raw["instance_masks"])
                sample["instance_masks"] = tv_tensors.Mask(masks)
        if "segmentation" in raw:
            sample["segmentation"] = tv_tensors.Mask(torch.from_numpy(raw["segmentation"]))
        if "depth" in raw:
            sample["depth"] = Depth(torch.from_numpy(raw["depth"])[None])
        if "normals" in raw:
            sample["normals"] = Normals(torch.from_numpy(raw["normals"]))
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def _has_label(self, entry: _Entry, task: str) -> bool:
        if task == "classification":
            return entry.label is not None
        if task == "detection":
            return entry.key in self._det
        if task == "segmentation" and self._seg_json is not None:
            return entry.key in self._seg
        return task in entry.files

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
            if task == "detection":
                dets = [self._det[e.key] for e in self._entries if e.key in self._det]
                crowd = sum(sum(d.crowd) for d in dets)
                line += f", {sum(len(d.ids) for d in dets) - crowd} boxes"
                if crowd:
                    line += f", {crowd} crowd regions (detections on them are not counted)"
            if 0 < n < len(self):
                lacking = [
                    p.relative_to(self.images_root).as_posix() for p in self.unlabelled(task)
                ]
                line += f"; {len(lacking)} image(s) without a {task} label: {_listing(lacking)}"
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
