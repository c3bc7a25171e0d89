"""Datasets and loaders for training and evaluation, for scene-world styles and real data."""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as TF
from torch.utils.data import DataLoader, Dataset, Sampler

from must.config import AugmentConfig, DataConfig
from must.data.readers import MultiTaskDataset
from must.data.source import is_dataset_folder
from must.data.transforms import build_transforms
from must.errors import ConfigError, DataError
from must.tasks import TASK_TYPES
from must.tasks.base import Batch, Task


def _pad_fill() -> dict[str, float]:
    """Fill of each dense key when a batch is padded: nothing a loss or metric counts (a
    black image; each task's own fill, ``Task.pad_fill``)."""
    fill: dict[str, float] = {"image": 0}
    for kind in TASK_TYPES.values():
        fill.update(kind.pad_fill)
    return fill


def pad_samples(samples: list[dict], divisor: int) -> list[dict]:
    """Images of different sizes (aspect-preserving resize) padded at the bottom and right
    to one size, each side rounded up to a multiple of ``divisor`` (the largest stride the
    model uses), as torchvision's ``GeneralizedRCNNTransform`` batches them. Boxes keep
    their coordinates. Batches of one size are returned unchanged."""
    sizes = {tuple(s["image"].shape[-2:]) for s in samples}
    if len(sizes) == 1:
        return samples
    height = math.ceil(max(h for h, _ in sizes) / divisor) * divisor
    width = math.ceil(max(w for _, w in sizes) / divisor) * divisor
    out = []
    for s in samples:
        s = dict(s)
        for key, fill in _pad_fill().items():
            if key in s:
                t = torch.as_tensor(s[key]).as_subclass(torch.Tensor)
                pad = (0, width - t.shape[-1], 0, height - t.shape[-2])
                s[key] = TF.pad(t, pad, value=fill)
        out.append(s)
    return out


class Collator:
    """Stacks images (uint8, as read; mixed sizes padded, see :func:`pad_samples`) and lets
    each task batch its own labels. Images stay uint8 across the loader's process boundary,
    a quarter of the bytes of floats; the model scales them to [0, 1] (``Backbone``)."""

    def __init__(self, tasks: dict[str, Task]) -> None:
        self.tasks = tasks
        self.divisor = max([32, *(t.size_divisor for t in tasks.values())])

    def __call__(self, samples: list[dict]) -> Batch:
        samples = pad_samples(samples, self.divisor)
        images = torch.stack(
            [torch.as_tensor(s["image"]).as_subclass(torch.Tensor) for s in samples]
        )
        return Batch(images=images, targets=self.targets(samples), keys=[s["key"] for s in samples])

    def targets(self, samples: list[dict]) -> dict[str, Any]:
        """Each task's batched labels of ``samples``; tasks none of them labels are left out."""
        targets = {}
        for name, task in self.tasks.items():
            target = task.collate(samples)
            if target is not None:
                targets[name] = target
        return targets


def augmentation(aug: AugmentConfig, image_size: int, train: bool, resize: str = "square"):
    """The joint transform for training (random draw) or evaluation (resize) from settings."""
    return build_transforms(
        train,
        image_size,
        resize=resize,
        scale=aug.scale,
        hflip=aug.hflip,
        color_jitter=aug.color_jitter,
        depth_scales_with_zoom=aug.depth_scales_with_zoom,
    )


def make_dataset(
    root: Path, split: str, cfg: DataConfig, train: bool, tasks: list[str] | None = None
) -> MultiTaskDataset:
    """A split's reader, cut to ``cfg.subset`` (said on stdout; ``dataset.subset`` has the
    counts); in skip mode (``cfg.skip_bad``) a split left with no sample stops here with the
    first reasons, not later in the loader. ``tasks``: what the run trains or scores (default:
    every task the split has), which decides ``data.resize: auto`` (``dataset.resize``)."""
    dataset = MultiTaskDataset(
        root,
        split=split,
        on_error="skip" if cfg.skip_bad else "raise",
        subset=cfg.subset_of(split),
        subset_seed=cfg.subset_seed,
    )
    # The resize mode depends on what the dataset holds, so the transform comes after it.
    dataset.resize = resize_mode(cfg, dataset, tasks)
    # Instance masks only feed the random crop, which drops boxes whose object it cut away.
    dataset.masks = train and dataset.resize == "square"
    dataset.transform = augmentation(cfg.augment, cfg.image_size, train, dataset.resize)
    if dataset.subset is not None:
        print(f"{dataset.name} [{split}]: {dataset.subset_text} (data.subset)")
    default_num = DataConfig.model_fields["num"].default
    if is_dataset_folder(cfg.dataset) and cfg.num != default_num and split == "train":
        dataset.notes.append(
            f"data.num ({cfg.num}) counts the images rendered from a style; a dataset folder "
            "is used whole: set data.subset to train on part of it"
        )
    if len(dataset) == 0:
        reasons = "; ".join(f"{p}: {r}" for p, r in dataset.skipped[:3])
        more = f" (and {len(dataset.skipped) - 3} more)" if len(dataset.skipped) > 3 else ""
        raise DataError(
            dataset.manifest,
            f"all {dataset.num_found} samples of split {split!r} were dropped: {reasons}{more}",
        )
    return dataset


def resize_mode(cfg: DataConfig, dataset: MultiTaskDataset, tasks: list[str] | None = None) -> str:
    """``data.resize``, with ``auto`` resolved: aspect-preserving when the run trains (or
    scores) a task that needs it (``Task.needs_aspect``: detection) on a dataset folder of
    real images (any shape), square otherwise: styles render square images, and the other
    tasks train on square crops whatever else the folder labels."""
    if cfg.resize != "auto":
        return cfg.resize
    rendered = "render" in dataset.spec.meta
    used = dataset.tasks if tasks is None else [t for t in tasks if t in dataset.tasks]
    aspect = any(TASK_TYPES[t].needs_aspect for t in used if t in TASK_TYPES)
    return "keep_aspect" if aspect and not rendered else "square"


def require_task(dataset: MultiTaskDataset, task: str, what: str) -> None:
    """Refuse a split without ``task``'s labels, saying why when its label file was unusable
    (skip mode keeps going without it)."""
    if task in dataset.tasks:
        return
    why = dataset.unusable.get(task)
    raise ConfigError(
        f"{dataset.manifest}: the {dataset.split} split has no {task} labels "
        + (f"(its annotation file is unusable: {why})" if why else f"({what})")
    )


def print_notes(datasets: list[MultiTaskDataset]) -> None:
    """Print the warnings of the datasets a run reads (data that is legal but suspicious)."""
    for ds in datasets:
        for note in ds.notes:
            print(f"warning: {ds.name} [{ds.split}]: {note}")


def check_train_size(size: int, batch_size: int, what: str) -> bool:
    """Whether to drop the last training batch. BatchNorm cannot normalise a batch of one
    image, so a partial last batch is dropped (a set smaller than a batch is one batch) and a
    set of one image, or batches of one, are refused."""
    if batch_size < 2:
        raise ConfigError(
            f"train.batch_size is {batch_size}; training needs at least 2 images per batch "
            "(BatchNorm cannot normalise a batch of one image)"
        )
    if size < 2:
        raise ConfigError(
            f"{what} has {size} image(s); training needs at least 2 (BatchNorm cannot "
            "normalise a batch of one image)"
        )
    return size >= batch_size


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset``
    narrow), not every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(setting: int | Literal["auto"]) -> int:
    """``data.num_workers``: an int as given; ``auto``: half the usable CPUs, at most 8, and
    none on two CPUs or fewer.

    A loader worker is a process decoding and augmenting images next to the training step's
    compute threads; on a machine with few cores it takes cores from them, so loading stays
    in the main process there. This rule is the one place to change when measurements
    (0 vs 1 worker on a two-core machine, say) call for another."""
    if setting != "auto":
        return int(setting)
    cpus = usable_cpus()
    return 0 if cpus <= 2 else min(8, cpus // 2)


def worker_context(
    accelerator: str | torch.device, num_workers: int
) -> multiprocessing.context.BaseContext | None:
    """How loader workers start, for a process that computes on ``accelerator`` (a Lightning
    accelerator name such as ``auto``/``gpu``/``cpu``, or a device). Every DataLoader of the
    package takes its ``multiprocessing_context`` from here.

    CPU: None, the platform's default (``fork`` on Linux: workers start at once and share
    the parent's memory). Any other device: ``forkserver``. A process that has used CUDA
    holds a driver context and driver threads that a forked child inherits in an undefined
    state ("DataLoader worker exited unexpectedly"); forkserver workers are forked from a
    clean server process that never touched the GPU. The server imports this module (and so
    torch) once, so each worker starts without importing torch again. Everything a worker
    receives (dataset, transforms, collate function) is pickled."""
    if num_workers == 0:
        return None  # DataLoader refuses a start method without worker processes
    kind = accelerator.type if isinstance(accelerator, torch.device) else str(accelerator)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


@contextmanager
def one_compute_thread() -> Iterator[None]:
    """Torch ops inside run on one compute thread; the count is restored on leaving (it is
    per thread once set, and the default of threads started later)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class OneThread(Dataset):
    """Samples prepared in the training process (no loader workers) with one compute thread,
    as a worker prepares them: per-image ops on small images (a 64 px crop, a colour jitter)
    split over several threads spend more time starting them than computing (five times
    slower with two threads than with one, measured on a two-core CPU)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with one_compute_thread():
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def make_loader(
    dataset: Dataset,
    tasks: dict[str, Task] | None,
    batch_size: int,
    num_workers: int | Literal["auto"],
    train: bool,
    seed: int = 0,
    *,
    accelerator: str | torch.device = "auto",
    sampler: Sampler | None = None,
    what: str | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """The loader of every training and evaluation run: batches through :class:`Collator`
    (``tasks``; None: the default collate; ``collate_fn`` replaces both), shuffled when
    ``train`` (unless a ``sampler``
    draws the order), the last partial training batch dropped (``what`` names the set in
    the refusal of :func:`check_train_size`). ``num_workers`` is resolved by
    :func:`resolve_workers`; workers persist across epochs and start as
    :func:`worker_context` says for ``accelerator``. ``seed`` seeds the shuffle and the
    workers' augmentation seeds."""
    generator = torch.Generator().manual_seed(seed)
    workers = resolve_workers(num_workers)
    drop_last = False
    if train:
        if what is None:
            what = "the training set"
            if isinstance(dataset, MultiTaskDataset):
                what = f"{dataset.manifest}: split {dataset.split!r}"
        drop_last = check_train_size(len(dataset), batch_size, what)
    return DataLoader(
        dataset if workers > 0 else OneThread(dataset),
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate_fn or (Collator(tasks) if tasks is not None else None),
        persistent_workers=workers > 0,
        multiprocessing_context=worker_context(accelerator, workers),
        generator=generator,
    )
