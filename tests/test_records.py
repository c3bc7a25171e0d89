"""Per-image test records (must.records, Task.image_records / records_metric): the file
format and its refusals, every task's re-weighted metric against its own metric on the same
images (repeated as the weights say), COCO mAP against pycocotools on duplicated and removed
images, and the records a teacher's test pass leaves."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from must.config import TeachConfig, load_config
from must.errors import DataError
from must.records import RecordSet, load_records, save_records
from must.stages.teach import teach
from must.tasks import build_task
from must.tasks import detection as detection_module
from must.tasks.base import Task
from tiny import TINY_MODEL, tiny_data, tiny_steps

# ---------------------------------------------------------------- the file format


def test_records_round_trip_with_ragged_fields_and_empty_arrays(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [3, 0, 1, 5]
    records = [
        {
            "boxes": rng.random((n, 4)).astype(np.float32),
            "labels": rng.integers(0, 5, n),
            "count": np.array([float(n)]),
        }
        for n in lengths
    ]
    keys = ["a", "b/é", "c", "d"]
    path = save_records(tmp_path / "sub" / "t.npz", "detection", "map", keys, records)
    assert path == tmp_path / "sub" / "t.npz"
    assert [p.name for p in path.parent.iterdir()] == ["t.npz"]  # no temporary left
    loaded = load_records(path)
    assert (loaded.task, loaded.metric, loaded.keys) == ("detection", "map", keys)
    for got, want in zip(loaded.records, records, strict=True):
        assert got.keys() == want.keys()
        for field in want:
            assert got[field].dtype == want[field].dtype
            np.testing.assert_array_equal(got[field], want[field])
    assert loaded.records[1]["boxes"].shape == (0, 4)
    # The documented layout: concatenated fields and int64 offsets.
    with np.load(path, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["boxes.offsets"], [0, 3, 3, 4, 9])
        assert z["boxes.offsets"].dtype == np.int64 and z["boxes"].shape == (9, 4)
        assert z["task"].shape == () and str(z["metric"]) == "map"

    sub = loaded.subset(["d", "a"])
    assert sub.keys == ["d", "a"] and sub.records[0] is loaded.records[3]
    with pytest.raises(DataError, match="no record for 2 .*x, y"):
        loaded.subset(["a", "x", "y"])

    empty = load_records(save_records(tmp_path / "e.npz", "depth", "abs_rel", [], []))
    assert empty == RecordSet("depth", "abs_rel", [], [])


def test_saving_refuses_records_that_do_not_fit_the_format(tmp_path):
    one = {"x": np.zeros(1)}
    with pytest.raises(ValueError, match="keys repeat"):
        save_records(tmp_path / "r.npz", "t", "m", ["a", "a"], [one, one])
    with pytest.raises(ValueError, match="fields"):
        save_records(tmp_path / "r.npz", "t", "m", ["a", "b"], [one, {"y": np.zeros(1)}])
    with pytest.raises(ValueError, match="0-d"):
        save_records(tmp_path / "r.npz", "t", "m", ["a"], [{"x": np.float64(1)}])
    assert not list(tmp_path.iterdir())


def _rewrite(path: Path, change) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_loading_refuses_broken_or_foreign_files_naming_them(tmp_path):
    records = [{"v": np.arange(n)} for n in (2, 0, 3)]
    good = save_records(tmp_path / "good.npz", "t", "m", ["a", "b", "c"], records)

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    text = tmp_path / "text.npz"
    text.write_text("not numpy")
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    missing_offsets, bad_offsets, no_keys, pickled = (
        tmp_path / f"{n}.npz" for n in ("missing", "offsets", "nokeys", "pickled")
    )
    for path in (missing_offsets, bad_offsets, no_keys):
        path.write_bytes(good.read_bytes())
    _rewrite(missing_offsets, lambda a: a.pop("v.offsets"))
    _rewrite(bad_offsets, lambda a: a.update({"v.offsets": np.array([0, 2, 2, 4])}))
    _rewrite(no_keys, lambda a: a.pop("keys"))
    with open(pickled, "wb") as f:
        np.savez(
            f,
            task=np.array("t"),
            metric=np.array("m"),
            keys=np.array([{"a": 1}], dtype=object),
        )

    cases = {
        truncated: "not a records file|unreadable records file",
        text: "not a records file",
        single: "not an .npz archive",
        missing_offsets: "'v' has no 'v.offsets'",
        bad_offsets: "'v.offsets' does not match",
        no_keys: "no keys array",
        pickled: "unreadable records file",
        tmp_path / "absent.npz": "no such records file",
    }
    for path, what in cases.items():
        with pytest.raises(DataError, match=what) as err:
            load_records(path)
        assert str(path) in str(err.value)


# ---------------------------------------------------------------- every task's metric

CLASSES = ["a", "b", "c", "d"]


def _samples(name: str, count: int, seed: int) -> list[tuple[dict, object]]:
    """``count`` (sample, prediction) pairs of task ``name``; every fourth sample has no
    label, the others cover the cases its metric treats apart."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        labelled = i % 4 != 3
        sample: dict = {}
        if name == "classification":
            pred = torch.randn(len(CLASSES), generator=g)
            if labelled:
                sample["classification"] = torch.tensor(i % len(CLASSES))
        elif name == "segmentation":
            pred = torch.randn(len(CLASSES), 6, 7, generator=g)
            if labelled:
                seg = torch.randint(0, len(CLASSES), (6, 7), generator=g)
                seg[torch.rand(6, 7, generator=g) < 0.2] = 255
                if i % 5 == 0:
                    seg[:] = 255  # labelled, every pixel ignored
                sample["segmentation"] = seg
        elif name == "depth":
            pred = 0.5 + 4 * torch.rand(1, 6, 7, generator=g)
            if labelled:
                depth = 0.5 + 4 * torch.rand(1, 6, 7, generator=g)
                depth[torch.rand(1, 6, 7, generator=g) < 0.3] = 0.0  # invalid pixels
                sample["depth"] = depth
        elif name == "normals":
            pred = torch.nn.functional.normalize(torch.randn(3, 6, 7, generator=g), dim=0)
            if labelled:
                gt = torch.nn.functional.normalize(torch.randn(3, 6, 7, generator=g), dim=0)
                gt[:, torch.rand(6, 7, generator=g) < 0.3] = 0.0  # invalid pixels
                sample["normals"] = gt
        else:
            sample, pred = _detection_sample(i, labelled, g)
        out.append((sample, pred))
    return out


def _detection_sample(i: int, labelled: bool, g: torch.Generator) -> tuple[dict, dict]:
    """Ground truth in the image's own pixels (``original``, the network seeing it at twice
    the size) with crowd regions and areas; predictions near the boxes, elsewhere, and of
    classes 0-2 only, so class 3's boxes are never detected."""
    scale = 2.0
    m = 0 if i % 6 == 1 else int(torch.randint(1, 5, (1,), generator=g))  # some without GT
    xy = torch.rand(m, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(m, 2, generator=g) * 20], 1)
    labels = torch.randint(0, len(CLASSES), (m,), generator=g)
    original: dict = {"size": (64, 64), "scale": (scale, scale)}
    if labelled:
        original.update(boxes=boxes, box_labels=labels)
        if i % 3 == 0:
            original["box_areas"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * 0.7
        if i % 4 == 0:
            original["crowd_boxes"] = torch.tensor([[0.0, 0.0, 30.0, 30.0]])
            original["crowd_labels"] = torch.tensor([int(i % 3)])
    near = boxes + torch.randn(m, 4, generator=g) * 1.5
    far = torch.rand(3, 2, generator=g) * 50
    far = torch.cat([far, far + 4 + torch.rand(3, 2, generator=g) * 15], 1)
    pred_boxes = torch.cat([near, far]).clamp(0, 64) * scale
    n = len(pred_boxes)
    pred = {
        "boxes": pred_boxes,
        "labels": torch.cat([labels.clamp(max=2), torch.randint(0, 3, (3,), generator=g)]),
        "scores": torch.rand(n, generator=g),
    }
    sample: dict = {"original": original}
    if labelled:
        sample.update(boxes=boxes * scale, box_labels=labels)
    return sample, pred


def _batch_predictions(name: str, preds: list) -> object:
    return preds if name == "detection" else torch.stack(preds)


def _records_and_metric(task: Task, pairs: list, batch: int = 3) -> tuple[list, list, float]:
    """Every labelled image's key and record, in batches of ``batch``, and the task's metric
    over the same batches."""
    metric, keys, records = task.new_metric(), [], []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        target = task.collate([s for s, _ in chunk])
        if target is None:
            continue
        preds = _batch_predictions(task.name, [p for _, p in chunk])
        metric.update(preds, target)
        for j, record in enumerate(task.image_records(preds, target)):
            if record is not None:
                keys.append(start + j)
                records.append(record)
    return keys, records, float(metric.compute()[task.primary_metric])


NAMES = ["classification", "segmentation", "depth", "normals", "detection"]


@pytest.mark.parametrize("name", NAMES)
def test_unit_weights_give_the_tasks_metric_and_counts_repeat_images(name):
    task = build_task(name, CLASSES)
    pairs = _samples(name, 23, seed=NAMES.index(name))
    keys, records, expected = _records_and_metric(task, pairs)
    labelled = [i for i, (s, _) in enumerate(pairs) if task.has_label(s)]
    assert keys == labelled  # one record per labelled image, none for the others
    f = task.records_metric(records)
    # COCO mAP comes out of torchmetrics as float32; the other metrics are float64.
    tolerance = 1e-7 if name == "detection" else 1e-9
    assert f(np.ones((1, len(records))))[0] == pytest.approx(expected, abs=tolerance)

    # Integer weights: the metric over the images repeated that many times (zero: left out).
    counts = np.random.default_rng(1).integers(0, 3, (3, len(records)))
    values = f(counts)
    assert values.shape == (3,)
    for row, value in zip(counts, values, strict=True):
        repeated = [pairs[k] for k, c in zip(keys, row, strict=True) for _ in range(c)]
        _, _, again = _records_and_metric(task, repeated, batch=4)
        assert value == pytest.approx(again, abs=tolerance, nan_ok=True)


def test_tasks_without_records_say_so():
    class Bare(Task):
        name = "bare"
        label_keys = ("bare",)
        primary_metric = "m"
        higher_is_better = True
        needs_classes = False

        def build_head(self, features):
            raise NotImplementedError

        def collate(self, samples):
            return None

        def new_metric(self):
            raise NotImplementedError

    assert Bare().image_records(None, None) is None
    with pytest.raises(NotImplementedError, match="'bare' keeps no per-image records"):
        Bare.records_metric([])


# ---------------------------------------------------------------- COCO mAP, re-weighted


def _pycocotools_map(records: list[dict]) -> float:
    """pycocotools' own mAP@[.5:.95] (default parameters) of records, each a new image."""
    images, gts, dts = [], [], []
    for i, r in enumerate(records):
        images.append({"id": i + 1})
        gt_xywh = r["gt_boxes"].copy()
        gt_xywh[:, 2:] -= gt_xywh[:, :2]
        for box, label, crowd, area in zip(
            gt_xywh.tolist(), r["gt_labels"], r["gt_crowd"], r["gt_area"], strict=True
        ):
            gts.append(
                {
                    "id": len(gts) + 1,
                    "image_id": i + 1,
                    "category_id": int(label),
                    "bbox": box,
                    "iscrowd": int(crowd),
                    "area": float(area) if area > 0 else box[2] * box[3],
                }
            )
        dt_xywh = r["boxes"].copy()
        dt_xywh[:, 2:] -= dt_xywh[:, :2]
        for box, label, score in zip(dt_xywh.tolist(), r["labels"], r["scores"], strict=True):
            dts.append(
                {
                    "id": len(dts) + 1,
                    "image_id": i + 1,
                    "category_id": int(label),
                    "bbox": box,
                    "score": float(score),
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": c} for c in range(len(CLASSES))]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "annotations": gts, "categories": cats}
        coco_dt.dataset = {"images": images, "annotations": dts, "categories": cats}
        coco_gt.createIndex()
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


@pytest.fixture(scope="module")
def detection_records() -> list[dict]:
    task = build_task("detection", CLASSES)
    _, records, expected = _records_and_metric(task, _samples("detection", 30, seed=7))
    assert any(r["gt_crowd"].any() for r in records)  # the cases the tests are about
    assert any(len(r["gt_labels"]) == 0 for r in records)
    assert 3 in np.concatenate([r["gt_labels"] for r in records])
    assert 3 not in np.concatenate([r["labels"] for r in records])
    assert _pycocotools_map(records) == pytest.approx(expected, abs=1e-7)
    return records


def test_coco_map_unit_weights_equal_pycocotools(detection_records):
    f = detection_module.DetectionTask.records_metric(detection_records)
    value = f(np.ones((1, len(detection_records))))[0]
    assert value == pytest.approx(_pycocotools_map(detection_records), abs=1e-12)


def test_coco_map_weight_two_is_the_image_duplicated_and_zero_the_image_removed(
    detection_records, monkeypatch
):
    # Small chunks: several re-weightings at once split over chunks give the same numbers.
    monkeypatch.setattr(detection_module, "RECORDS_CHUNK_ELEMENTS", 500)
    f = detection_module.DetectionTask.records_metric(detection_records)
    n = len(detection_records)
    weights = np.ones((2 * n, n))
    for i in range(n):
        weights[i, i] = 2
        weights[n + i, i] = 0
    values = f(weights)
    for i in range(n):
        duplicated = [*detection_records, detection_records[i]]
        removed = detection_records[:i] + detection_records[i + 1 :]
        assert values[i] == pytest.approx(_pycocotools_map(duplicated), abs=1e-12)
        assert values[n + i] == pytest.approx(_pycocotools_map(removed), abs=1e-12)


def test_coco_map_is_minus_one_without_ground_truth(detection_records):
    f = detection_module.DetectionTask.records_metric(detection_records)
    with_gt = [len(r["gt_labels"]) > 0 for r in detection_records]
    weights = np.ones((1, len(detection_records)))
    weights[0, with_gt] = 0
    assert f(weights)[0] == -1.0


# ---------------------------------------------------------------- a teacher's test pass


def test_teacher_test_pass_leaves_records_that_give_its_test_metric(tmp_path):
    cfg = load_config(
        TeachConfig,
        "teach_segmentation_cpu",
        [*TINY_MODEL, *tiny_data(tmp_path / "data", num=20), *tiny_steps(2)],
    )
    out = tmp_path / "teacher"
    summary = teach(cfg, out, progress=False)
    info = summary["info"]
    assert info["test_records"] == {"segmentation": "test_records/segmentation.npz"}
    records = load_records(out / info["test_records"]["segmentation"])
    assert (records.task, records.metric) == ("segmentation", "miou")
    assert len(records.keys) == len(set(records.keys)) > 0
    f = build_task("segmentation", summary["tasks"]["segmentation"]["classes"]).records_metric(
        records.records
    )
    value = f(np.ones((1, len(records.keys))))[0]
    assert value == pytest.approx(info["test"]["segmentation"]["miou"], abs=1e-9)
