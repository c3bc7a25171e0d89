"""One Lightning module for every stage: a teacher (one task), the student (many tasks) and a
transfer run (one new task on a pre-trained backbone)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from must.config import TrainConfig
from must.errors import MustError
from must.models.model import MultiTaskModel
from must.tasks.base import Batch
from must.weighting import FixedWeights, LossWeighting, refuse_own_backward

# Values (and references) of the multi-task selection score below this count as this: 0.01
# is chance level or worse for top-1, mAP and mIoU, and far better than any depth abs_rel or
# normals mean angle (degrees) reached, so a task at 0 (mAP at the first validation) gives a
# finite log and no task can make the score infinite.
SCORE_FLOOR = 0.01
SCORE_REFERENCE_KEY = "score_reference"  # in Lightning checkpoints


def defined(value: float) -> bool:
    """False for NaN (nothing was scored) and negative values (COCO's -1, undefined AP)."""
    return not math.isnan(value) and value >= 0


def relative_term(value: float, reference: float, higher_is_better: bool) -> float:
    """``log(value / reference)``, sign-flipped for a lower-is-better metric (positive:
    better than the reference; 0.1 is about 10% better), both floored at ``SCORE_FLOOR``."""
    term = math.log(max(value, SCORE_FLOOR) / max(reference, SCORE_FLOOR))
    return term if higher_is_better else -term


class NonFiniteLossError(MustError):
    """A loss became NaN or infinite; training stops (the message says which checkpoint, if
    any, is left to resume from)."""


class MultiTaskModule(L.LightningModule):
    def __init__(
        self,
        model: MultiTaskModel,
        train: TrainConfig,
        weighting: LossWeighting | None = None,
        score_reference: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.train_cfg = train
        self.weighting = weighting or FixedWeights({name: 1.0 for name in model.tasks})
        self.val_metrics = nn.ModuleDict({n: t.new_metric() for n, t in model.tasks.items()})
        self.test_metrics = nn.ModuleDict({n: t.new_metric() for n, t in model.tasks.items()})
        self.last_validation: dict[str, dict[str, float]] = {}
        self.last_test: dict[str, dict[str, float]] = {}
        # Per task, the (image key, record) pairs of the last test pass (Task.image_records),
        # and those of the pass under way.
        self.test_records: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self._test_records: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        # Per task, what the multi-task selection score compares its primary metric with: the
        # teacher's validation value where given, else set at the first validation. Kept in
        # the checkpoints, so a resumed run scores as before.
        self.score_reference = {
            n: float(v) for n, v in (score_reference or {}).items() if defined(float(v))
        }
        self._step_losses: dict[str, torch.Tensor] | None = None

    # --- training ---
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if not batch.targets:
            raise MustError(
                f"training batch {batch_idx} has no label for any task of the model "
                f"({', '.join(self.model.tasks)}); first images: {', '.join(batch.keys[:3])}"
            )
        _, losses = self.model(batch.images, batch.targets, batch.features)
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
        self._step_losses = present  # for ``backward``, which Lightning calls next
        if len(self.model.tasks) > 1:
            for name, w in weights.items():
                self.log(f"train/{name}/weight", w, batch_size=len(batch.keys))
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=len(batch.keys))
        return total

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward hook (automatic optimisation: clipping, precision and
        schedules stay Lightning's); the weighting fills the gradients."""
        step, self._step_losses = self._step_losses, None
        if step is None:
            super().backward(loss, *args, **kwargs)
            return
        shared_ids = {id(p) for p in self.model.backbone.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        shared = [p for p in trainable if id(p) in shared_ids]
        rest = [p for p in trainable if id(p) not in shared_ids]
        self.weighting.backward(loss, step, shared, rest)

    def on_fit_start(self) -> None:
        if self.weighting.owns_backward:
            kind = self.weighting.describe()["kind"]
            refuse_own_backward(kind, self.trainer.world_size, str(self.trainer.precision))

    # --- evaluation ---
    def _update(self, metrics: nn.ModuleDict, batch: Batch) -> None:
        predictions, _ = self.model(batch.images, features=batch.features)
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
        score, terms = self.selection_score(results)
        for name, term in terms.items():
            self.log(f"{prefix}/{name}/score", term, sync_dist=False)
        self.log(f"{prefix}/score", score, prog_bar=prefix == "val")
        return results

    def selection_score(
        self, results: dict[str, dict[str, float]]
    ) -> tuple[float, dict[str, float]]:
        """The number checkpoints are selected on (higher is better), and its per-task terms.

        One task: its primary metric, negated if lower is better. Several tasks: primary
        metrics have different scales and units (top-1 in [0, 1], a mean angle in degrees),
        so each is compared with its task's reference in a form without units,
        ``log(value / reference)`` (sign-flipped if lower is better), and the terms are
        averaged. The reference only shifts a task's term by a constant, so it does not change
        which checkpoint is best; it makes the number readable (0: as good as the reference).
        A task without a reference takes its first defined value (the first validation) as
        its reference. A task whose value is undefined (NaN: nothing was scored) is left out."""
        tasks = self.model.tasks
        if len(tasks) == 1:
            (name, task), terms = next(iter(tasks.items())), {}
            if name not in results:
                return -math.inf, terms
            value = results[name][task.primary_metric]
            return (value if task.higher_is_better else -value), terms
        terms = {}
        for name, task in tasks.items():
            value = results.get(name, {}).get(task.primary_metric, math.nan)
            if not defined(value):
                continue
            reference = self.score_reference.setdefault(name, value)
            terms[name] = relative_term(value, reference, task.higher_is_better)
        score = sum(terms.values()) / len(terms) if terms else -math.inf
        return float(score), terms

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SCORE_REFERENCE_KEY] = dict(self.score_reference)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if SCORE_REFERENCE_KEY in checkpoint:  # older checkpoints: set at the next validation
            self.score_reference = {k: float(v) for k, v in checkpoint[SCORE_REFERENCE_KEY].items()}

    # Several loaders (the student's per-teacher splits) each update the tasks they label.
    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        self.last_validation = self._compute(self.val_metrics, "val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # The metrics' update (as ``_update``) and each image's record, from one forward pass.
        predictions, _ = self.model(batch.images, features=batch.features)
        for name, metric in self.test_metrics.items():
            if name not in batch.targets:
                continue
            metric.update(predictions[name], batch.targets[name])
            task = self.model.tasks[name]
            records = task.image_records(predictions[name], batch.targets[name])
            if records is not None:
                self._test_records.setdefault(name, []).extend(
                    (key, record)
                    for key, record in zip(batch.keys, records, strict=True)
                    if record is not None
                )

    def on_test_epoch_end(self) -> None:
        self.last_test = self._compute(self.test_metrics, "test")
        self.test_records, self._test_records = self._test_records, {}

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
