"""COCO instances JSON (from annotation tools, or rendered): boxes for detection, and instance
masks (polygons, RLE or uncompressed RLE) for detection's ``instance_masks`` or rasterised into
class maps for segmentation; mixed image sizes. Each task says what it reads from COCO
(``Task.coco_labels``). Masks are decoded only when something consumes them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from must.data.readers.common import Entry, LabelSource, is_number, listing, register_format
from must.errors import ConfigError, DataError
from must.imageio import size_str

# How far (pixels) a COCO box may overshoot the image before it is an error; within it the
# box is clipped (real COCO has boxes overshooting by fractions of a pixel).
BOX_TOLERANCE = 1.0


@dataclass
class _Boxes:
    """The annotations of one image, parsed from the COCO JSON once."""

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
            f"{list(seg['size'])}) differs from the image's {size_str(width, height)}"
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
            if not isinstance(poly, list) or not all(is_number(v) for v in poly):
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
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        return None, f"bbox {bbox!r} is not four finite numbers [x, y, w, h]"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, f"box {bbox} has zero or negative width or height"
    x1, y1, x2, y2 = x, y, x + w, y + h
    if width is None or height is None:
        return [x1, y1, x2, y2], None
    tol = BOX_TOLERANCE
    outside = f"box {bbox} lies outside the {size_str(width, height)} image"
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        return None, outside
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        return None, outside
    return [x1, y1, x2, y2], None


@register_format("coco")
class CocoLabels(LabelSource):
    """One task's labels from a COCO file: ``instances`` (boxes, areas, crowd regions and,
    when asked, instance masks) or ``class_map`` (a class map rasterised from the masks)."""

    def __init__(self, reader, task: str) -> None:
        super().__init__(reader, task)
        mode = self.kind.coco_labels
        if mode not in ("instances", "class_map"):
            raise ConfigError(
                f"{reader.manifest}: task {task!r} reads no labels from COCO annotations"
            )
        self.instances = mode == "instances"
        self.anns: dict[str, _Boxes] = {}
        self.background = 0

    def index(self, entries: dict[str, Entry]) -> None:
        if self.instances:
            self._index_instances(entries)
        else:
            self._index_class_maps(entries)

    def _index_instances(self, entries: dict[str, Entry]) -> None:
        r = self.reader
        path = r.base / self.source.annotations
        self.path = path
        raw = self._load(path)
        if raw is not None:
            declared = r.spec.classes.get(self.task)
            self._index_coco(path, raw, entries, list(declared or []), None)

    def _index_class_maps(self, entries: dict[str, Entry]) -> None:
        r, src = self.reader, self.source
        path = r.base / src.annotations
        self.path = path
        declared = list(r.spec.classes.get(self.task) or [])
        if declared and src.background is not None and src.background not in declared:
            raise ConfigError(
                f"{r.manifest}: classes.{self.task} has no class {src.background!r} for "
                f"the pixels no annotation covers: add it, or set the {self.task} source's "
                "background (to another class name, or null to ignore those pixels)"
            )
        raw = self._load(path)
        if raw is not None:
            self._index_coco(path, raw, entries, declared, src.background)
        names = r.classes.get(self.task, [])
        if len(names) > src.ignore_index >= 0:
            raise ConfigError(
                f"{r.manifest}: {len(names)} {self.task} classes reach the ignore value "
                f"{src.ignore_index}; set {self.task}.ignore_index above the class indices"
            )
        if src.background is not None and names:
            self.background = names.index(src.background)
        else:
            self.background = src.ignore_index

    def _load(self, path: Path) -> dict | None:
        """The COCO JSON at ``path``, checked at the top level; None when unusable."""
        if path not in self.reader.json_cache:
            try:
                self.reader.json_cache[path] = json.loads(path.read_bytes())
            except FileNotFoundError:
                self.reader.json_cache[path] = "COCO annotation file not found"
            except OSError as err:
                self.reader.json_cache[path] = f"cannot read the annotation file: {err}"
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                self.reader.json_cache[path] = f"not valid JSON: {err}"
        raw = self.reader.json_cache[path]
        if isinstance(raw, str):
            return self.reader.fail(self, path, raw)
        if not isinstance(raw, dict):
            return self.reader.fail(self, path, "not a COCO JSON object")
        for key in ("images", "annotations", "categories"):
            if not isinstance(raw.get(key), list):
                return self.reader.fail(self, path, f"missing required field {key!r} (a list)")
        return raw

    def _index_coco(
        self,
        path: Path,
        raw: dict,
        entries: dict[str, Entry],
        declared: list[str],
        background: str | None,
    ) -> None:
        """Categories, images and annotations of a COCO file, for detection or segmentation.
        Crowd regions are kept: detection scores detections on them as COCOeval does (neither
        hit nor miss), segmentation ignores their pixels."""
        r, task = self.reader, self.task
        # Categories: contiguous indices in sorted-id order, or by name into declared classes.
        cats: dict[int, str] = {}
        for i, cat in enumerate(raw["categories"]):
            where = f"category #{i}"
            if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
                r.problem(path, f"{where}: missing required field 'id'")
                continue
            if not isinstance(cat.get("name"), str):
                r.problem(path, f"category id {cat['id']}: missing required field 'name'")
                continue
            if cat["id"] in cats:
                r.problem(path, f"category id {cat['id']} is listed twice")
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
                r.problem(
                    path,
                    f"category id {cid} ({cats[cid]!r}) is not among the declared {task} classes",
                )
                continue
            cat_index[cid] = by_name[cats[cid]]
        r.classes[task] = names

        # Images, matched to image files by path under the images folder, else by stem.
        coco_images: dict[int, dict] = {}
        taken: dict[str, str] = {}  # key -> file_name
        missing = []
        for i, img in enumerate(raw["images"]):
            if not isinstance(img, dict) or not isinstance(img.get("id"), int):
                r.problem(path, f"image entry #{i}: missing required field 'id'")
                continue
            if not isinstance(img.get("file_name"), str) or not img["file_name"]:
                r.problem(path, f"image id {img['id']}: missing required field 'file_name'")
                continue
            if img["id"] in coco_images:
                r.problem(path, f"image id {img['id']} is listed twice")
                continue
            key, candidates = r.match(img["file_name"])
            if key is None and len(candidates) > 1:
                r.problem(
                    path,
                    f"image {img['file_name']} matches {len(candidates)} image files by file "
                    f"stem ({listing([str(entries[k].image) for k in candidates])}); give its "
                    "path under the images folder as file_name",
                )
                continue
            if key is not None and key in taken:
                r.problem(
                    path, f"images {taken[key]} and {img['file_name']} are the same image file"
                )
                r.bad.add(key)
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
            return r.fail(
                self,
                path,
                f"none of its {len(coco_images)} images matches an image file under "
                f"{r.images_root} (matched by path under that folder, else by file stem)",
            )
        if missing:
            r.notes.append(
                f"{task}: {len(missing)} image file(s) listed in {path.name} not found under "
                f"{r.images_root} (their annotations are ignored): {listing(missing)}"
            )

        # Annotations.
        ann_ids: set = set()
        for i, ann in enumerate(raw["annotations"]):
            if not isinstance(ann, dict) or "id" not in ann:
                r.problem(path, f"annotation #{i}: missing required field 'id'")
                continue
            where = f"annotation id {ann['id']}"
            key = json.dumps(ann["id"])  # ids may be any JSON value; 1 and "1" differ
            if key in ann_ids:
                r.problem(path, f"{where} is listed twice (again at annotation #{i})")
                continue
            ann_ids.add(key)
            crowd = bool(ann.get("iscrowd", 0))
            if "image_id" not in ann:
                r.problem(path, f"{where}: missing required field 'image_id'")
                continue
            image = coco_images.get(ann["image_id"]) if isinstance(ann["image_id"], int) else None
            if image is None:
                r.problem(path, f"{where}: unknown image_id {ann['image_id']!r}")
                continue
            where += f" (image {image['file_name']})"
            absent = [k for k in ("category_id", "bbox") if k not in ann]
            if absent:
                r.problem(path, f"{where}: missing required field {absent[0]!r}")
                continue
            cid = ann["category_id"]
            # A crowd region of detection belongs to a class (it hides that class's objects).
            named = self.instances or not crowd
            if named and (not isinstance(cid, int) or cid not in cat_index):
                r.problem(path, f"{where}: unknown category_id {cid!r}")
                continue
            area = ann.get("area")
            if area is not None and not (is_number(area) and area >= 0):
                r.problem(path, f"{where}: area {area!r} is not a number >= 0")
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
                    f"image's {size_str(image['width'], image['height'])}"
                )
            if problem is not None:
                r.problem(path, f"{where}: {problem}")
                continue
            label = cat_index[cid] if named else -1
            image["anns"].append((ann["id"], box, label, seg, crowd, area))

        for image in coco_images.values():
            if image["key"] is None:
                continue
            anns = image["anns"]
            self.anns[image["key"]] = _Boxes(
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

    def has(self, key: str) -> bool:
        return key in self.anns

    def clear(self) -> None:
        self.anns.clear()

    def read(
        self, entry: Entry, image_size: tuple[int, int], bad_anns: list | None, masks: bool
    ) -> dict[str, Any] | None:
        anns = self.anns.get(entry.key)
        if anns is None:
            return None
        width, height = image_size
        if self.instances:
            return self._read_detection(entry, anns, height, width, bad_anns, masks)
        return {self.kind.label_keys[0]: self._rasterise(anns, height, width)}

    def summary(self, keys: list[str]) -> str:
        if not self.instances:
            return ""
        found = [self.anns[k] for k in keys if k in self.anns]
        crowd = sum(sum(d.crowd) for d in found)
        text = f", {sum(len(d.ids) for d in found) - crowd} boxes"
        if crowd:
            text += f", {crowd} crowd regions (detections on them are not counted)"
        return text

    def _rasterise(self, anns: _Boxes, height: int, width: int) -> np.ndarray:
        """The class map of one image from its COCO annotations: background where nothing is
        annotated, the ignore value over crowd regions and annotations without a mask, and
        instances painted largest first, so the smaller one wins where they overlap."""
        src = self.source
        if anns.width is not None and (anns.width, anns.height) != (width, height):
            raise DataError(
                self.path,
                f"image {anns.file_name}: the JSON says {size_str(anns.width, anns.height)} "
                f"but the image file is {size_str(width, height)}",
            )
        out = np.full((height, width), self.background, np.int64)
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
                    self.path, f"annotation id {ann_id} (image {anns.file_name}): {err}"
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
        entry: Entry,
        det: _Boxes,
        height: int,
        width: int,
        bad_anns: list | None,
        masks: bool,
    ) -> dict[str, np.ndarray]:
        """Boxes, labels and COCO areas of the objects, crowd regions apart, and (``masks``)
        the objects' instance masks. An absent ``area`` is the mask's, else the box's."""
        json_path = self.path
        if det.width is not None and (det.width, det.height) != (width, height):
            raise DataError(
                json_path,
                f"image {det.file_name}: the JSON says {size_str(det.width, det.height)} but "
                f"{entry.image} is {size_str(width, height)}",
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
                if not masks and bad_anns is not None and seg is not None:
                    _rle(seg, height, width)  # checked without decoding: a bad one is skipped
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

    def drop_annotations(self, key: str, labels: dict[str, Any]) -> None:
        """Keep only the annotations ``labels`` read (its boxes checked and clipped)."""
        det = self.anns[key]
        keep = labels["kept"].tolist()
        boxes = np.zeros((len(keep), 4), np.float32)
        crowd = np.array([det.crowd[i] for i in keep], bool)
        boxes[~crowd] = labels["boxes"]
        boxes[crowd] = labels["crowd_boxes"]
        self.anns[key] = _Boxes(
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
