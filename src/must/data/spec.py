"""The dataset description shared by rendered datasets (``manifest.json``) and user data
(``dataset.yaml``): where the images are and, per task, where its labels are and how they
are encoded. Label files are matched to images by their path relative to the label folder
(folders mirroring the image tree), else by file stem (see :mod:`must.data.readers`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from must.data.source import MANIFEST_NAMES
from must.errors import ConfigError, describe_validation_error
from must.tasks import TASK_TYPES

# The registered task names, in registration order (a live view: tasks registered later count).
TASKS = TASK_TYPES.keys()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitSpec(_Strict):
    """One split: ``images`` and, per task that labels it, where and how (the task's own
    ``source_type``, e.g. ``depth: {root: depth/train, scale: 1000}``). Task entries are checked
    against the registry when a description is loaded (:func:`dataset_spec_type`)."""

    model_config = ConfigDict(extra="allow")

    images: str

    def tasks(self) -> list[str]:
        return [t for t in TASKS if getattr(self, t, None) is not None]

    def source(self, task: str) -> BaseModel | None:
        """The task's source settings in this split, None when the task is not labelled."""
        return getattr(self, task, None)

    def __reduce__(self):
        # The class made from the registry is rebuilt, not looked up by name (loader workers).
        return (_rebuild, ("split", self.model_dump()))


class _TypedSplit(SplitSpec):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    name: str = "dataset"
    splits: dict[str, SplitSpec]
    # Label vocabularies per task; read from the data (folders, COCO categories) when omitted.
    classes: dict[str, list[str]] = Field(default_factory=dict)
    # Free-form provenance (style, seed, render settings, ...).
    meta: dict = Field(default_factory=dict)

    def __reduce__(self):
        return (_rebuild, ("spec", self.model_dump()))


def _rebuild(kind: str, data: dict[str, Any]) -> BaseModel:
    spec = dataset_spec_type()
    return (spec if kind == "spec" else _SPEC_TYPES["split"]).model_validate(data)


def find_manifest(path: str | Path) -> Path:
    """The manifest file of a dataset folder, or the file itself."""
    path = Path(path)
    if path.is_file():
        return path
    for name in MANIFEST_NAMES:
        if (path / name).is_file():
            return path / name
    raise ConfigError(
        f"{path}: no dataset description found (expected one of {', '.join(MANIFEST_NAMES)})"
    )


def dataset_spec_type() -> type[DatasetSpec]:
    """``DatasetSpec`` whose splits accept every registered task's source (its
    ``source_type``) and nothing else; made again when a task registers after the last call."""
    key = tuple((name, kind.source_type) for name, kind in TASK_TYPES.items())
    if _SPEC_TYPES.get("key") != key:
        fields: dict[str, Any] = {
            # A task without dataset files keeps its entry as given: refused (naming the
            # task and the missing hook) only when a reader is asked for its labels.
            name: (source | None, None) if source is not None else (Any, None)
            for name, source in key
        }
        split = create_model("SplitSpec", __base__=_TypedSplit, **fields)
        spec = create_model("DatasetSpec", __base__=DatasetSpec, splits=(dict[str, split], ...))
        _SPEC_TYPES.update(key=key, type=spec, split=split)
    return _SPEC_TYPES["type"]


_SPEC_TYPES: dict[str, Any] = {}


def load_spec(path: str | Path) -> tuple[DatasetSpec, Path]:
    """Load and validate a dataset description; returns it with the folder paths are relative to."""
    file = find_manifest(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{file}: cannot read dataset description: {err}") from err
    try:
        spec = dataset_spec_type().model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            f"{file}: invalid dataset description:\n{describe_validation_error(err)}"
        ) from err
    return spec, file.parent
