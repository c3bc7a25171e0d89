"""The detection head's cost against its quality: the CPU detection teacher trained with the
head as it was and with a head sized to small images, side by side from the same seed.

Each variant is a set of ``model.heads.detection`` overrides on ``teach_detection_cpu``. For
each: the validation metrics the checkpoint was selected on, the test metrics, the training
time, and the FLOPs of one training step (forward + backward, ``torch.utils.flop_counter``:
convolutions and matrix products) for the teacher's batch and for the student's batch (four
tasks, ``train_student_cpu``). Variants are compared on validation; test is reported, not
used to choose.

    python benchmarks/detection_cost.py --out benchmarks/results [--seeds 0] [KEY=VALUE ...]

``--in-experiment mini`` measures the same variants where the student meets them: for each
variant and seed, ``must run mini --only teachers label student`` with the variant's head in
the detection teacher, the student and the multi-task baseline, then every teacher's and the
student's validation and test metrics, student / teacher, and the stages' seconds
(``detection_cost_experiment.{json,md}``). Finished stages in ``--work`` are reused.

    python benchmarks/detection_cost.py --in-experiment mini --seeds 0 [--data-cache DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import spread, step_gflop, train_step, write_results
from must.config import TeachConfig, load_config
from must.models.model import MultiTaskModel
from must.stages.teach import teach
from must.tasks import build_task
from must.training.data import Collator, augmentation

# The head before this benchmark, and the head sized to 64 px images: half the sampled
# regions and half the box-head convolutions (the 1024 regions x 4 convs of a student step
# were 63% of its forward FLOPs), and RPN proposal counts in proportion to the ~1000 anchors a
# 64 px image has on P2-P4 (test-time counts unchanged).
VARIANTS = {
    "before": [
        "model.heads.detection.num_convs=4",
        "model.heads.detection.box_batch_size_per_image=32",
        "model.heads.detection.rpn_pre_nms_top_n_train=600",
        "model.heads.detection.rpn_post_nms_top_n_train=300",
    ],
    "sized": [
        "model.heads.detection.num_convs=2",
        "model.heads.detection.box_batch_size_per_image=16",
        "model.heads.detection.rpn_pre_nms_top_n_train=200",
        "model.heads.detection.rpn_post_nms_top_n_train=100",
    ],
}
TASKS = ("classification", "detection", "segmentation", "depth")


def training_step_setup(work: Path, student: bool, head: list[str], batch: int):
    """A model (random weights, train mode), one rendered batch of 64 px images and an
    optimizer: the detection teacher alone, or the four-task student."""
    from must.data.readers import MultiTaskDataset
    from must.data.render import render_dataset

    root = work / "flops-data"
    render_dataset("novel", root, 32, 64, splits=(1, 0, 0), tasks=list(TASKS), progress=False)
    dataset = MultiTaskDataset(root, split="train")
    dataset.transform = augmentation(load_config(TeachConfig, "teach_detection_cpu").data.augment,
                                     64, train=True)  # fmt: skip
    cfg = load_config(TeachConfig, "teach_detection_cpu", head)
    names = TASKS if student else ("detection",)
    tasks = {
        n: build_task(
            n, dataset.classes.get(n), cfg.model.heads.get(n) if n == "detection" else None
        )
        for n in names
    }
    torch.manual_seed(0)
    model = MultiTaskModel(cfg.model.backbone, tasks).train()
    data = Collator(tasks)([dataset[i % len(dataset)] for i in range(batch)])
    return model, data, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def step_costs(work: Path, rounds: int, steps: int) -> dict:
    """GFLOP and ms per training step of each variant, for the teacher's batch (16) and the
    student's (four tasks, 32), timed round-robin (``rounds`` x ``steps`` steps each)."""
    setups = {
        (name, who): training_step_setup(
            work, who == "student", head, 32 if who == "student" else 16
        )
        for name, head in VARIANTS.items()
        for who in ("teacher", "student")
    }
    gflop = {key: step_gflop(model, data) for key, (model, data, _) in setups.items()}
    for setup in setups.values():
        train_step(*setup)  # warm-up
    times: dict = {key: [] for key in setups}
    for _ in range(rounds):
        for key, setup in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                train_step(*setup)
            times[key].append(1000 * (time.perf_counter() - start) / steps)
    out: dict = {}
    for (name, who), t in times.items():
        out.setdefault(name, {})[who] = {
            "gflop": gflop[name, who],
            "ms_per_step": spread(t),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default="runs/bench-detection-cost")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the step timing")
    parser.add_argument("--steps", type=int, default=3, help="steps per timing")
    parser.add_argument(
        "--in-experiment", metavar="EXPERIMENT", help="compare the variants inside this experiment"
    )
    parser.add_argument("--data-cache", help="--in-experiment: the experiment's data cache")
    parser.add_argument("overrides", nargs="*", help="overrides for every variant")
    args = parser.parse_args()
    if args.in_experiment:
        in_experiment(args)
        return
    results: dict = {
        "load_before": round(os.getloadavg()[0], 2),
        # Where the runs and results are written is left out: it says nothing about them.
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "variants": {},
    }
    # Finished teachers in --work are reused (must teach skips a finished run), so a rerun
    # only measures the steps again.
    for name, head in VARIANTS.items():
        runs = []
        for seed in args.seeds:
            cfg = load_config(
                TeachConfig, "teach_detection_cpu", [*head, f"train.seed={seed}", *args.overrides]
            )
            summary = teach(cfg, Path(args.work) / f"{name}-seed{seed}", progress=False)
            info = summary["info"]
            runs.append(
                {
                    "seed": seed,
                    "val": info["val"]["detection"],
                    "test": info["test"]["detection"],
                    "train_seconds": info["train_seconds"],
                    "steps": info["steps"],
                }
            )
            print(f"{name} seed {seed}: val {runs[-1]['val']}, {info['train_seconds']} s")
        results["variants"][name] = {"overrides": head, "runs": runs}
    results["load_steps"] = round(os.getloadavg()[0], 2)
    for name, costs in step_costs(Path(args.work), args.rounds, args.steps).items():
        results["variants"][name]["steps"] = costs
    results["load_after"] = round(os.getloadavg()[0], 2)
    write_results(args.out, "detection_cost", results, report(results))


# Where the variant's head goes in an experiment: the detection teacher, the student and the
# multi-task baseline (which the protocol gives the student's model).
HEAD_USERS = ("teachers.detection.overrides", "student.overrides", "multitask.overrides")


def in_experiment(args: argparse.Namespace) -> None:
    from must.stages.report import collect, primary

    results: dict = {
        "load_before": round(os.getloadavg()[0], 2),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work", "data_cache")},
        "variants": {},
    }
    for name, head in VARIANTS.items():
        runs = []
        for seed in args.seeds:
            run = Path(args.work) / args.in_experiment / name / f"seed{seed}"
            keys = [f"{user}.{o}" for user in HEAD_USERS for o in head]
            if args.data_cache:
                keys.append(f"data_cache={args.data_cache}")
            command = ["must", "run", args.in_experiment, "--out", str(run), "--quiet",
                       "--only", "teachers", "label", "student",
                       f"seed={seed}", *keys, *args.overrides]  # fmt: skip
            subprocess.run(command, check=True)
            found = collect(run)
            student = found["students"]["student"]
            tasks = {}
            for task, teacher in found["teachers"].items():
                metric, higher = primary(task)
                row = {"metric": metric, "higher_is_better": higher}
                for split in ("val", "test"):
                    t = getattr(teacher, split)[task][metric]
                    st = getattr(student, split)[task][metric]
                    # Above 1: the student is better, whichever way the metric points.
                    row[split] = {
                        "teacher": t,
                        "student": st,
                        "ratio": st / t if higher else t / st,
                    }
                tasks[task] = row
            # Every invocation's seconds summed; the teachers that do not change between
            # the variants may have been trained once and copied, so the detection teacher's
            # own training clock stands for the teachers.
            stages = {
                k: v.get("total_seconds", v.get("seconds"))
                for k, v in found["stages"].items()
                if k in ("label", "student")
            }
            runs.append(
                {
                    "seed": seed,
                    "tasks": tasks,
                    "detection_teacher_train_seconds": found["teachers"]["detection"].train_seconds,
                    "stage_seconds": stages,
                    "student_seconds_per_step": student.train_seconds / student.steps,
                }
            )
        results["variants"][name] = {"overrides": head, "runs": runs}
    results["load_after"] = round(os.getloadavg()[0], 2)
    write_results(args.out, "detection_cost_experiment", results, report_in_experiment(results))


def report_in_experiment(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"# Detection head inside the `{s['in_experiment']}` experiment: teachers and student",
        "",
        f"Command: `python benchmarks/detection_cost.py --in-experiment {s['in_experiment']} "
        f"--seeds {' '.join(map(str, s['seeds']))}"
        + (" " + " ".join(s["overrides"]) if s["overrides"] else "")
        + "`. Each variant runs the experiment's teachers, labels and student with its "
        "detection head in the detection teacher and the student (the other teachers are the "
        "same runs); finished runs are reused, so the seconds are those recorded when each "
        "stage ran (load averages of this invocation in the JSON). "
        "Student / teacher on the teacher's own split, above 1 better; the student's "
        "checkpoint is selected on validation.",
        "",
        "| variant | split | "
        + " | ".join(
            f"{t} {row['metric']} teacher / student / ratio"
            for t, row in r["variants"]["before"]["runs"][0]["tasks"].items()
        )
        + " |",
        "|---|---|" + "---:|" * len(r["variants"]["before"]["runs"][0]["tasks"]),
    ]
    for name, v in r["variants"].items():
        for run in v["runs"]:
            for split in ("val", "test"):
                cells = [
                    f"{row[split]['teacher']:.3f} / {row[split]['student']:.3f} / "
                    f"**{row[split]['ratio']:.3f}**"
                    for row in run["tasks"].values()
                ]
                lines.append(
                    f"| {name} (seed {run['seed']}) | {split} | " + " | ".join(cells) + " |"
                )
    lines += [
        "",
        "Seconds (nothing else heavy running): the detection teacher's training clock, the "
        "label and student stages, and the student's seconds per training step (its "
        "validations included):",
        "",
        "| variant | detection teacher | label | student | student s/step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in r["variants"].items():
        for run in v["runs"]:
            st = run["stage_seconds"]
            lines.append(
                f"| {name} (seed {run['seed']}) | {run['detection_teacher_train_seconds']:.0f} "
                f"| {st['label']:.0f} | {st['student']:.0f} "
                f"| {run['student_seconds_per_step']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def report(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# Detection head: cost against quality (CPU detection teacher)",
        "",
        f"Command: `python benchmarks/detection_cost.py --seeds {' '.join(map(str, s['seeds']))}"
        + (" " + " ".join(s["overrides"]) if s["overrides"] else "")
        + "`. Variants are compared on validation (mAP@0.5 of the selected checkpoint); test "
        "is reported alongside, not used to choose.",
        "",
        "## Quality (detection teacher, CPU preset schedule)",
        "",
        "| variant | head overrides | val map_50 | val map | test map_50 | test map |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, v in r["variants"].items():
        for run in v["runs"]:
            lines.append(
                f"| {name} (seed {run['seed']}) | "
                + ", ".join(o.split(".")[-1] for o in v["overrides"])
                + f" | {run['val']['map_50']:.3f} | {run['val']['map']:.3f} "
                f"| {run['test']['map_50']:.3f} | {run['test']['map']:.3f} |"
            )
    before_runs, sized_runs = (r["variants"][k]["runs"] for k in ("before", "sized"))
    for metric in ("map_50", "map"):
        diffs = [
            b["val"][metric] - a["val"][metric]
            for a, b in zip(before_runs, sized_runs, strict=True)
        ]
        lines.append(
            f"\nsized − before, validation {metric}: "
            + ", ".join(f"{d:+.3f}" for d in diffs)
            + (" (one seed each: no spread over seeds)" if len(diffs) == 1 else " (per seed)")
        )
    lines += [
        "",
        "## Cost of one training step (forward + backward + SGD step, 64 px)",
        "",
        f"Load average {r['load_steps']} when the timing started, {r['load_after']} after; "
        f"{s['rounds']} round-robin rounds of {s['steps']} steps, median [min, max].",
        "",
        "| variant | teacher GFLOP (batch 16) | teacher ms/step | student GFLOP (4 tasks, "
        "batch 32) | student ms/step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in r["variants"].items():
        t, st = v["steps"]["teacher"], v["steps"]["student"]
        lines.append(f"| {name} | {t['gflop']:.1f} | {_ms(t)} | {st['gflop']:.1f} | {_ms(st)} |")
    before, sized = (r["variants"][k]["steps"] for k in ("before", "sized"))
    for who in ("teacher", "student"):
        a, b = before[who], sized[who]
        lines.append(
            f"\n{who.capitalize()} step, sized / before: FLOPs {b['gflop'] / a['gflop']:.2f}, "
            f"time {b['ms_per_step']['median'] / a['ms_per_step']['median']:.2f}."
        )
    return "\n".join(lines) + "\n"


def _ms(t: dict) -> str:
    m = t["ms_per_step"]
    return f"{m['median']:.0f} [{m['min']:.0f}, {m['max']:.0f}]"


if __name__ == "__main__":
    main()
