"""Tasks by name. Adding a task is writing a :class:`Task` subclass decorated with
:func:`register_task` (and importing its module; the built-in ones are imported here)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from must.errors import ConfigError, describe_validation_error
from must.tasks.base import Batch, Task, TaskConfig, TaskHead
from must.tasks.registry import TASK_TYPES, register_task, task_names

# The built-in tasks register in the order they are imported here, which is the order tasks are
# listed everywhere (dataset tasks, tables, pictures).
# isort: off
from must.tasks import classification as classification
from must.tasks import detection as detection
from must.tasks import segmentation as segmentation
from must.tasks import depth as depth
from must.tasks import normals as normals
# isort: on


def build_task(name: str, classes: list[str] | None, config: dict[str, Any] | None = None) -> Task:
    """A task object by name, its head settings validated (errors name the key)."""
    if name not in TASK_TYPES:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASK_TYPES)}")
    kind = TASK_TYPES[name]
    try:
        cfg = kind.config_type.model_validate(config or {})
    except ValidationError as err:
        raise ConfigError(
            f"model.heads.{name}: invalid settings:\n{describe_validation_error(err)}"
        ) from err
    return kind(classes if kind.needs_classes else None, cfg)


__all__ = [
    "TASK_TYPES",
    "Batch",
    "Task",
    "TaskConfig",
    "TaskHead",
    "build_task",
    "register_task",
    "task_names",
]
