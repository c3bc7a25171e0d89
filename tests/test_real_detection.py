"""Detection on real images: aspect-preserving batches, scoring in the images' own pixels,
COCO results export checked against pycocotools' COCOeval, pictures of mixed sizes."""

from __future__ import annotations

import copy
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors

from must.cli import main
from must.config import DataConfig, TeachConfig, load_config
from must.data.readers import MultiTaskDataset
from must.data.show import show_dataset
from must.data.transforms import build_transforms
from must.stages.evaluate import _coco_ids, coco_results
from must.stages.teach import teach
from must.tasks.detection import DetectionMetric, DetectionTask
from must.training.data import Collator, make_dataset, make_loader
from tiny import TINY_MODEL, tiny_steps

# (width, height): landscape, portrait, square and an odd one; the longest is 120 px.
SIZES = [(120, 72), (54, 96), (80, 80), (100, 62)]
CATEGORY_IDS = {"cat": 3, "dog": 7, "bird": 12}  # non-contiguous, as in COCO


def coco_folder(root: Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A COCO-format dataset of images of mixed sizes: one object each (a polygon on every
    other image, its ``area`` the polygon's), and a crowd region (RLE) on every third."""
    rng = np.random.default_rng(0)
    spec = {"name": "mixed", "splits": {}}
    for split in splits:
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(8):
            w, h = SIZES[i % len(SIZES)]
            pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            x, y, bw, bh = w // 4, h // 5, w // 2, h // 2
            pixels[y : y + bh, x : x + bw] = (230, 40, 40)
            name = f"img{i:03d}.png"
            Image.fromarray(pixels).save(root / split / name)
            images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
            cid = list(CATEGORY_IDS.values())[i % 3]
            ann = {"bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0}
            if i % 2:  # a triangle: half the box's area
                ann["segmentation"] = [[x, y, x + bw, y, x, y + bh]]
                poly = mask_utils.frPyObjects(ann["segmentation"], h, w)
                ann["area"] = float(mask_utils.area(poly)[0])
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cid, **ann})
            if i % 3 == 0:  # a crowd region over the bottom half, as COCO writes it
                crowd = np.zeros((h, w), np.uint8, order="F")
                crowd[h // 2 :, :] = 1
                rle = mask_utils.encode(crowd)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": 100 + i,
                        "category_id": cid,
                        "bbox": [0, h // 2, w, h - h // 2],
                        "area": float(mask_utils.area(rle)),
                        "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                        "iscrowd": 1,
                    }
                )
        cats = [{"id": cid, "name": n} for n, cid in CATEGORY_IDS.items()]
        coco = {"images": images, "annotations": anns, "categories": cats}
        (root / f"{split}.json").write_text(json.dumps(coco))
        spec["splits"][split] = {
            "images": split,
            "detection": {"format": "coco", "annotations": f"{split}.json"},
        }
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return coco_folder(tmp_path_factory.mktemp("coco"))


def test_keep_aspect_batches_keep_each_image_aspect_and_pad_to_the_stride(folder):
    cfg = DataConfig(dataset=str(folder), image_size=64)
    task = DetectionTask(list(CATEGORY_IDS))
    for train in (True, False):
        ds = make_dataset(folder, "train", cfg, train=train)  # auto: keep_aspect here
        for i in range(len(SIZES)):
            sample = ds[i]
            h, w = sample["image"].shape[-2:]
            ow, oh = SIZES[i]
            assert max(h, w) == 64  # the longer side is image_size
            # The aspect ratio is the original's within a pixel.
            assert abs(w - 64 * ow / max(ow, oh)) <= 1 and abs(h - 64 * oh / max(ow, oh)) <= 1
            assert "instance_masks" not in sample  # no head reads them
        batch = make_loader(ds, {"detection": task}, 4, 0, False)
        images = next(iter(batch)).images
        assert images.shape[-2] % 32 == 0 and images.shape[-1] % 32 == 0
        assert images.shape[-2:] == (64, 64)
    # Square images (the scene world) stay square and unpadded in either mode.
    square = {"image": tv_tensors.Image(torch.zeros(3, 50, 50, dtype=torch.uint8)), "key": "a"}
    for mode in ("square", "keep_aspect"):
        out = build_transforms(False, 40, resize=mode)(square)
        assert out["image"].shape[-2:] == (40, 40)
        assert Collator({"detection": task})([out, out]).images.shape[-2:] == (40, 40)


def test_eval_scores_boxes_in_each_images_own_pixels():
    """A perfect prediction made at the network's input size maps back exactly; a 100 px
    wide object is COCO-large at its own size though it is 50 px wide at the input size."""
    task = DetectionTask(["a"])
    transform = build_transforms(False, 100, resize="keep_aspect")
    raw = {
        "key": "k",
        "image": tv_tensors.Image(torch.zeros(3, 100, 200, dtype=torch.uint8)),
        "boxes": tv_tensors.BoundingBoxes(
            [[20.0, 10.0, 130.0, 95.0]], format="XYXY", canvas_size=(100, 200)
        ),
        "box_labels": torch.tensor([0]),
    }
    sample = transform(raw)
    assert sample["image"].shape[-2:] == (50, 100)
    target = task.collate([sample])
    assert target["original"][0]["size"] == (100, 200)
    pred = [
        {
            "boxes": torch.as_tensor(sample["boxes"]).as_subclass(torch.Tensor).clone(),
            "labels": torch.tensor([0]),
            "scores": torch.tensor([0.9]),
        }
    ]
    metric = DetectionMetric()
    metric.update(pred, target)
    out = metric.compute()
    assert out["map"] == pytest.approx(1.0)
    assert out["map_large"] == pytest.approx(1.0)  # 110 x 85 px in the image's own pixels
    assert out["map_medium"] == -1


def _cocoeval(gt: dict, results: list[dict], tmp_path: Path) -> np.ndarray:
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco = COCO(str(tmp_path / "gt.json"))
    with redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_metric_equals_cocoeval_with_crowd_regions_and_coco_areas(tmp_path):
    """Ground truth as a COCO reader gives it (crowd regions and annotation areas), resized
    for the network; predictions at the input size. The metric on the batch equals COCOeval
    on the same detections in original pixels and the original JSON."""
    rng = np.random.default_rng(1)
    names = list(CATEGORY_IDS)
    gt = {"images": [], "annotations": [], "categories": []}
    gt["categories"] = [{"id": c, "name": n} for n, c in CATEGORY_IDS.items()]
    samples, results, preds = [], [], []
    transform = build_transforms(False, 64, resize="keep_aspect")
    for i, (w, h) in enumerate([(320, 200), (150, 260), (400, 400)]):
        gt["images"].append({"id": 10 + i, "file_name": f"{i}.jpg", "width": w, "height": h})
        boxes, labels, areas, crowd, crowd_labels = [], [], [], [], []
        for k in range(6):
            x, y = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
            bw, bh = rng.uniform(4, w - x), rng.uniform(4, h - y)
            label = int(rng.integers(0, 3))
            is_crowd = k == 5
            area = float(bw * bh * rng.uniform(0.5, 1.0))  # a mask's area, below the box's
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": 10 + i,
                    "category_id": CATEGORY_IDS[names[label]],
                    "bbox": [x, y, bw, bh],
                    "area": area,
                    "iscrowd": int(is_crowd),
                }
            )
            xyxy = [x, y, x + bw, y + bh]
            if is_crowd:
                crowd.append(xyxy)
                crowd_labels.append(label)
            else:
                boxes.append(xyxy)
                labels.append(label)
                areas.append(area)
        sample = transform(
            {
                "key": str(i),
                "image": tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)),
                "boxes": tv_tensors.BoundingBoxes(
                    torch.tensor(boxes, dtype=torch.float64).float(),
                    format="XYXY",
                    canvas_size=(h, w),
                ),
                "box_labels": torch.tensor(labels),
                "box_areas": torch.tensor(areas, dtype=torch.float64),
                "crowd_boxes": tv_tensors.BoundingBoxes(
                    torch.tensor(crowd).float(), format="XYXY", canvas_size=(h, w)
                ),
                "crowd_labels": torch.tensor(crowd_labels),
            }
        )
        samples.append(sample)
        # Detections near the objects (and on the crowd region), at the network's input size.
        sy, sx = sample["original"]["scale"]
        all_boxes = torch.tensor(boxes + crowd)
        jitter = torch.from_numpy(rng.normal(0, 3, all_boxes.shape)).float()
        det = (all_boxes + jitter) * torch.tensor([sx, sy, sx, sy])
        preds.append(
            {
                "boxes": det,
                "labels": torch.tensor(labels + crowd_labels),
                "scores": torch.from_numpy(rng.uniform(0.1, 1.0, len(det))).float(),
            }
        )
    target = DetectionTask(names).collate(samples)
    metric = DetectionMetric()
    metric.update(preds, target)
    ours = metric.compute()
    # The same detections as `must eval --predictions` writes them.
    from must.tasks.detection import to_original

    for i, (pred, original) in enumerate(zip(preds, target["original"], strict=True)):
        p = to_original(pred, original)
        for (x1, y1, x2, y2), label, score in zip(
            p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": 10 + i,
                    "category_id": CATEGORY_IDS[names[label]],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    stats = _cocoeval(copy.deepcopy(gt), results, tmp_path)
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1"]
    for key, value in zip(keys, stats, strict=False):
        assert float(ours[key]) == pytest.approx(value, abs=1e-6), key
    assert 0 < stats[0] < 1
    # Without the crowd region the detection on it is a false positive: lower AP.
    no_crowd = DetectionMetric()
    for s in samples:
        for key in ("crowd_boxes", "crowd_labels"):
            s["original"].pop(key)
    no_crowd.update(preds, DetectionTask(names).collate(samples))
    assert float(no_crowd.compute()["map"]) < float(ours["map"])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, folder) -> Path:
    out = tmp_path_factory.mktemp("det") / "teacher"
    cfg = load_config(
        TeachConfig,
        "teach_detection_cpu",
        [
            *TINY_MODEL,
            f"data.dataset={folder}",
            "data.image_size=64",
            # Keep every detection: a 4-step model's scores are low, and eval needs some.
            "model.heads.detection.box_score_thresh=0.0",
            *tiny_steps(4, 2),
        ],
    )
    torch.manual_seed(0)  # the weights are drawn before training seeds itself
    printed = io.StringIO()
    with redirect_stdout(printed):
        teach(cfg, out, progress=False)
    (out.parent / "stdout.txt").write_text(printed.getvalue())
    return out


def test_detection_teacher_trains_on_mixed_sizes_and_eval_matches_cocoeval(
    teacher, folder, tmp_path
):
    info = json.loads((teacher / "summary.json").read_text())["info"]
    assert info["steps"] == 4
    assert info["images_per_second"] > 0
    assert info["test"] == {}  # the dataset has no test split: stated, not an error
    printed = (teacher.parent / "stdout.txt").read_text()
    assert "no 'test' split" in printed and "images/s" in printed
    metrics_csv = (teacher / "logs" / "metrics.csv").read_text().splitlines()
    header = metrics_csv[0].split(",")
    col = header.index("val/detection/map")
    val_rows = [r for r in metrics_csv[1:] if r.split(",")[col] != ""]
    assert len(val_rows) == 2  # steps 2 and 4: the final validation is not run again

    preds = tmp_path / "results.json"
    metrics = tmp_path / "metrics.json"
    args = ["eval", str(teacher), "--data", str(folder), "--split", "val", "--quiet"]
    assert main([*args, "--predictions", str(preds), "--json", str(metrics)]) == 0
    results = json.loads(preds.read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS.values())
    ds = MultiTaskDataset(folder, split="val")
    sizes = {100 + i: SIZES[i % len(SIZES)] for i in range(8)}
    for r in results:  # original pixels: within each image's own size, not the 64 px input
        x, y, w, h = r["bbox"]
        iw, ih = sizes[r["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= iw + 1e-3 and y + h <= ih + 1e-3
    assert max(r["bbox"][0] + r["bbox"][2] for r in results) > 64
    gt = json.loads((folder / "val.json").read_text())
    stats = _cocoeval(gt, results, tmp_path)
    ours = json.loads(metrics.read_text())["detection"]
    assert ours["map"] == pytest.approx(stats[0], abs=1e-6)
    assert ours["map_50"] == pytest.approx(stats[1], abs=1e-6)
    for i, key in enumerate(["map_small", "map_medium", "map_large"], start=3):
        assert ours[key] == pytest.approx(stats[i], abs=1e-6), key
    assert _coco_ids(ds)[1] == {0: 3, 1: 7, 2: 12}
    assert coco_results(ds, []) == []


def test_data_show_draws_images_of_mixed_sizes(folder, tmp_path):
    out = show_dataset(folder, tmp_path / "grid.png", split="train", num=4)
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] > 4 * 100 and grid.shape[1] > 4 * 100  # four rows of four panels


@pytest.mark.slow
def test_student_on_datasets_without_a_test_split_states_it(folder, tmp_path):
    """Teachers train without a 'test' split; so does the student: no test metrics for that
    task, said so, instead of stopping with "no split 'test'"."""
    from must.config import StudentConfig
    from must.stages.train import train_student

    cfg = load_config(
        StudentConfig,
        "train_student_cpu",
        [
            *TINY_MODEL,
            f"data.datasets=[{{dataset: {folder}}}]",
            "loss.kind=equal",
            *tiny_steps(2),
        ],
    )
    printed = io.StringIO()
    with redirect_stdout(printed):
        info = train_student(cfg, tmp_path / "student", progress=False)["info"]
    assert info["untested"] == ["detection"] and info["test"] == {}
    assert "detection" in info["val"]
    assert f"{folder} has no 'test' split: no test metrics for detection" in printed.getvalue()


def test_a_keep_aspect_teacher_labels_letterboxed_images_in_their_own_pixels(
    teacher, folder, tmp_path
):
    """must label feeds a keep_aspect teacher what training fed it (longer side to the input
    size, the batch padded to the stride) and stores boxes in each image's own pixels."""
    from torchvision.transforms.v2 import functional as TF

    from must.checkpoint import load_model
    from must.data.readers import read_image
    from must.stages.label import LabelSettings, label_images
    from must.store import PseudoLabelStore

    info = json.loads((teacher / "summary.json").read_text())["info"]
    assert info["resize"] == "keep_aspect"
    out = tmp_path / "store"
    images = folder / "val"
    settings = LabelSettings(det_threshold=0.0)
    label_images([str(teacher)], images, out, settings=settings, batch_size=8, workers=0)
    store = PseudoLabelStore(out)
    assert store.manifest["teachers"][0]["resize"] == "keep_aspect"
    model, _ = load_model(teacher)
    model.eval()
    # By hand: each image letterboxed into the batch's padded 64 x 64 input.
    for key in store.keys:
        image = torch.from_numpy(read_image(images / f"{key}.png")).permute(2, 0, 1)
        h, w = image.shape[-2:]
        fitted = TF.resize(image, None, max_size=64, antialias=True)
        fh, fw = fitted.shape[-2:]
        assert max(fh, fw) == 64 and abs(fw / fh - w / h) < 0.05
        x = torch.zeros(1, 3, 64, 64)
        x[0, :, :fh, :fw] = fitted.float() / 255.0
        with torch.inference_mode():
            pred = model(x)[0]["detection"][0]
        expected = pred["boxes"] * torch.tensor([w / fw, h / fh, w / fw, h / fh])
        expected[:, 0::2] = expected[:, 0::2].clamp(0, w)
        expected[:, 1::2] = expected[:, 1::2].clamp(0, h)
        rec = store.get(key)
        assert (rec.height, rec.width) == (h, w)
        got = rec.labels["detection"]["det_boxes"]
        assert len(got) and np.allclose(got, expected.numpy(), atol=1e-3)


def test_training_reads_no_instance_masks_and_resize_follows_the_trained_task(folder):
    """Masks are decoded for what draws or crops with them, not for keep_aspect training or
    evaluation; ``auto`` keeps the aspect only when detection is what the run trains."""
    from must.training.data import resize_mode

    cfg = DataConfig(dataset=str(folder), image_size=64)
    for train in (True, False):
        ds = make_dataset(folder, "train", cfg, train=train)
        assert ds.resize == "keep_aspect" and not ds.masks
        assert "instance_masks" not in ds._read(ds._entries[0])
    square = make_dataset(folder, "train", DataConfig(dataset=str(folder), resize="square"), True)
    assert square.masks and "instance_masks" in square[0]  # the random crop reads them
    assert len(MultiTaskDataset(folder, masks=True)[0]["instance_masks"]) == 1
    ds = MultiTaskDataset(folder)
    assert resize_mode(cfg, ds, ["classification"]) == "square"
    assert resize_mode(cfg, ds, ["detection"]) == "keep_aspect"
