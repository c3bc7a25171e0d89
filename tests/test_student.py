"""`must train` / `must export`: the student on pseudo-labelled stores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from must.checkpoint import load_model
from must.cli import main
from must.config import StudentConfig, TeachConfig, load_config
from must.data.source import DataSource
from must.errors import ConfigError
from must.stages.label import label_images
from must.stages.teach import teach
from must.stages.train import initialise, train_student
from must.tasks import TASK_TYPES
from must.training.fit import read_checkpoint
from tiny import TINY_MODEL, tiny_data

TINY_TRAIN = ["train.warmup_steps=1", "train.max_steps=2", "train.val_every=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three tiny teachers (different batch sizes and learning rates) and a labelled pool."""
    root = tmp_path_factory.mktemp("student")
    cache = root / "data"
    data = tiny_data(cache)
    teachers = {}
    for task, bs, lr in (("classification", 4, 0.1), ("segmentation", 2, 0.05), ("depth", 4, 0.02)):
        cfg = load_config(
            TeachConfig,
            f"teach_{task}_cpu",
            [*TINY_MODEL, *TINY_TRAIN, *data, f"train.batch_size={bs}", f"train.lr={lr}"],
        )
        teach(cfg, root / task, progress=False)
        teachers[task] = root / task
    store = root / "store"
    label_images(
        [str(p) for p in teachers.values()],
        DataSource(dataset="mixed", cache=str(cache), num=12, render_size=32), store, shard_size=8, batch_size=4, workers=0, progress=False,
    )  # fmt: skip
    return root, teachers, store


def student_cfg(store: Path, *extra: str) -> StudentConfig:
    return load_config(
        StudentConfig,
        "train_student_cpu",
        [*TINY_MODEL, *TINY_TRAIN, "train.batch_size=4", "train.lr=0.04",
         "data.image_size=32", f"data.stores=[{store}]", *extra],
    )  # fmt: skip


@pytest.mark.slow
def test_student_trains_on_the_store_with_musts_weights_and_is_tested_per_teacher(world):
    root, teachers, store = world
    summary = train_student(student_cfg(store), root / "student", progress=False)
    info = summary["info"]
    assert set(summary["tasks"]) == {"classification", "segmentation", "depth"}
    # w_i = (b_s * lr_i) / (b_i * lr_s) with b_s = 4, lr_s = 0.04; depth set by hand (1.0).
    assert info["loss_weighting"]["weights"] == pytest.approx(
        {
            "classification": 4 * 0.1 / (4 * 0.04),
            "segmentation": 4 * 0.05 / (2 * 0.04),
            "depth": 1.0,
        }
    )
    # Every task is tested on its teacher's own test split.
    assert set(info["test"]) == {"classification", "segmentation", "depth"}
    for task, path in teachers.items():
        teacher = load_model(path)[1]["info"]["training"][task]["dataset"]
        assert info["evaluated_on"][task] == teacher
    # The student can be the next round's teacher: one scale for every task.
    assert {v["batch_size"] for v in info["training"].values()} == {4}
    # Checkpoints are selected against each teacher's own validation value, which the
    # checkpoints keep for resuming; each task's term of val/score is logged.
    references = {}
    for task, path in teachers.items():
        teacher = load_model(path)[1]["info"]
        references[task] = teacher["val"][task][TASK_TYPES[task].primary_metric]
    assert info["score_reference"] == pytest.approx(references)
    last = read_checkpoint(root / "student" / "checkpoints" / "last.ckpt")
    assert last["score_reference"] == pytest.approx(references)
    header = (root / "student" / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"val/{t}/score" for t in teachers} <= set(header)


def test_pcgrad_trains_the_student_and_is_refused_where_unsupported(world, tmp_path):
    _root, _teachers, store = world
    summary = train_student(student_cfg(store, "loss.kind=pcgrad"), tmp_path / "s", progress=False)
    info = summary["info"]
    assert info["loss_weighting"]["kind"] == "pcgrad" and info["steps"] == 2
    for task, values in info["val"].items():
        assert all(map(math.isfinite, values.values())), task
    for bad in ("train.precision=16-mixed", "train.strategy=ddp"):
        with pytest.raises(ConfigError, match=r"loss\.kind=pcgrad: computes per-task"):
            train_student(
                student_cfg(store, "loss.kind=pcgrad", bad),
                tmp_path / "x",
                overwrite=True,
                progress=False,
            )


@pytest.mark.slow
def test_export_writes_the_backbone_under_resnet_key_names(world, tmp_path):
    _root, teachers, _ = world
    out = tmp_path / "backbone.safetensors"
    assert main(["export", str(teachers["depth"]), "--out", str(out)]) == 0
    state = load_file(str(out))
    model, _ = load_model(teachers["depth"])
    body = model.backbone.body.state_dict()
    assert set(state) == set(body) and "layer4.0.conv1.weight" in state
    assert all(torch.equal(state[k], body[k]) for k in body)


@pytest.mark.slow
def test_initialising_from_a_checkpoint_copies_its_backbone_and_matching_heads(world):
    _root, teachers, _store = world
    from must.models.model import MultiTaskModel
    from must.tasks import build_task

    teacher, payload = load_model(teachers["segmentation"])
    classes = payload["tasks"]["segmentation"]["classes"]
    model = MultiTaskModel(
        teacher.backbone.config,
        {"segmentation": build_task("segmentation", classes), "depth": build_task("depth", None)},
    )
    report = initialise(model, str(teachers["segmentation"]))
    assert report["heads"] == ["segmentation"]
    mine, theirs = model.state_dict(), teacher.state_dict()
    assert all(
        torch.equal(mine[k], theirs[k]) for k in theirs if k.startswith(("backbone.", "heads."))
    )


@pytest.mark.slow
def test_bad_student_inputs_are_refused_before_training(world, tmp_path):
    _root, _teachers, store = world
    with pytest.raises(ConfigError, match="at least one store"):
        train_student(student_cfg(store, "data.stores=[]"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="positive and finite"):
        train_student(student_cfg(store, "loss.hand={depth: 0.0}"), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match=r"loss\.weights: no weight"):
        train_student(
            student_cfg(store, "loss.kind=fixed", "loss.weights={depth: 1.0}"),
            tmp_path / "c",
            progress=False,
        )


def test_store_weights_set_each_stores_share_of_draws_whatever_its_size():
    from must.stages.train import store_sampler

    sizes, weights = [100, 900, 50], [1.0, 1.0, 2.0]
    draws = []
    for seed in range(40):
        draws += list(store_sampler(sizes, weights, seed))
    store_of = torch.bucketize(torch.tensor(draws), torch.tensor([100, 1000]), right=True)
    shares = torch.bincount(store_of, minlength=3).double() / len(draws)
    # 1050 draws x 40 epochs: the shares are 1/4, 1/4, 1/2 within a few standard errors.
    assert shares.tolist() == pytest.approx([0.25, 0.25, 0.5], abs=0.01)
    with pytest.raises(ConfigError, match="one positive weight per store"):
        store_sampler(sizes, [1.0, 0.0, 1.0])


def test_joined_sources_are_drawn_uniformly_over_images_by_default():
    from must.stages.train import joined_sampler

    sizes = [100, 900, 50]
    bounds = torch.tensor([100, 1000])
    early = torch.zeros(3)
    for seed in range(40):
        epoch = list(joined_sampler(sizes, None, seed))
        assert sorted(epoch) == list(range(1050))  # every image once per epoch
        # Shuffled across sources, not one after the other: already the first tenth of an
        # epoch holds each source in proportion to its size.
        early += torch.bincount(
            torch.bucketize(torch.tensor(epoch[:105]), bounds, right=True), minlength=3
        )
    shares = (early / early.sum()).tolist()
    assert shares == pytest.approx([100 / 1050, 900 / 1050, 50 / 1050], abs=0.015)
