"""``must train``: the multi-task student on pseudo-labelled stores (step 3 of MuST), and
``must export``: a checkpoint's backbone as a plain state dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, WeightedRandomSampler

from must.checkpoint import FORMAT, SUMMARY_FILE, save_model
from must.config import DataConfig, StudentConfig, dump_yaml
from must.errors import ConfigError
from must.models.backbone import load_resnet_weights
from must.models.model import MultiTaskModel
from must.store.dataset import StoreDataset
from must.tasks import build_task
from must.teach import claim_output
from must.train.data import Collator, augmentation, make_dataset, make_loader
from must.train.fit import fit_and_test
from must.train.module import MultiTaskModule
from must.train.weighting import (
    DynamicWeightAverage,
    FixedWeights,
    LossWeighting,
    UncertaintyWeighting,
    must_weights,
)


def open_stores(cfg: StudentConfig) -> list[StoreDataset]:
    if not cfg.data.stores:
        raise ConfigError("data.stores: give at least one store (--store STORE)")
    transform = augmentation(cfg.data.augment, cfg.data.image_size, train=True)
    stores = [StoreDataset(path, transform) for path in cfg.data.stores]
    first = stores[0]
    for other in stores[1:]:
        for task in set(first.tasks) | set(other.tasks):
            a, b = first.tasks.get(task), other.tasks.get(task)
            if a is None or b is None or a.classes != b.classes:
                raise ConfigError(
                    f"stores {first.root} and {other.root} disagree on {task}: "
                    f"{a.classes if a else 'absent'} vs {b.classes if b else 'absent'}"
                )
    for task in first.tasks:
        counts = [s.store.summary()["tasks"].get(task, {}) for s in stores]
        labelled = sum(c.get("pseudo", 0) + c.get("real", 0) for c in counts)
        if labelled == 0:
            raise ConfigError(f"no image of the joined stores has a {task} label")
    return stores


def teacher_summaries(stores: list[StoreDataset]) -> dict[str, dict[str, Any]]:
    """Per task, the summary of the teacher that labelled it (from the store's header)."""
    out: dict[str, dict[str, Any]] = {}
    for ds in stores:
        for teacher in ds.store.teachers:
            summary_file = Path(teacher["path"])
            summary_file = (
                summary_file.parent if summary_file.name.endswith(".pt") else summary_file
            ) / SUMMARY_FILE
            if not summary_file.is_file():
                continue
            summary = json.loads(summary_file.read_text())
            for task in teacher.get("tasks", []):
                classes = summary["tasks"].get(task, {}).get("classes")
                if classes and classes != ds.tasks[task].classes:
                    raise ConfigError(
                        f"{ds.root}: {task} classes {ds.tasks[task].classes} differ from its "
                        f"teacher's {classes} ({summary_file})"
                    )
                out.setdefault(task, summary)
    return out


def make_weighting(
    cfg: StudentConfig, tasks: list[str], teachers: dict[str, dict]
) -> tuple[LossWeighting, dict]:
    loss = cfg.loss
    if loss.kind == "must":
        missing = [t for t in tasks if t not in teachers and t not in loss.hand]
        if missing:
            raise ConfigError(
                f"loss.kind=must needs each teacher's batch size and learning rate; no teacher "
                f"summary found for {missing} (set loss.hand for them or use another loss.kind)"
            )
        scales = {
            t: (
                teachers[t]["info"]["training"][t]["batch_size"],
                teachers[t]["info"]["training"][t]["lr"],
            )
            for t in tasks
            if t not in loss.hand
        }
        hand = {t: w for t, w in loss.hand.items() if t in tasks}
        weights = must_weights(cfg.train.batch_size, cfg.train.lr, scales, hand)
        return FixedWeights(weights), {"kind": "must", "weights": weights}
    if loss.kind == "equal":
        weights = {t: 1.0 for t in tasks}
        return FixedWeights(weights), {"kind": "equal", "weights": weights}
    if loss.kind == "fixed":
        missing = [t for t in tasks if t not in loss.weights]
        if missing:
            raise ConfigError(f"loss.weights: no weight for {missing}")
        weights = {t: loss.weights[t] for t in tasks}
        return FixedWeights(weights), {"kind": "fixed", "weights": weights}
    if loss.kind == "uncertainty":
        w = UncertaintyWeighting(tasks)
        return w, w.describe()
    w = DynamicWeightAverage(tasks, loss.dwa_temperature, loss.dwa_window)
    return w, w.describe()


def store_sampler(sizes: list[int], weights: list[float], seed: int = 0) -> WeightedRandomSampler:
    """Draw store ``i`` with probability ``weights[i] / sum(weights)`` whatever its size
    (images within a store uniformly); one epoch is as many draws as there are images."""
    if len(weights) != len(sizes) or min(weights) <= 0:
        raise ConfigError(
            f"data.store_weights: one positive weight per store ({len(sizes)} stores), "
            f"got {weights}"
        )
    per_image = torch.cat([torch.full((n,), w / n) for n, w in zip(sizes, weights, strict=True)])
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(per_image, num_samples=len(per_image), generator=generator)


def initialise(model: MultiTaskModel, path: str) -> dict[str, Any]:
    """Start from a must checkpoint (backbone + heads of tasks with the same name and shapes)
    or from a torchvision/timm ResNet state dict (backbone body only)."""
    file = Path(path)
    file = file / "model.pt" if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"init: {path}: no such checkpoint or weights file")
    payload = torch.load(file, map_location="cpu", weights_only=False)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        theirs = payload["state_dict"]
        own = model.state_dict()
        backbone = [k for k in own if k.startswith("backbone.")]
        bad = [k for k in backbone if k not in theirs or theirs[k].shape != own[k].shape]
        if bad:
            raise ConfigError(
                f"init: {file}: its backbone does not fit this model's (e.g. {bad[:3]}); "
                "check model.backbone"
            )
        heads = [
            k
            for k in own
            if k.startswith("heads.") and k in theirs and theirs[k].shape == own[k].shape
        ]
        model.load_state_dict({k: theirs[k] for k in backbone + heads}, strict=False)
        tasks = sorted({k.split(".")[1] for k in heads})
        return {"from": str(file), "backbone": True, "heads": tasks}
    load_resnet_weights(model.backbone.body, file)
    return {"from": str(file), "backbone": "body only", "heads": []}


def train_student(
    cfg: StudentConfig, out: str | Path, overwrite: bool = False, progress: bool = True
) -> dict:
    """Train the student; writes ``model.pt`` and ``summary.json`` into ``out``."""
    out = Path(out)
    if claim_output(out, dump_yaml(cfg), overwrite):
        print(f"{out}: this student is already trained; nothing to do")
        return json.loads((out / SUMMARY_FILE).read_text())
    stores = open_stores(cfg)
    names = list(stores[0].tasks)
    teachers = teacher_summaries(stores)
    weighting, resolved = make_weighting(cfg, names, teachers)
    print(f"loss weighting: {resolved}")
    tasks = {
        n: build_task(stores[0].tasks[n].name, stores[0].tasks[n].classes, cfg.model.heads.get(n))
        for n in names
    }
    model = MultiTaskModel(cfg.model.backbone, tasks)
    started = initialise(model, cfg.init) if cfg.init else None

    tc = cfg.train
    joined = ConcatDataset(stores)
    sampler = None
    if cfg.data.store_weights is not None:
        sampler = store_sampler([len(s) for s in stores], cfg.data.store_weights, tc.seed)
    train_loader = DataLoader(
        joined,
        batch_size=tc.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(joined) >= tc.batch_size,
        num_workers=cfg.data.num_workers,
        collate_fn=Collator(tasks),
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(tc.seed),
    )

    # Checkpoints are selected on, and finally tested on, each teacher's own val/test splits.
    val_loaders, test_loaders, eval_sets = [], [], {}
    for name in names:
        if name not in teachers:
            continue
        dataset = teachers[name]["info"]["training"][name]["dataset"]
        dcfg = DataConfig(dataset=dataset, image_size=cfg.data.image_size)
        for split, loaders in (("val", val_loaders), ("test", test_loaders)):
            ds = make_dataset(Path(dataset), split, dcfg, train=False)
            loaders.append(make_loader(ds, {name: tasks[name]}, tc.batch_size, 0, False))
        eval_sets[name] = dataset
    if not val_loaders:
        raise ConfigError(
            "no teacher dataset found to validate the student on (stores name no teacher "
            "with a summary.json)"
        )
    module = MultiTaskModule(model, tc, weighting)
    result = fit_and_test(module, train_loader, val_loaders, test_loaders, tc, out, progress)
    info: dict[str, Any] = {
        "stage": "student",
        # As a teacher for a next round, the student's scale is the same for every task.
        "training": {
            n: {
                "dataset": [str(s.root) for s in stores],
                "train_images": len(joined),
                "batch_size": tc.batch_size,
                "lr": tc.lr,
                "image_size": cfg.data.image_size,
            }
            for n in names
        },
        "image_size": cfg.data.image_size,
        "loss_weighting": resolved | {"final": weighting.describe()},
        "init": started,
        "evaluated_on": eval_sets,
        **result,
        "config": cfg.model_dump(mode="json"),
    }
    save_model(model, out, info)
    return json.loads((out / SUMMARY_FILE).read_text())


def export_backbone(checkpoint: str | Path, out: str | Path, with_fpn: bool = False) -> Path:
    """Write a checkpoint's ResNet (torchvision/timm key names) as safetensors."""
    from safetensors.torch import save_file

    from must.checkpoint import load_model

    model, _ = load_model(checkpoint)
    state = {f"{k}": v for k, v in model.backbone.body.state_dict().items()}
    if with_fpn:
        state |= {f"fpn.{k}": v for k, v in model.backbone.fpn.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
