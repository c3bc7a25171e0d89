"""Decoding and encoding of images and per-pixel label files (PIL and NumPy only), shared by
the dataset readers (``must.data.readers``), the renderer (``must.data.formats``) and the
tasks' label-file hooks (``Task.read_label_file`` / ``Task.write_label_file``).

Errors name the file: :class:`~must.errors.DataError` with the problem."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from must.errors import DataError
from must.files import write_atomic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_UINT16 = 65535
DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
GREY16_MODES = DEPTH_MODES
CLASS_MAP_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I")
# Colour of the ignore value in VOC's own PNGs (the "void" object borders).
_VOC_IGNORE_COLOUR = (224, 224, 192)


def size_str(width: int, height: int) -> str:
    return f"{width}x{height}"


def open_label(path: Path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
    except Exception as err:
        raise DataError(
            path, f"corrupt or unreadable {what} file ({type(err).__name__}: {err})"
        ) from err
    return img


def check_size(path: Path, what: str, size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """A label of ``size`` (w, h) must match its image's (w, h)."""
    if tuple(size) != tuple(image_size):
        raise DataError(
            path,
            f"{what} size {size_str(*size)} differs from the image's {size_str(*image_size)}",
        )


def pixels(img: Image.Image, path: Path, what: str) -> np.ndarray:
    try:
        return np.array(img)
    except Exception as err:
        raise DataError(
            path, f"corrupt or unreadable {what} file ({type(err).__name__}: {err})"
        ) from err


def _grey16_to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """A 16-bit greyscale image (mode I;16*, or I holding 16-bit values) scaled by the type's
    range to 8 bits, ``round(v * 255 / 65535)``: PIL's own conversion would clip at 255."""
    grey = np.asarray(img).astype(np.int64)
    if grey.size and (grey.min() < 0 or grey.max() > MAX_UINT16):
        raise DataError(
            path,
            f"image of mode {img.mode} has values {grey.min()}..{grey.max()}, outside the "
            "16-bit range 0..65535; save it as an 8- or 16-bit image",
        )
    grey8 = ((grey * 255 + MAX_UINT16 // 2) // MAX_UINT16).astype(np.uint8)
    return np.repeat(grey8[..., None], 3, axis=-1)


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; grayscale, palette and alpha images are converted, 16-bit
    greyscale is scaled to 8 bits by its range; float images (mode F) are refused."""
    try:
        with Image.open(path) as img:
            if img.mode in GREY16_MODES:
                return _grey16_to_rgb(img, path)
            if img.mode == "F":
                raise DataError(
                    path,
                    "image of mode F (32-bit float) has no fixed value range to map to 8 bits; "
                    "save it as an 8- or 16-bit image",
                )
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.array(img)
    except DataError:
        raise
    except Exception as err:
        raise DataError(path, f"corrupt or unreadable image ({type(err).__name__}: {err})") from err


def read_class_map(
    path: Path,
    image_size: tuple[int, int],
    num_classes: int,
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
    what: str = "segmentation",
) -> np.ndarray:
    """(H, W) int64 class map from a PNG of mode L or P (or 16-bit)."""
    with open_label(path, what) as img:
        if img.mode not in CLASS_MAP_MODES:
            raise DataError(
                path,
                f"{what} PNG has mode {img.mode} (colour-coded?); expected a class-index "
                "map of mode L or P",
            )
        check_size(path, what, img.size, image_size)
        values = pixels(img, path, what).astype(np.int64)
    if reduce_zero_label:
        # ADE20K: 0 is "unlabeled", classes are 1..K (as mmsegmentation does it).
        unlabelled = (values == 0) | (values == ignore_index)
        values -= 1
        values[unlabelled] = ignore_index
    found = np.flatnonzero(np.bincount(values.ravel(), minlength=1))
    bad = found[(found >= num_classes) & (found != ignore_index)]
    if bad.size:
        raise DataError(
            path,
            f"class index {int(bad.max())} >= number of classes {num_classes} "
            f"(and not the ignore value {ignore_index})",
        )
    return values


def read_depth_png(
    path: Path,
    image_size: tuple[int, int],
    scale: float,
    invalid: Sequence[int] = (),
    max_depth: float | None = None,
    what: str = "depth",
) -> np.ndarray:
    """(H, W) float32 metres from a 16-bit PNG; 0 stays 0 (invalid), and so do the raw values
    in ``invalid`` and depths beyond ``max_depth`` metres."""
    with open_label(path, what) as img:
        if img.mode not in DEPTH_MODES:
            raise DataError(
                path,
                f"{what} PNG has mode {img.mode} (not 16-bit); expected a 16-bit grayscale PNG",
            )
        check_size(path, what, img.size, image_size)
        value = pixels(img, path, what)
    depth = value.astype(np.float32) / np.float32(scale)
    if len(invalid):
        depth[np.isin(value, invalid)] = 0
    if max_depth is not None:
        depth[depth > max_depth] = 0
    return depth


def read_normals_file(path: Path, image_size: tuple[int, int], what: str = "normals") -> np.ndarray:
    """(3, H, W) float32 normals from an 8-bit RGB PNG or a float (H, W, 3) .npy; invalid = 0."""
    if path.suffix.lower() == ".npy":
        try:
            normals = np.load(path, allow_pickle=False)
        except Exception as err:
            raise DataError(
                path, f"corrupt or unreadable {what} file ({type(err).__name__}: {err})"
            ) from err
        if normals.ndim != 3 or normals.shape[-1] != 3:
            raise DataError(path, f"{what} array has shape {normals.shape}; expected (H, W, 3)")
        check_size(path, what, (normals.shape[1], normals.shape[0]), image_size)
        normals = np.ascontiguousarray(normals.transpose(2, 0, 1), np.float32)
        return np.nan_to_num(normals, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    with open_label(path, what) as img:
        if img.mode != "RGB":
            raise DataError(path, f"{what} PNG has mode {img.mode}; expected 8-bit RGB")
        check_size(path, what, img.size, image_size)
        rgb = pixels(img, path, what)
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    invalid = (chw[0] | chw[1] | chw[2]) == 0
    normals = chw.astype(np.float32)
    normals *= np.float32(2 / 255)
    normals -= np.float32(1)
    normals[:, invalid] = 0
    return normals


def voc_palette(ignore_index: int = 255) -> list[int]:
    """PASCAL VOC's colour map (768 ints for ``Image.putpalette``); ignore drawn like VOC's."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[ignore_index] = _VOC_IGNORE_COLOUR
    return pal.reshape(-1).tolist()


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` as a PNG under a temporary name, then rename it to ``path``."""
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def save_class_map(values: np.ndarray, path: Path, ignore_index: int = 255) -> None:
    """An (H, W) class map as a PNG of mode P (VOC palette), value = class index."""
    height, width = values.shape
    img = Image.frombytes("P", (width, height), np.ascontiguousarray(values, np.uint8).tobytes())
    img.putpalette(voc_palette(ignore_index))
    save_png(img, path)


def encode_depth(depth: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
    """Metres -> uint16 ``round(d * scale)``; 0 = invalid. Values that would overflow (and
    negative or non-finite ones) become 0; returns the array and the count of overflows."""
    value = np.rint(np.nan_to_num(depth.astype(np.float64), nan=0.0, posinf=0.0) * scale)
    overflow = value > MAX_UINT16
    value[overflow | (value < 0)] = 0
    return value.astype(np.uint16), int(overflow.sum())


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals (H, W, 3) -> uint8 ``round((n + 1) / 2 * 255)``; all-zero (invalid) -> 0."""
    n = np.nan_to_num(normals.astype(np.float32), nan=0.0)
    invalid = ~n.any(axis=-1)
    rgb = np.rint((np.clip(n, -1, 1) + 1) * 127.5).astype(np.uint8)
    rgb[invalid] = 0
    return rgb


def is_folder_name(name: str) -> bool:
    """``name`` can be one folder's name (no separator, not ``.`` or ``..``)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
