"""Semantic segmentation: per-pixel classes, a pixel head on fused P2, mIoU.

Target (from :meth:`SegmentationTask.collate`): ``{"labels": (B, H, W) uint8 (int64 when a
value, or the ignore index, does not fit in 0-255), "present": (B,) bool}``; pixels equal to
``ignore_index`` (255 by default, and every pixel of an image without a label) are never
learned nor scored. The loss and the metric take the labels as int64 on the model's device.
Predictions: logits (B, K, H, W).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchvision import tv_tensors

from must.features import FeatureSpec
from must.tasks.base import TaskHead, full_precision, label_size
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
        labels = labels.to(pred.device).long()
        # Out-of-vocabulary labels are treated like ignore: they cannot have a matrix row.
        valid = (labels != self.ignore_index) & (labels >= 0) & (labels < self.num_classes)
        k = self.num_classes
        idx = labels[valid].long() * k + pred[valid].long()
        self.confusion += torch.bincount(idx, minlength=k * k).view(k, k)

    def compute(self) -> dict[str, torch.Tensor]:
        miou, _ = miou_from_confusion(self.confusion)
        # 0/0 -> NaN pixel accuracy when nothing was scored.
        acc = self.confusion.diagonal().sum().double() / self.confusion.sum()
        return {"miou": torch.tensor(miou, dtype=torch.float64), "pixel_acc": acc}


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


@register_task
class SegmentationTask(PixelTask):
    """Semantic segmentation with a per-pixel softmax over ``classes``."""

    name = "segmentation"
    label_keys = ("segmentation",)
    primary_metric = "miou"
    higher_is_better = True
    config_type = SegmentationConfig
    config: SegmentationConfig

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
