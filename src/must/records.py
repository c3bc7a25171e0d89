"""Per-image test records: what each test image contributes to its task's primary metric, kept
so that the metric can be recomputed on any re-weighting of the test images (a paired
bootstrap over images, ``must report``) without the model or the images.

One ``.npz`` file per task (written under a temporary name, then renamed):

- ``task``, ``metric``: 0-d unicode arrays, the task's name and its primary metric;
- ``keys``: (N,) unicode, the images' keys, in the order of the records;
- for every record field ``F``: ``F``, every image's array concatenated along axis 0, and
  ``F.offsets``, (N + 1,) int64, so image ``i``'s array is ``F[offsets[i]:offsets[i + 1]]``
  (images may hold any number of rows, e.g. detections, including none).

NumPy only, read with ``allow_pickle=False``: a records file runs no code.
"""

from __future__ import annotations

import os
import uuid
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from must.errors import DataError

OFFSETS = ".offsets"  # suffix of a field's offsets array
HEADER = ("task", "metric", "keys")


@dataclass(frozen=True)
class RecordSet:
    """One task's per-image records: ``records[i]`` (field -> array) is image ``keys[i]``'s."""

    task: str
    metric: str
    keys: list[str]
    records: list[dict[str, np.ndarray]]

    def subset(self, keys: Sequence[str]) -> RecordSet:
        """The records of ``keys``, in that order; keys without a record are a ``DataError``
        naming them."""
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(
                f"{self.task} test records",
                f"no record for {len(missing)} of the {len(keys)} images asked for: {shown}",
            )
        return RecordSet(self.task, self.metric, list(keys), [self.records[index[k]] for k in keys])


def save_records(
    path: str | Path,
    task: str,
    metric: str,
    keys: list[str],
    records: list[dict[str, np.ndarray]],
) -> Path:
    """Write one task's per-image records to ``path`` (see the module docstring); every record
    has the same fields, each an array of at least one dimension."""
    path = Path(path)
    if len(keys) != len(records):
        raise ValueError(f"{len(keys)} keys for {len(records)} records")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{task} records: keys repeat ({len(keys) - len(set(keys))} repeats)")
    fields = sorted(records[0]) if records else []
    arrays: dict[str, np.ndarray] = {
        "task": np.array(task, dtype=str),
        "metric": np.array(metric, dtype=str),
        "keys": np.array(keys, dtype=str).reshape(len(keys)),
    }
    for field in fields:
        if field in HEADER or field.endswith(OFFSETS):
            raise ValueError(f"{task} records: {field!r} cannot be a field name")
        parts = []
        for key, record in zip(keys, records, strict=True):
            if sorted(record) != fields:
                raise ValueError(
                    f"{task} records: image {key!r} has fields {sorted(record)}, not {fields}"
                )
            value = np.asarray(record[field])
            if value.ndim == 0:
                raise ValueError(f"{task} records: {field!r} of image {key!r} is 0-d")
            parts.append(value)
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        try:
            arrays[field] = np.concatenate(parts, axis=0)
        except ValueError as err:
            raise ValueError(f"{task} records: {field!r} differs in shape: {err}") from err
        arrays[field + OFFSETS] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        # A file object: given a name, np.savez would append ".npz" to the temporary's.
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_records(path: str | Path) -> RecordSet:
    """Read a file :func:`save_records` wrote; anything else is a ``DataError`` naming the
    file and what is wrong."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(path, "no such records file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(path, f"not a records file (.npz): {err}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(path, "not a records file: a single array, not an .npz archive")
    try:
        with loaded:
            data = {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(path, f"unreadable records file: {err}") from None
    missing = [name for name in HEADER if name not in data]
    if missing:
        raise DataError(path, f"not a records file: no {', '.join(missing)} array")
    for name in ("task", "metric"):
        if data[name].ndim != 0 or data[name].dtype.kind != "U":
            raise DataError(path, f"{name!r} is not a 0-d text array")
    keys_array = data["keys"]
    if keys_array.ndim != 1 or (keys_array.dtype.kind != "U" and keys_array.size):
        raise DataError(path, "'keys' is not a 1-d text array")
    keys = [str(k) for k in keys_array]
    if len(set(keys)) != len(keys):
        raise DataError(path, "'keys' repeat")
    n = len(keys)
    fields = sorted(k for k in data if k not in HEADER and not k.endswith(OFFSETS))
    orphans = sorted(k for k in data if k.endswith(OFFSETS) and k[: -len(OFFSETS)] not in data)
    if orphans:
        raise DataError(path, f"offsets without their field: {', '.join(orphans)}")
    columns = {}
    for field in fields:
        offsets = data.get(field + OFFSETS)
        if offsets is None:
            raise DataError(path, f"field {field!r} has no {field + OFFSETS!r} array")
        values = data[field]
        if values.ndim == 0:
            raise DataError(path, f"field {field!r} is 0-d")
        if (
            offsets.dtype != np.int64
            or offsets.shape != (n + 1,)
            or offsets[0] != 0
            or offsets[-1] != len(values)
            or (np.diff(offsets) < 0).any()
        ):
            raise DataError(
                path,
                f"{field + OFFSETS!r} does not match: expected {n + 1} non-decreasing int64 "
                f"offsets from 0 to {len(values)}, the length of {field!r}",
            )
        columns[field] = (values, offsets)
    records = [
        {field: values[offsets[i] : offsets[i + 1]] for field, (values, offsets) in columns.items()}
        for i in range(n)
    ]
    return RecordSet(str(data["task"]), str(data["metric"]), keys, records)


def image_weights(weights: np.ndarray, images: int) -> np.ndarray:
    """``weights`` as an (R, images) float64 array of non-negative image multiplicities
    (one row per re-weighting, e.g. bootstrap counts); anything else is a ``ValueError``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != images:
        raise ValueError(f"weights should be (R, {images}), got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    return w


def stacked(records: Sequence[dict[str, np.ndarray]], field: str) -> np.ndarray:
    """Every image's one-value ``field`` as an (N,) float64 array."""
    values = [np.asarray(r[field], np.float64).reshape(-1) for r in records]
    if any(v.shape != (1,) for v in values):
        raise ValueError(f"{field!r} should hold one value per image")
    return np.concatenate(values) if values else np.zeros(0)


def weighted_ratio(
    records: Sequence[dict[str, np.ndarray]], numerator: str, denominator: str | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """``f(weights)`` -> (R,) ratios of the weighted sums of two one-value fields (``None``:
    each image counts 1): a metric pooled over images, such as a mean over every pixel of
    the set. NaN where nothing is counted."""
    num = stacked(records, numerator)
    den = np.ones_like(num) if denominator is None else stacked(records, denominator)

    def metric(weights: np.ndarray) -> np.ndarray:
        w = image_weights(weights, len(num))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ num) / (w @ den)

    return metric
