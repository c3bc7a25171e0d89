"""ResNet + FPN backbone producing C5, P2-P7 and "fused P2" (every level resized to P2, summed).

The ResNet is timm's (depth and widths are settings, so a tiny CPU variant and ResNet-50/101/152
are one setting apart); the pyramid is torchvision's ``FeaturePyramidNetwork`` with P6/P7 from
P5 as in RetinaNet/MuST. Images are normalised here, once, so heads never normalise again.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from must.errors import ConfigError

# depth -> (block, blocks per stage)
RESNET_LAYOUTS = {
    10: (BasicBlock, (1, 1, 1, 1)),
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
LEVELS = ("p2", "p3", "p4", "p5", "p6", "p7")
STRIDES = {"c5": 32, "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128, "fused": 4}


class FullPrecisionP6P7(LastLevelP6P7):
    """torchvision's P6/P7 block (same weights and names), computed in float32 under autocast.

    On CPUs, oneDNN's bf16 weight gradient of a stride-2 conv whose input is one pixel wide
    leaves some kernel taps unwritten (seen with oneDNN 3.12, torch 2.14): they hold whatever
    the memory held before, at random NaN, 1e34 or a plausible value. P7 reads a one-pixel-wide
    P6 for every image up to 64 px wide, so CPU bf16 training drew a non-finite P7 gradient at
    random steps, and gradient clipping (a NaN norm) spread it to every weight. P6 and P7 are
    the two smallest maps: float32 there costs next to nothing, on any device.
    """

    def forward(
        self, p: list[torch.Tensor], c: list[torch.Tensor], names: list[str]
    ) -> tuple[list[torch.Tensor], list[str]]:
        x = p[-1] if self.use_P5 else c[-1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            p6 = self.p6(x.float())
            p7 = self.p7(F.relu(p6))
        # Back to the pyramid's dtype, so that every level has one dtype under autocast.
        return [*p, p6.to(x.dtype), p7.to(x.dtype)], [*names, "p6", "p7"]


def _run_stage(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ResNet stage, in float32 when CPU autocast is on and ``x`` is one pixel wide (the
    stage's stride-2 conv would meet the oneDNN bug of :class:`FullPrecisionP6P7`; only
    images at most 16 px wide get there)."""
    if x.shape[-1] == 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast(device_type="cpu", enabled=False):
            return stage(x.float()).to(x.dtype)
    return stage(x)


class BackboneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    depth: int = Field(18, description="ResNet depth: 10, 18, 34, 50, 101 or 152")
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    stem_width: int = 64
    fpn_channels: int = 256
    # Levels summed into "fused P2" for the pixel heads.
    fuse_levels: tuple[str, ...] = LEVELS
    # A local state dict: torchvision or timm ResNet weights, or a must backbone export.
    weights: str | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> dict with "c5", "p2".."p7" and "fused"."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        if config.depth not in RESNET_LAYOUTS:
            raise ConfigError(
                f"model.backbone.depth: {config.depth} is not one of {sorted(RESNET_LAYOUTS)}"
            )
        bad = [lv for lv in config.fuse_levels if lv not in LEVELS]
        if bad:
            raise ConfigError(f"model.backbone.fuse_levels: unknown levels {bad}; use {LEVELS}")
        self.config = config
        block, layers = RESNET_LAYOUTS[config.depth]
        self.body = ResNet(
            block, layers, channels=config.widths, stem_width=config.stem_width, num_classes=0
        )
        stage_channels = [w * block.expansion for w in config.widths]
        self.c5_channels = stage_channels[-1]
        self.fpn = FeaturePyramidNetwork(
            stage_channels,
            config.fpn_channels,
            extra_blocks=FullPrecisionP6P7(config.fpn_channels, config.fpn_channels),
        )
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        if config.weights:
            load_resnet_weights(self.body, config.weights)

    @property
    def out_channels(self) -> int:
        return self.config.fpn_channels

    def stages(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The ResNet's C2-C5 (images in [0, 1]; normalised here)."""
        x = (images - self.mean) / self.std
        b = self.body
        x = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        stages = OrderedDict()
        for i, layer in enumerate((b.layer1, b.layer2, b.layer3, b.layer4), start=2):
            x = _run_stage(layer, x)
            stages[f"c{i}"] = x
        return stages

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        stages = self.stages(images)
        pyramid = self.fpn(stages)
        feats = dict(zip(LEVELS, pyramid.values(), strict=True))
        feats["c5"] = stages["c5"]
        size = feats["p2"].shape[-2:]
        fused = feats["p2"]
        for level in self.config.fuse_levels:
            if level != "p2":
                fused = fused + F.interpolate(
                    feats[level], size=size, mode="bilinear", align_corners=False
                )
        feats["fused"] = fused
        return feats


def load_resnet_weights(body: nn.Module, path: str | Path) -> None:
    """Load a local ResNet state dict (torchvision, timm, or ours) into ``body``.

    Classifier weights ("fc.*") are ignored; any other missing or unexpected key is an error
    naming the keys, so a file for another architecture is never half-loaded silently.
    """
    path = Path(path)
    state = _read_state_dict(path)
    for prefix in ("backbone.body.", "body.", "module.", "model."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = body.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_mismatch = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shape_mismatch:
        raise ConfigError(
            f"{path}: weights do not fit this ResNet "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatch {shape_mismatch[:5]}); check model.backbone.depth and widths"
        )
    body.load_state_dict(state)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file read with ``weights_only=True``
    (never a full unpickling: a file from elsewhere must not run code)."""
    from must import checkpoint  # the file readers live there (it imports this module)

    if not path.is_file():
        raise ConfigError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        checkpoint.read_metadata(path)  # a damaged header: one line naming the file
        return checkpoint.read_tensors(path)
    obj = checkpoint.torch_load(path, "weights file")
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("must-model"):
        raise ConfigError(checkpoint.old_format_message(path))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path}: cannot read weights: expected a state dict of tensors")
    return obj
