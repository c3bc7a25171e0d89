"""``must``'s tasks in the pseudo-label store: what each stores and how its fields are checked
come from the task classes (``Task.store_encoding``, ``check_store_classes``,
``check_store_fields``); ``shards.py`` itself only follows the header it is given.

``ShardWriter`` here is ``shards.ShardWriter`` with those filled in: a header task of a known
kind gets the task's encoding (extra keys given are kept) and its checker.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from must.errors import ConfigError
from must.store import shards
from must.tasks import TASK_TYPES
from must.tasks.base import Task


def encodings() -> dict[str, dict[str, Any]]:
    """Kind -> the encoding a store records for it, for every registered task that has one."""
    return {
        name: copy.deepcopy(kind.store_encoding)
        for name, kind in TASK_TYPES.items()
        if kind.store_encoding is not None
    }


def task_checkers(tasks: Mapping[str, Task]) -> dict[str, shards.Checker]:
    """Store task name -> the checker of its task object (its classes are the store's)."""
    return {name: task.check_store_fields for name, task in tasks.items()}


def complete_header(header: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, shards.Checker]]:
    """``header`` with each task of a registered kind given its encoding (keys the caller put
    in ``encoding`` are kept, after the task's), its classes checked by its task class, and
    the checkers of those tasks. A kind no task stores must come with its own encoding."""
    tasks = header.get("tasks") if isinstance(header, Mapping) else None
    if not isinstance(tasks, Mapping):
        return dict(header) if isinstance(header, Mapping) else header, {}  # shards refuses it
    out: dict[str, Any] = {}
    checkers: dict[str, shards.Checker] = {}
    for name, spec in tasks.items():
        if spec is not None and not isinstance(spec, Mapping):
            out[name] = spec  # shards refuses it
            continue
        spec = dict(spec or {})
        kind = spec.get("kind", name)
        kind_type = TASK_TYPES.get(kind) if isinstance(kind, str) else None
        given = spec.get("encoding") or {}
        if kind_type is None or kind_type.store_encoding is None:
            if not (isinstance(given, Mapping) and "fields" in given):
                known = list(encodings())
                raise ConfigError(f"store header: tasks.{name}.kind {kind!r}, one of {known}")
            out[name] = spec
            continue
        where = f"store header: tasks.{name}"
        default = copy.deepcopy(kind_type.store_encoding)
        if isinstance(given, Mapping):
            encoding = {**default, **given}
            if encoding["fields"] != default["fields"]:
                raise ConfigError(
                    f"{where}.encoding.fields: {shards.FORMAT} stores {default['fields']} for "
                    f"{kind}"
                )
            spec["encoding"] = encoding
        classes = spec.get("classes")
        if classes is None or (
            isinstance(classes, list) and all(isinstance(c, str) for c in classes)
        ):
            kind_type.check_store_classes(where, classes)
            task = kind_type(list(classes) if kind_type.needs_classes else None)
            checkers[name] = task.check_store_fields
        out[name] = spec
    return {**header, "tasks": out}, checkers


class ShardWriter(shards.ShardWriter):
    """``shards.ShardWriter`` (see there) with the encodings and checkers of ``must``'s tasks
    filled in; ``checkers`` given take precedence."""

    def __init__(
        self,
        root: str | Path,
        header: Mapping[str, Any],
        keys: Sequence[str] | None = None,
        *,
        overwrite: bool = False,
        checkers: Mapping[str, shards.Checker] | None = None,
    ) -> None:
        header, defaults = complete_header(header)
        super().__init__(
            root, header, keys, overwrite=overwrite, checkers={**defaults, **(checkers or {})}
        )
