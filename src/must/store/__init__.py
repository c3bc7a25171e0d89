"""The pseudo-label store: MuST's multi-task pseudo-labelled dataset on disk (``docs/store.md``).

``StoreDataset`` (a torch Dataset of a store and its images) is imported on first use, so that
``must.store`` itself needs neither torch nor the rest of the package.
"""

from typing import Any

from must.store.shards import (
    DEFAULT_SHARD_SIZE,
    ENCODINGS,
    FORMAT,
    IGNORE_INDEX,
    PseudoLabelStore,
    Record,
    ShardWriter,
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
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
