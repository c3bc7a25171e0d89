"""Datasets and loaders for training and evaluation, for scene-world styles and real data."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from must.config import AugmentConfig, DataConfig
from must.data.readers import MultiTaskDataset
from must.data.spec import MANIFEST_NAMES
from must.data.transforms import build_transforms
from must.tasks.base import Batch, Task


def is_dataset_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() or any((path / n).is_file() for n in MANIFEST_NAMES)


def prepare_dataset(cfg: DataConfig, progress: bool = True) -> Path:
    """The dataset folder for ``cfg.dataset``: a folder as given, or a style rendered once
    into the cache (reused by every later run with the same settings)."""
    if is_dataset_folder(cfg.dataset):
        return Path(cfg.dataset)
    from must.data.render import render_dataset
    from must.data.styles import load_style

    style = load_style(cfg.dataset)  # refuses unknown names with the list of styles
    out = Path(cfg.cache) / f"{style.name}_n{cfg.num}_px{cfg.render_size}_seed{cfg.render_seed}"
    render_dataset(
        cfg.dataset,
        out,
        cfg.num,
        cfg.render_size,
        seed=cfg.render_seed,
        workers=min(2, torch.get_num_threads()),
        progress=progress,
    )
    return out


class Collator:
    """Stacks images (as floats in [0, 1]) and lets each task batch its own labels."""

    def __init__(self, tasks: dict[str, Task]) -> None:
        self.tasks = tasks

    def __call__(self, samples: list[dict]) -> Batch:
        images = torch.stack([torch.as_tensor(s["image"]) for s in samples]).float() / 255.0
        targets = {}
        for name, task in self.tasks.items():
            target = task.collate(samples)
            if target is not None:
                targets[name] = target
        return Batch(images=images, targets=targets, keys=[s["key"] for s in samples])


def augmentation(aug: AugmentConfig, image_size: int, train: bool):
    """The joint transform for training (random draw) or evaluation (resize) from settings."""
    return build_transforms(
        train,
        image_size,
        scale=aug.scale,
        hflip=aug.hflip,
        color_jitter=aug.color_jitter,
        depth_scales_with_zoom=aug.depth_scales_with_zoom,
    )


def make_dataset(root: Path, split: str, cfg: DataConfig, train: bool) -> MultiTaskDataset:
    transform = augmentation(cfg.augment, cfg.image_size, train)
    return MultiTaskDataset(
        root, split=split, transform=transform, on_error="skip" if cfg.skip_bad else "raise"
    )


def make_loader(
    dataset: Dataset,
    tasks: dict[str, Task],
    batch_size: int,
    num_workers: int,
    train: bool,
    seed: int = 0,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=num_workers,
        collate_fn=Collator(tasks),
        persistent_workers=num_workers > 0,
        generator=generator,
    )
