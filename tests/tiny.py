"""The tiny model the training tests share, as config overrides (fast on two CPU cores)."""

TINY_MODEL = [
    "model.backbone.depth=10",
    "model.backbone.widths=[8,16,32,64]",
    "model.backbone.stem_width=8",
    "model.backbone.fpn_channels=16",
]

# Two steps of batch 4 at 32 px, validated and checkpointed once: enough to exercise a whole
# training run (resume, selection, summary) in about a second.
TINY_STEPS = [
    "data.image_size=32",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.max_steps=2",
    "train.val_every=2",
    "train.checkpoint_every=2",
]

# A timm backbone of another family (timm's smallest ConvNeXt), at the same FPN width: the
# presets' ResNet sizes are ignored for it.
TIMM_MODEL = ["model.backbone.name=test_convnext", "model.backbone.fpn_channels=16"]
