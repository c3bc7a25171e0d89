"""Label files read and written through the task hooks: instance masks decoded only when
something reads them, and a clear error for a task without file hooks."""

from __future__ import annotations

import numpy as np
import pytest

import must.data.readers.coco as coco
from must.data.formats import WriteOptions, write_sample
from must.data.readers import MultiTaskDataset
from must.errors import ConfigError
from must.tasks import TASK_TYPES, Task
from test_formats import make_scene, options, write


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = coco._decode_mask

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(coco, "_decode_mask", counting)
    return calls


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_masks_are_not_decoded_for_tasks_that_do_not_read_them(tmp_path, count_decodes, on_error):
    samples = {"train": {"a": make_scene(0, 0), "b": make_scene(1, 2)}}
    write(tmp_path, samples, options(["classification", "detection"]))
    ds = MultiTaskDataset(tmp_path, on_error=on_error)
    samples_read = [ds[i] for i in range(len(ds))]
    assert count_decodes == []
    assert all("instance_masks" not in s and len(s["boxes"]) == 3 for s in samples_read)
    # Asked for, they are decoded (three objects per image).
    masked = MultiTaskDataset(tmp_path, on_error=on_error, masks=True)
    assert masked[0]["instance_masks"].shape[0] == 3 and len(count_decodes) >= 3


def test_segmentation_from_coco_still_decodes_its_masks(tmp_path, count_decodes):
    write(tmp_path, {"train": {"a": make_scene(0, 0)}}, options(["detection"]))
    ann = tmp_path / "detection" / "train.json"
    (tmp_path / "dataset.yaml").write_text(
        "splits:\n  train:\n    images: images/train\n"
        f"    segmentation: {{format: coco, annotations: {ann.relative_to(tmp_path)}}}\n"
    )
    seg = MultiTaskDataset(tmp_path / "dataset.yaml", tasks=["segmentation"])[0]["segmentation"]
    assert len(count_decodes) == 3
    assert set(np.unique(seg.numpy())) <= {0, 1, 2, 3}


class _NoFiles(Task):
    """A task with no label-file hooks, standing in for the normals task."""

    name = "normals"
    label_keys = ("normals",)
    primary_metric = "x"
    higher_is_better = True
    needs_classes = False

    def build_head(self, features):
        raise NotImplementedError

    def collate(self, samples):
        return None

    def new_metric(self):
        raise NotImplementedError


def test_a_task_without_file_hooks_is_named_when_its_labels_are_asked_for(tmp_path, monkeypatch):
    write(tmp_path, {"train": {"a": make_scene(0, 0)}}, options(["depth", "normals"]))
    monkeypatch.setitem(TASK_TYPES, "normals", _NoFiles)
    with pytest.raises(ConfigError, match=r"task 'normals' has no source_type hook"):
        MultiTaskDataset(tmp_path)
    # The other tasks' labels still read when it is left out.
    assert MultiTaskDataset(tmp_path, tasks=["depth"])[0]["depth"].shape == (1, 24, 32)
    with pytest.raises(NotImplementedError, match=r"task 'normals' has no write_label_file"):
        write_sample(tmp_path, "train", "b", make_scene(1, 0), options(["normals"]))


def test_the_renderer_asks_each_task_for_its_checks():
    with pytest.raises(ConfigError, match="class 'a/b' cannot be used as a folder name"):
        WriteOptions(tasks=["classification"], classes={"classification": ["a/b"]})
