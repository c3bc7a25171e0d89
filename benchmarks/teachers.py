"""Train the four CPU-preset teachers and compare each with a chance baseline on its test split.

The chance baselines use the same metric code on constant predictions derived from the
*training* split: the most frequent class (classification, segmentation), the median
training depth (depth). For detection, chance is an AP of about 0 (no informed boxes).

    python benchmarks/teachers.py --out benchmarks/results [KEY=VALUE overrides for all]

Writes ``teachers.json`` and ``teachers.md`` to ``--out``; models go to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from must.config import TeachConfig, load_config
from must.data.readers import MultiTaskDataset
from must.stages.teach import teach
from must.tasks import build_task
from must.training.data import make_dataset

PRESETS = {
    "classification": ("teach_classification_cpu", "top1"),
    "detection": ("teach_detection_cpu", "map_50"),
    "segmentation": ("teach_segmentation_cpu", "miou"),
    "depth": ("teach_depth_cpu", "delta1"),
}


def _labels(dataset: MultiTaskDataset, key: str) -> list[torch.Tensor]:
    return [dataset[i][key] for i in range(len(dataset))]


def chance(cfg: TeachConfig) -> dict[str, float]:
    """The task's metric for a constant prediction fitted on the training split."""
    root = cfg.data.prepare(progress=False)
    train = make_dataset(root, "train", cfg.data, train=False)
    test = make_dataset(root, "test", cfg.data, train=False)
    task = build_task(cfg.task, train.classes.get(cfg.task), cfg.model.heads.get(cfg.task))
    metric = task.new_metric()
    samples = [test[i] for i in range(len(test))]
    target = task.collate(samples)
    n = len(samples)
    if cfg.task == "classification":
        counts = torch.bincount(
            torch.stack(_labels(train, "classification")), minlength=task.num_classes
        )
        logits = torch.zeros(n, task.num_classes)
        logits[:, counts.argmax()] = 1.0
        metric.update(logits, target)
    elif cfg.task == "segmentation":
        maps = torch.stack([m.as_subclass(torch.Tensor) for m in _labels(train, "segmentation")])
        counts = torch.bincount(maps[maps != 255].flatten(), minlength=task.num_classes)
        logits = torch.zeros(n, task.num_classes, *target["labels"].shape[-2:])
        logits[:, counts.argmax()] = 1.0
        metric.update(logits, target)
    elif cfg.task == "depth":
        depths = torch.stack([d.as_subclass(torch.Tensor) for d in _labels(train, "depth")])
        median = depths[depths > 0].median()
        metric.update(torch.full_like(target["depth"], float(median)), target)
    else:
        return {"map": 0.0, "map_50": 0.0}
    return {k: float(v) for k, v in metric.compute().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default="runs/bench-teachers")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every teacher")
    args = parser.parse_args()
    work = Path(args.work)
    results = {}
    for task, (preset, headline) in PRESETS.items():
        cfg = load_config(TeachConfig, preset, [f"data.cache={work / 'data'}", *args.overrides])
        start = time.perf_counter()
        summary = teach(cfg, work / task, overwrite=True, progress=False)
        wall = time.perf_counter() - start
        info = summary["info"]
        base = chance(cfg)
        results[task] = {
            "preset": preset,
            "headline_metric": headline,
            "test": info["test"][task],
            "chance": base,
            "train_seconds": info["train_seconds"],
            "wall_seconds": round(wall, 1),
            "steps": info["steps"],
            "precision": info["precision"],
            "train_images": info["training"][task]["train_images"],
        }
        print(
            f"{task}: test {headline} {info['test'][task][headline]:.3f} "
            f"(chance {base.get(headline, 0.0):.3f}), {wall:.0f} s"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teachers.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# CPU-preset teachers",
        "",
        "Command: `python benchmarks/teachers.py --out benchmarks/results`. Test split of each "
        "teacher's own style; chance = the same metric for a constant prediction fitted on the "
        "training split (most frequent class, median depth; detection: no informed boxes).",
        "",
        "| teacher | metric | test | chance | other test metrics | steps | train s | wall s |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for task, r in results.items():
        h = r["headline_metric"]
        others = ", ".join(
            f"{k} {v:.3f}"
            for k, v in r["test"].items()
            if k != h
            and v >= 0
            and k in ("top1", "top5", "map", "map_75", "pixel_acc", "abs_rel", "rmse", "delta2")
        )
        lines.append(
            f"| {task} | {h} | {r['test'][h]:.3f} | {r['chance'].get(h, 0.0):.3f} | {others} "
            f"| {r['steps']} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} |"
        )
    (out / "teachers.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'teachers.json'} and {out / 'teachers.md'}")


if __name__ == "__main__":
    main()
