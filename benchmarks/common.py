"""Helpers the benchmarks share: a median with its range, one training step and its FLOPs."""

from __future__ import annotations

import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def train_step(model: torch.nn.Module, data, opt: torch.optim.Optimizer) -> None:
    """Forward, backward and optimizer step of a ``MultiTaskModel`` on a collated batch."""
    _, losses = model(data.images, data.targets)
    total = sum(v for terms in losses.values() for v in terms.values())
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()


def step_gflop(model: torch.nn.Module, data) -> float:
    """FLOPs of one training step, forward + backward (convolutions and matrix products, as
    ``torch.utils.flop_counter`` counts them)."""
    counter = FlopCounterMode(display=False)
    with counter:
        _, losses = model(data.images, data.targets)
        sum(v for terms in losses.values() for v in terms.values()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9
