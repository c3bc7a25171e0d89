"""Does CPU bf16 autocast train as well as fp32? The four CPU-preset teachers, trained in both.

For each seed and each CPU-preset teacher (``benchmarks/teachers.py``'s): one run with
``train.precision=32-true`` and one with ``bf16-mixed``, the same data, seed and schedule,
each tested on the teacher's own test split. Reported per teacher and seed: bf16 minus fp32 on
the task's primary metric (positive: bf16 better, whichever way the metric points), with a 95%
paired bootstrap interval over the test images (the runs' per-image test records, as
``must report`` does). Over seeds: the mean difference and its interval and, as the yardstick
of plain training noise, fp32 of the second seed minus fp32 of the first. Also each run's training seconds.
Finished runs are reused, so an interrupted run continues where it stopped.

    python benchmarks/precision_quality.py --out benchmarks/results [--seeds 0 1] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_with_overrides, write_results
from must.config import TeachConfig, load_config
from must.records import load_records
from must.stages.report import primary
from must.stages.teach import teach
from must.stats import bootstrap_weights, interval, stable_seed
from must.tasks import TASK_TYPES
from precision import cpu_model
from teachers import PRESETS

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
RESAMPLES = 2000


def difference(a: np.ndarray, b: np.ndarray, sign: float) -> dict:
    """``a - b`` (times ``sign``: positive is better) on the test set and its 95% interval
    over the resamples (row 0 is the test set itself)."""
    d = sign * (a - b)
    low, high = interval(d[1:])
    return {"value": float(d[0]), "interval": [low, high]}


def compare(task: str, runs: dict[tuple[str, int], dict], seeds: list[int]) -> dict:
    """bf16 against fp32 on one teacher's test images, per seed and over seeds."""
    metric, higher = primary(task)
    sign = 1.0 if higher else -1.0
    sets = {
        run: load_records(Path(info["folder"]) / info["test_records"][task])
        for run, info in runs.items()
    }
    keys = sets["fp32", seeds[0]].keys
    weights = np.vstack(
        [np.ones((1, len(keys))), bootstrap_weights(len(keys), RESAMPLES, stable_seed(task))]
    )
    metric_of = TASK_TYPES[task].records_metric
    values = {run: metric_of(rs.subset(keys).records)(weights) for run, rs in sets.items()}
    result: dict = {"metric": metric, "higher_is_better": higher, "test_images": len(keys)}
    result["per_seed"] = {
        seed: {
            "fp32": float(values["fp32", seed][0]),
            "bf16": float(values["bf16", seed][0]),
            "fp32_train_seconds": runs["fp32", seed]["train_seconds"],
            "bf16_train_seconds": runs["bf16", seed]["train_seconds"],
            "bf16_minus_fp32": difference(values["bf16", seed], values["fp32", seed], sign),
        }
        for seed in seeds
    }
    mean = {p: np.mean([values[p, s] for s in seeds], axis=0) for p in PRECISIONS}
    result["mean_bf16_minus_fp32"] = difference(mean["bf16"], mean["fp32"], sign)
    if len(seeds) > 1:
        result["fp32_seed_difference"] = difference(
            values["fp32", seeds[1]], values["fp32", seeds[0]], sign
        )
    return result


def markdown(results: dict) -> str:
    def cell(d: dict) -> str:
        low, high = d["interval"]
        return f"{d['value']:+.3f} [{low:+.3f}, {high:+.3f}]"

    seeds = results["seeds"]
    lines = [
        "# CPU bf16 autocast against fp32: test quality of the CPU-preset teachers",
        "",
        f"Machine: {results['machine']}. Command: `{results['command']}`; load average "
        f"{results['load_before']} before, {results['load_after']} after. Each teacher's preset "
        "trained twice per seed, `train.precision=32-true` and `bf16-mixed`, same data and "
        "schedule; tested on its own test split. Differences are bf16 minus fp32 on the primary "
        "metric, signed so that positive means bf16 is better, with 95% paired bootstrap "
        f"intervals over the test images ({RESAMPLES} resamples). The last column is the "
        "yardstick of training noise: fp32 of one seed against fp32 of the other.",
        "",
        "| teacher | metric | test images | "
        + " | ".join(f"fp32 / bf16 seed {s}" for s in seeds)
        + " | bf16 - fp32, mean over seeds | fp32 seed "
        + (f"{seeds[1]} - seed {seeds[0]}" if len(seeds) > 1 else "difference")
        + " | train s fp32 / bf16 |",
        "|---|---|---:|" + "---:|" * len(seeds) + "---:|---:|---:|",
    ]
    for task, r in results["teachers"].items():
        per = r["per_seed"]
        scores = " | ".join(f"{per[s]['fp32']:.3f} / {per[s]['bf16']:.3f}" for s in seeds)
        noise = cell(r["fp32_seed_difference"]) if "fp32_seed_difference" in r else "n/a"
        fp32_s = sum(per[s]["fp32_train_seconds"] for s in seeds)
        bf16_s = sum(per[s]["bf16_train_seconds"] for s in seeds)
        lines.append(
            f"| {task} | {r['metric']} | {r['test_images']} | {scores} | "
            f"{cell(r['mean_bf16_minus_fp32'])} | {noise} | {fp32_s:.0f} / {bf16_s:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default="runs/bench-precision-quality")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tasks", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    args = parse_with_overrides(parser)
    work = Path(args.work)
    load_before = round(os.getloadavg()[0], 2)
    results: dict = {"machine": cpu_model(), "seeds": args.seeds, "teachers": {}}
    command = "python benchmarks/precision_quality.py"
    if args.seeds != [0, 1]:
        command += " --seeds " + " ".join(map(str, args.seeds))
    if args.tasks != list(PRESETS):
        command += " --tasks " + " ".join(args.tasks)
    results["command"] = " ".join([command, *args.overrides])
    for task in args.tasks:
        preset = PRESETS[task][0]
        runs = {}
        for seed in args.seeds:  # seed by seed: a stopped benchmark has whole pairs
            for name, precision in PRECISIONS.items():
                overrides = [f"data.cache={work / 'data'}", f"train.seed={seed}", *args.overrides]
                cfg = load_config(TeachConfig, preset, [*overrides, f"train.precision={precision}"])
                folder = work / f"{task}-{name}-seed{seed}"
                start = time.perf_counter()
                info = teach(cfg, folder, progress=False)["info"]
                runs[name, seed] = {**info, "folder": str(folder)}
                print(
                    f"{task} seed {seed} {name}: test {info['test'][task]} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
        results["teachers"][task] = compare(task, runs, args.seeds)
    results["load_before"] = load_before
    results["load_after"] = round(os.getloadavg()[0], 2)
    results["torch"] = torch.__version__
    write_results(args.out, "precision_quality", results, markdown(results))


if __name__ == "__main__":
    main()
