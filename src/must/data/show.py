"""A picture of a dataset with its labels drawn, to check by eye that they line up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from must.data.readers import MultiTaskDataset

# Anchor colours of a perceptually ordered map (dark purple -> yellow), like viridis.
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32
)


_PIXEL_KEYS = ("image", "instance_masks", "segmentation", "depth", "normals")


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


def _fit(sample: dict, side: int) -> dict:
    """The sample's pixel arrays and boxes scaled so its longer side is ``side`` (aspect
    kept): images of any size then fit one panel size (labels and upscaling: nearest)."""
    height, width = sample["image"].shape[-2:]
    scale = side / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    out = dict(sample)
    for key in _PIXEL_KEYS:
        if key not in sample:
            continue
        t = torch.as_tensor(sample[key]).as_subclass(torch.Tensor)
        smooth = key == "image" and scale < 1
        mode = F.InterpolationMode.BILINEAR if smooth else F.InterpolationMode.NEAREST
        flat = t.reshape(-1, *t.shape[-2:])
        if flat.numel():
            flat = F.resize(flat, size, interpolation=mode, antialias=smooth)
        else:
            flat = flat.new_zeros((*flat.shape[:-2], *size))
        out[key] = flat.reshape(*t.shape[:-2], *size)
    if "boxes" in sample:
        boxes = torch.as_tensor(sample["boxes"]).as_subclass(torch.Tensor).float()
        out["boxes"] = boxes * torch.tensor([size[1] / width, size[0] / height] * 2)
    return out


def _letterbox(panel: torch.Tensor, side: int) -> torch.Tensor:
    """A (3, h, w) panel centred on a black (3, side, side) canvas."""
    canvas = torch.zeros((3, side, side), dtype=panel.dtype)
    h, w = panel.shape[-2:]
    top, left = (side - h) // 2, (side - w) // 2
    canvas[:, top : top + h, left : left + w] = panel
    return canvas


def sample_panels(
    sample: dict, classes: dict[str, list[str]], min_side: int = 192
) -> list[torch.Tensor]:
    """Panels (3, side, side) uint8: image with boxes and instance masks, class map, depth,
    normals.

    Each image is scaled (aspect kept) so its longer side is ``side`` = ``min_side`` and
    letterboxed, so images of any size share one panel size and small ones keep readable
    box labels."""
    side = min_side
    sample = _fit(sample, side)
    image = sample["image"].clone()
    height, width = image.shape[-2:]
    blank = torch.zeros_like(image)
    panels = []
    drawn = image
    if "instance_masks" in sample and len(sample["instance_masks"]):
        drawn = draw_segmentation_masks(drawn, sample["instance_masks"].bool(), alpha=0.35)
    if "boxes" in sample and len(sample["boxes"]):
        names = classes.get("detection", [])
        labels = [names[i] if i < len(names) else str(i) for i in sample["box_labels"].tolist()]
        drawn = draw_bounding_boxes(drawn, sample["boxes"], labels=labels, colors="white")
    panels.append(drawn)
    if "segmentation" in sample:
        seg = np.asarray(sample["segmentation"]).astype(np.int64)
        pal = class_palette(256)
        rgb = pal[np.clip(seg, 0, 255)]
        rgb[seg == 255] = 0
        panels.append(torch.from_numpy(rgb).permute(2, 0, 1))
    else:
        panels.append(blank)
    if "depth" in sample:
        depth = np.asarray(sample["depth"])[0]
        panels.append(torch.from_numpy(colorize_depth(depth)).permute(2, 0, 1))
    else:
        panels.append(blank)
    if "normals" in sample:
        n = np.asarray(sample["normals"])
        rgb = np.where(np.abs(n).sum(0) > 0, (n + 1) / 2 * 255, 0).round().astype(np.uint8)
        panels.append(torch.from_numpy(rgb))
    else:
        panels.append(blank)
    return [_letterbox(p[:, :height, :width], side) for p in panels]


def text_panel(lines: list[str], height: int, width: int) -> torch.Tensor:
    """A (3, height, width) uint8 panel with ``lines`` of text, white on black."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 4 + 13 * i), line, fill=(255, 255, 255))
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1)


def show_dataset(root: str | Path, out: str | Path, split: str = "train", num: int = 8) -> Path:
    """Write a PNG grid: one row per sample (image+boxes+masks, class map, depth, normals)."""
    dataset = MultiTaskDataset(root, split=split, masks=True)
    count = min(num, len(dataset))
    panels = []
    for i in range(count):
        panels.extend(sample_panels(dataset[i], dataset.classes))
    grid = make_grid(panels, nrow=4, padding=2, pad_value=255)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
    return out
