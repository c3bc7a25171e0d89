"""``must train``: the multi-task student on pseudo-labelled stores (step 3 of MuST), and
``must export``: a checkpoint's backbone as a plain state dict."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import (
    ConcatDataset,
    Dataset,
    RandomSampler,
    Sampler,
    Subset,
    WeightedRandomSampler,
)

from must.checkpoint import SUMMARY_FILE, check_init, initialise, save_model
from must.config import DataConfig, StudentConfig, dump_yaml
from must.data.readers import MultiTaskDataset, skip_report
from must.data.spec import load_spec
from must.errors import ConfigError
from must.models.model import MultiTaskModel
from must.stages.common import claim_output
from must.store.dataset import StoreDataset
from must.summary import RunInfo, run_info
from must.tasks import Task, build_task
from must.training.data import (
    augmentation,
    make_dataset,
    make_loader,
    print_notes,
)
from must.training.fit import fit_and_test, resolve_precision
from must.training.module import MultiTaskModule
from must.weighting import (
    LossWeighting,
    WeightingContext,
    build_weighting,
    planned_processes,
    refuse_own_backward,
)


def open_stores(cfg: StudentConfig) -> list[StoreDataset]:
    transform = augmentation(cfg.data.augment, cfg.data.image_size, train=True)
    stores = [StoreDataset(path, transform, heads=cfg.model.heads) for path in cfg.data.stores]
    for store in stores:
        # Every shard is checked against its checksum here, once, so that a damaged store is
        # refused before training (loader workers inherit the result and never re-hash).
        store.store.check_shards()
    for other in stores[1:]:
        first = stores[0]
        for task in set(first.tasks) | set(other.tasks):
            a, b = first.tasks.get(task), other.tasks.get(task)
            if a is None or b is None or a.classes != b.classes:
                raise ConfigError(
                    f"stores {first.root} and {other.root} disagree on {task}: "
                    f"{a.classes if a else 'absent'} vs {b.classes if b else 'absent'}"
                )
    return stores


def _resize(stores: list[StoreDataset], datasets: list[MultiTaskDataset]) -> str:
    """How the student's training images were fitted to its input size."""
    modes = {d.resize for d in datasets} | ({"square"} if stores else set())
    return modes.pop() if len(modes) == 1 else "mixed"


def open_datasets(cfg: StudentConfig, progress: bool) -> list[MultiTaskDataset]:
    """The labelled datasets of ``data.datasets``, each with its own labels only."""
    out = []
    for i, spec in enumerate(cfg.data.datasets):
        dcfg = DataConfig(
            **spec.model_dump(), image_size=cfg.data.image_size, augment=cfg.data.augment
        )
        ds = make_dataset(dcfg.prepare(progress), "train", dcfg, train=True)
        if not ds.tasks:
            why = "; ".join(ds.unusable.values())
            raise ConfigError(
                f"data.datasets.{i}: {ds.manifest} has no labels to train on"
                + (f" (unusable: {why})" if why else "")
            )
        out.append(ds)
    return out


def joined_tasks(
    stores: list[StoreDataset], datasets: list[MultiTaskDataset]
) -> dict[str, list[str] | None]:
    """Task name -> classes over every source; sources that disagree are refused."""
    tasks: dict[str, list[str] | None] = {}
    where: dict[str, str] = {}
    named = [(str(s.root), {n: t.classes for n, t in s.tasks.items()}) for s in stores]
    named += [(str(d.manifest), {n: d.classes.get(n) for n in d.tasks}) for d in datasets]
    for source, classes in named:
        for task, names in classes.items():
            if task in tasks and list(tasks[task] or []) != list(names or []):
                raise ConfigError(
                    f"{source} and {where[task]} disagree on the {task} classes: "
                    f"{names} vs {tasks[task]}"
                )
            tasks[task], where[task] = names, source
    for task in tasks:
        labelled = sum(
            c.get("pseudo", 0) + c.get("real", 0)
            for c in (s.store.summary()["tasks"].get(task, {}) for s in stores)
        ) + sum(len(d) for d in datasets if task in d.tasks)
        if labelled == 0:
            raise ConfigError(f"no image of the joined stores and datasets has a {task} label")
    return tasks


def first_images(dataset: Dataset, fraction: float) -> Dataset:
    """The first ``fraction`` of a dataset's images (a store's image list is in a fixed,
    already random order, so this is a random subset that nests as the fraction grows)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"data.store_fractions: {fraction} is not in (0, 1]")
    return (
        dataset if fraction == 1 else Subset(dataset, range(max(1, round(len(dataset) * fraction))))
    )


def teacher_summaries(stores: list[StoreDataset]) -> dict[str, RunInfo]:
    """Per task, the run info of the teacher that labelled it (its summary.json, found from
    the store's header)."""
    out: dict[str, RunInfo] = {}
    for ds in stores:
        for teacher in ds.store.teachers:
            summary_file = Path(teacher["path"])
            # The store records the model file (model.safetensors, or an older model.pt).
            if summary_file.suffix in (".safetensors", ".pt"):
                summary_file = summary_file.parent
            summary_file = summary_file / SUMMARY_FILE
            if not summary_file.is_file():
                continue
            summary = json.loads(summary_file.read_text())
            for task in teacher.get("tasks", []):
                classes = summary["tasks"].get(task, {}).get("classes")
                if classes and classes != ds.tasks[task].classes:
                    raise ConfigError(
                        f"{ds.root}: {task} classes {ds.tasks[task].classes} differ from its "
                        f"teacher's {classes} ({summary_file})"
                    )
                out.setdefault(task, run_info(summary, summary_file))
    return out


def make_weighting(
    cfg: StudentConfig, tasks: list[str], teachers: dict[str, RunInfo]
) -> tuple[LossWeighting, dict]:
    """The loss weighting ``loss.kind`` names (from the registry), and how it resolved."""
    context = WeightingContext(tasks, cfg.loss, cfg.train, teachers)
    weighting, resolved = build_weighting(cfg.loss.kind, context)
    if weighting.owns_backward:  # refused before any data is read (checked again at fit)
        refuse_own_backward(
            cfg.loss.kind, planned_processes(cfg.train), resolve_precision(cfg.train)
        )
    return weighting, resolved


def teacher_references(tasks: dict[str, Task], teachers: dict[str, RunInfo]) -> dict[str, float]:
    """Per task, its teacher's validation value of the primary metric (where the teacher's
    summary has one): what the student's multi-task selection score compares with."""
    out = {}
    for name, task in tasks.items():
        teacher = teachers.get(name)
        value = teacher.val.get(name, {}).get(task.primary_metric) if teacher else None
        if isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def joined_sampler(sizes: list[int], weights: list[float] | None, seed: int = 0) -> Sampler[int]:
    """Draws over the concatenated sources: uniform over images (each once per epoch, in a
    seeded shuffle, so each source comes up in proportion to its size) unless ``weights``."""
    if weights is not None:
        return store_sampler(sizes, weights, seed)
    return RandomSampler(range(sum(sizes)), generator=torch.Generator().manual_seed(seed))


def store_sampler(sizes: list[int], weights: list[float], seed: int = 0) -> WeightedRandomSampler:
    """Draw store ``i`` with probability ``weights[i] / sum(weights)`` whatever its size
    (images within a store uniformly); one epoch is as many draws as there are images."""
    if len(weights) != len(sizes) or min(weights) <= 0:
        raise ConfigError(
            f"data.store_weights: one positive weight per store ({len(sizes)} stores), "
            f"got {weights}"
        )
    per_image = torch.cat([torch.full((n,), w / n) for n, w in zip(sizes, weights, strict=True)])
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(per_image, num_samples=len(per_image), generator=generator)


def train_student(
    cfg: StudentConfig, out: str | Path, overwrite: bool = False, progress: bool = True
) -> dict | None:
    """Train the student; writes ``model.safetensors`` and ``summary.json`` into ``out``.
    Under a multi-process strategy the processes other than global rank 0 return None."""
    out = Path(out)
    if cfg.init is not None:
        check_init(cfg.init)
    if claim_output(out, dump_yaml(cfg), overwrite):
        print(f"{out}: this student is already trained; nothing to do")
        return json.loads((out / SUMMARY_FILE).read_text())
    if not cfg.data.stores and not cfg.data.datasets:
        raise ConfigError("data.stores: give at least one store (--store STORE) or dataset")
    stores = open_stores(cfg)
    datasets = open_datasets(cfg, progress)
    classes = joined_tasks(stores, datasets)
    names = list(classes)
    teachers = teacher_summaries(stores)
    weighting, resolved = make_weighting(cfg, names, teachers)
    print(f"loss weighting: {resolved}")
    tasks = {n: build_task(n, classes[n], cfg.model.heads.get(n)) for n in names}
    model = MultiTaskModel(cfg.model.backbone, tasks)
    started = initialise(model, cfg.init) if cfg.init else None

    tc = cfg.train
    fractions = cfg.data.store_fractions or [1.0] * len(stores)
    if len(fractions) != len(stores):
        raise ConfigError(
            f"data.store_fractions: one fraction per store ({len(stores)}), got {fractions}"
        )
    sources: list[Dataset] = [first_images(s, f) for s, f in zip(stores, fractions, strict=True)]
    sources += datasets
    joined = ConcatDataset(sources)
    train_loader = make_loader(
        joined,
        tasks,
        tc.batch_size,
        cfg.data.num_workers,
        train=True,
        seed=tc.seed,  # workers' augmentation seeds
        accelerator=tc.accelerator,
        sampler=joined_sampler([len(s) for s in sources], cfg.data.store_weights, tc.seed),
        what="the joined training set",
    )

    # Checkpoints are selected on, and finally tested on, each teacher's own val/test splits
    # (for a task no teacher labelled: the val/test splits of the dataset that has it).
    val_loaders, test_loaders, eval_sets = [], [], {}
    untested: list[str] = []
    read: list[MultiTaskDataset] = list(datasets)
    own = {t: str(d.manifest.parent) for d in reversed(datasets) for t in d.tasks}
    for name in names:
        if name in teachers:
            dataset = teachers[name].training[name].dataset
        elif name in own:
            dataset = own[name]
        else:
            continue
        dcfg = DataConfig(dataset=dataset, image_size=cfg.data.image_size)
        for split, loaders in (("val", val_loaders), ("test", test_loaders)):
            if split == "test" and "test" not in load_spec(dataset)[0].splits:
                # Teachers train without a test split too: no test metric, said so.
                untested.append(name)
                print(f"note: {dataset} has no 'test' split: no test metrics for {name}")
                continue
            ds = make_dataset(Path(dataset), split, dcfg, train=False, tasks=[name])
            read.append(ds)
            loaders.append(make_loader(ds, {name: tasks[name]}, tc.batch_size, 0, False))
        eval_sets[name] = dataset
    if not val_loaders:
        raise ConfigError(
            "no dataset found to validate the student on (stores name no teacher with a "
            "summary.json and no labelled dataset is joined)"
        )
    print_notes(read)
    module = MultiTaskModule(model, tc, weighting, teacher_references(tasks, teachers))
    result = fit_and_test(module, train_loader, val_loaders, test_loaders, tc, out, progress)
    if result is None:  # another process of a multi-process run: rank 0 finishes it
        return None
    skipped = [{"split": d.split, "path": p, "reason": r} for d in read for p, r in d.skipped]
    if skipped:
        print(skip_report(read))
    info = RunInfo.read(
        {
            "stage": "student" if stores else "multitask",
            # As a teacher for a next round, the student's scale is the same for every task.
            "training": {
                n: {
                    "dataset": [str(s.root) for s in stores]
                    + [str(d.manifest.parent) for d in datasets],
                    "train_images": len(joined),
                    "batch_size": tc.batch_size,
                    "lr": tc.lr,
                    "image_size": cfg.data.image_size,
                }
                for n in names
            },
            "image_size": cfg.data.image_size,
            # Stores are read as squares; a joined dataset may keep the aspect: "mixed" then.
            "resize": _resize(stores, datasets),
            "loss_weighting": resolved | {"final": weighting.describe()},
            "init": started,
            "evaluated_on": eval_sets,
            "score_reference": module.score_reference,  # what val/score compares each task with
            "untested": untested,  # tasks whose dataset has no 'test' split
            "skipped": skipped,
            **result,
            "config": cfg.model_dump(mode="json"),
        },
        out,
    )
    save_model(model, out, info)
    return json.loads((out / SUMMARY_FILE).read_text())


def export_backbone(checkpoint: str | Path, out: str | Path, with_fpn: bool = False) -> Path:
    """Write a checkpoint's backbone body as safetensors under its library's key names
    (torchvision/timm names for the ResNet, timm's for a timm model), loadable into that
    library's model; ``with_fpn`` adds the FPN under ``fpn.``."""
    from safetensors.torch import save_file

    from must.checkpoint import load_model

    model, _ = load_model(checkpoint)
    state = model.backbone.export_state()
    if with_fpn:
        state |= {f"fpn.{k}": v for k, v in model.backbone.fpn.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
