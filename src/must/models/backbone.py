"""Backbone: a body (ResNet, or any timm model with ``features_only``) + FPN, publishing its
feature maps by name ("c5", "p2".."p7", "fused"; see ``must.features``).

``name: resnet`` (the default) is timm's ResNet with depth and widths as settings, so a tiny
CPU variant and ResNet-50/101/152 are one setting apart. Any other name is a timm model,
created with ``features_only=True`` and the four maps of reductions 4, 8, 16 and 32 selected
from its ``feature_info``. The pyramid is torchvision's ``FeaturePyramidNetwork`` with P6/P7
from P5 as in RetinaNet/MuST. Images (uint8, or float in [0, 1]) are scaled and normalised
here, once, so heads never normalise again.
"""

from __future__ import annotations

import difflib
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from must.errors import ConfigError
from must.features import FUSED, LAST_STAGE, LEVEL_STRIDES, LEVELS, FeatureSpec
from must.files import old_format_message, read_metadata, read_tensors, torch_load

# depth -> (block, blocks per stage)
RESNET_LAYOUTS = {
    10: (BasicBlock, (1, 1, 1, 1)),
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
RESNET = "resnet"
# Settings of the configurable ResNet only; another model takes its architecture from timm.
RESNET_SETTINGS = ("depth", "widths", "stem_width")
# The body's maps the FPN reads: C2-C5.
REDUCTIONS = (4, 8, 16, 32)


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

    # "resnet": the configurable ResNet below; any other name: a timm model that supports
    # features_only (convnext_atto, efficientnet_b0, regnetx_002, ...).
    name: str = RESNET
    depth: int = Field(18, description="ResNet depth: 10, 18, 34, 50, 101 or 152")
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    stem_width: int = 64
    fpn_channels: int = 256
    # Levels summed into "fused P2" for the pixel heads.
    fuse_levels: tuple[str, ...] = LEVELS
    # A local state dict: for name=resnet torchvision or timm ResNet weights, for a timm model
    # that model's own state dict; or a must backbone export. Never downloaded.
    weights: str | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name == RESNET:
            return name
        import timm

        if not timm.is_model(name):
            near = difflib.get_close_matches(name, [RESNET, *timm.list_models()], n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"{name!r} is neither 'resnet' nor a timm model name{hint}")
        return name

    @model_validator(mode="before")
    @classmethod
    def _resnet_settings_only_for_resnet(cls, data: Any) -> Any:
        # The presets set ResNet sizes; naming another model on top of one must still work, so
        # these settings are dropped (with a warning when they differ from the defaults).
        if not isinstance(data, dict) or data.get("name", RESNET) == RESNET:
            return data
        fields = cls.model_fields
        given = {k: data[k] for k in RESNET_SETTINGS if k in data}
        changed = [k for k, v in given.items() if _differs(v, fields[k].default)]
        if changed:
            warnings.warn(
                f"model.backbone.{', '.join(changed)}: ResNet settings, ignored for the timm "
                f"model {data['name']!r} (its architecture comes from timm)",
                UserWarning,
                stacklevel=2,
            )
        return {k: v for k, v in data.items() if k not in RESNET_SETTINGS}

    def spec(self) -> dict[str, Any]:
        """The settings a model file records (no weights file: the weights are in the file);
        a timm model's record leaves out the ResNet-only settings."""
        spec = self.model_dump(mode="json") | {"weights": None}
        if self.name != RESNET:
            spec = {k: v for k, v in spec.items() if k not in RESNET_SETTINGS}
        return spec


def _differs(value: Any, default: Any) -> bool:
    try:
        return tuple(value) != tuple(default) if isinstance(default, tuple) else value != default
    except TypeError:
        return True


class Backbone(nn.Module):
    """Images (B, 3, H, W), uint8 (0-255) or float in [0, 1] -> dict with "c5", "p2".."p7"
    and "fused", as described by :attr:`features` (name -> channels and stride)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        bad = [lv for lv in config.fuse_levels if lv not in LEVELS]
        if bad:
            raise ConfigError(f"model.backbone.fuse_levels: unknown levels {bad}; use {LEVELS}")
        self.config = config
        # A timm body's keys -> the whole timm model's (the ResNet's are torchvision's already),
        # and the whole model's keys features_only drops (its classifier head).
        self._library_keys: dict[str, str] = {}
        self._library_extra: set[str] = set()
        if config.name == RESNET:
            self.body, stage_channels = _resnet_body(config)
        else:
            self.body, stage_channels, self._library_keys, self._library_extra = _timm_body(
                config.name
            )
        # Some timm models (Swin, ...) give channels-last maps.
        self._channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        fpn = config.fpn_channels
        self.fpn = FeaturePyramidNetwork(
            stage_channels, fpn, extra_blocks=FullPrecisionP6P7(fpn, fpn)
        )
        self.features: dict[str, FeatureSpec] = {
            LAST_STAGE: FeatureSpec(LAST_STAGE, stage_channels[-1], REDUCTIONS[-1]),
            **{lv: FeatureSpec(lv, fpn, LEVEL_STRIDES[lv]) for lv in LEVELS},
            FUSED: FeatureSpec(FUSED, fpn, LEVEL_STRIDES["p2"]),
        }
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        if config.weights:
            self.load_weights(config.weights)

    @property
    def out_channels(self) -> int:
        """Width of the pyramid maps."""
        return self.config.fpn_channels

    def load_weights(self, path: str | Path) -> None:
        """Load a local state dict into the body: torchvision/timm ResNet weights for the
        ResNet, that timm model's own state dict otherwise (or a must export of either)."""
        if self.config.name == RESNET:
            load_resnet_weights(self.body, path)
        else:
            self._load_timm_weights(Path(path))

    def export_state(self) -> dict[str, torch.Tensor]:
        """The body's weights under the library's own key names (torchvision/timm ResNet
        names, or the timm model's), loadable into that library's model."""
        state = self.body.state_dict()
        if self.config.name == RESNET:
            return dict(state)
        self._check_key_map()
        return {self._library_keys[k]: v for k, v in state.items()}

    def stages(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The body's maps at strides 4, 8, 16 and 32, named C2-C5 (images uint8 or float in
        [0, 1]; normalised here)."""
        if images.dtype == torch.uint8:
            # Loaders deliver uint8 (a quarter of the bytes of floats); scaled here, on the
            # model's device, in float32 whatever autocast does later.
            images = images.float() / 255.0
        x = (images - self.mean) / self.std
        if self.config.name == RESNET:
            b = self.body
            x = b.maxpool(b.act1(b.bn1(b.conv1(x))))
            maps = []
            for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
                x = _run_stage(layer, x)
                maps.append(x)
        else:
            maps = list(self.body(x))
            if self._channels_last:
                maps = [m.permute(0, 3, 1, 2) for m in maps]
        return OrderedDict((f"c{i}", m) for i, m in enumerate(maps, start=2))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        stages = self.stages(images)
        pyramid = self.fpn(stages)
        feats = dict(zip(LEVELS, pyramid.values(), strict=True))
        feats[LAST_STAGE] = stages["c5"]
        size = feats["p2"].shape[-2:]
        fused = feats["p2"]
        for level in self.config.fuse_levels:
            if level != "p2":
                fused = fused + F.interpolate(
                    feats[level], size=size, mode="bilinear", align_corners=False
                )
        feats[FUSED] = fused
        return feats

    def _check_key_map(self) -> None:
        unmapped = sorted(set(self.body.state_dict()) - set(self._library_keys))
        if unmapped:
            raise ConfigError(
                f"model.backbone.name: cannot match the features_only keys of timm model "
                f"{self.config.name!r} to its own (e.g. {unmapped[:3]}), so its weights cannot "
                "be read or written in timm's names"
            )

    def _load_timm_weights(self, path: Path) -> None:
        name = self.config.name
        state = _read_state_dict(path)
        own = self.body.state_dict()
        ours = "backbone.body."
        if any(k.startswith(ours) for k in state):  # a must model file: the body's own names
            state = {k[len(ours) :]: v for k, v in state.items() if k.startswith(ours)}
            unexpected = sorted(set(state) - set(own))
        else:  # timm's names (timm's weights, or a must export)
            if all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
                state = {k[len("module.") :]: v for k, v in state.items()}
            self._check_key_map()
            to_body = {lib: k for k, lib in self._library_keys.items()}
            # The whole model's head (classifier, final norm) is not part of the body.
            unexpected = sorted(
                k for k in state if k not in to_body and k not in self._library_extra
            )
            state = {to_body[k]: v for k, v in state.items() if k in to_body}
        missing = sorted(set(own) - set(state))
        shape_mismatch = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shape_mismatch:
            raise ConfigError(
                f"{path}: weights do not fit timm model {name!r} "
                f"(missing {_few(missing)}, unexpected {_few(unexpected)}, "
                f"shape mismatch {_few(shape_mismatch)}); give a state dict of "
                f"timm.create_model({name!r}) or a must export of this backbone"
            )
        self.body.load_state_dict(state)


def _few(keys: list[str]) -> str:
    return f"{keys[:5]}{'...' if len(keys) > 5 else ''}"


def _resnet_body(config: BackboneConfig) -> tuple[nn.Module, list[int]]:
    if config.depth not in RESNET_LAYOUTS:
        raise ConfigError(
            f"model.backbone.depth: {config.depth} is not one of {sorted(RESNET_LAYOUTS)}"
        )
    block, layers = RESNET_LAYOUTS[config.depth]
    body = ResNet(
        block, layers, channels=config.widths, stem_width=config.stem_width, num_classes=0
    )
    return body, [w * block.expansion for w in config.widths]


def _timm_body(name: str) -> tuple[nn.Module, list[int], dict[str, str], set[str]]:
    """A timm model's features_only body at reductions 4-32, its stage channels, and its keys
    mapped to those of the whole model (``timm.create_model(name)``).

    The whole model is built on the meta device (no memory, no weights): its ``feature_info``
    says which outputs to select, and its keys are the names timm's own weights use.
    """
    import timm

    try:
        with torch.device("meta"):
            whole = timm.create_model(name, pretrained=False)
        info = list(getattr(whole, "feature_info", None) or [])
        last: dict[int, int] = {}
        for i, entry in enumerate(info):
            last[int(entry["reduction"])] = i  # the deepest map of each reduction
        missing = [r for r in REDUCTIONS if r not in last]
        if missing:
            raise ConfigError(
                f"model.backbone.name: timm model {name!r} has feature maps at reductions "
                f"{sorted(last) or 'none'}, but the FPN needs one at each of 4, 8, 16 and 32 "
                f"(missing {missing}); choose a model with four stages, e.g. convnext_*, "
                "efficientnet_*, regnet*, resnet*"
            )
        out_indices = tuple(last[r] for r in REDUCTIONS)
        body = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=out_indices
        )
    except ConfigError:
        raise
    except Exception as err:  # timm's own refusal (no features_only, ...): one line
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"model.backbone.name: timm cannot build {name!r} with features_only: {first}"
        ) from err
    reductions = [int(r) for r in body.feature_info.reduction()]
    if reductions != list(REDUCTIONS):
        raise ConfigError(
            f"model.backbone.name: timm model {name!r} gives maps at reductions {reductions} "
            f"for out_indices {list(out_indices)}, not {list(REDUCTIONS)}"
        )
    # features_only flattens the first level of Sequentials ("stages.0" -> "stages_0") or
    # wraps the model ("model."); everything else keeps its name.
    body_keys = set(body.state_dict())
    to_library: dict[str, str] = {}
    for key in whole.state_dict():
        for candidate in (key, key.replace(".", "_", 1), "model." + key):
            if candidate in body_keys and candidate not in to_library:
                to_library[candidate] = key
                break
    extra = set(whole.state_dict()) - set(to_library.values())
    return body, [int(c) for c in body.feature_info.channels()], to_library, extra


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
            f"(missing {_few(missing)}, unexpected {_few(unexpected)}, "
            f"shape mismatch {shape_mismatch[:5]}); check model.backbone.depth and widths"
        )
    body.load_state_dict(state)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file read with ``weights_only=True``
    (never a full unpickling: a file from elsewhere must not run code)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        read_metadata(path)  # a damaged header: one line naming the file
        return read_tensors(path)
    obj = torch_load(path, "weights file")
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("must-model"):
        raise ConfigError(old_format_message(path))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path}: cannot read weights: expected a state dict of tensors")
    return obj
