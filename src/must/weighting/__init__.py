"""How task losses are combined: small interchangeable modules, kept out of the model.

Each takes the per-task losses of a step and returns the weighted total and the weights it
used (for logging); one that needs the per-task gradients also owns the backward pass
(:meth:`LossWeighting.backward`). ``must_weights`` computes MuST's linear-scaling weights.

Weightings are found by name (``loss.kind``) in a registry: a new one is one module that
decorates its builder with :func:`register_weighting` (and, inside this package, is named in
``BUILTIN_MODULES`` so it is imported before a config is validated).
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from must.errors import ConfigError
from must.summary import RunInfo

if TYPE_CHECKING:
    from must.config import LossConfig, TrainConfig


def must_weights(
    student_batch_size: int,
    student_lr: float,
    teachers: Mapping[str, tuple[int, float]],
    hand: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """MuST's rule ``w_i = (b_s * lr_i) / (b_i * lr_s)``: the student's gradient for task i
    then matches the scale teacher i was trained with (the linear scaling rule). ``teachers``
    maps task -> (teacher batch size, teacher learning rate); ``hand`` overrides tasks whose
    weight is set by hand (MuST does so for depth)."""
    hand = dict(hand or {})
    weights = {}
    for task, (batch_size, lr) in teachers.items():
        if task in hand:
            weights[task] = float(hand[task])
            continue
        if batch_size <= 0 or lr <= 0 or student_batch_size <= 0 or student_lr <= 0:
            raise ConfigError(
                f"MuST weight of {task}: batch sizes and learning rates must be positive "
                f"(student {student_batch_size}, {student_lr}; teacher {batch_size}, {lr})"
            )
        weights[task] = (student_batch_size * lr) / (batch_size * student_lr)
    for task in hand:
        weights.setdefault(task, float(hand[task]))
    check_weights(weights)
    return weights


def check_weights(weights: Mapping[str, float]) -> None:
    bad = {t: w for t, w in weights.items() if not math.isfinite(w) or w <= 0}
    if bad:
        raise ConfigError(f"loss weights must be positive and finite; got {bad}")


class LossWeighting(nn.Module):
    """Base: ``forward(losses) -> (total, weights)``, and ``backward``, which fills the
    parameters' gradients (by default ``total.backward()``)."""

    # True when ``backward`` computes per-task gradients itself (``torch.autograd.grad``):
    # that bypasses DDP's gradient averaging and fp16 loss scaling, so both are refused.
    owns_backward: ClassVar[bool] = False

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def backward(
        self,
        total: torch.Tensor,
        task_losses: Mapping[str, torch.Tensor],
        shared: Sequence[nn.Parameter],
        rest: Sequence[nn.Parameter],
    ) -> None:
        """Accumulate this step's gradients into ``.grad``. ``total`` is the training step's
        loss (``forward``'s total plus the zero losses of tasks absent from the batch),
        ``task_losses`` the losses of the tasks present, ``shared`` the trainable parameters
        every task uses (the backbone) and ``rest`` every other trainable parameter (the
        heads, the weighting's own)."""
        total.backward()

    def describe(self) -> dict:
        return {"kind": type(self).__name__}


class FixedWeights(LossWeighting):
    """Constant weights: MuST's rule, equal weights, or the user's own."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        check_weights(weights)
        super().__init__(list(weights))
        self.weights = dict(weights)

    def forward(self, losses):
        total = sum(self.weights[t] * loss for t, loss in losses.items())
        return total, {t: self.weights[t] for t in losses}

    def describe(self) -> dict:
        return {"kind": "fixed", "weights": self.weights}


class UncertaintyWeighting(LossWeighting):
    """Kendall, Gal & Cipolla (2018): learn one log-variance s_i per task and minimise
    ``sum_i exp(-s_i) * L_i + s_i``; noisier tasks get smaller weights ``exp(-s_i)``."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)))

    def forward(self, losses):
        total = self.log_vars.new_zeros(())
        weights = {}
        for i, task in enumerate(self.tasks):
            if task in losses:
                precision = torch.exp(-self.log_vars[i])
                total = total + precision * losses[task] + self.log_vars[i]
                weights[task] = float(precision.detach())
        return total, weights

    def describe(self) -> dict:
        return {"kind": "uncertainty", "log_vars": self.log_vars.detach().tolist()}


class DynamicWeightAverage(LossWeighting):
    """Liu, Johns & Davison (2019): ``w_i = K exp(r_i / T) / sum_j exp(r_j / T)`` with
    ``r_i = L_i(t-1) / L_i(t-2)``, a task's loss ratio between the two previous windows of
    ``window`` steps (the paper uses epochs); equal weights until two windows are seen."""

    def __init__(self, tasks: list[str], temperature: float = 2.0, window: int = 50) -> None:
        super().__init__(tasks)
        if temperature <= 0 or window < 1:
            raise ConfigError("dwa: temperature must be positive and window at least 1")
        self.temperature = temperature
        self.window = window
        k = len(tasks)
        self.register_buffer("sums", torch.zeros(k))
        self.register_buffer("counts", torch.zeros(k))
        self.register_buffer("history", torch.full((2, k), float("nan")))  # t-2, t-1
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def current_weights(self) -> torch.Tensor:
        older, newer = self.history
        k = len(self.tasks)
        if torch.isnan(older).any() or torch.isnan(newer).any():
            return torch.ones(k, device=older.device)
        ratios = newer / older.clamp_min(1e-12)
        return k * torch.softmax(ratios / self.temperature, dim=0)

    def forward(self, losses):
        w = self.current_weights()
        total = sum(w[self.tasks.index(t)] * loss for t, loss in losses.items())
        if self.training:
            for t, loss in losses.items():
                i = self.tasks.index(t)
                self.sums[i] += float(loss.detach())
                self.counts[i] += 1
            self.steps += 1
            if int(self.steps) % self.window == 0:
                mean = torch.where(
                    self.counts > 0, self.sums / self.counts.clamp_min(1), self.history[1]
                )
                self.history = torch.stack([self.history[1], mean])
                self.sums.zero_()
                self.counts.zero_()
        return total, {t: float(w[self.tasks.index(t)]) for t in losses}

    def describe(self) -> dict:
        return {"kind": "dwa", "temperature": self.temperature, "window": self.window}


# --- the registry ---------------------------------------------------------------------------


@dataclass
class WeightingContext:
    """What a builder may read: the student's tasks, its ``loss`` and ``train`` settings, and
    per task the run info (:class:`must.summary.RunInfo`) of the teacher that labelled it,
    where known."""

    tasks: list[str]
    loss: LossConfig
    train: TrainConfig
    teachers: Mapping[str, RunInfo] = field(default_factory=dict)


WeightingBuilder = Callable[[WeightingContext], LossWeighting]
WEIGHTINGS: dict[str, WeightingBuilder] = {}
# Modules of this package whose weightings register themselves when imported.
BUILTIN_MODULES = ("must.weighting.pcgrad",)


def register_weighting(name: str) -> Callable[[WeightingBuilder], WeightingBuilder]:
    """Decorator: ``@register_weighting("name")`` on a function ``(WeightingContext) ->
    LossWeighting`` makes ``loss.kind: name`` build it."""

    def add(builder: WeightingBuilder) -> WeightingBuilder:
        if name in WEIGHTINGS and WEIGHTINGS[name] is not builder:
            raise ValueError(f"loss weighting {name!r} is registered twice")
        WEIGHTINGS[name] = builder
        return builder

    return add


def weighting_names() -> list[str]:
    """The registered ``loss.kind`` names (the built-in modules imported first)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return list(WEIGHTINGS)


def build_weighting(kind: str, context: WeightingContext) -> tuple[LossWeighting, dict]:
    """The weighting ``loss.kind`` names, and how it resolved (for the log and the summary)."""
    names = weighting_names()
    if kind not in WEIGHTINGS:
        raise ConfigError(f"loss.kind: unknown loss weighting {kind!r}; known: {', '.join(names)}")
    weighting = WEIGHTINGS[kind](context)
    return weighting, {**weighting.describe(), "kind": kind}


def refuse_own_backward(kind: str, processes: int, precision: str) -> None:
    """A weighting that owns the backward pass trains in one process and without fp16 loss
    scaling: its per-task ``torch.autograd.grad`` calls see neither DDP's gradient averaging
    nor the loss scale."""
    problems = []
    if processes > 1:
        problems.append(f"{processes} processes (DDP)")
    if precision == "16-mixed":
        problems.append("16-mixed precision (fp16 loss scaling)")
    if problems:
        raise ConfigError(
            f"loss.kind={kind}: computes per-task gradients itself, which is not supported with "
            f"{' and '.join(problems)}; train in one process (train.devices=1, no ddp strategy "
            "or torchrun) with train.precision=32-true or bf16-mixed, or use another loss.kind"
        )


def planned_processes(train: TrainConfig) -> int:
    """How many training processes a config asks for, as far as it says (``devices: auto``
    on a multi-GPU machine is only known once the trainer starts; that is checked again
    then)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)  # torchrun
    devices = train.devices
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 1:
        return max(launched, devices)
    if any(s in train.strategy for s in ("ddp", "fsdp", "deepspeed")):
        return max(launched, 2)
    return launched


@register_weighting("must")
def _must(ctx: WeightingContext) -> LossWeighting:
    loss = ctx.loss
    missing = [t for t in ctx.tasks if t not in ctx.teachers and t not in loss.hand]
    if missing:
        raise ConfigError(
            f"loss.kind=must needs each teacher's batch size and learning rate; no teacher "
            f"summary found for {missing} (set loss.hand for them or use another loss.kind)"
        )
    scales = {}
    for t in ctx.tasks:
        if t not in loss.hand:
            training = ctx.teachers[t].training[t]
            scales[t] = (training.batch_size, training.lr)
    hand = {t: w for t, w in loss.hand.items() if t in ctx.tasks}
    return FixedWeights(must_weights(ctx.train.batch_size, ctx.train.lr, scales, hand))


@register_weighting("equal")
def _equal(ctx: WeightingContext) -> LossWeighting:
    return FixedWeights({t: 1.0 for t in ctx.tasks})


@register_weighting("fixed")
def _fixed(ctx: WeightingContext) -> LossWeighting:
    missing = [t for t in ctx.tasks if t not in ctx.loss.weights]
    if missing:
        raise ConfigError(f"loss.weights: no weight for {missing}")
    return FixedWeights({t: ctx.loss.weights[t] for t in ctx.tasks})


@register_weighting("uncertainty")
def _uncertainty(ctx: WeightingContext) -> LossWeighting:
    return UncertaintyWeighting(ctx.tasks)


@register_weighting("dwa")
def _dwa(ctx: WeightingContext) -> LossWeighting:
    return DynamicWeightAverage(ctx.tasks, ctx.loss.dwa_temperature, ctx.loss.dwa_window)
