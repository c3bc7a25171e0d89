"""Probes trained from cached backbone features (must.training.feature_cache): a step from the
cache equals a step from the images, and a cached probe run trains, selects, resumes and keeps
its backbone as a probe from images does."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from must.checkpoint import load_model, save_model
from must.config import TeachConfig, load_config, same_run
from must.data.readers import MultiTaskDataset
from must.data.transforms import build_transforms
from must.errors import MustError
from must.models.model import MultiTaskModel
from must.stages.teach import teach
from must.tasks import build_task
from must.tasks.base import Batch, placeholder_images
from must.training.data import Collator
from must.training.feature_cache import CachedCollator, SplitNotCached, cache_features
from tiny import TINY_MODEL, tiny_backbone, tiny_data, tiny_steps

SIZE = 64  # rendered side of the hand-made samples; the evaluation transform makes it 48
CLASSES = ["red", "green"]
SCENES = [
    ([[6, 8, 30, 26], [36, 34, 58, 60]], [0, 1]),
    ([[10, 36, 26, 58], [34, 6, 60, 22], [40, 40, 54, 54]], [1, 0, 1]),
]


def make_sample(i: int) -> dict:
    """Coloured rectangles on noise, with their boxes and their class map (0: background)."""
    g = torch.Generator().manual_seed(i)
    image = torch.rand(3, SIZE, SIZE, generator=g) * 0.15
    seg = torch.zeros(SIZE, SIZE, dtype=torch.int64)
    boxes, labels = SCENES[i % len(SCENES)]
    for (x0, y0, x1, y1), c in zip(boxes, labels, strict=True):
        image[:, y0:y1, x0:x1] = 0.2
        image[c, y0:y1, x0:x1] = 0.9
        seg[y0:y1, x0:x1] = c + 1
    return {
        "key": f"img{i}",
        "image": tv_tensors.Image((image * 255).to(torch.uint8)),
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(SIZE, SIZE)
        ),
        "box_labels": torch.tensor(labels, dtype=torch.int64),
        "segmentation": tv_tensors.Mask(seg),
    }


def head_step(model: MultiTaskModel, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss and the gradients it leaves on the heads (the RPN and RoI
    samplers draw from the global generator: seeded alike for both paths)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    _, losses = model(batch.images, batch.targets, batch.features)
    total = sum(sum(terms.values()) for terms in losses.values())
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.heads.named_parameters() if p.grad is not None}
    return total.detach(), grads


@pytest.mark.parametrize(
    ("task", "classes"), [("segmentation", ["background", *CLASSES]), ("detection", CLASSES)]
)
def test_a_step_from_cached_features_equals_a_step_from_the_images(task, classes):
    torch.manual_seed(0)
    tasks = {task: build_task(task, classes)}
    model = MultiTaskModel(tiny_backbone(fpn_channels=32), tasks)
    model.freeze_backbone()
    model.train()
    view = build_transforms(False, 48)
    samples = [view(make_sample(i)) for i in range(4)]

    from_images = Collator(tasks)(samples)
    cache = cache_features(model.backbone, samples, batch_size=4, device="cpu", progress=False)
    from_cache = CachedCollator(tasks, cache.image_size)([cache[i] for i in range(len(cache))])
    # No pixels in the cached batch: a placeholder of the images' shape, one element stored.
    assert from_cache.images.shape == from_images.images.shape == (4, 3, 48, 48)
    assert from_cache.images.stride() == (0, 0, 0, 0)
    assert from_cache.features is not None and set(from_cache.features) == set(
        model.backbone.features
    )
    assert all(f.dtype == torch.float32 for f in from_cache.features.values())

    loss_images, grads_images = head_step(model, from_images)
    loss_cache, grads_cache = head_step(model, from_cache)
    assert torch.isfinite(loss_images) and loss_images > 0
    torch.testing.assert_close(loss_cache, loss_images)
    assert grads_images and set(grads_cache) == set(grads_images)
    for name, grad in grads_images.items():
        torch.testing.assert_close(grads_cache[name], grad, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_images.values())
    # The frozen backbone learns nothing either way.
    assert all(p.grad is None for p in model.backbone.parameters())


def test_a_batch_moves_its_features_and_its_placeholder_stays_without_pixels():
    batch = Batch(
        images=placeholder_images(4, (48, 32)),
        targets={},
        keys=list("abcd"),
        features={"p2": torch.ones(4, 2, 12, 8)},
    )
    moved = batch.to("meta")
    assert moved.images.device.type == "meta" and moved.images.shape == (4, 3, 48, 32)
    assert moved.images.stride() == (0, 0, 0, 0)  # Tensor.to would allocate 4*3*48*32
    assert moved.features is not None and moved.features["p2"].device.type == "meta"
    real = Batch(images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), targets={}, keys=["a", "b"])
    assert real.to("meta").images.stride() == (48, 16, 4, 1) and real.to("meta").features is None


def test_a_split_of_mixed_image_sizes_is_not_cached():
    samples = [make_sample(0), build_transforms(False, 48)(make_sample(1))]
    for s in samples:
        s.pop("segmentation")
    backbone = MultiTaskModel(tiny_backbone(), {}).backbone
    with pytest.raises(SplitNotCached, match="differ in size .64x64 and 48x48"):
        cache_features(backbone, samples, batch_size=4, device="cpu", progress=False)
    with pytest.raises(SplitNotCached, match="differ in size"):  # one image per batch
        cache_features(backbone, samples, batch_size=1, device="cpu", progress=False)


# --- whole probe runs -----------------------------------------------------------------------

TASK = "normals"
# Floats per image of every map the tiny backbone (16-wide FPN, 64-channel C5) publishes at
# 32 px: P2 and fused at stride 4 (8x8), P3 4x4, P4 2x2, P5-P7 1x1 (a 3x3 stride-2 conv of a
# 1x1 map is 1x1), C5 1x1.
FLOATS_PER_IMAGE = 16 * (8 * 8 + 4 * 4 + 2 * 2 + 1 + 1 + 1 + 8 * 8) + 64 * 1


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> tuple[Path, Path]:
    """(a data cache, a backbone-only model file with random weights and batch-norm
    statistics that differ from a fresh model's, so keeping them is visible)."""
    root = tmp_path_factory.mktemp("probe")
    torch.manual_seed(3)
    model = MultiTaskModel(tiny_backbone(), {})
    for name, buf in model.backbone.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_()
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
    save_model(model, root / "init", {"stage": "simclr"})
    return root / "data", root / "init"


def probe_cfg(start: tuple[Path, Path], *extra: str) -> TeachConfig:
    cache, init = start
    return load_config(
        TeachConfig,
        "transfer_cpu",
        [*TINY_MODEL, *tiny_steps(4, 2), f"task={TASK}", *tiny_data(cache), f"init={init}",
         "freeze_backbone=true", *extra],
    )  # fmt: skip


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def logged(out: Path, column: str) -> list[float]:
    with (out / "logs" / "metrics.csv").open(newline="") as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


def test_a_cached_probe_trains_selects_on_validation_and_keeps_the_backbone(start, tmp_path):
    _, init = start
    summary = teach(probe_cfg(start), tmp_path / "cached", progress=False, stage="transfer")
    info = summary["info"]
    assert info["freeze_backbone"] and info["steps"] == 4
    assert set(info["val"]) == set(info["test"]) == {TASK}

    dataset = Path(info["training"][TASK]["dataset"])
    n_train, n_val = (len(MultiTaskDataset(dataset, split=s)) for s in ("train", "val"))
    cache = info["feature_cache"]
    assert (cache["train_images"], cache["val_images"]) == (n_train, n_val) == (16, 2)
    expected_mb = (n_train + n_val) * FLOATS_PER_IMAGE * 4 / 2**20
    assert cache["mb"] == pytest.approx(expected_mb, abs=1e-3)

    # Validated at steps 2 and 4 (from the cache); the weights kept are the best of those.
    out = tmp_path / "cached"
    primary = build_task(TASK, None).primary_metric  # mean angle: lower is better
    history = logged(out, f"val/{TASK}/{primary}")
    assert len(history) == 2
    assert info["val"][TASK][primary] == pytest.approx(min(history), rel=1e-5)
    assert info["best_checkpoint"] == "best.ckpt"

    probed = load_model(out)[0].state_dict()
    initial = load_model(init)[0].state_dict()
    backbone = [k for k in initial if k.startswith("backbone.")]
    assert any(k.endswith("running_mean") for k in backbone)
    assert all(torch.equal(probed[k], initial[k]) for k in backbone)

    # The same probe from images writes the same files and records, minus the cache.
    plain = teach(
        probe_cfg(start, "cache_features=false"), tmp_path / "plain", progress=False,
        stage="transfer",
    )  # fmt: skip
    assert plain["info"]["feature_cache"] is None
    assert set(plain["info"]) == set(info)
    assert files(tmp_path / "plain") == files(out)
    assert json.loads((out / "summary.json").read_text())["info"]["feature_cache"] == cache


def test_a_cached_probe_resumes_from_its_last_checkpoint(start, tmp_path, monkeypatch):
    from must.tasks import normals

    calls = {"n": 0}
    original = normals.NormalsHead.forward

    def poisoned(self, feats, image_size, target=None):
        preds, losses = original(self, feats, image_size, target)
        if target is not None:
            calls["n"] += 1
            if calls["n"] >= 3:  # the third step: the checkpoint of step 2 is kept
                losses = {k: v * float("nan") for k, v in losses.items()}
        return preds, losses

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(normals.NormalsHead, "forward", poisoned)
        with pytest.raises(MustError, match=r"step 2\), is kept"):
            teach(probe_cfg(start), out, progress=False, stage="transfer")
    summary = teach(probe_cfg(start), out, progress=False, stage="transfer")
    info = summary["info"]
    assert info["resumed_from_step"] == 2 and info["steps"] == 4
    assert info["feature_cache"]["train_images"] == 16
    assert all(math.isfinite(v) for v in info["val"][TASK].values())


def test_cache_features_is_part_of_a_probe_run_only():
    base = {"task": TASK, "freeze_backbone": False, "model": {}}
    # Fine-tuning: the setting changes nothing, and runs recorded before it match.
    assert same_run(base, {**base, "cache_features": True})
    # A probe recorded before the setting trained on augmented images: cache_features false.
    probe = {**base, "freeze_backbone": True}
    assert same_run(probe, {**probe, "cache_features": False})
    assert not same_run(probe, {**probe, "cache_features": True})


def test_training_in_several_processes_falls_back_to_images(capsys):
    from must.config import TrainConfig
    from must.training import feature_cache

    # Two CPU processes, as Lightning resolves them from the settings (nothing is launched).
    cfg = TrainConfig(accelerator="cpu", devices=2, strategy="ddp")
    assert feature_cache.training_processes(cfg)[0] == 2
    assert feature_cache.training_processes(TrainConfig(accelerator="cpu"))[0] == 1
    never = None  # the datasets are not read when the cache is not used
    assert feature_cache.probe_loaders(never, never, never, never, cfg) is None  # type: ignore[arg-type]
    assert capsys.readouterr().out.strip() == (
        "feature cache not used: training runs in 2 processes; the probe trains from images"
    )
