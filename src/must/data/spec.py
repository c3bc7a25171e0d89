"""The dataset description shared by rendered datasets (``manifest.json``) and user data
(``dataset.yaml``): where the images are and, per task, where its labels are and how they
are encoded. Labels are matched to images by file stem."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from must.errors import ConfigError, describe_validation_error

TASKS = ("classification", "detection", "segmentation", "depth", "normals")
MANIFEST_NAMES = ("manifest.json", "dataset.yaml", "dataset.yml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassificationSource(_Strict):
    """ImageFolder: the images root holds one folder per class; the folder name is the class."""

    format: Literal["imagefolder"] = "imagefolder"


class DetectionSource(_Strict):
    """COCO JSON: boxes as [x, y, w, h] in pixels, optional instance masks (RLE or polygons)."""

    format: Literal["coco"] = "coco"
    annotations: str


class SegmentationSource(_Strict):
    """One PNG class map per image (mode L or P), named like the image's stem."""

    format: Literal["png"] = "png"
    root: str
    ignore_index: int = 255
    # ADE20K-style maps use 0 for "unlabeled" and 1..K for classes: shift them down by one.
    reduce_zero_label: bool = False


class DepthSource(_Strict):
    """One 16-bit PNG per image; metres = value / scale; 0 marks invalid depth."""

    format: Literal["png16"] = "png16"
    root: str
    scale: float = Field(1000.0, gt=0)


class NormalsSource(_Strict):
    """Surface normals in camera coordinates (x right, y down, z forward).

    ``png``: 8-bit RGB, n = v / 255 * 2 - 1, (0, 0, 0) marks invalid pixels.
    ``npy``: float array (H, W, 3), all-zero vectors mark invalid pixels.
    """

    format: Literal["png", "npy"] = "png"
    root: str


class SplitSpec(_Strict):
    images: str
    classification: ClassificationSource | None = None
    detection: DetectionSource | None = None
    segmentation: SegmentationSource | None = None
    depth: DepthSource | None = None
    normals: NormalsSource | None = None

    def tasks(self) -> list[str]:
        return [t for t in TASKS if getattr(self, t) is not None]


class DatasetSpec(_Strict):
    name: str = "dataset"
    splits: dict[str, SplitSpec]
    # Label vocabularies per task; read from the data (folders, COCO categories) when omitted.
    classes: dict[str, list[str]] = Field(default_factory=dict)
    # Free-form provenance (style, seed, render settings, ...).
    meta: dict = Field(default_factory=dict)


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


def load_spec(path: str | Path) -> tuple[DatasetSpec, Path]:
    """Load and validate a dataset description; returns it with the folder paths are relative to."""
    file = find_manifest(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{file}: cannot read dataset description: {err}") from err
    try:
        spec = DatasetSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            f"{file}: invalid dataset description:\n{describe_validation_error(err)}"
        ) from err
    return spec, file.parent
