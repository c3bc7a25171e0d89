"""Drawing helpers of the tasks' pictures (:meth:`must.tasks.base.Task.draw`): colour maps,
a class palette, a text panel and the resize of a label to a picture's size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as F

# Anchor colours of a perceptually ordered map (dark purple -> yellow), like viridis.
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32
)


def fit_map(value: Any, size: Sequence[int], smooth: bool = False) -> torch.Tensor:
    """A (..., H, W) image or label resized to ``size`` (h, w): nearest neighbour (labels,
    and images made larger), bilinear with antialiasing when ``smooth``."""
    t = torch.as_tensor(value).as_subclass(torch.Tensor)
    mode = F.InterpolationMode.BILINEAR if smooth else F.InterpolationMode.NEAREST
    flat = t.reshape(-1, *t.shape[-2:])
    if flat.numel():
        flat = F.resize(flat, list(size), interpolation=mode, antialias=smooth)
    else:
        flat = flat.new_zeros((*flat.shape[:-2], *size))
    return flat.reshape(*t.shape[:-2], *size)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8; near is bright, invalid (0) is black."""
    valid = depth > 0
    out = np.zeros((*depth.shape, 3), np.uint8)
    if not valid.any():
        return out
    lo, hi = np.percentile(depth[valid], [1, 99])
    x = 1 - np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
    pos = x * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    rgb = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    out[valid] = rgb[valid].astype(np.uint8)
    return out


def class_palette(n: int, seed: int = 0) -> np.ndarray:
    """n distinct-ish colours (uint8), stable for a given n."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(40, 255, (max(n, 1), 3))).astype(np.uint8)


def text_panel(lines: list[str], height: int, width: int) -> torch.Tensor:
    """A (3, height, width) uint8 panel with ``lines`` of text, white on black."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 4 + 13 * i), line, fill=(255, 255, 255))
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1)
