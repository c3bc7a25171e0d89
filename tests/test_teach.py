"""`must teach` / `must eval`: checkpoints, resume, selection, and refusals of bad input."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from must.checkpoint import load_model
from must.cli import main
from must.config import TeachConfig, load_config, same_run
from must.data.source import DataSource
from must.data.styles import load_style
from must.errors import ConfigError, MustError
from must.models.backbone import Backbone, BackboneConfig
from must.stages.evaluate import evaluate
from must.stages.teach import teach
from must.tasks.base import Batch
from must.training.module import MultiTaskModule, NonFiniteLossError
from tiny import TINY_MODEL, tiny_backbone, tiny_data, tiny_steps

TINY = [*TINY_MODEL, *tiny_data(num=30), *tiny_steps(4, 2)]


def tiny(task_preset: str, cache: Path, *extra: str) -> TeachConfig:
    return load_config(TeachConfig, task_preset, [*TINY, f"data.cache={cache}", *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def seg_teacher(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("seg") / "teacher"
    teach(tiny("teach_segmentation_cpu", cache), out, progress=False)
    return out


def test_teacher_records_what_must_needs_and_eval_reproduces_its_test_metrics(
    seg_teacher, cache, tmp_path
):
    summary = json.loads((seg_teacher / "summary.json").read_text())
    assert summary["tasks"]["segmentation"]["classes"] == load_style("rooms").segmentation_classes
    training = summary["info"]["training"]["segmentation"]
    assert training["batch_size"] == 4 and training["lr"] == pytest.approx(0.05)
    assert Path(training["dataset"]).name.startswith("rooms_n30_px32")
    assert summary["info"]["steps"] == 4
    test = summary["info"]["test"]["segmentation"]
    assert 0 <= test["miou"] <= 1
    model, _ = load_model(seg_teacher)
    assert list(model.tasks) == ["segmentation"]
    # The stored test figures are the saved (best) weights' figures on the test split.
    again = evaluate(seg_teacher, training["dataset"], "test", progress=False)
    assert again["segmentation"]["miou"] == pytest.approx(test["miou"], abs=1e-6)
    out = tmp_path / "m.json"
    assert main(["eval", str(seg_teacher), "--data", training["dataset"], "--json", str(out)]) == 0
    assert json.loads(out.read_text())["segmentation"]["pixel_acc"] == pytest.approx(
        test["pixel_acc"], abs=1e-6
    )


# Each metric's range: fractions in [0, 1], errors and ratios >= 0. COCO's AP and AR of a size
# range with no ground-truth object in it is -1.
METRIC_RANGES = {
    "classification": dict.fromkeys(["top1", "top5"], "fraction"),
    "detection": {
        **dict.fromkeys(["map", "map_50", "map_75", "mar_1", "mar_10", "mar_100"], "fraction"),
        **dict.fromkeys(
            [f"{m}_{size}" for m in ("map", "mar") for size in ("small", "medium", "large")],
            "fraction or -1",
        ),
    },
    "depth": {
        **dict.fromkeys(["abs_rel", "rmse", "scale_gt_over_pred"], "non-negative"),
        **dict.fromkeys(["delta1", "delta2", "delta3", "delta1_aligned"], "fraction"),
    },
}


def in_range(value: float, kind: str) -> bool:
    fraction = 0 <= value <= 1
    return {
        "fraction": fraction,
        "fraction or -1": fraction or value == -1,
        "non-negative": value >= 0,
    }[kind]


@pytest.mark.parametrize(
    ("preset", "task", "style"),
    [
        ("teach_classification_cpu", "classification", "objects"),
        ("teach_detection_cpu", "detection", "cluttered"),
        ("teach_depth_cpu", "depth", "depth"),
    ],
)
def test_each_embedded_teacher_trains_end_to_end(preset, task, style, cache, tmp_path):
    cfg = tiny(preset, cache, "train.max_steps=2", "train.val_every=2")
    assert cfg.task == task
    out = tmp_path / "t"
    summary = teach(cfg, out, progress=False)
    info = summary["info"]
    assert summary["tasks"][task]["classes"] == load_style(style).classes().get(task, [])
    training = info["training"][task]
    assert training["dataset_name"] == style
    assert Path(training["dataset"]).name.startswith(f"{style}_n30_px32")
    assert info["steps"] == cfg.train.max_steps == 2
    test = info["test"][task]
    assert set(test) == set(METRIC_RANGES[task])
    for metric, value in test.items():
        ok = math.isfinite(value) and in_range(value, METRIC_RANGES[task][metric])
        assert ok, f"{metric} = {value}"
    # The model file loads, and evaluating it on the test split gives the summary's figures.
    model, _ = load_model(out)
    assert list(model.tasks) == [task]
    again = evaluate(out, training["dataset"], "test", progress=False)
    assert set(again) == {task}
    for metric, value in test.items():
        assert again[task][metric] == pytest.approx(value, abs=1e-6), metric


def test_finished_teacher_is_not_retrained_and_another_config_is_refused(seg_teacher, cache):
    stamp = (seg_teacher / "model.safetensors").stat().st_mtime_ns
    teach(tiny("teach_segmentation_cpu", cache), seg_teacher, progress=False)
    assert (seg_teacher / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="another config.*--overwrite"):
        teach(tiny("teach_segmentation_cpu", cache, "train.lr=0.1"), seg_teacher, progress=False)


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(cache, tmp_path):
    out = tmp_path / "killed"
    args = [
        sys.executable, "-m", "must.cli", "teach", "teach_depth_cpu", "--out", str(out),
        "--quiet", *TINY, f"data.cache={cache}",
        "train.max_steps=60", "train.val_every=30", "train.checkpoint_every=2",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (out / "summary.json").exists()
    step_at_kill = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step_at_kill < 60
    assert subprocess.run(args, check=False).returncode == 0
    info = json.loads((out / "summary.json").read_text())["info"]
    assert info["resumed_from_step"] >= 2 and info["steps"] == 60


def test_nan_loss_stops_with_step_and_task_and_keeps_the_last_checkpoint(
    cache, tmp_path, monkeypatch
):
    from must.tasks import segmentation

    calls = {"n": 0}
    original = segmentation.SegmentationHead.forward

    def poisoned(self, feats, image_size, target=None):
        preds, losses = original(self, feats, image_size, target)
        if target is not None:
            calls["n"] += 1
            if calls["n"] >= 4:
                losses = {k: v * float("nan") for k, v in losses.items()}
        return preds, losses

    monkeypatch.setattr(segmentation.SegmentationHead, "forward", poisoned)
    out = tmp_path / "nan"
    cfg = tiny("teach_segmentation_cpu", cache, "train.max_steps=6", "train.val_every=6")
    with pytest.raises(
        NonFiniteLossError, match=r"'segmentation' is nan at step 3.*last\.ckpt \(step 2\), is kept"
    ):
        teach(cfg, out, progress=False)
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert not (out / "model.safetensors").exists()


def test_a_batch_without_any_label_is_refused(seg_teacher):
    model, _ = load_model(seg_teacher)
    module = MultiTaskModule(model, tiny_train())
    batch = Batch(images=torch.rand(2, 3, 32, 32), targets={}, keys=["a", "b"])
    with pytest.raises(MustError, match="no label for any task.*a, b"):
        module.training_step(batch, 0)


def tiny_train():
    from must.config import TrainConfig

    return TrainConfig(max_steps=2, val_every=1)


def test_config_errors_name_the_key(cache, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        tiny("teach_depth_cpu", cache, "train.lrr=0.1")
    with pytest.raises(ConfigError, match=r"train.*multiple of val_every"):
        tiny("teach_depth_cpu", cache, "train.max_steps=5", "train.val_every=2")
    with pytest.raises(ConfigError, match="task"):
        tiny("teach_depth_cpu", cache, "task=optical_flow")
    # Head settings are checked with the config, before any data is read.
    with pytest.raises(ConfigError, match=r"(?s)model\.heads.*detection.*levels"):
        tiny("teach_detection_cpu", cache, "model.heads.detection.levels=[p9]")
    with pytest.raises(ConfigError, match="no such config file or preset"):
        load_config(TeachConfig, "teach_nothing")


def test_dataset_without_the_tasks_labels_is_refused(cache, tmp_path):
    cfg = tiny("teach_detection_cpu", cache, "data.dataset=depth")
    with pytest.raises(ConfigError, match="no detection labels.*it has: depth"):
        teach(cfg, tmp_path / "x", progress=False)


def test_eval_refuses_other_vocabularies_and_disjoint_tasks(seg_teacher, cache):
    style = {"num": 20, "render_size": 32, "cache": str(cache)}
    with pytest.raises(ConfigError, match="segmentation classes .* do not match"):
        evaluate(seg_teacher, DataSource(dataset="novel", **style), progress=False)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate(seg_teacher, DataSource(dataset="depth", **style), progress=False)


def test_backbone_loads_local_torchvision_and_timm_state_dicts(tmp_path):
    import torchvision

    tv = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), tv)
    a = Backbone(BackboneConfig(depth=18, weights=str(tv)))
    ref = torch.load(tv, weights_only=True)
    assert torch.equal(a.body.layer3[1].conv2.weight, ref["layer3.1.conv2.weight"])
    with pytest.raises(ConfigError, match=r"r18\.pt: weights do not fit.*depth"):
        Backbone(BackboneConfig(depth=34, weights=str(tv)))
    small = tiny_backbone()
    ours = tmp_path / "ours.pt"
    torch.save(
        {"backbone.body." + k: v for k, v in Backbone(small).body.state_dict().items()}, ours
    )
    b = Backbone(small.model_copy(update={"weights": str(ours)}))
    assert torch.equal(
        b.body.conv1.weight, torch.load(ours, weights_only=True)["backbone.body.conv1.weight"]
    )


def test_run_recorded_before_num_workers_auto_is_still_the_same_run(seg_teacher, cache):
    # Runs written when num_workers defaulted to 0 recorded it; how data is loaded does not
    # change what a run trains, so such a finished run is neither refused nor retrained.
    config = seg_teacher / "config.yaml"
    text = config.read_text()
    assert "num_workers: auto" in text
    config.write_text(text.replace("num_workers: auto", "num_workers: 0"))
    stamp = (seg_teacher / "model.safetensors").stat().st_mtime_ns
    try:
        teach(tiny("teach_segmentation_cpu", cache), seg_teacher, progress=False)
        assert (seg_teacher / "model.safetensors").stat().st_mtime_ns == stamp
        with pytest.raises(ConfigError, match="another config"):
            teach(
                tiny("teach_segmentation_cpu", cache, "train.lr=0.3"), seg_teacher, progress=False
            )
    finally:
        config.write_text(text)


def test_a_head_setting_written_at_its_default_is_the_same_run():
    """An experiment that states a head's default explicitly (a variant of a benchmark) reuses
    the run trained without it; any other value, or a wrong one, is another run."""
    recorded = load_config(TeachConfig, "teach_detection_cpu").model_dump(mode="json")
    head = recorded["model"]["heads"]["detection"]
    assert "num_convs" not in head  # left to its default in the preset

    def with_head(**settings) -> dict:
        heads = {"detection": {**head, **settings}}
        return {**recorded, "model": {**recorded["model"], "heads": heads}}

    assert same_run(recorded, with_head(num_convs=4, rpn_post_nms_top_n_train=300))
    assert not same_run(recorded, with_head(num_convs=2))
    assert not same_run(recorded, with_head(num_convs="four"))
