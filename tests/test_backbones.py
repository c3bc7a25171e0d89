"""Backbones by name: the ResNet and timm models publish their feature maps, heads are built
from that description, weights load and export under the library's own key names, and a timm
backbone runs the whole method (teach -> label -> train -> transfer)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from must.checkpoint import initialise, load_model, save_model
from must.cli import main
from must.config import SimCLRConfig, StudentConfig, TeachConfig, load_config, same_run
from must.data.source import DataSource
from must.errors import ConfigError
from must.features import FeatureSpec
from must.models.backbone import Backbone, BackboneConfig
from must.models.model import MultiTaskModel
from must.stages.label import label_images
from must.stages.pretrain import pretrain_simclr
from must.stages.teach import teach
from must.stages.train import train_student
from must.tasks import build_task
from tiny import TIMM_MODEL, TINY_STEPS

TINY_RESNET = BackboneConfig(depth=10, widths=(8, 16, 32, 64), stem_width=8, fpn_channels=16)


@pytest.mark.parametrize(
    ("config", "size"),
    [(TINY_RESNET, 256), (BackboneConfig(name="test_efficientnet", fpn_channels=16), 128)],
    ids=["resnet", "timm"],
)
def test_published_features_match_what_the_forward_returns(config, size):
    backbone = Backbone(config).eval()
    with torch.no_grad():
        out = backbone(torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8))
    assert set(out) == set(backbone.features) == {"c5", "p2", "p3", "p4", "p5", "p6", "p7", "fused"}
    for name, spec in backbone.features.items():
        assert spec.name == name
        assert out[name].shape[1] == spec.channels, name
        assert (size // out[name].shape[-2], size // out[name].shape[-1]) == (spec.stride,) * 2


def test_heads_are_built_from_the_description_and_refuse_missing_maps():
    features = {"c5": FeatureSpec("c5", 40, 32), "fused": FeatureSpec("fused", 24, 4)}
    features |= {f"p{k}": FeatureSpec(f"p{k}", 24, 2**k) for k in range(2, 6)}  # no p6, p7
    head = build_task("classification", ["a", "b", "c"]).build_head(features)
    assert head.fc.in_features == 40 and head.fc.out_features == 3
    seg = build_task("segmentation", ["a", "b"], {"feature": "p3"}).build_head(features)
    assert seg.feature == "p3" and seg.tower[0].in_channels == 24
    det = build_task("detection", ["a"], {"levels": ["p3", "p4"]}).build_head(features)
    assert det.rpn.anchor_generator.strides == [8, 16]
    assert det.rpn.anchor_generator.sizes == ((32,), (64,))  # 4 x the published stride
    with pytest.raises(ConfigError, match=r"detection head .* 'p6', which this backbone does"):
        build_task("detection", ["a"], {"levels": ["p5", "p6"]}).build_head(features)
    with pytest.raises(ConfigError, match=r"depth head reads feature map 'p7'"):
        build_task("depth", None, {"feature": "p7"}).build_head(features)
    # A model's heads follow its backbone's description (here a timm model's last stage).
    model = MultiTaskModel(
        BackboneConfig(name="test_convnext", fpn_channels=16),
        {"classification": build_task("classification", ["a", "b"])},
    )
    assert (
        model.heads["classification"].fc.in_features
        == timm.create_model("test_convnext").num_features
    )


def test_every_head_trains_on_a_timm_backbone_at_32_pixels():
    # At 32 px the stride-32 map (and P6, P7) is 1x1; the FPN and every head still work.
    torch.manual_seed(0)
    tasks = {
        "classification": build_task("classification", ["a", "b"]),
        "detection": build_task("detection", ["a"], {"levels": ["p2", "p3", "p4"]}),
        "segmentation": build_task("segmentation", ["a", "b"]),
        "depth": build_task("depth", None),
        "normals": build_task("normals", None),
    }
    model = MultiTaskModel(BackboneConfig(name="test_efficientnet", fpn_channels=16), tasks)
    samples = []
    for i in range(4):
        normals = torch.zeros(3, 32, 32)
        normals[2] = -1.0
        samples.append(
            {
                "classification": torch.tensor(i % 2),
                "boxes": torch.tensor([[4.0, 4.0, 20.0, 24.0]]),
                "box_labels": torch.tensor([0]),
                "segmentation": (torch.arange(32)[:, None] > 15).long().expand(32, 32),
                "depth": torch.full((1, 32, 32), 2.0),
                "normals": normals,
            }
        )
    targets = {name: task.collate(samples) for name, task in tasks.items()}
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    _, losses = model(images, targets)
    total = sum(term for task in losses.values() for term in task.values())
    assert set(losses) == set(tasks) and torch.isfinite(total)
    total.backward()
    for name, head in model.heads.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), name
    assert all(p.grad is not None for p in model.backbone.body.parameters())
    model.eval()
    with torch.no_grad():
        predictions, _ = model(images)
    assert predictions["segmentation"].shape == (4, 2, 32, 32)
    assert predictions["classification"].shape == (4, 2) and len(predictions["detection"]) == 4


def test_backbone_names_and_settings_are_checked():
    with pytest.raises(ValueError, match="did you mean convnext_atto"):
        BackboneConfig(name="convnext_ato")
    with pytest.raises(ConfigError, match=r"'test_vit' has feature maps at reductions \[16\]"):
        Backbone(BackboneConfig(name="test_vit"))
    # The presets' ResNet sizes are ignored, with a warning, when a timm model is named.
    with pytest.warns(UserWarning, match=r"widths, stem_width: ResNet settings, ignored"):
        cfg = load_config(
            TeachConfig, "teach_segmentation_cpu", ["model.backbone.name=test_convnext"]
        )
    assert "depth" not in cfg.model.backbone.spec()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults (as a model file records them) are quiet
        BackboneConfig.model_validate({"name": "test_convnext", "depth": 18})


def test_timm_weights_are_checked_and_exports_load_back_into_timm(tmp_path):
    cfg = BackboneConfig(name="test_convnext", fpn_channels=16)
    model = MultiTaskModel(cfg, {})
    save_model(model, tmp_path / "ckpt", {})
    out = tmp_path / "convnext.safetensors"
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    state = load_file(str(out))
    assert "stages.0.blocks.0.conv_dw.weight" in state  # timm's names, not features_only's
    whole = timm.create_model("test_convnext").eval()
    missing, unexpected = whole.load_state_dict(state, strict=False)
    assert unexpected == [] and all(k.startswith("head.") for k in missing)
    # The same network: timm's own forward gives our last stage.
    images = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ours = model.backbone.stages(images)["c5"]
        mean, std = model.backbone.mean, model.backbone.std
        assert torch.allclose(whole.forward_features((images - mean) / std), ours, atol=1e-5)
    # timm's whole-model state dict (classifier included) loads as model.backbone.weights.
    timm_file = tmp_path / "timm.safetensors"
    save_file(whole.state_dict(), str(timm_file))
    again = Backbone(cfg.model_copy(update={"weights": str(timm_file)}))
    assert all(
        torch.equal(v, model.backbone.body.state_dict()[k])
        for k, v in again.body.state_dict().items()
    )
    # A file of another model is one line naming the file.
    other = tmp_path / "effnet.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(other))
    with pytest.raises(
        ConfigError, match=r"effnet\.safetensors: weights do not fit timm model 'test_convnext'"
    ) as err:
        Backbone(cfg.model_copy(update={"weights": str(other)}))
    assert "\n" not in str(err.value)


def test_resnet_export_loads_into_torchvision_and_back(tmp_path):
    import torchvision

    model = MultiTaskModel(BackboneConfig(fpn_channels=16), {})
    save_model(model, tmp_path / "ckpt", {})
    out = tmp_path / "r18.safetensors"
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    state = load_file(str(out))
    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    back = Backbone(BackboneConfig(fpn_channels=16, weights=str(out)))
    body = model.backbone.body.state_dict()
    assert all(torch.equal(v, body[k]) for k, v in back.body.state_dict().items())


def test_timm_backbone_model_reloads_with_its_architecture(tmp_path):
    torch.manual_seed(0)
    cfg = BackboneConfig(name="test_efficientnet", fpn_channels=16)
    model = MultiTaskModel(cfg, {"depth": build_task("depth", None)}).eval()
    save_model(model, tmp_path, {})
    loaded, payload = load_model(tmp_path)
    assert payload["backbone"]["name"] == "test_efficientnet" and "depth" not in payload["backbone"]
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(images)[0]["depth"], loaded.eval()(images)[0]["depth"])
    # A model of another backbone cannot start from it, and is told which to name.
    resnet = MultiTaskModel(TINY_RESNET, {"depth": build_task("depth", None)})
    with pytest.raises(ConfigError, match="set model.backbone.name=test_efficientnet"):
        initialise(resnet, str(tmp_path))


def test_model_file_without_a_backbone_name_loads_as_a_resnet(tmp_path):
    torch.manual_seed(0)
    model = MultiTaskModel(TINY_RESNET, {"depth": build_task("depth", None)})
    file = save_model(model, tmp_path / "new", {})
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    payload = json.loads(meta["must"])
    assert payload["backbone"].pop("name") == "resnet"
    old = tmp_path / "old" / "model.safetensors"
    old.parent.mkdir()
    save_file(load_file(str(file)), str(old), metadata=meta | {"must": json.dumps(payload)})
    loaded, _ = load_model(old)
    assert loaded.backbone.config.name == "resnet"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    # A run recorded before backbones had names is the same run as today's ResNet one.
    recorded = {"model": {"backbone": {"depth": 10}}, "task": "depth"}
    assert same_run(
        recorded, {"model": {"backbone": {"name": "resnet", "depth": 10}}, "task": "depth"}
    )
    assert not same_run(
        recorded, {"model": {"backbone": {"name": "test_convnext", "depth": 10}}, "task": "depth"}
    )


# The presets' ResNet sizes are ignored for the timm model (checked above).
@pytest.mark.filterwarnings("ignore:model.backbone.widths")
def test_a_timm_backbone_runs_teach_label_train_and_transfer(tmp_path):
    cache = tmp_path / "data"
    data = ["data.num=20", "data.render_size=32", f"data.cache={cache}"]
    teachers = []
    for task in ("classification", "segmentation"):
        cfg = load_config(TeachConfig, f"teach_{task}_cpu", [*TIMM_MODEL, *TINY_STEPS, *data])
        summary = teach(cfg, tmp_path / task, progress=False)
        assert summary["backbone"]["name"] == "test_convnext"
        teachers.append(str(tmp_path / task))
    store = tmp_path / "store"
    label_images(
        teachers, DataSource(dataset="mixed", cache=str(cache), num=8, render_size=32), store, shard_size=8,
        batch_size=4, workers=0, progress=False,
    )  # fmt: skip
    student = load_config(
        StudentConfig, "train_student_cpu", [*TIMM_MODEL, *TINY_STEPS, f"data.stores=[{store}]"]
    )
    info = train_student(student, tmp_path / "student", progress=False)["info"]
    assert set(info["test"]) == {"classification", "segmentation"} and info["steps"] == 2
    assert main(["transfer", "transfer_cpu", *TIMM_MODEL, *TINY_STEPS, *data, "task=depth",
                 "--backbone", str(tmp_path / "student"), "--out", str(tmp_path / "tr"),
                 "--quiet"]) == 0  # fmt: skip
    tuned, payload = load_model(tmp_path / "tr")
    assert payload["backbone"]["name"] == "test_convnext" and payload["info"]["init"]
    started = load_model(tmp_path / "student")[0].state_dict()
    key = "backbone.body.stages_3.downsample.1.weight"
    assert key in started and not torch.equal(tuned.state_dict()[key], started[key])


@pytest.mark.filterwarnings("ignore:model.backbone.widths")
def test_simclr_pretrains_a_timm_backbone_on_its_last_stage(tmp_path):
    data = ["data.num=12", "data.render_size=32", f"data.cache={tmp_path / 'data'}"]
    simclr = load_config(SimCLRConfig, "simclr_cpu", [*TIMM_MODEL, *TINY_STEPS, *data])
    info = pretrain_simclr(simclr, tmp_path / "simclr", progress=False)["info"]
    assert info["steps"] == 2 and math.isfinite(info["final_loss"])
    assert load_model(tmp_path / "simclr")[0].backbone.config.name == "test_convnext"
