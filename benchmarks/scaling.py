"""Scaling curves: how the cost of labelling and of a student step grows, against FLOPs.

- ``must label`` time against the number of images (four random-weight teachers with the CPU
  presets' architectures, the ``mixed`` pool at 64 px): seconds of the labelling loop and
  seconds per image; linear scaling means a flat seconds-per-image column.
- Student step time (forward + backward + SGD step, the CPU preset backbone, batch
  ``--batch``) against the number of tasks (classification, + detection, + segmentation,
  + depth at 64 px) and against the image side (32, 64, 96 px with the four tasks), next to
  the step's FLOPs (``torch.utils.flop_counter``: convolutions and matrix products, forward and
  backward; RoIAlign, NMS, interpolation and element-wise work are not counted). Time per
  GFLOP that moves between rows is cost the FLOPs do not explain.

Timings of a curve's points are taken round-robin (every point once per round, ``--rounds``
rounds, median reported with min-max), so drifting machine load spreads over all points.

    python benchmarks/scaling.py --out benchmarks/results [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import spread, step_gflop, train_step, write_results
from labeling import make_teachers, preset
from must.data.readers import MultiTaskDataset
from must.data.render import render_dataset
from must.models.model import MultiTaskModel
from must.stages.label import label_images
from must.tasks import build_task
from must.training.data import Collator, augmentation

TASK_ORDER = ("classification", "detection", "segmentation", "depth")


def labelling_curve(root: Path, counts: list[int], rounds: int, workers: int) -> list[dict]:
    pool = root / "pool"
    render_dataset("mixed", pool, max(counts), 64, splits=(1, 0, 0), workers=2, progress=False)
    teachers = make_teachers(root, 64)
    keys = MultiTaskDataset(pool, tasks=[]).image_paths
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(rounds):
        for n in counts:
            folder = root / f"pool-{n}"  # the first n images, as links
            if not folder.exists():
                folder.mkdir()
                for path in keys[:n]:
                    (folder / path.name).symlink_to(path)
            result = label_images(
                teachers, folder, root / f"store-{n}", batch_size=32, workers=workers,
                shard_size=128, progress=False, overwrite=True,
            )  # fmt: skip
            seconds[n].append(result.seconds)
            print(f"label {n} images: {result.seconds:.2f} s")
    return [
        {"images": n, "seconds": spread(s), "ms_per_image": 1000 * statistics.median(s) / n}
        for n, s in seconds.items()
    ]


def student_batch(root: Path, tasks: tuple[str, ...], size: int, batch: int):
    data = root / f"labelled-{size}"
    render_dataset(
        "novel", data, max(64, batch), size, splits=(1, 0, 0), tasks=list(TASK_ORDER),
        workers=2, progress=False,
    )  # fmt: skip
    dataset = MultiTaskDataset(data, split="train")
    dataset.transform = augmentation(preset("detection").data.augment, size, train=True)
    objs = {t: build_task(t, dataset.classes.get(t), preset(t).model.heads.get(t)) for t in tasks}
    torch.manual_seed(0)
    model = MultiTaskModel(preset("detection").model.backbone, objs).train()
    samples = [dataset[i % len(dataset)] for i in range(batch)]
    return model, Collator(objs)(samples)


def step_curve(root: Path, points: list[tuple[tuple[str, ...], int]], batch: int, steps: int,
               rounds: int) -> list[dict]:  # fmt: skip
    setups = []
    for tasks, size in points:
        model, data = student_batch(root, tasks, size, batch)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        setups.append((tasks, size, model, data, opt, step_gflop(model, data)))

    for _, _, model, data, opt, _ in setups:
        train_step(model, data, opt)  # warm-up: kernel selection, allocations
    times: list[list[float]] = [[] for _ in setups]
    for _ in range(rounds):
        for i, (tasks, size, model, data, opt, _) in enumerate(setups):
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, data, opt)
            times[i].append((time.perf_counter() - start) / steps)
            print(f"{'+'.join(tasks)} at {size} px: {times[i][-1] * 1000:.0f} ms/step")
    rows = []
    for (tasks, size, _, _, _, gflop), t in zip(setups, times, strict=True):
        median = statistics.median(t)
        rows.append(
            {
                "tasks": list(tasks),
                "image_size": size,
                "ms_per_step": spread([1000 * x for x in t]),
                "gflop_per_step": gflop,
                "ms_per_gflop": 1000 * median / gflop,
                "gflop_per_s": gflop / median,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--counts", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96])
    parser.add_argument("--batch", type=int, default=32, help="student batch size")
    parser.add_argument("--steps", type=int, default=3, help="student steps per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="must label decoding workers")
    args = parser.parse_args()
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_before": round(os.getloadavg()[0], 2),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results["labelling"] = labelling_curve(root, args.counts, args.rounds, args.workers)
        by_tasks = [(TASK_ORDER[: k + 1], 64) for k in range(len(TASK_ORDER))]
        by_size = [(TASK_ORDER, s) for s in args.sizes if s != 64]
        rows = step_curve(root, by_tasks + by_size, args.batch, args.steps, args.rounds)
        results["student_by_tasks"] = rows[: len(by_tasks)]
        four_at_64 = rows[len(by_tasks) - 1]
        results["student_by_size"] = sorted(
            [four_at_64, *rows[len(by_tasks) :]], key=lambda r: r["image_size"]
        )
    results["machine"]["load_after"] = round(os.getloadavg()[0], 2)
    write_results(args.out, "scaling", results, report(results))


def report(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    lines = [
        "# Scaling curves",
        "",
        f"Machine: {m['cpus']} CPUs ({m['threads']} torch threads), Python {m['python']}, torch "
        f"{m['torch']}; load average {m['load_before']} before, {m['load_after']} after. "
        f"Command: `python benchmarks/scaling.py --rounds {s['rounds']} --steps {s['steps']} "
        f"--batch {s['batch']} --workers {s['workers']}`. Median of {s['rounds']} round-robin "
        "rounds, [min, max].",
        "",
        "## `must label` against the number of images",
        "",
        "| images | labelling loop (s) | ms per image |",
        "|---:|---:|---:|",
    ]
    for row in r["labelling"]:
        t = row["seconds"]
        lines.append(
            f"| {row['images']} | {t['median']:.2f} [{t['min']:.2f}, {t['max']:.2f}] "
            f"| {row['ms_per_image']:.1f} |"
        )
    for title, key in (
        ("Student step against the number of tasks (64 px)", "student_by_tasks"),
        ("Student step against the image side (four tasks)", "student_by_size"),
    ):
        lines += [
            "",
            f"## {title}",
            "",
            "| tasks | px | ms per step | GFLOP per step | ms per GFLOP | GFLOP/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in r[key]:
            t = row["ms_per_step"]
            lines.append(
                f"| {' + '.join(row['tasks'])} | {row['image_size']} "
                f"| {t['median']:.0f} [{t['min']:.0f}, {t['max']:.0f}] "
                f"| {row['gflop_per_step']:.1f} | {row['ms_per_gflop']:.1f} "
                f"| {row['gflop_per_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
