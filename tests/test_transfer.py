"""`must transfer`, `must pretrain` (SimCLR) and the supervised multi-task baseline."""

from __future__ import annotations

import pytest
import torch

from must.checkpoint import initialise, load_model
from must.cli import main
from must.config import SimCLRConfig, StudentConfig, TeachConfig, ViewsConfig, load_config
from must.errors import ConfigError, MustError
from must.models.model import MultiTaskModel
from must.stages.pretrain import pretrain_simclr, simclr_views
from must.stages.teach import teach
from must.stages.train import train_student
from must.tasks import build_task
from tiny import TINY_MODEL, tiny_data

TINY_TRAIN = ["train.warmup_steps=1", "train.max_steps=3", "train.val_every=3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    cache = root / "data"
    cfg = load_config(
        TeachConfig,
        "teach_segmentation_cpu",
        [*TINY_MODEL, *TINY_TRAIN, *tiny_data(cache), "train.batch_size=4"],
    )
    teach(cfg, root / "teacher", progress=False)
    return root, cache


def transfer_cfg(cache, task: str, *extra: str) -> TeachConfig:
    return load_config(
        TeachConfig,
        "transfer_cpu",
        [*TINY_MODEL, *TINY_TRAIN, f"task={task}", *tiny_data(cache), "train.batch_size=4", *extra],
    )


def test_transfer_head_starts_afresh_even_for_the_checkpoints_own_task(world):
    root, _ = world
    teacher, payload = load_model(root / "teacher")
    classes = payload["tasks"]["segmentation"]["classes"]
    torch.manual_seed(1)
    model = MultiTaskModel(
        teacher.backbone.config, {"segmentation": build_task("segmentation", classes)}
    )
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("heads.")}
    report = initialise(model, str(root / "teacher"), heads=False)
    assert report["heads"] == []
    mine, theirs = model.state_dict(), teacher.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if k.startswith("backbone."))
    assert all(torch.equal(mine[k], fresh[k]) for k in fresh)
    heads = [k for k in theirs if k.startswith("heads.") and k.endswith("weight")]
    assert heads and any(not torch.equal(mine[k], theirs[k]) for k in heads)


def test_probe_keeps_the_backbone_and_its_batch_norm_statistics_fixed(world, tmp_path):
    root, cache = world
    cfg = transfer_cfg(cache, "normals", f"init={root / 'teacher'}", "freeze_backbone=true")
    summary = teach(cfg, tmp_path / "probe", progress=False, stage="transfer")
    assert summary["info"]["stage"] == "transfer" and summary["info"]["freeze_backbone"]
    assert set(summary["info"]["test"]) == {"normals"}
    probed = load_model(tmp_path / "probe")[0].state_dict()
    teacher = load_model(root / "teacher")[0].state_dict()
    backbone = [k for k in teacher if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(probed[k], teacher[k]) for k in backbone)


@pytest.mark.slow
def test_fine_tuning_changes_the_backbone_and_random_means_no_init(world, tmp_path):
    root, cache = world
    assert main(["transfer", "transfer_cpu", *TINY_MODEL, *TINY_TRAIN, "task=depth",
                 *tiny_data(cache), "train.batch_size=4", "--backbone", str(root / "teacher"),
                 "--out", str(tmp_path / "ft"), "--quiet"]) == 0  # fmt: skip
    tuned = load_model(tmp_path / "ft")[0].state_dict()
    teacher = load_model(root / "teacher")[0].state_dict()
    assert not torch.equal(
        tuned["backbone.body.conv1.weight"], teacher["backbone.body.conv1.weight"]
    )
    cfg = transfer_cfg(cache, "classification")
    summary = teach(cfg, tmp_path / "scratch", progress=False, stage="transfer")
    assert summary["info"]["init"] is None


def test_transfer_refuses_a_backbone_of_another_shape(world, tmp_path):
    root, cache = world
    cfg = transfer_cfg(
        cache, "depth", f"init={root / 'teacher'}", "model.backbone.widths=[8,16,32,32]"
    )
    with pytest.raises(ConfigError, match="does not fit"):
        teach(cfg, tmp_path / "bad", progress=False, stage="transfer")


def test_simclr_views_are_two_different_crops_of_one_image():
    image = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    view = simclr_views(ViewsConfig(), 32)
    torch.manual_seed(0)
    a, b = view(image), view(image)
    # uint8 out of the loader (a quarter of float32's shared memory); scaled in the module.
    assert a.shape == b.shape == (3, 32, 32) and a.dtype == b.dtype == torch.uint8
    assert not torch.equal(a, b)


def tiny_simclr(cache) -> SimCLRConfig:
    return load_config(
        SimCLRConfig,
        "simclr_cpu",
        [*TINY_MODEL, "train.warmup_steps=1", "train.max_steps=3", "train.val_every=3",
         "train.batch_size=8", *tiny_data(cache)],
    )  # fmt: skip


@pytest.mark.slow
def test_simclr_writes_a_backbone_that_transfer_accepts(world, tmp_path):
    _root, cache = world
    cfg = tiny_simclr(cache)
    summary = pretrain_simclr(cfg, tmp_path / "simclr", progress=False)
    info = summary["info"]
    assert info["steps"] == 3 and summary["tasks"] == {}
    assert torch.isfinite(torch.tensor(info["final_loss"]))
    pre = load_model(tmp_path / "simclr")[0]
    torch.manual_seed(0)
    model = MultiTaskModel(pre.backbone.config, {"depth": build_task("depth", None)})
    initialise(model, str(tmp_path / "simclr"), heads=False)
    assert torch.equal(model.backbone.body.conv1.weight, pre.backbone.body.conv1.weight)
    # Re-running the same command is a no-op (the backbone is not trained again).
    before = (tmp_path / "simclr" / "model.safetensors").stat().st_mtime_ns
    pretrain_simclr(cfg, tmp_path / "simclr", progress=False)
    assert (tmp_path / "simclr" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_multitask_baseline_trains_on_the_union_of_labelled_sets(world, tmp_path):
    _root, cache = world
    sets = [
        {"dataset": style, "num": 20, "render_size": 32, "cache": str(cache)}
        for style in ("objects", "rooms")
    ]
    cfg = load_config(
        StudentConfig,
        "train_student_cpu",
        [*TINY_MODEL, *TINY_TRAIN, "train.batch_size=4", "data.image_size=32", "loss.kind=equal"],
        merge={"data": {"datasets": sets}},
    )
    summary = train_student(cfg, tmp_path / "mtl", progress=False)
    info = summary["info"]
    assert info["stage"] == "multitask"
    assert set(summary["tasks"]) == {"classification", "segmentation"}
    # Each task is validated and tested on the val/test splits of the set that labels it.
    assert set(info["test"]) == {"classification", "segmentation"}
    assert "objects" in info["evaluated_on"]["classification"]
    assert "rooms" in info["evaluated_on"]["segmentation"]
    assert info["training"]["classification"]["train_images"] == 16 + 16
    # No teacher: each task's selection reference is its value at the first (here the only)
    # validation, so that validation scores 0.
    assert info["score_reference"] == {
        "classification": info["val"]["classification"]["top1"],
        "segmentation": info["val"]["segmentation"]["miou"],
    }


def test_store_fraction_uses_the_first_images_of_the_list():
    from torch.utils.data import Subset

    from must.stages.train import first_images

    data = list(range(40))
    part = first_images(data, 0.25)
    assert isinstance(part, Subset) and list(part) == list(range(10))
    assert first_images(data, 1.0) is data
    with pytest.raises(ConfigError, match="store_fractions"):
        first_images(data, 0.0)


def test_a_missing_backbone_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "never"
    code = main(["transfer", "transfer_cpu", "task=depth", "--backbone", str(tmp_path / "nope"),
                 "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 2 and not out.exists()


def test_simclr_nan_loss_stops_with_a_clear_error(world, tmp_path, monkeypatch):
    _root, cache = world
    cfg = tiny_simclr(cache)
    monkeypatch.setattr(
        "lightly.loss.NTXentLoss.forward", lambda self, a, b: (a.sum() + b.sum()) * float("nan")
    )
    with pytest.raises(MustError, match=r"SimCLR loss is nan at step 0.*no checkpoint was saved"):
        pretrain_simclr(cfg, tmp_path / "simclr", progress=False)
