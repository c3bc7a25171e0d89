"""A picture of a dataset with its labels drawn, to check by eye that they line up."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from must.data.readers import MultiTaskDataset
from must.tasks import TASK_TYPES, Task
from must.tasks.draw import class_palette, colorize_depth, fit_map, text_panel

__all__ = [
    "class_palette",
    "colorize_depth",
    "sample_panels",
    "show_dataset",
    "task_picture",
    "text_panel",
]


def _fit_image(image: torch.Tensor, side: int) -> torch.Tensor:
    """The image scaled so its longer side is ``side`` (aspect kept): images of any size then
    fit one panel size (smooth when made smaller, nearest when made larger)."""
    height, width = image.shape[-2:]
    scale = side / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return fit_map(image, size, smooth=scale < 1)


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
    """Panels (3, side, side) uint8: the image with the labels drawn over it (boxes and
    instance masks), then one panel per task that draws its labels apart (``Task.picture ==
    "panel"``, in registration order: class map, depth, normals), blank when the sample lacks
    that task's labels.

    Each image is scaled (aspect kept) so its longer side is ``side`` = ``min_side`` and
    letterboxed, so images of any size share one panel size and small ones keep readable
    box labels."""
    side = min_side
    source = tuple(sample["image"].shape[-2:])
    image = _fit_image(sample["image"], side).clone()
    height, width = image.shape[-2:]
    blank = torch.zeros_like(image)
    drawn, panels = image, []
    for kind in TASK_TYPES.values():
        names = classes.get(kind.name, [])
        if kind.picture == "overlay":
            out = kind.draw(sample, drawn, names, source)
            drawn = drawn if out is None else out
        elif kind.picture == "panel":
            out = kind.draw(sample, image, names, source)
            panels.append(blank if out is None else out)
    return [_letterbox(p[:, :height, :width], side) for p in (drawn, *panels)]


def task_picture(
    task: Task | type[Task],
    entries: dict,
    image: torch.Tensor,
    classes: list[str],
    min_side: int = 192,
) -> torch.Tensor | None:
    """One task's label or prediction (sample ``entries`` at ``image``'s size) as a (3, side,
    side) panel, fitted like :func:`sample_panels`; None when the task draws no picture of
    them."""
    side = min_side
    fitted = _fit_image(image, side).clone()
    height, width = fitted.shape[-2:]
    panel = task.draw(entries, fitted, classes, tuple(image.shape[-2:]))
    return None if panel is None else _letterbox(panel[:, :height, :width], side)


def show_dataset(root: str | Path, out: str | Path, split: str = "train", num: int = 8) -> Path:
    """Write a PNG grid: one row per sample (image+boxes+masks, class map, depth, normals:
    :func:`sample_panels`)."""
    dataset = MultiTaskDataset(root, split=split, masks=True)
    count = min(num, len(dataset))
    panels, per_row = [], 1
    for i in range(count):
        row = sample_panels(dataset[i], dataset.classes)
        panels.extend(row)
        per_row = len(row)
    grid = make_grid(panels, nrow=per_row, padding=2, pad_value=255)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
    return out
