"""``must teach``: train one specialized teacher (step 1 of MuST)."""

from __future__ import annotations

import json
from pathlib import Path

from must.checkpoint import (
    SUMMARY_FILE,
    check_init,
    initialise,
    save_model,
)
from must.config import TeachConfig, dump_yaml
from must.data.readers import MultiTaskDataset, skip_report
from must.errors import ConfigError
from must.models.model import MultiTaskModel
from must.stages.common import claim_output
from must.summary import RunInfo
from must.tasks import build_task
from must.training.data import make_dataset, make_loader, print_notes, require_task
from must.training.feature_cache import probe_loaders
from must.training.fit import fit_and_test
from must.training.module import MultiTaskModule


def check_classes(dataset: MultiTaskDataset, task: str, classes: list[str], what: str) -> None:
    theirs = dataset.classes.get(task)
    if theirs is not None and list(theirs) != list(classes):
        raise ConfigError(
            f"{dataset.manifest}: the {what} split's {task} classes {theirs} differ from "
            f"the expected {classes}"
        )


def teach(
    cfg: TeachConfig,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    stage: str = "teacher",
) -> dict | None:
    """Train a single-task model for ``cfg.task`` on ``cfg.data``; writes ``model.safetensors`` and
    ``summary.json`` into ``out`` and returns the summary. Re-running the same command
    resumes from the last checkpoint, or returns at once if it had finished.

    ``stage="transfer"`` is ``must transfer``: the backbone comes from ``cfg.init`` and the
    head always starts afresh (even when the checkpoint has a head of the same task).

    Under a multi-process strategy only global rank 0 writes and returns the summary; the
    other processes return None once training is over."""
    out = Path(out)
    if cfg.init is not None:
        check_init(cfg.init)
    if claim_output(out, dump_yaml(cfg), overwrite):
        print(f"{out}: this {stage} run is already trained; nothing to do")
        return json.loads((out / SUMMARY_FILE).read_text())
    root = cfg.data.prepare(progress)
    train_set = make_dataset(root, "train", cfg.data, train=True, tasks=[cfg.task])
    require_task(train_set, cfg.task, f"it has: {', '.join(train_set.tasks) or 'no labels'}")
    classes = train_set.classes.get(cfg.task)
    task = build_task(cfg.task, classes, cfg.model.heads.get(cfg.task))
    splits = train_set.spec.splits
    if "val" not in splits:
        raise ConfigError(f"{train_set.manifest}: a 'val' split is needed to select checkpoints")
    val_set = make_dataset(root, "val", cfg.data, train=False, tasks=[cfg.task])
    check_classes(val_set, cfg.task, task.classes, "val")
    test_set = (
        make_dataset(root, "test", cfg.data, train=False, tasks=[cfg.task])
        if "test" in splits
        else None
    )
    if test_set is not None:
        check_classes(test_set, cfg.task, task.classes, "test")

    read = [d for d in (train_set, val_set, test_set) if d is not None]
    print_notes(read)
    model = MultiTaskModel(cfg.model.backbone, {cfg.task: task})
    started = initialise(model, cfg.init, heads=stage != "transfer") if cfg.init else None
    if cfg.freeze_backbone:
        model.freeze_backbone()
    module = MultiTaskModule(model, cfg.train)
    tasks = model.tasks
    tc = cfg.train
    workers = {"num_workers": cfg.data.num_workers, "accelerator": tc.accelerator}
    # A probe trains and validates from its backbone's features computed once; the test
    # split, read once, goes through the images.
    cached = None
    if cfg.freeze_backbone and cfg.cache_features:
        cached = probe_loaders(model, train_set, val_set, cfg.data, tc, progress)
    if cached is not None:
        train_loader, val_loader, feature_cache = cached
    else:
        feature_cache = None
        train_loader = make_loader(
            train_set, tasks, tc.batch_size, train=True, seed=tc.seed, **workers
        )
        val_loader = make_loader(val_set, tasks, tc.batch_size, train=False, **workers)
    test_loader = (
        make_loader(test_set, tasks, tc.batch_size, train=False, **workers)
        if test_set is not None
        else None
    )
    result = fit_and_test(module, train_loader, val_loader, test_loader, tc, out, progress=progress)
    if result is None:  # another process of a multi-process run: rank 0 finishes it
        return None
    if any(d.skipped for d in read):
        print(skip_report(read))
    info = RunInfo.read(
        {
            "stage": stage,
            "init": started,
            "freeze_backbone": cfg.freeze_backbone,
            # Trained and validated from cached backbone features (None: from images).
            "feature_cache": feature_cache,
            "training": {
                cfg.task: {
                    "dataset": str(root),
                    "dataset_name": train_set.name,
                    "train_images": len(train_set),
                    "batch_size": tc.batch_size,
                    "lr": tc.lr,
                    "image_size": cfg.data.image_size,
                }
            },
            "image_size": cfg.data.image_size,
            # How images were fitted to image_size; must label and must eval do the same.
            "resize": train_set.resize,
            "skipped": [
                {"split": d.split, "path": p, "reason": r} for d in read for p, r in d.skipped
            ],
            **result,
            "config": cfg.model_dump(mode="json"),
        },
        out,
    )
    save_model(model, out, info)
    return json.loads((out / SUMMARY_FILE).read_text())
