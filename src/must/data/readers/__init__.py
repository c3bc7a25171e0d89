"""Read a dataset described by a :class:`~must.data.spec.DatasetSpec` (a rendered dataset's
``manifest.json`` or a user's ``dataset.yaml``) into sample dicts for training.

The same reader serves rendered data and real data in the formats people already have:
ImageFolder trees, COCO JSON from annotation tools (RLE, uncompressed RLE or polygon masks),
VOC/ADE-style PNG class maps and NYU/KITTI-style 16-bit depth PNGs.

Images are every image file under the split's images folder (recursively, following
symbolic links, sorted by relative path; dot files and folders, and label folders nested
inside, are left out). A sample's key is its file stem, or, for images of the split that share
a stem (CIFAR-style ``cat/0001.png``, ``dog/0001.png``), its path under the images folder
without extension (``cat/0001``). A label file is matched to an image by its path under the
label folder (a tree mirroring the images folder), else by file stem when that names one
image; COCO ``file_name`` likewise. Labels are partial: an image without a label file for a
task simply has no entry for it.

One module per label format, each a :class:`~must.data.readers.common.LabelSource`:
:mod:`~must.data.readers.classes` (class folders, class tables), :mod:`~must.data.readers.coco`
(COCO JSON), :mod:`~must.data.readers.files` (dense per-image label files, decoded by each
task's ``read_label_file``); :mod:`~must.data.readers.dataset` composes them.
"""

from must.data.readers.coco import BOX_TOLERANCE
from must.data.readers.common import FORMATS, LabelSource, image_keys, register_format, walk_files
from must.data.readers.dataset import MultiTaskDataset, skip_report
from must.imageio import IMAGE_EXTENSIONS, read_image

__all__ = [
    "BOX_TOLERANCE",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "LabelSource",
    "MultiTaskDataset",
    "image_keys",
    "read_image",
    "register_format",
    "skip_report",
    "walk_files",
]
