"""The pseudo-label store: MuST's multi-task pseudo-labelled dataset on disk (``docs/store.md``).

``StoreDataset`` (a torch Dataset of a store and its images), ``ShardWriter`` (the writer
with the encodings and checks of ``must``'s tasks, ``must.store.tasks``) and ``ENCODINGS``
(kind -> what a store records for it, from the task classes) are imported on first use, so
that ``must.store`` itself needs neither torch nor the rest of the package.
"""

from typing import Any

from must.store.shards import (
    DEFAULT_SHARD_SIZE,
    FORMAT,
    IGNORE_INDEX,
    PseudoLabelStore,
    Record,
    keys_sha256,
    shard_name,
)

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ENCODINGS",
    "FORMAT",
    "IGNORE_INDEX",
    "PseudoLabelStore",
    "Record",
    "ShardWriter",
    "StoreDataset",
    "keys_sha256",
    "shard_name",
]


def __getattr__(name: str) -> Any:
    if name == "StoreDataset":
        from must.store.dataset import StoreDataset

        return StoreDataset
    if name == "ShardWriter":
        from must.store.tasks import ShardWriter

        return ShardWriter
    if name == "ENCODINGS":
        from must.store.tasks import encodings

        return encodings()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
