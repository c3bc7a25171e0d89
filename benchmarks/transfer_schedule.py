"""Choose each downstream column's schedule on validation, by the rule of docs/benchmark.md
(section 3), from a finished ``mini`` run's multi-task baseline and training from scratch.

    python benchmarks/transfer_schedule.py --run runs/mini/seed0 --out benchmarks/results
    python benchmarks/transfer_schedule.py --run runs/mini/seed0 --modes probe   # one mode
    python benchmarks/transfer_schedule.py --run R data_cache=DIR   # experiment overrides

For each task and mode, both backbones train at a long budget (fine-tuning 600 steps,
probes 1000) with the learning rate at 1/3, 1 and 3 times the preset's; validation every
eighth of the budget. Kept: the rate with the best mean over the two backbones of the best
validation primary metric, then the smallest quarter of the budget at which both backbones'
validation metric is within 1% (relative) of its best. Only validation numbers are read: the
runs' test splits are cut to a few images (they are never looked at). Runs already trained in
``--work`` are reused. Writes ``transfer_schedule.{json,md}`` with every curve and the
``per_column`` settings to paste into the preset.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_with_overrides, write_results
from must.config import TeachConfig
from must.stages.experiment import Experiment, load_experiment
from must.stages.teach import teach
from must.tasks import TASK_TYPES

BACKBONES = ("scratch", "multitask")  # never the student: the choice must not favour it
BUDGET = {"finetune": 600, "probe": 1000}
FACTORS = (1 / 3, 1.0, 3.0)
CLOSE = 0.01  # "within 1% of its best"
RULE = (
    "each task and mode trains from scratch and from the multi-task baseline for a long budget "
    f"(fine-tuning {BUDGET['finetune']} steps, probes {BUDGET['probe']}) at 1/3, 1 and 3 times the preset's learning rate; "
    "kept: the rate with the best mean over the two backbones of the best validation primary "
    "metric (ties: the lower rate), then the first quarter of the budget at which both "
    "backbones' validation metric is within 1% (relative) of its best."
)


def validation_curve(run: Path, task: str) -> list[tuple[int, float]]:
    """(step, validation primary metric) of a training run, from its ``logs/metrics.csv``."""
    key = f"val/{task}/{TASK_TYPES[task].primary_metric}"
    with open(run / "logs" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(key)]
    return [(int(r["step"]) + 1, float(r[key])) for r in rows]


def best(values: list[float], higher: bool) -> float:
    return max(values) if higher else min(values)


def settled_step(curve: list[tuple[int, float]], higher: bool, budget: int) -> int:
    """The first quarter of the budget at which the curve is within CLOSE of its best."""
    top = best([v for _, v in curve], higher)
    for quarter in (budget // 4, budget // 2, 3 * budget // 4, budget):
        value = next((v for s, v in curve if s >= quarter), None)
        if value is not None and abs(value - top) <= CLOSE * max(abs(top), 1e-9):
            return quarter
    return budget


def choose(runs: dict[str, dict[str, dict]], higher: bool, budget: int) -> tuple[float, int]:
    """The rule: ``runs[lr][backbone]`` holds each run's validation ``curve`` and ``best``.

    The rate with the best mean over the backbones of the best validation value (ties: the
    lower rate), then the first quarter of the budget at which every backbone has settled.
    """
    sign = 1 if higher else -1
    by_rate = sorted(runs, key=float)  # ascending, so that max() keeps the lower rate on a tie
    lr = max(by_rate, key=lambda k: sign * sum(r["best"] for r in runs[k].values()))
    steps = max(settled_step(r["curve"], higher, budget) for r in runs[lr].values())
    return float(lr), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a mini run folder with multitask/ done")
    parser.add_argument("--experiment", default="mini")
    parser.add_argument("--work", default=None, help="default: RUN/schedule")
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", default=["finetune", "probe"])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--scale", type=float, default=1.0, help="budget multiplier (to try)")
    parser.add_argument("overrides", nargs="*", help="experiment overrides, e.g. data_cache=DIR")
    args = parse_with_overrides(parser)
    run = Path(args.run)
    work = Path(args.work) if args.work else run / "schedule"
    cfg = load_experiment(args.experiment, [f"data_cache={run.parent / 'data'}", *args.overrides])
    experiment = Experiment(cfg, run, progress=False)
    tasks = args.tasks or list(cfg.transfer.tasks)
    results: dict = {"rule": RULE, "budget_scale": args.scale, "columns": {}}
    for mode in args.modes:
        budget = 8 * max(1, round(BUDGET[mode] * args.scale / 8))
        for task in tasks:
            kind = TASK_TYPES[task]
            higher = kind.higher_is_better
            column: dict = {"metric": kind.primary_metric, "budget": budget, "runs": {}}
            for factor in FACTORS:
                for backbone in BACKBONES:
                    base = experiment.transfer_config(backbone, task, mode)
                    raw = base.model_dump(mode="json")
                    lr = round(base.train.lr * factor, 6)
                    raw["train"].update(
                        lr=lr, max_steps=budget, val_every=budget // 8,
                        checkpoint_every=budget // 8,
                    )  # fmt: skip
                    raw["data"]["subset"] = {"test": 8}  # test numbers are never read here
                    out = work / backbone / f"{task}-{mode}-lr{lr:g}"
                    print(f"{task}-{mode} {backbone} lr {lr:g} -> {out}", flush=True)
                    teach(TeachConfig.model_validate(raw), out, progress=False)
                    curve = validation_curve(out, task)
                    column["runs"].setdefault(f"{lr:g}", {})[backbone] = {
                        "curve": curve,
                        "best": best([v for _, v in curve], higher),
                    }
            chosen_lr, steps = choose(column["runs"], higher, budget)
            column["chosen"] = {"lr": chosen_lr, "max_steps": steps}
            results["columns"][f"{task}-{mode}"] = column
    per_column = {
        name: {
            "train": {
                "lr": c["chosen"]["lr"],
                "max_steps": c["chosen"]["max_steps"],
                "val_every": c["chosen"]["max_steps"] // 4,
                "checkpoint_every": c["chosen"]["max_steps"] // 4,
            }
        }
        for name, c in results["columns"].items()
    }
    results["per_column"] = per_column
    lines = [
        "# Downstream schedules chosen on validation",
        "",
        "Command: `python benchmarks/transfer_schedule.py --run RUN --modes "
        + " ".join(args.modes)
        + (f" --tasks {' '.join(args.tasks)}" if args.tasks else "")
        + (f" --scale {args.scale:g}" if args.scale != 1 else "")
        + f"` on a seed-{cfg.seed} run of the `{args.experiment}` experiment. Rule "
        "(docs/benchmark.md, section 3): " + RULE,
        "",
        "Best validation primary metric per learning rate (scratch / multitask); chosen "
        "rate in bold; steps: the first quarter of the budget within 1% of the best.",
        "",
        "| column | metric | " + " | ".join(f"lr ×{f:.3g}" for f in FACTORS) + " | chosen |",
        "|---|---|" + "---|" * (len(FACTORS) + 1),
    ]
    for name, c in results["columns"].items():
        cells = []
        for lr, runs in c["runs"].items():
            text = f"{lr}: " + " / ".join(f"{runs[b]['best']:.4f}" for b in BACKBONES)
            cells.append(f"**{text}**" if float(lr) == c["chosen"]["lr"] else text)
        chosen = f"lr {c['chosen']['lr']:g}, {c['chosen']['max_steps']} steps"
        lines.append(f"| {name} | {c['metric']} | " + " | ".join(cells) + f" | {chosen} |")
    lines += [
        "",
        "Settings for the preset (`transfer.per_column`):",
        "",
        "```yaml",
        yaml.safe_dump({"per_column": per_column}, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    write_results(args.out, "transfer_schedule", results, "\n".join(lines))


if __name__ == "__main__":
    main()
