"""The registry of task classes: :func:`register_task` adds a class under its ``name``."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from must.tasks.base import Task

# name -> task class, in registration order (the order tasks are listed everywhere).
TASK_TYPES: dict[str, type[Task]] = {}

T = TypeVar("T", bound="type[Task]")


def register_task(cls: T) -> T:
    """Class decorator: make ``cls`` known by its ``name`` (a second class of one name is an
    error; a task module imported twice re-registers the same class harmlessly)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} has no task name (class attribute 'name')")
    known = TASK_TYPES.get(name)
    same = known is not None and (known.__module__, known.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    if known is not None and not same:
        raise ValueError(f"task name {name!r} is taken by {known.__module__}.{known.__qualname__}")
    TASK_TYPES[name] = cls
    return cls


def task_names() -> list[str]:
    """The names of the registered tasks, in registration order."""
    return list(TASK_TYPES)
