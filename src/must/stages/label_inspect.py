"""``must label show`` and ``must label stats``: look at a pseudo-label store.

``show_store`` draws a grid, one row per image: the panels of ``must.data.show.sample_panels``
(the image with its boxes and class names, the class map with ignored pixels black, depth
with near bright, ...) and a text panel with the key, what each task says of its label (e.g.
the top-3 classes) and where each label came from. ``store_stats`` gathers per-task
statistics (each task's own, ``Task.store_stats``, plus label origins and skipped images);
``format_stats`` prints them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image
from torchvision.utils import make_grid

from must.data.show import sample_panels, text_panel
from must.store import PseudoLabelStore
from must.store.dataset import ORIGIN_KEY, StoreDataset
from must.tasks import TASK_TYPES, build_task
from must.tasks.base import Task


def _evenly(count: int, num: int) -> list[int]:
    num = max(0, min(num, count))
    return sorted({math.floor(i * count / num) for i in range(num)}) if num else []


def show_store(
    store_root: str | Path,
    out: str | Path | None = None,
    num: int = 8,
    *,
    image_root: str | Path | None = None,
) -> Path:
    """Write a PNG grid of ``num`` images (evenly spread over the store) with their labels:
    per image, the panels ``sample_panels`` draws of the sample the tasks' ``from_store``
    give back (a column no shown image has anything in is left out), then a text panel."""
    dataset = StoreDataset(store_root, image_root=image_root, allow_incomplete=True)
    out = Path(out) if out is not None else Path(store_root) / "preview.png"
    rows = []
    for index in _evenly(len(dataset), num):
        sample = dataset[index]
        panels = list(sample_panels(sample, dataset.classes))
        lines = [sample["key"]]
        for task in dataset.tasks.values():
            lines += task.store_lines(sample)
        for task, origin in sample[ORIGIN_KEY].items():
            lines.append(f"{task}: {origin}")
        rows.append((panels, text_panel(lines, *panels[0].shape[-2:])))
    if not rows:
        raise ValueError(f"{store_root}: the store has no labelled image to show")
    # The image column always; the others where some image has a label drawn in them.
    keep = [c == 0 or any(bool(r[0][c].any()) for r in rows) for c in range(len(rows[0][0]))]
    panels = []
    for row, text in rows:
        panels += [p for p, k in zip(row, keep, strict=True) if k] + [text]
    grid = make_grid(panels, nrow=sum(keep) + 1, padding=2, pad_value=255)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
    return out


def store_stats(store_root: str | Path) -> dict[str, Any]:
    """Per-task statistics of a store (complete or not: the shards written so far), each
    task's own figures (``Task.store_stats``: e.g. entropy of soft labels, boxes per image
    and scores, ignored pixels, depth range) and every task's label origins (pseudo / real),
    plus the skipped images with their reasons."""
    store = PseudoLabelStore(store_root, allow_incomplete=True)
    origins: dict[str, dict[str, int]] = {t: {"pseudo": 0, "real": 0} for t in store.tasks}
    for shard in store.manifest["shards"]:
        for task, counts in shard["labels"].items():
            for origin, n in counts.items():
                origins[task][origin] += n
    tasks = _known_tasks(store)
    accumulators = {name: t.store_stats() for name, t in tasks.items()}
    for key in store.keys:
        record = store.get(key)
        for task, fields in record.labels.items():
            if task in accumulators:
                accumulators[task].add(fields, record.origin[task])
    acc: dict[str, dict[str, Any]] = {}
    for task in store.tasks:
        acc[task] = {"kind": store.kind(task), "origins": origins[task]}
        if task in accumulators:
            acc[task].update(accumulators[task].result())
    return {
        "store": str(store.root),
        "complete": bool(store.manifest["complete"]),
        "images": store.manifest["images"]["count"],
        "records": len(store),
        "settings": store.settings,
        "tasks": acc,
        "skipped": list(store.skipped),
    }


def _known_tasks(store: PseudoLabelStore) -> dict[str, Task]:
    """The task objects of the store's tasks whose kind is a registered task (a store made
    elsewhere may hold others: they get their origins counted only)."""
    return {
        name: build_task(store.kind(name), store.classes(name))
        for name in store.tasks
        if store.kind(name) in TASK_TYPES
    }


def format_stats(stats: dict[str, Any]) -> str:
    lines = [
        f"store {stats['store']}: {stats['records']} labelled of {stats['images']} images, "
        f"{len(stats['skipped'])} skipped, {'complete' if stats['complete'] else 'INCOMPLETE'}",
        "settings: " + ", ".join(f"{k}={v}" for k, v in stats["settings"].items()),
    ]
    for task, s in stats["tasks"].items():
        o = s["origins"]
        lines.append(f"{task} ({s['kind']}): {o['pseudo']} pseudo, {o['real']} real")
        kind = TASK_TYPES.get(s["kind"])
        if kind is not None:
            lines += kind.format_store_stats(s)
    for item in stats["skipped"][:20]:
        lines.append(f"skipped {item['key']} ({item['path']}): {item['reason']}")
    if len(stats["skipped"]) > 20:
        lines.append(f"... and {len(stats['skipped']) - 20} more skipped")
    return "\n".join(lines)
