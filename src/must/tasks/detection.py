"""Object detection: a two-stage (Faster R-CNN style) head on the shared FPN, COCO box mAP.

The head is composed from torchvision's parts, not ``FasterRCNN`` (which owns a backbone and
resizes and normalises images a second time): a ``RegionProposalNetwork`` (``RPNHead`` with 2
hidden convs) and ``RoIHeads`` (``MultiScaleRoIAlign`` + ``FastRCNNConvFCHead`` with
``num_convs`` hidden convs and one fully connected layer), both reading the pyramid levels in
``DetectionConfig.levels``. This is MuST's detection head (the paper reads P3-P7; small images
default to P2-P4).

Labels: ``"boxes"`` (N, 4) float XYXY in pixels and ``"box_labels"`` (N,) int64, 0-based.
Target (from :meth:`DetectionTask.collate`): ``{"boxes": [(n_i, 4) float32], "labels":
[(n_i,) int64], "present": (B,) bool}``; an absent image has empty boxes and is ignored, an
image that is present with zero boxes is a negatives-only image. Predictions: one dict per
image, ``{"boxes": (n, 4) float32, "labels": (n,) int64 (0-based), "scores": (n,) float32}``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision import tv_tensors
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.transforms.v2.functional import convert_bounding_box_format
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from must.errors import ConfigError, DataError
from must.features import LEVEL_STRIDES, LEVELS, FeatureSpec, require
from must.files import write_atomic
from must.records import image_weights
from must.tasks.base import StoreCheck, StoreStats, Task, TaskConfig, TaskHead, stat_text
from must.tasks.draw import fit_map
from must.tasks.registry import register_task

LOSS_NAMES = {
    "loss_objectness": "rpn_objectness",
    "loss_rpn_box_reg": "rpn_box",
    "loss_classifier": "cls",
    "loss_box_reg": "box",
}


class DetectionConfig(TaskConfig):
    """Settings of the detection head; the defaults are sized for small images (64-256 px)."""

    # Pyramid levels read by the RPN and the RoI pooling: a contiguous run of p2..p7 (sorted
    # here). MuST uses p3-p7; tiny images have no useful p6/p7.
    levels: list[str] = Field(default_factory=lambda: ["p2", "p3", "p4"])
    # One anchor size (pixels) per level; None: 4 x the level's stride.
    anchor_sizes: list[int] | None = None
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    # RPN proposals kept per level before NMS, and per image after it.
    rpn_pre_nms_top_n_train: int = Field(600, ge=1)
    rpn_pre_nms_top_n_test: int = Field(300, ge=1)
    rpn_post_nms_top_n_train: int = Field(300, ge=1)
    rpn_post_nms_top_n_test: int = Field(150, ge=1)
    rpn_batch_size_per_image: int = Field(128, ge=1)  # anchors sampled for the RPN loss
    box_batch_size_per_image: int = Field(128, ge=1)  # proposals sampled for the box loss
    box_score_thresh: float = Field(0.05, ge=0.0, le=1.0)
    box_nms_thresh: float = Field(0.5, ge=0.0, le=1.0)
    detections_per_img: int = Field(50, ge=1)
    fc_dim: int = Field(256, ge=1)
    num_convs: int = Field(4, ge=0)  # hidden 3x3 convs of the box head

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, levels: list[str]) -> list[str]:
        unknown = [lv for lv in levels if lv not in LEVELS]
        if unknown:
            raise ValueError(f"unknown pyramid levels {unknown}; use levels among {list(LEVELS)}")
        if not levels or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be non-empty and without repeats, got {levels}")
        idx = sorted(LEVELS.index(lv) for lv in levels)
        # MultiScaleRoIAlign maps a box to level k - k_min and indexes the maps with it, so a
        # gap (e.g. p2, p4) would pool from the wrong map.
        if idx != list(range(idx[0], idx[-1] + 1)):
            raise ValueError(f"levels must be a contiguous run such as p3-p5, got {levels}")
        return [LEVELS[i] for i in idx]

    @model_validator(mode="after")
    def _check_anchor_sizes(self) -> DetectionConfig:
        if self.anchor_sizes is not None:
            if len(self.anchor_sizes) != len(self.levels):
                raise ValueError(
                    f"anchor_sizes has {len(self.anchor_sizes)} sizes for "
                    f"{len(self.levels)} levels {self.levels}; give one size per level"
                )
            if any(s <= 0 for s in self.anchor_sizes):
                raise ValueError(f"anchor_sizes must be positive, got {self.anchor_sizes}")
        if any(r <= 0 for r in self.aspect_ratios):
            raise ValueError(f"aspect_ratios must be positive, got {self.aspect_ratios}")
        return self

    def level_anchor_sizes(self, strides: list[int] | None = None) -> list[int]:
        """One anchor size per level: the configured ones, else 4 x each level's stride
        (``strides``: the backbone's, by default those the level names stand for)."""
        strides = strides or [LEVEL_STRIDES[lv] for lv in self.levels]
        return list(self.anchor_sizes or [4 * s for s in strides])


class _StrideAnchorGenerator(AnchorGenerator):
    """``AnchorGenerator`` with the levels' true strides.

    torchvision infers a stride as ``image_size // grid_size``, exact only for images padded to
    a multiple of the coarsest stride (``FasterRCNN`` pads; we do not), so the anchors of a
    70 px image would drift. The strides are known, so use them.
    """

    def __init__(
        self,
        strides: list[int],
        sizes: tuple[tuple[int, ...], ...],
        aspect_ratios: tuple[tuple[float, ...], ...],
    ) -> None:
        super().__init__(sizes, aspect_ratios)
        self.strides = list(strides)

    def forward(
        self, image_list: ImageList, feature_maps: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class _RPNHead(RPNHead):
    """RPNHead whose outputs are float32: under autocast the convs may run in bf16/fp16, but
    box decoding and losses must not (bf16 keeps 8 bits: a 300 px coordinate moves by 2 px)."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class _BoxPredictor(FastRCNNPredictor):
    """FastRCNNPredictor with float32 outputs (see :class:`_RPNHead`)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class DetectionHead(TaskHead):
    """RPN + Fast R-CNN box head on the shared pyramid (see the module docstring)."""

    def __init__(
        self, features: Mapping[str, FeatureSpec], num_classes: int, config: DetectionConfig
    ) -> None:
        super().__init__()
        cfg = config
        self.levels = list(cfg.levels)
        specs = [
            require(features, lv, "the detection head (detection.levels)") for lv in self.levels
        ]
        # One RPN head and one RoI pooling serve every level: the levels share a width.
        widths = {s.channels for s in specs}
        if len(widths) != 1:
            raise ConfigError(
                f"detection.levels {self.levels}: the maps differ in channels "
                f"({[s.channels for s in specs]}); the detection head needs one width"
            )
        in_channels = widths.pop()
        strides = [s.stride for s in specs]
        anchors = _StrideAnchorGenerator(
            strides,
            tuple((s,) for s in cfg.level_anchor_sizes(strides)),
            (tuple(cfg.aspect_ratios),) * len(self.levels),
        )
        # torchvision's Faster R-CNN settings, with the sampling and top-n sizes from config.
        self.rpn = RegionProposalNetwork(
            anchors,
            _RPNHead(in_channels, len(cfg.aspect_ratios), conv_depth=2),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=cfg.rpn_batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n={
                "training": cfg.rpn_pre_nms_top_n_train,
                "testing": cfg.rpn_pre_nms_top_n_test,
            },
            post_nms_top_n={
                "training": cfg.rpn_post_nms_top_n_train,
                "testing": cfg.rpn_post_nms_top_n_test,
            },
            nms_thresh=0.7,
        )
        hidden = cfg.hidden_channels or in_channels
        box_head = FastRCNNConvFCHead(
            (in_channels, 7, 7),
            [hidden] * cfg.num_convs,
            [cfg.fc_dim],
            norm_layer=nn.BatchNorm2d,
        )
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(featmap_names=self.levels, output_size=7, sampling_ratio=2),
            box_head,
            _BoxPredictor(cfg.fc_dim, num_classes + 1),  # torchvision's class 0 is background
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=cfg.box_batch_size_per_image,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=cfg.box_score_thresh,
            nms_thresh=cfg.box_nms_thresh,
            detections_per_img=cfg.detections_per_img,
        )

    def forward(
        self, feats: dict[str, torch.Tensor], image_size: tuple[int, int], target: Any = None
    ) -> tuple[list[dict[str, torch.Tensor]] | None, dict[str, torch.Tensor]]:
        """Predictions when ``target`` is None or in eval mode; loss terms (``rpn_objectness``,
        ``rpn_box``, ``cls``, ``box``) over the present images when training with a target.
        """
        if target is None or not self.training:
            # torchvision's RPN and RoIHeads branch on ``self.training``; inference without a
            # target while training (e.g. a look at predictions mid-run) uses their test path.
            with _test_path(self.rpn, self.roi_heads):
                return self._predict(feats, image_size), {}
        present = target["present"].to(torch.bool)
        if not bool(present.any()):
            zero = self.zero_loss()
            return None, {name: zero for name in LOSS_NAMES.values()}
        idx = present.nonzero().flatten().to(feats[self.levels[0]].device)
        targets = [
            _torchvision_target(target["boxes"][i], target["labels"][i]) for i in idx.tolist()
        ]
        levels = self._levels(feats, idx)
        images = _image_list(levels, image_size)
        proposals, rpn_losses = self.rpn(images, levels, targets)
        _, roi_losses = self.roi_heads(levels, proposals, images.image_sizes, targets)
        losses = {**rpn_losses, **roi_losses}
        return None, {LOSS_NAMES[k]: v for k, v in losses.items()}

    def _predict(
        self, feats: dict[str, torch.Tensor], image_size: tuple[int, int]
    ) -> list[dict[str, torch.Tensor]]:
        levels = self._levels(feats)
        images = _image_list(levels, image_size)
        proposals, _ = self.rpn(images, levels)
        detections, _ = self.roi_heads(levels, proposals, images.image_sizes)
        return [
            {"boxes": d["boxes"], "labels": d["labels"] - 1, "scores": d["scores"]}
            for d in detections
        ]

    def _levels(
        self, feats: dict[str, torch.Tensor], idx: torch.Tensor | None = None
    ) -> OrderedDict[str, torch.Tensor]:
        # float32 so that anchors, proposals and RoI pooling stay exact under autocast; the
        # convs still run in low precision there.
        out = OrderedDict()
        for lv in self.levels:
            f = feats[lv] if idx is None else feats[lv][idx]
            out[lv] = f.float()
        return out


def _image_list(levels: OrderedDict[str, torch.Tensor], image_size: tuple[int, int]) -> ImageList:
    """An ImageList without pixels: the RPN and RoI heads read only the image sizes (for
    clipping and pooling scales) and torchvision's AnchorGenerator the shape of ``tensors``.
    An empty (B, 0, H, W) tensor has that shape and allocates nothing."""
    first = next(iter(levels.values()))
    h, w = int(image_size[0]), int(image_size[1])
    placeholder = first.new_empty((first.shape[0], 0, h, w))
    return ImageList(placeholder, [(h, w)] * first.shape[0])


def _torchvision_target(boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One image's target in torchvision's convention (labels 1..K, 0 = background); boxes
    with no area are dropped (their regression target would be log(0))."""
    boxes = boxes.float().reshape(-1, 4)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep], "labels": labels.long()[keep] + 1}


@contextmanager
def _test_path(*modules: nn.Module) -> Iterator[None]:
    """Set ``training=False`` on these modules only (not their children, so BatchNorm keeps
    its mode), restoring it after."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode


class DetectionMetric(MeanAveragePrecision):
    """COCO box mAP (pycocotools) over the whole set; ``compute()`` gives the scalar entries
    ("map", "map_50", "map_75", "map_small/medium/large", "mar_1/10/100", ...).

    ``update(predictions, target)`` takes the head's predictions and a collated target (absent
    images are skipped) or a list of ``{"boxes", "labels"}`` dicts. Images with no ground truth
    still count: their detections are false positives.
    """

    def __init__(self, **kwargs: Any) -> None:
        # pycocotools' own float64 thresholds: torchmetrics' defaults come from a float32
        # linspace (0.6 -> 0.6000000238), so an IoU of exactly 0.6 would miss COCO's ">= 0.6".
        kwargs.setdefault("iou_thresholds", np.linspace(0.5, 0.95, 10).tolist())
        kwargs.setdefault("rec_thresholds", np.linspace(0.0, 1.0, 101).tolist())
        super().__init__(box_format="xyxy", iou_type="bbox", backend="pycocotools", **kwargs)

    def update(self, predictions: list[dict[str, torch.Tensor]], target: Any) -> None:
        pairs = [pair for pair in scored_images(predictions, target) if pair is not None]
        if pairs:
            super().update([pred for pred, _ in pairs], [ref for _, ref in pairs])

    def compute(self) -> dict[str, torch.Tensor]:
        # Drop the per-class vectors and the class list: callers log each value as a float.
        return {
            k: v.float()
            for k, v in super().compute().items()
            if k != "classes" and not k.endswith("_per_class")
        }


def scored_images(
    predictions: list[dict[str, torch.Tensor]], target: Any
) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None]:
    """Per image of a batch, the (prediction, ground truth) pair ``DetectionMetric`` scores
    (in the image's own pixels when the target carries ``original``), None for an image
    without a label. ``target``: a collated target or a list of ``{"boxes", "labels"}``."""
    if isinstance(target, dict):
        gts = [
            {"boxes": b, "labels": lab}
            for b, lab in zip(target["boxes"], target["labels"], strict=True)
        ]
        present = target.get("present")
        present = [True] * len(gts) if present is None else [bool(p) for p in present]
        originals = target.get("original")
        if originals is not None:
            # Scored at each image's own size: predictions mapped back, ground truth as read.
            predictions = [to_original(p, o) for p, o in zip(predictions, originals, strict=True)]
            gts = [original_target(o) for o in originals]
    else:
        gts, present = list(target), [True] * len(target)
    if len(predictions) != len(gts):
        raise ValueError(f"{len(predictions)} predictions for {len(gts)} targets")
    out: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None] = []
    for pred, gt, keep in zip(predictions, gts, present, strict=True):
        if not keep:
            out.append(None)
            continue
        device = pred["boxes"].device
        scored = {
            "boxes": pred["boxes"].detach().float().reshape(-1, 4),
            "scores": pred["scores"].detach().float(),
            "labels": pred["labels"].detach().long(),
        }
        ref = {
            "boxes": torch.as_tensor(gt["boxes"]).float().reshape(-1, 4).to(device),
            "labels": torch.as_tensor(gt["labels"]).long().to(device),
        }
        # COCO's crowd regions (matched detections are ignored) and annotation areas.
        for key in ("iscrowd", "area"):
            if key in gt:
                ref[key] = torch.as_tensor(gt[key]).to(device)
        out.append((scored, ref))
    return out


def detection_record(
    prediction: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """One image's scored pair (``scored_images``) as its test record: ``boxes`` (n, 4)
    float32 XYXY, ``scores`` (n,) float32, ``labels`` (n,) int64, ``gt_boxes`` (m, 4)
    float32 XYXY, ``gt_labels`` (m,) int64, ``gt_crowd`` (m,) int64 (COCO's iscrowd) and
    ``gt_area`` (m,) float64 (COCO's area; 0: the box's, as torchmetrics computes it)."""
    m = len(reference["labels"])

    def array(value: Any, dtype: Any) -> np.ndarray:
        return torch.as_tensor(value).detach().cpu().numpy().astype(dtype)

    return {
        "boxes": array(prediction["boxes"], np.float32).reshape(-1, 4),
        "scores": array(prediction["scores"], np.float32).reshape(-1),
        "labels": array(prediction["labels"], np.int64).reshape(-1),
        "gt_boxes": array(reference["boxes"], np.float32).reshape(-1, 4),
        "gt_labels": array(reference["labels"], np.int64).reshape(-1),
        "gt_crowd": array(reference.get("iscrowd", torch.zeros(m)), np.int64).reshape(-1),
        "gt_area": array(reference.get("area", torch.zeros(m)), np.float64).reshape(-1),
    }


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """XYXY -> XYWH in float32 arithmetic, as torchvision's ``box_convert`` does for the
    metric (so pycocotools sees the very same numbers)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


# Elements of a (resamples, IoU thresholds, detections) array handled at once by
# ``coco_records_metric`` (bounds its memory to a few tens of MB).
RECORDS_CHUNK_ELEMENTS = 2_000_000


def coco_records_metric(
    records: Sequence[Mapping[str, np.ndarray]],
) -> Callable[[np.ndarray], np.ndarray]:
    """COCO box mAP@[.5:.95] of re-weighted images (``Task.records_metric``), from the images'
    ``detection_record``s. With unit weights it is ``DetectionMetric``'s ``map``: COCO
    ground truth and results are built as torchmetrics builds them and matched once by
    ``COCOeval.evaluate()`` (bbox, default parameters, area "all"); image weights then
    multiply every count of ``COCOeval.accumulate``. pycocotools has no weighted accumulate,
    so that step is written here, following its code: per category, the detections of every
    image (each image's first maxDet by score) sorted by score (stable), cumulative weighted
    true and false positives per IoU threshold, recall = tp / weighted non-ignored ground
    truth, precision made non-increasing from the right, read at 101 recall thresholds
    (``searchsorted(..., side="left")``, 0 beyond the last detection). A category without
    weighted ground truth is left out of the mean (COCO's -1); -1 when no category is left
    (as ``DetectionMetric`` gives then)."""
    n = len(records)
    classes = sorted(
        {int(c) for r in records for c in (*r["gt_labels"].tolist(), *r["labels"].tolist())}
    )
    gt_anns: list[dict[str, Any]] = []
    dt_anns: list[dict[str, Any]] = []
    for i, r in enumerate(records):
        areas, crowd = r["gt_area"].tolist(), r["gt_crowd"].tolist()
        for j, (box, label) in enumerate(
            zip(_xywh(r["gt_boxes"]).tolist(), r["gt_labels"].tolist(), strict=True)
        ):
            gt_anns.append(
                {
                    "id": len(gt_anns) + 1,  # ids from 1: pycocotools marks "no match" with 0
                    "image_id": i,
                    "category_id": int(label),
                    "bbox": box,
                    "area": areas[j] if areas[j] > 0 else box[2] * box[3],
                    "iscrowd": int(crowd[j]),
                }
            )
        for box, label, score in zip(
            _xywh(r["boxes"]).tolist(), r["labels"].tolist(), r["scores"].tolist(), strict=True
        ):
            dt_anns.append(
                {
                    "id": len(dt_anns) + 1,
                    "image_id": i,
                    "category_id": int(label),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                    "score": float(score),
                }
            )
    if n == 0:
        return lambda weights: np.full(len(image_weights(weights, 0)), -1.0)
    images = [{"id": i} for i in range(n)]
    categories = [{"id": c, "name": str(c)} for c in classes]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = []
        for anns in (gt_anns, dt_anns):
            c = COCO()
            c.dataset = {"images": images, "annotations": anns, "categories": categories}
            c.createIndex()
            coco.append(c)
        ev = COCOeval(coco[0], coco[1], iouType="bbox")
        # Area "all" alone: the other ranges are evaluated separately and never read here.
        ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:1], ev.params.areaRngLbl[:1]
        ev.evaluate()
    max_det = ev.params.maxDets[-1]
    rec_thrs = ev.params.recThrs
    thresholds = len(ev.params.iouThrs)
    per_class = []
    for k in range(len(ev.params.catIds)):
        scores, image, matched, ignored = [], [], [], []
        gt_counts = np.zeros(n)
        for i in range(n):
            e = ev.evalImgs[k * n + i]
            if e is None:  # neither ground truth nor detection of the class in the image
                continue
            gt_counts[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            s = np.asarray(e["dtScores"][:max_det], np.float64)
            scores.append(s)
            image.append(np.full(len(s), i))
            matched.append(e["dtMatches"][:, :max_det])
            ignored.append(e["dtIgnore"][:, :max_det])
        if not scores:
            continue
        order = np.argsort(-np.concatenate(scores), kind="mergesort")
        dtm = np.concatenate(matched, axis=1)[:, order]
        dt_ignored = np.concatenate(ignored, axis=1)[:, order]
        tp = np.logical_and(dtm, np.logical_not(dt_ignored)).astype(np.float64)
        fp = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ignored)).astype(np.float64)
        per_class.append((np.concatenate(image)[order], tp, fp, gt_counts))

    def metric(weights: np.ndarray) -> np.ndarray:
        w = image_weights(weights, n)
        total, counted = np.zeros(len(w)), np.zeros(len(w))
        for image, tp, fp, gt_counts in per_class:
            npig = w @ gt_counts
            rows = np.flatnonzero(npig > 0)
            counted[rows] += 1
            d = tp.shape[1]
            if d == 0:
                continue  # AP 0
            step = max(1, RECORDS_CHUNK_ELEMENTS // (thresholds * d))
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                total[chunk] += _weighted_ap(w[chunk][:, image], tp, fp, npig[chunk], rec_thrs)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counted > 0, total / counted, -1.0)

    return metric


def _weighted_ap(
    weights: np.ndarray, tp: np.ndarray, fp: np.ndarray, npig: np.ndarray, rec_thrs: np.ndarray
) -> np.ndarray:
    """(C,) AP averaged over IoU thresholds of one category: ``weights`` (C, D) of its
    detections (in score order), ``tp``/``fp`` (T, D) flags, ``npig`` (C,) weighted number of
    non-ignored ground-truth boxes (> 0). ``COCOeval.accumulate`` with counts weighted."""
    tps = weights[:, None, :] * tp[None]
    np.cumsum(tps, axis=2, out=tps)
    counted = tp + fp  # 0 for detections ignored at that threshold
    if (counted == counted[:1]).all():  # the same detections count at every threshold
        scored = np.cumsum(weights * counted[0], axis=1)[:, None, :]
    else:
        scored = weights[:, None, :] * counted[None]
        np.cumsum(scored, axis=2, out=scored)
    recall = tps / npig[:, None, None]
    precision = tps / (scored + np.spacing(1))  # tp / (tp + fp + eps), as pycocotools
    # pycocotools' envelope: each precision raised to the largest one at a higher recall.
    np.maximum.accumulate(precision[..., ::-1], axis=2, out=precision[..., ::-1])
    c, t, d = tps.shape
    recall, precision = recall.reshape(c * t, d), precision.reshape(c * t, d)
    at = np.stack([np.searchsorted(row, rec_thrs, side="left") for row in recall])
    q = np.take_along_axis(precision, np.minimum(at, d - 1), axis=1)
    q[at >= d] = 0.0  # recall thresholds beyond the last detection
    return q.reshape(c, t * len(rec_thrs)).mean(axis=1)


def to_original(prediction: dict[str, torch.Tensor], original: Mapping[str, Any]) -> dict:
    """One image's predictions from the network's input pixels to the image's own pixels
    (``original`` from the evaluation transform: its ``size`` (H, W) and ``scale`` (sy, sx)),
    clipped to the image (padding added for batching lies outside it)."""
    (h, w), (sy, sx) = original["size"], original["scale"]
    boxes = prediction["boxes"].detach().float().reshape(-1, 4)
    boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return {**prediction, "boxes": boxes}


def original_target(original: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ground truth as read (image pixels), crowd regions appended with ``iscrowd`` 1;
    ``area`` is the annotations' own (COCO's ``area``) when the reader gives it, else the
    box area, as pycocotools computes it."""
    boxes = _xyxy(original.get("boxes", torch.zeros(0, 4)))
    labels = torch.as_tensor(original.get("box_labels", torch.zeros(0))).long().reshape(-1)
    crowd = _xyxy(original.get("crowd_boxes", torch.zeros(0, 4)))
    crowd_labels = torch.as_tensor(original.get("crowd_labels", torch.zeros(0))).long()

    def box_area(b: torch.Tensor) -> torch.Tensor:
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    area = original.get("box_areas")
    area = box_area(boxes) if area is None else torch.as_tensor(area).float().reshape(-1)
    return {
        "boxes": torch.cat([boxes, crowd]),
        "labels": torch.cat([labels, crowd_labels.reshape(-1)]),
        "iscrowd": torch.cat(
            [torch.zeros(len(boxes), dtype=torch.long), torch.ones(len(crowd), dtype=torch.long)]
        ),
        "area": torch.cat([area, box_area(crowd)]),
    }


class DetectionSource(BaseModel):
    """COCO JSON: boxes as [x, y, w, h] in pixels, optional instance masks (RLE or polygons)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["coco"] = "coco"
    annotations: str


@register_task
class DetectionTask(Task):
    """Box detection over ``classes``; primary metric COCO mAP@[.5:.95]."""

    name = "detection"
    label_keys = ("boxes", "box_labels")
    primary_metric = "map"
    higher_is_better = True
    config_type = DetectionConfig
    config: DetectionConfig

    # -- label files (see Task): COCO JSON (boxes, instance masks as RLE or polygons); the
    # renderer writes one COCO file per split, masks as compressed RLE.
    source_type = DetectionSource
    scene_vocabulary = "categories"
    coco_labels = "instances"

    @classmethod
    def label_entries(cls, labels: Mapping[str, Any], canvas_size: tuple[int, int]) -> dict:
        out = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(labels["boxes"]), format="XYXY", canvas_size=canvas_size
            ),
            "box_labels": torch.from_numpy(labels["box_labels"]),
            "box_areas": torch.from_numpy(labels["box_areas"]),
            "crowd_boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(labels["crowd_boxes"]), format="XYXY", canvas_size=canvas_size
            ),
            "crowd_labels": torch.from_numpy(labels["crowd_labels"]),
        }
        if "instance_masks" in labels:
            out["instance_masks"] = tv_tensors.Mask(torch.from_numpy(labels["instance_masks"]))
        return out

    @classmethod
    def write_label_file(
        cls, sample: Any, root: Path, split: str, key: str, options: Any, where: Path
    ) -> dict:
        """The sample's COCO annotations (without ids), written by ``rendered_source``."""
        classes = options.classes_of(cls.name)
        anns = []
        for box, label, mask in zip(
            sample.boxes, sample.box_labels, sample.instance_masks(), strict=True
        ):
            label = int(label)
            if not 0 <= label < len(classes):
                raise DataError(
                    where,
                    f"box label {label} is not an index of the {len(classes)} {cls.name} classes",
                )
            x1, y1, x2, y2 = (float(v) for v in box)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            anns.append(
                {
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": {
                        "size": [int(s) for s in rle["size"]],
                        "counts": rle["counts"].decode("ascii"),
                    },
                }
            )
        return {"annotations": anns}

    @classmethod
    def rendered_source(
        cls, split: str, records: list[dict], root: Path, options: Any
    ) -> dict[str, Any]:
        """Writes ``{task}/{split}.json``: images and annotations numbered from 1 in the order
        of ``records``."""
        images, annotations = [], []
        for image_id, rec in enumerate(records, start=1):
            images.append(
                {
                    "id": image_id,
                    "file_name": rec["file_name"],
                    "width": rec["width"],
                    "height": rec["height"],
                }
            )
            for ann in rec.get("annotations", []):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
        classes = options.classes_of(cls.name)
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        path = f"{cls.name}/{split}.json"
        text = json.dumps(coco)
        write_atomic(root / path, lambda tmp: tmp.write_text(text))
        return {"annotations": path}

    @classmethod
    def rendered_format(cls, records: Mapping[str, list[dict]], options: Any) -> Any:
        return (
            "COCO JSON; category_id = class index + 1; bbox [x, y, w, h] pixels; "
            "segmentation: compressed RLE"
        )

    @property
    def size_divisor(self) -> int:
        return max(32, *(LEVEL_STRIDES[lv] for lv in self.config.levels))

    def build_head(self, features: Mapping[str, FeatureSpec]) -> TaskHead:
        return DetectionHead(features, self.num_classes, self.config)

    def collate(self, samples: list[dict]) -> dict[str, Any] | None:
        present = [self.has_label(s) for s in samples]
        if not any(present):
            return None
        boxes: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        for s, has in zip(samples, present, strict=True):
            if not has:
                boxes.append(torch.zeros(0, 4))
                labels.append(torch.zeros(0, dtype=torch.int64))
                continue
            b = _xyxy(s["boxes"])
            if "box_labels" not in s:
                raise ValueError("a sample has 'boxes' but no 'box_labels'")
            lab = torch.as_tensor(s["box_labels"]).as_subclass(torch.Tensor).long().reshape(-1)
            if lab.numel() != b.shape[0]:
                raise ValueError(f"{b.shape[0]} boxes but {lab.numel()} box_labels")
            if lab.numel() and not (int(lab.min()) >= 0 and int(lab.max()) < self.num_classes):
                raise ValueError(
                    f"box label outside the {self.num_classes} classes: {lab.tolist()}"
                )
            boxes.append(b)
            labels.append(lab)
        target = {
            "boxes": boxes,
            "labels": labels,
            "present": torch.tensor(present, dtype=torch.bool),
        }
        # Evaluation samples carry their ground truth at their own size (transforms.py).
        if all("original" in s for s in samples):
            target["original"] = [s["original"] for s in samples]
        return target

    def new_metric(self) -> DetectionMetric:
        return DetectionMetric()

    def image_records(
        self, predictions: list[dict[str, torch.Tensor]], target: Any
    ) -> list[dict[str, np.ndarray] | None]:
        """Each image's predictions and ground truth as ``DetectionMetric`` scores them (see
        ``detection_record``)."""
        return [
            None if pair is None else detection_record(*pair)
            for pair in scored_images(predictions, target)
        ]

    @classmethod
    def records_metric(
        cls, records: list[dict[str, np.ndarray]]
    ) -> Callable[[np.ndarray], np.ndarray]:
        return coco_records_metric(records)

    # -- the pseudo-label store: ``det_boxes`` float32 (n, 4) XYXY in pixels of the image at
    # its own size, ``det_classes`` int16 (n,), ``det_scores`` float16 (n,)

    def to_store(
        self,
        prediction: Any,
        image_size: tuple[int, int],
        input_size: tuple[int, int],
        settings: Mapping[str, Any],
    ) -> dict[str, np.ndarray]:
        """Boxes whose score is at least ``settings["det_threshold"]``, scaled from the
        teacher's input size to the image's own size (and clipped to it)."""
        scores = torch.as_tensor(prediction["scores"]).float().reshape(-1)
        keep = scores >= float(settings.get("det_threshold", 0.5))
        boxes = torch.as_tensor(prediction["boxes"]).float().reshape(-1, 4)[keep]
        (h, w), (ih, iw) = image_size, input_size
        boxes = boxes * torch.tensor([w / iw, h / ih, w / iw, h / ih])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = torch.as_tensor(prediction["labels"]).reshape(-1)[keep]
        return {
            "det_boxes": boxes.numpy().astype(np.float32),
            "det_classes": labels.numpy().astype(np.int16),
            "det_scores": scores[keep].numpy().astype(np.float16),
        }

    def label_to_store(
        self, sample: Mapping[str, Any], label_size: tuple[int, int]
    ) -> dict[str, np.ndarray] | None:
        """Real boxes are kept as they are, with score 1."""
        if not self.has_label(sample):
            return None
        boxes = _xyxy(sample["boxes"]).numpy()
        labels = torch.as_tensor(sample["box_labels"]).as_subclass(torch.Tensor).reshape(-1)
        return {
            "det_boxes": boxes.astype(np.float32),
            "det_classes": labels.numpy().astype(np.int16),
            "det_scores": np.ones(len(boxes), np.float16),
        }

    def from_store(
        self, fields: Mapping[str, np.ndarray], image_size: tuple[int, int]
    ) -> dict[str, Any]:
        boxes = torch.from_numpy(fields["det_boxes"].astype(np.float32)).reshape(-1, 4)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image_size)),
            "box_labels": torch.from_numpy(fields["det_classes"].astype(np.int64)),
        }

    # -- store and labelling: encoding and checks, settings, remapping, statistics

    store_encoding: ClassVar[dict[str, Any]] = {
        "fields": {"det_boxes": "float32", "det_classes": "int16", "det_scores": "float16"},
        "box_format": "xyxy",
        "box_units": "pixels",
    }

    class LabelSettings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        det_threshold: float = Field(0.5, description="keep boxes with score >= it")

        @field_validator("det_threshold")
        @classmethod
        def _fraction(cls, value: float) -> float:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"det_threshold must be in [0, 1], got {value}")
            return value

    label_settings_type = LabelSettings

    @classmethod
    def check_store_classes(cls, where: str, classes: list[str] | None) -> None:
        super().check_store_classes(where, classes)
        if len(classes or []) > np.iinfo(np.int16).max:
            raise ConfigError(f"{where}: too many classes for int16")

    def check_store_fields(
        self, check: StoreCheck, task: str, given: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        k = self.num_classes
        boxes = check.array(given["det_boxes"], task, "det_boxes", "float32", 2)
        labels = check.array(given["det_classes"], task, "det_classes", "int16", 1)
        scores = check.array(given["det_scores"], task, "det_scores", "float16", 1)
        n = len(labels)
        if boxes.shape != (n, 4) or scores.shape != (n,):
            raise check.fail(
                f"{task}: det_boxes {boxes.shape}, det_classes {labels.shape}, det_scores "
                f"{scores.shape} must be (n, 4), (n,), (n,)"
            )
        if n and (labels.min() < 0 or labels.max() >= k):
            raise check.fail(f"{task}.det_classes outside [0, {k})")
        if n and ((scores < 0).any() or (scores > 1).any()):
            raise check.fail(f"{task}.det_scores outside [0, 1]")
        if n and ((boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any()):
            raise check.fail(f"{task}.det_boxes: x2 < x1 or y2 < y1 (boxes are xyxy)")
        return {"det_boxes": boxes, "det_classes": labels, "det_scores": scores}

    def remap_classes(
        self, sample: dict[str, Any], lut: np.ndarray, ignore_index: int
    ) -> dict[str, Any]:
        if "box_labels" not in sample:
            return sample
        return {**sample, "box_labels": torch.from_numpy(lut[np.asarray(sample["box_labels"])])}

    def store_stats(self) -> StoreStats:
        return _DetectionStats()

    @classmethod
    def format_store_stats(cls, stats: Mapping[str, Any]) -> list[str]:
        hist = ", ".join(f"{k}: {v}" for k, v in stats["boxes_per_image_hist"].items())
        edges = stats["score_hist_edges"]
        scores = ", ".join(
            f"[{edges[i]:.1f},{edges[i + 1]:.1f}{']' if i == len(edges) - 2 else ')'}: {n}"
            for i, n in enumerate(stats["score_hist"])
            if n
        )
        return [
            f"  boxes per image mean {stat_text(stats['boxes_per_image_mean'], 2)} "
            f"({stats['boxes']} boxes)",
            f"  boxes per image histogram: {hist}",
            f"  score histogram (pseudo): {scores or 'no boxes'}",
        ]

    def store_lines(self, sample: Mapping[str, Any]) -> list[str]:
        return [f"boxes: {len(sample['boxes'])}"] if "boxes" in sample else []

    # -- pictures, transforms and evaluation

    picture = "overlay"
    pad_fill: ClassVar[Mapping[str, float]] = {"instance_masks": 0}
    needs_aspect = True
    nothing_to_measure = "no image has a ground-truth box"
    # ``crowd_boxes``/``crowd_labels`` (COCO ``iscrowd`` regions) and ``box_areas`` (COCO's
    # ``area`` of each box) are optional sample keys: only evaluation reads them.
    original_keys = ("boxes", "box_labels", "box_areas", "crowd_boxes", "crowd_labels")
    eval_only_keys = ("box_areas", "crowd_boxes", "crowd_labels")
    results_format = "coco"

    @classmethod
    def wrap_for_transforms(
        cls, sample: dict[str, Any], *, scales_with_zoom: bool
    ) -> dict[str, Any]:
        if "instance_masks" in sample and not isinstance(sample["instance_masks"], tv_tensors.Mask):
            sample["instance_masks"] = tv_tensors.Mask(sample["instance_masks"])
        if "boxes" in sample and not isinstance(sample["boxes"], tv_tensors.BoundingBoxes):
            raise TypeError("'boxes' must be tv_tensors.BoundingBoxes (XYXY)")
        return sample

    @classmethod
    def draw(
        cls,
        entries: Mapping[str, Any],
        image: torch.Tensor,
        classes: Sequence[str],
        source_size: tuple[int, int],
    ) -> torch.Tensor | None:
        """Instance masks, then boxes named by their class, over the image."""
        if "boxes" not in entries and "instance_masks" not in entries:
            return None
        height, width = image.shape[-2:]
        drawn = image
        if "instance_masks" in entries and len(entries["instance_masks"]):
            masks = fit_map(entries["instance_masks"], (height, width)).bool()
            drawn = draw_segmentation_masks(drawn, masks, alpha=0.35)
        if "boxes" in entries and len(entries["boxes"]):
            boxes = torch.as_tensor(entries["boxes"]).as_subclass(torch.Tensor).float()
            boxes = boxes * torch.tensor([width / source_size[1], height / source_size[0]] * 2)
            ids = torch.as_tensor(entries["box_labels"]).tolist()
            labels = [classes[i] if i < len(classes) else str(i) for i in ids]
            drawn = draw_bounding_boxes(drawn, boxes, labels=labels, colors="white")
        return drawn

    def prediction_entries(
        self, prediction: Any, image_size: tuple[int, int]
    ) -> dict[str, Any] | None:
        """The boxes scored at least 0.5."""
        fields = self.to_store(prediction, image_size, image_size, {"det_threshold": 0.5})
        return self.from_store(fields, image_size)

    def predictions_to_original(self, predictions: Any, target: Any) -> list[Any] | None:
        """Each image's boxes in its own pixels (evaluation targets carry ``original``);
        None for an image without ground truth."""
        originals = target.get("original") if isinstance(target, dict) else None
        if originals is None:
            return None
        return [
            to_original(pred, original) if bool(present) else None
            for pred, present, original in zip(
                predictions, target["present"], originals, strict=True
            )
        ]


BOX_BINS = (0, 1, 2, 3, 4, 5, 10)  # boxes per image: 0, 1, 2, 3, 4, 5-9, 10+
SCORE_BINS = 10  # score histogram over [0, 1]


class _DetectionStats(StoreStats):
    """Boxes per image (mean, histogram) and the score histogram of the pseudo labels."""

    def __init__(self) -> None:
        self.boxes: list[int] = []
        self.scores: list[np.ndarray] = []

    def add(self, fields: Mapping[str, np.ndarray], origin: str) -> None:
        self.boxes.append(len(fields["det_classes"]))
        if origin == "pseudo":
            self.scores.append(fields["det_scores"].astype(np.float32))

    def result(self) -> dict[str, Any]:
        b = np.asarray(self.boxes, np.int64)
        edges = [*BOX_BINS, math.inf]
        s = np.concatenate(self.scores) if self.scores else np.zeros(0, np.float32)
        score_edges = [i / SCORE_BINS for i in range(SCORE_BINS + 1)]
        return {
            "images": len(b),
            "boxes": int(b.sum()),
            "boxes_per_image_mean": float(b.mean()) if len(b) else None,
            "boxes_per_image_hist": {
                (
                    f"{lo}" if hi - lo == 1 else f"{lo}+" if hi == math.inf else f"{lo}-{hi - 1}"
                ): int(((b >= lo) & (b < hi)).sum())
                for lo, hi in itertools.pairwise(edges)
            },
            "score_hist_edges": score_edges,
            "score_hist": [int(c) for c in np.histogram(s, bins=score_edges)[0]],
            "score_mean": float(s.mean()) if s.size else None,
        }


def _xyxy(value: Any) -> torch.Tensor:
    """(N, 4) float32 XYXY boxes from BoundingBoxes (any format) or a plain tensor (XYXY)."""
    xyxy = tv_tensors.BoundingBoxFormat.XYXY
    if isinstance(value, tv_tensors.BoundingBoxes) and value.format != xyxy:
        value = convert_bounding_box_format(value, new_format=xyxy)
    t = torch.as_tensor(value).as_subclass(torch.Tensor).float()
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.dim() != 2 or t.shape[1] != 4:
        raise ValueError(f"'boxes' should be (N, 4), got shape {tuple(t.shape)}")
    return t
