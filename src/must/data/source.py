"""Where a verb's images come from: one value for "a dataset folder, or a scene-world style
with its render recipe, rendered once into a cache". Every config section and command-line
flag that names data is this value (``data:`` of a training config, the experiment's pool and
transfer sets, ``must label --images``, ``must eval --data``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from must.errors import ConfigError, describe_validation_error

# The files that describe a dataset folder (must.data.spec reads them). Kept here so that
# naming a data source (the CLI's flags) does not import the task modules and torch.
MANIFEST_NAMES = ("manifest.json", "dataset.yaml", "dataset.yml")
DEFAULT_SPLITS = (0.8, 0.1, 0.1)  # train/val/test fractions of a rendered style


def is_dataset_folder(path: str | Path) -> bool:
    """A dataset description file, or a folder holding one (``manifest.json``/``dataset.yaml``).
    A YAML file that is a mapping without ``splits`` is a style file, not a description."""
    path = Path(path)
    if path.is_file():
        if path.name in MANIFEST_NAMES or path.suffix not in (".yaml", ".yml"):
            return True
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            return True  # the description's reader names the problem
        return not isinstance(raw, dict) or "splits" in raw
    return any((path / n).is_file() for n in MANIFEST_NAMES)


class DataSource(BaseModel):
    """A dataset folder, or the name (or YAML file) of a scene-world style that is rendered
    once, with ``num`` images of ``render_size`` pixels from ``render_seed``, into ``cache``
    (later runs with the same recipe reuse it). The recipe fields mean nothing for a folder."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    num: int = Field(2000, ge=1, description="images to render when dataset is a style")
    render_size: int = Field(64, ge=16)
    render_seed: int = 0
    # train/val/test fractions of the rendered images (as ``must data render --splits``): the
    # benchmark's downstream sets keep a small train split and a large test split.
    splits: tuple[float, float, float] = DEFAULT_SPLITS
    cache: str = "runs/data"

    @field_validator("splits")
    @classmethod
    def _splits_are_fractions(cls, splits: tuple[float, float, float]) -> tuple:
        if any(f < 0 for f in splits) or sum(splits) <= 0:
            raise ValueError(f"{list(splits)}: three non-negative fractions (train, val, test)")
        return splits

    @property
    def is_folder(self) -> bool:
        return is_dataset_folder(self.dataset)

    def prepare(self, progress: bool = True) -> Path:
        """The dataset folder: the folder as given, or the style rendered into the cache."""
        if self.is_folder:
            return Path(self.dataset)
        if Path(self.dataset).is_dir():
            raise ConfigError(
                f"{self.dataset}: this folder has no {' or '.join(MANIFEST_NAMES[:2])} "
                "describing its splits and labels; write a dataset.yaml (see docs/data.md, "
                "'Your own data'), or give a scene-world style name"
            )
        import torch

        from must.data.render import render_dataset
        from must.data.styles import load_style

        style = load_style(self.dataset)  # refuses unknown names with the list of styles
        name = f"{style.name}_n{self.num}_px{self.render_size}_seed{self.render_seed}"
        if tuple(self.splits) != DEFAULT_SPLITS:  # caches of the default recipe keep their names
            name += "_splits" + "-".join(f"{f:g}" for f in self.splits)
        out = Path(self.cache) / name
        render_dataset(
            self.dataset,
            out,
            self.num,
            self.render_size,
            seed=self.render_seed,
            splits=self.splits,
            workers=min(2, torch.get_num_threads()),
            progress=progress,
        )
        return out

    def recipe_fields(self) -> dict[str, Any]:
        """The source's own fields (a subclass's other settings left out), as a dict."""
        return {k: getattr(self, k) for k in DataSource.model_fields}


def parse_splits(text: str) -> list[float]:
    """``0.8,0.1,0.1`` -> three floats (``--splits``)."""
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.8,0.1,0.1: {err}") from err
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("expected three fractions: train,val,test")
    return parts


def add_source_arguments(parser: argparse.ArgumentParser, defaults: DataSource | None = None):
    """The command-line flags of a style's render recipe (``--num``, ``--render-size``,
    ``--render-seed``, ``--cache``), with the defaults of ``defaults``."""
    d = defaults or DataSource(dataset="-")
    group = parser.add_argument_group("when the data is a scene-world style")
    group.add_argument("--num", type=int, default=d.num, help="images to render")
    group.add_argument("--render-size", type=int, default=d.render_size, help="render size (px)")
    group.add_argument(
        "--render-seed", "--seed", dest="render_seed", type=int, default=d.render_seed,
        help="render seed",
    )  # fmt: skip
    group.add_argument(
        "--splits", type=parse_splits, default=list(d.splits),
        help="train,val,test fractions (default %(default)s)",
    )  # fmt: skip
    group.add_argument("--cache", default=d.cache, help="folder of rendered datasets")
    return group


def source_from_arguments(dataset: str | Path, args: argparse.Namespace) -> DataSource:
    """A source from a dataset/style argument and the flags :func:`add_source_arguments` made;
    a bad value is one line naming the flag."""
    fields: dict[str, Any] = {
        "dataset": str(dataset),
        "num": args.num,
        "render_size": args.render_size,
        "render_seed": args.render_seed,
        "splits": tuple(args.splits),
        "cache": str(args.cache),
    }
    try:
        return DataSource(**fields)
    except ValidationError as err:
        detail = describe_validation_error(err)
        for name in fields:  # name the flags, not the fields
            detail = detail.replace(f"{name}:", f"--{name.replace('_', '-')}:")
        raise ConfigError(f"data {dataset}:\n{detail}") from err


def as_source(data: str | Path | DataSource) -> DataSource:
    """``data`` as a source: a path or style name gets the default render recipe."""
    return data if isinstance(data, DataSource) else DataSource(dataset=str(data))
