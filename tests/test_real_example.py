"""The real-data example (configs/experiments/real_example.yaml) end to end: Fashion-MNIST
as an ImageFolder with per-class numbering (from Debian's ``dataset-fashion-mnist``, else a
generated stand-in), a COCO folder (mixed image sizes, polygons, RLE, a crowd region,
category ids 3 and 7) for detection and COCO segmentation, and an NYU-style folder (16-bit
depth with an invalid code, PNG class maps, scenes numbering their frames from 1)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from must.cli import main
from must.data.importers import (
    FASHION_MNIST_CLASSES,
    fashion_mnist_available,
    import_fashion_mnist,
    read_idx,
)
from must.errors import ConfigError
from must.store import PseudoLabelStore

SIZES = [(40, 56), (48, 32), (36, 36), (56, 44)]  # (height, width): mixed shapes
CATEGORIES = [{"id": 3, "name": "box"}, {"id": 7, "name": "disc"}]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def write_coco(root: Path, split: str, num: int, seed: int) -> None:
    """Images with a box (polygon), a disc (compressed RLE) and, on every third image, a
    crowd region (uncompressed RLE); pixels and masks come from the same arrays."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num):
        h, w = SIZES[i % len(SIZES)]
        rgb = np.full((h, w, 3), 40, np.uint8)
        rgb[..., 2] = np.linspace(30, 90, w, dtype=np.uint8)
        y0, x0 = int(rng.integers(0, h // 3)), int(rng.integers(0, w // 3))
        bh, bw = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
        box = np.zeros((h, w), bool)
        box[y0 : y0 + bh, x0 : x0 + bw] = True
        yy, xx = np.mgrid[:h, :w]
        r = min(h, w) // 6
        cy, cx = h - r - 2, w - r - 2
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        disc &= ~box
        rgb[box] = (220, 60, 40)
        rgb[disc] = (40, 200, 80)
        name = f"{split}_{i:03d}.png"
        Image.fromarray(rgb).save(root / "images" / split / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
        rle = mask_utils.encode(np.asfortranarray(disc.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        ys, xs = np.nonzero(disc)
        disc_box = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
        for cat, seg, bbox, area in (
            (3, [poly], [x0, y0, bw, bh], bw * bh),
            (7, rle, disc_box, int(disc.sum())),
        ):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                 "bbox": bbox, "area": area, "segmentation": seg, "iscrowd": 0}
            )  # fmt: skip
        if i % 3 == 0:
            crowd = np.zeros((h, w), np.uint8)
            crowd[h - 6 :, : w // 3] = 1
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": 3,
                 "bbox": [0, h - 6, w // 3, 6], "area": int(crowd.sum()),
                 "segmentation": uncompressed_rle(crowd), "iscrowd": 1}
            )  # fmt: skip
    file = root / "annotations" / f"instances_{split}.json"
    file.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": CATEGORIES}))  # fmt: skip


def make_coco(root: Path) -> Path:
    for split, num, seed in (("train", 12, 0), ("val", 4, 1)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations").mkdir(exist_ok=True)
        write_coco(root, split, num, seed)
    splits = {
        s: {
            "images": f"images/{s}",
            "detection": {"annotations": f"annotations/instances_{s}.json"},
            "segmentation": {"format": "coco", "annotations": f"annotations/instances_{s}.json"},
        }
        for s in ("train", "val")
    }
    (root / "dataset.yaml").write_text(yaml.safe_dump({"name": "toy-coco", "splits": splits}))
    return root


def make_nyu(root: Path) -> Path:
    """Two scenes per split, frames numbered from 0001 in each; depth in millimetres, 65535
    where the sensor saturated (declared invalid), 0 where it saw nothing."""
    for split, frames in (("train", 6), ("val", 2), ("test", 2)):
        for scene in ("scene_a", "scene_b"):
            for f in range(1, frames + 1):
                h, w = SIZES[f % len(SIZES)]
                depth = np.tile(np.linspace(3000, 1000, h, dtype=np.uint16)[:, None], (1, w))
                seg = np.where(np.arange(h)[:, None] > h // 2, 0, 1).repeat(w, 1)
                y0, x0 = h // 4, w // 3
                depth[y0 : y0 + h // 4, x0 : x0 + w // 4] = 600  # the object, nearer
                seg[y0 : y0 + h // 4, x0 : x0 + w // 4] = 2
                depth[0, :] = 65535
                depth[:, 0] = 0
                rgb = np.stack([seg * 90 + 20, depth // 20 % 256, np.full_like(seg, 80)], -1)
                rel = Path(split) / scene / f"{f:04d}.png"
                for folder, array in (
                    ("images", rgb.astype(np.uint8)),
                    ("depth", depth),
                    ("segmentation", seg.astype(np.uint8)),
                ):
                    (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(array).save(root / folder / rel)
    splits = {
        s: {
            "images": f"images/{s}",
            "depth": {"root": f"depth/{s}", "scale": 1000, "invalid": [65535], "max_depth": 10},
            "segmentation": {"root": f"segmentation/{s}"},
        }
        for s in ("train", "val", "test")
    }
    spec = {"name": "toy-nyu", "classes": {"segmentation": ["floor", "wall", "object"]}}
    (root / "dataset.yaml").write_text(yaml.safe_dump({**spec, "splits": splits}))
    for split in splits.values():  # the depth teacher's view: depth labels only
        del split["segmentation"]
    (root / "depth.yaml").write_text(yaml.safe_dump({"name": "toy-nyu", "splits": splits}))
    return root


def make_fashion(root: Path) -> tuple[Path, bool]:
    """Fashion-MNIST through the importer when Debian's files are there; else a generated
    ImageFolder of the same layout (a class-dependent stripe pattern, learnable)."""
    if fashion_mnist_available():
        code = main(["data", "import", "fashion-mnist", "--out", str(root),
                     "--num-per-class", "30", "--val-per-class", "5", "--test-per-class", "20"])  # fmt: skip
        assert code == 0
        return root, True
    warnings.warn(
        "Fashion-MNIST unavailable (install Debian's dataset-fashion-mnist): the real-data "
        "example ran on generated images",
        stacklevel=2,
    )
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("val", 5), ("test", 20)):
        for c, name in enumerate(FASHION_MNIST_CLASSES):
            for k in range(1, n + 1):
                img = rng.integers(0, 60, (28, 28)).astype(np.uint8)
                img[:, c * 2 : c * 2 + 8] += 150
                path = root / "images" / split / name / f"{k:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)
    splits = {s: {"images": f"images/{s}", "classification": {}} for s in ("train", "val", "test")}
    spec = {"name": "fashion-mnist", "classes": {"classification": FASHION_MNIST_CLASSES}}
    (root / "dataset.yaml").write_text(yaml.safe_dump({**spec, "splits": splits}))
    return root, False


@pytest.mark.slow
def test_real_example_runs_every_stage_on_dataset_folders(tmp_path):
    data = tmp_path / "data"
    _, real = make_fashion(data / "fashion-mnist")
    make_coco(data / "coco")
    make_nyu(data / "nyu")
    run = tmp_path / "run"

    assert main(["run", "real_example", "--out", str(run), f"data_root={data}", "--quiet"]) == 0

    status = json.loads((run / "stages.json").read_text())
    assert list(status) == ["teachers", "label", "student", "transfer", "report"]
    assert all(s["status"] == "done" for s in status.values())
    assert (run / "report.md").is_file()
    # The classification teacher learnt the real photos: well above chance (10 classes).
    summary = json.loads((run / "teachers" / "classification" / "summary.json").read_text())
    top1 = summary["info"]["test"]["classification"]["top1"]
    assert top1 > 0.25, (real, top1)
    # Per-class numbering: the teacher's own set is stored under class-path keys.
    keys = PseudoLabelStore(run / "stores" / "classification").keys
    assert "coat/0001" in keys and "bag/0001" in keys
    assert len(keys) == 10 * 30
    # The pool is the COCO folder's train split: mixed sizes, every image labelled.
    pool = PseudoLabelStore(run / "stores" / "pool")
    assert len(pool.keys) == 12
    assert set(pool.tasks) == {"classification", "detection", "segmentation", "depth"}
    # The NYU-style frames (scene_a/0001, scene_b/0001, ...) are keyed by path too.
    assert "scene_a/0001" in PseudoLabelStore(run / "stores" / "depth").keys
    # Transfer is scored on the NYU-style test split, and the report has its table.
    report = (run / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| student |"))
    assert "–" not in row.split("|")[2], row


def test_data_root_must_be_given(tmp_path):
    with pytest.raises(ConfigError, match="data_root"):
        from must.stages.experiment import load_experiment

        load_experiment("real_example")


def test_importer_writes_per_class_numbering_from_idx_files(tmp_path):
    """The importer on IDX files written here (the Debian files are not needed): per-class
    numbering, val held out of the training file, classes in the files' label order."""
    src = tmp_path / "idx"
    src.mkdir()
    rng = np.random.default_rng(0)

    def idx(name: str, array: np.ndarray) -> None:
        code = 0x08
        header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
        (src / name).write_bytes(header + array.astype(np.uint8).tobytes())

    train_labels = np.repeat(np.arange(10), 4)
    rng.shuffle(train_labels)
    train = rng.integers(0, 256, (40, 28, 28))
    train[:, 0, 0] = np.arange(40)  # each image tells which one it is
    idx("train-images-idx3-ubyte", train)
    idx("train-labels-idx1-ubyte", train_labels)
    idx("t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    idx("t10k-labels-idx1-ubyte", np.repeat(np.arange(10), 2))
    assert read_idx(src / "train-images-idx3-ubyte").shape == (40, 28, 28)

    out = tmp_path / "fm"
    import_fashion_mnist(out, source=src, num_per_class=2, val_per_class=1)
    for split, n in (("train", 2), ("val", 1), ("test", 2)):
        for name in FASHION_MNIST_CLASSES:
            files = sorted(p.name for p in (out / "images" / split / name).iterdir())
            assert files == [f"{k:04d}.png" for k in range(1, n + 1)]
    # val is the last image of each class in the training file, train the first ones.
    first_coat = int(np.flatnonzero(train_labels == 4)[0])
    last_coat = int(np.flatnonzero(train_labels == 4)[-1])
    assert np.asarray(Image.open(out / "images/train/coat/0001.png"))[0, 0] == first_coat
    assert np.asarray(Image.open(out / "images/val/coat/0001.png"))[0, 0] == last_coat
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert spec["classes"]["classification"] == FASHION_MNIST_CLASSES
    assert main(["data", "check", str(out), "--split", "val"]) == 0
    # A second import is refused; the package missing is named.
    with pytest.raises(ConfigError, match="overwrite"):
        import_fashion_mnist(out, source=src)
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        import_fashion_mnist(tmp_path / "other", source=tmp_path / "nowhere")
