"""`must label`: thresholds, round trip through the store, resume after a kill, skipped images,
several processes, refusals, one pass per multi-task teacher, real labels kept, inspection.

Teachers are tiny MultiTaskModels with random weights whose output layers are scaled up, so
that they are confident enough to keep some boxes and pixels and drop others."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

from must.checkpoint import load_model, save_model
from must.cli import main
from must.data.readers import MultiTaskDataset, read_image
from must.data.render import render_dataset
from must.data.source import DataSource
from must.data.styles import load_style
from must.data.transforms import build_transforms
from must.errors import ConfigError
from must.models.backbone import Backbone
from must.models.model import MultiTaskModel
from must.stages.label import LabelSettings, label_images
from must.store import PseudoLabelStore, StoreDataset
from must.tasks import build_task
from tiny import tiny_backbone

STYLE = load_style("mixed")
TINY = tiny_backbone()
POOL_SIZE, POOL_PX, INPUT_PX = 12, 40, 32  # images are 40 px, the teachers were "trained" at 32
SHARD, BATCH = 4, 4


def make_teacher(out: Path, tasks: list[str], image_size: int = INPUT_PX, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    objs = {
        "classification": lambda: build_task("classification", STYLE.category_names),
        "detection": lambda: build_task(
            "detection", STYLE.category_names, {"box_score_thresh": 0.0}
        ),
        "segmentation": lambda: build_task("segmentation", STYLE.segmentation_classes),
        "depth": lambda: build_task("depth", None),
    }
    model = MultiTaskModel(TINY, {t: objs[t]() for t in tasks})
    with torch.no_grad():  # confident random teachers: outputs on both sides of 0.5
        if "classification" in tasks:
            model.heads["classification"].fc.weight.mul_(30)
        if "detection" in tasks:
            model.heads["detection"].roi_heads.box_predictor.cls_score.weight.mul_(10)
        if "segmentation" in tasks:
            model.heads["segmentation"].tower[-1].weight.mul_(60)
        if "depth" in tasks:
            model.heads["depth"].tower[-1].weight.mul_(100)
    save_model(model, out, {"image_size": image_size})
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine two OpenMP
    threads spend far longer waiting for each other than computing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("label")


@pytest.fixture(scope="module")
def pool(root) -> Path:
    out = root / "pool"
    render_dataset("mixed", out, POOL_SIZE, POOL_PX, splits=(1, 0, 0), progress=False)
    return out


@pytest.fixture(scope="module")
def multi(root) -> Path:
    return make_teacher(root / "multi", ["classification", "detection", "segmentation", "depth"])


def run(teachers, images, out, **kw):
    kw = {"shard_size": SHARD, "batch_size": BATCH, "workers": 0, "progress": False, **kw}
    return label_images([str(t) for t in teachers], images, out, **kw)


@pytest.fixture(scope="module")
def reference(root, pool, multi) -> Path:
    """One uninterrupted single-process run: what every other way of running must equal."""
    out = root / "reference"
    result = run([multi], pool, out)
    assert result.complete and result.records == POOL_SIZE and not result.skipped
    return out


def teacher_outputs(ckpt: Path, paths: list[Path]) -> tuple[list[dict], list[tuple[int, int]]]:
    """The teacher's own predictions, per image, batched as the pipeline batches them."""
    model, payload = load_model(ckpt)
    model.eval()
    size = payload["info"]["image_size"]
    resize = build_transforms(False, size)
    out, sizes = [], []
    for first in range(0, len(paths), BATCH):
        images = []
        for p in paths[first : first + BATCH]:
            img = torch.from_numpy(read_image(p)).permute(2, 0, 1)
            sizes.append(tuple(img.shape[-2:]))
            images.append(resize({"image": tv_tensors.Image(img)})["image"])
        with torch.inference_mode():
            preds, _ = model(torch.stack(images).float() / 255.0)
        for i in range(len(images)):
            out.append({name: value[i] for name, value in preds.items()})
    return out, sizes


def records_of(store: Path) -> dict:
    s = PseudoLabelStore(store)
    return {k: s.get(k) for k in s.keys}


def assert_same_records(a: Path, b: Path) -> None:
    ra, rb = records_of(a), records_of(b)
    assert list(ra) == list(rb)
    for key, rec in ra.items():
        other = rb[key]
        assert (rec.height, rec.width, rec.origin) == (other.height, other.width, other.origin)
        assert rec.labels.keys() == other.labels.keys()
        for task, fields in rec.labels.items():
            for name, value in fields.items():
                assert np.array_equal(value, other.labels[task][name]), (key, task, name)
    ma = json.loads((a / "manifest.json").read_text())
    mb = json.loads((b / "manifest.json").read_text())
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]


def entropy(p: np.ndarray) -> float:
    p = p.astype(np.float64)
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


# ------------------------------------------------------------------------------------ tests


def test_store_holds_the_teachers_predictions_with_thresholds_applied(reference, pool, multi):
    store = PseudoLabelStore(reference)
    header = store.manifest
    assert header["settings"] == {
        "temperature": 1.0,
        "det_threshold": 0.5,
        "seg_threshold": 0.5,
        "label_scale": 1.0,
        "keep_real": False,
    }
    assert header["teachers"][0]["tasks"] == [
        "classification",
        "detection",
        "segmentation",
        "depth",
    ]
    assert len(header["teachers"][0]["sha256"]) == 64
    dataset = MultiTaskDataset(pool, tasks=[])
    assert store.keys == dataset.keys
    preds, sizes = teacher_outputs(multi, dataset.image_paths)
    kept = dropped = ignored = 0
    for key, pred, (h, w) in zip(store.keys, preds, sizes, strict=True):
        rec = store.get(key)
        assert (rec.height, rec.width) == (h, w) == (POOL_PX, POOL_PX)
        assert set(rec.origin.values()) == {"pseudo"}
        # classification: the full soft distribution, summing to 1 within float16 rounding.
        p = rec.labels["classification"]["cls_probs"]
        assert p.dtype == np.float16 and p.shape == (len(STYLE.category_names),)
        assert abs(float(p.astype(np.float32).sum()) - 1) < 5e-3
        expected = torch.softmax(pred["classification"], 0).numpy()
        assert np.allclose(p.astype(np.float32), expected, atol=1e-3)
        # detection: boxes with score >= 0.5 only, scaled from 32 px back to 40 px.
        det = rec.labels["detection"]
        scores = pred["detection"]["scores"]
        keep = scores >= 0.5
        kept, dropped = kept + int(keep.sum()), dropped + int((~keep).sum())
        assert (det["det_scores"] >= 0.5).all()
        assert np.allclose(det["det_scores"], scores[keep].numpy(), atol=1e-3)
        assert np.array_equal(det["det_classes"], pred["detection"]["labels"][keep].numpy())
        boxes = pred["detection"]["boxes"][keep].numpy() * (POOL_PX / INPUT_PX)
        assert np.allclose(det["det_boxes"], boxes, atol=1e-4)
        # segmentation: logits resized to the image, ignored exactly where max prob < 0.5.
        logits = F.interpolate(
            pred["segmentation"][None], size=(h, w), mode="bilinear", align_corners=False
        )[0]
        conf, classes = torch.softmax(logits, 0).max(0)
        classes[conf < 0.5] = 255
        seg = rec.labels["segmentation"]["seg_map"]
        assert np.array_equal(seg, classes.numpy().astype(np.uint8))
        ignored += int((seg == 255).sum())
        # depth: metres, resized bilinearly, float16.
        depth = F.interpolate(pred["depth"][None], size=(h, w), mode="bilinear")[0, 0]
        assert np.array_equal(rec.labels["depth"]["depth"], depth.numpy().astype(np.float16))
    assert kept and dropped, "the test teacher should produce boxes on both sides of 0.5"
    assert 0 < ignored < POOL_SIZE * POOL_PX * POOL_PX


def test_store_dataset_gives_back_the_stored_labels_as_training_samples(reference, pool):
    dataset = StoreDataset(reference)
    store = PseudoLabelStore(reference)
    assert len(dataset) == POOL_SIZE
    sample = dataset[3]
    rec = store.get(sample["key"])
    assert sample["image"].shape == (3, POOL_PX, POOL_PX) and sample["image"].dtype == torch.uint8
    assert np.array_equal(
        sample["image"].permute(1, 2, 0).numpy(), read_image(dataset.image_path(rec.key))
    )
    assert torch.equal(
        sample["classification_soft"],
        torch.from_numpy(rec.labels["classification"]["cls_probs"].astype(np.float32)),
    )
    assert isinstance(sample["boxes"], tv_tensors.BoundingBoxes)
    assert sample["boxes"].canvas_size == (POOL_PX, POOL_PX)
    assert np.array_equal(sample["boxes"].numpy(), rec.labels["detection"]["det_boxes"])
    assert sample["box_labels"].dtype == torch.int64
    assert isinstance(sample["segmentation"], tv_tensors.Mask)
    assert sample["segmentation"].dtype == torch.int64
    assert np.array_equal(sample["segmentation"].numpy(), rec.labels["segmentation"]["seg_map"])
    assert sample["depth"].shape == (1, POOL_PX, POOL_PX)
    assert sample["label_origin"] == dict.fromkeys(store.tasks, "pseudo")
    # The training pipeline takes it as it is: augmentation, then each task's collate.
    from must.training.data import Collator

    aug = StoreDataset(reference, transform=build_transforms(True, 32))
    batch = Collator({n: build_task(n, store.classes(n)) for n in store.tasks})([aug[0], aug[1]])
    assert batch.images.shape == (2, 3, 32, 32)
    assert set(batch.targets) == set(store.tasks)
    assert torch.allclose(batch.targets["classification"]["probs"].sum(1), torch.ones(2), atol=5e-3)


def test_store_labels_come_out_as_the_training_model_s_heads_expect(reference):
    # A student whose segmentation head ignores 250 gets 250 where the store says "ignored"
    # (255 there), never 255 as a class id; its loss then ignores exactly those pixels.
    heads = {"segmentation": {"ignore_index": 250}}
    default, configured = StoreDataset(reference), StoreDataset(reference, heads=heads)
    stored = PseudoLabelStore(reference)
    seen_ignored = 0
    for i in range(len(default)):
        a, b = default[i]["segmentation"], configured[i]["segmentation"]
        ignored = torch.from_numpy(stored.get(default.keys[i]).labels["segmentation"]["seg_map"])
        ignored = ignored.long() == 255
        assert torch.equal(a[ignored], torch.full_like(a[ignored], 255))
        assert torch.equal(b[ignored], torch.full_like(b[ignored], 250))
        assert torch.equal(a[~ignored], b[~ignored])
        seen_ignored += int(ignored.sum())
    assert seen_ignored > 0
    assert configured.tasks["segmentation"].config.ignore_index == 250


def test_temperature_flattens_the_soft_labels(root, pool, reference):
    cls = make_teacher(root / "cls", ["classification"], seed=0)
    cold = run([cls], pool, root / "t1")
    hot = run([cls], pool, root / "t3", settings=LabelSettings(temperature=3.0))
    assert cold.complete and hot.complete
    a, b = records_of(root / "t1"), records_of(root / "t3")
    for key in a:
        pa = a[key].labels["classification"]["cls_probs"]
        pb = b[key].labels["classification"]["cls_probs"]
        assert entropy(pb) > entropy(pa)
        assert abs(float(pb.astype(np.float32).sum()) - 1) < 5e-3
    assert PseudoLabelStore(root / "t3").settings["temperature"] == 3.0


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_store(root, pool, multi, reference):
    out = root / "killed"
    args = [
        "label", "--teacher", str(multi), "--images", str(pool), "--out", str(out),
        "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--workers", "0", "--quiet",
    ]  # fmt: skip
    # Slow each image down (in the child only) so that the kill lands mid-run.
    code = (
        "import sys, time\n"
        "from must.tasks.depth import DepthTask\n"
        "orig = DepthTask.to_store\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.15)\n"
        "    return orig(*a, **k)\n"
        "DepthTask.to_store = slow\n"
        "from must.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as this process (see one_thread)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "shard-00000.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("shard-*.json"))
    assert done and len(done) < POOL_SIZE // SHARD, done
    assert not (out / "manifest.json").exists()
    assert main(args) == 0
    assert_same_records(out, reference)
    store = PseudoLabelStore(out)
    assert store.keys == PseudoLabelStore(reference).keys and len(set(store.keys)) == POOL_SIZE
    assert not list(out.glob("*.tmp"))


def test_two_processes_write_the_same_store_as_one(root, pool, multi, reference):
    out = root / "two"
    first = run([multi], pool, out, rank=0, world_size=2)
    assert first.written == [0, 2] and not first.complete
    second = run([multi], pool, out, rank=1, world_size=2)
    assert second.written == [1] and second.complete
    assert_same_records(out, reference)


# A rank of ``must label`` (RANK/WORLD_SIZE as torchrun sets them) that waits until every rank
# is ready before it starts, labels slowly, and prints when its labelling began and ended.
RANK_TOGETHER = """
import os, sys, time
from pathlib import Path

from must.tasks.depth import DepthTask

to_store = DepthTask.to_store


def slow(*a, **k):
    time.sleep(0.2)
    return to_store(*a, **k)


DepthTask.to_store = slow
from must.cli import main

ready = Path(sys.argv[1])
(ready / os.environ["RANK"]).touch()
deadline = time.time() + 120
while len(list(ready.iterdir())) < int(os.environ["WORLD_SIZE"]) and time.time() < deadline:
    time.sleep(0.01)
began = time.time()
code = main(sys.argv[2:])
print("labelled from", began, "to", time.time())
sys.exit(code)
"""


@pytest.mark.slow
def test_two_processes_labelling_at_once_write_the_same_store_as_one(root, pool, multi, reference):
    """Two ranks labelling at the same time into one new store (neither finds it started):
    both finish, the store is complete, and its records are those of one process."""
    out, ready = root / "at-once", root / "at-once-ready"
    ready.mkdir()
    args = [
        "label", "--teacher", str(multi), "--images", str(pool), "--out", str(out),
        "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--workers", "0", "--quiet",
    ]  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_TOGETHER, str(ready), *args],
            env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    spans = []
    for proc in ranks:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        began, ended = re.search(r"labelled from (\S+) to (\S+)", stdout).groups()
        spans.append((float(began), float(ended)))
    # Each rank labels at least 4 images at 0.2 s each: the two runs overlapped.
    assert max(b for b, _ in spans) < min(e for _, e in spans), spans
    assert PseudoLabelStore(out).manifest["complete"]
    assert_same_records(out, reference)
    assert not list(out.glob("*.tmp"))


def test_unreadable_image_is_skipped_with_its_reason(root, pool, multi, capsys):
    folder = root / "folder"
    images = sorted((pool / "images" / "train").glob("*.png"))[:5]
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(images):
        target = folder / ("sub" if i % 2 else "") / p.name
        Image.open(p).save(target.with_suffix(".jpg" if i == 4 else ".png"))
    (folder / "broken.png").write_bytes(b"not a png at all")
    out = root / "skipped"
    assert main(["label", "--teacher", str(multi), "--images", str(folder), "--out", str(out),
                 "--shard-size", "4", "--workers", "1", "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "5 images labelled, 1 skipped" in printed and "broken" in printed
    store = PseudoLabelStore(out)
    assert store.manifest["complete"]
    assert sorted(store.keys) == sorted(p.stem for p in images)
    [skipped] = store.skipped
    assert skipped["key"] == "broken" and "unreadable image" in skipped["reason"]
    with pytest.raises(KeyError, match="skipped"):
        store.get("broken")
    locations = json.loads((out / "images.json").read_text())
    assert locations["paths"][images[1].stem] == f"sub/{images[1].stem}.png"
    assert len(StoreDataset(out)) == 5


def test_another_configuration_is_refused_unless_overwrite(root, pool, multi):
    cls = make_teacher(root / "cls2", ["classification"], seed=1)
    out = root / "refuse"
    run([cls], pool, out)
    with pytest.raises(ConfigError, match=r"settings\.temperature"):
        run([cls], pool, out, settings=LabelSettings(temperature=2.0))
    det = make_teacher(root / "det", ["detection"], seed=2)
    run([det], pool, out, overwrite=True)
    with pytest.raises(ConfigError, match=r"settings\.det_threshold"):
        run([det], pool, out, settings=LabelSettings(det_threshold=0.7))
    result = run([det], pool, out, settings=LabelSettings(det_threshold=0.7), overwrite=True)
    assert result.complete and result.already_done == 0
    store = PseudoLabelStore(out)
    assert store.tasks == ["detection"] and store.settings["det_threshold"] == 0.7
    assert all((store.get(k).labels["detection"]["det_scores"] >= 0.7).all() for k in store.keys)
    with pytest.raises(ConfigError, match="two teachers for classification"):
        run([multi, cls], pool, root / "dup")
    with pytest.raises(ConfigError, match="--keep-real needs a dataset folder"):
        run([cls], pool / "images" / "train", root / "real", keep_real=True)


def test_multi_task_teacher_labels_every_task_in_one_pass_at_its_own_size(root, pool, monkeypatch):
    dsd = make_teacher(root / "dsd", ["detection", "segmentation", "depth"], seed=3)
    cls = make_teacher(root / "cls24", ["classification"], image_size=24, seed=4)
    seen: list[tuple[int, ...]] = []
    original = Backbone.forward

    def counting(self, images):
        seen.append(tuple(images.shape))
        return original(self, images)

    monkeypatch.setattr(Backbone, "forward", counting)
    result = run([cls, dsd], pool, root / "onepass", settings=LabelSettings(label_scale=0.5))
    batches = POOL_SIZE // BATCH
    assert sorted(seen) == sorted([(BATCH, 3, 24, 24)] * batches + [(BATCH, 3, 32, 32)] * batches)
    assert result.complete
    store = PseudoLabelStore(root / "onepass")
    rec = store.get(store.keys[0])
    assert set(rec.labels) == {"classification", "detection", "segmentation", "depth"}
    half = POOL_PX // 2
    assert rec.labels["segmentation"]["seg_map"].shape == (half, half)
    assert rec.labels["depth"]["depth"].shape == (half, half)
    sample = StoreDataset(root / "onepass")[0]  # pixel labels brought back to the image's size
    assert sample["segmentation"].shape == (POOL_PX, POOL_PX)
    assert sample["depth"].shape == (1, POOL_PX, POOL_PX)


def test_keep_real_keeps_the_real_labels(root, multi):
    data = root / "objects"
    tasks = ["classification", "detection", "segmentation", "depth"]
    render_dataset("objects", data, 6, 32, splits=(1, 0, 0), tasks=tasks, progress=False)
    real = MultiTaskDataset(data)
    no_depth = real.keys[:2]
    for key in no_depth:
        (data / "depth" / "train" / f"{key}.png").unlink()
    real = MultiTaskDataset(data)
    out = root / "keep"
    result = run([multi], data, out, keep_real=True, settings=LabelSettings(label_scale=0.5))
    assert result.complete
    store = PseudoLabelStore(out)
    assert store.settings["keep_real"] is True
    names = STYLE.category_names
    for i, key in enumerate(store.keys):
        rec, sample = store.get(key), real[i]
        assert sample["key"] == key
        assert rec.origin == {
            "classification": "real",
            "detection": "real",
            "segmentation": "real",
            "depth": "pseudo" if key in no_depth else "real",
        }
        probs = rec.labels["classification"]["cls_probs"]
        cls = names.index(real.classes["classification"][int(sample["classification"])])
        assert probs.tolist() == np.eye(len(names))[cls].tolist()
        det = rec.labels["detection"]
        assert np.array_equal(det["det_boxes"], sample["boxes"].numpy())
        assert (det["det_scores"] == 1).all()
        assert det["det_classes"].tolist() == sample["box_labels"].tolist()  # same vocabulary
        # label_scale 0.5: the real maps are subsampled (nearest), not blended.
        seg = sample["segmentation"].numpy()[1::2, 1::2]
        assert np.array_equal(rec.labels["segmentation"]["seg_map"], seg)
        depth = rec.labels["depth"]["depth"]
        assert depth.shape == (16, 16)
        if key not in no_depth:
            assert np.array_equal(depth, sample["depth"].numpy()[0, 1::2, 1::2].astype(np.float16))


def test_show_and_stats(reference, tmp_path, capsys):
    png = tmp_path / "grid.png"
    assert main(["label", "show", str(reference), "--num", "3", "--out", str(png)]) == 0
    with Image.open(png) as img:
        assert img.width > 3 * 192 and img.height > 2 * 192  # 3 rows of 4 panels, >= 192 px
    out = tmp_path / "stats.json"
    assert main(["label", "stats", str(reference), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "boxes per image mean" in printed and "ignored pixels" in printed
    stats = json.loads(out.read_text())
    store = PseudoLabelStore(reference)
    recs = [store.get(k) for k in store.keys]
    det = stats["tasks"]["detection"]
    counts = [len(r.labels["detection"]["det_classes"]) for r in recs]
    assert det["boxes_per_image_mean"] == pytest.approx(np.mean(counts))
    assert sum(det["boxes_per_image_hist"].values()) == POOL_SIZE
    assert sum(det["score_hist"]) == sum(counts) and sum(det["score_hist"][:5]) == 0
    seg = np.stack([r.labels["segmentation"]["seg_map"] for r in recs])
    assert stats["tasks"]["segmentation"]["ignored_fraction"] == pytest.approx((seg == 255).mean())
    ent = np.mean([entropy(r.labels["classification"]["cls_probs"]) for r in recs])
    assert stats["tasks"]["classification"]["entropy_mean"] == pytest.approx(ent)
    assert stats["tasks"]["classification"]["entropy_max"] == pytest.approx(math.log(8))
    assert stats["tasks"]["depth"]["origins"] == {"pseudo": POOL_SIZE, "real": 0}
    assert stats["skipped"] == []


def test_a_style_name_is_rendered_into_the_cache(root):
    cls = make_teacher(root / "cls5", ["classification"], seed=5)
    source = DataSource(dataset="objects", cache=str(root / "cache"), num=5, render_size=32)
    result = run([cls], source, root / "styled")
    assert result.complete and result.images == 4  # the train split of 5 images
    locations = json.loads((root / "styled" / "images.json").read_text())
    assert locations["style"] == "objects"
    assert Path(locations["source"]).name.startswith("objects_n5_px32")
    shutil.rmtree(root / "cache")


def test_a_teacher_whose_tasks_have_no_store_encoding_is_refused(root, pool, monkeypatch):
    normals = build_task("normals", None)
    model = MultiTaskModel(TINY, {"normals": normals})
    save_model(model, root / "unstored", {"image_size": INPUT_PX})
    monkeypatch.setattr(type(normals), "store_encoding", None)  # a task the store cannot hold
    with pytest.raises(ConfigError, match="none of its tasks"), pytest.warns(UserWarning):
        run([root / "unstored"], pool, root / "nostore")


def test_linked_image_files_and_folders_are_labelled_where_they_are_walked(root, pool, multi):
    images = sorted((pool / "images" / "train").glob("*.png"))
    elsewhere = root / "elsewhere"
    (elsewhere / "more").mkdir(parents=True)
    for i, p in enumerate(images):
        shutil.copy(p, elsewhere / ("more" if i >= 8 else "") / p.name)
    tree = root / "linked"
    tree.mkdir()
    for p in images[:8]:
        (tree / p.name).symlink_to(elsewhere / p.name)
    (tree / "sub").symlink_to(elsewhere / "more", target_is_directory=True)
    (elsewhere / "more" / "up").symlink_to(tree, target_is_directory=True)  # a loop: walked once
    out = root / "linked-store"
    result = run([multi], tree, out)
    assert result.complete and result.records == POOL_SIZE and not result.skipped
    locations = json.loads((out / "images.json").read_text())
    assert locations["root"] == str(tree)
    assert locations["paths"][images[0].stem] == images[0].name
    assert locations["paths"][images[-1].stem] == f"sub/{images[-1].name}"
    dataset = StoreDataset(out)
    assert len(dataset) == POOL_SIZE and dataset[POOL_SIZE - 1]["key"] == images[-1].stem

    # A dataset folder whose image files are links: the same labels as the real files get.
    data = root / "linked-data"
    shutil.copytree(pool, data, ignore=shutil.ignore_patterns("*.png"))
    for p in images:
        (data / "images" / "train" / p.name).symlink_to(p)
    run([multi], data, root / "linked-data-store")
    assert_same_records(root / "linked-data-store", reference_store(root, pool, multi))


def reference_store(root: Path, pool: Path, multi: Path) -> Path:
    out = root / "reference"
    if not (out / "manifest.json").exists():
        run([multi], pool, out)
    return out


def objects_data(root: Path) -> Path:
    data = root / "objects-base"
    if not data.exists():
        tasks = ["classification", "detection", "segmentation", "depth"]
        render_dataset("objects", data, 6, 32, splits=(1, 0, 0), tasks=tasks, progress=False)
    return data


def _coco_size(data: Path, key: str, masks: bool) -> None:
    path = data / "detection" / "train.json"
    coco = json.loads(path.read_text())
    [image] = [i for i in coco["images"] if Path(i["file_name"]).stem == key]
    image["width"] += 10
    if not masks:  # boxes only: the size is compared with the image file when it is read
        for ann in coco["annotations"]:
            ann.pop("segmentation", None)
    path.write_text(json.dumps(coco))


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


BAD_REAL_LABELS = {
    "class map of another size": lambda d, k: _png(
        d / "segmentation" / "train" / f"{k}.png", np.zeros((16, 16), np.uint8)
    ),
    "colour mask": lambda d, k: _png(
        d / "segmentation" / "train" / f"{k}.png", np.full((32, 32, 3), 7, np.uint8)
    ),
    "class id beyond the vocabulary": lambda d, k: _png(
        d / "segmentation" / "train" / f"{k}.png", np.full((32, 32), 40, np.uint8)
    ),
    "8-bit depth": lambda d, k: _png(
        d / "depth" / "train" / f"{k}.png", np.full((32, 32), 9, np.uint8)
    ),
    "COCO size differs from the file": lambda d, k: _coco_size(d, k, masks=False),
    "COCO size differs from the file (RLE masks)": lambda d, k: _coco_size(d, k, masks=True),
}


@pytest.mark.parametrize("case", list(BAD_REAL_LABELS))
def test_keep_real_applies_the_checks_data_check_applies(root, multi, case, capsys):
    data = root / f"bad-{len(case)}-{case.split()[0]}"
    shutil.copytree(objects_data(root), data)
    key = MultiTaskDataset(data).keys[0]
    BAD_REAL_LABELS[case](data, key)
    assert main(["data", "check", str(data)]) == 1
    reported = {line.split(": ")[0].strip() for line in capsys.readouterr().out.splitlines()}
    reported = {r for r in reported if r.startswith(str(data))}
    assert reported, case

    out = root / f"{data.name}-store"
    code = main(["label", "--teacher", str(multi), "--images", str(data), "--out", str(out),
                 "--keep-real", "--workers", "0", "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    if code == 2:  # refused as a whole, naming the file, before any store file is written
        assert any(r in captured.err for r in reported), captured.err
        assert not out.exists()
        return
    assert code == 0
    assert "1 skipped" in captured.out and any(r in captured.out for r in reported), captured.out
    store = PseudoLabelStore(out)
    assert key not in store and len(store) == 5
    assert any(r in store.skipped[0]["reason"] for r in reported)


def test_nothing_is_written_when_the_input_is_refused_before_labelling(root, multi):
    data = root / "renamed-classes"
    shutil.copytree(objects_data(root), data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["classes"]["segmentation"][1] = "ground"  # not one of the teacher's classes
    (data / "manifest.json").write_text(json.dumps(manifest))
    out = root / "renamed-store"
    with pytest.raises(ConfigError, match=r"segmentation classes \['ground'\]"):
        run([multi], data, out, keep_real=True)
    assert not out.exists() or not any(out.iterdir())


def test_plain_folder_with_per_class_numbering_is_keyed_like_the_reader(root, pool, multi):
    """`cat/0001.png` and `dog/0001.png` in a plain folder (no dataset.yaml) are labelled
    under `cat/0001` and `dog/0001`, as the dataset reader keys them; only one name with two
    extensions in one folder is refused."""
    folder = root / "per-class"
    images = sorted((pool / "images" / "train").glob("*.png"))[:5]
    names = ["cat/0001.png", "cat/0002.png", "dog/0001.png", "dog/0002.png", "lone.png"]
    for src, name in zip(images, names, strict=True):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / name)
    out = root / "per-class-store"
    assert main(["label", "--teacher", str(multi), "--images", str(folder), "--out", str(out),
                 "--shard-size", "4", "--workers", "0", "--quiet"]) == 0  # fmt: skip
    store = PseudoLabelStore(out)
    assert store.keys == ["cat/0001", "cat/0002", "dog/0001", "dog/0002", "lone"]
    locations = json.loads((out / "images.json").read_text())
    assert locations["paths"]["dog/0001"] == "dog/0001.png"

    Image.open(images[0]).save(folder / "dog" / "0001.jpg")
    with pytest.raises(ConfigError, match=r"same image key 'dog/0001'"):
        run([multi], folder, root / "per-class-twice")
