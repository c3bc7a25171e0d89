"""The store's task knowledge lives on the task classes: the header ``must label`` writes for
the four original tasks is unchanged, ``shards.py`` stores any kind by the encoding its header
records, surface normals round-trip (pseudo and real) and are labelled and trained on, and the
labelling settings' defaults come from the tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import must.store.shards as shards
from must.config import StudentConfig, TeachConfig, load_config
from must.data.source import DataSource
from must.errors import ConfigError, DataError
from must.stages.experiment import LabelStage
from must.stages.label import (
    LabelSettings,
    header_tasks,
    label_images,
    label_setting_defaults,
)
from must.stages.teach import teach
from must.stages.train import train_student
from must.store import PseudoLabelStore, Record, ShardWriter, StoreDataset
from must.tasks import build_task
from must.tasks.base import label_size
from must.tasks.normals import angles_deg
from tiny import TINY_MODEL, tiny_data

CLS, SEG = ["ball", "cube"], ["background", "floor", "ball"]

# The header must label writes for the four original tasks, as docs/store.md specifies it (its
# manifest example, with the settings must label records). Stores written before the task
# classes held this knowledge must resume (the writer refuses any other header) and
# re-labelling them must give the same bytes, so this literal may never change.
TODAYS_HEADER = {
    "format": "must-store/1",
    "tasks": {
        "classification": {
            "kind": "classification",
            "classes": CLS,
            "encoding": {"fields": {"cls_probs": "float16"}},
        },
        "detection": {
            "kind": "detection",
            "classes": CLS,
            "encoding": {
                "fields": {"det_boxes": "float32", "det_classes": "int16", "det_scores": "float16"},
                "box_format": "xyxy",
                "box_units": "pixels",
            },
        },
        "segmentation": {
            "kind": "segmentation",
            "classes": SEG,
            "encoding": {"fields": {"seg_map": "uint8"}, "ignore_index": 255},
        },
        "depth": {
            "kind": "depth",
            "classes": None,
            "encoding": {"fields": {"depth": "float16"}, "unit": "m", "invalid": 0},
        },
    },
    "teachers": [],
    "settings": {
        "temperature": 1.0,
        "det_threshold": 0.5,
        "seg_threshold": 0.5,
        "label_scale": 0.5,
        "keep_real": False,
    },
    "images": {"count": 2, "sha256": shards.keys_sha256(["a", "b"]), "source": "runs/pool"},
    "shard_size": 256,
}


def four_tasks() -> dict:
    return {
        "classification": build_task("classification", CLS),
        "detection": build_task("detection", CLS),
        "segmentation": build_task("segmentation", SEG),
        "depth": build_task("depth", None),
    }


def test_must_label_writes_the_same_header_for_the_four_tasks(tmp_path: Path) -> None:
    tasks = four_tasks()
    header = {
        "tasks": header_tasks(tasks),
        "teachers": [],
        "settings": LabelSettings(label_scale=0.5).for_tasks(reversed(tasks.values()), False),
        "images": {"source": "runs/pool"},
    }
    ShardWriter(tmp_path / "store", header, ["a", "b"])
    text = (tmp_path / "store" / "header.json").read_text(encoding="utf-8")
    assert text == json.dumps(TODAYS_HEADER, indent=2, ensure_ascii=False) + "\n"
    # Such a store reopens with the header written without encodings (the old callers' way).
    old_way = {**header, "tasks": {n: {"classes": t.classes or None} for n, t in tasks.items()}}
    assert ShardWriter(tmp_path / "store", old_way).header == TODAYS_HEADER


def test_shards_stores_any_kind_by_the_encoding_its_header_records(tmp_path: Path) -> None:
    header = {
        "tasks": {
            "heat": {"classes": None, "encoding": {"fields": {"t": "float16", "id": "int16"}}}
        }
    }
    writer = shards.ShardWriter(tmp_path / "s", header, ["a"])
    heat = {"t": np.full((2, 3), 21.5), "id": np.array([7, -3])}  # float64, int64 given
    with pytest.raises(DataError, match=r"'a': heat\.id has values outside int16"):
        writer.write_shard(0, [Record("a", 4, 6, {"heat": {**heat, "id": np.array([40000])}})])
    with pytest.raises(DataError, match=r"heat needs fields \['id', 't'\], got \['t'\]"):
        writer.write_shard(0, [Record("a", 4, 6, {"heat": {"t": heat["t"]}})])
    writer.write_shard(0, [Record("a", 4, 6, {"heat": heat})])
    writer.finalize()
    got = PseudoLabelStore(tmp_path / "s").get("a").labels["heat"]
    assert got["t"].dtype == np.float16 and got["id"].dtype == np.int16
    np.testing.assert_array_equal(got["t"], heat["t"])
    np.testing.assert_array_equal(got["id"], heat["id"])

    with pytest.raises(ConfigError, match=r"tasks\.heat\.encoding\.fields: give the fields"):
        shards.ShardWriter(tmp_path / "x", {"tasks": {"heat": {"classes": None}}}, ["a"])
    bad = {"tasks": {"heat": {"encoding": {"fields": {"t": "float64"}}}}}
    with pytest.raises(ConfigError, match=r"encoding\.fields\.t: .* not 'float64'"):
        shards.ShardWriter(tmp_path / "x", bad, ["a"])
    # must's writer knows the registered kinds' encodings; another kind must bring its own.
    with pytest.raises(ConfigError, match=r"tasks\.heat\.kind 'heat', one of \[.*'normals'"):
        ShardWriter(tmp_path / "x", {"tasks": {"heat": {"classes": None}}}, ["a"])
    with pytest.raises(ConfigError, match=r"tasks\.seg: at most 255 classes"):
        many = {"kind": "segmentation", "classes": [f"c{i}" for i in range(256)]}
        ShardWriter(tmp_path / "x", {"tasks": {"seg": many}}, ["a"])
    with pytest.raises(ConfigError, match=r"tasks\.detection\.classes: a detection task needs"):
        ShardWriter(tmp_path / "x", {"tasks": {"detection": {"classes": None}}}, ["a"])


def unit_field(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(3, *shape, generator=torch.manual_seed(seed)), dim=0
    )


def write_and_read(root: Path, fields: dict, image_size: tuple[int, int]) -> dict:
    writer = ShardWriter(root, {"tasks": {"normals": {"classes": None}}}, ["a"])
    writer.write_shard(0, [Record("a", *image_size, {"normals": fields})])
    writer.finalize()
    return PseudoLabelStore(root).get("a").labels["normals"]


def test_normals_round_trip_through_the_store_pseudo_and_real(tmp_path: Path) -> None:
    task = build_task("normals", None)
    image, scale = (16, 20), 0.5
    small = label_size(image, scale)

    # Pseudo: the teacher's unit vectors at its input size -> the label size, renormalised.
    pred = unit_field((12, 12), 0)
    fields = task.to_store(pred, image, (12, 12), {"label_scale": scale})
    stored = write_and_read(tmp_path / "pseudo", fields, image)["normals"]
    assert stored.dtype == np.float16 and stored.shape == (3, *small)
    np.testing.assert_array_equal(stored, fields["normals"])
    assert np.allclose(np.linalg.norm(stored.astype(np.float32), axis=0), 1, atol=2e-3)
    back = task.from_store({"normals": stored}, image)["normals"]
    assert back.shape == (3, *image) and back.dtype == torch.float32
    np.testing.assert_array_equal(back[:, ::2, ::2].numpy(), stored.astype(np.float32))

    # Real: 8-bit PNG normals (not quite unit) with invalid pixels, at the image's size.
    real = ((unit_field(image, 1) + 1) / 2 * 255).round() / 255 * 2 - 1
    real[:, :3, :5] = 0
    fields = task.label_to_store({"normals": real}, image)
    stored = write_and_read(tmp_path / "real", fields, image)["normals"]
    back = task.from_store({"normals": stored}, image)["normals"]
    assert (back[:, :3, :5] == 0).all()
    valid = back.norm(dim=0) > 0
    assert int(valid.sum()) == image[0] * image[1] - 15
    assert float(angles_deg(back[None], real[None])[0][valid].max()) < 0.1  # float16 rounding
    assert task.label_to_store({}, image) is None


def test_the_normals_checker_refuses_non_unit_and_misshapen_vectors(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "s", {"tasks": {"normals": {"classes": None}}}, ["a"])
    good = unit_field((4, 4), 2).numpy()
    cases = [
        (good * 2, r"'a': normals\.normals has vectors that are neither unit nor \(0, 0, 0\)"),
        (good[:2], r"normals\.normals has shape \(2, 4, 4\), expected \(3, h, w\)"),
        (good[0], r"normals\.normals must have 3 dimensions"),
    ]
    for value, message in cases:
        with pytest.raises(DataError, match=message):
            writer.write_shard(0, [Record("a", 4, 4, {"normals": {"normals": value}})])
    half = good.copy()
    half[:, 0, 0] = 0  # invalid pixels are (0, 0, 0)
    writer.write_shard(0, [Record("a", 4, 4, {"normals": {"normals": half}})])


def test_labelling_settings_and_their_defaults_come_from_the_tasks() -> None:
    defaults = LabelSettings()
    assert (defaults.temperature, defaults.det_threshold, defaults.seg_threshold) == (1.0, 0.5, 0.5)
    assert label_setting_defaults() == {
        "temperature": 1.0,
        "det_threshold": 0.5,
        "seg_threshold": 0.5,
    }
    stage = LabelStage()
    assert (stage.det_threshold, stage.seg_threshold, stage.temperature) == (0.5, 0.5, 1.0)
    # Only the labelled tasks' settings are recorded (normals and depth have none).
    tasks = [build_task("normals", None), build_task("segmentation", SEG)]
    assert LabelSettings(seg_threshold=0.25).for_tasks(tasks, True) == {
        "seg_threshold": 0.25,
        "label_scale": 1.0,
        "keep_real": True,
    }
    for given, message in (
        ({"det_threshold": 1.5}, r"det_threshold must be in \[0, 1\], got 1.5"),
        ({"temperature": -1.0}, "temperature must be positive, got -1.0"),
        ({"label_scale": 0.0}, r"label_scale must be in \(0, 1\], got 0.0"),
        ({"threshold": 0.5}, r"unknown labelling settings \['threshold'\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            LabelSettings(**given)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_normals_teacher_labels_a_store_a_student_trains_on(tmp_path: Path) -> None:
    cache = tmp_path / "data"
    train = ["train.warmup_steps=1", "train.max_steps=2", "train.val_every=2", "train.batch_size=4"]
    teacher = load_config(
        TeachConfig,
        "teach_depth_cpu",
        [*TINY_MODEL, *train, *tiny_data(cache, num=12), "task=normals", "data.dataset=novel"],
    )
    teach(teacher, tmp_path / "teacher", progress=False)
    store = tmp_path / "store"
    result = label_images(
        [str(tmp_path / "teacher")], DataSource(dataset="novel", cache=str(cache), num=12,
        render_size=32), store, shard_size=8, batch_size=4, workers=0, progress=False,
    )  # fmt: skip
    assert result.complete and result.records > 0

    header = json.loads((store / "header.json").read_text())
    assert header["tasks"]["normals"]["encoding"]["fields"] == {"normals": "float16"}
    assert "temperature" not in header["settings"]  # only the labelled tasks' settings
    dataset = StoreDataset(store)
    sample = dataset[0]
    normals = sample["normals"]
    assert normals.shape == (3, *sample["image"].shape[-2:])
    assert torch.allclose(normals.norm(dim=0), torch.ones(()), atol=2e-3)
    assert sample["label_origin"] == {"normals": "pseudo"}

    student = load_config(
        StudentConfig,
        "train_student_cpu",
        [*TINY_MODEL, *train, "data.image_size=32", f"data.stores=[{store}]"],
    )
    summary = train_student(student, tmp_path / "student", progress=False)
    assert set(summary["tasks"]) == {"normals"}
    assert np.isfinite(summary["info"]["test"]["normals"]["mean_angle"])
