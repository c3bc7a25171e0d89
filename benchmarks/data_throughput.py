"""Data-layer throughput: rendering the scene world and reading it back for training.

Measures, in one run on this machine:
- render images/s per style at 64x64 and 128x128 in one process (one core);
- ``must data render`` end to end (render + encode + write) with 1 and 2 worker processes;
- reader samples/s with the training augmentation through a DataLoader with 0 and 2 workers.

Writes ``data_throughput.json`` and ``data_throughput.md`` to ``--out``.

    python benchmarks/data_throughput.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from must.data.readers import MultiTaskDataset
from must.data.render import render_dataset
from must.data.styles import builtin_style_names, load_style, render_index
from must.data.transforms import build_transforms


def time_render(style_name: str, size: int, seconds: float) -> float:
    style = load_style(style_name)
    render_index(style, 0, 0, size)  # warm-up (style loading, caches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        render_index(style, 1, count, size)
        count += 1
    return count / (time.perf_counter() - start)


def time_render_to_disk(style: str, num: int, size: int, workers: int, root: Path) -> float:
    out = root / f"render-{style}-{workers}"
    start = time.perf_counter()
    render_dataset(style, out, num, size, tasks=None, workers=workers, progress=False)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return num / elapsed


def _collate(batch: list[dict]) -> list[dict]:
    return batch


def time_reader(root: Path, size: int, workers: int, batches: int) -> float:
    dataset = MultiTaskDataset(root, split="train", transform=build_transforms(True, size))
    loader = DataLoader(
        dataset,
        batch_size=32,
        shuffle=True,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    it = iter(loader)
    next(it)  # start-up (worker spawn) is not throughput
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            count += len(next(it))
        except StopIteration:
            it = iter(loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per render figure")
    parser.add_argument("--disk-num", type=int, default=400, help="images per on-disk render")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "render_in_process": {},
        "render_to_disk": {},
        "reader": {},
    }
    styles = builtin_style_names()
    for size in (64, 128):
        for style in styles:
            ips = time_render(style, size, args.seconds)
            results["render_in_process"][f"{style}@{size}"] = round(ips, 1)
            print(f"render {style:>10} {size:>3}px: {ips:7.1f} images/s (1 process)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for workers in (1, 2):
            ips = time_render_to_disk("mixed", args.disk_num, 64, workers, root)
            results["render_to_disk"][f"mixed@64 workers={workers}"] = round(ips, 1)
            print(
                f"render to disk, mixed 64px, all labels, {workers} worker(s): {ips:.1f} images/s"
            )
        data = root / "novel"
        render_dataset("novel", data, 600, 96, workers=2, progress=False)
        for workers in (0, 2):
            sps = time_reader(data, 64, workers, batches=30)
            results["reader"][f"novel@96->64 train aug, workers={workers}"] = round(sps, 1)
            print(f"reader + augmentation, {workers} workers: {sps:.1f} samples/s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Data throughput",
        "",
        f"Machine: {results['machine']['cpus']} CPUs, Python {results['machine']['python']}, "
        f"torch {results['machine']['torch']}. Command: "
        "`python benchmarks/data_throughput.py --out benchmarks/results`.",
        "",
        "## Rendering in one process (images/s)",
        "",
        "| style | 64×64 | 128×128 |",
        "|---|---:|---:|",
    ]
    rip = results["render_in_process"]
    for style in styles:
        lines.append(f"| {style} | {rip[f'{style}@64']} | {rip[f'{style}@128']} |")
    lines += ["", "## Rendering to disk, every label written (images/s)", ""]
    lines += ["| setting | images/s |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in results["render_to_disk"].items()]
    lines += ["", "## Reading with training augmentation (samples/s)", ""]
    lines += ["| setting | samples/s |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in results["reader"].items()]
    (out / "data_throughput.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'data_throughput.json'} and {out / 'data_throughput.md'}")


if __name__ == "__main__":
    main()
