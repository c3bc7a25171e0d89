"""``MultiTaskModel``: one backbone and a ``ModuleDict`` of heads, one per task.

A teacher is a MultiTaskModel with one task, the student has several, and a transfer model
has one new task on a backbone initialised from another checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from must.models.backbone import Backbone, BackboneConfig
from must.tasks.base import Task


class MultiTaskModel(nn.Module):
    def __init__(self, backbone: BackboneConfig | Backbone, tasks: dict[str, Task]) -> None:
        super().__init__()
        # No task: a backbone-only model (self-supervised pre-training writes one).
        self.backbone = backbone if isinstance(backbone, Backbone) else Backbone(backbone)
        self.tasks = dict(tasks)
        # Heads are built from the maps the backbone publishes (names, channels, strides).
        self.heads = nn.ModuleDict(
            {name: task.build_head(self.backbone.features) for name, task in tasks.items()}
        )

        self.backbone_frozen = False

    def freeze_backbone(self) -> None:
        """Probe mode: the backbone (body and FPN) keeps its weights and its batch-norm
        statistics; only the heads learn."""
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> MultiTaskModel:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def forward(
        self,
        images: torch.Tensor,
        targets: dict[str, Any] | None = None,
        features: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """Predictions per task and, given targets, loss terms per task.

        Tasks missing from ``targets`` (no image of the batch has their label) get zero
        losses that keep every head in the graph, as DDP requires.

        ``features``: the backbone's maps of ``images`` computed earlier (a frozen backbone's
        cache, ``must.training.feature_cache``); the heads read them and the backbone does not
        run. ``images`` still gives the image size (its shape only is read then).
        """
        feats = self.backbone(images) if features is None else features
        image_size = (images.shape[-2], images.shape[-1])
        predictions: dict[str, Any] = {}
        losses: dict[str, dict[str, torch.Tensor]] = {}
        for name, head in self.heads.items():
            if targets is None:
                predictions[name], _ = head(feats, image_size, None)
            elif targets.get(name) is None:
                losses[name] = {"loss": head.zero_loss()}
            else:
                predictions[name], losses[name] = head(feats, image_size, targets[name])
        return predictions, losses
