"""What one seed of the ``mini`` experiment costs on this machine, stage by stage: the stages a
finished run recorded, and for the stages it has not run yet (SimCLR, the multi-task
baseline, the downstream runs) a projection from short runs of each.

The short runs: SimCLR and one downstream run per task and mode (from the run's student),
``--steps`` steps each with the experiment's settings. Each gives seconds per training step
(one validation included) and seconds outside training (data, feature cache, the test pass on
the protocol's test split, the model file). A stage's projection is steps x seconds per step +
seconds outside, for the steps the experiment sets; the multi-task baseline is projected at
the student's recorded seconds (same model, data size, steps and batch). A stage the run
has recorded is not projected.

    python benchmarks/mini_cost.py --run RUN [--steps 40] [--out benchmarks/results]
        [KEY=VALUE experiment overrides, e.g. data_cache=DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results
from must.stages.experiment import Experiment, backbone_names, load_experiment
from must.stages.pretrain import pretrain_simclr
from must.stages.teach import teach

RECORDABLE = ("label", "student", "simclr", "multitask")  # stages.json keys read as recorded


def short(cfg, steps: int):
    """``cfg`` trained for ``steps`` steps, validated once at the end."""
    train = {"max_steps": steps, "val_every": steps, "checkpoint_every": steps}
    train["warmup_steps"] = min(cfg.train.warmup_steps, steps // 4)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def timed(run, folder: Path) -> dict:
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    info = json.loads((folder / "summary.json").read_text())["info"]
    steps = info["steps"]
    return {
        "seconds_per_step": info["train_seconds"] / steps,
        "outside_seconds": wall - info["train_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a mini run folder with a student")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--steps", type=int, default=40, help="steps of each short run")
    parser.add_argument("overrides", nargs="*", help="experiment overrides")
    args = parser.parse_args()
    run = Path(args.run)
    cfg = load_experiment("mini", args.overrides)
    experiment = Experiment(cfg, run, False, ["transfer"])
    recorded = json.loads((run / "stages.json").read_text())
    results: dict = {
        "load_before": round(os.getloadavg()[0], 2),
        "settings": {"steps": args.steps, "overrides": [o for o in args.overrides if "/" not in o]},
        "recorded": {
            k: v.get("total_seconds", v.get("seconds"))
            for k, v in recorded.items()
            if k in RECORDABLE
        },
        # The teachers by their own training clocks: a run may reuse teachers trained elsewhere.
        "teachers_train_seconds": {
            d.name: json.loads((d / "summary.json").read_text())["info"]["train_seconds"]
            for d in sorted((run / "teachers").glob("*"))
            if (d / "summary.json").is_file()
        },
        "short_runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "simclr" not in results["recorded"]:
            simclr = short(experiment.simclr_config(), args.steps)
            results["short_runs"]["simclr"] = timed(
                lambda: pretrain_simclr(simclr, work / "simclr", progress=False),
                work / "simclr",
            )
        for task in cfg.transfer.tasks:
            for mode in cfg.transfer.modes:
                c = short(experiment.transfer_config("student", task, mode), args.steps)
                d = work / f"{task}-{mode}"
                results["short_runs"][f"{task}-{mode}"] = timed(
                    lambda c=c, d=d: teach(c, d, progress=False, stage="transfer"), d
                )
                print(task, mode, results["short_runs"][f"{task}-{mode}"], flush=True)
    # The steps the experiment sets for each projected stage.
    full = {"simclr": experiment.simclr_config().train.max_steps}
    for task in cfg.transfer.tasks:
        for mode in cfg.transfer.modes:
            full[f"{task}-{mode}"] = experiment.transfer_config(
                "student", task, mode
            ).train.max_steps
    backbones = len(backbone_names(cfg))
    s = results["short_runs"]
    projected = {}
    if "simclr" in s:
        projected["simclr"] = (
            full["simclr"] * s["simclr"]["seconds_per_step"] + s["simclr"]["outside_seconds"]
        )
    per_backbone = sum(
        full[k] * v["seconds_per_step"] + v["outside_seconds"]
        for k, v in s.items()
        if k != "simclr"
    )
    projected["transfer"] = backbones * per_backbone
    if "multitask" not in results["recorded"]:
        projected["multitask"] = results["recorded"].get("student")
    results.update(full_steps=full, backbones=backbones, projected=projected)
    results["load_after"] = round(os.getloadavg()[0], 2)
    write_results(args.out, "mini_cost", results, report(results))


def report(r: dict) -> str:
    rec, proj = r["recorded"], r["projected"]
    lines = [
        "# The cost of one seed of `mini` on this machine",
        "",
        f"Command: `python benchmarks/mini_cost.py --run RUN --steps {r['settings']['steps']}`"
        f" (RUN: a seed-0 run through the student); load average {r['load_before']} before, "
        f"{r['load_after']} after. Recorded: the seconds the run's stages took. Projected: "
        f"short runs of {r['settings']['steps']} steps give seconds per step (one validation "
        "included, so longer runs cost a little less per step) and seconds outside training "
        "(data, feature cache, the test pass, the model file); a multi-task baseline the run "
        "has not recorded is put at the student's recorded seconds.",
        "",
        "| stage | seconds | how |",
        "|---|---:|---|",
    ]
    teachers = sum(r["teachers_train_seconds"].values())
    lines.append(
        f"| teachers | {teachers:.0f} | recorded: their training clocks (set-up and test "
        "passes, 10–25 s per teacher, not counted) |"
    )
    for stage in RECORDABLE:
        if rec.get(stage) is not None:
            lines.append(f"| {stage} | {rec[stage]:.0f} | recorded |")
    if proj.get("simclr") is not None:
        lines.append(
            f"| simclr ({r['full_steps']['simclr']} steps) | {proj['simclr']:.0f} | projected |"
        )
    if proj.get("multitask") is not None:
        lines.append(f"| multitask | {proj['multitask']:.0f} | projected (the student's) |")
    lines.append(
        f"| transfer ({r['backbones']} backbones, every task and mode) | {proj['transfer']:.0f} "
        "| projected |"
    )
    total = teachers + sum(v for v in rec.values() if v) + sum(v for v in proj.values() if v)
    lines += [
        f"| **one seed of (a), report left out** | **{total:.0f}** ({total / 60:.0f} min) | |"
    ]
    lines += [
        "",
        "Short runs, per downstream column (steps the experiment sets; seconds per step; "
        "seconds outside training):",
        "",
        "| run | steps | s/step | outside (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, v in r["short_runs"].items():
        lines.append(
            f"| {name} | {r['full_steps'][name]} | {v['seconds_per_step']:.3f} "
            f"| {v['outside_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
