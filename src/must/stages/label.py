"""``must label``: run the teachers over one shared image set and write a pseudo-label store
(step 2 of MuST). How to use it: ``docs/labeling.md``; the store's format: ``docs/store.md``.

The pipeline, per process:

- the image list (keys = file stems, ordered as the readers order them) is cut into shards of
  ``shard_size``; process ``rank`` of ``world_size`` takes the shards ``i % world_size ==
  rank`` that are not done yet (a resumed run skips the done ones);
- DataLoader workers decode each image and resize it to every teacher's input size (the
  ``info.image_size`` it was trained on); batches never span two shards, so a shard's labels
  do not depend on which process made them or whether the run was resumed;
- each teacher runs once per batch in eval mode under ``torch.inference_mode`` (autocast on
  CUDA only) and labels all its tasks in that one pass;
- a background thread turns predictions into store fields (``Task.to_store``: thresholds,
  temperature, resizing back to the image's own size times ``label_scale``), puts real labels
  in where ``keep_real`` asks for them, and writes each shard once all its images are in;
- every process finalizes at the end; the manifest is complete once all shards exist.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from must.checkpoint import load_model, resolve_model_file
from must.data.readers import (
    IMAGE_EXTENSIONS,
    MultiTaskDataset,
    image_keys,
    read_image,
    walk_files,
)
from must.data.source import DataSource, as_source, is_dataset_folder
from must.errors import ConfigError, DataError
from must.files import file_sha256
from must.models.model import MultiTaskModel
from must.store import IGNORE_INDEX, PseudoLabelStore, Record
from must.store.dataset import image_locations, write_image_locations
from must.store.shards import HEADER_FILE, KEYS_FILE, sidecar_name
from must.store.tasks import ShardWriter, encodings, task_checkers
from must.summary import run_info
from must.tasks import TASK_TYPES
from must.tasks.base import Task, label_size
from must.training.data import one_compute_thread, pad_samples, worker_context

DEFAULT_BATCH_SIZE = 64
# Beside a teacher's predictions: the (height, width) its padded keep-aspect batch had.
PADDED_INPUT = "padded_input_size"


# --------------------------------------------------------------------------- settings


def label_setting_defaults() -> dict[str, Any]:
    """Every task's labelling settings with their defaults (``Task.label_settings_type``), in
    task registry order: what ``must label`` uses when a setting is not given."""
    out: dict[str, Any] = {}
    for kind in TASK_TYPES.values():
        if kind.label_settings_type is not None:
            out.update(kind.label_settings_type().model_dump())
    return out


class LabelSettings:
    """How teacher outputs become labels; recorded in the store header (``settings``).

    ``label_scale``: pixel labels are stored at the image's own size times it (a fraction in
    (0, 1]). Every other keyword is a setting of a task, declared, with its default, by the
    task class (``Task.label_settings_type``): classification ``temperature`` (stores
    ``softmax(logits / temperature)``), detection ``det_threshold`` (keeps boxes with score
    >= it), segmentation ``seg_threshold`` (a pixel whose top softmax probability is below it
    is ignored, 255). A setting not given takes its task's default; read one as an attribute
    (``settings.det_threshold``).
    """

    def __init__(self, label_scale: float = 1.0, **values: Any) -> None:
        if not 0.0 < label_scale <= 1.0:
            raise ConfigError(f"label_scale must be in (0, 1], got {label_scale}")
        self.label_scale = float(label_scale)
        known = label_setting_defaults()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown labelling settings {unknown}; known: {sorted(known)}")
        # Task name -> its validated settings, in registry order (the header's order).
        self.tasks: dict[str, BaseModel] = {}
        for name, kind in TASK_TYPES.items():
            model = kind.label_settings_type
            if model is None:
                continue
            given = {k: v for k, v in values.items() if k in model.model_fields}
            try:
                self.tasks[name] = model(**given)
            except ValidationError as err:
                raise ConfigError(_settings_problem(err)) from None

    def __getattr__(self, key: str) -> Any:
        for values in self.__dict__.get("tasks", {}).values():
            if key in type(values).model_fields:
                return getattr(values, key)
        raise AttributeError(f"no labelling setting {key!r}")

    def __repr__(self) -> str:
        values = {k: v for m in self.tasks.values() for k, v in m.model_dump().items()}
        args = ", ".join(
            f"{k}={v!r}" for k, v in {**values, "label_scale": self.label_scale}.items()
        )
        return f"LabelSettings({args})"

    def for_tasks(self, tasks: Iterable[Task], keep_real: bool) -> dict[str, Any]:
        """The header's settings: those of the tasks labelled (in task registry order),
        ``label_scale``, ``keep_real``."""
        names = {task.name for task in tasks}
        out: dict[str, Any] = {}
        for name, values in self.tasks.items():
            if name in names:
                out.update(values.model_dump())
        out["label_scale"] = float(self.label_scale)
        out["keep_real"] = bool(keep_real)
        return out


def _settings_problem(err: ValidationError) -> str:
    """A settings model's ValidationError in one line: a validator's own message, else
    ``field: message``."""
    parts = []
    for e in err.errors():
        if e["type"] == "value_error":
            parts.append(str(e["ctx"]["error"]))
        else:
            parts.append(f"{'.'.join(map(str, e['loc']))}: {e['msg']}")
    return "; ".join(parts)


def header_tasks(tasks: Mapping[str, Task]) -> dict[str, dict[str, Any]]:
    """The store header's ``tasks``: each task's kind, classes and store encoding."""
    return {
        name: {"kind": t.name, "classes": t.classes or None, "encoding": t.store_encoding}
        for name, t in tasks.items()
    }


# --------------------------------------------------------------------------- teachers


@dataclass
class Teacher:
    """A loaded teacher: its model, the tasks it labels and the input size it expects."""

    path: Path
    sha256: str
    model: MultiTaskModel
    tasks: list[str]
    input_size: tuple[int, int]
    # Trained with ``resize: keep_aspect``: fed images whose longer side is the input size,
    # padded to a multiple of ``divisor`` as training batches were.
    keep_aspect: bool = False

    @property
    def view(self) -> tuple[int, int, bool]:
        """How this teacher's input is made from an image (teachers may share one)."""
        return (*self.input_size, self.keep_aspect)

    @property
    def divisor(self) -> int:
        return max([32, *(t.size_divisor for t in self.model.tasks.values())])

    def header(self) -> dict[str, Any]:
        out = {
            "path": str(self.path),
            "sha256": self.sha256,
            "tasks": list(self.tasks),
            "classes": {t: self.model.tasks[t].classes or None for t in self.tasks},
            "image_size": list(self.input_size),
        }
        if self.keep_aspect:
            out["resize"] = "keep_aspect"
        return out


def _pair(size: Any, where: Path) -> tuple[int, int]:
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise ConfigError(
        f"{where}: info.image_size is {size!r}; expected the input size the model was trained "
        "on (an int, or [height, width])"
    )


def load_teachers(paths: Sequence[str | Path]) -> list[Teacher]:
    """Load the teacher checkpoints; one teacher per task (two of one task are refused)."""
    if not paths:
        raise ConfigError("give at least one teacher checkpoint (--teacher)")
    teachers: list[Teacher] = []
    owner: dict[str, Path] = {}
    for given in paths:
        file = resolve_model_file(given).resolve()
        model, payload = load_model(file)
        info = run_info(payload, file)
        size = info.image_size
        if size is None:
            raise ConfigError(
                f"{file}: records no info.image_size (the input size it was trained on), so "
                "it cannot be fed what it expects; must teach writes it"
            )
        tasks = []
        for name, task in model.tasks.items():
            if not task.has_store_encoding():
                warnings.warn(
                    f"{file}: its {name} head is not labelled (the store holds "
                    f"{', '.join(encodings())})",
                    stacklevel=2,
                )
                continue
            if name in owner:
                raise ConfigError(
                    f"two teachers for {name}: {owner[name]} and {file}; give one teacher per "
                    "task (a store holds one label per task and image)"
                )
            owner[name] = file
            tasks.append(name)
        if not tasks:
            raise ConfigError(f"{file}: none of its tasks {list(model.tasks)} can be stored")
        keep_aspect = info.resize == "keep_aspect"
        if keep_aspect and not isinstance(size, int):
            raise ConfigError(f"{file}: info.resize is keep_aspect but image_size is {size!r}")
        teacher = Teacher(file, file_sha256(file), model, tasks, _pair(size, file), keep_aspect)
        teachers.append(teacher)
    return teachers


# --------------------------------------------------------------------------- images


@dataclass
class ImageSet:
    """The ordered images to label: key and file of each, under ``root``."""

    source: str  # recorded in the header: the folder the images come from
    root: Path
    keys: list[str]
    paths: list[Path]
    split: str | None = None
    dataset: MultiTaskDataset | None = None  # a dataset folder's reader (for keep_real)
    style: str | None = None


def walk_images(root: Path) -> list[Path]:
    """Image files under ``root``, found as the dataset reader finds them (links followed, each
    folder once, dot files left out), sorted by relative path: the readers' order."""
    return walk_files(root, IMAGE_EXTENSIONS)


def resolve_images(
    source: str | Path | DataSource,
    *,
    split: str = "train",
    keep_real_tasks: Sequence[str] | None = None,
    progress: bool = True,
) -> ImageSet:
    """The image list of ``source``: a dataset folder (its ``split``), a folder tree of images
    (ImageFolder included), or a scene-world style rendered by its recipe (a
    :class:`DataSource`; a bare name gets the default recipe).

    ``keep_real_tasks``: read the real labels of these tasks (dataset folders only).
    """
    source = as_source(source)
    path = Path(source.dataset)
    style = None
    if not path.exists():
        # Not a path: a scene-world style (load_style refuses unknown names, listing them).
        try:
            path = source.prepare(progress)
        except ConfigError as err:
            raise ConfigError(
                f"{source.dataset}: no such file or folder, nor a style: {err}"
            ) from err
        style = source.dataset
    if is_dataset_folder(path):
        tasks = list(keep_real_tasks or [])
        dataset = MultiTaskDataset(path, split=split, tasks=tasks, on_error="raise")
        # Image paths as the reader walked them (not resolved: linked files stay under root).
        return ImageSet(
            source=str(dataset.manifest.parent.resolve()),
            root=Path(os.path.abspath(dataset.images_root)),
            keys=dataset.keys,
            paths=[Path(os.path.abspath(p)) for p in dataset.image_paths],
            split=split,
            dataset=dataset if tasks else None,
            style=style,
        )
    if keep_real_tasks:
        raise ConfigError(
            f"{path}: --keep-real needs a dataset folder (manifest.json or dataset.yaml) that "
            "says where the labels are; this is a plain folder of images"
        )
    if not path.is_dir():
        raise ConfigError(f"{path}: not a folder of images nor a dataset folder")
    root = Path(os.path.abspath(path))
    files = walk_images(root)
    if not files:
        raise ConfigError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    # The dataset reader's keys: the stem, or the path under root where stems repeat
    # (per-class numbering); only one name with two extensions in one folder collides.
    keys = image_keys(files, root)
    seen: dict[str, Path] = {}
    for key, f in zip(keys, files, strict=True):
        if key in seen:
            raise ConfigError(
                f"{root}: {seen[key]} and {f} have the same image key {key!r} (one name with "
                "two extensions in one folder); keep one of them"
            )
        seen[key] = f
    return ImageSet(str(path.resolve()), root, keys, files)


# --------------------------------------------------------------------------- real labels


class RealLabels:
    """Reads the real labels of a dataset folder and converts them to store fields in the
    teachers' vocabularies (a dataset class must be one of the teacher's, matched by name)."""

    def __init__(self, dataset: MultiTaskDataset, tasks: Mapping[str, Task], scale: float):
        self.dataset = dataset
        self.position = {k: i for i, k in enumerate(dataset.keys)}
        self.tasks = {n: t for n, t in tasks.items() if n in dataset.tasks}
        self.scale = scale
        self.maps: dict[str, np.ndarray] = {}
        for name, task in self.tasks.items():
            theirs = dataset.classes.get(name)
            if not task.needs_classes or theirs is None:
                continue
            missing = [c for c in theirs if c not in task.classes]
            if missing:
                raise ConfigError(
                    f"{dataset.manifest}: --keep-real: {name} classes {missing} are not among "
                    f"the teacher's {task.classes}; real labels must use the teacher's classes"
                )
            self.maps[name] = np.array([task.classes.index(c) for c in theirs], np.int64)
        # The value a dataset's label files mark ignored pixels with, where its spec says one.
        self.ignore = {
            name: getattr(getattr(dataset.source, name, None), "ignore_index", IGNORE_INDEX)
            for name in self.tasks
        }

    def read(self, key: str) -> tuple[torch.Tensor, dict[str, dict[str, np.ndarray]]]:
        """(image (3, H, W) uint8, task -> store fields) of one image."""
        sample = self.dataset[self.position[key]]
        image = sample["image"].as_subclass(torch.Tensor)
        size = label_size(tuple(image.shape[-2:]), self.scale)
        out = {}
        for name, task in self.tasks.items():
            fields = task.label_to_store(self._remap(name, sample), size)
            if fields is not None:
                out[name] = fields
        return image, out

    def _remap(self, name: str, sample: dict[str, Any]) -> dict[str, Any]:
        lut = self.maps.get(name)
        if lut is None:
            return sample
        return self.tasks[name].remap_classes(sample, lut, self.ignore[name])


# --------------------------------------------------------------------------- loading


class _Images(Dataset):
    """Item ``i`` = image ``i`` of the list, decoded and resized to every teacher's view
    (:attr:`Teacher.view`); an unreadable one comes back with its reason instead."""

    def __init__(
        self, images: ImageSet, views: Sequence[tuple[int, int, bool]], real: RealLabels | None
    ) -> None:
        self.keys, self.paths = images.keys, images.paths
        self.views = list(views)
        self.real = real

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, path = self.keys[index], self.paths[index]
        item: dict[str, Any] = {"index": index, "key": key, "path": str(path), "error": None}
        try:
            if self.real is not None:
                image, item["real"] = self.real.read(key)
            else:
                image = torch.from_numpy(read_image(path)).permute(2, 0, 1)
        except DataError as err:
            # Name the file at fault when it is not the image (a label file, the COCO JSON).
            same = os.path.abspath(err.path) == os.path.abspath(path)
            item["error"] = err.problem if same else str(err)
            return item
        except Exception as err:  # anything else still skips this image only, with its reason
            item["error"] = f"{type(err).__name__}: {err}"
            return item
        size = tuple(image.shape[-2:])
        item["size"] = size
        # The teachers' eval resize (v2.Resize, antialiased) on uint8, as in training.
        item["inputs"] = {}
        for h, w, keep_aspect in self.views:
            if keep_aspect:  # the longer side to the input size, the aspect kept
                x = TF.resize(image, None, max_size=h, antialias=True)
            else:
                x = image if (h, w) == size else TF.resize(image, [h, w], antialias=True)
            item["inputs"][h, w, keep_aspect] = x.contiguous()
        return item


def _collate(items: list[dict[str, Any]], divisors: Mapping[tuple, int]) -> dict[str, Any]:
    """Inputs stacked per view; images of different sizes (keep_aspect views) padded at the
    bottom and right as training batches are (:func:`must.training.data.pad_samples`). Each
    item gets ``fitted``: its image's size within each view's input, before padding."""
    ok = [it for it in items if it["error"] is None]
    inputs = {}
    for view in ok[0]["inputs"] if ok else []:
        for it in ok:
            it.setdefault("fitted", {})[view] = tuple(it["inputs"][view].shape[-2:])
        padded = pad_samples([{"image": it["inputs"][view]} for it in ok], divisors[view])
        inputs[view] = torch.stack([p["image"] for p in padded])
    for it in ok:
        del it["inputs"]
    return {"items": items, "inputs": inputs}


def _unpad(prediction: Any, fitted: tuple[int, int], padded: tuple[int, int]) -> Any:
    """A dense prediction (C, h, w) cut to the part covering the image (``fitted`` of the
    ``padded`` input, scaled to the prediction's resolution); others as they are."""
    if not isinstance(prediction, torch.Tensor) or prediction.dim() < 3:
        return prediction
    h, w = prediction.shape[-2:]
    keep_h = max(1, round(fitted[0] * h / padded[0]))
    keep_w = max(1, round(fitted[1] * w / padded[1]))
    return prediction[..., :keep_h, :keep_w]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_cpu(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- writing


class _ShardSink:
    """Turns batches of predictions into records and writes each shard once all its images
    are in, on one background thread fed through a bounded queue."""

    def __init__(
        self,
        writer: ShardWriter,
        teachers: Sequence[Teacher],
        settings: Mapping[str, Any],
        shards: Sequence[int],
        max_batches: int = 2,
    ) -> None:
        self.writer = writer
        self.teachers = list(teachers)
        self.settings = dict(settings)
        self.remaining = {i: len(writer.shard_keys(i)) for i in shards}
        self.records: dict[int, list[Record]] = {i: [] for i in shards}
        self.skipped: dict[int, list[dict[str, str]]] = {i: [] for i in shards}
        self.written: list[int] = []
        self.num_records = 0
        self.skipped_all: list[dict[str, str]] = []
        self.error: BaseException | None = None
        self._aborted = False
        self._queue: queue.Queue = queue.Queue(max_batches)
        self._thread = threading.Thread(target=self._run, name="must-label-writer", daemon=True)
        self._thread.start()

    def put(self, items: list[dict[str, Any]], predictions: dict[int, dict[str, Any]]) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._queue.put((items, predictions), timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait for every queued batch to be handled; raise the thread's error, if any."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None and not self._aborted:
            raise self.error

    def abort(self) -> None:
        """Drop what is queued (the run is failing or interrupted) and stop the thread."""
        self._aborted = True
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        # The conversions are small per-image tensor ops: run them on this thread alone, so
        # they do not start a second team of compute threads that competes for the cores
        # with the teachers' forward passes.
        with one_compute_thread():
            while True:
                job = self._queue.get()
                if job is None:
                    return
                if self.error is not None or self._aborted:
                    continue  # drain, so that put() and close() never block
                try:
                    with torch.inference_mode():
                        self._handle(*job)
                except BaseException as err:
                    self.error = err

    def _handle(self, items: list[dict[str, Any]], predictions: dict[int, dict[str, Any]]) -> None:
        row = 0
        size = self.writer.shard_size
        for it in items:
            shard = it["index"] // size
            if it["error"] is not None:
                entry = {"key": it["key"], "path": it["path"], "reason": it["error"]}
                self.skipped[shard].append(entry)
                self.skipped_all.append(entry)
            else:
                self.records[shard].append(self._record(it, predictions, row))
                row += 1
            self.remaining[shard] -= 1
            if self.remaining[shard] == 0:
                records, skipped = self.records.pop(shard), self.skipped.pop(shard)
                self.writer.write_shard(shard, records, skipped)
                self.written.append(shard)
                self.num_records += len(records)

    def _record(self, it: dict[str, Any], predictions: dict[int, Any], row: int) -> Record:
        labels: dict[str, dict[str, np.ndarray]] = {}
        origin: dict[str, str] = {}
        real = it.get("real") or {}
        for ti, teacher in enumerate(self.teachers):
            for name in teacher.tasks:
                if name in real:
                    continue
                pred = predictions[ti][name]
                one = pred[row]  # a batched tensor, or a list of per-image dicts (detection)
                task = teacher.model.tasks[name]
                input_size = teacher.input_size
                if teacher.keep_aspect:
                    # The image fills the top-left of the padded input: labels from there.
                    input_size = it["fitted"][teacher.view]
                    one = _unpad(one, input_size, predictions[ti][PADDED_INPUT])
                labels[name] = task.to_store(one, it["size"], input_size, self.settings)
                origin[name] = "pseudo"
        for name, fields in real.items():
            labels[name] = fields
            origin[name] = "real"
        h, w = it["size"]
        return Record(it["key"], int(h), int(w), labels, origin)


# --------------------------------------------------------------------------- the run


@dataclass
class LabelResult:
    """What one process did, and where the store stands."""

    store: Path
    rank: int
    world_size: int
    images: int  # in the whole image list
    shards: int  # in the whole store
    already_done: int  # shards of this process's share found done (resume)
    written: list[int] = field(default_factory=list)
    records: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    complete: bool = False
    shards_done: int = 0
    seconds: float = 0.0  # the labelling loop: first batch to last shard written
    labelled_images: int = 0  # images this process went through (records + skipped)

    def summary(self) -> str:
        rate = self.labelled_images / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"must label: process {self.rank} of {self.world_size}: wrote {len(self.written)} "
            f"shard(s) ({self.records} images labelled, {len(self.skipped)} skipped"
            + (f", {rate:.1f} images/s" if self.labelled_images else "")
            + f"); {self.already_done} of its shard(s) were already done",
        ]
        for s in self.skipped[:10]:
            lines.append(f"  skipped {s['key']} ({s['path']}): {s['reason']}")
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more (manifest.json 'skipped')")
        state = "complete" if self.complete else "incomplete"
        lines.append(
            f"store {self.store}: {state}, {self.shards_done} of {self.shards} shards, "
            f"{self.images} images"
        )
        return "\n".join(lines)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", _env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
    return torch.device("cpu")


def _autocast(device: torch.device) -> Any:
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _finalize(writer: ShardWriter) -> tuple[bool, int]:
    """Finalize; if another process finished its last shard meanwhile (its complete manifest
    may have been overwritten by ours), finalize again: the last to finish always sees all."""
    writer.finalize()
    store = PseudoLabelStore(writer.root, allow_incomplete=True)
    complete = bool(store.manifest["complete"])
    if not complete and all(
        (writer.root / sidecar_name(i)).is_file() for i in range(writer.num_shards)
    ):
        writer.finalize()
        store = PseudoLabelStore(writer.root, allow_incomplete=True)
        complete = bool(store.manifest["complete"])
    return complete, len(store.manifest["shards"])


def label_images(
    teachers: Sequence[str | Path],
    images: str | Path | DataSource,
    out: str | Path,
    *,
    settings: LabelSettings | None = None,
    split: str = "train",
    keep_real: bool = False,
    shard_size: int = 256,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 2,
    rank: int | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> LabelResult:
    """Label ``images`` with ``teachers`` into the store ``out`` (see the module docstring).

    ``rank``/``world_size`` default to the ``RANK``/``WORLD_SIZE`` environment variables
    (torchrun) or 0/1. Re-running the same command resumes; another configuration in the same
    folder is refused unless ``overwrite`` (which starts the store afresh).
    """
    settings = settings or LabelSettings()
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    rank = _env_int("RANK", 0) if rank is None else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world size {world_size}: need 0 <= rank < world size")
    for name, value in (("batch size", batch_size), ("shard size", shard_size)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")

    loaded = load_teachers(teachers)
    task_objs = {n: t.model.tasks[n] for t in loaded for n in t.tasks}
    image_set = resolve_images(
        images,
        split=split,
        keep_real_tasks=list(task_objs) if keep_real else None,
        progress=progress,
    )
    stored = settings.for_tasks(task_objs.values(), keep_real)
    images_header: dict[str, Any] = {"source": image_set.source}
    if image_set.split is not None:
        images_header["split"] = image_set.split
    header = {
        "tasks": header_tasks(task_objs),
        "teachers": [t.header() for t in loaded],
        "settings": stored,
        "images": images_header,
        "shard_size": shard_size,
    }
    # Everything that can refuse the input runs before the first store file is written.
    real = None
    if keep_real and image_set.dataset is not None:
        real = RealLabels(image_set.dataset, task_objs, stored["label_scale"])
    extra = {"source": image_set.source, "split": image_set.split, "style": image_set.style}
    locations = image_locations(image_set.root, image_set.keys, image_set.paths, extra)
    new_store = overwrite or not (Path(out) / HEADER_FILE).is_file()
    writer = ShardWriter(
        out, header, image_set.keys, overwrite=overwrite, checkers=task_checkers(task_objs)
    )
    try:
        write_image_locations(writer.root, locations)
    except BaseException:
        if new_store:  # leave no half-made store behind (a header with nothing else)
            for name in (HEADER_FILE, KEYS_FILE):
                (writer.root / name).unlink(missing_ok=True)
        raise

    done = writer.done_shards()
    share = [i for i in range(writer.num_shards) if i % world_size == rank]
    mine = [i for i in share if i not in done]
    result = LabelResult(
        store=writer.root,
        rank=rank,
        world_size=world_size,
        images=len(image_set.keys),
        shards=writer.num_shards,
        already_done=len(share) - len(mine),
    )
    if mine:
        _run(writer, loaded, image_set, real, stored, mine, result,
             batch_size=batch_size, workers=workers, device=_device(device),
             progress=progress)  # fmt: skip
    result.complete, result.shards_done = _finalize(writer)
    return result


def _run(
    writer: ShardWriter,
    teachers: list[Teacher],
    image_set: ImageSet,
    real: RealLabels | None,
    settings: dict[str, Any],
    shards: list[int],
    result: LabelResult,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool,
) -> None:
    divisors = {t.view: t.divisor for t in teachers}
    # Batches never span two shards: a shard's batches are the same in every run.
    batches = []
    for i in shards:
        first = i * writer.shard_size
        count = len(writer.shard_keys(i))
        batches += [
            list(range(first + j, first + min(j + batch_size, count)))
            for j in range(0, count, batch_size)
        ]
    loader = DataLoader(
        _Images(image_set, sorted(divisors), real),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=partial(_collate, divisors=divisors),
        pin_memory=device.type == "cuda",
        multiprocessing_context=worker_context(device, workers),
    )
    for t in teachers:
        t.model.to(device).eval()
    total = sum(len(b) for b in batches)
    sink = _ShardSink(writer, teachers, settings, shards)
    bar = tqdm(total=total, desc=f"label [{result.rank}]", unit="img", disable=not progress)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in loader:
                predictions: dict[int, Any] = {}
                if batch["inputs"]:
                    for ti, teacher in enumerate(teachers):
                        x = batch["inputs"][teacher.view].to(device, non_blocking=True)
                        with _autocast(device):
                            out, _ = teacher.model(x)  # uint8: the backbone scales it
                        predictions[ti] = _to_cpu({n: out[n] for n in teacher.tasks})
                        predictions[ti][PADDED_INPUT] = tuple(x.shape[-2:])
                sink.put(batch["items"], predictions)
                bar.update(len(batch["items"]))
    except BaseException:
        sink.abort()  # interrupted or failed: the shards written so far stay; resume later
        raise
    finally:
        bar.close()
    sink.close()
    result.seconds = time.perf_counter() - start
    result.written = sorted(sink.written)
    result.records = sink.num_records
    result.skipped = sink.skipped_all
    result.labelled_images = total
    for t in teachers:
        t.model.to("cpu")


__all__ = [
    "ImageSet",
    "LabelResult",
    "LabelSettings",
    "RealLabels",
    "Teacher",
    "header_tasks",
    "label_images",
    "label_setting_defaults",
    "load_teachers",
    "resolve_images",
    "walk_images",
]
