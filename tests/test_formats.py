"""On-disk formats: rendered samples round-trip through the writer and the reader; users' real
data (COCO, ImageFolder, ADE-style masks, KITTI-style depth) is read; bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from must.data.formats import WriteOptions, finish_dataset, write_sample
from must.data.readers import MultiTaskDataset
from must.data.sample import SceneSample
from must.data.spec import load_spec
from must.errors import ConfigError, DataError

CATEGORIES = ["cube", "sphere", "torus"]
STUFF = ["floor", "wall"]
ALL_TASKS = ["classification", "detection", "segmentation", "depth", "normals"]


# --------------------------------------------------------------------------- rendered data


def make_scene(seed: int, label: int, height: int = 24, width: int = 32) -> SceneSample:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    instances = np.zeros((height, width), np.int32)
    instances[2 + seed : 10 + seed, 3:12] = 1
    instances[12:20, 15 + seed : 30] = 2
    instances[6:9, 10:17] = 3  # overlaps object 1, which it partly hides
    box_instances = np.array([1, 2, 3], np.int32)
    box_labels = np.array([label, (label + 1) % 3, (label + 2) % 3], np.int64)
    boxes = []
    for k in box_instances:
        ys, xs = np.nonzero(instances == k)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    semantic = np.where(np.arange(height)[:, None] < height // 2, 1, 0).astype(np.uint8)
    semantic = np.broadcast_to(semantic, (height, width)).copy()
    for k, cat in zip(box_instances, box_labels, strict=True):
        semantic[instances == k] = len(STUFF) + cat
    # A ramp in metres with awkward fractions, and a region with no surface (0).
    depth = (0.5 + np.arange(width)[None] * 0.37 + np.arange(height)[:, None] * 0.0123).astype(
        np.float32
    )
    depth[:4, :5] = 0
    normals = rng.normal(size=(height, width, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[:4, :5] = 0
    return SceneSample(
        image=image,
        depth=depth,
        normals=normals,
        instances=instances,
        semantic=semantic,
        boxes=np.array(boxes, np.float32),
        box_labels=box_labels,
        box_instances=box_instances,
        image_label=label,
    )


def options(tasks=ALL_TASKS) -> WriteOptions:
    classes = {"classification": CATEGORIES, "detection": CATEGORIES}
    return WriteOptions(tasks=list(tasks), classes={**classes, "segmentation": STUFF + CATEGORIES})


def write(root: Path, samples: dict[str, dict[str, SceneSample]], opts: WriteOptions) -> Path:
    records = {
        split: [write_sample(root, split, key, s, opts) for key, s in items.items()]
        for split, items in samples.items()
    }
    return finish_dataset(root, records, opts, name="toy", meta={"style": "toy", "seed": 0})


def test_round_trip(tmp_path):
    samples = {
        "train": {"toy_000000": make_scene(0, 0), "toy_000001": make_scene(1, 2)},
        "val": {"toy_000002": make_scene(2, 1)},
    }
    manifest = write(tmp_path, samples, options())
    assert manifest == tmp_path / "manifest.json"
    spec, base = load_spec(tmp_path)
    assert base == tmp_path
    assert spec.classes == {
        "classification": CATEGORIES,
        "detection": CATEGORIES,
        "segmentation": STUFF + CATEGORIES,
    }
    assert spec.meta["style"] == "toy"
    assert spec.meta["formats"]["depth"]["scale"] == 1000.0
    assert spec.meta["formats"]["segmentation"]["ignore_index"] == 255
    # ImageFolder layout, one copy of each image, no temporary files left.
    assert (tmp_path / "images/train/torus/toy_000001.png").is_file()
    assert len(list((tmp_path / "images").rglob("*.png"))) == 3
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    seg_png = Image.open(tmp_path / "segmentation/train/toy_000000.png")
    assert seg_png.mode == "P"
    assert Image.open(tmp_path / "depth/train/toy_000000.png").mode == "I;16"

    for split, items in samples.items():
        ds = MultiTaskDataset(tmp_path, split=split, masks=True)
        assert "instance_masks" not in MultiTaskDataset(tmp_path, split=split)[0]  # not asked
        assert ds.classes["detection"] == CATEGORIES
        assert sorted(ds.keys) == sorted(items)
        for i in range(len(ds)):
            got = ds[i]
            s = items[got["key"]]
            assert isinstance(got["image"], tv_tensors.Image)
            np.testing.assert_array_equal(got["image"].permute(1, 2, 0).numpy(), s.image)
            assert int(got["classification"]) == s.image_label
            assert isinstance(got["boxes"], tv_tensors.BoundingBoxes)
            assert tuple(got["boxes"].canvas_size) == s.image.shape[:2]
            np.testing.assert_array_equal(got["boxes"].numpy(), s.boxes)
            np.testing.assert_array_equal(got["box_labels"].numpy(), s.box_labels)
            np.testing.assert_array_equal(got["instance_masks"].numpy(), s.instance_masks())
            np.testing.assert_array_equal(got["segmentation"].numpy(), s.semantic)
            depth = got["depth"].numpy()[0]
            valid = s.depth > 0
            assert np.abs(depth[valid] - s.depth[valid]).max() <= 0.5 / 1000 + 1e-6
            assert (depth[~valid] == 0).all()
            normals = got["normals"].numpy().transpose(1, 2, 0)
            valid = s.normals.any(-1)
            assert np.abs(normals[valid] - s.normals[valid]).max() <= 1 / 255 + 1e-6
            assert (normals[~valid] == 0).all()


def test_coco_file_is_standard(tmp_path):
    from pycocotools.coco import COCO

    samples = {"train": {"a": make_scene(0, 1), "b": make_scene(1, 0)}}
    write(tmp_path, samples, options())
    coco = COCO(str(tmp_path / "detection/train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CATEGORIES
    img = coco.loadImgs(coco.getImgIds())[0]
    assert (tmp_path / "images/train" / img["file_name"]).is_file()
    anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
    s = samples["train"][Path(img["file_name"]).stem]
    for ann, mask in zip(anns, s.instance_masks(), strict=True):
        np.testing.assert_array_equal(coco.annToMask(ann), mask)
        assert ann["area"] == mask.sum()


def test_depth_overflow_written_invalid_and_counted(tmp_path):
    s = make_scene(0, 0)
    s.depth[10:12, 10:20] = 70.0  # 70000 mm does not fit 16 bits
    far = int((s.depth * 1000 > 65535).sum())
    write(tmp_path, {"train": {"a": s}}, options(["depth"]))
    spec, _ = load_spec(tmp_path)
    assert spec.meta["formats"]["depth"]["overflow_pixels"] == far
    depth = MultiTaskDataset(tmp_path)[0]["depth"].numpy()[0]
    assert (depth[10:12, 10:20] == 0).all()


def test_rewrite_moves_image_between_class_folders(tmp_path):
    opts = options(["classification"])
    write_sample(tmp_path, "train", "k", make_scene(0, 0), opts)
    rec = write_sample(tmp_path, "train", "k", make_scene(0, 2), opts)
    finish_dataset(tmp_path, {"train": [rec]}, opts, "toy", {})
    assert len(list((tmp_path / "images").rglob("*.png"))) == 1
    assert int(MultiTaskDataset(tmp_path)[0]["classification"]) == 2


def test_tasks_argument_and_unknown_split(tmp_path):
    write(tmp_path, {"train": {"a": make_scene(0, 0)}}, options())
    sample = MultiTaskDataset(tmp_path, tasks=["depth"])[0]
    assert set(sample) == {"key", "image", "depth"}
    with pytest.raises(ConfigError, match="train"):
        MultiTaskDataset(tmp_path, split="validation")


# --------------------------------------------------------------------------- real data


def save_rgb(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def save_yaml(root: Path, spec: dict) -> Path:
    path = root / "dataset.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_real_data_styles(tmp_path):
    h, w = 16, 20
    save_rgb(tmp_path / "img/train2017/a.jpg", h, w, 0)
    save_rgb(tmp_path / "img/train2017/B.PNG", h, w, 1)
    c_rgb = save_rgb(tmp_path / "img/train2017/sub/c.png", h, w, 2)
    Image.fromarray(c_rgb[..., 0]).save(tmp_path / "img/train2017/g.png")  # grayscale image
    crowd = np.zeros((h, w), np.uint8, order="F")
    crowd[:5, :5] = 1
    crowd_rle = mask_utils.encode(crowd)
    c_mask = np.zeros((h, w), np.uint8, order="F")
    c_mask[3:9, 4:12] = 1
    c_rle = mask_utils.encode(c_mask)
    coco = {
        "images": [
            {"id": 7, "file_name": "train2017/a.jpg", "width": w, "height": h},
            {"id": 3, "file_name": "train2017/B.PNG", "width": w, "height": h},
            {"id": 9, "file_name": "train2017/sub/c.png", "width": w, "height": h},
            {"id": 11, "file_name": "train2017/missing.png", "width": w, "height": h},
        ],
        "categories": [
            {"id": 12, "name": "dog"},
            {"id": 3, "name": "person"},
            {"id": 7, "name": "car"},
        ],
        "annotations": [
            {  # polygon (a triangle), box overshooting the image by half a pixel
                "id": 1,
                "image_id": 7,
                "category_id": 12,
                "bbox": [10.0, 2.0, 10.5, 8.0],
                "segmentation": [[10, 2, 19, 2, 19, 9]],
                "iscrowd": 0,
            },
            {  # no mask: the box is the mask
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "bbox": [1, 1, 3, 2],
                "iscrowd": 0,
            },
            {  # crowd: not a training target, a region detections on are not counted
                "id": 3,
                "image_id": 7,
                "category_id": 7,
                "bbox": [0, 0, 5, 5],
                "iscrowd": 1,
                "segmentation": {
                    "size": [h, w],
                    "counts": crowd_rle["counts"].decode(),
                },
            },
            {  # uncompressed RLE
                "id": 4,
                "image_id": 9,
                "category_id": 7,
                "bbox": [4, 3, 8, 6],
                "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": _uncompressed(c_mask)},
            },
            {  # compressed RLE
                "id": 5,
                "image_id": 9,
                "category_id": 3,
                "bbox": [4, 3, 8, 6],
                "area": 33.5,  # COCO's area is taken as given
                "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": c_rle["counts"].decode()},
            },
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    # ADE-style: 0 = unlabeled, 1..K = classes.
    ade = np.random.default_rng(3).integers(0, 4, (h, w)).astype(np.uint8)
    (tmp_path / "ade").mkdir()
    Image.fromarray(ade).save(tmp_path / "ade/a.png")
    # KITTI-style depth: metres * 256 in 16 bits.
    kitti = np.random.default_rng(4).integers(0, 20000, (h, w)).astype(np.uint16)
    kitti[:3] = 0
    (tmp_path / "kitti").mkdir()
    Image.fromarray(kitti).save(tmp_path / "kitti/B.png")
    normals = np.zeros((h, w, 3), np.float32)
    normals[..., 2] = -1
    normals[0, 0] = np.nan
    (tmp_path / "nrm").mkdir()
    np.save(tmp_path / "nrm/c.npy", normals)
    save_yaml(
        tmp_path,
        {
            "name": "real",
            "splits": {
                "train": {
                    "images": "img",
                    "detection": {"format": "coco", "annotations": "ann.json"},
                    "segmentation": {"root": "ade", "reduce_zero_label": True},
                    "depth": {"root": "kitti", "scale": 256},
                    "normals": {"root": "nrm", "format": "npy"},
                }
            },
            "classes": {"segmentation": ["sky", "tree", "road"]},
        },
    )
    ds = MultiTaskDataset(tmp_path / "dataset.yaml", on_error="skip", masks=True)
    assert ds.skipped == []
    assert ds.keys == ["B", "a", "g", "c"]  # sorted by relative path (sub/c.png last)
    assert ds.classes["detection"] == ["person", "car", "dog"]  # sorted by category id
    items = {ds[i]["key"]: ds[i] for i in range(len(ds))}

    a = items["a"]
    assert a["image"].shape == (3, h, w)
    assert a["box_labels"].tolist() == [2, 0]
    # Clipped to the image (overshoot within the 1-pixel tolerance); the crowd region apart.
    np.testing.assert_allclose(a["boxes"].numpy(), [[10, 2, w, 10], [1, 1, 4, 3]])
    np.testing.assert_allclose(a["crowd_boxes"].numpy(), [[0, 0, 5, 5]])
    assert a["crowd_labels"].tolist() == [1]  # car
    # No "area" in the JSON: the polygon's area as pycocotools measures it, the box's area.
    poly = mask_utils.frPyObjects([[10, 2, 19, 2, 19, 9]], h, w)
    assert a["box_areas"].tolist() == [float(mask_utils.area(poly)[0]), 6.0]
    tri = a["instance_masks"][0].numpy()
    assert tri[2, 18] == 1 and tri[8, 11] == 0 and tri.sum() > 0
    assert a["instance_masks"][1].numpy().sum() == 3 * 2
    expected = ade.astype(np.int64) - 1
    expected[ade == 0] = 255
    np.testing.assert_array_equal(a["segmentation"].numpy(), expected)
    assert "depth" not in a and "normals" not in a  # partial labels

    b = items["B"]
    assert len(b["boxes"]) == 0 and b["instance_masks"].shape == (0, h, w)
    np.testing.assert_array_equal(b["depth"].numpy()[0], kitti / 256.0)
    assert "segmentation" not in b

    c = items["c"]
    np.testing.assert_array_equal(c["image"].permute(1, 2, 0).numpy(), c_rgb)
    assert c["box_labels"].tolist() == [1, 0]
    assert c["box_areas"].tolist() == [48.0, 33.5] and len(c["crowd_boxes"]) == 0
    for m in c["instance_masks"].numpy():
        np.testing.assert_array_equal(m, c_mask)
    n = c["normals"].numpy()
    assert n.shape == (3, h, w) and (n[:, 0, 0] == 0).all() and (n[2, 1:, :] == -1).all()

    g = items["g"]
    assert g["image"].shape == (3, h, w) and "boxes" not in g  # not listed in the COCO file
    report = ds.report()
    assert "4 boxes, 1 crowd regions" in report and "nothing skipped" in report


def _uncompressed(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] else counts


def test_imagefolder_classes_agree_across_splits(tmp_path):
    save_rgb(tmp_path / "train/zebra/1.png", 8, 8)
    save_rgb(tmp_path / "train/ant/2.png", 8, 8)
    save_rgb(tmp_path / "val/zebra/3.png", 8, 8)
    save_yaml(
        tmp_path,
        {
            "splits": {
                "train": {"images": "train", "classification": {}},
                "val": {"images": "val", "classification": {}},
            }
        },
    )
    train, val = MultiTaskDataset(tmp_path), MultiTaskDataset(tmp_path, split="val")
    assert train.classes["classification"] == val.classes["classification"] == ["ant", "zebra"]
    assert int(val[0]["classification"]) == 1


# --------------------------------------------------------------------------- bad input

H, W = 16, 20


def base_dataset(root: Path) -> dict:
    """Three images a, b, c with every label; returns the COCO dict (written by ``finish``)."""
    for i, key in enumerate("abc"):
        save_rgb(root / f"img/{key}.png", H, W, i)
        for folder in ("seg", "depth", "nrm"):
            (root / folder).mkdir(exist_ok=True)
        Image.fromarray(np.full((H, W), i, np.uint8)).save(root / f"seg/{key}.png")
        Image.fromarray(np.full((H, W), 1000 * (i + 1), np.uint16)).save(root / f"depth/{key}.png")
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(root / f"nrm/{key}.png")
    save_yaml(
        root,
        {
            "splits": {
                "train": {
                    "images": "img",
                    "detection": {"annotations": "ann.json"},
                    "segmentation": {"root": "seg"},
                    "depth": {"root": "depth"},
                    "normals": {"root": "nrm"},
                }
            },
            "classes": {"segmentation": ["x", "y", "z"]},
        },
    )
    return {
        "images": [
            {"id": i + 1, "file_name": f"{k}.png", "width": W, "height": H}
            for i, k in enumerate("abc")
        ],
        "categories": [{"id": 4, "name": "p"}, {"id": 9, "name": "q"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 4, "bbox": [1, 1, 4, 4], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 9, "bbox": [6, 2, 5, 5], "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 9, "bbox": [2, 2, 3, 3], "iscrowd": 0},
        ],
    }


def finish(root: Path, coco: dict | str) -> None:
    text = coco if isinstance(coco, str) else json.dumps(coco)
    (root / "ann.json").write_text(text)


def ann(coco: dict, ann_id: int) -> dict:
    return next(a for a in coco["annotations"] if a["id"] == ann_id)


def load_all(root: Path, mode: str) -> MultiTaskDataset:
    ds = MultiTaskDataset(root, on_error=mode)
    for i in range(len(ds)):
        ds[i]
    return ds


def test_base_dataset_is_clean(tmp_path):
    finish(tmp_path, base_dataset(tmp_path))
    ds = load_all(tmp_path, "skip")
    assert ds.skipped == [] and ds.keys == ["a", "b", "c"]
    assert ds.classes["detection"] == ["p", "q"]
    assert ds[0]["box_labels"].tolist() == [0, 1]
    load_all(tmp_path, "raise")


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")


def _resize(path: Path) -> None:
    img = Image.open(path)
    img.resize((W + 2, H)).save(path)


# (mutation, file whose name the error carries, a word of the problem, dropped sample key)
SAMPLE_CASES = {
    "corrupt image": (lambda r, c: _garbage(r / "img/b.png"), "b.png", "corrupt", "b"),
    "mask size": (lambda r, c: _resize(r / "seg/c.png"), "c.png", "size", "c"),
    "depth size": (lambda r, c: _resize(r / "depth/a.png"), "a.png", "size", "a"),
    "normals size": (lambda r, c: _resize(r / "nrm/b.png"), "b.png", "size", "b"),
    "depth 8-bit": (
        lambda r, c: Image.fromarray(np.full((H, W), 3, np.uint8)).save(r / "depth/c.png"),
        "c.png",
        "16-bit",
        "c",
    ),
    "segmentation RGB": (
        lambda r, c: Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(r / "seg/a.png"),
        "a.png",
        "mode RGB",
        "a",
    ),
    "class index": (
        lambda r, c: Image.fromarray(np.full((H, W), 7, np.uint8)).save(r / "seg/b.png"),
        "b.png",
        "class index",
        "b",
    ),
    "corrupt label": (lambda r, c: _garbage(r / "nrm/c.png"), "c.png", "corrupt", "c"),
    "image size vs COCO": (
        lambda r, c: c["images"][0].update(width=W + 5),
        "ann.json",
        "a.png",
        "a",
    ),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_bad_sample(tmp_path, case):
    mutate, name, word, dropped = SAMPLE_CASES[case]
    coco = base_dataset(tmp_path)
    mutate(tmp_path, coco)
    finish(tmp_path, coco)
    with pytest.raises(DataError) as err:
        load_all(tmp_path, "raise")
    assert name in str(err.value) and word in str(err.value)
    ds = load_all(tmp_path, "skip")
    assert ds.keys == [k for k in "abc" if k != dropped]
    assert len(ds.skipped) == 1
    path, reason = ds.skipped[0]
    assert path.endswith(name) and word in f"{path}: {reason}"
    assert name in ds.report()


def _no(field):
    return lambda c: ann(c, 11).pop(field)


# (mutation of the COCO dict, a word of the problem); annotation 11 on image a is the bad one
ANNOTATION_CASES = {
    "no bbox": (_no("bbox"), "bbox"),
    "no image_id": (_no("image_id"), "image_id"),
    "no category_id": (_no("category_id"), "category_id"),
    "unknown image_id": (lambda c: ann(c, 11).update(image_id=99), "image_id"),
    "unknown category_id": (lambda c: ann(c, 11).update(category_id=5), "category_id"),
    "zero width": (lambda c: ann(c, 11).update(bbox=[6, 2, 0, 5]), "width"),
    "negative height": (lambda c: ann(c, 11).update(bbox=[6, 2, 5, -1]), "height"),
    "outside": (lambda c: ann(c, 11).update(bbox=[W - 2, 2, 4, 5]), "outside"),
    "bad polygon": (lambda c: ann(c, 11).update(segmentation=[[1, 2, 3]]), "polygon"),
    "mask size": (
        lambda c: ann(c, 11).update(segmentation={"size": [H, W + 1], "counts": "0"}),
        "size",
    ),
}


@pytest.mark.parametrize("case", list(ANNOTATION_CASES))
def test_bad_annotation(tmp_path, case):
    mutate, word = ANNOTATION_CASES[case]
    coco = base_dataset(tmp_path)
    mutate(coco)
    finish(tmp_path, coco)
    with pytest.raises(DataError) as err:
        load_all(tmp_path, "raise")
    assert "ann.json" in str(err.value) and word in str(err.value)
    if "image_id" not in case:
        assert "annotation id 11" in str(err.value) and "a.png" in str(err.value)
    ds = load_all(tmp_path, "skip")
    assert ds.keys == ["a", "b", "c"]  # only the annotation is dropped
    assert ds[0]["box_labels"].tolist() == [0]
    assert len(ds[1]["boxes"]) == 1
    assert len(ds.skipped) == 1
    assert ds.skipped[0][0].endswith("ann.json") and word in ds.skipped[0][1]


def test_annotation_without_id(tmp_path):
    coco = base_dataset(tmp_path)
    ann(coco, 11).pop("id")
    finish(tmp_path, coco)
    with pytest.raises(DataError, match="'id'"):
        load_all(tmp_path, "raise")
    ds = load_all(tmp_path, "skip")
    assert ds[0]["box_labels"].tolist() == [0] and "'id'" in ds.skipped[0][1]


def test_image_entry_without_file_name(tmp_path):
    coco = base_dataset(tmp_path)
    coco["images"][1].pop("file_name")  # image b
    finish(tmp_path, coco)
    with pytest.raises(DataError, match="file_name"):
        load_all(tmp_path, "raise")
    ds = load_all(tmp_path, "skip")
    assert ds.keys == ["a", "b", "c"] and "boxes" not in ds[1]
    assert any("file_name" in reason for _, reason in ds.skipped)


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("{not json", "JSON"),
        (json.dumps({"images": [], "annotations": []}), "categories"),
        (json.dumps([1, 2]), "COCO"),
    ],
)
def test_unusable_coco_file(tmp_path, text, word):
    base_dataset(tmp_path)
    finish(tmp_path, text)
    with pytest.raises(DataError) as err:
        MultiTaskDataset(tmp_path)
    assert "ann.json" in str(err.value) and word in str(err.value)
    ds = load_all(tmp_path, "skip")  # detection is dropped, the other labels stay
    assert ds.keys == ["a", "b", "c"] and "boxes" not in ds[0] and "depth" in ds[0]
    assert ds.skipped[0][0].endswith("ann.json") and word in ds.skipped[0][1]


def test_repeated_stem_in_another_folder_is_keyed_by_path(tmp_path):
    finish(tmp_path, base_dataset(tmp_path))
    save_rgb(tmp_path / "img/more/b.jpg", H, W)
    ds = load_all(tmp_path, "skip")
    assert ds.skipped == [] and ds.keys == ["a", "b", "c", "more/b"]
    # The labels of b (flat label folders, COCO file_name b.png) are b.png's, by path.
    assert "depth" in ds[1] and "boxes" in ds[1]
    assert {"depth", "boxes", "segmentation"}.isdisjoint(ds[3])


def test_same_name_with_two_extensions(tmp_path):
    finish(tmp_path, base_dataset(tmp_path))
    save_rgb(tmp_path / "img/b.jpg", H, W)
    with pytest.raises(DataError) as err:
        MultiTaskDataset(tmp_path)
    assert "b.png" in str(err.value) and "b.jpg" in str(err.value)
    ds = load_all(tmp_path, "skip")
    assert ds.keys == ["a", "c"] and "duplicate" in ds.skipped[0][1]


def test_box_checked_against_the_image_when_the_json_has_no_size(tmp_path):
    coco = base_dataset(tmp_path)
    for img in coco["images"]:
        del img["width"], img["height"]
    ann(coco, 11)["bbox"] = [W - 2, 2, 4, 5]  # 2 pixels past the right edge
    ann(coco, 10)["bbox"] = [-0.5, 1, 4, 4]  # within the tolerance: clipped
    finish(tmp_path, coco)
    ds = MultiTaskDataset(tmp_path)  # the size is unknown until the image is read
    with pytest.raises(DataError, match=r"annotation id 11.*outside"):
        ds[0]
    ds = load_all(tmp_path, "skip")
    assert ds.keys == ["a", "b", "c"] and ds[0]["boxes"].tolist() == [[0, 1, 3.5, 5]]
    assert len(ds.skipped) == 1 and "outside" in ds.skipped[0][1]
