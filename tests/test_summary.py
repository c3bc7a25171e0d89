"""The typed run info: what every verb records, read back through attributes; files written
before it (plain dicts with the same keys), or with keys it does not know, keep loading."""

from __future__ import annotations

import json
import math

import pytest

from must.errors import ConfigError
from must.summary import RunInfo, run_info

# The info of a teacher's summary.json as must wrote it before the typed summary (same keys).
OLD_TEACHER = {
    "stage": "teacher",
    "init": None,
    "freeze_backbone": False,
    "training": {
        "segmentation": {
            "dataset": "runs/data/rooms_n3000_px64_seed0",
            "dataset_name": "rooms",
            "train_images": 2400,
            "batch_size": 16,
            "lr": 0.02,
            "image_size": 64,
        }
    },
    "image_size": 64,
    "resize": "square",
    "skipped": [{"split": "train", "path": "a.png", "reason": "truncated"}],
    "val": {"segmentation": {"miou": 0.38, "pixel_acc": 0.9}},
    "test": {"segmentation": {"miou": float("nan"), "pixel_acc": 0.91}},
    "train_seconds": 168.2,
    "images_per_second": 76.1,
    "steps": 800,
    "resumed_from_step": None,
    "best_checkpoint": "best.ckpt",
    "precision": "32-true",
    "config": {"task": "segmentation"},
}


def test_an_older_teacher_summary_reads_through_attributes_and_writes_back_unchanged():
    info = run_info({"info": OLD_TEACHER}, "teacher/summary.json")
    assert info.stage == "teacher"
    assert info.training["segmentation"].batch_size == 16
    assert info.training["segmentation"].lr == 0.02
    assert info.val["segmentation"]["miou"] == 0.38
    assert math.isnan(info.test["segmentation"]["miou"])
    assert info.skipped[0].reason == "truncated"
    again = info.to_json()
    assert json.dumps(again, sort_keys=True) == json.dumps(OLD_TEACHER, sort_keys=True)


def test_fields_a_run_did_not_set_stay_out_of_the_file_and_unknown_ones_are_kept():
    info = RunInfo.read({"image_size": 64, "from_a_later_version": {"x": 1}}, "m")
    assert info.to_json() == {"image_size": 64, "from_a_later_version": {"x": 1}}
    assert info.stage is None and info.training == {} and info.test == {}


def test_simclr_and_student_infos_read_their_own_fields():
    simclr = RunInfo.read(
        {
            "stage": "simclr",
            "training": {},
            "pretraining": {"method": "simclr", "dataset": "d", "train_images": 10,
                            "batch_size": 8, "lr": 0.1, "temperature": 0.2},
            "final_loss": 3.2,
        },
        "s",
    )  # fmt: skip
    assert simclr.pretraining.temperature == 0.2 and simclr.final_loss == 3.2
    student = RunInfo.read(
        {
            "stage": "student",
            "training": {"depth": {"dataset": ["store-a", "store-b"], "batch_size": 32,
                                   "lr": 0.04}},
            "evaluated_on": {"depth": "data/depth"},
            "score_reference": {"depth": 0.5},
            "untested": [],
        },
        "s",
    )  # fmt: skip
    assert student.training["depth"].dataset == ["store-a", "store-b"]
    assert student.evaluated_on == {"depth": "data/depth"}


@pytest.mark.parametrize(
    ("info", "field"),
    [
        ({"training": {"depth": {"dataset": "d", "lr": 0.1}}}, "training.depth.batch_size"),
        ({"image_size": "large"}, "image_size"),
        ({"val": {"depth": {"abs_rel": "low"}}}, "val.depth.abs_rel"),
    ],
)
def test_a_run_info_of_the_wrong_shape_is_refused_naming_the_file_and_the_field(info, field):
    with pytest.raises(ConfigError, match=rf"teacher/summary.json.*\n.*{field}"):
        run_info({"info": info}, "teacher/summary.json")
