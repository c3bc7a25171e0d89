"""Image classification: global average pooling over C5 (the backbone's last stage) + one
linear layer, top-1/top-5.

Labels: a hard class id under ``"classification"`` (int64, 0-d) and/or, for pseudo labels, a
probability vector under ``"classification_soft"`` (float, (K,)); the soft one wins when both
are present. Target (from :meth:`ClassificationTask.collate`): ``{"probs": (B, K) float32
(one-hot for hard labels), "present": (B,) bool}``. Predictions: logits (B, K).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torchmetrics import Metric

from must import imageio
from must.errors import ConfigError, DataError
from must.features import LAST_STAGE, FeatureSpec, require
from must.records import weighted_ratio
from must.tasks.base import (
    StoreCheck,
    StoreStats,
    Task,
    TaskConfig,
    TaskHead,
    full_precision,
    stat_text,
)
from must.tasks.registry import register_task

SOFT_KEY = "classification_soft"


class ClassificationConfig(TaskConfig):
    label_smoothing: float = Field(0.0, ge=0.0, le=1.0)


class ClassificationHead(TaskHead):
    def __init__(self, c5_channels: int, num_classes: int, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(c5_channels, num_classes)
        self.label_smoothing = label_smoothing

    def forward(
        self, feats: dict[str, torch.Tensor], image_size: tuple[int, int], target: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pooled = feats[LAST_STAGE].mean(dim=(2, 3))
        # The linear layer and the loss in float32 under autocast: bf16 logits keep 8 bits,
        # and soft targets' small probabilities live in the loss's log-softmax.
        with full_precision(pooled):
            logits = self.fc(pooled.float())
            if target is None:
                return logits, {}
            present = target["present"]
            if not bool(present.any()):
                return logits, {"ce": self.zero_loss()}
            # Cross-entropy against probability targets (one-hot or soft), labelled images only.
            ce = F.cross_entropy(
                logits[present],
                target["probs"][present].float(),
                label_smoothing=self.label_smoothing,
            )
            return logits, {"ce": ce}


class ClassificationMetric(Metric):
    """Top-1 and top-k (k = min(5, K)) accuracy over the whole set, against the argmax of the
    target probabilities, over images with a label."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = min(5, num_classes)
        for name in ("correct1", "correct5", "total"):
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, target: Any) -> None:
        """``predictions``: logits (B, K); ``target``: a collated target or (B,) class ids."""
        if isinstance(target, dict):
            labels = target["probs"].argmax(1)
            present = target["present"]
        else:
            labels, present = target, torch.ones_like(target, dtype=torch.bool)
        labels = labels.to(predictions.device)[present.to(predictions.device)]
        hits = top_hits(predictions[present.to(predictions.device)], labels, self.k)
        self.correct1 += hits[:, 0].sum()
        self.correct5 += hits.any(1).sum()
        self.total += labels.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.total.double()  # 0 -> NaN: nothing was scored
        return {"top1": self.correct1 / n, "top5": self.correct5 / n}


def top_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) bool: whether each image's i-th most likely class is its label."""
    return logits.topk(k, dim=1).indices == labels[:, None]


class ClassificationSource(BaseModel):
    """ImageFolder: the images root holds one folder per class; the folder name is the class.

    ``labels``: a file of ``image class`` lines instead (whitespace- or comma-separated; the
    image by its path under the images folder, with or without extension, or its file name;
    only the first word of the class field counts, so ImageNet's ``LOC_val_solution.csv``
    works as it is). A first line naming no image is taken for a header."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["imagefolder"] = "imagefolder"
    labels: str | None = None


@register_task
class ClassificationTask(Task):
    """Whole-image classification over ``classes``."""

    name = "classification"
    label_keys = ("classification",)
    primary_metric = "top1"
    higher_is_better = True
    config_type = ClassificationConfig
    config: ClassificationConfig

    # -- label files (see Task): class folders (ImageFolder) or class tables; the renderer
    # puts each image in its class's folder and writes no label file.
    source_type = ClassificationSource
    scene_vocabulary = "categories"

    @classmethod
    def rendered_image_folder(cls, sample: Any, options: Any, where: Path) -> str | None:
        label, classes = int(sample.image_label), options.classes_of(cls.name)
        if not 0 <= label < len(classes):
            raise DataError(
                where,
                f"image_label {label} is not an index of the {len(classes)} {cls.name} classes",
            )
        return classes[label]

    @classmethod
    def image_folder_names(cls, classes: list[str]) -> list[str]:
        return [c for c in classes if imageio.is_folder_name(c)]

    @classmethod
    def check_render_options(cls, classes: list[str], options: Any) -> None:
        for name in classes:
            if not imageio.is_folder_name(name):
                raise ConfigError(f"{cls.name} class {name!r} cannot be used as a folder name")

    @classmethod
    def write_label_file(
        cls, sample: Any, root: Path, split: str, key: str, options: Any, where: Path
    ) -> dict:
        return {}  # the image's folder is its label

    @classmethod
    def rendered_source(
        cls, split: str, records: list[dict], root: Path, options: Any
    ) -> dict[str, Any]:
        return {}  # ImageFolder under the split's images folder

    @classmethod
    def rendered_format(cls, records: Mapping[str, list[dict]], options: Any) -> Any:
        return "ImageFolder: images/{split}/{class_name}/{key}.png"

    def has_label(self, sample: dict) -> bool:
        return "classification" in sample or SOFT_KEY in sample

    def build_head(self, features: Mapping[str, FeatureSpec]) -> TaskHead:
        c5 = require(features, LAST_STAGE, "the classification head")
        return ClassificationHead(c5.channels, self.num_classes, self.config.label_smoothing)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor] | None:
        present = [self.has_label(s) for s in samples]
        if not any(present):
            return None
        k = self.num_classes
        probs = torch.zeros(len(samples), k)
        for i, s in enumerate(samples):
            if SOFT_KEY in s:
                p = torch.as_tensor(s[SOFT_KEY], dtype=torch.float32).reshape(-1)
                if p.numel() != k:
                    raise ValueError(f"{SOFT_KEY!r} has {p.numel()} probabilities, expected {k}")
                probs[i] = p
            elif "classification" in s:
                label = int(s["classification"])
                if not 0 <= label < k:
                    raise ValueError(f"class id {label} is outside the {k} classes")
                probs[i, label] = 1.0
        return {"probs": probs, "present": torch.tensor(present, dtype=torch.bool)}

    def new_metric(self) -> Metric:
        return ClassificationMetric(self.num_classes)

    def image_records(
        self, predictions: torch.Tensor, target: Any
    ) -> list[dict[str, np.ndarray] | None]:
        """``correct1`` (1,) int64: whether the image's top class is its label (as
        ``ClassificationMetric`` counts it)."""
        labels = target["probs"].argmax(1).to(predictions.device)
        hits = top_hits(predictions, labels, min(5, self.num_classes))[:, 0].cpu().numpy()
        return [
            {"correct1": np.array([int(hit)], np.int64)} if bool(present) else None
            for hit, present in zip(hits, target["present"], strict=True)
        ]

    @classmethod
    def records_metric(
        cls, records: list[dict[str, np.ndarray]]
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Top-1: ``sum(w * correct1) / sum(w)``."""
        return weighted_ratio(records, "correct1")

    # -- the pseudo-label store: soft probabilities ``cls_probs`` float16 (K,)

    def to_store(
        self,
        prediction: Any,
        image_size: tuple[int, int],
        input_size: tuple[int, int],
        settings: Mapping[str, Any],
    ) -> dict[str, np.ndarray]:
        """Logits (K,) -> ``softmax(logits / temperature)`` (``settings["temperature"]``)."""
        logits = torch.as_tensor(prediction).float().reshape(-1)
        probs = torch.softmax(logits / float(settings.get("temperature", 1.0)), 0)
        return {"cls_probs": probs.numpy().astype(np.float16)}

    def label_to_store(
        self, sample: Mapping[str, Any], label_size: tuple[int, int]
    ) -> dict[str, np.ndarray] | None:
        """A hard class id -> one-hot probabilities (a soft label is stored as it is)."""
        if SOFT_KEY in sample:
            p = torch.as_tensor(sample[SOFT_KEY]).float().reshape(-1).numpy()
            return {"cls_probs": p.astype(np.float16)}
        if "classification" not in sample:
            return None
        probs = np.zeros(self.num_classes, np.float16)
        probs[int(sample["classification"])] = 1
        return {"cls_probs": probs}

    def from_store(
        self, fields: Mapping[str, np.ndarray], image_size: tuple[int, int]
    ) -> dict[str, Any]:
        return {SOFT_KEY: torch.from_numpy(fields["cls_probs"].astype(np.float32))}

    # -- store and labelling: encoding and checks, settings, remapping, statistics

    store_encoding: ClassVar[dict[str, Any]] = {"fields": {"cls_probs": "float16"}}

    class LabelSettings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        temperature: float = Field(1.0, description="classification: softmax(logits / T)")

        @field_validator("temperature")
        @classmethod
        def _positive(cls, value: float) -> float:
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"temperature must be positive, got {value}")
            return value

    label_settings_type = LabelSettings

    def check_store_fields(
        self, check: StoreCheck, task: str, given: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        k = self.num_classes
        p = check.array(given["cls_probs"], task, "cls_probs", "float16", 1)
        if p.shape != (k,):
            raise check.fail(f"{task}.cls_probs has shape {p.shape}, expected ({k},)")
        total = float(p.astype(np.float32).sum())
        if (p < 0).any() or abs(total - 1.0) > 1e-2:
            raise check.fail(f"{task}.cls_probs is not a probability vector (sum {total:.4f})")
        return {"cls_probs": p}

    def remap_classes(
        self, sample: dict[str, Any], lut: np.ndarray, ignore_index: int
    ) -> dict[str, Any]:
        if "classification" not in sample:
            return sample
        return {**sample, "classification": int(lut[int(sample["classification"])])}

    def store_stats(self) -> StoreStats:
        return _ClassificationStats(self.num_classes)

    @classmethod
    def format_store_stats(cls, stats: Mapping[str, Any]) -> list[str]:
        return [
            f"  entropy mean {stat_text(stats['entropy_mean'])} nats (max {stat_text(stats['entropy_max'])}), "
            f"top probability mean {stat_text(stats['top_prob_mean'])}"
        ]

    def store_lines(self, sample: Mapping[str, Any]) -> list[str]:
        if SOFT_KEY not in sample:
            return []
        names = self.classes
        probs = np.asarray(sample[SOFT_KEY], np.float64)
        return [
            f"{names[c] if c < len(names) else c}: {probs[c]:.2f}"
            for c in np.argsort(-probs, kind="stable")[:3]
        ]

    # -- pictures, transforms and evaluation

    nothing_to_measure = "no image has a class label"

    @classmethod
    def label_text(cls, entries: Mapping[str, Any], classes: Sequence[str]) -> str | None:
        """The class name (a soft label: its most likely class)."""
        if "classification" in entries:
            index = int(entries["classification"])
        elif SOFT_KEY in entries:
            index = int(torch.as_tensor(entries[SOFT_KEY]).argmax())
        else:
            return None
        return classes[index] if index < len(classes) else str(index)

    def prediction_entries(
        self, prediction: Any, image_size: tuple[int, int]
    ) -> dict[str, Any] | None:
        """The most likely class."""
        return {"classification": torch.as_tensor(prediction).argmax()}


class _ClassificationStats(StoreStats):
    """Mean entropy (nats) of the stored distributions and mean top probability."""

    def __init__(self, num_classes: int) -> None:
        self.k = num_classes
        self.entropy: list[float] = []
        self.top: list[float] = []

    def add(self, fields: Mapping[str, np.ndarray], origin: str) -> None:
        p = fields["cls_probs"].astype(np.float64)
        self.entropy.append(float(-(p[p > 0] * np.log(p[p > 0])).sum()))
        self.top.append(float(p.max()))

    def result(self) -> dict[str, Any]:
        return {
            "images": len(self.entropy),
            "entropy_mean": float(np.mean(self.entropy)) if self.entropy else None,
            "entropy_max": math.log(self.k) if self.k else None,
            "top_prob_mean": float(np.mean(self.top)) if self.top else None,
        }
