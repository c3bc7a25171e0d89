"""Code shared by the pixel-wise tasks (segmentation, depth, surface normals).

Each pixel task builds its own head (heads are never shared between tasks, as in MuST): a few
hidden 3x3 convs (conv + BatchNorm + ReLU) and one linear 1x1 conv on one feature map of the
backbone ("fused" P2 by default), whose raw output is resized bilinearly to the image size.
Under autocast the hidden convs run in low precision; the output conv, the resize and the
losses run in float32 (:func:`must.tasks.base.full_precision`).
Dense labels are collated by one helper: images without the label get a fill value that the
task's loss ignores, and a ``present`` flag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from must.features import FeatureSpec, require
from must.tasks.base import Task, TaskConfig, TaskHead, full_precision

FeatureName = Literal["fused", "p2", "p3", "p4", "p5", "p6", "p7"]


class PixelTaskConfig(TaskConfig):
    """Settings shared by the pixel heads."""

    # The feature map the head reads; tiny images may prefer a coarser or finer level.
    feature: FeatureName = "fused"
    hidden_convs: int = Field(3, ge=0, description="hidden 3x3 conv+BN+ReLU layers")


def build_pixel_tower(
    in_channels: int, out_channels: int, hidden_channels: int, hidden_convs: int = 3
) -> nn.Sequential:
    """``hidden_convs`` x (3x3 conv + BatchNorm + ReLU), then one linear 1x1 conv."""
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(hidden_convs):
        # No conv bias: BatchNorm's shift makes it redundant.
        layers += [
            nn.Conv2d(channels, hidden_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
        ]
        channels = hidden_channels
    layers.append(nn.Conv2d(channels, out_channels, 1))
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    # A small output layer starts every pixel task near its neutral prediction (uniform class
    # scores, depth exp(0) = 1 m, ...) instead of at a large random one.
    out = layers[-1]
    assert isinstance(out, nn.Conv2d)
    nn.init.normal_(out.weight, std=0.01)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (B, C, h, w) map to ``size``; a no-op when already there."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (C, h, w) or (h, w) label to ``size``, keeping its dtype
    (class ids and the invalid 0 of depth never blend); a no-op when already there."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    flat = x.reshape(1, -1, *x.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode="nearest-exact")
    return out.reshape(*x.shape[:-2], *size).to(x.dtype)


class PixelHead(TaskHead):
    """Base of the pixel heads: :meth:`raw` gives the tower's output at the image size, in
    float32. Under autocast only the hidden convs run in low precision: the output conv and
    the resize run in float32 (a bf16 output would round log-depth or a logit to 8 bits),
    and so must the subclasses' activations and losses (``with full_precision(...)``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int,
        hidden_convs: int = 3,
        feature: str = "fused",
    ) -> None:
        super().__init__()
        self.feature = feature
        self.tower = build_pixel_tower(in_channels, out_channels, hidden_channels, hidden_convs)

    def raw(self, feats: dict[str, torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        x = self.tower[:-1](feats[self.feature])
        with full_precision(x):
            return resize_to(self.tower[-1](x.float()), image_size)


class PixelTask(Task):
    """Base of the pixel tasks: builds the head from the config and collates dense labels."""

    config_type = PixelTaskConfig
    config: PixelTaskConfig

    def head_kwargs(self, features: Mapping[str, FeatureSpec]) -> dict:
        """Arguments of :class:`PixelHead` from the config and the map it reads; subclasses
        add their own."""
        in_channels = require(features, self.config.feature, f"the {self.name} head").channels
        return {
            "in_channels": in_channels,
            "hidden_channels": self.config.hidden_channels or in_channels,
            "hidden_convs": self.config.hidden_convs,
            "feature": self.config.feature,
        }


def collate_dense(
    samples: list[dict],
    key: str,
    fill: float,
    dtype: torch.dtype,
    channels: int | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stack the dense labels ``samples[i][key]`` into one tensor.

    ``channels`` is the label's channel count ((C, H, W) labels) or None for (H, W) labels
    (a (1, H, W) one is squeezed). Images without the label are filled with ``fill``, a value
    the task's loss ignores. Returns ``(labels, present)`` or None when no sample has the label.
    """
    present = [key in s for s in samples]
    if not any(present):
        return None
    labels = [_as_label(s[key], key, channels).to(dtype) for s in samples if key in s]
    shape = labels[0].shape
    for lab in labels:
        if lab.shape != shape:
            raise ValueError(
                f"{key!r} labels of one batch differ in size: {tuple(lab.shape)} vs "
                f"{tuple(shape)}; resize or crop them to one size before batching"
            )
    out = torch.full((len(samples), *shape), fill, dtype=dtype)
    out[torch.tensor(present)] = torch.stack(labels)
    return out, torch.tensor(present, dtype=torch.bool)


def check_dense_size(sample: Mapping[str, Any], key: str) -> None:
    """Refuse a dense label whose size is not its image's: v2's ``query_size`` ignores custom
    tv_tensors, so the transforms would not catch it."""
    if "image" in sample:
        hw = tuple(sample["image"].shape[-2:])
        if tuple(sample[key].shape[-2:]) != hw:
            raise ValueError(f"{key} is {tuple(sample[key].shape[-2:])}, image is {hw}")


def narrow_classes(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Class ids as uint8 when every value and the ignore index fit in 0-255 (an eighth of
    the bytes of int64 across the loader's process boundary), else unchanged. Losses and
    metrics take them back to int64 on the model's device."""
    fits = 0 <= ignore_index <= 255
    if fits and labels.numel():
        fits = int(labels.min()) >= 0 and int(labels.max()) <= 255
    return labels.to(torch.uint8) if fits else labels


def _as_label(value: object, key: str, channels: int | None) -> torch.Tensor:
    # tv_tensors (Mask, Image) are plain tensors for batching: stripping the subclass keeps
    # torch ops from re-wrapping results.
    t = torch.as_tensor(value).as_subclass(torch.Tensor)
    if channels is None:
        if t.dim() == 3 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 2:
            raise ValueError(f"{key!r} label should be (H, W), got shape {tuple(t.shape)}")
    elif channels == 1 and t.dim() == 2:
        t = t[None]
    if channels is not None and (t.dim() != 3 or t.shape[0] != channels):
        raise ValueError(f"{key!r} label should be ({channels}, H, W), got shape {tuple(t.shape)}")
    return t


def target_field(target: object, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(target[name], target["present"])`` of a collated target, or ``(target, None)`` when a
    bare tensor is given (metrics accept both, which keeps hand-made tests short)."""
    if isinstance(target, dict):
        return target[name], target.get("present")
    assert isinstance(target, torch.Tensor)
    return target, None
