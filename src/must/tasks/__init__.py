"""Tasks by name. Adding a task is adding a module and one line here."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from must.errors import ConfigError, describe_validation_error
from must.tasks.base import Batch, Task, TaskConfig, TaskHead
from must.tasks.classification import ClassificationTask
from must.tasks.depth import DepthTask
from must.tasks.detection import DetectionTask
from must.tasks.normals import NormalsTask
from must.tasks.segmentation import SegmentationTask

TASK_TYPES: dict[str, type[Task]] = {
    t.name: t for t in (ClassificationTask, DetectionTask, SegmentationTask, DepthTask, NormalsTask)
}


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


__all__ = ["TASK_TYPES", "Batch", "Task", "TaskConfig", "TaskHead", "build_task"]
