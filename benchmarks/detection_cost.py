"""The detection head's cost against its quality: the CPU detection teacher trained with the
head as it was and with a head sized to small images, side by side from the same seed.

Each variant is a set of ``model.heads.detection`` overrides on ``teach_detection_cpu``. For
each: the validation metrics the checkpoint was selected on, the test metrics, the training
time, and the FLOPs of one training step (forward + backward, ``torch.utils.flop_counter``:
convolutions and matrix products) for the teacher's batch and for the student's batch (four
tasks, ``train_student_cpu``). Variants are compared on validation; test is reported, not
used to choose.

    python benchmarks/detection_cost.py --out benchmarks/results [--seeds 0] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from must.config import TeachConfig, load_config
from must.models.model import MultiTaskModel
from must.tasks import build_task
from must.teach import teach
from must.train.data import Collator, augmentation

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


def step_gflop(work: Path, student: bool, head: list[str], batch: int) -> float:
    """FLOPs of one training step (forward + backward) on a rendered batch of 64 px images."""
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
    counter = FlopCounterMode(display=False)
    with counter:
        _, losses = model(data.images, data.targets)
        sum(v for terms in losses.values() for v in terms.values()).backward()
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default="runs/bench-detection-cost")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("overrides", nargs="*", help="overrides for every variant")
    args = parser.parse_args()
    results: dict = {
        "load_before": round(os.getloadavg()[0], 2),
        "settings": vars(args),
        "variants": {},
    }
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
        results["variants"][name] = {
            "overrides": head,
            "runs": runs,
            "teacher_step_gflop": step_gflop(Path(args.work), False, head, cfg.train.batch_size),
            "student_step_gflop": step_gflop(Path(args.work), True, head, 32),
        }
    results["load_after"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "detection_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "detection_cost.md").write_text(report(results))
    print(f"wrote {out / 'detection_cost.json'} and {out / 'detection_cost.md'}")


def report(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# Detection head: cost against quality (CPU detection teacher)",
        "",
        f"Command: `python benchmarks/detection_cost.py --seeds {' '.join(map(str, s['seeds']))}"
        + (" " + " ".join(s["overrides"]) if s["overrides"] else "")
        + f"`. Load average {r['load_before']} before, {r['load_after']} after (training "
        "seconds are only comparable when both are low). Variants are compared on validation "
        "(mAP@0.5 of the selected checkpoint); test is reported alongside.",
        "",
        "| variant | head overrides | val map_50 | val map | test map_50 | test map "
        "| train s | GFLOP/step teacher (batch 16) | GFLOP/step student (4 tasks, batch 32) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in r["variants"].items():
        for run in v["runs"]:
            lines.append(
                f"| {name} (seed {run['seed']}) | "
                + ", ".join(o.split(".")[-1] for o in v["overrides"])
                + f" | {run['val']['map_50']:.3f} | {run['val']['map']:.3f} "
                f"| {run['test']['map_50']:.3f} | {run['test']['map']:.3f} "
                f"| {run['train_seconds']:.0f} | {v['teacher_step_gflop']:.1f} "
                f"| {v['student_step_gflop']:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
