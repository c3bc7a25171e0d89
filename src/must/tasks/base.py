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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torchmetrics import Metric

from must.errors import ConfigError
from must.features import FeatureSpec


class TaskConfig(BaseModel):
    """Settings of one task's head; each task extends it with its own fields."""

    model_config = ConfigDict(extra="forbid")

    hidden_channels: int | None = None  # pixel heads: width of the hidden convs (None: FPN width)


@dataclass
class Batch:
    """A collated batch: stacked images and one batched target per task (None when no image of
    the batch has that task's label), and optionally the backbone's feature maps of the images
    (a frozen backbone's, computed once: ``must.training.feature_cache``)."""

    # (B, 3, H, W) uint8 from the loaders (the model scales it to [0, 1]; float images in
    # [0, 1] are accepted too). With ``features`` only its shape is read (the image size), and
    # it may be a placeholder without pixels (:func:`placeholder_images`).
    images: torch.Tensor
    targets: dict[str, Any]
    keys: list[str]
    # Map name -> (B, C, h, w), as the backbone publishes them; given, the model reads these
    # instead of running its backbone.
    features: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            images=_images_to(self.images, device),
            targets={k: _to(v, device) for k, v in self.targets.items()},
            keys=self.keys,
            features=None if self.features is None else _to(self.features, device),
        )


def placeholder_images(batch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """A (B, 3, H, W) uint8 tensor of zeros that stores one element (every stride 0): the
    image size of a batch of cached features, without pixels."""
    return torch.zeros((), dtype=torch.uint8).expand(batch_size, 3, *size)


def _images_to(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    # ``Tensor.to`` would allocate every pixel of a placeholder on the device.
    if images.numel() > 1 and all(s == 0 for s in images.stride()):
        return images.new_zeros((), device=device).expand(images.shape)
    return images.to(device)


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
    # The loss weight MuST sets by hand for this task instead of its linear-scaling rule
    # (``loss.hand``'s default); None: the rule decides.
    must_hand_weight: ClassVar[float | None] = None

    # -- label files: what the dataset readers and the renderer (``must.data``, docs/data.md)
    # ask of a task. ``source`` is the task's entry of a split in the dataset description
    # (format and settings), ``image_size`` an image's (W, H), ``options`` the renderer's
    # ``WriteOptions``, ``sample`` a rendered scene (``must.data.sample.SceneSample``).
    # Labels in COCO instances: "instances" (boxes, masks) or "class_map" (rasterised); None: no.
    coco_labels: ClassVar[str | None] = None
    # The settings of the task's entry in a split of a dataset description (a pydantic model:
    # format, folder or file, encoding); None: the task has no dataset files.
    source_type: ClassVar[type[BaseModel] | None] = None
    # The scene world's vocabulary this task's rendered labels index: "categories" (the
    # objects) or "stuff_and_categories" (stuff classes, then the objects); None: no classes.
    scene_vocabulary: ClassVar[Literal["categories", "stuff_and_categories"] | None] = None

    @classmethod
    def file_hook_missing(cls, hook: str) -> str:
        return (
            f"task {cls.name!r} has no {hook} hook: its labels cannot be read from or "
            "written to dataset files"
        )

    @classmethod
    def label_file_suffix(cls, source: Any) -> str:
        """The extension of this task's label files under ``source``."""
        return ".npy" if getattr(source, "format", "png") == "npy" else ".png"

    @classmethod
    def read_label_file(
        cls, path: Path, image_size: tuple[int, int], source: Any, classes: list[str]
    ) -> dict[str, np.ndarray]:
        """One image's label file -> its label entries as NumPy arrays (sample-dict keys);
        raises ``DataError`` naming the file."""
        raise NotImplementedError(cls.file_hook_missing("read_label_file"))

    @classmethod
    def label_entries(cls, labels: Mapping[str, Any], canvas_size: tuple[int, int]) -> dict:
        """The NumPy label entries a reader decoded -> the sample-dict entries (tensors) of an
        image of ``canvas_size`` (H, W)."""
        return {k: torch.as_tensor(v) for k, v in labels.items() if k in cls.label_keys}

    @classmethod
    def rendered_image_folder(cls, sample: Any, options: Any, where: Path) -> str | None:
        """The folder under ``images/{split}`` a rendered image goes in (None: no folder)."""
        return None

    @classmethod
    def image_folder_names(cls, classes: list[str]) -> list[str]:
        """Every folder ``rendered_image_folder`` may choose, for ``classes``."""
        return []

    @classmethod
    def check_render_options(cls, classes: list[str], options: Any) -> None:
        """Refuse (``ConfigError``) render options this task cannot write."""
        return None  # nothing to refuse unless the task says so

    @classmethod
    def write_label_file(
        cls, sample: Any, root: Path, split: str, key: str, options: Any, where: Path
    ) -> dict:
        """Write one rendered sample's label file(s) of this task under ``root``; returns what
        ``rendered_source`` / ``rendered_format`` need of it later (picklable)."""
        raise NotImplementedError(cls.file_hook_missing("write_label_file"))

    @classmethod
    def rendered_source(
        cls, split: str, records: list[dict], root: Path, options: Any
    ) -> dict[str, Any]:
        """The task's source of ``split`` in the rendered dataset's description (writing the
        split's shared label files, if any, from ``records``)."""
        raise NotImplementedError(cls.file_hook_missing("rendered_source"))

    @classmethod
    def rendered_format(cls, records: Mapping[str, list[dict]], options: Any) -> Any:
        """How the renderer encodes this task's labels (the manifest's ``meta.formats``)."""
        raise NotImplementedError(cls.file_hook_missing("rendered_format"))

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
            f"task {self.name!r} has no encoding in the pseudo-label store (the task class "
            "sets no store_encoding)"
        )

    # -- store and labelling: the store encoding and its checks, ``must label``'s settings,
    # real-label class remapping, ``must label stats`` / ``show``

    # The fields stored per image (name -> dtype: float16, float32, int16 or uint8) plus the
    # header keys that say how to read them (docs/store.md); None: not stored.
    store_encoding: ClassVar[dict[str, Any] | None] = None
    # A pydantic model of this task's ``must label`` settings (defaults given once, there);
    # its values go into the store header's ``settings``. None: no settings.
    label_settings_type: ClassVar[type[BaseModel] | None] = None

    @classmethod
    def has_store_encoding(cls) -> bool:
        return cls.store_encoding is not None

    @classmethod
    def check_store_classes(cls, where: str, classes: list[str] | None) -> None:
        """Refuse (ConfigError, prefixed ``where``) a class list this task cannot store."""
        if cls.needs_classes and not classes:
            raise ConfigError(f"{where}.classes: a {cls.name} task needs classes")

    def check_store_fields(
        self, check: StoreCheck, task: str, given: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        """One image's fields (``given``, for the store task named ``task``) -> the arrays to
        store, in their dtypes; ``check.fail(message)`` for what breaks the format. The
        default casts each field to its dtype (``check.array``) and checks nothing else."""
        if self.store_encoding is None:
            raise NotImplementedError(self._no_store())
        fields = self.store_encoding["fields"]
        return {f: check.array(given[f], task, f, dtype) for f, dtype in fields.items()}

    def remap_classes(
        self, sample: dict[str, Any], lut: np.ndarray, ignore_index: int
    ) -> dict[str, Any]:
        """A real label's class ids through ``lut`` (dataset id -> this task's id); pixels
        equal to ``ignore_index`` become the store's 255. Default: no class ids to remap."""
        return sample

    def store_stats(self) -> StoreStats:
        """An accumulator of this task's ``must label stats`` figures over stored fields."""
        return StoreStats()

    @classmethod
    def format_store_stats(cls, stats: Mapping[str, Any]) -> list[str]:
        """The lines ``must label stats`` prints under the task for ``StoreStats.result()``."""
        return []

    def store_lines(self, sample: Mapping[str, Any]) -> list[str]:
        """Text lines about this task's label in a sample (``must label show``'s text panel)."""
        return []

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

    # -- per-image test records (``must.records``; the test pass writes them, ``must report``
    # resamples them)

    def image_records(
        self, predictions: Any, target: Any
    ) -> list[dict[str, np.ndarray] | None] | None:
        """One batch's predictions and collated target -> per image of the batch, what it adds
        to the primary metric (field -> array of at least one dimension, the same fields for
        every image), None for an image without this task's label; None: the task keeps no
        records (the default)."""
        return None

    @classmethod
    def records_metric(
        cls, records: list[dict[str, np.ndarray]]
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Every image's record -> ``f(weights)``: ``weights`` is (R, N) non-negative image
        multiplicities, the result the (R,) values of the primary metric computed as if
        image ``i`` appeared ``weights[r, i]`` times. All-ones weights give what
        ``new_metric()`` computes on those images."""
        raise NotImplementedError(
            f"task {cls.name!r} keeps no per-image records: its primary metric cannot be "
            "recomputed on re-weighted test images"
        )


def label_size(image_size: tuple[int, int], scale: float) -> tuple[int, int]:
    """Size (h, w) of a pixel label stored at ``scale`` times an image of ``image_size``:
    each side rounded half up, at least 1."""
    return tuple(max(1, math.floor(s * scale + 0.5)) for s in image_size)  # type: ignore[return-value]


class StoreCheck(Protocol):
    """What a task's ``check_store_fields`` is given by the store writer."""

    def fail(self, what: str) -> Exception:
        """The error to raise for one image's bad field (it names the shard and the key)."""

    def array(
        self, value: Any, task: str, name: str, dtype: str, ndim: int | None = None
    ) -> np.ndarray:
        """``value`` as a contiguous ``dtype`` array with ``ndim`` dimensions (floats cast and
        checked finite, integers checked in range), or ``fail``."""


class StoreStats:
    """Accumulates one task's statistics over a store's records: ``add`` each record's
    fields, then ``result()`` (JSON-able). The base counts nothing."""

    def add(self, fields: Mapping[str, np.ndarray], origin: str) -> None:
        """One record's stored fields; ``origin`` is ``"pseudo"`` or ``"real"``."""

    def result(self) -> dict[str, Any]:
        return {}


def stat_text(value: float | None, digits: int = 3) -> str:
    """A statistic as ``must label stats`` prints it: ``-`` when there is none."""
    return "-" if value is None else f"{value:.{digits}f}"
