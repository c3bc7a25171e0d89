"""Detection task: config checks, collate, the two-stage head on the shared FPN (inference
format, partial labels, no labels, autocast, overfitting two images) and COCO mAP against
hand-computed values."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torchvision import tv_tensors
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from must.errors import ConfigError
from must.models.model import MultiTaskModel
from must.tasks import build_task
from must.tasks.detection import (
    DetectionConfig,
    DetectionMetric,
    DetectionTask,
    _StrideAnchorGenerator,
)
from tiny import tiny_backbone

TINY = tiny_backbone(fpn_channels=32)
SIZE = 64
CLASSES = ["red", "green"]
# Two fixed scenes: (boxes XYXY, labels); class 0 is a red rectangle, class 1 a green one.
SCENES = [
    ([[6, 8, 30, 26], [36, 34, 58, 60]], [0, 1]),
    ([[10, 36, 26, 58], [34, 6, 60, 22], [40, 40, 54, 54]], [1, 0, 1]),
]
LOSS_KEYS = {"rpn_objectness", "rpn_box", "cls", "box"}


def make_sample(i: int, with_boxes: bool = True, empty: bool = False) -> dict:
    """Bright rectangles on a dark noisy background; ``empty``: labelled, but no box."""
    g = torch.Generator().manual_seed(i)
    image = torch.rand(3, SIZE, SIZE, generator=g) * 0.15
    boxes, labels = SCENES[i % len(SCENES)]
    if empty:
        boxes, labels = [], []
    for (x0, y0, x1, y1), c in zip(boxes, labels, strict=True):
        image[:, y0:y1, x0:x1] = 0.2
        image[c, y0:y1, x0:x1] = 0.9
    sample: dict = {"key": f"img{i}", "image": tv_tensors.Image((image * 255).to(torch.uint8))}
    if with_boxes:
        sample["boxes"] = tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(SIZE, SIZE),
        )
        sample["box_labels"] = torch.tensor(labels, dtype=torch.int64)
    return sample


def images_of(samples: list[dict]) -> torch.Tensor:
    return torch.stack([s["image"].float() / 255 for s in samples])


def make_model(**config) -> tuple[MultiTaskModel, DetectionTask]:
    torch.manual_seed(0)
    task = DetectionTask(CLASSES, DetectionConfig(**config))
    return MultiTaskModel(TINY, {"detection": task}), task


# --- config and collate ---------------------------------------------------------------------


def test_config_levels_and_anchor_sizes_are_checked():
    assert DetectionConfig(levels=["p4", "p3"]).levels == ["p3", "p4"]  # sorted
    assert DetectionConfig().level_anchor_sizes() == [16, 32, 64]  # 4 x stride
    assert DetectionConfig(levels=["p3", "p4"], anchor_sizes=[20, 40]).level_anchor_sizes() == [
        20,
        40,
    ]
    with pytest.raises(ValidationError, match="unknown pyramid levels"):
        DetectionConfig(levels=["p1", "p2"])
    with pytest.raises(ValidationError, match="contiguous"):
        DetectionConfig(levels=["p2", "p4"])
    with pytest.raises(ValidationError, match="one size per level"):
        DetectionConfig(levels=["p2", "p3"], anchor_sizes=[16])
    with pytest.raises(ConfigError, match=r"(?s)model\.heads\.detection.*levels"):
        build_task("detection", CLASSES, {"levels": ["p9"]})


def test_collate_marks_absent_images_and_converts_formats():
    task = DetectionTask(CLASSES)
    assert task.collate([make_sample(0, with_boxes=False)]) is None
    cxcywh = make_sample(1)
    cxcywh["boxes"] = tv_tensors.BoundingBoxes(
        torch.tensor([[18.0, 47.0, 16.0, 22.0]]), format="CXCYWH", canvas_size=(SIZE, SIZE)
    )
    cxcywh["box_labels"] = torch.tensor([1])
    target = task.collate(
        [make_sample(0), make_sample(1, with_boxes=False), make_sample(2, empty=True), cxcywh]
    )
    assert target["present"].tolist() == [True, False, True, True]
    assert [b.shape[0] for b in target["boxes"]] == [2, 0, 0, 1]
    assert [lab.tolist() for lab in target["labels"]] == [[0, 1], [], [], [1]]
    assert torch.equal(target["boxes"][3], torch.tensor([[10.0, 36.0, 26.0, 58.0]]))
    assert type(target["boxes"][0]) is torch.Tensor and target["boxes"][2].shape == (0, 4)
    bad = make_sample(0)
    bad["box_labels"] = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="outside the 2 classes"):
        task.collate([bad])


def test_anchors_use_true_strides():
    """Same anchors as torchvision's generator where the image is a multiple of the strides;
    on a 70 px image (grid 18) torchvision would infer stride 3, ours stays 4."""
    sizes, ratios = ((16,), (32,)), ((0.5, 1.0, 2.0),) * 2
    ours, stock = _StrideAnchorGenerator([4, 8], sizes, ratios), AnchorGenerator(sizes, ratios)
    images = ImageList(torch.empty(2, 0, 64, 64), [(64, 64)] * 2)
    maps = [torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 8, 8)]
    assert torch.equal(ours(images, maps)[1], stock(images, maps)[1])
    images = ImageList(torch.empty(1, 0, 70, 70), [(70, 70)])
    anchors = ours(images, [torch.zeros(1, 4, 18, 18), torch.zeros(1, 4, 9, 9)])[0]
    centres = (anchors[: 18 * 18 * 3, 0] + anchors[: 18 * 18 * 3, 2]) / 2
    assert centres.max().item() == pytest.approx(17 * 4)


# --- the head -------------------------------------------------------------------------------


def test_inference_format():
    model, task = make_model()
    model.eval()
    with torch.no_grad():
        predictions, losses = model(images_of([make_sample(0), make_sample(1)]))
    assert losses == {}
    preds = predictions["detection"]
    assert len(preds) == 2
    for p in preds:
        n = p["boxes"].shape[0]
        assert 0 < n <= task.config.detections_per_img  # untrained scores pass 0.05
        assert p["boxes"].shape == (n, 4) and p["boxes"].dtype == torch.float32
        assert p["labels"].shape == (n,) and p["labels"].dtype == torch.int64
        assert p["scores"].shape == (n,)
        assert p["boxes"].min() >= 0 and p["boxes"].max() <= SIZE
        assert bool((p["boxes"][:, 2:] >= p["boxes"][:, :2]).all())
        assert p["labels"].min() >= 0 and p["labels"].max() < len(CLASSES)
        assert bool(((p["scores"] >= 0.05) & (p["scores"] <= 1)).all())


def test_non_square_image_not_multiple_of_strides():
    model, _ = make_model()
    model.eval()
    with torch.no_grad():
        preds = model(torch.rand(1, 3, 70, 50))[0]["detection"]
    assert preds[0]["boxes"][:, 0::2].max() <= 50 and preds[0]["boxes"][:, 1::2].max() <= 70


def test_partial_batch_trains_on_present_images_only():
    """An image with boxes, one labelled with zero boxes and an absent one: finite losses, and
    the absent image's (garbage) labels do not change them."""
    model, task = make_model()
    samples = [make_sample(0), make_sample(1, empty=True), make_sample(2, with_boxes=False)]
    target = task.collate(samples)
    target["boxes"][2] = torch.tensor([[1.0, 1.0, 60.0, 60.0]])  # ignored: absent
    target["labels"][2] = torch.tensor([1])
    model.train()
    feats = model.backbone(images_of(samples))
    head = model.heads["detection"]
    torch.manual_seed(1)
    _, losses = head(feats, (SIZE, SIZE), target)
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v > 0 for k, v in losses.items() if k != "rpn_box")
    sub = {k: [v[0], v[1]] for k, v in target.items() if k != "present"}
    sub["present"] = torch.tensor([True, True])
    torch.manual_seed(1)
    _, sub_losses = head({k: v[:2] for k, v in feats.items()}, (SIZE, SIZE), sub)
    for k in LOSS_KEYS:
        assert torch.allclose(losses[k], sub_losses[k]), k
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_negatives_only_batch_has_finite_losses():
    model, task = make_model()
    target = task.collate([make_sample(0, empty=True), make_sample(1, empty=True)])
    model.train()
    _, losses = model(images_of([make_sample(0), make_sample(1)]), {"detection": target})
    terms = losses["detection"]
    assert set(terms) == LOSS_KEYS and all(torch.isfinite(v) for v in terms.values())
    assert terms["rpn_box"] == 0 and terms["box"] == 0 and terms["cls"] > 0  # no positives


def test_no_labels_gives_zero_losses_touching_every_head_parameter():
    model, task = make_model()
    images = images_of([make_sample(0), make_sample(1)])
    model.train()
    head = model.heads["detection"]
    target = task.collate([make_sample(0, with_boxes=False), make_sample(1)])
    target["present"][:] = False  # present nowhere inside the head
    _, losses = head(model.backbone(images), (SIZE, SIZE), target)
    assert set(losses) == LOSS_KEYS and all(v.item() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())
    # No detection target in the batch at all: the model's zero loss.
    model.zero_grad(set_to_none=True)
    _, losses = model(images, {"detection": None})
    losses["detection"]["loss"].backward()
    assert losses["detection"]["loss"].item() == 0
    assert all(p.grad is not None for p in head.parameters())


def test_predictions_without_target_in_train_mode_and_under_autocast():
    model, task = make_model()
    samples = [make_sample(0), make_sample(1)]
    model.train()
    head = model.heads["detection"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = model(images_of(samples))[0]["detection"]
        _, losses = model(images_of(samples), {"detection": task.collate(samples)})
    assert head.rpn.training and head.roi_heads.training  # restored
    assert len(preds) == 2 and preds[0]["boxes"].dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses["detection"].values())


@pytest.mark.slow
def test_overfits_two_images():
    """~120 AdamW steps on two fixed images: the loss falls well below half its start and the
    eval-mode detections match the boxes (AP50 > 0.5; it is 1.0 in practice)."""
    model, task = make_model()
    samples = [make_sample(0), make_sample(1)]
    images, target = images_of(samples), task.collate(samples)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    model.train()
    for _ in range(120):
        _, losses = model(images, {"detection": target})
        loss = sum(losses["detection"].values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    start, end = sum(history[:5]) / 5, sum(history[-10:]) / 10
    assert end < 0.5 * start, (start, end)
    model.eval()
    metric = task.new_metric()
    with torch.no_grad():
        metric.update(model(images)[0]["detection"], target)
    result = metric.compute()
    assert result["map_50"] > 0.5, result


# --- the metric -----------------------------------------------------------------------------


def pred(boxes: list, scores: list, labels: list) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def gt(boxes: list, labels: list) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def map_of(preds: list[dict], target) -> dict[str, float]:
    metric = DetectionMetric()
    metric.update(preds, target)
    return {k: float(v) for k, v in metric.compute().items()}


def test_metric_perfect_predictions():
    result = map_of(
        [pred([[0, 0, 10, 10], [20, 20, 40, 30]], [1.0, 1.0], [0, 1]), pred([], [], [])],
        [gt([[0, 0, 10, 10], [20, 20, 40, 30]], [0, 1]), gt([], [])],
    )
    assert result["map"] == 1 and result["map_50"] == 1 and result["map_75"] == 1
    assert "classes" not in result and not any(k.endswith("_per_class") for k in result)


@pytest.mark.parametrize("height", [6.0, 6.25])
def test_metric_iou_between_thresholds(height: float):
    """IoU([0,0,10,10], [0,0,10,h]) = h/10: 0.6 exactly (COCO matches IoU >= threshold, so
    0.6 counts at 0.6) or 0.625; AP is 1 at 0.5, 0.55, 0.6 and 0 above: map = 3/10."""
    result = map_of([pred([[0, 0, 10, height]], [1.0], [0])], [gt([[0, 0, 10, 10]], [0])])
    assert result["map_50"] == 1 and result["map_75"] == 0
    assert result["map"] == pytest.approx(0.3)


def test_metric_false_positive_ranked_above_true_positive():
    """Ranked: TP (0.95, image B), FP (0.9, image A), TP (0.8, image A). Recall/precision:
    (0.5, 1), (0.5, 1/2), (1, 2/3); interpolated precision is 1 for recall 0..0.50 (51 of the
    101 points) and 2/3 for 0.51..1 (50 points): AP50 = (51 + 50 * 2/3) / 101 = 253/303."""
    preds = [pred([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    preds.append(pred([[20, 20, 40, 40]], [0.95], [0]))
    result = map_of(preds, [gt([[0, 0, 10, 10]], [0]), gt([[20, 20, 40, 40]], [0])])
    assert result["map_50"] == pytest.approx(253 / 303, abs=1e-6)


def test_metric_counts_images_without_boxes_and_skips_absent_ones():
    """A detection on a labelled image with no boxes is a false positive (ranked first: the
    TP then sits at precision 1/2 -> AP 0.5); the same detection on an absent image is
    ignored."""
    task = DetectionTask(CLASSES)
    target = task.collate([make_sample(0), make_sample(1, empty=True)])
    truth = pred(target["boxes"][0].tolist(), [0.8, 0.8], target["labels"][0].tolist())
    wrong = pred([[5, 5, 20, 20], [30, 30, 50, 50]], [0.9, 0.9], [0, 1])
    assert map_of([truth, wrong], target)["map_50"] == pytest.approx(0.5)
    target["present"][1] = False
    assert map_of([truth, wrong], target)["map_50"] == 1
