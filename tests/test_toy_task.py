"""Adding a task is one module: this file defines a sixth task, object counting (how many
objects an image shows, a per-image regression), and nothing else in the library changes.
The task is rendered by the scene world, read back from its dataset files, taught, pseudo-
labelled into a store, learnt by a student, transferred and reported, all by ``must run``. A new
label format for it (a CSV table of counts) is one class too."""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict
from torch import nn
from torchmetrics import Metric

from must.data.readers import FORMATS, LabelSource, MultiTaskDataset, register_format
from must.data.readers.common import Entry
from must.data.render import render_dataset
from must.features import LAST_STAGE, FeatureSpec
from must.stages.experiment import load_experiment, run_experiment
from must.store import PseudoLabelStore
from must.tasks import TASK_TYPES, register_task
from must.tasks.base import Task, TaskHead
from tiny import TINY_BACKBONE, TINY_TRAIN_SECTION

# ----------------------------------------------------------------------------- the task


class CountSource(BaseModel):
    """``npy``: one file per image in ``root`` holding the number of visible objects;
    ``count_table``: one CSV ``table`` of ``key,count`` rows (the format below)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["npy", "count_table"] = "npy"
    root: str | None = None
    table: str | None = None


@register_format("count_table")
class CountTable(LabelSource):
    """A new label format, as one class: a CSV of ``key,count`` rows for the split."""

    def index(self, entries: dict[str, Entry]) -> None:
        path = self.reader.base / self.source.table
        rows = [line.split(",") for line in path.read_text().splitlines() if line]
        self.counts = {key: float(count) for key, count in rows if key in entries}

    def has(self, key: str) -> bool:
        return key in self.counts

    def read(self, entry: Entry, image_size, bad_anns, masks) -> dict[str, Any] | None:
        if entry.key not in self.counts:
            return None
        return {"count": np.float32(self.counts[entry.key])}


class CountHead(TaskHead):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, 1)

    def forward(self, feats, image_size, target=None):
        count = self.fc(feats[LAST_STAGE].mean(dim=(2, 3)).float()).squeeze(1)
        if target is None:
            return count, {}
        present = target["present"]
        if not bool(present.any()):
            return count, {"l1": self.zero_loss()}
        return count, {"l1": F.smooth_l1_loss(count[present], target["count"][present])}


class CountMetric(Metric):
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("error", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, target: Any) -> None:
        present = target["present"]
        error = (predictions[present].double() - target["count"][present].double()).abs()
        self.error += error.sum()
        self.total += int(present.sum())

    def compute(self) -> dict[str, torch.Tensor]:
        return {"mae": self.error / self.total}


class CountTask(Task):
    name = "count"
    label_keys = ("count",)
    primary_metric = "mae"
    higher_is_better = False
    needs_classes = False

    # files: rendered from each scene's visible objects, read back from the .npy files
    source_type = CountSource

    @classmethod
    def write_label_file(cls, sample, root, split, key, options, where) -> dict:
        path = root / cls.name / split / f"{key}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.float32(len(sample.boxes)))
        return {}

    @classmethod
    def rendered_source(cls, split, records, root, options) -> dict[str, Any]:
        return {"format": "npy", "root": f"{cls.name}/{split}"}

    @classmethod
    def rendered_format(cls, records, options) -> str:
        return "one .npy per image: the number of visible objects"

    @classmethod
    def read_label_file(cls, path: Path, image_size, source, classes) -> dict[str, np.ndarray]:
        return {"count": np.load(path).astype(np.float32).reshape(())}

    # model: a linear read-out of the pooled last stage, trained with a smooth L1 loss
    def build_head(self, features: Mapping[str, FeatureSpec]) -> TaskHead:
        return CountHead(features[LAST_STAGE].channels)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor] | None:
        present = [self.has_label(s) for s in samples]
        if not any(present):
            return None
        counts = [float(s["count"]) if p else 0.0 for s, p in zip(samples, present, strict=True)]
        return {"count": torch.tensor(counts), "present": torch.tensor(present)}

    def new_metric(self) -> Metric:
        return CountMetric()

    # store: one float32 per image
    store_encoding = {"fields": {"count": "float32"}}  # noqa: RUF012 (a class constant)

    def to_store(self, prediction, image_size, input_size, settings) -> dict[str, np.ndarray]:
        return {"count": np.array([float(prediction)], np.float32)}

    def label_to_store(self, sample, label_size) -> dict[str, np.ndarray] | None:
        if "count" not in sample:
            return None
        return {"count": np.array([float(sample["count"])], np.float32)}

    def from_store(self, fields, image_size) -> dict[str, Any]:
        return {"count": torch.tensor(float(fields["count"][0]))}

    # pictures: the count as text
    @classmethod
    def label_text(cls, entries, classes) -> str | None:
        return f"{float(entries['count']):.1f} objects" if "count" in entries else None

    def prediction_entries(self, prediction, image_size) -> dict[str, Any] | None:
        return {"count": torch.as_tensor(prediction)}


@pytest.fixture(scope="module")
def count_task():
    """The task registered for this module only (the registry is the library's one list)."""
    register_task(CountTask)
    yield CountTask
    del TASK_TYPES[CountTask.name]


@pytest.fixture(autouse=True, scope="module")
def _format_registered_for_this_module_only():
    yield
    del FORMATS["count_table"]


# ----------------------------------------------------------------------------- the pipeline


def test_a_task_from_one_module_is_rendered_and_read_back(count_task, tmp_path):
    out = tmp_path / "data"
    render_dataset("cluttered", out, 8, 32, tasks=["detection", "count"], progress=False)
    dataset = MultiTaskDataset(out, split="train")
    assert dataset.tasks == ["detection", "count"]
    for i in range(len(dataset)):
        sample = dataset[i]
        # The count the renderer wrote is the number of boxes of the same scene.
        assert float(sample["count"]) == len(sample["box_labels"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == {"format": "npy", "root": "count/train"}
    # The description's type is made from the registry: it still crosses to loader workers.
    assert pickle.loads(pickle.dumps(dataset.spec)) == dataset.spec
    assert pickle.loads(pickle.dumps(dataset.source)).tasks() == ["detection", "count"]


def test_a_data_format_is_one_class(count_task, tmp_path):
    out = tmp_path / "data"
    render_dataset("cluttered", out, 6, 32, tasks=["detection"], progress=False)
    truth = {s["key"]: len(s["box_labels"]) for s in MultiTaskDataset(out, split="train")}
    (out / "counts.csv").write_text("".join(f"{k},{n}\n" for k, n in list(truth.items())[1:]))
    spec = json.loads((out / "manifest.json").read_text())
    spec["splits"] = {"train": {**spec["splits"]["train"], "count": {"format": "count_table",
                      "table": "counts.csv"}}}  # fmt: skip
    (out / "dataset.yaml").write_text(yaml.safe_dump(spec))
    dataset = MultiTaskDataset(out / "dataset.yaml", split="train", tasks=["count"])
    read = {s["key"]: float(s["count"]) for s in dataset if "count" in s}
    first = next(iter(truth))
    assert read == {k: float(n) for k, n in truth.items() if k != first}  # the first has none
    assert dataset.label_counts()["count"] == len(truth) - 1


def test_a_task_from_one_module_runs_the_whole_method(count_task, tmp_path):
    # A style that renders the new task next to classification (for the student's second task).
    style = tmp_path / "countable.yaml"
    style.write_text("name: countable\nextends: cluttered\ntasks: [classification, count]\n")
    teach = {
        "data": {"dataset": str(style), "num": 24, "render_size": 32, "image_size": 32},
        "model": {"backbone": TINY_BACKBONE},
        "train": TINY_TRAIN_SECTION,
    }
    config = tmp_path / "teach_count.yaml"
    config.write_text(
        yaml.safe_dump({"extends": "teach_classification_cpu", "task": "count", **teach})
    )
    student = {"data": {"image_size": 32}, "model": teach["model"], "train": TINY_TRAIN_SECTION}
    experiment = {
        "name": "count",
        "data_cache": str(tmp_path / "cache"),
        "stages": ["teachers", "label", "student", "transfer", "report"],
        "teachers": {
            "count": {"config": str(config)},
            "classification": {"config": "teach_classification_cpu", "overrides": teach},
        },
        "pool": {"num": 20, "render_size": 32},
        "label": {"batch_size": 8, "shard_size": 8, "workers": 0, "teacher_sets": False},
        "student": {"config": "train_student_cpu", "overrides": student},
        "transfer": {
            "dataset": str(style),
            "num": 20,
            "render_size": 32,
            "tasks": ["count"],
            "modes": ["finetune"],
            "config": {"config": "transfer_cpu", "overrides": teach},
            "backbones": ["scratch", "student"],
        },
    }
    file = tmp_path / "experiment.yaml"
    file.write_text(yaml.safe_dump(experiment, sort_keys=False))
    run = tmp_path / "run"
    run_experiment(load_experiment(file), run, progress=False)

    teacher = json.loads((run / "teachers" / "count" / "summary.json").read_text())
    assert np.isfinite(teacher["info"]["test"]["count"]["mae"])
    store = PseudoLabelStore(run / "stores" / "pool")
    header = json.loads((run / "stores" / "pool" / "header.json").read_text())
    assert header["tasks"]["count"]["encoding"]["fields"] == {"count": "float32"}
    assert store.kind("count") == "count" and store.classes("count") is None
    counts = [store.get(k).labels["count"]["count"] for k in store.keys[:5]]
    assert all(c.shape == (1,) and np.isfinite(c).all() for c in counts)
    trained = json.loads((run / "student" / "summary.json").read_text())
    assert set(trained["tasks"]) == {"classification", "count"}
    assert np.isfinite(trained["info"]["val"]["count"]["mae"])
    for backbone in ("scratch", "student"):
        result = json.loads(
            (run / "transfer" / backbone / "count-finetune" / "summary.json").read_text()
        )
        assert np.isfinite(result["info"]["test"]["count"]["mae"])
    report = (run / "report.md").read_text()
    assert "| count | mae ↓ |" in report  # the student against its count teacher
    assert "count-finetune mae ↓" in report  # the transfer table's column
    assert (run / "report" / "student-count.png").is_file()
