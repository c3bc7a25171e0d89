"""Joint augmentation of a multi-task sample: one random draw moves the image and every label.

A sample is a dict with (each optional except "image"):

- ``"key"`` str and ``"classification"`` int64 scalar: passed through untouched;
- ``"image"`` :class:`tv_tensors.Image` uint8 (3, H, W);
- ``"boxes"`` :class:`tv_tensors.BoundingBoxes` XYXY (N, 4), ``"box_labels"`` int64 (N,),
  ``"instance_masks"`` :class:`tv_tensors.Mask` (N, H, W), all in the same order;
- ``"segmentation"`` :class:`tv_tensors.Mask` int64 (H, W), 255 = ignore;
- ``"depth"`` :class:`Depth` float32 (1, H, W) metres along z, 0 = invalid;
- ``"normals"`` :class:`Normals` float32 (3, H, W) unit camera-frame vectors (x right,
  y down, z forward), (0, 0, 0) = invalid.

``Depth`` and ``Normals`` (and their v2 kernels, depth under zoom included) live in
:mod:`must.dense`; each task wraps its own labels into these types before the v2 pipeline
(:meth:`must.tasks.base.Task.wrap_for_transforms`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from must.dense import Depth, Normals
from must.tasks import TASK_TYPES

__all__ = [
    "RESIZE_MODES",
    "Depth",
    "MultiTaskTransform",
    "Normals",
    "build_transforms",
    "sanitize_detection",
]


def _plain(inpt: torch.Tensor) -> torch.Tensor:
    return inpt.as_subclass(torch.Tensor)


def sanitize_detection(sample: dict[str, Any], min_box_size: float = 1.0) -> dict[str, Any]:
    """Clamp ``"boxes"`` to the canvas; drop boxes narrower or shorter than ``min_box_size``
    or whose instance mask is empty, with their ``"box_labels"`` and ``"instance_masks"``.

    Unlike ``v2.SanitizeBoundingBoxes`` this touches only the detection keys (that transform
    would also index the (H, W) semantic "segmentation" Mask with the box filter). Returns a
    new dict; a sample without "boxes" is returned as is.
    """
    if "boxes" not in sample:
        return sample
    boxes = sample["boxes"]
    if not isinstance(boxes, tv_tensors.BoundingBoxes):
        raise TypeError(f"'boxes' must be tv_tensors.BoundingBoxes, got {type(boxes).__name__}")
    if boxes.format != tv_tensors.BoundingBoxFormat.XYXY:
        raise ValueError(f"'boxes' must be XYXY, got {boxes.format}")
    n = boxes.shape[0]
    labels = sample.get("box_labels")
    masks = sample.get("instance_masks")
    for name, value in (("box_labels", labels), ("instance_masks", masks)):
        if value is not None and value.shape[0] != n:
            raise ValueError(f"{value.shape[0]} {name} for {n} boxes")

    height, width = boxes.canvas_size
    xyxy = _plain(boxes).clone()
    xyxy[:, 0::2].clamp_(0, width)
    xyxy[:, 1::2].clamp_(0, height)
    keep = ((xyxy[:, 2] - xyxy[:, 0]) >= min_box_size) & ((xyxy[:, 3] - xyxy[:, 1]) >= min_box_size)
    if masks is not None:
        keep &= _plain(masks).flatten(1).ne(0).any(dim=1)  # uint8 .any() stays uint8

    out = dict(sample)
    out["boxes"] = tv_tensors.wrap(xyxy[keep], like=boxes)
    if labels is not None:
        out["box_labels"] = labels[keep]
    if masks is not None:
        out["instance_masks"] = tv_tensors.Mask(masks[keep])
    return out


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _original_keys() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keys kept at the image's own size for scoring, the eval-only ones among them), over
    the registered tasks (see ``Task.original_keys``)."""
    kinds = TASK_TYPES.values()
    return (
        tuple(k for kind in kinds for k in kind.original_keys),
        tuple(k for kind in kinds for k in kind.eval_only_keys),
    )


class MultiTaskTransform:
    """Apply a v2 transform jointly to a sample dict, then :func:`sanitize_detection`.

    With ``keep_original`` (evaluation, where the transform is a plain resize) the sample
    also gets ``"original"``: its image size (H, W), the factors (sy, sx) that took it to
    the transformed size, and its detection ground truth untouched, so boxes are scored in
    the image's own pixels (and COCO's area buckets at its own size).

    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(
        self,
        transform: Callable[[Any], Any],
        *,
        depth_scales_with_zoom: bool,
        min_box_size: float,
        keep_original: bool = False,
        drop_masks: bool = False,
    ) -> None:
        self.transform = transform
        self.depth_scales_with_zoom = depth_scales_with_zoom
        self.min_box_size = min_box_size
        self.keep_original = keep_original
        self.drop_masks = drop_masks

    def _prepare(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        # Plain tensors would be passed through by v2 (an Image is present), so each task gives
        # its labels their types; as_subclass-style wrapping copies no data and leaves the
        # input alone.
        out = dict(sample)
        if "image" in out and not isinstance(out["image"], tv_tensors.Image):
            out["image"] = tv_tensors.Image(out["image"])
        for kind in TASK_TYPES.values():
            out = kind.wrap_for_transforms(out, scales_with_zoom=self.depth_scales_with_zoom)
        return out

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        prepared = self._prepare(sample)
        # Eval-only ground truth stays out of the v2 pipeline (it is never augmented).
        original_keys, eval_only_keys = _original_keys()
        extra = {k: prepared.pop(k) for k in eval_only_keys if k in prepared}
        if self.drop_masks:
            # No head reads instance masks; without a crop they cannot empty a box either.
            prepared.pop("instance_masks", None)
        out = sanitize_detection(self.transform(prepared), self.min_box_size)
        if self.keep_original and "image" in prepared:
            (h, w), (th, tw) = prepared["image"].shape[-2:], out["image"].shape[-2:]
            both = {**prepared, **extra}
            out["original"] = {
                "size": (int(h), int(w)),
                "scale": (th / h, tw / w),
                **{k: _plain(both[k]) for k in original_keys if k in both},
            }
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.transform!r}, "
            f"depth_scales_with_zoom={self.depth_scales_with_zoom}, "
            f"min_box_size={self.min_box_size}, keep_original={self.keep_original}, "
            f"drop_masks={self.drop_masks})"
        )


RESIZE_MODES = ("square", "keep_aspect")


def build_transforms(
    train: bool,
    size: int | tuple[int, int],
    *,
    resize: str = "square",
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.2,
    depth_scales_with_zoom: bool = True,
    min_box_size: float = 1.0,
) -> Callable[[dict], dict]:
    """Sample-dict augmentation, one random draw for the image and all its labels.

    ``resize="square"``: images of exactly ``size`` (int: square). Train: RandomResizedCrop(
    size, scale, ratio) + RandomHorizontalFlip(hflip) + ColorJitter (brightness/contrast/
    saturation = ``color_jitter``). Eval: Resize of the full image to ``size``.

    ``resize="keep_aspect"`` (real detection data): the longer side is resized to ``size``
    (an int) keeping the aspect ratio, as torchvision's ``GeneralizedRCNNTransform`` caps it
    at ``max_size``; no crop, so train is that resize + flip + colour jitter (torchvision's
    detection recipe). Batches of mixed shapes are padded by the collator.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    keep_aspect = resize == "keep_aspect"
    if keep_aspect and not isinstance(size, int):
        raise ValueError(f"resize='keep_aspect' takes one size (the longer side), got {size}")
    out_size = list(_pair(size))
    # size=None + max_size: the longer side becomes max_size, the other follows the aspect.
    fit = (
        v2.Resize(size=None, max_size=int(size), antialias=True)
        if keep_aspect
        else v2.Resize(out_size, antialias=True)
    )
    steps: list[v2.Transform]
    if train:
        steps = (
            [fit]
            if keep_aspect
            else [v2.RandomResizedCrop(out_size, scale=scale, ratio=ratio, antialias=True)]
        )
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if color_jitter > 0:
            # No hue jitter: colour can be the very cue that names a class.
            steps.append(
                v2.ColorJitter(
                    brightness=color_jitter, contrast=color_jitter, saturation=color_jitter
                )
            )
    else:
        # Square: a fixed (h, w) rather than v2's "shorter side" int, so eval matches train.
        steps = [fit]
    return MultiTaskTransform(
        v2.Compose(steps),
        depth_scales_with_zoom=depth_scales_with_zoom,
        min_box_size=min_box_size,
        keep_original=not train,
        drop_masks=keep_aspect,
    )
