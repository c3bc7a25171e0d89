"""The tiny model and short runs the training tests share (fast on two CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

from must.models.backbone import BackboneConfig

# The backbone as a config section (for YAML files); TINY_MODEL and tiny_backbone() follow it.
TINY_BACKBONE = {"depth": 10, "widths": [8, 16, 32, 64], "stem_width": 8, "fpn_channels": 16}

TINY_MODEL = [
    f"model.backbone.{key}={json.dumps(value, separators=(',', ':'))}"
    for key, value in TINY_BACKBONE.items()
]

# Two steps of batch 4 (validated at the end), as a config section.
TINY_TRAIN_SECTION = {"batch_size": 4, "max_steps": 2, "val_every": 2, "warmup_steps": 1}


def tiny_backbone(**changes: object) -> BackboneConfig:
    """The tiny backbone's config, with ``changes`` (e.g. ``fpn_channels=32``)."""
    return BackboneConfig(**{**TINY_BACKBONE, **changes})


def tiny_steps(max_steps: int = 2, every: int | None = None) -> list[str]:
    """Overrides: ``max_steps`` steps of batch 4, validated and checkpointed every ``every``
    steps (default: once, at the end)."""
    every = every or max_steps
    return [
        "train.batch_size=4",
        "train.warmup_steps=1",
        f"train.max_steps={max_steps}",
        f"train.val_every={every}",
        f"train.checkpoint_every={every}",
    ]


def tiny_data(cache: Path | str | None = None, num: int = 20) -> list[str]:
    """Overrides: ``num`` rendered images at 32 px, cached under ``cache`` (if given)."""
    data = [f"data.num={num}", "data.render_size=32", "data.image_size=32"]
    return data if cache is None else [*data, f"data.cache={cache}"]


# Two steps at 32 px, validated and checkpointed once: enough to exercise a whole training run
# (resume, selection, summary) in about a second.
TINY_STEPS = ["data.image_size=32", *tiny_steps(2)]

# A timm backbone of another family (timm's smallest ConvNeXt), at the same FPN width: the
# presets' ResNet sizes are ignored for it.
TIMM_MODEL = ["model.backbone.name=test_convnext", "model.backbone.fpn_channels=16"]
