"""Public datasets written out as standard dataset folders.

``import_fashion_mnist``: Fashion-MNIST (Zalando's product photos, 28x28 grey, 10 classes)
from its IDX files, as Debian's ``dataset-fashion-mnist`` package installs them, into an
ImageFolder tree with per-class file numbering (``images/train/<class>/0001.png``, as
CIFAR and ImageNet are laid out) and a ``dataset.yaml``: real images to try every verb on
without a download at run time.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from must.errors import ConfigError, DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
# Label i of the IDX files is FASHION_MNIST_CLASSES[i] (folder names: no '/' or spaces).
FASHION_MNIST_CLASSES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (the third byte of the magic number) -> numpy dtype (big-endian).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format; ``.gz`` or not) as an array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(path, f"cannot read the IDX file ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(path, "not an IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(_IDX_TYPES[data[2]])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(path, f"truncated IDX file (shape {tuple(dims)} declared)")
    return np.frombuffer(data, dtype, offset=offset).reshape(dims)


def _idx_file(source: Path, name: str) -> Path:
    for candidate in (source / f"{name}.gz", source / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"{source / name}.gz: Fashion-MNIST not found; install Debian's "
        f"{FASHION_MNIST_PACKAGE!r} package (apt-get install {FASHION_MNIST_PACKAGE}) or give "
        "--source, the folder of its IDX files (train-images-idx3-ubyte[.gz], ...)"
    )


def fashion_mnist_available(source: str | Path = FASHION_MNIST_DIR) -> bool:
    """Whether the IDX files are in ``source`` (the Debian package's folder by default)."""
    try:
        for names in _FILES.values():
            for name in names:
                _idx_file(Path(source), name)
    except ConfigError:
        return False
    return True


def _per_class(labels: np.ndarray, start: int, count: int | None) -> list[int]:
    """Indices of the images taken: per class, those ranked ``start`` to ``start + count``
    in file order (all the rest when ``count`` is None)."""
    taken = []
    for c in range(len(FASHION_MNIST_CLASSES)):
        idx = np.flatnonzero(labels == c)
        taken += idx[start : None if count is None else start + count].tolist()
    return sorted(taken)


def import_fashion_mnist(
    out: str | Path,
    *,
    source: str | Path = FASHION_MNIST_DIR,
    num_per_class: int | None = None,
    val_per_class: int = 500,
    test_per_class: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write Fashion-MNIST as an ImageFolder dataset folder in ``out``; returns ``out``.

    Splits: ``val`` is the last ``val_per_class`` images of each class of the training file,
    ``train`` the first ``num_per_class`` of the others (all by default), ``test`` the first
    ``test_per_class`` of each class of the test file (all by default). Files are numbered
    per class (``images/train/coat/0001.png``); ``dataset.yaml`` lists the classes in the
    label order of the original files and is written last, so an interrupted import never
    looks complete.
    """
    out = Path(out)
    source = Path(source)
    for name, value in (("num per class", num_per_class), ("test per class", test_per_class)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if val_per_class < 1:
        raise ConfigError(f"val per class must be at least 1, got {val_per_class}")
    files = {s: (_idx_file(source, i), _idx_file(source, lb)) for s, (i, lb) in _FILES.items()}
    if (out / "dataset.yaml").exists() or (out / "images").exists():
        if not overwrite:
            raise ConfigError(f"{out}: already holds a dataset; give --overwrite to replace it")
        shutil.rmtree(out / "images", ignore_errors=True)
        (out / "dataset.yaml").unlink(missing_ok=True)

    arrays = {s: (read_idx(i), read_idx(lb)) for s, (i, lb) in files.items()}
    for split, (images, labels) in arrays.items():
        if images.ndim != 3 or labels.shape != images.shape[:1] or labels.max() >= 10:
            raise DataError(files[split][0], "not Fashion-MNIST images and labels of one length")
    train_images, train_labels = arrays["train"]
    smallest = min(int((train_labels == c).sum()) for c in range(10))
    if val_per_class >= smallest:
        raise ConfigError(f"val per class ({val_per_class}) leaves no training image")
    val_start = smallest - val_per_class
    plan = {
        "train": (train_images, train_labels, _per_class(train_labels, 0, num_per_class)),
        "val": (train_images, train_labels, _per_class(train_labels, val_start, val_per_class)),
        "test": (*arrays["test"], _per_class(arrays["test"][1], 0, test_per_class)),
    }
    if num_per_class is None or num_per_class > val_start:
        # The training images stop where the validation images start.
        plan["train"] = (train_images, train_labels, _per_class(train_labels, 0, val_start))
    counts = {}
    for split, (images, labels, indices) in plan.items():
        numbers = dict.fromkeys(range(10), 0)
        for i in indices:
            c = int(labels[i])
            numbers[c] += 1
            path = out / "images" / split / FASHION_MNIST_CLASSES[c] / f"{numbers[c]:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(images[i], np.uint8)).save(path)
        counts[split] = len(indices)
    spec = {
        "name": "fashion-mnist",
        "classes": {"classification": FASHION_MNIST_CLASSES},
        "splits": {s: {"images": f"images/{s}", "classification": {}} for s in plan},
        "meta": {
            "source": "Fashion-MNIST (Zalando Research, MIT licence), imported from IDX files",
            "images": counts,
        },
    }
    (out / "dataset.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out
