"""Typed, validated configuration: one pydantic model per stage, loaded from YAML with
command-line overrides (``train.lr=0.02``). Errors name the file and the dotted key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from must.data.source import DataSource
from must.errors import ConfigError, describe_validation_error
from must.extends import deep_merge, resolve_extends
from must.models.backbone import RESNET, BackboneConfig
from must.tasks import TASK_TYPES


def _task_name(value: str) -> str:
    if value not in TASK_TYPES:
        raise ValueError(f"unknown task {value!r}; known tasks: {', '.join(TASK_TYPES)}")
    return value


# A registered task name (must.tasks); checked when validated, so tasks registered later count.
TaskName = Annotated[str, AfterValidator(_task_name)]


def _workers(value: Any) -> int | str:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto" or (type(value) is int and value >= 0):
        return value
    raise ValueError(f"{value!r}: give a number of loader worker processes (0 or more) or auto")


# Loader worker processes: a count, or ``auto`` (``must.training.data.resolve_workers``: half the
# usable CPUs, at most 8, none on two CPUs or fewer).
Workers = Annotated[int | Literal["auto"], PlainValidator(_workers)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AugmentConfig(_Strict):
    scale: tuple[float, float] = (0.35, 1.0)  # random resized crop: area fraction
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.2, ge=0)
    depth_scales_with_zoom: bool = True


class DataConfig(DataSource):
    # Where the images come from (DataSource: a dataset folder, or a scene-world style with
    # its render recipe and cache), then how they are read.
    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(64, ge=16, description="training/eval size after augmentation")
    # square: images resized/cropped to image_size x image_size; keep_aspect: the longer side
    # to image_size, aspect kept, batches padded; auto: keep_aspect for detection on a
    # dataset folder, square otherwise (scene-world styles render square images).
    resize: Literal["auto", "square", "keep_aspect"] = "auto"
    augment: AugmentConfig = AugmentConfig()
    num_workers: Workers = "auto"
    skip_bad: bool = False  # count and report bad samples instead of stopping
    # Part of a dataset folder: N images (an int) or a fraction (a float in (0, 1]) of each
    # split, or per split ({train: 5000, val: 0.1}; splits not named are used whole). A
    # seeded random subset: subset_seed always picks the same images. (num only counts
    # images rendered from a style.)
    subset: int | float | dict[str, int | float] | None = None
    subset_seed: int = 0

    @field_validator("subset")
    @classmethod
    def _subset_is_a_count_or_fraction(cls, subset: Any) -> Any:
        values = subset.values() if isinstance(subset, dict) else [subset]
        for v in values:
            if isinstance(v, bool) or (isinstance(v, int) and v < 1):
                raise ValueError(f"{v!r}: a subset is a number of images >= 1 or a fraction")
            if isinstance(v, float) and not 0 < v <= 1:
                raise ValueError(f"{v!r}: a subset fraction is in (0, 1]")
        return subset

    def subset_of(self, split: str) -> int | float | None:
        """The subset setting of one split (None: every image)."""
        if isinstance(self.subset, dict):
            return self.subset.get(split)
        return self.subset


class ModelConfig(_Strict):
    backbone: BackboneConfig = BackboneConfig()
    # Per-task head settings, e.g. {"detection": {"levels": ["p2", "p3"]}}.
    heads: dict[TaskName, dict[str, Any]] = {}

    @field_validator("heads")
    @classmethod
    def _head_settings_are_valid(cls, heads: dict[str, dict[str, Any]]) -> dict:
        # Checked with the config, so a typo stops the run before data is rendered or read.
        from must.tasks import TASK_TYPES

        for name, settings in heads.items():
            try:
                TASK_TYPES[name].config_type.model_validate(settings)
            except ValidationError as err:
                detail = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
                )
                raise ValueError(f"{name}: {detail}") from None
        return heads


class TrainConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.02, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(1000, ge=1)
    val_every: int = Field(250, ge=1, description="validate every N training steps")
    checkpoint_every: int = Field(100, ge=1, description="save last.ckpt every N steps")
    grad_clip: float | None = 10.0
    # auto: bf16 mixed precision on a GPU that supports it (else fp16); on a CPU bf16 where it
    # computes bf16 in hardware, else fp32 (docs/training.md, "Mixed precision").
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    seed: int = 0
    log_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _final_weights_are_validated(self) -> TrainConfig:
        if self.max_steps % self.val_every:
            raise ValueError(
                f"max_steps ({self.max_steps}) must be a multiple of val_every "
                f"({self.val_every}) so that the final weights are validated too"
            )
        return self


class TeachConfig(_Strict):
    """``must teach``: one specialized teacher, one task, one dataset."""

    task: TaskName
    data: DataConfig
    model: ModelConfig = ModelConfig()
    # Starting point: a must checkpoint (backbone, plus this task's head for a teacher), a
    # plain state dict of the backbone's body (torchvision/timm ResNet weights, or the timm
    # model's own), or None for random weights. ``must transfer``
    # sets it from --backbone and always starts a fresh head.
    init: str | None = None
    # Probe: keep the backbone (weights and batch-norm statistics) fixed, train the head only.
    freeze_backbone: bool = False
    # With freeze_backbone: compute the backbone's feature maps of the train and val images
    # once (the training images in the evaluation transform's fixed view, no augmentation)
    # and train and validate the head from that cache (docs/transfer.md). Not used when a
    # split's images differ in size or training runs in several processes (said on stdout).
    # No effect on fine-tuning.
    cache_features: bool = True
    train: TrainConfig = TrainConfig()


class LabeledSetConfig(DataSource):
    """A labelled dataset joined as it is (its own labels only, no pseudo labels): a folder,
    or a style rendered into ``cache`` (a :class:`~must.data.source.DataSource`)."""


class StudentDataConfig(_Strict):
    # Pseudo-labelled stores written by ``must label``: the unlabeled pool, and optionally the
    # teachers' own datasets labelled with ``--keep-real`` (real labels kept, pseudo elsewhere).
    stores: list[str] = []
    # Fraction of each store's images used (the first ones of its image list); None: all.
    store_fractions: list[float] | None = None
    # Labelled datasets joined with their own labels only. Without stores this is supervised
    # multi-task training on the union of the labelled sets (the baseline MuST is compared to).
    datasets: list[LabeledSetConfig] = []
    # Per-source sampling weights (stores first, then datasets); None: every image equally
    # likely (concatenate and shuffle).
    store_weights: list[float] | None = None
    image_size: int = Field(64, ge=16)
    augment: AugmentConfig = AugmentConfig()
    num_workers: Workers = "auto"


def _hand_weights() -> dict[str, float]:
    return {n: k.must_hand_weight for n, k in TASK_TYPES.items() if k.must_hand_weight is not None}


class LossConfig(_Strict):
    # A registered weighting (must.weighting): must, equal, fixed, uncertainty, dwa,
    # pcgrad. must: w_i = (b_s * lr_i) / (b_i * lr_s) from the teachers' batch sizes and
    # learning rates, with ``hand`` weights for the tasks MuST sets by hand (default: each
    # task's ``Task.must_hand_weight``, i.e. depth 1.0 as in the paper).
    kind: str = "must"
    hand: dict[TaskName, float] = Field(default_factory=lambda: _hand_weights())
    weights: dict[TaskName, float] = {}  # kind: fixed
    dwa_temperature: float = Field(2.0, gt=0)
    dwa_window: int = Field(50, ge=1)

    @field_validator("kind")
    @classmethod
    def _kind_is_registered(cls, kind: str) -> str:
        from must.weighting import weighting_names

        names = weighting_names()
        if kind not in names:
            raise ValueError(f"unknown loss weighting {kind!r}; known: {', '.join(names)}")
        return kind


class StudentConfig(_Strict):
    """``must train``: the multi-task student on pseudo-labelled stores."""

    data: StudentDataConfig = StudentDataConfig()
    model: ModelConfig = ModelConfig()
    # Starting point: a must checkpoint (backbone and the heads of matching tasks), or a
    # plain state dict of the backbone's body (as for a teacher). None: random weights.
    init: str | None = None
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()


class ViewsConfig(_Strict):
    """SimCLR's two random views of an image (crop, flip, colour distortion, grey)."""

    scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.5, ge=0, description="strength s: brightness etc. 0.8*s")
    color_jitter_prob: float = Field(0.8, ge=0, le=1)
    grayscale_prob: float = Field(0.2, ge=0, le=1)


class SimCLRConfig(_Strict):
    """``must pretrain``: SimCLR self-supervised pre-training on unlabelled images."""

    # The images (labels, if any, are not read): a folder or a style, as for a teacher.
    data: DataConfig
    views: ViewsConfig = ViewsConfig()
    model: ModelConfig = ModelConfig()
    projection_dim: int = Field(128, ge=1)
    hidden_dim: int | None = Field(None, ge=1, description="None: the C5 width")
    temperature: float = Field(0.2, gt=0)
    train: TrainConfig = TrainConfig()


C = TypeVar("C", bound=BaseModel)


def parse_value(text: str) -> Any:
    """One override value. Numbers, booleans, ``null`` and flow lists/mappings (``[p2, p3]``,
    ``{a: 1}``) or quoted strings are YAML; anything else is taken literally, so a path keeps
    a ``#`` or a ``: `` that YAML would read as a comment or a mapping."""
    stripped = text.strip()
    if not stripped:
        return None
    if stripped[:1] in ("[", "{", "'", '"'):
        return yaml.safe_load(stripped)
    try:
        value = yaml.safe_load(stripped)
    except yaml.YAMLError:
        return text
    if value is None and stripped not in ("null", "Null", "NULL", "~"):
        return text  # only a comment to YAML: keep what was typed
    return value if isinstance(value, (bool, int, float)) or value is None else text


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "model.heads.detection.levels=[p2,p3]"]`` -> nested dict (see
    :func:`parse_value` for how values are read)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=0.05")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted key like train.lr")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set twice")
        try:
            node[parts[-1]] = parse_value(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
    return out


def _leaf_paths(tree: dict[str, Any], prefix: tuple = ()) -> set[tuple]:
    """The key paths of a nested dict's values (which config keys the command line set)."""
    paths = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            paths |= _leaf_paths(value, (*prefix, key))
        else:
            paths.add((*prefix, key))
    return paths


def load_config(
    kind: type[C],
    path: str | Path | None,
    overrides: list[str] | None = None,
    merge: dict[str, Any] | None = None,
) -> C:
    """Load a YAML config (a file, or a preset name from ``configs/``), merge ``merge`` (a
    nested dict) and the ``KEY=VALUE`` overrides into it, and validate; a bad or unknown key
    is reported by its dotted name and, when it comes from the file, its line."""
    raw: dict[str, Any] = {}
    where = "command line"
    lines: dict[tuple, int] = {}
    if path is not None:
        file = resolve_preset(path)
        where = str(file)
        raw, lines = _read_config(file)
        # Line numbers are the file's own; a bad key it inherits is named without one.
        raw = resolve_extends(raw, where, _read_parent)
    raw = deep_merge(raw, merge or {})
    cli = parse_overrides(overrides or [])
    raw = deep_merge(raw, cli)
    try:
        return kind.model_validate(raw)
    except ValidationError as err:
        detail = describe_validation_error(err, lines, from_command_line=_leaf_paths(cli))
        raise ConfigError(f"{where}: invalid config:\n{detail}") from err


def _read_config(file: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    try:
        text = file.read_text()
        loaded = yaml.safe_load(text)
        lines = yaml_lines(text)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{file}: cannot read config: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{file}: a config must be a mapping of keys")
    return loaded, lines


def _read_parent(name: str, child: str) -> tuple[dict[str, Any], str]:
    """``extends: NAME``: a file relative to the child's folder, else a preset."""
    beside = Path(child).parent / name
    try:
        file = beside if beside.is_file() else resolve_preset(name)
    except ConfigError:
        raise ConfigError(
            f"{child}: extends {name!r}: no such file beside it, nor preset in {presets_dir()}"
        ) from None
    return _read_config(file)[0], str(file)


def yaml_lines(text: str) -> dict[tuple, int]:
    """Path of keys/indices -> 1-based line of that node in a YAML text."""
    out: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        out[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, (*path, key.value))
                out[(*path, key.value)] = key.start_mark.line + 1  # the key's line, not its value's
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return out


def presets_dir() -> Path:
    """``configs/`` of the source tree (presets ship with the repository)."""
    return Path(__file__).resolve().parents[2] / "configs"


def resolve_preset(path: str | Path) -> Path:
    file = Path(path)
    if file.exists():
        return file
    for candidate in (presets_dir() / f"{path}.yaml", presets_dir() / str(path)):
        if candidate.exists():
            return candidate
    raise ConfigError(f"{path}: no such config file or preset in {presets_dir()}")


def dump_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


# Settings of how a run executes, not of what it trains: a finished or interrupted run is
# still the same run when only these differ (runs written before ``num_workers: auto`` became
# the default recorded 0).
EXECUTION_ONLY = (("data", "num_workers"),)


def _head(task: str, settings: Any) -> Any:
    """A task's head settings with every default filled in (as given when they do not
    validate: they then compare as written)."""
    kind = TASK_TYPES.get(task)
    if kind is None or not isinstance(settings, dict):
        return settings
    try:
        return kind.config_type.model_validate(settings).model_dump(mode="json")
    except ValidationError:
        return settings


def same_run(recorded: Any, current: Any) -> bool:
    """Whether two configs (as loaded from YAML) describe the same training."""

    def strip(cfg: Any) -> Any:
        if not isinstance(cfg, dict):
            return cfg
        cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
        for section, key in EXECUTION_ONLY:
            if isinstance(cfg.get(section), dict):
                cfg[section].pop(key, None)
        # ``cache_features`` changes nothing without a frozen backbone; probes recorded before
        # the setting existed trained on augmented images, as ``cache_features: false`` does.
        if "freeze_backbone" in cfg:
            if not cfg["freeze_backbone"]:
                cfg.pop("cache_features", None)
            else:
                cfg.setdefault("cache_features", False)
        # Runs recorded before backbones had names trained the ResNet.
        model = cfg.get("model")
        if isinstance(model, dict) and isinstance(model.get("backbone"), dict):
            cfg["model"] = model = {**model, "backbone": {"name": RESNET, **model["backbone"]}}
        # A head setting written out at its default value trains the same head as one left out.
        if isinstance(model, dict) and isinstance(model.get("heads"), dict):
            cfg["model"] = {**model, "heads": {n: _head(n, h) for n, h in model["heads"].items()}}
        return cfg

    return strip(recorded) == strip(current)
