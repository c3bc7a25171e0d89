"""Dataset layouts as real datasets ship them: per-class file numbering (CIFAR, ImageNet),
symbolic links, subsets of a folder, ImageNet's val labels file, COCO instances as semantic
maps, and depth with invalid codes, a maximum depth and pairing files (TUM, CSV)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from must.cli import main
from must.config import DataConfig, TeachConfig, load_config
from must.data.readers import MultiTaskDataset
from must.errors import ConfigError, DataError
from must.stages.teach import teach
from must.training.data import make_dataset
from tiny import TINY_MODEL, TINY_STEPS

H, W = 32, 32
CLASSES = ["cat", "dog", "frog"]


def save_rgb(path: Path, seed: int = 0, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def save_u16(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)


def save_yaml(root: Path, spec: dict) -> Path:
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    return root


def cifar_tree(root: Path, per_class: dict[str, int]) -> Path:
    """``images/{split}/{class}/{i:04d}.png``: every class numbers its files from 0."""
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            for i in range(n):
                # Class-coloured images, so that a classifier can learn them in a few steps.
                path = root / f"images/{split}/{name}/{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                rgb = np.zeros((H, W, 3), np.uint8)
                rgb[..., c] = 200 + i % 50
                Image.fromarray(rgb).save(path)
    splits = {s: {"images": f"images/{s}", "classification": {}} for s in per_class}
    return save_yaml(root, {"name": "cifar-like", "splits": splits})


# --------------------------------------------------------------------------- ImageFolder


def test_per_class_file_numbering_is_keyed_by_path(tmp_path, capsys):
    data = cifar_tree(tmp_path, {"train": 4, "val": 3})
    ds = MultiTaskDataset(data, split="val")
    assert len(ds) == 9 and ds.num_dropped == 0  # was: 6 of 9 skipped as duplicate stems
    assert ds.keys[:3] == ["cat/0000", "cat/0001", "cat/0002"]
    assert [int(ds[i]["classification"]) for i in range(len(ds))] == [0] * 3 + [1] * 3 + [2] * 3
    assert main(["data", "check", str(data), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "9 images" in out and "nothing skipped" in out


def test_per_class_file_numbering_trains_and_evaluates(tmp_path):
    data = cifar_tree(tmp_path / "d", {"train": 4, "val": 2})
    overrides = [*TINY_MODEL, *TINY_STEPS, f"data.dataset={data}"]
    cfg = load_config(TeachConfig, "teach_classification_cpu", overrides)
    summary = teach(cfg, tmp_path / "t", progress=False)
    assert summary["info"]["training"]["classification"]["train_images"] == 12
    out = tmp_path / "m.json"
    args = ["eval", str(tmp_path / "t"), "--data", str(data), "--split", "val", "--quiet"]
    assert main([*args, "--json", str(out)]) == 0
    assert "classification" in json.loads(out.read_text())


def test_mirrored_label_tree_and_coco_paths_match_by_path(tmp_path):
    """Repeated stems: labels are found by their path under the label folder; COCO file_name
    may be the path under the images folder."""
    for c, name in enumerate(CLASSES[:2]):
        save_rgb(tmp_path / f"img/{name}/0001.png", c)
        save_u16(tmp_path / f"depth/{name}/0001.png", np.full((H, W), 1000 * (c + 1)))
    coco = {
        "images": [
            {"id": 1, "file_name": "dog/0001.png", "width": W, "height": H},
            {"id": 2, "file_name": "cat/0001.jpg", "width": W, "height": H},  # other extension
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
        ],
        "categories": [{"id": 7, "name": "toy"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    split = {
        "images": "img",
        "classification": {},
        "depth": {"root": "depth"},
        "detection": {"annotations": "ann.json"},
    }
    save_yaml(tmp_path, {"splits": {"train": split}})
    ds = MultiTaskDataset(tmp_path, on_error="skip")
    assert ds.skipped == [] and ds.keys == ["cat/0001", "dog/0001"]
    cat, dog = ds[0], ds[1]
    assert float(cat["depth"].max()) == 1.0 and float(dog["depth"].max()) == 2.0
    assert cat["boxes"].shape == (0, 4) and dog["boxes"].tolist() == [[1, 1, 6, 6]]


def test_flat_labels_for_repeated_stems_are_refused_naming_the_images(tmp_path):
    for c, name in enumerate(CLASSES[:2]):
        save_rgb(tmp_path / f"img/{name}/0001.png", c)
    save_u16(tmp_path / "depth/0001.png", np.full((H, W), 1000))
    save_yaml(tmp_path, {"splits": {"train": {"images": "img", "depth": {"root": "depth"}}}})
    with pytest.raises(DataError) as err:
        MultiTaskDataset(tmp_path)
    message = str(err.value)
    assert "depth/0001.png" in message and "matches 2 images by file stem" in message
    assert "cat/0001.png" in message and "mirror the images folder" in message


def test_imagenet_val_labels_file(tmp_path):
    """ImageNet's val split: one flat folder and a labels file (Kaggle's LOC_val_solution.csv)."""
    for i, wnid in enumerate(["n01", "n02"]):
        save_rgb(tmp_path / f"train/{wnid}/{wnid}_{i}.JPEG", i)
    for i in range(3):
        save_rgb(tmp_path / f"val/ILSVRC2012_val_{i:08d}.JPEG", i)
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000000,n02 1 2 3 4 n02 5 6 7 8\n"
        "ILSVRC2012_val_00000001,n01 1 2 3 4\n"
        "ILSVRC2012_val_00000099,n01 1 2 3 4\n"  # not in this folder
    )
    splits = {
        "train": {"images": "train", "classification": {}},
        "val": {"images": "val", "classification": {"labels": "LOC_val_solution.csv"}},
    }
    save_yaml(tmp_path, {"splits": splits})
    ds = MultiTaskDataset(tmp_path, split="val", on_error="skip")
    assert ds.classes["classification"] == ["n01", "n02"] and ds.skipped == []
    assert [ds[i].get("classification") for i in range(3)] == [1, 0, None]
    report = ds.report()
    assert "1 image(s) without a classification label: ILSVRC2012_val_00000002.JPEG" in report
    assert "1 line(s) of LOC_val_solution.csv name no image" in report


# --------------------------------------------------------------------------- symbolic links


def test_symlinked_files_and_class_folders_are_read(tmp_path):
    store = tmp_path / "elsewhere"
    for i in range(2):
        save_rgb(store / f"cat/{i:04d}.png", i)
        save_rgb(store / f"dog/{i:04d}.png", 10 + i)
    data = tmp_path / "data"
    (data / "images/train/cat").mkdir(parents=True)
    for i in range(2):  # linked files
        os.symlink(store / f"cat/{i:04d}.png", data / f"images/train/cat/{i:04d}.png")
    os.symlink(store / "dog", data / "images/train/dog")  # a linked class folder
    os.symlink(data / "images/train", data / "images/train/dog/loop")  # a loop
    save_yaml(data, {"splits": {"train": {"images": "images/train", "classification": {}}}})
    ds = MultiTaskDataset(data, on_error="skip")
    assert ds.skipped == [] and ds.classes["classification"] == ["cat", "dog"]
    assert ds.keys == ["cat/0000", "cat/0001", "dog/0000", "dog/0001"]
    assert all(p.is_relative_to(data) for p in ds.image_paths)  # links not resolved away
    assert [int(ds[i]["classification"]) for i in range(4)] == [0, 0, 1, 1]


# --------------------------------------------------------------------------- subsets


def test_subset_of_a_folder_is_seeded_and_counted(tmp_path, capsys):
    data = cifar_tree(tmp_path, {"train": 10, "val": 2})
    whole = MultiTaskDataset(data)
    a = MultiTaskDataset(data, subset=7, subset_seed=0)
    again = MultiTaskDataset(data, subset=7, subset_seed=0)
    other = MultiTaskDataset(data, subset=7, subset_seed=1)
    assert len(a) == 7 and a.keys == again.keys and a.keys != other.keys
    assert set(a.keys) <= set(whole.keys) and a.keys == sorted(a.keys)  # reader order kept
    assert a.subset == {"images": 7, "of": 30, "seed": 0} and a.num_dropped == 0
    assert "random subset of 7 of 30 images (seed 0)" in a.report()
    assert len(MultiTaskDataset(data, subset=0.5)) == 15
    assert len(MultiTaskDataset(data, subset=100)) == 30

    cfg = DataConfig(dataset=str(data), subset={"train": 0.1})
    train = make_dataset(data, "train", cfg, train=True)
    val = make_dataset(data, "val", cfg, train=False)
    assert len(train) == 3 and len(val) == 6 and val.subset is None
    assert "cifar-like [train]: random subset of 3 of 30 images" in capsys.readouterr().out

    # num only counts rendered images: on a folder it is said, not silently ignored.
    noted = make_dataset(data, "train", DataConfig(dataset=str(data), num=5), train=True)
    assert len(noted) == 30 and any("data.subset" in n for n in noted.notes)
    for bad in (0, 1.5, -0.1, {"train": 0}):
        with pytest.raises(ValueError, match="subset"):
            DataConfig(dataset="x", subset=bad)


# --------------------------------------------------------------------------- COCO -> semantic


def test_coco_instances_rasterise_into_a_class_map(tmp_path):
    h, w = 6, 8
    save_rgb(tmp_path / "img/a.png", 0, (h, w))
    save_rgb(tmp_path / "img/b.png", 1, (h, w))
    crowd = np.zeros((h, w), np.uint8)
    crowd[4:6, 0:2] = 1  # bottom-left 2x2
    counts = []  # uncompressed RLE (column-major), as COCO writes crowd regions
    flat, value, run = crowd.flatten(order="F"), 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    small_mask = np.zeros((h, w), np.uint8)
    small_mask[1:3, 1:3] = 1
    small = mask_utils.encode(np.asfortranarray(small_mask))
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": w, "height": h},
            {"id": 2, "file_name": "b.png", "width": w, "height": h},
        ],
        "categories": [{"id": 3, "name": "table"}, {"id": 17, "name": "cup"}],
        "annotations": [
            # A polygon covering x 0..4, y 0..4 (pixel centres inside: columns/rows 0..3).
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 4],
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]], "iscrowd": 0},
            # A smaller cup on the table, written before it: the smaller one wins.
            {"id": 2, "image_id": 1, "category_id": 17, "bbox": [1, 1, 2, 2],
             "segmentation": {"size": [h, w], "counts": small["counts"].decode()},
             "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 17, "bbox": [0, 4, 2, 2],
             "segmentation": {"size": [h, w], "counts": counts}, "iscrowd": 1},
            # Only a box: which pixels is unknown, so they are ignored.
            {"id": 4, "image_id": 1, "category_id": 17, "bbox": [6, 0, 2, 2], "iscrowd": 0},
        ],
    }  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    seg = {"format": "coco", "annotations": "instances.json"}
    save_yaml(tmp_path, {"splits": {"train": {"images": "img", "segmentation": seg}}})
    ds = MultiTaskDataset(tmp_path, on_error="skip")
    assert ds.skipped == [] and ds.classes["segmentation"] == ["background", "table", "cup"]
    expected = np.zeros((h, w), np.int64)
    expected[0:4, 0:4] = 1  # table
    expected[1:3, 1:3] = 2  # cup, on top
    expected[4:6, 0:2] = 255  # crowd
    expected[0:2, 6:8] = 255  # box only
    np.testing.assert_array_equal(ds[0]["segmentation"].numpy(), expected)
    np.testing.assert_array_equal(ds[1]["segmentation"].numpy(), np.zeros((h, w)))  # no objects

    # Declared classes: categories by name; uncovered pixels ignored when background is null.
    seg["background"] = None
    save_yaml(
        tmp_path,
        {
            "splits": {"train": {"images": "img", "segmentation": seg}},
            "classes": {"segmentation": ["cup", "table"]},
        },
    )
    got = MultiTaskDataset(tmp_path)[0]["segmentation"].numpy()
    assert got[0, 0] == 1 and got[1, 1] == 0 and got[5, 7] == 255
    seg["background"] = "floor"
    save_yaml(
        tmp_path,
        {
            "splits": {"train": {"images": "img", "segmentation": seg}},
            "classes": {"segmentation": ["cup", "table"]},
        },
    )
    with pytest.raises(ConfigError, match="no class 'floor'"):
        MultiTaskDataset(tmp_path)


# --------------------------------------------------------------------------- depth


def test_depth_invalid_codes_and_max_depth(tmp_path):
    save_rgb(tmp_path / "img/a.png", size=(4, 4))
    raw = np.array([[0, 5000, 65535, 60000]] * 4, np.uint16)  # scale 5000: 0, 1, 13.1, 12 m
    save_u16(tmp_path / "depth/a.png", raw)
    depth = {"root": "depth", "scale": 5000, "invalid": [65535]}
    save_yaml(tmp_path, {"splits": {"train": {"images": "img", "depth": depth}}})
    got = MultiTaskDataset(tmp_path)[0]["depth"][0, 0].tolist()
    assert got == pytest.approx([0, 1, 0, 12])
    depth["max_depth"] = 10
    save_yaml(tmp_path, {"splits": {"train": {"images": "img", "depth": depth}}})
    assert MultiTaskDataset(tmp_path)[0]["depth"][0, 0].tolist() == pytest.approx([0, 1, 0, 0])
    depth["invalid"] = [70000]
    save_yaml(tmp_path, {"splits": {"train": {"images": "img", "depth": depth}}})
    with pytest.raises(ConfigError, match="not 16-bit values"):
        MultiTaskDataset(tmp_path)


@pytest.mark.parametrize("kind", ["tum", "csv"])
def test_depth_pairing_file(tmp_path, capsys, kind):
    """TUM RGB-D: rgb/ and depth/ frames have different timestamps, paired by a file."""
    stamps = [
        ("1305031102.175304", "1305031102.160407"),
        ("1305031102.211214", "1305031102.194330"),
    ]
    for i, (rgb, dep) in enumerate(stamps):
        save_rgb(tmp_path / f"rgb/{rgb}.png", i)
        save_u16(tmp_path / f"depth/{dep}.png", np.full((H, W), 5000 * (i + 1)))
    save_rgb(tmp_path / "rgb/1305031102.300000.png", 9)  # a frame nobody paired
    if kind == "tum":
        lines = ["# timestamp rgb timestamp depth"]
        lines += [f"{r} rgb/{r}.png {d} depth/{d}.png" for r, d in stamps]
        lines.append("1305031109.0 rgb/gone.png 1305031109.0 depth/gone.png")  # another part
        pairs = tmp_path / "associations.txt"
    else:
        pairs = tmp_path / "lists/pairs.csv"
        pairs.parent.mkdir()
        lines = ["image,depth"] + [f"../rgb/{r}.png,../depth/{d}.png" for r, d in stamps]
    pairs.write_text("\n".join(lines) + "\n")
    depth = {"pairs": str(pairs.relative_to(tmp_path)), "scale": 5000}
    save_yaml(tmp_path, {"splits": {"train": {"images": "rgb", "depth": depth}}})
    ds = MultiTaskDataset(tmp_path, on_error="skip")
    assert ds.skipped == [] and len(ds) == 3
    assert [float(ds[i]["depth"].max()) for i in range(2)] == [1.0, 2.0]
    assert "depth" not in ds[2]
    assert main(["data", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 image(s) without a depth label: 1305031102.300000.png" in out
    if kind == "tum":
        assert "1 line(s) of associations.txt name no image" in out
    # A pair naming a depth file that is not there is a problem.
    (tmp_path / f"depth/{stamps[0][1]}.png").unlink()
    with pytest.raises(DataError, match=r"line \d+: depth file .* not found"):
        MultiTaskDataset(tmp_path)


def test_depth_source_needs_root_or_pairs(tmp_path):
    save_rgb(tmp_path / "img/a.png")
    save_yaml(tmp_path, {"splits": {"train": {"images": "img", "depth": {"scale": 1000}}}})
    with pytest.raises(ConfigError, match="give one of root"):
        MultiTaskDataset(tmp_path)
