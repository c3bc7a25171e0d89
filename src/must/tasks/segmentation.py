"""Semantic segmentation: per-pixel classes, a pixel head on fused P2, mIoU.

Target (from :meth:`SegmentationTask.collate`): ``{"labels": (B, H, W) uint8 (int64 when a
value, or the ignore index, does not fit in 0-255), "present": (B,) bool}``; pixels equal to
``ignore_index`` (255 by default, and every pixel of an image without a label) are never
learned nor scored. The loss and the metric take the labels as int64 on the model's device.
Predictions: logits (B, K, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torchmetrics import Metric
from torchvision import tv_tensors

from must import imageio
from must.errors import ConfigError, DataError
from must.features import FeatureSpec
from must.records import image_weights
from must.tasks.base import (
    StoreCheck,
    StoreStats,
    TaskHead,
    full_precision,
    label_size,
    stat_text,
)
from must.tasks.draw import class_palette, fit_map
from must.tasks.pixel import (
    PixelHead,
    PixelTask,
    PixelTaskConfig,
    collate_dense,
    narrow_classes,
    resize_nearest,
    resize_to,
    target_field,
)
from must.tasks.registry import register_task

STORE_IGNORE = 255  # the store's ignore value (docs/store.md)
RECORDS_CHUNK = 64  # re-weightings summed at once by records_metric (bounds its memory)


class SegmentationConfig(PixelTaskConfig):
    ignore_index: int = 255


class SegmentationHead(PixelHead):
    def __init__(self, *, num_classes: int, ignore_index: int, **kwargs: Any) -> None:
        super().__init__(out_channels=num_classes, **kwargs)
        self.ignore_index = ignore_index

    def forward(
        self, feats: dict[str, torch.Tensor], image_size: tuple[int, int], target: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.raw(feats, image_size)
        if target is None:
            return logits, {}
        labels = target["labels"].long()
        valid = (labels != self.ignore_index).sum()
        # Sum over valid pixels / their count rather than reduction="mean": the mean is NaN
        # when no pixel is valid, while this is an exact zero still connected to the head.
        # log-softmax in float32.
        with full_precision(logits):
            ce = F.cross_entropy(
                logits.float(), labels, ignore_index=self.ignore_index, reduction="sum"
            )
            return logits, {"ce": ce / valid.clamp(min=1)}


class SegmentationMetric(Metric):
    """Confusion matrix over the whole set (rows: ground truth, columns: prediction) ->
    ``miou`` (see :func:`miou_from_confusion`) and ``pixel_acc``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confusion",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, predictions: torch.Tensor, target: Any) -> None:
        """``predictions``: logits (B, K, H, W) or class ids (B, H, W); ``target``: a collated
        target or (B, H, W) class ids."""
        labels, _ = target_field(target, "labels")
        pred = predictions.argmax(1) if predictions.dim() == 4 else predictions
        self.confusion += confusion_matrix(pred, labels, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, torch.Tensor]:
        miou, _ = miou_from_confusion(self.confusion)
        # 0/0 -> NaN pixel accuracy when nothing was scored.
        acc = self.confusion.diagonal().sum().double() / self.confusion.sum()
        return {"miou": torch.tensor(miou, dtype=torch.float64), "pixel_acc": acc}


def confusion_matrix(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """(K, K) int64 counts of (label, predicted class) over the pixels of ``pred`` (class ids)
    whose label is scored."""
    labels = labels.to(pred.device).long()
    # Out-of-vocabulary labels are treated like ignore: they cannot have a matrix row.
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    k = num_classes
    idx = labels[valid].long() * k + pred[valid].long()
    return torch.bincount(idx, minlength=k * k).view(k, k)


def miou_from_confusion(conf: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean IoU and per-class IoU of a (K, K) confusion matrix (rows: truth, columns: pred).

    IoU_c = TP / (TP + FP + FN). A class absent from both ground truth and predictions has
    0/0 = NaN IoU and is left out of the mean (the VOC / mmseg convention); a class that
    appears in either counts, with IoU 0 when never predicted right. NaN when no class
    appears at all (nothing was scored).
    """
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / union  # 0/0 -> NaN for absent classes
    seen = union > 0
    miou = float(iou[seen].mean()) if bool(seen.any()) else float("nan")
    return miou, iou


class SegmentationSource(BaseModel):
    """``png``: one class map per image (mode L or P) in ``root``.

    ``coco``: class maps rasterised from a COCO instances JSON (``annotations``): pixels no
    annotation covers are the ``background`` class (or the ignore value when ``background``
    is null); crowd regions and annotations without a mask are the ignore value; where
    instances overlap, the smaller one wins (equal areas: the later in the file)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["png", "coco"] = "png"
    root: str | None = None
    annotations: str | None = None
    ignore_index: int = 255
    # ADE20K-style maps use 0 for "unlabeled" and 1..K for classes: shift them down by one.
    reduce_zero_label: bool = False
    background: str | None = "background"

    @model_validator(mode="after")
    def _source_is_named(self) -> SegmentationSource:
        if self.format == "png" and self.root is None:
            raise ValueError("format 'png' needs root (the folder of class-map PNGs)")
        if self.format == "coco" and self.annotations is None:
            raise ValueError("format 'coco' needs annotations (the COCO instances JSON)")
        return self


@register_task
class SegmentationTask(PixelTask):
    """Semantic segmentation with a per-pixel softmax over ``classes``."""

    name = "segmentation"
    label_keys = ("segmentation",)
    primary_metric = "miou"
    higher_is_better = True
    config_type = SegmentationConfig
    config: SegmentationConfig

    # -- label files (see Task): one class map per image (PNG of mode L or P, value = class
    # index), or rasterised from COCO instances; the renderer writes VOC-palette PNGs.
    source_type = SegmentationSource
    scene_vocabulary = "stuff_and_categories"
    coco_labels = "class_map"

    @classmethod
    def read_label_file(
        cls, path: Path, image_size: tuple[int, int], source: Any, classes: list[str]
    ) -> dict[str, np.ndarray]:
        values = imageio.read_class_map(
            path, image_size, len(classes), source.ignore_index, source.reduce_zero_label, cls.name
        )
        return {cls.name: values}

    @classmethod
    def label_entries(cls, labels: Mapping[str, Any], canvas_size: tuple[int, int]) -> dict:
        return {cls.name: tv_tensors.Mask(torch.from_numpy(labels[cls.name]))}

    @classmethod
    def check_render_options(cls, classes: list[str], options: Any) -> None:
        if len(classes) > options.ignore_index:
            raise ConfigError(
                f"{len(classes)} {cls.name} classes do not fit in an 8-bit "
                f"PNG below the ignore value {options.ignore_index}"
            )

    @classmethod
    def write_label_file(
        cls, sample: Any, root: Path, split: str, key: str, options: Any, where: Path
    ) -> dict:
        path = root / cls.name / split / f"{key}.png"
        values = np.asarray(sample.semantic)
        classes = options.classes_of(cls.name)
        if values.size and int(values.max()) >= len(classes):
            raise DataError(
                path, f"semantic class {int(values.max())} >= {len(classes)} {cls.name} classes"
            )
        imageio.save_class_map(values, path, options.ignore_index)
        return {}

    @classmethod
    def rendered_source(
        cls, split: str, records: list[dict], root: Path, options: Any
    ) -> dict[str, Any]:
        return {"root": f"{cls.name}/{split}", "ignore_index": options.ignore_index}

    @classmethod
    def rendered_format(cls, records: Mapping[str, list[dict]], options: Any) -> Any:
        return {
            "encoding": "PNG mode P (VOC palette), value = class index",
            "ignore_index": options.ignore_index,
        }

    def build_head(self, features: Mapping[str, FeatureSpec]) -> TaskHead:
        return SegmentationHead(
            num_classes=self.num_classes,
            ignore_index=self.config.ignore_index,
            **self.head_kwargs(features),
        )

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor] | None:
        out = collate_dense(
            samples, "segmentation", self.config.ignore_index, torch.int64, channels=None
        )
        if out is None:
            return None
        labels, present = out
        return {"labels": narrow_classes(labels, self.config.ignore_index), "present": present}

    def new_metric(self) -> Metric:
        return SegmentationMetric(self.num_classes, self.config.ignore_index)

    def image_records(
        self, predictions: torch.Tensor, target: Any
    ) -> list[dict[str, np.ndarray] | None]:
        """``confusion`` (K, K) int64: the image's pixels as ``SegmentationMetric`` counts them."""
        labels, present = target_field(target, "labels")
        pred = predictions.argmax(1) if predictions.dim() == 4 else predictions
        if present is None:
            present = torch.ones(len(pred), dtype=torch.bool)
        k, ignore = self.num_classes, self.config.ignore_index
        return [
            {"confusion": confusion_matrix(pred[i], labels[i], k, ignore).cpu().numpy()}
            if bool(has)
            else None
            for i, has in enumerate(present)
        ]

    @classmethod
    def records_metric(
        cls, records: list[dict[str, np.ndarray]]
    ) -> Callable[[np.ndarray], np.ndarray]:
        """mIoU (``miou_from_confusion``) of the weighted sum of the images' confusion matrices."""
        if not records:
            return lambda weights: np.full(len(image_weights(weights, 0)), np.nan)
        confusion = np.stack([r["confusion"] for r in records]).astype(np.float64)
        n, k = confusion.shape[0], confusion.shape[1]
        flat = confusion.reshape(n, k * k)

        def metric(weights: np.ndarray) -> np.ndarray:
            w = image_weights(weights, n)
            out = np.empty(len(w))
            for start in range(0, len(w), RECORDS_CHUNK):
                summed = (w[start : start + RECORDS_CHUNK] @ flat).reshape(-1, k, k)
                for j, conf in enumerate(summed):
                    out[start + j] = miou_from_confusion(torch.from_numpy(conf))[0]
            return out

        return metric

    # -- the pseudo-label store: ``seg_map`` uint8 (h, w), 255 = ignored

    def to_store(
        self,
        prediction: Any,
        image_size: tuple[int, int],
        input_size: tuple[int, int],
        settings: Mapping[str, Any],
    ) -> dict[str, np.ndarray]:
        """Logits (K, h, w) -> bilinearly resized to the label size, then the argmax class,
        255 where the top softmax probability is below ``settings["seg_threshold"]``."""
        size = label_size(image_size, float(settings.get("label_scale", 1.0)))
        logits = resize_to(torch.as_tensor(prediction).float()[None], size)[0]
        top, classes = logits.max(0)
        # The top softmax probability is 1 / sum(exp(logits - top)): below the threshold
        # exactly when that sum is above 1 / threshold (no full softmax needed).
        threshold = float(settings.get("seg_threshold", 0.5))
        if threshold > 0:
            mass = torch.exp(logits - top).sum(0)
            classes[mass > 1.0 / threshold] = STORE_IGNORE
        return {"seg_map": classes.to(torch.uint8).numpy()}

    def label_to_store(
        self, sample: Mapping[str, Any], label_size: tuple[int, int]
    ) -> dict[str, np.ndarray] | None:
        """A real class map (ignore = 255) as it is, nearest-resized to the label size."""
        if "segmentation" not in sample:
            return None
        seg = torch.as_tensor(sample["segmentation"]).as_subclass(torch.Tensor)
        seg = resize_nearest(seg.reshape(seg.shape[-2:]), label_size)
        return {"seg_map": seg.numpy().astype(np.uint8)}

    def from_store(
        self, fields: Mapping[str, np.ndarray], image_size: tuple[int, int]
    ) -> dict[str, Any]:
        seg = torch.from_numpy(fields["seg_map"].astype(np.int64))
        seg[seg == STORE_IGNORE] = self.config.ignore_index  # this task's ignore value
        return {"segmentation": tv_tensors.Mask(resize_nearest(seg, image_size))}

    # -- store and labelling: encoding and checks, settings, remapping, statistics

    store_encoding: ClassVar[dict[str, Any]] = {
        "fields": {"seg_map": "uint8"},
        "ignore_index": STORE_IGNORE,
    }

    class LabelSettings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        seg_threshold: float = Field(
            0.5, description="ignore (255) pixels whose top class probability is below it"
        )

        @field_validator("seg_threshold")
        @classmethod
        def _fraction(cls, value: float) -> float:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"seg_threshold must be in [0, 1], got {value}")
            return value

    label_settings_type = LabelSettings

    @classmethod
    def check_store_classes(cls, where: str, classes: list[str] | None) -> None:
        super().check_store_classes(where, classes)
        if len(classes or []) > STORE_IGNORE:
            raise ConfigError(f"{where}: at most {STORE_IGNORE} classes")

    def check_store_fields(
        self, check: StoreCheck, task: str, given: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        k = self.num_classes
        m = check.array(given["seg_map"], task, "seg_map", "uint8", 2)
        if ((m >= k) & (m != STORE_IGNORE)).any():
            raise check.fail(f"{task}.seg_map has class ids >= {k} (ignore is {STORE_IGNORE})")
        return {"seg_map": m}

    def remap_classes(
        self, sample: dict[str, Any], lut: np.ndarray, ignore_index: int
    ) -> dict[str, Any]:
        if "segmentation" not in sample:
            return sample
        seg = np.asarray(sample["segmentation"]).astype(np.int64)
        ignored = seg == ignore_index
        mapped = np.full(seg.shape, STORE_IGNORE, np.int64)
        mapped[~ignored] = lut[seg[~ignored]]
        return {**sample, "segmentation": torch.from_numpy(mapped)}

    def store_stats(self) -> StoreStats:
        return _SegmentationStats()

    @classmethod
    def format_store_stats(cls, stats: Mapping[str, Any]) -> list[str]:
        return [
            f"  ignored pixels (pseudo): {stat_text(stats['ignored_fraction'])} of "
            f"{stats['pixels']} pixels"
        ]

    # -- pictures, transforms and evaluation

    picture = "panel"
    pad_fill: ClassVar[Mapping[str, float]] = {"segmentation": STORE_IGNORE}
    nothing_to_measure = "every label pixel is the ignore value"

    @classmethod
    def wrap_for_transforms(
        cls, sample: dict[str, Any], *, scales_with_zoom: bool
    ) -> dict[str, Any]:
        if "segmentation" in sample and not isinstance(sample["segmentation"], tv_tensors.Mask):
            sample["segmentation"] = tv_tensors.Mask(sample["segmentation"])
        return sample

    @classmethod
    def draw(
        cls,
        entries: Mapping[str, Any],
        image: torch.Tensor,
        classes: Sequence[str],
        source_size: tuple[int, int],
    ) -> torch.Tensor | None:
        """The class map in the classes' colours, ignored pixels black."""
        if "segmentation" not in entries:
            return None
        seg = np.asarray(fit_map(entries["segmentation"], image.shape[-2:])).astype(np.int64)
        rgb = class_palette(256)[np.clip(seg, 0, 255)]
        rgb[seg == STORE_IGNORE] = 0
        return torch.from_numpy(rgb).permute(2, 0, 1)

    def prediction_entries(
        self, prediction: Any, image_size: tuple[int, int]
    ) -> dict[str, Any] | None:
        """The argmax class of every pixel (no threshold)."""
        fields = self.to_store(prediction, image_size, image_size, {"seg_threshold": 0.0})
        return self.from_store(fields, image_size)


class _SegmentationStats(StoreStats):
    """The fraction of ignored pixels of the pseudo labels, pooled."""

    def __init__(self) -> None:
        self.ignored = self.pixels = 0

    def add(self, fields: Mapping[str, np.ndarray], origin: str) -> None:
        if origin == "pseudo":
            seg = fields["seg_map"]
            self.ignored += int((seg == STORE_IGNORE).sum())
            self.pixels += seg.size

    def result(self) -> dict[str, Any]:
        fraction = self.ignored / self.pixels if self.pixels else None
        return {"pixels": self.pixels, "ignored_fraction": fraction}
