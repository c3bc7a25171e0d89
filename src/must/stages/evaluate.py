"""``must eval``: evaluate any checkpoint on any compatible dataset."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from must.checkpoint import load_model
from must.config import DataConfig
from must.data.formats import save_json
from must.data.readers import MultiTaskDataset
from must.data.source import DataSource, as_source
from must.data.spec import load_spec
from must.data.transforms import RESIZE_MODES
from must.errors import ConfigError, DataError
from must.summary import run_info
from must.tasks import TASK_TYPES
from must.tasks.base import Task
from must.training.data import make_dataset, make_loader


def evaluate(
    checkpoint: str | Path,
    data: str | Path | DataSource,
    split: str | None = None,
    *,
    batch_size: int = 64,
    image_size: int | None = None,
    resize: str = "auto",
    predictions: str | Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics per task for the tasks the checkpoint and the dataset share.

    ``data`` is a dataset folder or a scene-world style (a :class:`DataSource`, or a path or
    style name with the default render recipe); ``split`` None: ``test``, or ``val`` where the
    dataset has no test split. Vocabularies must match exactly. Detection is
    scored in each image's own pixels. ``predictions``: also write the detections as a COCO
    results JSON (see :func:`coco_results`).
    """
    model, payload = load_model(checkpoint)
    info = run_info(payload, checkpoint)
    size = image_size or info.image_size or 64
    if resize == "auto" and info.resize in RESIZE_MODES:
        resize = info.resize  # fitted as the model was trained
    cfg = DataConfig(**as_source(data).recipe_fields(), image_size=size, resize=resize)
    root = cfg.prepare(progress)
    if split is None:
        # As in training: the test split where there is one, else validation (stated).
        split = "test" if "test" in load_spec(root)[0].splits else "val"
        if split == "val":
            print(f"{root} has no 'test' split: evaluating on 'val'")
    dataset = make_dataset(root, split, cfg, train=False, tasks=list(model.tasks))
    print(f"metrics on split {split!r} of {dataset.name}")
    shared = [t for t in model.tasks if t in dataset.tasks]
    if not shared:
        unusable = "".join(f"; {t}: {why}" for t, why in dataset.unusable.items())
        raise ConfigError(
            f"{dataset.manifest}: split {split!r} has labels for {dataset.tasks or 'no task'}, "
            f"the checkpoint predicts {list(model.tasks)}: nothing to evaluate{unusable}"
        )
    for name in shared:
        mine, theirs = model.tasks[name].classes, dataset.classes.get(name)
        if model.tasks[name].needs_classes and theirs is not None and list(theirs) != mine:
            raise ConfigError(
                f"{dataset.manifest}: {name} classes {theirs} do not match the checkpoint's {mine}"
            )
    exported = _results_task(shared, model.tasks)
    if predictions is not None and exported is None:
        raise ConfigError(
            f"--predictions writes detections, but {dataset.manifest} split {split!r} and the "
            f"checkpoint share no detection task (shared: {', '.join(shared)})"
        )
    kept: list[tuple[str, dict]] | None = [] if predictions is not None else None
    results = run_metrics(model, dataset, shared, batch_size, progress, kept, exported)
    if predictions is not None:
        save_json(coco_results(dataset, kept or []), Path(predictions))
        print(f"wrote {len(kept or [])} images' detections as COCO results to {predictions}")
    check_measured(results, {t: model.tasks[t] for t in shared}, dataset)
    return results


@torch.inference_mode()
def run_metrics(
    model,
    dataset: MultiTaskDataset,
    tasks: list[str],
    batch_size: int,
    progress: bool = True,
    detections: list[tuple[str, dict]] | None = None,
    exported: str | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics per task; ``detections`` (a list) also receives (key, predictions in the
    image's own pixels) of task ``exported`` (default: the first of ``tasks`` whose
    predictions ``--predictions`` writes) for every image with its ground truth."""
    if exported is None:
        exported = _results_task(tasks, model.tasks)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    metrics = {name: model.tasks[name].new_metric().to(device) for name in tasks}
    loader = make_loader(dataset, {n: model.tasks[n] for n in tasks}, batch_size, 0, False)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        batch = batch.to(device)
        predictions, _ = model(batch.images)
        for name, metric in metrics.items():
            if name in batch.targets:
                metric.update(predictions[name], batch.targets[name])
        target = batch.targets.get(exported) if exported is not None else None
        if detections is not None and target is not None:
            task = model.tasks[exported]
            mapped = task.predictions_to_original(predictions[exported], target) or []
            detections.extend(
                (key, pred)
                for key, pred in zip(batch.keys, mapped, strict=True)
                if pred is not None
            )
    return {
        name: {k: float(v) for k, v in metric.compute().items()}
        for name, metric in metrics.items()
        if metric.update_called
    }


class NothingToMeasure(DataError):
    """Some task of an evaluation had nothing valid to score; ``results`` holds the tasks
    that were measured."""

    def __init__(self, path: str | Path, problem: str, results: dict) -> None:
        super().__init__(path, problem)
        self.results = results


def _results_task(names: list[str], tasks: Mapping[str, Task | type[Task]]) -> str | None:
    """The first task of ``names`` whose predictions ``--predictions`` writes (as COCO
    results: ``Task.results_format``), None if none."""
    return next((n for n in names if tasks[n].results_format == "coco"), None)


def is_undefined(value: float) -> bool:
    """NaN (nothing was scored) or -1 (COCO's mark of an undefined AP/AR); the primary metric
    of every task is otherwise >= 0."""
    return math.isnan(value) or value == -1


def check_measured(results: dict[str, dict[str, float]], tasks: dict[str, Task], dataset) -> None:
    """Raise :class:`NothingToMeasure` for each task with no labelled image in the split or
    an undefined primary metric, instead of returning NaN or an empty table."""
    problems, good = [], {}
    for name, task in tasks.items():
        values = results.get(name)
        if values is None:
            problems.append(f"{name}: no image of the split has a {name} label")
        elif is_undefined(values[task.primary_metric]):
            problems.append(f"{name}: nothing valid to measure, {task.nothing_to_measure}")
        else:
            good[name] = values
    if problems:
        raise NothingToMeasure(
            dataset.manifest,
            f"split {dataset.split!r}: " + "; ".join(problems) + " (fix the labels, or "
            "evaluate another split with --split)",
            good,
        )


def format_table(results: dict[str, dict[str, float]]) -> str:
    rows = [("task", "metric", "value")]
    for task, values in results.items():
        for key, value in values.items():
            rows.append((task, key, f"{value:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        "  ".join(
            cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(r)
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _coco_ids(
    dataset: MultiTaskDataset, task: str | None = None
) -> tuple[dict[str, int], dict[int, int]]:
    """(image key -> COCO image id, class index -> COCO category id) from the COCO JSON of
    ``task`` (default: the split's first task written as COCO results), inverting the
    reader's mapping (declared class names, else sorted category ids)."""
    if task is None:
        task = _results_task([t for t in dataset.tasks if t in TASK_TYPES], TASK_TYPES)
    if task is None:
        raise DataError(dataset.manifest, "no task of this split has COCO annotations")
    path = dataset.base / getattr(dataset.source, task).annotations
    raw = json.loads(path.read_bytes())
    cats = {c["id"]: c["name"] for c in raw["categories"]}
    names = dataset.classes[task]
    category: dict[int, int] = {}
    for cid in sorted(cats):
        if cats[cid] in names:
            category.setdefault(names.index(cats[cid]), cid)
    images: dict[str, int] = {}
    for img in raw["images"]:
        name = Path(img["file_name"])
        for alias in (str(name), str(name.with_suffix("")), name.stem):
            images.setdefault(alias, img["id"])
    return images, category


def coco_results(
    dataset: MultiTaskDataset, detections: list[tuple[str, dict]], task: str | None = None
) -> list[dict]:
    """Detections in COCO's results format: ``image_id`` and ``category_id`` as in the
    dataset's COCO JSON, ``bbox`` [x, y, w, h] in the image's own pixels, ``score``."""
    images, category = _coco_ids(dataset, task)
    out = []
    for key, pred in detections:
        image_id = images.get(key, images.get(Path(key).stem))
        if image_id is None:
            raise DataError(dataset.manifest, f"image {key!r} is not in the COCO annotations")
        boxes = pred["boxes"].cpu().double().tolist()
        for (x1, y1, x2, y2), label, score in zip(
            boxes, pred["labels"].tolist(), pred["scores"].tolist(), strict=True
        ):
            out.append(
                {
                    "image_id": image_id,
                    "category_id": category[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return out
