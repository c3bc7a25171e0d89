"""Monocular depth: metric depth per pixel, a pixel head on fused P2, AbsRel / RMSE / delta.

Target (from :meth:`DepthTask.collate`): ``{"depth": (B, 1, H, W) float32 metres, "present":
(B,) bool}``; 0 marks an invalid pixel (and fills images without a label), so it is never
learned nor scored. Predictions: depth in metres, (B, 1, H, W), within [min_depth, max_depth].

Output activation: the head's raw output is log-depth ``z``; the prediction is
``exp(clamp(z, log min_depth, log max_depth))``. Log-depth is what the scale-invariant loss
works in (no exp-then-log round trip), it spreads near and far depths evenly over the output
range and keeps depth positive. The clamp is straight-through (its gradient is the identity)
so a pixel pushed outside the range can always be pulled back, while the value the loss and
the metric see is the clamped one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torchmetrics import Metric

from must import imageio
from must.dense import Depth
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
from must.tasks.draw import colorize_depth, fit_map
from must.tasks.pixel import (
    PixelHead,
    PixelTask,
    PixelTaskConfig,
    check_dense_size,
    collate_dense,
    resize_nearest,
    resize_to,
    target_field,
)
from must.tasks.registry import register_task


class DepthConfig(PixelTaskConfig):
    min_depth: float = Field(1e-3, gt=0)
    max_depth: float = Field(80.0, gt=0)
    loss: Literal["silog", "l1"] = "silog"
    silog_lambda: float = Field(0.85, ge=0, le=1)

    @model_validator(mode="after")
    def _range(self) -> DepthConfig:
        if self.max_depth <= self.min_depth:
            raise ValueError(
                f"max_depth ({self.max_depth}) must exceed min_depth ({self.min_depth})"
            )
        return self


class DepthHead(PixelHead):
    def __init__(self, *, config: DepthConfig, **kwargs: Any) -> None:
        super().__init__(out_channels=1, **kwargs)
        self.log_min = math.log(config.min_depth)
        self.log_max = math.log(config.max_depth)
        self.loss_kind = config.loss
        self.silog_lambda = config.silog_lambda

    def forward(
        self, feats: dict[str, torch.Tensor], image_size: tuple[int, int], target: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.raw(feats, image_size)
        # exp and the losses in float32: bf16 would round depth and log-depth to 8 bits.
        with full_precision(z):
            return self._depth_and_loss(z, target)

    def _depth_and_loss(
        self, z: torch.Tensor, target: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Straight-through clamp: clamped value, identity gradient.
        log_depth = z + (z.clamp(self.log_min, self.log_max) - z).detach()
        depth = log_depth.exp()
        if target is None:
            return depth, {}
        gt = target["depth"].float()
        valid = (gt > 0) & torch.isfinite(gt)
        # Invalid labels become 1 m (log 0, finite): a NaN there would reach the gradient
        # through where(); every use below masks them out anyway.
        gt = torch.where(valid, gt, torch.ones_like(gt))
        if not bool(valid.any()):
            return depth, {self.loss_kind: self.zero_loss()}
        if self.loss_kind == "l1":
            n = valid.sum()
            # where(), not a product with the mask: a NaN label must not leak into the sum.
            l1 = torch.where(valid, (depth - gt).abs(), torch.zeros_like(depth)).sum() / n
            return depth, {"l1": l1}
        return depth, {"silog": silog_loss(log_depth, gt, valid, self.silog_lambda)}


def silog_loss(
    log_pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, lam: float = 0.85
) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014), per image, averaged over the images that
    have a valid pixel: ``sqrt(mean(g^2) - lam * mean(g)^2)``, ``g = log pred - log gt`` over
    the image's valid pixels. Per image, because each image's unknown scale is what the loss
    forgives; an image without a valid pixel contributes nothing."""
    b = log_pred.shape[0]
    validf = valid.to(log_pred.dtype).reshape(b, -1)
    # Invalid pixels get gt 1 before the log (finite), then are masked out of every sum.
    gt = torch.where(valid, gt, torch.ones_like(gt))
    g = torch.where(valid, log_pred - gt.log(), torch.zeros_like(log_pred)).reshape(b, -1)
    n = validf.sum(1)
    has = n > 0
    n = n.clamp(min=1)
    mean_g = g.sum(1) / n
    mean_g2 = (g * g).sum(1) / n
    # Mathematically >= 0 for lam <= 1, but rounding can dip below; the floor also keeps
    # sqrt's gradient finite at a perfect prediction.
    var = (mean_g2 - lam * mean_g * mean_g).clamp(min=1e-12)
    return var.sqrt()[has].mean()


class DepthMetric(Metric):
    """Depth errors over every valid pixel of the set (pooled sums, not a mean of per-image
    means): ``abs_rel`` = mean |p-g|/g, ``rmse`` = sqrt(mean (p-g)^2) in metres, ``delta1/2/3``
    = fraction of pixels with max(p/g, g/p) < 1.25, 1.25^2, 1.25^3. Valid: g > 0.

    Two diagnostics separate a global scale error from a structural one:
    ``scale_gt_over_pred`` = geometric mean of g/p (1: unbiased; above 1: predictions too
    near), and ``delta1_aligned`` = delta1 after each image's prediction is multiplied by its
    median g/p (the median-scaling protocol of relative-depth evaluation, Zhou et al. 2017)."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # float64 sums: millions of pixels per set would lose digits in float32.
        names = ("count", "abs_rel", "sq", "delta1", "delta2", "delta3", "aligned", "log_ratio")
        for name in names:
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, target: Any) -> None:
        """``predictions``: depth (B, 1, H, W) or any shape matching ``target``'s depth."""
        gt, _ = target_field(target, "depth")
        gt = gt.to(predictions.device).double()
        p, g, valid = scored_pixels(predictions, gt)
        ratio = torch.maximum(p / g, g / p)
        self.count += valid.sum()
        self.abs_rel += abs_rel_sum(p, g)
        self.sq += ((p - g) ** 2).sum()
        self.delta1 += (ratio < 1.25).sum()
        self.delta2 += (ratio < 1.25**2).sum()
        self.delta3 += (ratio < 1.25**3).sum()
        # Per image: log(g/p) minus its median, i.e. after median scaling (NaN marks invalid).
        log_ratio = g.log() - p.log()
        self.log_ratio += log_ratio.sum()
        per_image = torch.full_like(gt, math.nan)
        per_image[valid] = log_ratio
        per_image = per_image.reshape(gt.shape[0] if gt.dim() > 1 else 1, -1)
        aligned = per_image - per_image.nanmedian(dim=1, keepdim=True).values
        self.aligned += (aligned.abs() < math.log(1.25)).sum()  # NaN compares False

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count  # 0 -> NaN everywhere: nothing was scored
        return {
            "abs_rel": self.abs_rel / n,
            "rmse": (self.sq / n).sqrt(),
            "delta1": self.delta1 / n,
            "delta2": self.delta2 / n,
            "delta3": self.delta3 / n,
            "delta1_aligned": self.aligned / n,
            "scale_gt_over_pred": (self.log_ratio / n).exp(),
        }


def scored_pixels(
    predictions: torch.Tensor, gt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted, true) depths of the valid pixels (float64) and the valid mask of ``gt``."""
    gt = gt.to(predictions.device).double()
    valid = (gt > 0) & torch.isfinite(gt)
    # A non-positive prediction would make the ratio infinite; our head never emits one.
    p = predictions.double().reshape(gt.shape)[valid].clamp(min=1e-12)
    return p, gt[valid], valid


def abs_rel_sum(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Sum over pixels of |p - g| / g."""
    return ((p - g).abs() / g).sum()


class DepthSource(BaseModel):
    """One 16-bit PNG per image; metres = value / scale; 0 marks invalid depth, and so do the
    raw values listed in ``invalid`` (e.g. a sensor's saturation code) and depths beyond
    ``max_depth`` metres.

    Depth files are found in ``root`` (by relative path, else by stem), or listed in a
    ``pairs`` file: TUM-style ``associations.txt`` lines ``time rgb/x.png time depth/y.png``
    (or ``rgb/x.png depth/y.png``), or a CSV of ``image,depth`` rows; paths in it are relative
    to the pairs file."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["png16"] = "png16"
    root: str | None = None
    pairs: str | None = None
    scale: float = Field(1000.0, gt=0)
    invalid: list[int] = Field(default_factory=list)
    max_depth: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _files_are_named(self) -> DepthSource:
        if (self.root is None) == (self.pairs is None):
            raise ValueError("give one of root (a folder of depth PNGs) or pairs (a pairs file)")
        bad = [v for v in self.invalid if not 0 <= v <= 65535]
        if bad:
            raise ValueError(f"invalid values {bad} are not 16-bit values (0..65535)")
        return self


@register_task
class DepthTask(PixelTask):
    """Metric depth regression (metres)."""

    name = "depth"
    label_keys = ("depth",)
    primary_metric = "abs_rel"
    higher_is_better = False
    needs_classes = False
    config_type = DepthConfig
    must_hand_weight = 1.0  # the paper sets depth's weight by hand
    config: DepthConfig

    # -- label files (see Task): one 16-bit greyscale PNG per image, metres = value / scale
    # (NYU/KITTI/TUM store millimetres: scale 1000), 0 = invalid.
    source_type = DepthSource

    @classmethod
    def read_label_file(
        cls, path: Path, image_size: tuple[int, int], source: Any, classes: list[str]
    ) -> dict[str, np.ndarray]:
        depth = imageio.read_depth_png(
            path, image_size, source.scale, source.invalid, source.max_depth, cls.name
        )
        return {cls.name: depth}

    @classmethod
    def label_entries(cls, labels: Mapping[str, Any], canvas_size: tuple[int, int]) -> dict:
        return {cls.name: Depth(torch.from_numpy(labels[cls.name])[None])}

    @classmethod
    def write_label_file(
        cls, sample: Any, root: Path, split: str, key: str, options: Any, where: Path
    ) -> dict:
        """Returns ``overflow``: pixels written as invalid, too far for 16 bits."""
        value, overflow = imageio.encode_depth(np.asarray(sample.depth), options.depth_scale)
        imageio.save_png(Image.fromarray(value), root / cls.name / split / f"{key}.png")
        return {"depth_overflow": overflow}

    @classmethod
    def rendered_source(
        cls, split: str, records: list[dict], root: Path, options: Any
    ) -> dict[str, Any]:
        return {"root": f"{cls.name}/{split}", "scale": options.depth_scale}

    @classmethod
    def rendered_format(cls, records: Mapping[str, list[dict]], options: Any) -> Any:
        overflow = sum(int(r.get("depth_overflow", 0)) for recs in records.values() for r in recs)
        return {
            "encoding": "16-bit grayscale PNG, metres = value / scale, 0 = invalid",
            "scale": options.depth_scale,
            "overflow_pixels": overflow,
        }

    def build_head(self, features: Mapping[str, FeatureSpec]) -> TaskHead:
        return DepthHead(config=self.config, **self.head_kwargs(features))

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor] | None:
        out = collate_dense(samples, "depth", 0.0, torch.float32, channels=1)
        if out is None:
            return None
        depth, present = out
        return {"depth": depth, "present": present}

    def new_metric(self) -> Metric:
        return DepthMetric()

    def image_records(
        self, predictions: torch.Tensor, target: Any
    ) -> list[dict[str, np.ndarray] | None]:
        """``abs_rel_sum``, ``count`` (1,) float64: the image's valid pixels as ``DepthMetric``
        sums them."""
        gt, present = target_field(target, "depth")
        out: list[dict[str, np.ndarray] | None] = []
        for i in range(len(gt)):
            if present is not None and not bool(present[i]):
                out.append(None)
                continue
            p, g, _ = scored_pixels(predictions[i], gt[i])
            out.append(
                {
                    "abs_rel_sum": np.array([float(abs_rel_sum(p, g))], np.float64),
                    "count": np.array([float(g.numel())], np.float64),
                }
            )
        return out

    @classmethod
    def records_metric(
        cls, records: list[dict[str, np.ndarray]]
    ) -> Callable[[np.ndarray], np.ndarray]:
        """AbsRel pooled over every valid pixel: weighted ``abs_rel_sum`` / weighted ``count``
        (not a mean of per-image means, as ``DepthMetric``)."""
        return weighted_ratio(records, "abs_rel_sum", "count")

    # -- the pseudo-label store: ``depth`` float16 (h, w) metres, 0 = invalid

    def to_store(
        self,
        prediction: Any,
        image_size: tuple[int, int],
        input_size: tuple[int, int],
        settings: Mapping[str, Any],
    ) -> dict[str, np.ndarray]:
        """Depth (1, h, w) metres -> bilinearly resized to the label size."""
        size = label_size(image_size, float(settings.get("label_scale", 1.0)))
        depth = torch.as_tensor(prediction).float()
        depth = resize_to(depth.reshape(1, 1, *depth.shape[-2:]), size)[0, 0]
        return {"depth": depth.clamp(min=0).numpy().astype(np.float16)}

    def label_to_store(
        self, sample: Mapping[str, Any], label_size: tuple[int, int]
    ) -> dict[str, np.ndarray] | None:
        """Real depth as it is, nearest-resized to the label size (0 stays invalid)."""
        if "depth" not in sample:
            return None
        depth = torch.as_tensor(sample["depth"]).as_subclass(torch.Tensor).float()
        depth = resize_nearest(depth.reshape(depth.shape[-2:]), label_size)
        return {"depth": depth.numpy().astype(np.float16)}

    def from_store(
        self, fields: Mapping[str, np.ndarray], image_size: tuple[int, int]
    ) -> dict[str, Any]:
        depth = torch.from_numpy(fields["depth"].astype(np.float32))
        return {"depth": Depth(resize_nearest(depth, image_size)[None])}

    # -- store and labelling: encoding and checks, statistics

    store_encoding: ClassVar[dict[str, Any]] = {
        "fields": {"depth": "float16"},
        "unit": "m",
        "invalid": 0,
    }

    def check_store_fields(
        self, check: StoreCheck, task: str, given: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        d = check.array(given["depth"], task, "depth", "float16", 2)
        if (d < 0).any():
            raise check.fail(f"{task}.depth has negative values (0 marks invalid pixels)")
        return {"depth": d}

    def store_stats(self) -> StoreStats:
        return _DepthStats()

    @classmethod
    def format_store_stats(cls, stats: Mapping[str, Any]) -> list[str]:
        return [
            f"  depth mean {stat_text(stats['mean_m'], 2)} m, range "
            f"[{stat_text(stats['min_m'], 2)}, {stat_text(stats['max_m'], 2)}] m, "
            f"invalid fraction {stat_text(stats['invalid_fraction'])}"
        ]

    # -- pictures, transforms and evaluation

    picture = "panel"
    pad_fill: ClassVar[Mapping[str, float]] = {"depth": 0.0}
    nothing_to_measure = "no label pixel holds a valid depth (> 0)"

    @classmethod
    def wrap_for_transforms(
        cls, sample: dict[str, Any], *, scales_with_zoom: bool
    ) -> dict[str, Any]:
        if "depth" in sample:
            # The pipeline's setting wins over whatever flag the reader attached.
            sample["depth"] = Depth(sample["depth"], scales_with_zoom=scales_with_zoom)
            check_dense_size(sample, "depth")
        return sample

    @classmethod
    def draw(
        cls,
        entries: Mapping[str, Any],
        image: torch.Tensor,
        classes: Sequence[str],
        source_size: tuple[int, int],
    ) -> torch.Tensor | None:
        """Depth in a perceptual colour map, near bright, invalid black."""
        if "depth" not in entries:
            return None
        depth = np.asarray(fit_map(entries["depth"], image.shape[-2:]))[0]
        return torch.from_numpy(colorize_depth(depth)).permute(2, 0, 1)

    def prediction_entries(
        self, prediction: Any, image_size: tuple[int, int]
    ) -> dict[str, Any] | None:
        return self.from_store(self.to_store(prediction, image_size, image_size, {}), image_size)


class _DepthStats(StoreStats):
    """Pixels, the fraction invalid (0), and the mean and range of the valid depths."""

    def __init__(self) -> None:
        self.sum = self.n = self.invalid = self.pixels = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, fields: Mapping[str, np.ndarray], origin: str) -> None:
        d = fields["depth"].astype(np.float64)
        valid = d > 0
        self.pixels += d.size
        self.invalid += d.size - int(valid.sum())
        if valid.any():
            self.sum += float(d[valid].sum())
            self.n += int(valid.sum())
            self.lo = min(self.lo, float(d[valid].min()))
            self.hi = max(self.hi, float(d[valid].max()))

    def result(self) -> dict[str, Any]:
        return {
            "pixels": int(self.pixels),
            "invalid_fraction": self.invalid / self.pixels if self.pixels else None,
            "mean_m": self.sum / self.n if self.n else None,
            "min_m": self.lo if self.n else None,
            "max_m": self.hi if self.n else None,
        }
