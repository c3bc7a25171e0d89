"""The task registry and the task hooks that draw, wrap and pad labels (pictures identical to
the drawing code they replaced)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from must.config import TeachConfig
from must.data.readers import MultiTaskDataset
from must.data.render import render_dataset
from must.data.show import sample_panels
from must.data.spec import TASKS
from must.errors import ConfigError
from must.tasks import TASK_TYPES, Task, register_task, task_names
from must.tasks.draw import class_palette, colorize_depth, fit_map
from must.tasks.segmentation import SegmentationTask
from must.training.data import pad_samples


def test_tasks_register_in_order_and_derived_lists_follow():
    assert task_names() == ["classification", "detection", "segmentation", "depth", "normals"]
    assert list(TASKS) == task_names()


def test_a_second_task_of_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'segmentation' is taken"):

        @register_task
        class Other(SegmentationTask):
            name = "segmentation"

    assert TASK_TYPES["segmentation"] is SegmentationTask


def test_an_unknown_task_name_in_a_config_names_the_known_tasks():
    with pytest.raises(Exception, match="known tasks: classification, detection"):
        TeachConfig.model_validate({"task": "flow", "data": {"dataset": "x"}})
    with pytest.raises(ConfigError, match="unknown task"):
        from must.tasks import build_task

        build_task("flow", None)


def _old_sample_panels(sample: dict, classes: dict, side: int = 192) -> list[torch.Tensor]:
    """The drawing code ``sample_panels`` had before the tasks drew their own pictures."""
    height, width = sample["image"].shape[-2:]
    scale = side / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    s = dict(sample)
    for key in ("image", "instance_masks", "segmentation", "depth", "normals"):
        if key in sample:
            s[key] = fit_map(sample[key], size, smooth=key == "image" and scale < 1)
    if "boxes" in sample:
        boxes = torch.as_tensor(sample["boxes"]).as_subclass(torch.Tensor).float()
        s["boxes"] = boxes * torch.tensor([size[1] / width, size[0] / height] * 2)
    image = s["image"].clone()
    blank = torch.zeros_like(image)
    drawn = image
    if "instance_masks" in s and len(s["instance_masks"]):
        drawn = draw_segmentation_masks(drawn, s["instance_masks"].bool(), alpha=0.35)
    if "boxes" in s and len(s["boxes"]):
        names = classes.get("detection", [])
        labels = [names[i] if i < len(names) else str(i) for i in s["box_labels"].tolist()]
        drawn = draw_bounding_boxes(drawn, s["boxes"], labels=labels, colors="white")
    panels = [drawn]
    if "segmentation" in s:
        seg = np.asarray(s["segmentation"]).astype(np.int64)
        rgb = class_palette(256)[np.clip(seg, 0, 255)]
        rgb[seg == 255] = 0
        panels.append(torch.from_numpy(rgb).permute(2, 0, 1))
    else:
        panels.append(blank)
    if "depth" in s:
        depth = np.asarray(s["depth"])[0]
        panels.append(torch.from_numpy(colorize_depth(depth)).permute(2, 0, 1))
    else:
        panels.append(blank)
    if "normals" in s:
        n = np.asarray(s["normals"])
        rgb = np.where(np.abs(n).sum(0) > 0, (n + 1) / 2 * 255, 0).round().astype(np.uint8)
        panels.append(torch.from_numpy(rgb))
    else:
        panels.append(blank)
    out = []
    for p in panels:
        canvas = torch.zeros((3, side, side), dtype=p.dtype)
        h, w = size
        top, left = (side - h) // 2, (side - w) // 2
        canvas[:, top : top + h, left : left + w] = p[:, :h, :w]
        out.append(canvas)
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> MultiTaskDataset:
    root = render_dataset("novel", tmp_path_factory.mktemp("novel"), 6, 48, progress=False)
    return MultiTaskDataset(root, split="train", masks=True)


def test_pictures_are_pixel_identical_to_the_old_drawing_code(rendered):
    sample = rendered[0]
    assert {"boxes", "instance_masks", "segmentation", "depth", "normals"} <= set(sample)
    partial = {"image": sample["image"][:, :, :40], "depth": sample["depth"][:, :, :40]}
    for s in (sample, partial):
        new, old = sample_panels(s, rendered.classes), _old_sample_panels(s, rendered.classes)
        assert len(new) == len(old) == 4
        for a, b in zip(new, old, strict=True):
            assert torch.equal(a, b)
    # The labels were drawn over the image: its panel differs from the bare image's.
    bare = sample_panels({"image": sample["image"]}, {})[0]
    assert not torch.equal(sample_panels(sample, rendered.classes)[0], bare)


class _Toy(Task):
    """A task with no picture, no transform and no padding of its own (every default)."""

    name = "toy_views"
    label_keys = ("toy_views",)
    primary_metric = "x"
    higher_is_better = True
    needs_classes = False

    def build_head(self, features: Any) -> Any:
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> Any:
        return None

    def new_metric(self) -> Any:
        raise NotImplementedError


@pytest.fixture
def toy():
    register_task(_Toy)
    yield _Toy
    del TASK_TYPES[_Toy.name]


def test_a_task_with_every_default_is_left_out_of_pictures_transforms_and_padding(rendered, toy):
    sample = {**rendered[0], "toy_views": torch.ones(2)}
    assert len(sample_panels(sample, rendered.classes)) == 4
    assert toy.draw(sample, sample["image"], [], (48, 48)) is None
    out = toy.wrap_for_transforms(dict(sample), scales_with_zoom=True)
    assert out["toy_views"] is sample["toy_views"]
    assert "toy_views" in list(TASKS)
    small = {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "toy_views": torch.ones(2)}
    big = {"image": torch.zeros(3, 8, 16, dtype=torch.uint8), "toy_views": torch.ones(2)}
    padded = pad_samples([small, big], 8)
    assert padded[0]["image"].shape == (3, 8, 16) and torch.equal(
        padded[0]["toy_views"], torch.ones(2)
    )


def test_padding_fills_come_from_the_tasks():
    seg = torch.zeros(8, 8, dtype=torch.int64)
    small = {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "segmentation": seg}
    big = {"image": torch.zeros(3, 16, 8, dtype=torch.uint8)}
    padded = pad_samples([small, big], 8)
    assert padded[0]["segmentation"].shape == (16, 8)
    assert int(padded[0]["segmentation"][8:].min()) == SegmentationTask.pad_fill["segmentation"]
