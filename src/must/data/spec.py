"""The dataset description shared by rendered datasets (``manifest.json``) and user data
(``dataset.yaml``): where the images are and, per task, where its labels are and how they
are encoded. Label files are matched to images by their path relative to the label folder
(folders mirroring the image tree), else by file stem (see :mod:`must.data.readers`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from must.errors import ConfigError, describe_validation_error
from must.tasks import TASK_TYPES

# The registered task names, in registration order (a live view: tasks registered later count).
TASKS = TASK_TYPES.keys()
MANIFEST_NAMES = ("manifest.json", "dataset.yaml", "dataset.yml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassificationSource(_Strict):
    """ImageFolder: the images root holds one folder per class; the folder name is the class.

    ``labels``: a file of ``image class`` lines instead (whitespace- or comma-separated; the
    image by its path under the images folder, with or without extension, or its file name;
    only the first word of the class field counts, so ImageNet's ``LOC_val_solution.csv``
    works as it is). A first line naming no image is taken for a header."""

    format: Literal["imagefolder"] = "imagefolder"
    labels: str | None = None


class DetectionSource(_Strict):
    """COCO JSON: boxes as [x, y, w, h] in pixels, optional instance masks (RLE or polygons)."""

    format: Literal["coco"] = "coco"
    annotations: str


class SegmentationSource(_Strict):
    """``png``: one class map per image (mode L or P) in ``root``.

    ``coco``: class maps rasterised from a COCO instances JSON (``annotations``): pixels no
    annotation covers are the ``background`` class (or the ignore value when ``background``
    is null); crowd regions and annotations without a mask are the ignore value; where
    instances overlap, the smaller one wins (equal areas: the later in the file)."""

    format: Literal["png", "coco"] = "png"
    root: str | None = None
    annotations: str | None = None
    ignore_index: int = 255
    # ADE20K-style maps use 0 for "unlabeled" and 1..K for classes: shift them down by one.
    reduce_zero_label: bool = False
    background: str | None = "background"

    @model_validator(mode="after")
    def _source_is_named(self) -> SegmentationSource:
        if self.format == "png" and self.root is None:
            raise ValueError("format 'png' needs root (the folder of class-map PNGs)")
        if self.format == "coco" and self.annotations is None:
            raise ValueError("format 'coco' needs annotations (the COCO instances JSON)")
        return self


class DepthSource(_Strict):
    """One 16-bit PNG per image; metres = value / scale; 0 marks invalid depth, and so do the
    raw values listed in ``invalid`` (e.g. a sensor's saturation code) and depths beyond
    ``max_depth`` metres.

    Depth files are found in ``root`` (by relative path, else by stem), or listed in a
    ``pairs`` file: TUM-style ``associations.txt`` lines ``time rgb/x.png time depth/y.png``
    (or ``rgb/x.png depth/y.png``), or a CSV of ``image,depth`` rows; paths in it are relative
    to the pairs file."""

    format: Literal["png16"] = "png16"
    root: str | None = None
    pairs: str | None = None
    scale: float = Field(1000.0, gt=0)
    invalid: list[int] = Field(default_factory=list)
    max_depth: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _files_are_named(self) -> DepthSource:
        if (self.root is None) == (self.pairs is None):
            raise ValueError("give one of root (a folder of depth PNGs) or pairs (a pairs file)")
        bad = [v for v in self.invalid if not 0 <= v <= 65535]
        if bad:
            raise ValueError(f"invalid values {bad} are not 16-bit values (0..65535)")
        return self


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
        return [t for t in TASKS if getattr(self, t, None) is not None]


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
