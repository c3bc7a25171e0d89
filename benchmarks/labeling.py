"""Pseudo-labelling throughput and the store's size and read speed, side by side in one run.

Measures, on this machine:
- the ``must label`` pipeline (decode in DataLoader workers, forward passes, conversion to
  store fields, shard writing) in images/s, against the bare forward passes of the same
  teachers on the same images (same batch size, images already decoded, resized and in
  memory as float tensors): the ratio is the pipeline's overhead (target >= 0.95);
- the store's bytes per image (shards only, and with the manifest and sidecars);
- random reads (``PseudoLabelStore.get`` of every key in shuffled order, one fresh reader) in
  reads/s, against the rate a student training step consumes images: forward + backward +
  SGD step of a 4-task student on the CPU preset backbone at 64 px, batch from the store
  (target: reads >= 20x faster).

Teachers: the four CPU presets' architectures (``configs/teach_*_cpu.yaml``) with random
weights, one task each, unless ``--teacher`` names checkpoints. Writes ``labeling.json`` and
``labeling.md`` to ``--out``.

    python benchmarks/labeling.py --out benchmarks/results [--num 512] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors

from must.checkpoint import load_model, save_model
from must.config import TeachConfig, load_config
from must.data.readers import MultiTaskDataset, read_image
from must.data.render import render_dataset
from must.data.transforms import build_transforms
from must.models.model import MultiTaskModel
from must.stages.label import label_images
from must.store import PseudoLabelStore, StoreDataset
from must.tasks import build_task
from must.training.data import Collator

TASKS = ("classification", "detection", "segmentation", "depth")


def preset(task: str) -> TeachConfig:
    return load_config(TeachConfig, f"teach_{task}_cpu")


def make_teachers(root: Path, image_size: int) -> list[Path]:
    """One random-weight teacher per task, with its CPU preset's architecture."""
    from must.data.styles import load_style

    style = load_style("mixed")
    classes = {
        "classification": style.category_names,
        "detection": style.category_names,
        "segmentation": style.segmentation_classes,
        "depth": None,
    }
    out = []
    for i, task in enumerate(TASKS):
        cfg = preset(task)
        torch.manual_seed(i)
        head = build_task(task, classes[task], cfg.model.heads.get(task))
        model = MultiTaskModel(cfg.model.backbone, {task: head})
        out.append(save_model(model, root / f"teacher-{task}", {"image_size": image_size}))
    return out


def bare_forward(teachers: list[Path], paths: list[Path], batch_size: int) -> float:
    """Images/s of the teachers' forward passes alone, inputs prepared in memory."""
    models = []
    for t in teachers:
        model, payload = load_model(t)
        models.append((model.eval(), payload["info"]["image_size"]))
    inputs: dict[int, list[torch.Tensor]] = {}
    for size in {s for _, s in models}:
        resize = build_transforms(False, size)
        images = [
            resize({"image": tv_tensors.Image(torch.from_numpy(read_image(p)).permute(2, 0, 1))})[
                "image"
            ]
            for p in paths
        ]
        inputs[size] = [
            torch.stack(images[i : i + batch_size]).float() / 255.0
            for i in range(0, len(images), batch_size)
        ]
    with torch.inference_mode():
        for model, size in models:  # warm-up: first calls pay for kernel selection
            model(inputs[size][0])
        start = time.perf_counter()
        for b in range(len(inputs[models[0][1]])):
            for model, size in models:
                model(inputs[size][b])
        elapsed = time.perf_counter() - start
    return len(paths) / elapsed


def pipeline(
    teachers: list[Path], pool: Path, out: Path, batch_size: int, workers: int, shard_size: int
) -> dict:
    """The whole ``must label`` run into a fresh store (``overwrite``); its loop is timed from
    the first batch requested to the last shard written (models are warm: bare_forward ran
    first in this process)."""
    start = time.perf_counter()
    result = label_images(
        teachers, pool, out, batch_size=batch_size, workers=workers, shard_size=shard_size,
        progress=False, overwrite=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    return {
        "images": result.labelled_images,
        "loop_images_per_s": result.labelled_images / result.seconds,
        "wall_images_per_s": result.labelled_images / wall,
        "complete": result.complete,
    }


def store_size(store: Path) -> dict:
    manifest = json.loads((store / "manifest.json").read_text())
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    all_bytes = sum(p.stat().st_size for p in store.iterdir() if p.is_file())
    records = sum(s["records"] for s in manifest["shards"])
    return {
        "records": records,
        "shard_bytes_per_image": shard_bytes / records,
        "all_bytes_per_image": all_bytes / records,
    }


def random_reads(store: Path, seconds: float) -> float:
    reader = PseudoLabelStore(store)  # fresh: shards are opened as the reads reach them
    keys = list(reader.keys)
    random.Random(0).shuffle(keys)
    count, start = 0, time.perf_counter()
    while True:
        for key in keys:
            rec = reader.get(key)
            for fields in rec.labels.values():
                for value in fields.values():
                    np.asarray(value).sum()  # touch the data, not just the memory map
            count += 1
        if time.perf_counter() - start >= seconds:
            break
    return count / (time.perf_counter() - start)


def training_rate(store: Path, batch_size: int, steps: int) -> float:
    """Images/s of a student training step (4 tasks, CPU preset backbone, 64 px)."""
    dataset = StoreDataset(store, transform=build_transforms(True, 64))
    heads = {task: preset(task).model.heads.get(task) for task in TASKS}
    tasks = {n: build_task(n, dataset.tasks[n].classes or None, heads[n]) for n in TASKS}
    model = MultiTaskModel(preset("detection").model.backbone, tasks).train()
    collate = Collator(tasks)
    batch = collate([dataset[i % len(dataset)] for i in range(batch_size)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        _, losses = model(batch.images, batch.targets)
        total = sum(v for terms in losses.values() for v in terms.values())
        opt.zero_grad()
        total.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--num", type=int, default=1024, help="images to label")
    parser.add_argument("--size", type=int, default=64, help="image side (pool and teachers)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="decoding workers of must label")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--read-seconds", type=float, default=3.0)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--teacher", action="append", default=None, help="use these instead")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved (bare, pipeline) pairs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = root / "pool"
        render_dataset(
            "mixed", pool, args.num, args.size, splits=(1, 0, 0), workers=2, progress=False
        )
        teachers = args.teacher or make_teachers(root, args.size)
        paths = MultiTaskDataset(pool, tasks=[]).image_paths
        # Interleaved pairs (bare, pipeline): this machine's load drifts, so each pair's
        # ratio is taken side by side and the median ratio reported with its spread.
        bares, pipes, ratios = [], [], []
        store = root / "store"
        for _ in range(args.rounds):
            bares.append(bare_forward(teachers, paths, args.batch_size))
            pipes.append(
                pipeline(teachers, pool, store, args.batch_size, args.workers, args.shard_size)
            )
            ratios.append(pipes[-1]["loop_images_per_s"] / bares[-1])
            print(
                f"bare forward passes: {bares[-1]:.1f} images/s; must label loop: "
                f"{pipes[-1]['loop_images_per_s']:.1f} images/s; ratio {ratios[-1]:.3f}"
            )
        order = sorted(range(len(ratios)), key=ratios.__getitem__)
        mid = order[len(order) // 2]  # the pair with the median ratio
        bare, pipe, ratio = bares[mid], pipes[mid], ratios[mid]
        print(
            f"must label: {pipe['loop_images_per_s']:.1f} images/s in its loop "
            f"({pipe['wall_images_per_s']:.1f} with start-up) = {ratio:.2f}x bare forward "
            f"(median of {len(ratios)} pairs, range {min(ratios):.3f}-{max(ratios):.3f})"
        )
        size = store_size(store)
        print(f"store: {size['shard_bytes_per_image']:.0f} bytes/image in shards")
        reads = random_reads(store, args.read_seconds)
        train = training_rate(store, args.train_batch, args.train_steps)
        print(f"random reads: {reads:.0f}/s; student training step: {train:.1f} images/s")
    results["labeling"] = {
        "bare_forward_images_per_s": bare,
        "bare_forward_rounds": bares,
        "pipeline_loop_rounds": [p["loop_images_per_s"] for p in pipes],
        **{f"pipeline_{k}": v for k, v in pipe.items()},
        "ratio_to_bare": ratio,
        "ratio_rounds": ratios,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "target_ratio": 0.95,
    }
    results["store"] = size
    results["reads"] = {
        "random_reads_per_s": reads,
        "training_images_per_s": train,
        "ratio": reads / train,
        "target_ratio": 20.0,
        "training_step": f"4-task student, CPU preset backbone, 64 px, batch {args.train_batch}, "
        "forward + backward + SGD step",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "labeling.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lab, rd = results["labeling"], results["reads"]
    ok = "meets" if ratio >= 0.95 else "misses"
    ok_reads = "meets" if rd["ratio"] >= 20 else "misses"
    lines = [
        "# Pseudo-labelling",
        "",
        f"Machine: {m['cpus']} CPUs ({m['threads']} torch threads), Python {m['python']}, torch "
        f"{m['torch']}, GPU: {m['cuda'] or 'none'}. Command: `python benchmarks/labeling.py "
        + " ".join(
            " ".join(f"--{k.replace('_', '-')} {x}" for x in (v if isinstance(v, list) else [v]))
            for k, v in results["settings"].items()
            if v
        )
        + "`.",
        f"{args.num} images of the mixed style at {args.size} px; four teachers (one per task, "
        "CPU preset architectures)"
        + (" with random weights" if not args.teacher else "")
        + f", batch {args.batch_size}; {args.rounds} interleaved (bare, pipeline) pairs, the "
        "pair with the median ratio shown, with the range of the ratios.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| bare forward passes (images/s) | {lab['bare_forward_images_per_s']:.1f} |",
        f"| `must label` pipeline, labelling loop (images/s) | "
        f"{lab['pipeline_loop_images_per_s']:.1f} |",
        f"| `must label` pipeline, with start-up (images/s) | "
        f"{lab['pipeline_wall_images_per_s']:.1f} |",
        f"| pipeline / bare forward, median [min, max] (target ≥ 0.95: {ok}) | "
        f"{lab['ratio_to_bare']:.3f} [{lab['ratio_min']:.3f}, {lab['ratio_max']:.3f}] |",
        f"| store bytes per image (shards) | {size['shard_bytes_per_image']:.0f} |",
        f"| store bytes per image (all files) | {size['all_bytes_per_image']:.0f} |",
        f"| random reads, shuffled keys (reads/s) | {rd['random_reads_per_s']:.0f} |",
        f"| student training step (images/s) | {rd['training_images_per_s']:.1f} |",
        f"| reads / training consumption (target ≥ 20: {ok_reads}) | {rd['ratio']:.0f} |",
        "",
        f"Training step measured: {rd['training_step']}.",
    ]
    (out / "labeling.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'labeling.json'} and {out / 'labeling.md'}")


if __name__ == "__main__":
    main()
