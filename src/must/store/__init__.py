"""The pseudo-label store: MuST's multi-task pseudo-labelled dataset on disk (``docs/store.md``)."""

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
    "keys_sha256",
    "shard_name",
]
