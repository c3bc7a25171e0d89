"""Names and strides of the feature maps a backbone publishes, and the record describing one.

Models build backbones that publish these maps; tasks build heads that read them. Both import
this module, which imports neither, so ``models`` and ``tasks`` never import each other.

The maps every backbone publishes (see ``must.models.backbone``):

- ``"c5"``: the last stage of the backbone body, stride 32, as many channels as that stage
  has (the name is the detection literature's C5 whatever the family: a ConvNeXt's last stage
  is "c5" too);
- ``"p2"`` .. ``"p7"``: the feature pyramid, stride 2**k, the FPN's width;
- ``"fused"``: every pyramid level resized to P2's resolution and summed (stride 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from must.errors import ConfigError

LAST_STAGE = "c5"
FUSED = "fused"
LEVELS = ("p2", "p3", "p4", "p5", "p6", "p7")
# Pyramid level name -> stride (pixels of the input per cell of the map).
LEVEL_STRIDES = {level: 2 ** int(level[1:]) for level in LEVELS}


@dataclass(frozen=True)
class FeatureSpec:
    """One feature map a backbone publishes: its name, channels and stride (input pixels per
    map cell). timm's ``feature_info`` and detectron2's ``ShapeSpec`` are the same idea."""

    name: str
    channels: int
    stride: int


def require(features: Mapping[str, FeatureSpec], name: str, reader: str) -> FeatureSpec:
    """The spec of map ``name``; a clear error naming ``reader`` when it is not published."""
    if name not in features:
        raise ConfigError(
            f"{reader} reads feature map {name!r}, which this backbone does not publish "
            f"(it publishes {', '.join(features)})"
        )
    return features[name]
