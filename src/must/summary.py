"""What a run records: the ``info`` of a model file and of its ``summary.json``, typed.

Every training verb (``must teach``/``transfer``, ``must train``, ``must pretrain``) writes a
:class:`RunInfo`; every reader (label, eval, the student's MuST weights and references, the
report) reads one through attributes. Fields a stage does not use are left out of the file
(as before), and fields unknown here are kept, so older and newer files keep loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from must.errors import ConfigError, describe_validation_error

Metrics = dict[str, dict[str, float]]  # task -> metric -> value


class _Record(BaseModel):
    # Unknown keys are kept (files of other versions), types of known ones are checked.
    model_config = ConfigDict(extra="allow")


class TaskTraining(_Record):
    """How one task was trained: the scale MuST's loss weights match, and the data."""

    dataset: str | list[str]  # a dataset folder (a teacher) or the stores and folders joined
    dataset_name: str | None = None
    train_images: int | None = None
    batch_size: int
    lr: float
    image_size: int | None = None


class Pretraining(_Record):
    """Self-supervised pre-training (SimCLR)."""

    method: str
    dataset: str
    train_images: int
    batch_size: int
    lr: float
    temperature: float | None = None


class FeatureCacheInfo(_Record):
    """A probe trained and validated from cached backbone features (must.training.feature_cache)."""

    train_images: int
    val_images: int | None = None
    mb: float  # the feature maps of both splits in memory, 2**20 bytes


class SkippedSample(_Record):
    split: str | None = None
    path: str
    reason: str


class RunInfo(_Record):
    stage: str | None = None  # teacher, transfer, student, multitask, simclr
    training: dict[str, TaskTraining] = {}
    pretraining: Pretraining | None = None
    image_size: int | None = None  # the input side the model was trained at
    resize: str | None = None  # square, keep_aspect or mixed: how images were fitted
    init: dict[str, Any] | None = None  # what the weights started from
    freeze_backbone: bool | None = None
    feature_cache: FeatureCacheInfo | None = None  # None: trained from images
    loss_weighting: dict[str, Any] | None = None
    evaluated_on: dict[str, str] = {}  # task -> the dataset its val/test metrics come from
    score_reference: dict[str, float] = {}  # multi-task checkpoint selection's references
    untested: list[str] = []
    skipped: list[SkippedSample] = []
    val: Metrics = {}
    test: Metrics = {}
    test_records: dict[str, str] = {}  # task -> its per-image test records, under the run
    train_seconds: float | None = None
    images_per_second: float | None = None
    steps: int | None = None
    resumed_from_step: int | None = None
    best_checkpoint: str | None = None
    precision: str | None = None
    final_loss: float | None = None
    config: dict[str, Any] = {}

    def to_json(self) -> dict[str, Any]:
        """The dict written to files: only the fields this run set."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def read(cls, info: Any, source: str | Path) -> RunInfo:
        """Validate a file's ``info`` (errors name the file and the field)."""
        if isinstance(info, RunInfo):
            return info
        try:
            return cls.model_validate(info if info is not None else {})
        except ValidationError as err:
            raise ConfigError(
                f"{source}: its run info is not what must writes (keys under info):\n"
                f"{describe_validation_error(err)}"
            ) from err


def run_info(payload: dict[str, Any], source: str | Path) -> RunInfo:
    """The typed ``info`` of a model file's payload or of a ``summary.json``."""
    return RunInfo.read(payload.get("info"), source)
