"""Render a style of the scene world to disk in standard formats (``must data render``)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from must.data.formats import WriteOptions, finish_dataset, write_sample
from must.data.spec import TASKS
from must.data.styles import Style, load_style, render_index
from must.errors import ConfigError


def split_ranges(num: int, fractions: Sequence[float]) -> dict[str, range]:
    """Index ranges of train/val/test: consecutive blocks, so a sample's split follows from its
    index alone."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ConfigError(f"splits must be three non-negative fractions, got {list(fractions)}")
    total = sum(fractions)
    n_train = round(num * fractions[0] / total)
    n_val = round(num * fractions[1] / total)
    bounds = [0, n_train, n_train + n_val, num]
    return {
        name: range(bounds[i], bounds[i + 1])
        for i, name in enumerate(("train", "val", "test"))
        if bounds[i + 1] > bounds[i]
    }


def sample_key(style: Style, index: int) -> str:
    return f"{style.name}_{index:06d}"


# Worker state: set once per process so each task pickles only an index.
_JOB: dict = {}


def _init_worker(job: dict) -> None:
    _JOB.clear()
    _JOB.update(job)
    _JOB["style_obj"] = load_style(job["style"])


def _render_one(item: tuple[str, int]) -> dict:
    split, index = item
    style = _JOB["style_obj"]
    sample = render_index(style, _JOB["seed"], index, _JOB["size"])
    return write_sample(_JOB["out"], split, sample_key(style, index), sample, _JOB["opts"])


def render_dataset(
    style: str,
    out: str | Path,
    num: int,
    size: int,
    *,
    seed: int = 0,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    tasks: Sequence[str] | None = None,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Render ``num`` images of ``style`` into ``out``; returns the manifest path.

    A folder whose manifest records the same settings is complete and left alone; one
    rendered with other settings is refused unless ``overwrite``. Files are written under
    temporary names and renamed, and the manifest comes last, so an interrupted render
    never looks complete and is simply run again.
    """
    if num < 1:
        raise ConfigError(f"--num must be at least 1, got {num}")
    if size < 16:
        raise ConfigError(f"--size must be at least 16 pixels, got {size}")
    style_obj = load_style(style)
    tasks = list(style_obj.tasks if tasks is None else tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    out = Path(out)
    settings = {
        "style": style_obj.name,
        "style_source": style,
        "num": num,
        "size": size,
        "seed": seed,
        "splits": list(splits),
        "tasks": tasks,
    }
    manifest = out / "manifest.json"
    if manifest.exists():
        previous = json.loads(manifest.read_text()).get("meta", {}).get("render")
        if previous == settings:
            return manifest
        if not overwrite:
            raise ConfigError(
                f"{out}: already holds a dataset rendered with other settings "
                f"({previous}); choose another --out or pass --overwrite"
            )
        manifest.unlink()
    out.mkdir(parents=True, exist_ok=True)
    opts = WriteOptions(tasks=tasks, classes=style_obj.classes())
    ranges = split_ranges(num, splits)
    items = [(split, i) for split, r in ranges.items() for i in r]
    job = {"style": style, "seed": seed, "size": size, "out": out, "opts": opts}
    records: dict[str, list[dict]] = {split: [] for split in ranges}
    bar = tqdm(total=len(items), desc=f"render {style_obj.name}", unit="img", disable=not progress)
    if workers > 1:
        # Each index renders the same whatever process draws it (seeded by index), so the
        # dataset is identical for any worker count.
        ctx = mp.get_context("spawn" if os.name == "nt" else "fork")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
            for (split, _), rec in zip(
                items, pool.imap(_render_one, items, chunksize=16), strict=True
            ):
                records[split].append(rec)
                bar.update()
    else:
        _init_worker(job)
        for item in items:
            records[item[0]].append(_render_one(item))
            bar.update()
    bar.close()
    meta = {"render": settings, "style_description": style_obj.description}
    return finish_dataset(out, records, opts, name=style_obj.name, meta=meta)
