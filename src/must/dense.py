"""Dense label types for ``torchvision.transforms.v2``: :class:`Depth` and :class:`Normals`.

``Depth`` (1, H, W) float32 metres along the camera z axis, 0 = invalid; ``Normals`` (3, H, W)
float32 unit camera-frame vectors (x right, y down, z forward), (0, 0, 0) = invalid. Both are
TVTensor subclasses with kernels registered for the geometric functionals of v2, so stock v2
transforms move them like masks (nearest neighbour, so an invalid 0 never blends into valid
values; padding is 0 = invalid). Photometric transforms have no kernel for them and v2 passes
them through unchanged.

Depth under zoom (``Depth.scales_with_zoom``, mtan's create_dataset.py convention): depth is
kept relative to a camera that always shows the original field of view. An op that keeps a
fraction of the field of view (crop, resized crop, center crop) makes the scene look closer,
so depth is divided by ``zoom = sqrt((H_in / h_crop) * (W_in / w_crop))``; padding widens the
view (zoom < 1); resizing alone changes no value. So crop-then-resize equals resized crop.

A ground-floor module (torch and torchvision only): the tasks and the data pipeline share it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

__all__ = ["Depth", "Normals"]


class Depth(tv_tensors.TVTensor):
    """Depth map (1, H, W) in metres along the camera z axis; 0 marks invalid pixels.

    ``scales_with_zoom`` is metadata (like ``BoundingBoxes.format``) read by the crop/pad
    kernels: v2 calls kernels with only the geometric parameters, so a flag carried by the
    tensor itself is the one way to reach them while still using stock v2 transforms.
    """

    scales_with_zoom: bool

    @classmethod
    def _wrap(cls, tensor: torch.Tensor, *, scales_with_zoom: bool) -> Depth:
        depth = tensor.as_subclass(cls)
        depth.scales_with_zoom = scales_with_zoom
        return depth

    def __new__(
        cls,
        data: Any,
        *,
        scales_with_zoom: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | int | None = None,
        requires_grad: bool | None = None,
    ) -> Depth:
        tensor = cls._to_tensor(data, dtype=dtype, device=device, requires_grad=requires_grad)
        return cls._wrap(tensor, scales_with_zoom=scales_with_zoom)

    @classmethod
    def wrap(cls, tensor: torch.Tensor, like: Depth, **kwargs: Any) -> Depth:  # type: ignore[override]
        """Used by ``tv_tensors.wrap``: keep ``like``'s flag unless overridden."""
        return cls._wrap(
            tensor, scales_with_zoom=kwargs.get("scales_with_zoom", like.scales_with_zoom)
        )

    @classmethod
    def _wrap_output(
        cls,
        output: torch.Tensor,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        # Ops that keep the subclass (clone, to, detach, deepcopy) would drop the flag; take it
        # from the first Depth among the inputs, as BoundingBoxes does with its metadata.
        flat, _ = tree_flatten((tuple(args), dict(kwargs or {})))
        like = next((x for x in flat if isinstance(x, Depth)), None)
        flag = like.scales_with_zoom if like is not None else True
        if isinstance(output, torch.Tensor) and not isinstance(output, Depth):
            return cls._wrap(output, scales_with_zoom=flag)
        if isinstance(output, (tuple, list)):
            return type(output)(cls._wrap(part, scales_with_zoom=flag) for part in output)
        return output

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return self._make_repr(scales_with_zoom=self.scales_with_zoom)


class Normals(tv_tensors.TVTensor):
    """Surface normals (3, H, W): unit vectors in camera coordinates; (0, 0, 0) = invalid."""

    def __new__(
        cls,
        data: Any,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | int | None = None,
        requires_grad: bool | None = None,
    ) -> Normals:
        tensor = cls._to_tensor(data, dtype=dtype, device=device, requires_grad=requires_grad)
        return tensor.as_subclass(cls)


# ---------------------------------------------------------------------------------------------
# Kernels. Custom kernels receive the TVTensor itself and must re-wrap their output. The
# spatial work is delegated to the Mask kernels, so depth and normals are resampled exactly like
# the segmentation and instance masks (same nearest-neighbour grid, zero fill).

_Dense = Depth | Normals


def _plain(inpt: torch.Tensor) -> torch.Tensor:
    return inpt.as_subclass(torch.Tensor)


def _rewrap(inpt: _Dense, output: torch.Tensor, zoom: float = 1.0) -> _Dense:
    if isinstance(inpt, Depth):
        if inpt.scales_with_zoom and zoom != 1.0:
            output = output / zoom  # 0 / zoom == 0: invalid stays exactly invalid
        return Depth._wrap(output, scales_with_zoom=inpt.scales_with_zoom)
    return output.as_subclass(type(inpt))


def _fov_zoom(in_hw: Sequence[int], view_hw: Sequence[int]) -> float:
    """Zoom of a view covering ``view_hw`` pixels of an ``in_hw`` input (> 1: crop, < 1: pad)."""
    return math.sqrt((in_hw[0] / view_hw[0]) * (in_hw[1] / view_hw[1]))


def _negate_channel(output: torch.Tensor, channel: int) -> torch.Tensor:
    # 0.0 - v instead of -v so invalid zeros stay +0.0 rather than becoming -0.0.
    output[..., channel, :, :] = 0.0 - output[..., channel, :, :]
    return output


def _register(functional: Callable[..., Any]) -> Callable[[Callable], Callable]:
    def decorator(kernel: Callable) -> Callable:
        for cls in (Depth, Normals):
            F.register_kernel(functional, cls)(kernel)
        return kernel

    return decorator


@_register(F.get_size)
def _get_size(inpt: _Dense) -> list[int]:
    return F.get_size_mask(_plain(inpt))


@_register(F.horizontal_flip)
def _horizontal_flip(inpt: _Dense) -> _Dense:
    output = F.horizontal_flip_mask(_plain(inpt))
    if isinstance(inpt, Normals):
        output = _negate_channel(output, 0)  # mirroring x flips the x component
    return _rewrap(inpt, output)


@_register(F.vertical_flip)
def _vertical_flip(inpt: _Dense) -> _Dense:
    output = F.vertical_flip_mask(_plain(inpt))
    if isinstance(inpt, Normals):
        output = _negate_channel(output, 1)
    return _rewrap(inpt, output)


_RESIZE_MASK_TAKES_MODE = "interpolation" in inspect.signature(F.resize_mask).parameters


@_register(F.resize)
def _resize(
    inpt: _Dense,
    size: list[int] | None,
    interpolation: F.InterpolationMode | int = F.InterpolationMode.NEAREST,
    max_size: int | None = None,
    **kwargs: Any,
) -> _Dense:
    # resize_mask coerces every mode but NEAREST_EXACT to NEAREST, exactly as for masks;
    # before torchvision 0.29 it takes no mode and always uses NEAREST.
    mode = {"interpolation": interpolation} if _RESIZE_MASK_TAKES_MODE else {}
    output = F.resize_mask(_plain(inpt), size, max_size=max_size, **mode)
    return _rewrap(inpt, output)  # same field of view: no zoom


@_register(F.crop)
def _crop(inpt: _Dense, top: int, left: int, height: int, width: int) -> _Dense:
    output = F.crop_mask(_plain(inpt), top, left, height, width)
    return _rewrap(inpt, output, _fov_zoom(inpt.shape[-2:], (height, width)))


@_register(F.resized_crop)
def _resized_crop(
    inpt: _Dense, top: int, left: int, height: int, width: int, size: list[int], **kwargs: Any
) -> _Dense:
    output = F.resized_crop_mask(_plain(inpt), top, left, height, width, size)
    return _rewrap(inpt, output, _fov_zoom(inpt.shape[-2:], (height, width)))


@_register(F.center_crop)
def _center_crop(inpt: _Dense, output_size: list[int]) -> _Dense:
    output = F.center_crop_mask(_plain(inpt), output_size)
    return _rewrap(inpt, output, _fov_zoom(inpt.shape[-2:], output.shape[-2:]))


@_register(F.pad)
def _pad(
    inpt: _Dense, padding: list[int], fill: Any = None, padding_mode: str = "constant"
) -> _Dense:
    # Always zero (= invalid) fill: padded pixels were never measured, whatever the image gets.
    output = F.pad_mask(_plain(inpt), padding, fill=0, padding_mode="constant")
    return _rewrap(inpt, output, _fov_zoom(inpt.shape[-2:], output.shape[-2:]))


def _unsupported(name: str) -> Callable[..., Any]:
    def kernel(inpt: _Dense, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"F.{name} has no {type(inpt).__name__} kernel: only flips, resize, crop, resized "
            "crop, center crop and pad are supported"
        )

    return kernel


# Without a kernel, v2 transforms silently pass these types through, leaving them misaligned
# with the image; fail loudly instead.
for _functional in (F.rotate, F.affine, F.perspective, F.elastic, F.five_crop, F.ten_crop):
    _register(_functional)(_unsupported(_functional.__name__))
