"""Joint augmentation: one draw moves the image and every label consistently; depth/normals
follow masks (nearest, zero fill), flips negate normals, depth scales with zoom, detection
targets are sanitized, photometric ops touch only the image."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from must.data.transforms import Depth, Normals, build_transforms, sanitize_detection

H, W = 48, 64
# Two rectangular objects: (y0, y1, x0, x1) half-open, box label, segmentation class.
OBJECTS = [((8, 24, 6, 26), 1, 3), ((20, 44, 36, 60), 2, 5)]
IGNORE = 255
# Pixels without depth or normals; also marked ignore in the segmentation, so after any
# geometry "depth == 0" must coincide exactly with "segmentation == 255".
INVALID = (30, 40, 0, 16)
SEG_VALUES = {0, 3, 5, IGNORE}
NO_ZOOM = {"scale": (1.0, 1.0), "ratio": (W / H, W / H)}


def make_sample(with_boxes: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
    y = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W)
    x = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W)
    depth = 1.0 + 0.05 * x + 0.02 * y  # >= 1 everywhere, distinct per pixel
    normals = torch.stack([(x - 31.5) / 40, (y - 23.5) / 60, -torch.ones(H, W)])
    normals = normals / normals.norm(dim=0, keepdim=True)
    seg = torch.zeros(H, W, dtype=torch.int64)
    masks, boxes, labels = [], [], []
    for (y0, y1, x0, x1), label, cls in OBJECTS:
        m = torch.zeros(H, W, dtype=torch.uint8)
        m[y0:y1, x0:x1] = 1
        seg[y0:y1, x0:x1] = cls
        masks.append(m)
        boxes.append([x0, y0, x1, y1])  # tight, x2/y2 exclusive
        labels.append(label)
    y0, y1, x0, x1 = INVALID
    seg[y0:y1, x0:x1] = IGNORE
    depth[y0:y1, x0:x1] = 0
    normals[:, y0:y1, x0:x1] = 0
    sample = {
        "key": "scene-0",
        "image": tv_tensors.Image(image),
        "classification": torch.tensor(2),
        "segmentation": tv_tensors.Mask(seg),
        "depth": Depth(depth[None]),
        "normals": Normals(normals),
        # Pixel index y * W + x: a Mask that reveals where each output pixel came from.
        "coords": tv_tensors.Mask(torch.arange(H * W).reshape(H, W)),
    }
    if with_boxes:
        sample["boxes"] = tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(H, W)
        )
        sample["box_labels"] = torch.tensor(labels)
        sample["instance_masks"] = tv_tensors.Mask(torch.stack(masks))
    else:
        sample["boxes"] = tv_tensors.BoundingBoxes(
            torch.zeros(0, 4), format="XYXY", canvas_size=(H, W)
        )
        sample["box_labels"] = torch.zeros(0, dtype=torch.int64)
        sample["instance_masks"] = tv_tensors.Mask(torch.zeros(0, H, W, dtype=torch.uint8))
    return sample


def source(out: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) in the input of every output pixel, from the "coords" Mask."""
    c = out["coords"].as_subclass(torch.Tensor)
    return c // W, c % W


@pytest.mark.parametrize("hflip", [0.0, 0.5])
def test_train_consistency_over_many_draws(hflip: float) -> None:
    sample = make_sample()
    src_depth = sample["depth"][0].as_subclass(torch.Tensor)
    valid_depths = set(src_depth[src_depth > 0].tolist())
    label_to_class = {label: cls for _, label, cls in OBJECTS}
    eps = 1e-3  # float32 slack in box and index arithmetic
    for size in [(H, W), (40, 40), (96, 80)]:
        transform = build_transforms(True, size, hflip=hflip, depth_scales_with_zoom=False)
        for seed in range(25):
            torch.manual_seed(seed)
            out = transform(sample)
            assert out["key"] == "scene-0"
            assert out["classification"] is sample["classification"]
            assert out["image"].shape == (3, *size)
            for k in ("segmentation", "coords", "depth", "normals", "instance_masks"):
                assert out[k].shape[-2:] == size, k
            n = len(out["boxes"])
            assert out["boxes"].canvas_size == size
            assert out["box_labels"].shape == (n,) and out["instance_masks"].shape[0] == n
            seg = out["segmentation"].as_subclass(torch.Tensor)
            assert set(seg.unique().tolist()) <= SEG_VALUES
            for box, label, mask in zip(
                out["boxes"], out["box_labels"], out["instance_masks"], strict=True
            ):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert len(xs) > 0
                x1, y1, x2, y2 = box.tolist()
                # Nearest resize keeps output pixel j iff floor(j * in / out) lies in the
                # object's [a, b): j in [ceil(a*s), ceil(b*s)), while the box becomes
                # [a*s, b*s). So each box edge lies less than one pixel from the matching edge
                # of the mask's pixel hull [min j, max j + 1) -- the only thing a flip keeps.
                assert abs(x1 - xs.min()) < 1 + eps and abs(x2 - (xs.max() + 1)) < 1 + eps
                assert abs(y1 - ys.min()) < 1 + eps and abs(y2 - (ys.max() + 1)) < 1 + eps
                # Unflipped, floor() errs one way only: pixel indices lie in [x1, x2). (No
                # vertical flip here, so this always holds in y.)
                if hflip == 0.0:
                    assert xs.min() >= x1 - eps and xs.max() < x2 + eps
                assert ys.min() >= y1 - eps and ys.max() < y2 + eps
                # Instance mask and segmentation were resampled on the same grid.
                assert (seg[mask.bool()] == label_to_class[int(label)]).all()
            depth = out["depth"][0].as_subclass(torch.Tensor)
            invalid = seg == IGNORE
            assert torch.equal(depth == 0, invalid)  # exact zeros, exactly where they were
            assert set(depth[depth > 0].tolist()) <= valid_depths  # no blended values
            normals = out["normals"].as_subclass(torch.Tensor)
            assert torch.equal((normals == 0).all(dim=0), invalid)
            norms = normals.norm(dim=0)[~invalid]
            assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_hflip_mirrors_everything_exactly() -> None:
    sample = make_sample()
    torch.manual_seed(0)
    out = build_transforms(True, (H, W), **NO_ZOOM, hflip=1.0, color_jitter=0.0)(sample)
    assert torch.equal(out["image"], sample["image"].flip(-1))
    assert torch.equal(out["depth"], sample["depth"].flip(-1))
    n_in, n_out = sample["normals"].flip(-1), out["normals"]
    assert torch.equal(n_out[0], -n_in[0])
    assert torch.equal(n_out[1:], n_in[1:])
    assert not torch.signbit(n_out[0][n_in[0] == 0]).any()  # invalid stays +0.0
    assert torch.equal(out["segmentation"], sample["segmentation"].flip(-1))
    assert torch.equal(out["instance_masks"], sample["instance_masks"].flip(-1))
    x1, y1, x2, y2 = sample["boxes"].unbind(-1)
    assert torch.equal(out["boxes"], torch.stack([W - x2, y1, W - x1, y2], dim=-1))
    assert torch.equal(out["box_labels"], sample["box_labels"])


@pytest.mark.parametrize("scales", [True, False])
def test_zoom_scales_depth_by_field_of_view(scales: bool) -> None:
    sample = make_sample()
    src_depth = sample["depth"][0].as_subclass(torch.Tensor)
    # Area 0.25 at the image's aspect: a 24 x 32 crop (half of each side) resized to 48 x 64.
    transform = build_transforms(
        True,
        (H, W),
        scale=(0.25, 0.25),
        ratio=(W / H, W / H),
        hflip=0.0,
        color_jitter=0.0,
        depth_scales_with_zoom=scales,
    )
    for seed in range(5):
        torch.manual_seed(seed)
        out = transform(sample)
        ys, xs = source(out)
        assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (H // 2, W // 2)
        expected = src_depth[ys, xs] / (2.0 if scales else 1.0)
        assert torch.equal(out["depth"][0], expected)
        assert out["depth"].scales_with_zoom is scales


@pytest.mark.parametrize("size", [(24, 32), (96, 128), (48, 48)])
@pytest.mark.parametrize("mask_resize_takes_mode", [True, False])
def test_eval_resize_never_changes_depth_values(
    size: tuple[int, int], mask_resize_takes_mode: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchvision < 0.29's resize_mask takes no interpolation argument: same values either way.
    import must.dense as module

    if not mask_resize_takes_mode:
        plain = F.resize_mask
        monkeypatch.setattr(F, "resize_mask", lambda mask, size, max_size=None: plain(mask, size))
    monkeypatch.setattr(module, "_RESIZE_MASK_TAKES_MODE", mask_resize_takes_mode)
    sample = make_sample()
    out = build_transforms(False, size, depth_scales_with_zoom=True)(sample)
    assert out["image"].shape == (3, *size)
    ys, xs = source(out)
    assert torch.equal(out["depth"][0], sample["depth"][0][ys, xs].as_subclass(torch.Tensor))
    assert torch.equal(out["normals"], sample["normals"][:, ys, xs].as_subclass(torch.Tensor))


def test_int_size_is_square_for_train_and_eval() -> None:
    sample = make_sample()
    assert build_transforms(True, 32)(sample)["image"].shape == (3, 32, 32)
    assert build_transforms(False, 32)(sample)["image"].shape == (3, 32, 32)


def test_functional_kernels_follow_the_field_of_view_rule() -> None:
    depth = make_sample()["depth"]
    # crop then resize == resized crop: the zoom comes from the crop, not from the resize.
    a = F.resize(F.crop(depth, 4, 8, 24, 32), [48, 64])
    b = F.resized_crop(depth, 4, 8, 24, 32, [48, 64])
    assert torch.equal(a, b)
    # Resampled exactly like a mask, then halved (a quarter of the field of view).
    as_mask = F.resized_crop(
        tv_tensors.Mask(depth.as_subclass(torch.Tensor)), 4, 8, 24, 32, [48, 64]
    )
    assert torch.equal(b, as_mask / 2)
    # Padding widens the view (zoom < 1) and fills 0 whatever fill/mode the image uses.
    padded = F.pad(depth, [8, 6], fill=7.0, padding_mode="reflect")
    assert padded.shape == (1, H + 12, W + 16)
    assert (padded[..., :6, :] == 0).all() and (padded[..., :, :8] == 0).all()
    zoom = ((H / (H + 12)) * (W / (W + 16))) ** 0.5
    assert torch.allclose(padded[..., 6:-6, 8:-8], depth / zoom)
    normals = F.pad(make_sample()["normals"], [2], fill=1.0)
    assert (normals[..., :2, :] == 0).all() and isinstance(normals, Normals)
    # Center crop keeps a quarter of the view: depth halves.
    assert torch.allclose(F.center_crop(depth, [24, 32]), depth[..., 12:36, 16:48] / 2)
    # Vertical flip negates the normals' y component.
    n = make_sample()["normals"]
    assert torch.equal(F.vertical_flip(n)[1], -n[1].flip(-2))
    assert torch.equal(F.vertical_flip(n)[0], n[0].flip(-2))


def test_depth_flag_survives_tensor_ops_and_pickling() -> None:
    depth = Depth(torch.ones(1, 4, 4), scales_with_zoom=False)
    for d in (
        depth.clone(),
        copy.deepcopy(depth),
        pickle.loads(pickle.dumps(depth)),
        depth.to(torch.float64),
    ):
        assert isinstance(d, Depth) and d.scales_with_zoom is False
    assert Depth(torch.ones(1, 2, 2)).scales_with_zoom is True
    assert tv_tensors.wrap(torch.zeros(1, 2, 2), like=depth).scales_with_zoom is False
    # The pipeline's flag wins, and the caller's tensor is left alone.
    out = build_transforms(False, 8, depth_scales_with_zoom=True)(
        {"image": tv_tensors.Image(torch.zeros(3, 4, 4, dtype=torch.uint8)), "depth": depth}
    )
    assert out["depth"].scales_with_zoom is True and depth.scales_with_zoom is False


def test_unsupported_geometry_fails_loudly() -> None:
    sample = make_sample()
    with pytest.raises(NotImplementedError):
        F.rotate(sample["normals"], 10.0)
    with pytest.raises(NotImplementedError):
        v2.RandomRotation(10)(sample)


def test_box_outside_the_crop_is_removed_with_label_and_mask() -> None:
    sample = make_sample()
    transform = build_transforms(
        True, (H, W), scale=(0.2, 0.2), ratio=(W / H, W / H), hflip=0.0, color_jitter=0.0
    )
    dropped = 0
    for seed in range(60):
        torch.manual_seed(seed)
        out = transform(sample)
        ys, xs = source(out)
        for (y0, y1, x0, x1), label, _ in OBJECTS:
            visible = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).any()
            assert bool(visible) == (label in out["box_labels"].tolist())
            dropped += not visible
        assert len(out["boxes"]) == len(out["box_labels"]) == len(out["instance_masks"])
    assert dropped > 0  # the draws did cover the case


def test_sanitize_detection_by_hand() -> None:
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor(
            [
                [2.0, 2.0, 6.0, 6.0],  # fine
                [-9.0, 1.0, -1.0, 5.0],  # entirely left of the canvas: width 0 once clamped
                [3.0, 3.0, 3.5, 7.0],  # thinner than min_box_size
                [1.0, 1.0, 5.0, 5.0],  # its mask is empty
                [6.0, -2.0, 12.0, 4.0],  # partly outside: clamped, kept
            ]
        ),
        format="XYXY",
        canvas_size=(8, 8),
    )
    masks = torch.zeros(5, 8, 8, dtype=torch.bool)
    masks[0, 2:6, 2:6] = masks[1, 0, 0] = masks[2, 3:7, 3] = masks[4, 0:4, 6:8] = True
    sample = {
        "boxes": boxes,
        "box_labels": torch.tensor([10, 11, 12, 13, 14]),
        "instance_masks": tv_tensors.Mask(masks),
        "segmentation": tv_tensors.Mask(torch.zeros(8, 8, dtype=torch.int64)),
    }
    out = sanitize_detection(sample, min_box_size=1.0)
    assert out["box_labels"].tolist() == [10, 14]
    assert out["boxes"].tolist() == [[2.0, 2.0, 6.0, 6.0], [6.0, 0.0, 8.0, 4.0]]
    assert isinstance(out["boxes"], tv_tensors.BoundingBoxes) and out["boxes"].canvas_size == (8, 8)
    assert isinstance(out["instance_masks"], tv_tensors.Mask)
    assert torch.equal(out["instance_masks"], masks[[0, 4]])
    assert out["segmentation"] is sample["segmentation"]
    with pytest.raises(ValueError):
        sanitize_detection({**sample, "box_labels": torch.tensor([1])})


@pytest.mark.parametrize("train", [True, False])
def test_zero_boxes_pass_through(train: bool) -> None:
    out = build_transforms(train, (32, 40))(make_sample(with_boxes=False))
    assert out["boxes"].shape == (0, 4) and isinstance(out["boxes"], tv_tensors.BoundingBoxes)
    assert out["box_labels"].shape == (0,)
    assert out["instance_masks"].shape == (0, 32, 40)


def test_missing_labels_are_fine() -> None:
    sample = {k: make_sample()[k] for k in ("key", "image", "classification")}
    out = build_transforms(True, 32)(sample)
    assert set(out) == set(sample) and out["image"].shape == (3, 32, 32)


def test_color_jitter_touches_only_the_image() -> None:
    sample = make_sample()
    jitter = v2.ColorJitter(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    torch.manual_seed(0)
    out = jitter(sample)
    assert not torch.equal(out["image"], sample["image"])
    for k in ("depth", "normals", "segmentation", "instance_masks", "boxes"):
        assert out[k] is sample[k], k  # passed through untouched, not even copied
    # And inside the pipeline (no crop, no flip) everything but the image is unchanged.
    torch.manual_seed(0)
    out = build_transforms(True, (H, W), **NO_ZOOM, hflip=0.0, color_jitter=0.8)(sample)
    assert not torch.equal(out["image"], sample["image"])
    for k in ("depth", "normals", "segmentation", "instance_masks", "boxes"):
        assert torch.equal(out[k], sample[k]), k
