"""Classification, segmentation, depth and normals tasks: heads, collate, losses over labelled
images only, and metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from must.features import FeatureSpec
from must.models.model import MultiTaskModel
from must.tasks.classification import ClassificationConfig, ClassificationMetric, ClassificationTask
from must.tasks.depth import DepthConfig, DepthMetric, DepthTask
from must.tasks.normals import NormalsMetric, NormalsTask
from must.tasks.segmentation import (
    SegmentationConfig,
    SegmentationMetric,
    SegmentationTask,
    miou_from_confusion,
)
from tiny import tiny_backbone

TINY = tiny_backbone(fpn_channels=32)
SIZE = 32
CLASSES = ["cat", "dog", "cow"]
SEG_CLASSES = ["floor", "wall", "thing"]
NAMES = ("classification", "segmentation", "depth", "normals")


def make_task(name: str, **config):
    if name == "classification":
        return ClassificationTask(CLASSES, ClassificationConfig(**config))
    if name == "segmentation":
        return SegmentationTask(SEG_CLASSES)
    if name == "depth":
        return DepthTask(config=DepthConfig(**config))
    return NormalsTask()


def make_sample(i: int, size: int = SIZE, labels: tuple[str, ...] = NAMES) -> dict:
    """A sample whose labels follow its image (so a tiny model can fit them): a bright
    diagonal band whose position depends on ``i``."""
    g = torch.Generator().manual_seed(i)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    band = ((xx + yy + 5 * i) % size) < size // 3
    image = torch.rand(3, size, size, generator=g) * 0.3
    image[i % 3] += band * 0.6
    sample: dict = {"key": f"img{i}", "image": tv_tensors.Image((image * 255).to(torch.uint8))}
    if "classification" in labels:
        sample["classification"] = torch.tensor(i % 3)
    if "segmentation" in labels:
        seg = torch.where(band, 2, (yy >= size // 2).long())
        seg[:2] = 255  # an ignored stripe
        sample["segmentation"] = tv_tensors.Mask(seg)
    if "depth" in labels:
        depth = 1.0 + 3.0 * yy.float() / size + 2.0 * band
        depth[:, :3] = 0.0  # invalid pixels
        sample["depth"] = depth[None].float()
    if "normals" in labels:
        n = torch.zeros(3, size, size)
        n[2] = -1.0  # facing the camera
        n[:, band] = torch.tensor([0.6, 0.0, -0.8])[:, None]
        n[:, -3:] = 0.0  # invalid pixels
        sample["normals"] = n
    return sample


def collate(tasks: dict, samples: list[dict]) -> tuple[torch.Tensor, dict]:
    images = torch.stack([s["image"].as_subclass(torch.Tensor) for s in samples]).float() / 255
    return images, {name: t.collate(samples) for name, t in tasks.items()}


def model_for(names, seed: int = 0, **config) -> tuple[MultiTaskModel, dict]:
    torch.manual_seed(seed)
    tasks = {n: make_task(n, **config) for n in names}
    return MultiTaskModel(TINY, tasks), tasks


def total(losses: dict) -> torch.Tensor:
    return sum(sum(terms.values()) for terms in losses.values())


# ---------------------------------------------------------------- heads and collate


def test_head_outputs_have_the_documented_shapes():
    model, tasks = model_for(NAMES)
    model.eval()
    images, _ = collate(tasks, [make_sample(i, 64) for i in range(2)])
    with torch.no_grad():
        preds, losses = model(images)
    assert losses == {}
    assert preds["classification"].shape == (2, 3)
    assert preds["segmentation"].shape == (2, 3, 64, 64)
    depth = preds["depth"]
    assert depth.shape == (2, 1, 64, 64)
    cfg = tasks["depth"].config
    assert bool((depth >= cfg.min_depth).all()) and bool((depth <= cfg.max_depth).all())
    normals = preds["normals"]
    assert normals.shape == (2, 3, 64, 64)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, 64, 64))


def test_collate_fills_absent_images_and_flags_them():
    samples = [make_sample(0), make_sample(1, labels=())]
    _, targets = collate({n: make_task(n) for n in NAMES}, samples)
    assert targets["classification"]["present"].tolist() == [True, False]
    torch.testing.assert_close(targets["classification"]["probs"][0], torch.tensor([1.0, 0, 0]))
    assert targets["classification"]["probs"][1].abs().sum() == 0
    seg = targets["segmentation"]["labels"]
    assert seg.dtype == torch.uint8 and seg.shape == (2, SIZE, SIZE)  # ids and 255 fit
    assert type(seg) is torch.Tensor  # tv_tensors stripped
    assert bool((seg[1] == 255).all()) and not bool((seg[0] == 255).all())
    assert targets["depth"]["depth"].shape == (2, 1, SIZE, SIZE)
    assert targets["depth"]["depth"][1].abs().sum() == 0
    assert targets["normals"]["normals"].shape == (2, 3, SIZE, SIZE)
    assert targets["normals"]["normals"][1].abs().sum() == 0
    for name in NAMES:
        assert targets[name]["present"].tolist() == [True, False]
        assert make_task(name).collate([make_sample(2, labels=())]) is None


def test_class_maps_collate_to_int64_when_a_value_or_the_ignore_index_does_not_fit_uint8():
    def labels(seg: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        task = SegmentationTask(SEG_CLASSES, SegmentationConfig(ignore_index=ignore_index))
        samples = [{"segmentation": tv_tensors.Mask(seg)}, {}]  # the second is filled
        out = task.collate(samples)["labels"]
        assert torch.equal(out[0].long(), seg) and bool((out[1].long() == ignore_index).all())
        return out

    seg = torch.tensor([[0, 2], [255, 1]])
    assert labels(seg).dtype == torch.uint8
    assert labels(seg, ignore_index=-1).dtype == torch.int64
    assert labels(seg, ignore_index=300).dtype == torch.int64
    assert labels(torch.tensor([[0, 2], [256, 1]])).dtype == torch.int64
    # Loss and metric see the same class ids whichever dtype the batch carries.
    torch.manual_seed(0)
    head = SegmentationTask(SEG_CLASSES).build_head({"fused": FeatureSpec("fused", 8, 4)}).eval()
    feats = {"fused": torch.randn(2, 8, 2, 2)}
    small = {"labels": labels(seg)}
    wide = {"labels": small["labels"].long()}
    results = []
    for target in (small, wide):
        logits, loss = head(feats, (2, 2), target)
        metric = SegmentationMetric(3)
        metric.update(logits, target)
        results.append((loss["ce"].detach(), metric.confusion))
    assert float(results[0][0]) > 0 and results[0][1].sum() == 3  # 3 pixels not ignored
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_collate_rejects_mismatched_sizes_and_bad_class_ids():
    with pytest.raises(ValueError, match="differ in size"):
        make_task("depth").collate([make_sample(0, 32), make_sample(1, 16)])
    with pytest.raises(ValueError, match="outside"):
        make_task("classification").collate([{"classification": torch.tensor(7)}])
    with pytest.raises(ValueError, match="expected 3"):
        make_task("classification").collate([{"classification_soft": torch.ones(4) / 4}])


# ---------------------------------------------------------------- losses


def _overfit(names, steps: int) -> tuple[dict, dict]:
    model, tasks = model_for(names)
    images, targets = collate(tasks, [make_sample(i) for i in range(4)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = last = {}
    model.train()
    for step in range(steps):
        _, losses = model(images, targets)
        values = {n: float(sum(t.values()).detach()) for n, t in losses.items()}
        assert all(math.isfinite(v) for v in values.values()), values
        if step == 0:
            first = values
        last = values
        opt.zero_grad()
        total(losses).backward()
        opt.step()
    return first, last


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_when_overfitting_a_tiny_batch(name):
    first, last = _overfit([name], steps=30)
    assert last[name] < 0.5 * first[name], (first, last)


@pytest.mark.slow
def test_all_four_heads_train_together_in_one_model():
    first, last = _overfit(NAMES, steps=30)
    for name in NAMES:
        assert last[name] < 0.5 * first[name], (name, first, last)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("classification", {}),
        ("segmentation", {}),
        ("depth", {}),
        ("depth", {"loss": "l1"}),
        ("normals", {}),
    ],
)
def test_an_image_without_the_label_adds_nothing_to_loss_or_gradient(name, config):
    model, tasks = model_for([name], **config)
    model.eval()  # BatchNorm on running statistics: each image's features are its own

    def loss_and_grads(samples):
        images, targets = collate(tasks, samples)
        model.zero_grad()
        _, losses = model(images, targets)
        loss = total(losses)
        loss.backward()
        # Parameters the task never reads (the FPN, for classification) get no gradient.
        return loss.detach(), {
            k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None
        }

    a, b_unlabelled = make_sample(0), make_sample(1, labels=())
    loss_pair, grads_pair = loss_and_grads([a, b_unlabelled])
    loss_one, grads_one = loss_and_grads([a])
    assert float(loss_one) > 0
    assert grads_pair.keys() == grads_one.keys()
    assert any(k.startswith("heads.") for k in grads_one)
    torch.testing.assert_close(loss_pair, loss_one, rtol=1e-5, atol=1e-7)
    for k in grads_one:
        # Batches of one and two images sum in a different order: allow rounding relative to
        # the tensor's scale. A leak from the unlabelled image would be of the gradient's size.
        scale = float(grads_one[k].abs().max())
        torch.testing.assert_close(grads_pair[k], grads_one[k], rtol=1e-4, atol=1e-5 * scale, msg=k)
    # And the unlabelled image placed first changes nothing either.
    loss_rev, _ = loss_and_grads([b_unlabelled, a])
    torch.testing.assert_close(loss_rev, loss_one, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_no_label_at_all_gives_a_zero_loss_that_backpropagates(name):
    model, tasks = model_for([name])
    samples = [make_sample(i, labels=()) for i in range(2)]
    images, targets = collate(tasks, samples)
    assert targets[name] is None
    _, losses = model(images, targets)
    loss = total(losses)
    assert float(loss.detach()) == 0.0
    loss.backward()
    head = model.heads[name]
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())

    # The head itself, handed a target where every image is absent or every pixel invalid.
    empty = tasks[name].collate([make_sample(0), make_sample(1)])
    for key, value in empty.items():
        empty[key] = torch.zeros_like(value) if key != "labels" else torch.full_like(value, 255)
    feats = model.backbone(images)
    _, terms = head(feats, (SIZE, SIZE), empty)
    loss = sum(terms.values())
    assert float(loss.detach()) == 0.0
    head.zero_grad()
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())


def test_soft_and_hard_classification_targets_give_the_hand_computed_cross_entropy():
    model, tasks = model_for(["classification"])
    model.eval()
    soft = torch.tensor([0.7, 0.2, 0.1])
    samples = [make_sample(0, labels=()), make_sample(1), make_sample(2, labels=())]
    samples[0]["classification_soft"] = soft
    samples[1]["classification_soft"] = torch.tensor([0.1, 0.1, 0.8])  # soft wins over hard
    images, targets = collate(tasks, [*samples, make_sample(3, labels=())])
    assert targets["classification"]["present"].tolist() == [True, True, False, False]
    preds, losses = model(images, targets)
    logp = preds["classification"].log_softmax(1)
    expected = (-(soft * logp[0]).sum() - (torch.tensor([0.1, 0.1, 0.8]) * logp[1]).sum()) / 2
    torch.testing.assert_close(losses["classification"]["ce"], expected)

    # Label smoothing mixes the target with the uniform distribution.
    eps = 0.3
    model2, _ = model_for(["classification"], label_smoothing=eps)
    model2.load_state_dict(model.state_dict())
    model2.eval()
    _, losses2 = model2(images, targets)
    mixed = (1 - eps) * targets["classification"]["probs"][:2] + eps / 3
    expected2 = -(mixed * logp[:2]).sum(1).mean()
    torch.testing.assert_close(losses2["classification"]["ce"], expected2)


# ---------------------------------------------------------------- metrics


def test_miou_from_a_known_confusion_matrix():
    # rows: ground truth, columns: prediction; class 3 appears nowhere, class 4 is only
    # ever predicted (never in the ground truth).
    conf = torch.tensor(
        [
            [5, 1, 0, 0, 1],
            [2, 3, 1, 0, 0],
            [0, 0, 4, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    miou, iou = miou_from_confusion(conf)
    # IoU = TP / (row sum + column sum - TP)
    by_hand = [5 / (7 + 7 - 5), 3 / (6 + 4 - 3), 4 / (4 + 5 - 4), math.nan, 0 / (0 + 1 - 0)]
    torch.testing.assert_close(iou, torch.tensor(by_hand, dtype=torch.float64), equal_nan=True)
    assert miou == pytest.approx((5 / 9 + 3 / 7 + 4 / 5 + 0) / 4)


def test_segmentation_metric_counts_valid_pixels_over_updates():
    metric = SegmentationMetric(3, ignore_index=255)
    gt = torch.tensor([[[0, 0, 1], [2, 255, 1]]])  # (1, 2, 3), one ignored pixel
    pred = torch.tensor([[[0, 1, 1], [2, 0, 0]]])
    metric.update(pred, {"labels": gt, "present": torch.tensor([True])})
    # Logits work too: class 2 everywhere, on a second image.
    logits = torch.zeros(1, 3, 2, 3)
    logits[:, 2] = 1.0
    metric.update(logits, torch.tensor([[[2, 2, 2], [0, 1, 255]]]))
    expected = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]]) + torch.tensor(
        [[0, 0, 1], [0, 0, 1], [0, 0, 3]]
    )
    assert metric.confusion.tolist() == expected.tolist()
    out = metric.compute()
    assert float(out["pixel_acc"]) == pytest.approx(6 / 10)
    # IoU = TP / (row + column - TP): class 0: 1/(3+2-1), class 1: 1/(3+2-1), class 2: 4/(4+6-4)
    assert float(out["miou"]) == pytest.approx((1 / 4 + 1 / 4 + 4 / 6) / 3)


def test_depth_metric_on_known_values_excludes_invalid_pixels():
    metric = DepthMetric()
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0]).view(1, 1, 1, 5)
    gt = torch.tensor([1.0, 0.0, 2.0, 5.0, 0.0]).view(1, 1, 1, 5)  # zeros: invalid
    metric.update(pred, {"depth": gt, "present": torch.tensor([True])})
    out = {k: float(v) for k, v in metric.compute().items()}
    # valid pairs (p, g): (1, 1), (3, 2), (4, 5); ratios max(p/g, g/p): 1, 1.5, 1.25
    assert out["abs_rel"] == pytest.approx((0 + 0.5 + 0.2) / 3)
    assert out["rmse"] == pytest.approx(math.sqrt((0 + 1 + 1) / 3))
    assert out["delta1"] == pytest.approx(1 / 3)  # strict "<": 1.25 itself does not count
    assert out["delta2"] == pytest.approx(1.0)
    assert out["delta3"] == pytest.approx(1.0)


def test_depth_metric_separates_global_scale_from_structure():
    metric = DepthMetric()
    gt = torch.tensor([[2.0, 4.0, 8.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).view(2, 1, 1, 4)
    # Image 0: half the true depth everywhere (pure scale error; its invalid pixel is ignored).
    # Image 1: ratios g/p of 2, 1, 1, 1/2: median 1 (the lower middle), so aligning leaves it
    # as it is and only the two exact pixels are within 1.25.
    pred = torch.tensor([[1.0, 2.0, 4.0, 5.0], [0.5, 1.0, 1.0, 2.0]]).view(2, 1, 1, 4)
    metric.update(pred, {"depth": gt, "present": torch.tensor([True, True])})
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["delta1"] == pytest.approx(2 / 7)
    assert out["delta1_aligned"] == pytest.approx(5 / 7)
    # log(g/p): three times log 2 (image 0), then log 2, 0, 0, -log 2.
    assert out["scale_gt_over_pred"] == pytest.approx(2 ** (3 / 7))


def test_depth_metric_pools_pixels_over_updates():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 1, 5, 6, generator=g) * 5 + 0.1
    gt = torch.rand(4, 1, 5, 6, generator=g) * 5 + 0.1
    gt[gt < 1.0] = 0.0  # some invalid pixels, unevenly spread over the images
    gt[0, :, :4] = 0.0
    whole, parts = DepthMetric(), DepthMetric()
    whole.update(pred, gt)
    parts.update(pred[:1], gt[:1])
    parts.update(pred[1:], gt[1:])
    a, b = whole.compute(), parts.compute()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    valid = gt > 0
    p, t = pred[valid].double(), gt[valid].double()
    assert float(a["abs_rel"]) == pytest.approx(float(((p - t).abs() / t).mean()))


def _at_angles(degrees: list[float]) -> torch.Tensor:
    th = torch.deg2rad(torch.tensor(degrees, dtype=torch.float64))
    return torch.stack([th.sin(), torch.zeros_like(th), th.cos()]).float().view(1, 3, 1, -1)


def test_normals_metric_on_known_angles():
    pred = torch.cat([_at_angles([0.0, 10.0, 20.0, 90.0]), _at_angles([45.0])], dim=3)
    gt = torch.zeros(1, 3, 1, 5)
    gt[:, 2, :, :4] = 1.0  # the last pixel is invalid (zero normal)
    metric = NormalsMetric()
    metric.update(pred, {"normals": gt, "present": torch.tensor([True])})
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["mean_angle"] == pytest.approx(30.0, abs=1e-4)
    assert out["median_angle"] == pytest.approx(15.0, abs=0.01)  # (10 + 20) / 2, 0.01° bins
    assert out["within_11.25"] == pytest.approx(0.5)
    assert out["within_22.5"] == pytest.approx(0.75)
    assert out["within_30"] == pytest.approx(0.75)

    # A second update merges into the same histogram: angles 0, 10, 20, 90, 33 -> median 20.
    metric.update(_at_angles([33.0]), _at_angles([0.0]))
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["median_angle"] == pytest.approx(20.0, abs=0.01)
    assert out["mean_angle"] == pytest.approx((0 + 10 + 20 + 90 + 33) / 5, abs=1e-4)


def test_classification_metric_top1_and_top5_on_known_logits():
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6],  # label 0: top-1 hit
            [9.0, 8, 7, 6, 5, 4, 3],  # label 4: 5th best -> top-5 hit only
            [9.0, 8, 7, 6, 5, 4, 3],  # label 6: last -> miss
            [0.0, 0, 0, 0, 0, 0, 9],  # absent image: not scored
        ]
    )
    probs = F.one_hot(torch.tensor([0, 4, 6, 6]), 7).float()
    metric = ClassificationMetric(7)
    metric.update(logits, {"probs": probs, "present": torch.tensor([True, True, True, False])})
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx({"top1": 1 / 3, "top5": 2 / 3})

    # Fewer than 5 classes: top-5 is top-K, always a hit.
    small = ClassificationMetric(3)
    small.update(torch.tensor([[0.0, 1, 2]]), torch.tensor([0]))
    assert float(small.compute()["top5"]) == 1.0
    assert float(small.compute()["top1"]) == 0.0


def _metric_inputs(name: str) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(1)
    present = torch.tensor([True, True, False, True])
    if name == "classification":
        probs = torch.rand(4, 3, generator=g).softmax(1)
        return torch.randn(4, 3, generator=g), {"probs": probs, "present": present}
    if name == "segmentation":
        labels = torch.randint(0, 3, (4, 5, 6), generator=g)
        labels[2] = 255
        return torch.randn(4, 3, 5, 6, generator=g), {"labels": labels, "present": present}
    if name == "depth":
        depth = torch.rand(4, 1, 5, 6, generator=g) * 4
        depth[depth < 1] = 0.0
        pred = torch.rand(4, 1, 5, 6, generator=g) * 4 + 0.5
        return pred, {"depth": depth, "present": present}
    normals = F.normalize(torch.randn(4, 3, 5, 6, generator=g), dim=1)
    normals[2] = 0.0
    pred = F.normalize(torch.randn(4, 3, 5, 6, generator=g), dim=1)
    return pred, {"normals": normals, "present": present}


@pytest.mark.parametrize("name", NAMES)
def test_metric_states_merge_like_ddp_ranks(name):
    """Two "ranks" each seeing half the set, merged (sum states), equal one pass over all."""
    task = make_task(name)
    pred, target = _metric_inputs(name)
    whole, rank0, rank1 = task.new_metric(), task.new_metric(), task.new_metric()
    whole.update(pred, target)
    rank0.update(pred[:2], {k: v[:2] for k, v in target.items()})
    rank1.update(pred[2:], {k: v[2:] for k, v in target.items()})
    rank0.merge_state(rank1)
    a, b = whole.compute(), rank0.compute()
    assert a.keys() == b.keys() and task.primary_metric in a
    for key in a:
        assert math.isfinite(float(a[key])), key
        torch.testing.assert_close(a[key], b[key], msg=key)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_segmentation_store_labels_are_the_argmax_ignored_below_the_softmax_threshold(threshold):
    # The reference is the definition: argmax class, 255 where max softmax < threshold.
    torch.manual_seed(0)
    task = SegmentationTask(["a", "b", "c", "d"])
    logits = torch.randn(4, 9, 11) * 3
    logits[:, 0, 0] = torch.tensor([2.0, 2.0, -50.0, -50.0])  # a tie: top probability 0.5
    fields = task.to_store(logits, (9, 11), (9, 11), {"seg_threshold": threshold})
    conf, classes = torch.softmax(logits, 0).max(0)
    expected = classes.clone()
    expected[conf < threshold - 1e-6] = 255
    near = (conf - threshold).abs() < 1e-6  # rounding may fall either way exactly at it
    got = torch.from_numpy(fields["seg_map"]).long()
    assert torch.equal(got[~near], expected[~near])
    assert fields["seg_map"].dtype.name == "uint8"
    if threshold == 0.0:
        assert (got != 255).all()
