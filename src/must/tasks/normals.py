"""Surface normals: a unit vector per pixel, a pixel head on fused P2, angular errors.

Camera coordinates are OpenCV's (x right, y down, z forward). Target (from
:meth:`NormalsTask.collate`): ``{"normals": (B, 3, H, W) float32, "present": (B,) bool}``; a
pixel is valid when its label's norm exceeds 0.5, so all-zero (invalid, or an image without a
label) pixels are never learned nor scored. Predictions: unit vectors (B, 3, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from must.dense import Normals
from must.features import FeatureSpec
from must.tasks.base import TaskHead, full_precision
from must.tasks.draw import fit_map
from must.tasks.pixel import (
    PixelHead,
    PixelTask,
    check_dense_size,
    collate_dense,
    target_field,
)
from must.tasks.registry import register_task

VALID_NORM = 0.5  # labels are unit vectors or zero; anything in between is resampling blur
THRESHOLDS_DEG = (11.25, 22.5, 30.0)
HIST_BIN_DEG = 0.01  # median precision: the centre of a 0.01° bin, so within 0.005°
HIST_BINS = round(180.0 / HIST_BIN_DEG)


def valid_normals(gt: torch.Tensor) -> torch.Tensor:
    """(B, H, W) mask of the pixels of a (B, 3, H, W) label that hold a normal."""
    return gt.norm(dim=1) > VALID_NORM


class NormalsHead(PixelHead):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(out_channels=3, **kwargs)

    def forward(
        self, feats: dict[str, torch.Tensor], image_size: tuple[int, int], target: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raw = self.raw(feats, image_size)
        # Normalisation and angle in float32: a cosine near 1 in bf16 has 8 bits to spare.
        with full_precision(raw):
            # Normalise after resizing: interpolating unit vectors shortens them.
            normals = F.normalize(raw, dim=1)
            if target is None:
                return normals, {}
            gt = target["normals"].float()
            valid = valid_normals(gt)
            # Zero the invalid labels first: a NaN would reach the gradient through where().
            gt = torch.where(valid[:, None], gt, torch.zeros_like(gt))
            cos = (normals * F.normalize(gt, dim=1)).sum(1)
            # Mean over the valid pixels of the batch; an exact zero (still connected to the
            # head) when there are none.
            loss = torch.where(valid, 1.0 - cos, torch.zeros_like(cos)).sum()
            return normals, {"cosine": loss / valid.sum().clamp(min=1)}


def angles_deg(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between (N, 3, ...) vectors along dim 1, via atan2(|a x b|, a . b):
    accurate near 0° and 180° where acos of the dot product is not. Needs no unit length."""
    pred, gt = pred.double(), gt.double()
    cross = torch.linalg.cross(pred, gt, dim=1).norm(dim=1)
    dot = (pred * gt).sum(1)
    return torch.rad2deg(torch.atan2(cross, dot))


class NormalsMetric(Metric):
    """Angular errors over every valid pixel of the set: ``mean_angle`` and ``median_angle``
    in degrees, ``within_11.25`` / ``within_22.5`` / ``within_30`` as fractions in [0, 1].

    The mean and the within-fractions are exact; the median comes from a histogram of 0.01°
    bins over [0°, 180°] (a sum state, so it merges across batches and processes) and is the
    centre of the bin holding it, i.e. within 0.005° (the usual average of the two middle
    values for an even count).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(
            "angle_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "within",
            default=torch.zeros(len(THRESHOLDS_DEG), dtype=torch.long),
            dist_reduce_fx="sum",
        )
        self.add_state(
            "hist", default=torch.zeros(HIST_BINS, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, predictions: torch.Tensor, target: Any) -> None:
        """``predictions``: (B, 3, H, W) normals; ``target``: a collated target or (B, 3, H, W)."""
        gt, _ = target_field(target, "normals")
        gt = gt.to(predictions.device)
        valid = valid_normals(gt)
        ang = angles_deg(predictions, gt)[valid]
        self.count += ang.numel()
        self.angle_sum += ang.sum()
        for i, t in enumerate(THRESHOLDS_DEG):
            self.within[i] += (ang < t).sum()
        bins = (ang / HIST_BIN_DEG).long().clamp(0, HIST_BINS - 1)
        self.hist += torch.bincount(bins, minlength=HIST_BINS)

    def compute(self) -> dict[str, torch.Tensor]:
        n = int(self.count)
        out = {
            "mean_angle": self.angle_sum / n if n else torch.tensor(math.nan),
            "median_angle": torch.tensor(median_from_histogram(self.hist, HIST_BIN_DEG)),
        }
        for i, t in enumerate(THRESHOLDS_DEG):
            out[f"within_{t:g}"] = self.within[i].double() / n if n else torch.tensor(math.nan)
        return out


def median_from_histogram(hist: torch.Tensor, bin_width: float) -> float:
    """Median of the values counted in ``hist`` (bin k = [k w, (k+1) w)), each value taken
    as its bin's centre; NaN for an empty histogram."""
    n = int(hist.sum())
    if n == 0:
        return math.nan
    cum = hist.cumsum(0)
    # 0-based ranks of the middle value(s); the value of rank r lies in the first bin whose
    # cumulative count exceeds r.
    ranks = torch.tensor([(n - 1) // 2, n // 2], dtype=cum.dtype, device=cum.device)
    bins = torch.searchsorted(cum, ranks, right=True)
    return float(((bins.double() + 0.5) * bin_width).mean())


@register_task
class NormalsTask(PixelTask):
    """Surface normal estimation (unit vectors in camera coordinates)."""

    name = "normals"
    label_keys = ("normals",)
    primary_metric = "mean_angle"
    higher_is_better = False
    needs_classes = False

    def build_head(self, features: Mapping[str, FeatureSpec]) -> TaskHead:
        return NormalsHead(**self.head_kwargs(features))

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor] | None:
        out = collate_dense(samples, "normals", 0.0, torch.float32, channels=3)
        if out is None:
            return None
        normals, present = out
        return {"normals": normals, "present": present}

    def new_metric(self) -> Metric:
        return NormalsMetric()

    # -- pictures, transforms and evaluation

    picture = "panel"
    pad_fill: ClassVar[Mapping[str, float]] = {"normals": 0.0}
    nothing_to_measure = "every label pixel is (0, 0, 0), the invalid normal"

    @classmethod
    def wrap_for_transforms(
        cls, sample: dict[str, Any], *, scales_with_zoom: bool
    ) -> dict[str, Any]:
        if "normals" in sample:
            if not isinstance(sample["normals"], Normals):
                sample["normals"] = Normals(sample["normals"])
            check_dense_size(sample, "normals")
        return sample

    @classmethod
    def draw(
        cls,
        entries: Mapping[str, Any],
        image: torch.Tensor,
        classes: Sequence[str],
        source_size: tuple[int, int],
    ) -> torch.Tensor | None:
        """Normals as colours, (x, y, z) in [-1, 1] -> RGB, invalid black."""
        if "normals" not in entries:
            return None
        n = np.asarray(fit_map(entries["normals"], image.shape[-2:]))
        rgb = np.where(np.abs(n).sum(0) > 0, (n + 1) / 2 * 255, 0).round().astype(np.uint8)
        return torch.from_numpy(rgb)

    def prediction_entries(
        self, prediction: Any, image_size: tuple[int, int]
    ) -> dict[str, Any] | None:
        return {"normals": torch.as_tensor(prediction).numpy()}
