"""Bad data through every verb that reads datasets: 16-bit images, label files of another
format, evaluations with nothing to measure, skip mode's report and counts, single-image
batches, COCO files naming missing images or repeating ids, suspicious data, and folders
without a dataset description. Each case ends in a clear message, a counted skip or a
warning, never a traceback or a silent NaN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from must.checkpoint import save_model
from must.cli import main
from must.config import DataConfig, TeachConfig, load_config
from must.data.readers import MultiTaskDataset, read_image
from must.errors import ConfigError, DataError
from must.models.model import MultiTaskModel
from must.stages.evaluate import NothingToMeasure, evaluate
from must.stages.teach import teach
from must.tasks import build_task
from must.training.data import make_dataset, make_loader
from tiny import TINY_MODEL, TINY_STEPS, tiny_backbone

H, W = 32, 32
TEACH = [*TINY_MODEL, *TINY_STEPS]


def save_rgb(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def save_depth(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W), value, np.uint16)).save(path)


def make_dataset_folder(
    root: Path,
    sizes: dict[str, int],
    depth: int = 1500,
    normals: int | None = None,
    detection: bool = False,
) -> Path:
    """Splits of ``sizes[split]`` images ``{split}_{i}`` with depth (every pixel ``depth``),
    optionally normals (every pixel the RGB value ``normals``) and COCO boxes (one each)."""
    splits = {}
    for split, n in sizes.items():
        entry: dict = {"images": f"img/{split}", "depth": {"root": "depth"}}
        coco: dict = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "p"}]}
        for i in range(n):
            key = f"{split}_{i}"
            save_rgb(root / f"img/{split}/{key}.png", i)
            save_depth(root / f"depth/{key}.png", depth)
            if normals is not None:
                (root / "nrm").mkdir(exist_ok=True)
                rgb = np.full((H, W, 3), normals, np.uint8)
                Image.fromarray(rgb).save(root / f"nrm/{key}.png")
            coco["images"].append({"id": i + 1, "file_name": f"{key}.png", "width": W, "height": H})
            coco["annotations"].append(
                {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 10, 10]}
            )
        if normals is not None:
            entry["normals"] = {"root": "nrm"}
        if detection:
            (root / f"{split}.json").write_text(json.dumps(coco))
            entry["detection"] = {"annotations": f"{split}.json"}
        splits[split] = entry
    (root / "dataset.yaml").write_text(yaml.safe_dump({"name": "bad", "splits": splits}))
    return root


def checkpoint(root: Path, tasks: dict[str, list[str] | None]) -> Path:
    """An untrained tiny model of these tasks, saved as must saves a trained one."""
    model = MultiTaskModel(tiny_backbone(), {t: build_task(t, c, None) for t, c in tasks.items()})
    out = root / ("ckpt_" + "_".join(tasks))
    save_model(model, out, {"image_size": H})
    return out


def teach_cfg(data: Path, task: str = "depth", *extra: str) -> TeachConfig:
    return load_config(TeachConfig, f"teach_{task}_cpu", [*TEACH, f"data.dataset={data}", *extra])


# --------------------------------------------------------------------------- 16-bit images


def test_16bit_grey_image_is_scaled_by_its_range_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = read_image(tmp_path / "g16.png")
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    expected = np.round(ramp.astype(np.float64) * 255 / 65535)
    assert np.abs(rgb[..., 0] - expected).max() == 0
    assert (rgb[..., 0] == rgb[..., 2]).all()
    assert (rgb == 255).mean() < 0.01  # was 99.6% white (clipped at 255)
    # Mode I (how PIL opens some 16-bit files) holding 16-bit values: the same rule.
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "g32.tif")
    assert (read_image(tmp_path / "g32.tif") == rgb).all()


def test_float_and_out_of_range_images_are_refused_naming_file_and_mode(tmp_path):
    Image.fromarray(np.ones((H, W), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: image of mode F"):
        read_image(tmp_path / "f.tif")
    Image.fromarray(np.full((H, W), 70000, np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big\.tif: image of mode I has values 70000"):
        read_image(tmp_path / "big.tif")


# --------------------------------------------------------------------------- label files


def test_label_file_of_another_format_is_reported_not_ignored(tmp_path, capsys):
    data = make_dataset_folder(tmp_path / "d", {"train": 3})
    (data / "depth/train_1.png").unlink()
    np.save(data / "depth/train_1.npy", np.ones((H, W), np.float32))
    (data / "depth/notes.txt").write_text("files of no image are not labels: left alone")
    with pytest.raises(DataError, match=r"train_1\.npy: depth label file is not a \.png file"):
        MultiTaskDataset(data)
    ds = MultiTaskDataset(data, on_error="skip")
    assert ds.keys == ["train_0", "train_2"] and ds.num_dropped == 1
    assert [Path(p).name for p, _ in ds.skipped] == ["train_1.npy"]
    assert main(["data", "check", str(data)]) == 1
    out = capsys.readouterr().out
    assert "train_1.npy" in out and "1 of 3 images dropped" in out


def test_label_keep_real_refuses_a_label_file_of_another_format(tmp_path, capsys):
    data = make_dataset_folder(tmp_path / "d", {"train": 2})
    (data / "depth/train_1.png").unlink()
    np.save(data / "depth/train_1.npy", np.ones((H, W), np.float32))
    ckpt = checkpoint(tmp_path, {"depth": None})
    argv = ["label", "--teacher", str(ckpt), "--images", str(data), "--out", str(tmp_path / "s")]
    assert main([*argv, "--keep-real", "--quiet", "--workers", "0"]) == 2
    assert "train_1.npy" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    ("tasks", "words"),
    [
        ({"depth": None}, "depth: nothing valid to measure, no label pixel holds a valid depth"),
        ({"normals": None}, "normals: nothing valid to measure, every label pixel is (0, 0, 0)"),
        ({"detection": ["p"]}, "detection: nothing valid to measure, no image has a ground-truth"),
    ],
)
def test_eval_with_nothing_valid_to_measure_fails_naming_split_and_task(
    tmp_path, capsys, tasks, words
):
    data = make_dataset_folder(tmp_path / "d", {"test": 2}, depth=0, normals=0, detection=True)
    coco = json.loads((data / "test.json").read_text())
    (data / "test.json").write_text(json.dumps({**coco, "annotations": []}))
    ckpt = checkpoint(tmp_path, tasks)
    assert main(["eval", str(ckpt), "--data", str(data), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "split 'test'" in captured.err and words in captured.err
    assert "nan" not in captured.out and "-1.0000" not in captured.out


def test_eval_of_a_split_without_labels_of_the_task_fails(tmp_path, capsys):
    data = make_dataset_folder(tmp_path / "d", {"test": 1})
    for f in (data / "depth").iterdir():
        f.unlink()  # the folder is there, no image has a depth file
    ckpt = checkpoint(tmp_path, {"depth": None})
    assert main(["eval", str(ckpt), "--data", str(data), "--quiet"]) == 2
    assert "depth: no image of the split has a depth label" in capsys.readouterr().err


def test_eval_shows_what_was_measured_before_failing_on_the_rest(tmp_path, capsys):
    data = make_dataset_folder(tmp_path / "d", {"test": 1}, normals=0)  # valid depth
    ckpt = checkpoint(tmp_path, {"depth": None, "normals": None})
    with pytest.raises(NothingToMeasure) as err:
        evaluate(ckpt, str(data), progress=False)
    assert list(err.value.results) == ["depth"] and "normals" in str(err.value)
    out = tmp_path / "m.json"
    assert main(["eval", str(ckpt), "--data", str(data), "--quiet", "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert "abs_rel" in captured.out and "normals: nothing valid" in captured.err
    assert not out.exists()


# --------------------------------------------------------------------------- skip mode


def test_skip_mode_prints_what_it_dropped_at_the_end_and_keeps_it(tmp_path, capsys):
    data = make_dataset_folder(tmp_path / "d", {"train": 5, "val": 3})
    (data / "img/train/train_3.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (data / "img/val/val_1.png").write_bytes(b"not an image")
    out = tmp_path / "t"
    argv = ["teach", "teach_depth_cpu", *TEACH, f"data.dataset={data}", "data.skip_bad=true"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "bad [train]: skipped 1 (1 of 5 images dropped)" in printed
    assert "train_3.png: corrupt or unreadable image" in printed
    assert "bad [val]: skipped 1 (1 of 3 images dropped)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["split"], Path(s["path"]).name) for s in summary["info"]["skipped"]] == [
        ("train", "train_3.png"),
        ("val", "val_1.png"),
    ]


def test_skip_mode_stops_clearly_when_every_sample_of_a_split_is_dropped(tmp_path, capsys):
    data = make_dataset_folder(tmp_path / "d", {"train": 3, "val": 2})
    for i in range(3):
        (data / f"img/train/train_{i}.png").write_bytes(b"not an image")
    argv = ["teach", "teach_depth_cpu", *TEACH, f"data.dataset={data}", "data.skip_bad=true"]
    assert main([*argv, "--out", str(tmp_path / "t"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "all 3 samples of split 'train' were dropped: " in err
    assert "train_0.png: corrupt or unreadable image" in err and "Traceback" not in err


def test_skip_mode_keeps_the_coco_error_when_the_file_is_unusable(tmp_path):
    data = make_dataset_folder(tmp_path / "d", {"train": 2, "val": 2}, detection=True)
    (data / "train.json").write_text('{"images": [}')
    with pytest.raises(ConfigError) as err:
        teach(teach_cfg(data, "detection", "data.skip_bad=true"), tmp_path / "t", progress=False)
    message = str(err.value)
    assert "no detection labels" in message and "train.json: not valid JSON" in message
    assert "line 1 column 13" in message


def test_skip_counts_every_image_dropped_for_a_repeated_name(tmp_path, capsys):
    data = make_dataset_folder(tmp_path / "d", {"train": 5})
    for i in range(4):  # train_0..3 as .png and .jpg in one folder: 8 images dropped
        save_rgb(data / f"img/train/train_{i}.jpg", i)
    ds = MultiTaskDataset(data, on_error="skip")
    assert ds.keys == ["train_4"] and ds.num_found == 9 and ds.num_dropped == 8
    assert len(ds.skipped) == 8 and all("duplicate image" in r for _, r in ds.skipped)
    assert {Path(p).name for p, _ in ds.skipped} == {
        f"train_{i}{ext}" for i in range(4) for ext in (".png", ".jpg")
    }
    main(["data", "check", str(data)])
    assert "skipped 8 (8 of 9 images dropped)" in capsys.readouterr().out


# --------------------------------------------------------------------------- BatchNorm


def test_training_never_gets_a_batch_of_one_image(tmp_path, capsys):
    data = make_dataset_folder(tmp_path / "d", {"train": 1, "val": 1})
    cfg = DataConfig(dataset=str(data), image_size=H)
    tasks = {"depth": build_task("depth", None, None)}
    with pytest.raises(ConfigError, match=r"dataset\.yaml: split 'train' has 1 image"):
        make_loader(make_dataset(data, "train", cfg, True), tasks, 4, 0, True)
    val = make_dataset(data, "val", cfg, False)
    assert len(make_loader(val, tasks, 4, 0, False)) == 1  # evaluation runs in eval mode
    argv = ["teach", "teach_depth_cpu", *TEACH, f"data.dataset={data}"]
    assert main([*argv, "--out", str(tmp_path / "t"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "split 'train' has 1 image(s); training needs at least 2" in err
    assert "Expected more than 1 value" not in err
    with pytest.raises(ConfigError, match="train.batch_size is 1"):
        make_loader(val, tasks, 1, 0, True)
    # A last batch is dropped when it would be short: never a batch of one.
    bigger = make_dataset(make_dataset_folder(tmp_path / "e", {"train": 5}), "train", cfg, True)
    assert [len(b.keys) for b in make_loader(bigger, tasks, 4, 0, True)] == [4]


# --------------------------------------------------------------------------- COCO files


def test_coco_image_entry_without_its_file_is_named(tmp_path, capsys):
    data = make_dataset_folder(tmp_path / "d", {"train": 3}, detection=True)
    (data / "img/train/train_1.png").unlink()
    (data / "depth/train_1.png").unlink()
    ds = MultiTaskDataset(data)
    assert ds.keys == ["train_0", "train_2"]
    assert any("1 image file(s) listed in train.json not found" in n for n in ds.notes)
    assert any("train_1.png" in n for n in ds.notes)
    main(["data", "check", str(data)])
    assert "warning: detection: 1 image file(s)" in capsys.readouterr().out


def test_duplicate_annotation_ids_are_problems(tmp_path):
    data = make_dataset_folder(tmp_path / "d", {"train": 3}, detection=True)
    coco = json.loads((data / "train.json").read_text())
    coco["annotations"][2]["id"] = 2  # annotations 2 and 3 now share id 2
    (data / "train.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"train\.json: annotation id 2 is listed twice"):
        MultiTaskDataset(data)
    ds = MultiTaskDataset(data, on_error="skip")
    assert len(ds.skipped) == 1 and "annotation id 2 is listed twice" in ds.skipped[0][1]
    assert ds.keys == ["train_0", "train_1", "train_2"]
    assert [len(ds[i]["boxes"]) for i in range(3)] == [1, 1, 0]


# --------------------------------------------------------------------------- warnings


def test_one_class_classification_set_is_warned_about(tmp_path, capsys):
    for i in range(2):
        save_rgb(tmp_path / f"img/only/{i}.png", i)
    spec = {"splits": {"train": {"images": "img", "classification": {}}}}
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(spec))
    ds = MultiTaskDataset(tmp_path)
    assert any("a single class ('only')" in n and "classifier of one class" in n for n in ds.notes)
    assert main(["data", "check", str(tmp_path)]) == 0  # legal: a warning, not an error
    assert "warning: classification: a single class" in capsys.readouterr().out


def test_task_without_labelled_image_is_warned_about_and_teach_prints_warnings(tmp_path, capsys):
    data = make_dataset_folder(tmp_path / "d", {"train": 4, "val": 2})
    for i in range(2):
        (data / f"depth/val_{i}.png").unlink()
    ds = MultiTaskDataset(data, split="val")
    assert ds.notes == ["depth: no image of split 'val' has a depth label"]
    teach(teach_cfg(data), tmp_path / "t", progress=False)
    assert "warning: bad [val]: depth: no image of split 'val' has a depth label" in (
        capsys.readouterr().out
    )


# --------------------------------------------------------------------------- plain folders


def test_a_folder_of_images_without_description_is_explained(tmp_path, capsys):
    for i in range(2):
        save_rgb(tmp_path / f"photos/{i}.jpg", i)
    ckpt = checkpoint(tmp_path, {"depth": None})
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "photos"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "photos: this folder has no manifest.json or dataset.yaml" in err
    assert "docs/data.md" in err and "Is a directory" not in err
    with pytest.raises(ConfigError, match="no manifest.json or dataset.yaml"):
        DataConfig(dataset=str(tmp_path / "photos")).prepare()
    argv = ["teach", "teach_depth_cpu", f"data.dataset={tmp_path / 'photos'}"]
    assert main([*argv, "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert "no manifest.json or dataset.yaml" in capsys.readouterr().err


class _BadImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DataError("images/cat/0001.png", "corrupt or unreadable image (OSError: truncated)")


def test_a_data_error_in_a_loader_worker_reaches_the_user_as_that_error():
    # torch re-raises a worker's exception as type(message-with-traceback); the CLI must still
    # get a DataError naming the file, not a RuntimeError with a traceback.
    loader = torch.utils.data.DataLoader(_BadImages(), num_workers=1)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert err.value.path == "images/cat/0001.png"
    assert str(err.value) == "images/cat/0001.png: corrupt or unreadable image (OSError: truncated)"
