"""Framework overhead: ``must teach`` against a bare, hand-written PyTorch loop doing the same
work, interleaved (must, bare, must, bare, ...), each in a fresh process.

Both runs build the same model from the same preset (random weights), read the same rendered
dataset through the same reader, augmentation, collation and ``DataLoader`` settings, take the
same optimizer and schedule (SGD or AdamW with warm-up + cosine, per-batch steps, gradient
clipping), run at the same precision, train ``--steps`` steps, validate once at the end (as
``must teach`` always validates its final weights) and save a checkpoint. The measured span is
``must teach``'s own training clock (``train_seconds``: from the start of training to its end,
which holds the final validation and checkpoint writes) against the same span of the bare
loop. Everything outside that span (start-up, data preparation, the final test pass, writing
the model file) is the fixed cost of a run, reported separately in seconds.

    python benchmarks/overhead.py --out benchmarks/results [--presets teach_detection_cpu ...]
        [--steps 60] [--pairs 3] [--num 600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import spread, write_results

PRESETS = [
    "teach_classification_cpu",
    "teach_detection_cpu",
    "teach_segmentation_cpu",
    "teach_depth_cpu",
]


def overrides(args: argparse.Namespace, cache: Path) -> list[str]:
    """The run's settings: a short schedule validated and checkpointed once, at its end."""
    s = args.steps
    return [
        f"data.cache={cache}",
        f"data.num={args.num}",
        f"train.max_steps={s}",
        f"train.val_every={s}",
        f"train.checkpoint_every={s}",
        f"train.warmup_steps={min(10, s)}",
        *args.extra,
    ]


def run_must(preset: str, opts: list[str], out: Path) -> dict:
    """``must teach`` in a fresh process; its training clock and the process's wall time."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "must", "teach", preset, "--out", str(out), "--overwrite", *opts],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    info = json.loads((out / "summary.json").read_text())["info"]
    images = info["steps"] * info["training"][next(iter(info["training"]))]["batch_size"]
    return {
        "images_per_s": images / info["train_seconds"],
        "train_seconds": info["train_seconds"],
        "wall_seconds": wall,
        "fixed_seconds": wall - info["train_seconds"],
    }


def run_bare(preset: str, opts: list[str]) -> dict:
    """The bare loop in a fresh process (this file with ``--bare``)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--bare", preset, *[f"--opt={o}" for o in opts]],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bare_loop(preset: str, opts: list[str]) -> dict:
    """Train, validate once and checkpoint by hand: what ``must teach`` does inside its clock.
    Model, data and optimizer come from the same settings; the loop is plain PyTorch."""
    from must.config import TeachConfig, load_config
    from must.tasks import build_task
    from must.training.data import make_dataset, make_loader, resolve_workers
    from must.training.fit import resolve_precision
    from must.training.module import optimizer_and_schedule

    cfg = load_config(TeachConfig, preset, opts)
    tc = cfg.train
    root = cfg.data.prepare(progress=False)
    train_set = make_dataset(root, "train", cfg.data, train=True, tasks=[cfg.task])
    val_set = make_dataset(root, "val", cfg.data, train=False, tasks=[cfg.task])
    from must.models.model import MultiTaskModel

    torch.manual_seed(tc.seed)
    task = build_task(cfg.task, train_set.classes.get(cfg.task), cfg.model.heads.get(cfg.task))
    model = MultiTaskModel(cfg.model.backbone, {cfg.task: task})
    workers = resolve_workers(cfg.data.num_workers)
    train_loader = make_loader(train_set, model.tasks, tc.batch_size, workers, True, tc.seed)
    val_loader = make_loader(val_set, model.tasks, tc.batch_size, workers, False)
    opt_and_schedule = optimizer_and_schedule(list(model.parameters()), tc)
    opt = opt_and_schedule["optimizer"]
    schedule = opt_and_schedule["lr_scheduler"]["scheduler"]
    precision = resolve_precision(tc)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if precision == "bf16-mixed"
        else nullcontext
    )
    metric = task.new_metric()

    start = time.perf_counter()
    model.train()
    step = 0
    while step < tc.max_steps:
        for batch in train_loader:
            with autocast():
                _, losses = model(batch.images, batch.targets)
            loss = sum(losses[cfg.task].values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            schedule.step()
            step += 1
            if step == tc.max_steps:
                break
    model.eval()
    with torch.no_grad():
        for batch in val_loader:
            with autocast():
                predictions, _ = model(batch.images)
            if cfg.task in batch.targets:
                metric.update(predictions[cfg.task], batch.targets[cfg.task])
    metric.compute()
    with tempfile.TemporaryDirectory() as tmp:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        for name in ("last.pt", "best.pt"):  # must keeps the last and the best checkpoint
            torch.save(state, Path(tmp) / name)
    seconds = time.perf_counter() - start
    return {"images_per_s": step * tc.batch_size / seconds, "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (must, bare) pairs")
    parser.add_argument("--num", type=int, default=600, help="images rendered per dataset")
    parser.add_argument(
        "--worker-pairs",
        type=int,
        default=0,
        help="also compare must teach with 0 and 1 loader workers (interleaved pairs)",
    )
    parser.add_argument("--bare", help=argparse.SUPPRESS)  # internal: run the bare loop
    parser.add_argument("--opt", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="config overrides for both runs")
    args = parser.parse_args()
    if args.bare:
        print(json.dumps(bare_loop(args.bare, args.opt)))
        return

    load = os.getloadavg()[0]
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_before": round(load, 2),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "bare", "opt")},
        "presets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "data"
        for preset in args.presets:
            opts = overrides(args, cache)
            run_must(preset, opts, Path(tmp) / "warm")  # renders the data; warms the caches
            pairs = []
            for i in range(args.pairs):
                m = run_must(preset, opts, Path(tmp) / f"{preset}-{i}")
                b = run_bare(preset, opts)
                pairs.append({"must": m, "bare": b, "ratio": m["images_per_s"] / b["images_per_s"]})
                print(
                    f"{preset} pair {i}: must {m['images_per_s']:.1f} images/s, bare "
                    f"{b['images_per_s']:.1f} images/s, ratio {pairs[-1]['ratio']:.3f}; fixed "
                    f"cost {m['fixed_seconds']:.1f} s"
                )
            workers = []
            for i in range(args.worker_pairs):
                w0 = run_must(preset, [*opts, "data.num_workers=0"], Path(tmp) / f"{preset}-w0")
                w1 = run_must(preset, [*opts, "data.num_workers=1"], Path(tmp) / f"{preset}-w1")
                workers.append(
                    {"w0": w0, "w1": w1, "ratio": w1["images_per_s"] / w0["images_per_s"]}
                )
                print(
                    f"{preset} workers pair {i}: 1 worker / in-process {workers[-1]['ratio']:.3f}"
                )
            results["presets"][preset] = {
                "workers": workers,
                "pairs": pairs,
                "ratio": spread([p["ratio"] for p in pairs]),
                "must_images_per_s": spread([p["must"]["images_per_s"] for p in pairs]),
                "bare_images_per_s": spread([p["bare"]["images_per_s"] for p in pairs]),
                "fixed_seconds": spread([p["must"]["fixed_seconds"] for p in pairs]),
            }
    results["machine"]["load_after"] = round(os.getloadavg()[0], 2)
    write_results(args.out, "overhead", results, report(results))


def report(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    command = f"python benchmarks/overhead.py --steps {s['steps']} --pairs {s['pairs']} " + (
        f"--num {s['num']} --worker-pairs {s['worker_pairs']} --presets {' '.join(s['presets'])}"
    )
    if s["extra"]:
        command += " " + " ".join(s["extra"])
    lines = [
        "# Framework overhead: `must teach` against a bare PyTorch loop",
        "",
        f"Machine: {m['cpus']} CPUs ({m['threads']} torch threads), Python {m['python']}, torch "
        f"{m['torch']}; load average {m['load_before']} before, {m['load_after']} after. "
        f"Command: `{command}`.",
        f"Each run trains {s['steps']} steps, validates once and saves its checkpoints; "
        f"{s['pairs']} interleaved pairs (must, bare) per preset, each run a fresh process. "
        "Ratio: `must teach` images/s over the bare loop's, per pair; median [min, max]. A "
        "verdict needs every pair on one side of 0.95.",
        "",
        "| preset | must (images/s) | bare (images/s) | must / bare (target ≥ 0.95) "
        "| fixed cost per run (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for preset, r in results["presets"].items():
        ratio = r["ratio"]
        # A verdict only where every pair agrees; otherwise the spread decides nothing.
        if ratio["min"] >= 0.95:
            verdict = "meets"
        elif ratio["max"] < 0.95:
            verdict = "misses"
        else:
            verdict = "undecided: the pairs straddle 0.95"
        lines.append(
            f"| {preset} | {r['must_images_per_s']['median']:.1f} "
            f"| {r['bare_images_per_s']['median']:.1f} "
            f"| {ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}] ({verdict}) "
            f"| {r['fixed_seconds']['median']:.1f} |"
        )
    if any(r["workers"] for r in results["presets"].values()):
        lines += [
            "",
            "## Loading in the training process against one loader worker",
            "",
            "`must teach` with `data.num_workers=0` and `=1`, interleaved pairs; ratio: images/s "
            "with one worker over in-process, median [min, max].",
            "",
            "| preset | in-process (images/s) | one worker (images/s) | one worker / in-process |",
            "|---|---:|---:|---:|",
        ]
        for preset, r in results["presets"].items():
            if not r["workers"]:
                continue
            ratio = spread([w["ratio"] for w in r["workers"]])
            w0 = spread([w["w0"]["images_per_s"] for w in r["workers"]])["median"]
            w1 = spread([w["w1"]["images_per_s"] for w in r["workers"]])["median"]
            lines.append(
                f"| {preset} | {w0:.1f} | {w1:.1f} "
                f"| {ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}] |"
            )
    lines += [
        "",
        "Fixed cost: the `must teach` process's wall time minus its training clock (start-up and "
        "imports, reading the cached dataset, the test pass, writing the model file).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
