"""Cached backbone features for probes.

With a frozen backbone (``freeze_backbone``: ``must transfer --probe``, an experiment's probe
runs) the feature maps of an image never change, so they are computed once per image and the
head trains from them: a training step costs the head's forward and backward only, so a probe
can train as long as it needs. The cache holds every map the backbone publishes (``c5``,
``p2``-``p7``, ``fused``; whichever a head reads) in float32, in memory, plus each image's
transformed sample without its pixels (labels, key); batches come out as :class:`Batch` with
``features`` set and a placeholder for the images (their size only).

The training images are cached in the evaluation transform's view (resized, no random crop,
flip or colour jitter): one fixed view per image, the usual linear-probe protocol. Fine-tuning
never uses the cache.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from must.config import DataConfig, TrainConfig
from must.data.readers import MultiTaskDataset
from must.errors import MustError
from must.models.backbone import Backbone
from must.models.model import MultiTaskModel
from must.tasks.base import Batch, Task, placeholder_images
from must.training.data import Collator, augmentation, make_loader
from must.training.fit import _quiet_lightning


class SplitNotCached(MustError):
    """A split whose features cannot be cached (its images differ in size)."""


class FeatureCache(Dataset):
    """The cached features of one split: ``features`` maps each map name to a float32
    (N, C, h, w) tensor, ``samples[i]`` is image i's transformed sample without ``"image"``;
    every image is ``image_size`` (H, W). Item i is ``samples[i]`` plus ``"features"``
    (name -> (C, h, w)); batch them with :class:`CachedCollator`."""

    def __init__(
        self,
        features: dict[str, torch.Tensor],
        samples: list[dict[str, Any]],
        image_size: tuple[int, int],
    ) -> None:
        self.features = features
        self.samples = samples
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.samples[index], "features": {n: f[index] for n, f in self.features.items()}}

    @property
    def megabytes(self) -> float:
        """Memory of the feature maps, in MB (2**20 bytes); the samples' labels not counted."""
        return sum(f.numel() * f.element_size() for f in self.features.values()) / 2**20


class CachedCollator(Collator):
    """Batches of a :class:`FeatureCache`: the features stacked, each task's labels batched
    as :class:`Collator` does, and a placeholder of the images' size in place of pixels."""

    def __init__(self, tasks: dict[str, Task], image_size: tuple[int, int]) -> None:
        super().__init__(tasks)
        self.image_size = image_size

    def __call__(self, samples: list[dict]) -> Batch:
        features = {
            name: torch.stack([s["features"][name] for s in samples])
            for name in samples[0]["features"]
        }
        return Batch(
            images=placeholder_images(len(samples), self.image_size),
            targets=self.targets(samples),
            keys=[s["key"] for s in samples],
            features=features,
        )


def _images_apart(
    samples: list[dict],
) -> tuple[torch.Tensor | None, list[tuple[int, int]], list[dict]]:
    """Collate for caching: the stacked images (None when their sizes differ), each image's
    size, and the samples without their images. A module-level function: workers pickle it."""
    sizes = [(int(s["image"].shape[-2]), int(s["image"].shape[-1])) for s in samples]
    images = None
    if len(set(sizes)) == 1:
        images = torch.stack(
            [torch.as_tensor(s["image"]).as_subclass(torch.Tensor) for s in samples]
        )
    rest = [{k: v for k, v in s.items() if k != "image"} for s in samples]
    return images, sizes, rest


def cache_features(
    backbone: Backbone,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str,
    num_workers: int | str = 0,
    what: str = "the split",
    progress: bool = True,
) -> FeatureCache:
    """Every map ``backbone`` publishes for every sample of ``dataset`` (sample dicts with a
    uint8 ``"image"``, already transformed), computed in eval mode under
    ``torch.inference_mode()`` on ``device`` in batches of ``batch_size``, kept in float32 on
    the CPU. The backbone's mode and device are restored after. Raises
    :class:`SplitNotCached` when the images differ in size (``what`` names the split)."""
    device = torch.device(device)
    loader = make_loader(
        dataset,
        None,
        batch_size,
        num_workers,  # type: ignore[arg-type]
        train=False,
        accelerator=device,
        collate_fn=_images_apart,
    )
    was_training = backbone.training
    home = next(backbone.parameters()).device
    backbone.eval().to(device)
    features: dict[str, torch.Tensor] = {}
    samples: list[dict[str, Any]] = []
    size: tuple[int, int] | None = None
    bar = tqdm(total=len(dataset), desc="caching features", unit="img", disable=not progress)  # type: ignore[arg-type]
    try:
        for images, sizes, rest in loader:
            size = size or sizes[0]
            other = next((s for s in sizes if s != size), None)
            if images is None or other is not None:
                raise SplitNotCached(
                    f"the images of {what} differ in size ({size[0]}x{size[1]} and "
                    f"{other[0]}x{other[1]} pixels)"
                )
            with torch.inference_mode():
                maps = backbone(images.to(device))
            if not features:  # sizes known now: one tensor per map for the whole split
                n = len(dataset)  # type: ignore[arg-type]
                features = {
                    name: torch.empty((n, *m.shape[1:]), dtype=torch.float32)
                    for name, m in maps.items()
                }
            start = len(samples)
            for name, m in maps.items():
                # A copy outside inference mode: the cache is made of normal tensors, which
                # autograd may save for the head's backward.
                features[name][start : start + len(rest)].copy_(m)
            samples.extend(rest)
            bar.update(len(rest))
    finally:
        bar.close()
        backbone.train(was_training).to(home)
    if size is None:
        raise SplitNotCached(f"{what} has no image")
    return FeatureCache(features, samples, size)


def training_processes(cfg: TrainConfig) -> tuple[int, torch.device]:
    """How many processes training runs in under ``cfg`` (accelerator, devices, strategy,
    or torchrun's environment) and the device of this one, as Lightning's Trainer resolves
    them."""
    _quiet_lightning()
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return int(trainer.world_size), trainer.strategy.root_device


def fixed_view(dataset: MultiTaskDataset, data: DataConfig) -> MultiTaskDataset:
    """``dataset`` (a training split) seen through the evaluation transform: each image
    resized as for evaluation, no random augmentation, nothing kept for scoring at the
    image's own size, no instance masks (only the random crop reads them)."""
    view = copy.copy(dataset)
    transform = augmentation(data.augment, data.image_size, train=False, resize=dataset.resize)
    transform.keep_original = False
    view.transform = transform
    view.masks = False
    return view


def probe_loaders(
    model: MultiTaskModel,
    train_set: MultiTaskDataset,
    val_set: MultiTaskDataset,
    data: DataConfig,
    train: TrainConfig,
    progress: bool = True,
) -> tuple[DataLoader, DataLoader, dict[str, Any]] | None:
    """Training and validation loaders over cached features of ``train_set`` (in its
    :func:`fixed_view`) and ``val_set`` for a probe of ``model`` (frozen backbone), and what
    the summary records of the cache; None, with one line on stdout saying why, when the
    cache cannot be used (training runs in several processes, or a split's images differ in
    size). The training loader is shuffled with ``train.seed`` as the image loader is."""
    processes, device = training_processes(train)
    if processes > 1:
        print(
            f"feature cache not used: training runs in {processes} processes; "
            "the probe trains from images"
        )
        return None
    caches = {}
    try:
        # The smaller split first: a split of mixed sizes is found sooner.
        for split, dataset in (("val", val_set), ("train", fixed_view(train_set, data))):
            caches[split] = cache_features(
                model.backbone,
                dataset,
                batch_size=train.batch_size,
                device=device,
                num_workers=data.num_workers,
                what=f"{dataset.name} [{split}]",
                progress=progress,
            )
    except SplitNotCached as why:
        print(f"feature cache not used: {why}; the probe trains from images")
        return None
    megabytes = sum(c.megabytes for c in caches.values())
    print(
        f"feature cache: {len(caches['train'])} train and {len(caches['val'])} val images, "
        f"{megabytes:.1f} MB (float32, in memory)"
    )
    tasks = model.tasks
    loaders = [
        make_loader(
            caches[split],
            tasks,
            train.batch_size,
            0,  # in memory already: worker processes would only copy it
            train=split == "train",
            seed=train.seed,
            accelerator=device,
            what=f"{train_set.manifest}: split 'train'",
            collate_fn=CachedCollator(tasks, caches[split].image_size),
        )
        for split in ("train", "val")
    ]
    info = {
        "train_images": len(caches["train"]),
        "val_images": len(caches["val"]),
        "mb": round(megabytes, 3),
    }
    return loaders[0], loaders[1], info
