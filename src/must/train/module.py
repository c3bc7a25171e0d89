"""One Lightning module for every stage: a teacher (one task), the student (many tasks) and a
transfer run (one new task on a pre-trained backbone)."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from must.config import TrainConfig
from must.errors import MustError
from must.models.model import MultiTaskModel
from must.tasks.base import Batch
from must.train.weighting import FixedWeights, LossWeighting


class NonFiniteLossError(MustError):
    """A loss became NaN or infinite; training stops (the message says which checkpoint, if
    any, is left to resume from)."""


class MultiTaskModule(L.LightningModule):
    def __init__(
        self,
        model: MultiTaskModel,
        train: TrainConfig,
        weighting: LossWeighting | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.train_cfg = train
        self.weighting = weighting or FixedWeights({name: 1.0 for name in model.tasks})
        self.val_metrics = nn.ModuleDict({n: t.new_metric() for n, t in model.tasks.items()})
        self.test_metrics = nn.ModuleDict({n: t.new_metric() for n, t in model.tasks.items()})
        self.last_validation: dict[str, dict[str, float]] = {}
        self.last_test: dict[str, dict[str, float]] = {}

    # --- training ---
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if not batch.targets:
            raise MustError(
                f"training batch {batch_idx} has no label for any task of the model "
                f"({', '.join(self.model.tasks)}); first images: {', '.join(batch.keys[:3])}"
            )
        _, losses = self.model(batch.images, batch.targets)
        task_losses = {}
        for name, terms in losses.items():
            task_loss = sum(terms.values())
            if not torch.isfinite(task_loss):
                raise NonFiniteLossError(
                    f"loss of task {name!r} is {task_loss.detach().item()} at step "
                    f"{self.global_step} (terms: "
                    f"{ {k: round(float(v.detach()), 4) for k, v in terms.items()} }); "
                    "training stopped"
                )
            task_losses[name] = task_loss
            if name in batch.targets:
                self.log(f"train/{name}/loss", task_loss.detach(), batch_size=len(batch.keys))
        # Only tasks labelled in this batch are weighted (a learnt weighting must not see the
        # zero losses of absent tasks); those zeros are still added so every head stays in
        # the graph, as DDP requires.
        present = {n: loss for n, loss in task_losses.items() if n in batch.targets}
        total, weights = self.weighting(present)
        total = total + sum(loss for n, loss in task_losses.items() if n not in present)
        if len(self.model.tasks) > 1:
            for name, w in weights.items():
                self.log(f"train/{name}/weight", w, batch_size=len(batch.keys))
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=len(batch.keys))
        return total

    # --- evaluation ---
    def _update(self, metrics: nn.ModuleDict, batch: Batch) -> None:
        predictions, _ = self.model(batch.images)
        for name, metric in metrics.items():
            if name in batch.targets:
                metric.update(predictions[name], batch.targets[name])

    def _compute(self, metrics: nn.ModuleDict, prefix: str) -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {}
        for name, metric in metrics.items():
            if not metric.update_called:
                continue
            values = {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
            results[name] = values
            for key, value in values.items():
                self.log(f"{prefix}/{name}/{key}", value, sync_dist=False)
        self.log(f"{prefix}/score", self.selection_score(results), prog_bar=prefix == "val")
        return results

    def selection_score(self, results: dict[str, dict[str, float]]) -> float:
        """The number checkpoints are selected on (higher is better): each task's primary
        metric, turned so that higher is better, averaged over tasks."""
        scores = []
        for name, task in self.model.tasks.items():
            if name in results:
                value = results[name][task.primary_metric]
                scores.append(value if task.higher_is_better else -value)
        return float(sum(scores) / len(scores)) if scores else -math.inf

    # Several loaders (the student's per-teacher splits) each update the tasks they label.
    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        self.last_validation = self._compute(self.val_metrics, "val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(self.test_metrics, batch)

    def on_test_epoch_end(self) -> None:
        self.last_test = self._compute(self.test_metrics, "test")

    # --- optimisation ---
    def configure_optimizers(self):
        cfg = self.train_cfg
        return optimizer_and_schedule([*self.model.parameters(), *self.weighting.parameters()], cfg)


def optimizer_and_schedule(parameters, cfg: TrainConfig) -> dict:
    """SGD (Nesterov) or AdamW over the trainable ``parameters``, stepped per batch along
    :func:`warmup_cosine`, in the form Lightning's ``configure_optimizers`` returns."""
    # No weight decay on norms and biases, as is standard for ResNets.
    decay, no_decay = [], []
    for p in parameters:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warmup_cosine(cfg: TrainConfig):
    """Linear warm-up to the base rate, then cosine decay to zero at ``max_steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor
