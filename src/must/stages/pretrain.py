"""``must pretrain``: SimCLR self-supervised pre-training of the backbone on unlabelled
images, the self-supervised baseline MuST is compared to.

The contrastive loss and projection head come from lightly; the two views are drawn with
torchvision's transforms v2 on the image tensors our readers return. The result is a
backbone-only must checkpoint (no task head) that ``must transfer --backbone`` accepts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch.utils.data import Dataset
from torchvision.transforms import v2

from must.checkpoint import SUMMARY_FILE, save_model
from must.config import SimCLRConfig, TrainConfig, ViewsConfig, dump_yaml
from must.data.readers import MultiTaskDataset
from must.features import LAST_STAGE
from must.models.backbone import Backbone
from must.models.model import MultiTaskModel
from must.stages.common import claim_output
from must.summary import RunInfo
from must.training.data import make_loader
from must.training.fit import end_other_processes, fit, make_trainer, train_seconds
from must.training.module import NonFiniteLossError, optimizer_and_schedule


def simclr_views(cfg: ViewsConfig, size: int) -> v2.Compose:
    """One random view of a uint8 image tensor, still uint8: four times less to move from the
    loader's workers (shared memory) than float views; ``SimCLRModule`` scales it to [0, 1]."""
    s = cfg.color_jitter
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=cfg.scale, antialias=True),
            v2.RandomHorizontalFlip(cfg.hflip),
            v2.RandomApply(
                [v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], cfg.color_jitter_prob
            ),
            v2.RandomGrayscale(cfg.grayscale_prob),
        ]
    )


class TwoViews(Dataset):
    """Two independent random views of each image of a dataset (its labels are ignored)."""

    def __init__(self, images: MultiTaskDataset, view: v2.Compose) -> None:
        self.images = images
        self.view = view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]["image"]
        return self.view(image), self.view(image)


class SimCLRModule(L.LightningModule):
    def __init__(self, backbone: Backbone, cfg: SimCLRConfig) -> None:
        super().__init__()
        self.backbone = backbone
        # The backbone's last stage ("c5", whatever the family), globally pooled.
        c5 = backbone.features[LAST_STAGE].channels
        self.projection = SimCLRProjectionHead(c5, cfg.hidden_dim or c5, cfg.projection_dim)
        self.criterion = NTXentLoss(temperature=cfg.temperature)
        self.train_cfg: TrainConfig = cfg.train

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # Only the body runs: SimCLR does not train the FPN, so computing it would be waste.
        c5 = self.backbone.stages(images)["c5"]
        return self.projection(c5.mean(dim=(2, 3)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        a, b = batch  # uint8: the backbone scales them
        loss = self.criterion(self.embed(a), self.embed(b))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"SimCLR loss is {loss.item()} at step {self.global_step}; training stopped"
            )
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(a))
        return loss

    def configure_optimizers(self):
        return optimizer_and_schedule(self.parameters(), self.train_cfg)


def pretrain_simclr(
    cfg: SimCLRConfig, out: str | Path, overwrite: bool = False, progress: bool = True
) -> dict[str, Any] | None:
    """Pre-train a backbone with SimCLR on ``cfg.data``'s train images; writes a backbone-only
    ``model.safetensors`` + ``summary.json``. Re-running resumes from the last checkpoint.
    Under a multi-process strategy the processes other than global rank 0 return None."""
    out = Path(out)
    if claim_output(out, dump_yaml(cfg), overwrite):
        print(f"{out}: this backbone is already pre-trained; nothing to do")
        return json.loads((out / SUMMARY_FILE).read_text())
    root = cfg.data.prepare(progress)
    images = MultiTaskDataset(root, split="train", tasks=[])
    pairs = TwoViews(images, simclr_views(cfg.views, cfg.data.image_size))
    tc = cfg.train
    loader = make_loader(
        pairs,
        None,
        tc.batch_size,
        cfg.data.num_workers,
        train=True,
        seed=tc.seed,
        accelerator=tc.accelerator,
        what=f"{root}: split 'train'",
    )
    L.seed_everything(tc.seed, workers=True, verbose=False)
    backbone = Backbone(cfg.model.backbone)
    module = SimCLRModule(backbone, cfg)
    trainer = make_trainer(tc, out, progress, select_best=False)
    resumed_from = fit(trainer, module, out, loader)
    if not end_other_processes(trainer):
        return None
    info = RunInfo.read(
        {
            "stage": "simclr",
            "training": {},
            "pretraining": {
                "method": "simclr",
                "dataset": str(root),
                "train_images": len(images),
                "batch_size": tc.batch_size,
                "lr": tc.lr,
                "temperature": cfg.temperature,
            },
            "image_size": cfg.data.image_size,
            "train_seconds": train_seconds(trainer),
            "steps": int(trainer.global_step),
            "resumed_from_step": resumed_from,
            "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
            "config": cfg.model_dump(mode="json"),
        },
        out,
    )
    save_model(MultiTaskModel(backbone, {}), out, info)
    return json.loads((out / SUMMARY_FILE).read_text())
