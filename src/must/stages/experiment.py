"""``must run``: the whole method as stages in one run folder.

Stages: render/prepare data and train the ``teachers``, ``label`` the pool (and the teachers'
own sets, real labels kept), train the ``student``, the baselines (``simclr``,
``multitask``), the extra students of the paper's experiments (``scaling``: the pool cut to a
fraction; ``strong``: a student started from the multi-task baseline), ``transfer`` every
backbone to the downstream tasks, and write the ``report``. Each stage is a list of jobs with
their own output folder; a job whose output is complete is skipped, so an interrupted run
continues where it stopped. One run folder is one seed; ``must report`` merges several.

Layout of a run folder::

    experiment.yaml  stages.json  report.md  report.html  report/
    teachers/<task>/  stores/pool/  stores/<task>/
    student/  simclr/  multitask/  student_pool25/  student_from_multitask/
    transfer/<backbone>/<task>-<mode>/
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from must.checkpoint import SUMMARY_FILE
from must.config import (
    SimCLRConfig,
    StudentConfig,
    TaskName,
    TeachConfig,
    dump_yaml,
    load_config,
    presets_dir,
    same_run,
)
from must.data.source import DataSource
from must.data.styles import rendered_tasks
from must.errors import ConfigError, MustError, nearest_line
from must.files import write_bytes_atomic
from must.stages.label import label_setting_defaults

StageName = Literal[
    "teachers", "label", "student", "simclr", "multitask", "scaling", "strong", "transfer", "report"
]
STAGE_ORDER: tuple[str, ...] = StageName.__args__  # type: ignore[attr-defined]
STATUS_FILE = "stages.json"
EXPERIMENT_FILE = "experiment.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step(_Strict):
    """A verb's config: a preset name or YAML file, plus nested overrides."""

    config: str
    overrides: dict[str, Any] = {}


class PoolConfig(DataSource, _Strict):
    """The unlabelled pool every teacher labels (its train split), and SimCLR trains on."""

    dataset: str = "mixed"
    num: int = Field(2400, ge=1)
    render_seed: int = 1
    cache: str | None = None  # None: the experiment's data_cache


_LABEL_DEFAULTS = label_setting_defaults()  # from the task classes


class LabelStage(_Strict):
    det_threshold: float = _LABEL_DEFAULTS["det_threshold"]
    seg_threshold: float = _LABEL_DEFAULTS["seg_threshold"]
    temperature: float = _LABEL_DEFAULTS["temperature"]
    batch_size: int = 32
    shard_size: int = 256
    workers: int = 1
    # Also label each teacher's training set (real labels kept for its own task) and join it
    # to the pool: MuST's cross-dataset training.
    teacher_sets: bool = True


class TransferStage(DataSource, _Strict):
    # The downstream data (a DataSource), then what is transferred to it and how.
    dataset: str = "novel"
    num: int = Field(600, ge=1)
    render_seed: int = 2
    cache: str | None = None  # None: the experiment's data_cache
    # Default: every registered task the scene world renders.
    tasks: list[TaskName] = Field(default_factory=rendered_tasks)
    # finetune: every weight trains; probe: the backbone stays fixed, the head trains.
    modes: list[Literal["finetune", "probe"]] = ["finetune", "probe"]
    config: Step = Step(config="transfer_cpu")
    per_task: dict[TaskName, dict[str, Any]] = {}  # overrides for one task (e.g. its head)
    probe: dict[str, Any] = {}  # overrides for probe runs (e.g. a larger learning rate)
    # Overrides for one task in one mode, by "<task>-<mode>" (e.g. "detection-probe"): the
    # schedule chosen on validation for that column (docs/benchmark.md). Applied last.
    per_column: dict[str, dict[str, Any]] = {}

    @field_validator("per_column")
    @classmethod
    def _columns_are_task_mode(cls, per_column: dict[str, Any]) -> dict[str, Any]:
        from must.tasks import TASK_TYPES

        for column in per_column:
            task, _, mode = column.rpartition("-")
            if task not in TASK_TYPES or mode not in ("finetune", "probe"):
                raise ValueError(
                    f"{column!r}: a column is <task>-<mode>, e.g. detection-probe (tasks: "
                    f"{', '.join(TASK_TYPES)}; modes: finetune, probe)"
                )
        return per_column

    # scratch, teachers (each teacher), teacher:<task>, simclr, multitask, student, and the
    # extra students when their stages run (student_pool<percent>, student_from_multitask).
    backbones: list[str] = ["scratch", "teachers", "simclr", "multitask", "student"]


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 0
    # Where styles are rendered; None: inside the run folder. Seeds of one experiment can
    # share a cache (rendering does not depend on the seed).
    data_cache: str | None = None
    # The folder of your dataset folders: ``{data_root}`` in any string of the file (e.g. a
    # teacher's ``data.dataset: "{data_root}/coco"``) is replaced by it.
    data_root: str | None = None
    stages: list[StageName] = list(STAGE_ORDER)
    teachers: dict[TaskName, Step]
    pool: PoolConfig = PoolConfig()
    label: LabelStage = LabelStage()
    student: Step
    simclr: Step | None = None
    multitask: Step | None = None
    scaling: list[float] = []  # pool fractions of the extra students (e.g. [0.25, 0.5])
    transfer: TransferStage = TransferStage()

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        for f in self.scaling:
            if not 0 < f < 1:
                raise ValueError(f"scaling: {f} is not a fraction in (0, 1)")
        need = {"simclr": self.simclr, "multitask": self.multitask}
        for stage, spec in need.items():
            if stage in self.stages and spec is None:
                raise ValueError(f"stage {stage!r} is listed but the {stage}: section is missing")
        if "strong" in self.stages and self.multitask is None:
            raise ValueError("stage 'strong' starts from the multitask baseline: add multitask:")
        return self


def experiments_dir() -> Path:
    return presets_dir() / "experiments"


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment file, or a preset name (``quickstart``, ``mini``, ``gpu``), validated
    with every reference checked before anything runs (errors name the line)."""
    file = Path(path)
    if not file.exists():
        candidate = experiments_dir() / f"{path}.yaml"
        if not candidate.exists():
            names = sorted(p.stem for p in experiments_dir().glob("*.yaml"))
            raise ConfigError(f"{path}: no such experiment file or preset ({', '.join(names)})")
        file = candidate
    cfg = fill_data_root(load_config(ExperimentConfig, file, overrides), file)
    check_references(cfg, file)
    return cfg


DATA_ROOT = "{data_root}"


def fill_data_root(cfg: ExperimentConfig, file: Path) -> ExperimentConfig:
    """``cfg`` with ``{data_root}`` replaced by ``data_root`` in every string."""

    def fill(node: Any, keys: tuple) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, (*keys, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v, (*keys, i)) for i, v in enumerate(node)]
        if isinstance(node, str) and DATA_ROOT in node:
            if cfg.data_root is None:
                raise ConfigError(
                    f"{_line(file, *keys)}: {'.'.join(map(str, keys))}: {node!r} names "
                    "{data_root}: give the folder of your dataset folders, e.g. "
                    "data_root=/data/real"
                )
            return node.replace(DATA_ROOT, cfg.data_root)
        return node

    raw = cfg.model_dump()
    filled = fill(raw, ())
    return cfg if filled == raw else ExperimentConfig.model_validate(filled)


def _line(file: Path, *keys: Any) -> str:
    from must.config import yaml_lines

    line = nearest_line(yaml_lines(file.read_text()), keys)
    return str(file) if line is None else f"{file}, line {line}"


def backbone_names(cfg: ExperimentConfig) -> list[str]:
    """The transfer stage's backbones, ``teachers`` expanded to one per teacher."""
    names: list[str] = []
    for name in cfg.transfer.backbones:
        names += [f"teacher:{t}" for t in cfg.teachers] if name == "teachers" else [name]
    return names


def pool_student(fraction: float) -> str:
    """The folder (and backbone name) of the student trained on a fraction of the pool."""
    return f"student_pool{round(fraction * 100)}"


def extra_students(cfg: ExperimentConfig) -> list[str]:
    names = [pool_student(f) for f in cfg.scaling] if "scaling" in cfg.stages else []
    return names + (["student_from_multitask"] if "strong" in cfg.stages else [])


def check_references(cfg: ExperimentConfig, file: Path) -> None:
    """Refuse, before anything runs, references the experiment cannot satisfy."""
    from must.data.styles import builtin_style_names, load_style

    known = {"scratch", "simclr", "multitask", "student", *extra_students(cfg)}
    for i, name in enumerate(cfg.transfer.backbones):
        if name == "teachers":
            continue
        if name.startswith("teacher:"):
            if name.split(":", 1)[1] not in cfg.teachers:
                raise ConfigError(
                    f"{_line(file, 'transfer', 'backbones', i)}: transfer.backbones.{i}: "
                    f"{name!r} names a missing teacher (teachers: {', '.join(cfg.teachers)})"
                )
            continue
        if name not in known:
            raise ConfigError(
                f"{_line(file, 'transfer', 'backbones', i)}: transfer.backbones.{i}: unknown "
                f"backbone {name!r} (known: teachers, teacher:<task>, {', '.join(sorted(known))})"
            )
        if name in ("simclr", "multitask") and getattr(cfg, name) is None:
            raise ConfigError(
                f"{_line(file, 'transfer', 'backbones', i)}: transfer.backbones.{i}: {name!r} "
                f"needs the {name}: section"
            )
    for task in cfg.transfer.per_task:
        try:
            DataSource(**{**_task_recipe(cfg.transfer, task), "cache": "."})
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(map(str, err["loc"]))
            raise ConfigError(
                f"{_line(file, 'transfer', 'per_task', task, 'data', *err['loc'])}: "
                f"transfer.per_task.{task}.data.{field}: {err['msg']}"
            ) from None
    for i, task in enumerate(cfg.transfer.tasks):
        dataset = _task_recipe(cfg.transfer, task)["dataset"]
        if dataset in builtin_style_names() and task not in (can := load_style(dataset).tasks):
            raise ConfigError(
                f"{_line(file, 'transfer', 'tasks', i)}: transfer.tasks.{i}: the style "
                f"{dataset!r} cannot render {task} labels (it has: {', '.join(can)})"
            )
    for task, step in cfg.teachers.items():
        teacher = load_config(TeachConfig, step.config, merge=step.overrides)
        if teacher.task != task:
            raise ConfigError(
                f"{_line(file, 'teachers', task)}: teachers.{task}: its config "
                f"{step.config!r} trains a {teacher.task} teacher"
            )


# --- jobs -------------------------------------------------------------------------------


@dataclass
class Job:
    stage: str
    name: str
    out: Path
    run: Callable[[], Any]
    done: Callable[[], bool]


def _trained(stage: str, name: str, out: Path, train: Callable, cfg: BaseModel) -> Job:
    """A training job (teach, train, pretrain): complete when its summary exists for this very
    config. A folder trained with another config is not skipped: the verb refuses it, so a
    changed experiment never silently reuses a stale model."""
    text = dump_yaml(cfg)

    def done() -> bool:
        config = out / "config.yaml"
        if not ((out / SUMMARY_FILE).is_file() and config.is_file()):
            return False
        return same_run(yaml.safe_load(config.read_text()), yaml.safe_load(text))

    return Job(stage, name, out, lambda: train(cfg, out), done)


def _store_done(out: Path) -> Callable[[], bool]:
    def done() -> bool:
        manifest = out / "manifest.json"
        return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))

    return done


class Experiment:
    """The jobs of one experiment in one run folder."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        out: str | Path,
        progress: bool = True,
        stages: list[str] | None = None,
    ) -> None:
        self.cfg = cfg
        stages = cfg.stages if stages is None else stages
        self.running_extras = any(s in stages for s in ("scaling", "strong"))
        self.out = Path(out)
        self.progress = progress
        self.cache = cfg.data_cache or str(self.out / "data")

    # configs of each job, with the run's seed and data cache imposed
    def teacher_config(self, task: str) -> TeachConfig:
        step = self.cfg.teachers[task]
        merge = _merge(step.overrides, {"data": {"cache": self.cache}, "train": _seed(self)})
        return load_config(TeachConfig, step.config, merge=merge)

    def source(self, data: DataSource) -> DataSource:
        """The recipe of ``data`` alone, rendered into the experiment's cache unless it
        names its own."""
        return DataSource(**{**data.recipe_fields(), "cache": data.cache or self.cache})

    def pool_folder(self) -> Path:
        return self.source(self.cfg.pool).prepare(progress=self.progress)

    def stores(self) -> list[Path]:
        extra = (
            [self.out / "stores" / t for t in self.cfg.teachers]
            if self.cfg.label.teacher_sets
            else []
        )
        return [self.out / "stores" / "pool", *extra]

    def student_config(self, fraction: float = 1.0, init: str | None = None) -> StudentConfig:
        step = self.cfg.student
        stores = [str(s) for s in self.stores()]
        data: dict[str, Any] = {"stores": stores}
        if fraction < 1:
            data["store_fractions"] = [fraction] + [1.0] * (len(stores) - 1)
        merge = _merge(step.overrides, {"data": data, "train": _seed(self)})
        if init is not None:
            merge["init"] = init
        return load_config(StudentConfig, step.config, merge=merge)

    def multitask_config(self) -> StudentConfig:
        assert self.cfg.multitask is not None
        step = self.cfg.multitask
        datasets = []
        for task in self.cfg.teachers:
            datasets.append(self.teacher_config(task).data.recipe_fields())
        merge = _merge(step.overrides, {"data": {"datasets": datasets}, "train": _seed(self)})
        return load_config(StudentConfig, step.config, merge=merge)

    def simclr_config(self) -> SimCLRConfig:
        assert self.cfg.simclr is not None
        step = self.cfg.simclr
        data = self.source(self.cfg.pool).recipe_fields()
        merge = _merge(step.overrides, {"data": data, "train": _seed(self)})
        return load_config(SimCLRConfig, step.config, merge=merge)

    def backbone_path(self, name: str) -> str | None:
        if name == "scratch":
            return None
        if name.startswith("teacher:"):
            return str(self.out / "teachers" / name.split(":", 1)[1])
        return str(self.out / name)

    def transfer_source(self, task: str) -> DataSource:
        """``task``'s downstream data: the transfer set, with the recipe fields that
        ``transfer.per_task.<task>.data`` sets (e.g. its own style) in place of its own."""
        recipe = _task_recipe(self.cfg.transfer, task)
        return DataSource(**{**recipe, "cache": recipe["cache"] or self.cache})

    def transfer_config(self, backbone: str, task: str, mode: str) -> TeachConfig:
        t = self.cfg.transfer
        merge = _merge(
            t.config.overrides,
            t.per_task.get(task, {}),
            t.probe if mode == "probe" else {},
            t.per_column.get(f"{task}-{mode}", {}),
            {
                "task": task,
                "data": self.transfer_source(task).recipe_fields(),
                "init": self.backbone_path(backbone),
                "freeze_backbone": mode == "probe",
                "train": _seed(self),
            },
        )
        return load_config(TeachConfig, t.config.config, merge=merge)

    # the jobs of each stage
    def jobs(self, stage: str) -> list[Job]:
        from must.stages.label import LabelSettings, label_images
        from must.stages.pretrain import pretrain_simclr
        from must.stages.teach import teach
        from must.stages.train import train_student

        cfg, out, progress = self.cfg, self.out, self.progress

        def teacher(c: TeachConfig, d: Path) -> Any:
            return teach(c, d, progress=progress)

        def transfer(c: TeachConfig, d: Path) -> Any:
            return teach(c, d, progress=progress, stage="transfer")

        def student(c: StudentConfig, d: Path) -> Any:
            return train_student(c, d, progress=progress)

        def simclr(c: SimCLRConfig, d: Path) -> Any:
            return pretrain_simclr(c, d, progress=progress)

        jobs: list[Job] = []
        if stage == "teachers":
            for task in cfg.teachers:
                d = out / "teachers" / task
                jobs.append(_trained(stage, task, d, teacher, self.teacher_config(task)))
        elif stage == "label":
            lb = cfg.label
            settings = LabelSettings(
                det_threshold=lb.det_threshold,
                seg_threshold=lb.seg_threshold,
                temperature=lb.temperature,
            )
            teachers = [str(out / "teachers" / t) for t in cfg.teachers]
            common = {
                "settings": settings,
                "shard_size": lb.shard_size,
                "batch_size": lb.batch_size,
                "workers": lb.workers,
                "progress": progress,
            }
            d = out / "stores" / "pool"
            jobs.append(
                Job(
                    stage,
                    "pool",
                    d,
                    lambda d=d: label_images(teachers, self.pool_folder(), d, **common),
                    _store_done(d),
                )
            )
            if lb.teacher_sets:
                for task in cfg.teachers:
                    d = out / "stores" / task
                    data = self.teacher_config(task).data

                    def run(d: Path = d, data=data) -> Any:
                        folder = data.prepare(progress=progress)
                        return label_images(teachers, folder, d, keep_real=True, **common)

                    jobs.append(Job(stage, task, d, run, _store_done(d)))
        elif stage == "student":
            jobs.append(_trained(stage, "student", out / "student", student, self.student_config()))
        elif stage == "simclr":
            jobs.append(_trained(stage, "simclr", out / "simclr", simclr, self.simclr_config()))
        elif stage == "multitask":
            c = self.multitask_config()
            jobs.append(_trained(stage, "multitask", out / "multitask", student, c))
        elif stage == "scaling":
            for f in cfg.scaling:
                d = out / pool_student(f)
                jobs.append(_trained(stage, d.name, d, student, self.student_config(fraction=f)))
        elif stage == "strong":
            d = out / "student_from_multitask"
            c = self.student_config(init=str(out / "multitask"))
            jobs.append(_trained(stage, d.name, d, student, c))
        elif stage == "transfer":
            # The extra students join once trained, or when their stage runs in this call
            # (``--only transfer`` after the main stages must not wait for them).
            backbones = backbone_names(cfg)
            backbones += [
                b
                for b in extra_students(cfg)
                if b not in backbones
                and (self.running_extras or (out / b / SUMMARY_FILE).is_file())
            ]
            for backbone in backbones:
                for task in cfg.transfer.tasks:
                    for mode in cfg.transfer.modes:
                        d = out / "transfer" / backbone.replace(":", "_") / f"{task}-{mode}"
                        c = self.transfer_config(backbone, task, mode)
                        jobs.append(_trained(stage, f"{backbone} {task} {mode}", d, transfer, c))
        elif stage == "report":
            from must.stages.report import write_report

            jobs.append(Job(stage, "report", out, lambda: write_report([out], out), lambda: False))
        return jobs


def _task_recipe(t: TransferStage, task: str) -> dict[str, Any]:
    """The transfer set's recipe fields (dataset, num, splits, ...) with those that
    ``transfer.per_task.<task>.data`` sets in their place."""
    data = t.per_task.get(task, {}).get("data") or {}
    return {**t.recipe_fields(), **{k: v for k, v in data.items() if k in DataSource.model_fields}}


def _seed(exp: Experiment) -> dict[str, Any]:
    return {"seed": exp.cfg.seed}


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    from must.extends import deep_merge

    out: dict[str, Any] = {}
    for part in parts:
        out = deep_merge(out, part)
    return out


class StageFailed(MustError):
    """A stage failed; the outputs of earlier stages and finished jobs are kept."""


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    progress: bool = True,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Run the experiment's stages in order, skipping jobs whose outputs are complete.
    Returns the stage status (also written to ``stages.json``)."""
    unknown = [s for s in only or [] if s not in STAGE_ORDER]
    if unknown or only == []:
        raise ConfigError(
            f"only: {', '.join(unknown) or 'no stage given'}; the stages are "
            f"{', '.join(STAGE_ORDER)}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPERIMENT_FILE).write_text(dump_yaml(cfg))
    status_file = out / STATUS_FILE
    status: dict[str, Any] = json.loads(status_file.read_text()) if status_file.is_file() else {}
    stages = [s for s in STAGE_ORDER if s in cfg.stages and (only is None or s in only)]
    experiment = Experiment(cfg, out, progress, stages)
    for stage in stages:
        record: dict[str, Any] = {"jobs": {}, "seconds": 0.0}
        start = time.perf_counter()
        try:
            jobs = experiment.jobs(stage)
            for job in jobs:
                if job.done():
                    print(f"[{stage}] {job.name}: complete, skipped")
                    record["jobs"][job.name] = "skipped (complete)"
                    continue
                print(f"[{stage}] {job.name} -> {job.out}")
                job_start = time.perf_counter()
                job.run()
                record["jobs"][job.name] = f"done in {time.perf_counter() - job_start:.1f} s"
        except Exception as err:
            record["status"] = "failed"
            record["error"] = f"{type(err).__name__}: {err}"
            record["seconds"] = round(time.perf_counter() - start, 1)
            status[stage] = record
            _write_status(status_file, status)
            if not isinstance(err, MustError):
                traceback.print_exc()
            raise StageFailed(
                f"stage {stage!r} failed: {err}\n(the outputs of the earlier stages and of this "
                f"stage's finished jobs are kept in {out}; re-run the same command to continue)"
            ) from err
        record["status"] = "done"
        record["seconds"] = round(time.perf_counter() - start, 1)
        # Compute spent on the stage over every invocation (a resumed run adds its part).
        before = status.get(stage, {})
        record["total_seconds"] = round(
            before.get("total_seconds", before.get("seconds", 0.0)) + record["seconds"], 1
        )
        status[stage] = record
        _write_status(status_file, status)
    return status


def _write_status(path: Path, status: dict[str, Any]) -> None:
    write_bytes_atomic(path, (json.dumps(status, indent=2) + "\n").encode("utf-8"))
