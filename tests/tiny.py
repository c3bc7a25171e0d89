"""The tiny model the training tests share, as config overrides (fast on two CPU cores)."""

TINY_MODEL = [
    "model.backbone.depth=10",
    "model.backbone.widths=[8,16,32,64]",
    "model.backbone.stem_width=8",
    "model.backbone.fpn_channels=16",
]
