"""``StoreDataset``: a pseudo-label store and its images as training samples (torch).

``must label`` writes, next to a store's shards, ``images.json``: where the labelled images
are (``root``) and each key's image path relative to it (``paths``). This module reads it, so
a store plus its images is a ``torch.utils.data.Dataset`` of sample dicts shaped like
:class:`~must.data.readers.MultiTaskDataset`'s, with the labels each task's ``from_store``
gives back (``classification_soft``, ``boxes``/``box_labels``, ``segmentation``, ``depth``),
at the image's own size.

Kept apart from ``shards.py`` so that the reader there needs neither torch nor the package.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from must.data.readers import read_image
from must.errors import ConfigError, DataError
from must.files import write_bytes_atomic
from must.store.shards import PseudoLabelStore
from must.tasks import build_task
from must.tasks.base import Task

IMAGES_FILE = "images.json"
ORIGIN_KEY = "label_origin"  # sample key: task -> "pseudo" | "real"


def image_locations(
    root: Path, keys: Sequence[str], paths: Sequence[Path], extra: dict
) -> dict[str, Any]:
    """The content of ``images.json``: ``extra``, ``root`` and each key's path relative to it.

    Paths are taken as walked under ``root``, not resolved: an image that is a symbolic link
    (or lies in a linked folder) keeps its place in the tree, wherever the link points. A path
    outside ``root`` is a ConfigError (checked before any store file is written).
    """
    rel = {}
    for key, path in zip(keys, paths, strict=True):
        try:
            rel[key] = Path(path).relative_to(root).as_posix()
        except ValueError:
            raise ConfigError(f"{path}: image {key!r} is not under the image root {root}") from None
    return {**extra, "root": str(root), "paths": rel}


def write_image_locations(store_root: str | Path, content: Mapping[str, Any]) -> Path:
    """Write ``STORE/images.json`` (atomically; left alone when it already says the same)."""
    out = Path(store_root) / IMAGES_FILE
    data = (json.dumps(content, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    if out.is_file() and out.read_bytes() == data:
        return out
    return write_bytes_atomic(out, data)


def read_image_locations(store_root: str | Path) -> dict[str, Any]:
    """``STORE/images.json``: ``{"root", "paths": {key: relative path}, ...}``."""
    path = Path(store_root) / IMAGES_FILE
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            path, "missing: this store does not say where its images are (written by must label)"
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(path, f"unreadable ({err})") from err
    if not isinstance(content, dict) or not isinstance(content.get("paths"), dict):
        raise DataError(path, "expected an object with 'root' and 'paths'")
    return content


def store_tasks(store: PseudoLabelStore, heads: Mapping[str, Any] | None = None) -> dict[str, Task]:
    """The task object of each of the store's tasks (by kind, with the store's classes and,
    given ``heads``, the head settings of the model that trains on it: the values a task writes
    into samples, such as segmentation's ignore value, come from them)."""
    heads = heads or {}
    return {
        name: build_task(store.kind(name), store.classes(name), heads.get(name))
        for name in store.tasks
    }


class StoreDataset(Dataset):
    """Samples of a pseudo-labelled image set: the image (read from ``images.json``'s
    locations, or under ``image_root`` when the images have moved) and every label its record
    holds, converted by the task objects (``Task.from_store``), plus ``label_origin`` (task ->
    ``"pseudo"`` or ``"real"``). ``transform`` is applied to the dict, as in
    :class:`~must.data.readers.MultiTaskDataset`. Skipped images are not in it. ``heads``: the
    training model's head settings per task (``model.heads``), so that labels come out as
    its heads expect them (e.g. a segmentation ``ignore_index`` other than 255).
    """

    def __init__(
        self,
        store_root: str | Path,
        transform: Callable | None = None,
        *,
        image_root: str | Path | None = None,
        allow_incomplete: bool = False,
        heads: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = Path(store_root)
        self.store = PseudoLabelStore(self.root, allow_incomplete=allow_incomplete)
        locations = read_image_locations(self.root)
        self.image_root = Path(image_root if image_root is not None else locations["root"])
        self._paths: Mapping[str, str] = locations["paths"]
        missing = [k for k in self.store.keys if k not in self._paths]
        if missing:
            raise DataError(
                self.root / IMAGES_FILE,
                f"{len(missing)} keys have no image path, e.g. {missing[0]!r}",
            )
        self.keys = list(self.store.keys)
        self.tasks = store_tasks(self.store, heads)
        self.classes = {n: t.classes for n, t in self.tasks.items() if t.classes}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.keys)

    def image_path(self, key: str) -> Path:
        return self.image_root / self._paths[key]

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        record = self.store.get(key)
        path = self.image_path(key)
        image = read_image(path)
        size = (record.height, record.width)
        if image.shape[:2] != size:
            raise DataError(
                path,
                f"image is {image.shape[1]}x{image.shape[0]}, the store labelled it at "
                f"{record.width}x{record.height}: not the image that was labelled",
            )
        sample: dict[str, Any] = {
            "key": key,
            "image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),
        }
        for task, fields in record.labels.items():
            sample.update(self.tasks[task].from_store(fields, size))
        sample[ORIGIN_KEY] = dict(record.origin)
        if self.transform is not None:
            sample = self.transform(sample)
        return sample
