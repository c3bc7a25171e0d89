"""Helpers the benchmarks share: a median with its range, one training step and its FLOPs,
writing a results file and its report, arguments with KEY=VALUE overrides anywhere."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

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


def write_results(out: str | Path, name: str, results: dict, markdown: str) -> None:
    """``OUT/NAME.json`` (the figures) and ``OUT/NAME.md`` (their report)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(f"wrote {out / name}.json and {out / name}.md")


def parse_with_overrides(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line's arguments, with every KEY=VALUE word in ``overrides`` wherever it
    stands: after an option taking several values (``--tasks a b``) argparse would take it
    for one of them."""
    argv = sys.argv[1:]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    return args
