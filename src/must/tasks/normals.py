"""Surface normals: a unit vector per pixel, a pixel head on fused P2, angular errors.

Camera coordinates are OpenCV's (x right, y down, z forward). Target (from
:meth:`NormalsTask.collate`): ``{"normals": (B, 3, H, W) float32, "present": (B,) bool}``; a
pixel is valid when its label's norm exceeds 0.5, so all-zero (invalid, or an image without a
label) pixels are never learned nor scored. Predictions: unit vectors (B, 3, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict
from torchmetrics import Metric

from must import imageio
from must.dense import Normals
from must.features import FeatureSpec
from must.records import weighted_ratio
from must.tasks.base import (
    StoreCheck,
    StoreStats,
    TaskHead,
    full_precision,
    label_size,
    stat_text,
)
from must.tasks.draw import fit_map
from must.tasks.pixel import (
    PixelHead,
    PixelTask,
    check_dense_size,
    collate_dense,
    resize_nearest,
    resize_to,
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


def scored_angles(predictions: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The angles (degrees, float64) of the pixels of (B, 3, H, W) ``gt`` holding a normal."""
    gt = gt.to(predictions.device)
    return angles_deg(predictions, gt)[valid_normals(gt)]


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
        ang = scored_angles(predictions, gt)
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


class NormalsSource(BaseModel):
    """Surface normals in camera coordinates (x right, y down, z forward).

    ``png``: 8-bit RGB, n = v / 255 * 2 - 1, (0, 0, 0) marks invalid pixels.
    ``npy``: float array (H, W, 3), all-zero vectors mark invalid pixels.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["png", "npy"] = "png"
    root: str


@register_task
class NormalsTask(PixelTask):
    """Surface normal estimation (unit vectors in camera coordinates)."""

    name = "normals"
    label_keys = ("normals",)
    primary_metric = "mean_angle"
    higher_is_better = False
    needs_classes = False

    # -- label files (see Task): one 8-bit RGB PNG per image, n = v / 255 * 2 - 1, or a float
    # (H, W, 3) .npy; (0, 0, 0) = invalid. Camera frame: x right, y down, z forward.
    source_type = NormalsSource

    @classmethod
    def read_label_file(
        cls, path: Path, image_size: tuple[int, int], source: Any, classes: list[str]
    ) -> dict[str, np.ndarray]:
        return {cls.name: imageio.read_normals_file(path, image_size, cls.name)}

    @classmethod
    def label_entries(cls, labels: Mapping[str, Any], canvas_size: tuple[int, int]) -> dict:
        return {cls.name: Normals(torch.from_numpy(labels[cls.name]))}

    @classmethod
    def write_label_file(
        cls, sample: Any, root: Path, split: str, key: str, options: Any, where: Path
    ) -> dict:
        rgb = imageio.encode_normals(np.asarray(sample.normals))
        imageio.save_png(Image.fromarray(rgb), root / cls.name / split / f"{key}.png")
        return {}

    @classmethod
    def rendered_source(
        cls, split: str, records: list[dict], root: Path, options: Any
    ) -> dict[str, Any]:
        return {"root": f"{cls.name}/{split}", "format": "png"}

    @classmethod
    def rendered_format(cls, records: Mapping[str, list[dict]], options: Any) -> Any:
        return {
            "encoding": "8-bit RGB PNG, n = v / 255 * 2 - 1, (0, 0, 0) = invalid",
            "frame": "camera: x right, y down, z forward",
        }

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

    def image_records(
        self, predictions: torch.Tensor, target: Any
    ) -> list[dict[str, np.ndarray] | None]:
        """``angle_sum``, ``count`` (1,) float64: the image's valid pixels as ``NormalsMetric``
        sums them."""
        gt, present = target_field(target, "normals")
        out: list[dict[str, np.ndarray] | None] = []
        for i in range(len(gt)):
            if present is not None and not bool(present[i]):
                out.append(None)
                continue
            ang = scored_angles(predictions[i : i + 1], gt[i : i + 1])
            out.append(
                {
                    "angle_sum": np.array([float(ang.sum())], np.float64),
                    "count": np.array([float(ang.numel())], np.float64),
                }
            )
        return out

    @classmethod
    def records_metric(
        cls, records: list[dict[str, np.ndarray]]
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Mean angle over every valid pixel: weighted ``angle_sum`` / weighted ``count``."""
        return weighted_ratio(records, "angle_sum", "count")

    # -- store and labelling: ``normals`` float16 (3, h, w) unit camera-frame vectors,
    # (0, 0, 0) = invalid; encoding and checks, the conversions, statistics

    store_encoding: ClassVar[dict[str, Any]] = {
        "fields": {"normals": "float16"},
        "frame": "camera: x right, y down, z forward",
        "invalid": 0,
    }
    # A stored vector's length may differ from 1 by float16 rounding (< 1e-3 per component).
    STORE_UNIT_TOLERANCE = 1e-2

    def to_store(
        self,
        prediction: Any,
        image_size: tuple[int, int],
        input_size: tuple[int, int],
        settings: Mapping[str, Any],
    ) -> dict[str, np.ndarray]:
        """Unit vectors (3, h, w) -> bilinearly resized to the label size and renormalised
        (interpolating unit vectors shortens them); only a vector that vanishes entirely
        (exactly opposite neighbours) is stored invalid."""
        size = label_size(image_size, float(settings.get("label_scale", 1.0)))
        n = torch.as_tensor(prediction).float().reshape(1, 3, *np.shape(prediction)[-2:])
        return {"normals": _unit_or_zero(resize_to(n, size)[0], 1e-6)}

    def label_to_store(
        self, sample: Mapping[str, Any], label_size: tuple[int, int]
    ) -> dict[str, np.ndarray] | None:
        """Real normals nearest-resized to the label size, valid ones renormalised (a PNG's
        8 bits leave them slightly off unit length), invalid ones (0, 0, 0)."""
        if "normals" not in sample:
            return None
        n = torch.as_tensor(sample["normals"]).as_subclass(torch.Tensor).float()
        n = resize_nearest(n.reshape(3, *n.shape[-2:]), label_size)
        return {"normals": _unit_or_zero(n, VALID_NORM)}

    def from_store(
        self, fields: Mapping[str, np.ndarray], image_size: tuple[int, int]
    ) -> dict[str, Any]:
        """(3, H, W) float32 at the image's own size (nearest: vectors stay unit, zeros
        stay invalid)."""
        n = torch.from_numpy(fields["normals"].astype(np.float32))
        return {"normals": resize_nearest(n, image_size)}

    def check_store_fields(
        self, check: StoreCheck, task: str, given: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        n = check.array(given["normals"], task, "normals", "float16", 3)
        if n.shape[0] != 3:
            raise check.fail(f"{task}.normals has shape {n.shape}, expected (3, h, w)")
        length = np.sqrt((n.astype(np.float32) ** 2).sum(0))
        invalid = (n == 0).all(0)
        if (np.abs(length - 1.0) > self.STORE_UNIT_TOLERANCE)[~invalid].any():
            raise check.fail(f"{task}.normals has vectors that are neither unit nor (0, 0, 0)")
        return {"normals": n}

    def store_stats(self) -> StoreStats:
        return _NormalsStats()

    @classmethod
    def format_store_stats(cls, stats: Mapping[str, Any]) -> list[str]:
        return [
            f"  invalid pixels: {stat_text(stats['invalid_fraction'])} of {stats['pixels']} pixels"
        ]

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


def _unit_or_zero(n: torch.Tensor, min_length: float) -> np.ndarray:
    """(3, h, w) vectors -> float16 unit vectors; those not longer than ``min_length`` -> 0."""
    length = n.norm(dim=0, keepdim=True)
    unit = torch.where(length > min_length, n / length.clamp(min=1e-12), torch.zeros_like(n))
    return unit.numpy().astype(np.float16)


class _NormalsStats(StoreStats):
    """Pixels and the fraction of them invalid ((0, 0, 0))."""

    def __init__(self) -> None:
        self.pixels = self.invalid = 0

    def add(self, fields: Mapping[str, np.ndarray], origin: str) -> None:
        n = fields["normals"]
        self.pixels += n[0].size
        self.invalid += int((n == 0).all(0).sum())

    def result(self) -> dict[str, Any]:
        fraction = self.invalid / self.pixels if self.pixels else None
        return {"pixels": self.pixels, "invalid_fraction": fraction}
