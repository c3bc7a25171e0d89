"""What every task provides. One object per task; adding a task is adding a file with a
subclass decorated with ``must.tasks.register_task``.

A task owns: the sample keys holding its labels, its vocabulary, its head (built on the shared
backbone), batching its labels (images without a label are marked absent), its loss (over
the images that have a label only), its predictions and its metric, and the conversion of its
labels to and from the pseudo-label store (``to_store`` / ``label_to_store`` / ``from_store``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torchmetrics import Metric

from must.features import FeatureSpec


class TaskConfig(BaseModel):
    """Settings of one task's head; each task extends it with its own fields."""

    model_config = ConfigDict(extra="forbid")

    hidden_channels: int | None = None  # pixel heads: width of the hidden convs (None: FPN width)


@dataclass
class Batch:
    """A collated batch: stacked images and one batched target per task (None when no image of
    the batch has that task's label)."""

    # (B, 3, H, W) uint8 from the loaders (the model scales it to [0, 1]; float images in
    # [0, 1] are accepted too)
    images: torch.Tensor
    targets: dict[str, Any]
    keys: list[str]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            images=self.images.to(device),
            targets={k: _to(v, device) for k, v in self.targets.items()},
            keys=self.keys,
        )


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def full_precision(x: torch.Tensor) -> torch.autocast:
    """Autocast off on ``x``'s device, for the numerically sensitive end of a head (output
    layer, resize to the image, loss): inside, ops run in the dtype they are given, so cast
    inputs with ``.float()``. bf16 keeps 8 significant bits and fp16 overflows at 65504;
    this holds under CPU and GPU autocast alike."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class TaskHead(nn.Module):
    """A head: shared features in, (predictions, named loss terms) out.

    ``target`` is None at inference; with a target the head returns its loss terms,
    computed over the images whose label is present only. A batch where no image has the
    label yields zero losses that still touch every parameter (DDP needs that).
    """

    def forward(
        self, feats: dict[str, torch.Tensor], image_size: tuple[int, int], target: Any = None
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def zero_loss(self) -> torch.Tensor:
        return sum(p.sum() for p in self.parameters()) * 0.0


class Task(ABC):
    """One vision task. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    label_keys: ClassVar[tuple[str, ...]]  # sample-dict keys that hold this task's labels
    primary_metric: ClassVar[str]  # the metric checkpoints are selected on
    higher_is_better: ClassVar[bool]
    needs_classes: ClassVar[bool] = True
    config_type: ClassVar[type[TaskConfig]] = TaskConfig

    def __init__(self, classes: list[str] | None = None, config: TaskConfig | None = None) -> None:
        if self.needs_classes and not classes:
            raise ValueError(f"task {self.name!r} needs its list of classes")
        self.classes = list(classes or [])
        self.config = config or self.config_type()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def size_divisor(self) -> int:
        """Padded batches are a multiple of this many pixels (the coarsest stride it reads)."""
        return 32

    def has_label(self, sample: dict) -> bool:
        return self.label_keys[0] in sample

    @abstractmethod
    def build_head(self, features: Mapping[str, FeatureSpec]) -> TaskHead:
        """This task's head, for a backbone publishing ``features`` (name -> channels and
        stride; see ``must.features``); a map the head needs but the backbone lacks is an
        error naming it."""

    @abstractmethod
    def collate(self, samples: list[dict]) -> Any:
        """Batch the labels of ``samples`` (some may lack them); None if none has a label."""

    @abstractmethod
    def new_metric(self) -> Metric:
        """A fresh metric; ``update(predictions, target)``, ``compute() -> dict[str, Tensor]``."""

    def describe(self) -> dict:
        return {"name": self.name, "classes": self.classes, "config": self.config.model_dump()}

    # -- the pseudo-label store (``must label``, ``must.store.StoreDataset``; docs/store.md).
    # ``image_size`` is the image's own (H, W); ``input_size`` the (h, w) the teacher was fed;
    # pixel labels are stored at ``label_size(image_size, settings["label_scale"])``.

    def to_store(
        self,
        prediction: Any,
        image_size: tuple[int, int],
        input_size: tuple[int, int],
        settings: Mapping[str, Any],
    ) -> dict[str, np.ndarray]:
        """One image's teacher prediction (this task's part of ``model(images)`` in eval mode,
        at ``input_size``) -> the store's fields for it, in the stored dtypes."""
        raise NotImplementedError(self._no_store())

    def label_to_store(
        self, sample: Mapping[str, Any], label_size: tuple[int, int]
    ) -> dict[str, np.ndarray] | None:
        """A real label (sample-dict entries, as the readers give them, ids in this task's
        vocabulary) -> the store's fields; None when the sample has no label for this task."""
        raise NotImplementedError(self._no_store())

    def from_store(
        self, fields: Mapping[str, np.ndarray], image_size: tuple[int, int]
    ) -> dict[str, Any]:
        """Stored fields -> the sample-dict entries training reads, at the image's own size."""
        raise NotImplementedError(self._no_store())

    def _no_store(self) -> str:
        return (
            f"task {self.name!r} has no encoding in the pseudo-label store (must-store/1 "
            "stores classification, detection, segmentation and depth)"
        )

    # -- pictures, transforms and evaluation (must.data.show, must.data.transforms,
    # must.training.data, must report, must eval)

    # How dataset pictures show the labels: "overlay" drawn over the image (boxes), "panel" in
    # a panel of its own (blank for a sample without them), None: not drawn there.
    picture: ClassVar[Literal["overlay", "panel"] | None] = None
    # Fill of each dense sample key when a batch of mixed image sizes is padded: a value the
    # loss and the metric ignore.
    pad_fill: ClassVar[Mapping[str, float]] = {}
    # Trained on aspect-preserving resizes of real images of any shape (``data.resize: auto``
    # picks ``keep_aspect`` for a dataset folder) rather than on square crops.
    needs_aspect: ClassVar[bool] = False
    # Why the primary metric can be undefined although labelled images were read (must eval).
    nothing_to_measure: ClassVar[str] = "no label holds a value the metric can score"
    # Sample keys kept untouched at the image's own size for scoring (evaluation transform's
    # ``"original"``), and those of them only evaluation reads (kept out of augmentation).
    original_keys: ClassVar[tuple[str, ...]] = ()
    eval_only_keys: ClassVar[tuple[str, ...]] = ()
    # Format ``must eval --predictions`` writes this task's predictions in (None: not written).
    results_format: ClassVar[str | None] = None

    @classmethod
    def wrap_for_transforms(
        cls, sample: dict[str, Any], *, scales_with_zoom: bool
    ) -> dict[str, Any]:
        """Give this task's entries of ``sample`` (a new dict the caller owns, its image
        already a ``tv_tensors.Image``) the tv_tensor types that ``torchvision.transforms.v2``
        moves with the image; plain tensors would be passed through unmoved. The default
        leaves them alone (labels that no geometric transform changes). ``scales_with_zoom``:
        the pipeline's setting for values that follow the field of view (depth)."""
        return sample

    @classmethod
    def draw(
        cls,
        entries: Mapping[str, Any],
        image: torch.Tensor,
        classes: Sequence[str],
        source_size: tuple[int, int],
    ) -> torch.Tensor | None:
        """A picture of this task's label or prediction in ``entries`` (sample entries at
        ``source_size``, the image's own (H, W)): ``image`` (3, h, w) uint8, the picture's
        image, with the labels drawn over it (``picture == "overlay"``) or a (3, h, w) uint8
        panel of its own (``"panel"``); None when ``entries`` hold nothing to draw."""
        return None

    @classmethod
    def label_text(cls, entries: Mapping[str, Any], classes: Sequence[str]) -> str | None:
        """This task's label in ``entries`` as a short text (for labels without a picture,
        e.g. a class name); None when there is none."""
        return None

    def prediction_entries(
        self, prediction: Any, image_size: tuple[int, int]
    ) -> dict[str, Any] | None:
        """One image's prediction (this task's part of ``model(images)`` in eval mode, at
        ``image_size``) as sample entries, for pictures; None: not shown."""
        return None

    def predictions_to_original(self, predictions: Any, target: Any) -> list[Any] | None:
        """A batch's predictions mapped to each image's own pixels when ``target`` (this
        task's collated target) carries each image's original size; None when it does not."""
        return None


def label_size(image_size: tuple[int, int], scale: float) -> tuple[int, int]:
    """Size (h, w) of a pixel label stored at ``scale`` times an image of ``image_size``:
    each side rounded half up, at least 1."""
    return tuple(max(1, math.floor(s * scale + 0.5)) for s in image_size)  # type: ignore[return-value]
