"""Mixed precision: under CPU bf16 autocast every task's loss terms and the predictions its
metric reads are float32, and a training step at 64 px has finite, exact gradients.

At 64 px, P6 and P7 are one pixel wide. oneDNN's bf16 weight gradient of a stride-2 conv on a
one-pixel-wide map leaves some kernel taps unwritten, so they hold whatever the memory held
before; the tests fill freed memory with NaN first, so that such a tap shows as NaN.
"""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from must.config import TrainConfig
from must.errors import ConfigError
from must.models.backbone import BackboneConfig
from must.models.model import MultiTaskModel
from must.tasks.classification import ClassificationTask
from must.tasks.depth import DepthConfig, DepthTask
from must.tasks.detection import DetectionTask
from must.tasks.normals import NormalsTask
from must.tasks.segmentation import SegmentationTask
from must.training.fit import CPU_BF16_ENV, resolve_precision
from test_task_pixel_and_classification import CLASSES, SEG_CLASSES, make_sample

SIZE = 64
# Wide enough (16 channels or more) for oneDNN to take the faulty bf16 path.
BACKBONE = BackboneConfig(depth=10, widths=(8, 16, 32, 64), stem_width=8, fpn_channels=32)
NAMES = ("classification", "detection", "segmentation", "depth", "normals")


def make_model(names: tuple[str, ...] = NAMES) -> MultiTaskModel:
    torch.manual_seed(0)
    tasks = {
        "classification": ClassificationTask(CLASSES),
        "detection": DetectionTask(CLASSES),
        "segmentation": SegmentationTask(SEG_CLASSES),
        "depth": DepthTask(config=DepthConfig()),
        "normals": NormalsTask(),
    }
    return MultiTaskModel(BACKBONE, {n: tasks[n] for n in names})


def make_batch(model: MultiTaskModel, n: int = 2) -> tuple[torch.Tensor, dict]:
    samples = []
    for i in range(n):
        s = make_sample(i, size=SIZE)
        s["boxes"] = tv_tensors.BoundingBoxes(
            torch.tensor([[8.0, 8.0, 40.0, 36.0]]), format="XYXY", canvas_size=(SIZE, SIZE)
        )
        s["box_labels"] = torch.tensor([i % len(CLASSES)])
        samples.append(s)
    images = torch.stack([s["image"].as_subclass(torch.Tensor) for s in samples]).float() / 255
    return images, {name: t.collate(samples) for name, t in model.tasks.items()}


def poison_freed_memory() -> None:
    """Allocate and free NaN-filled blocks: memory a kernel reads without writing is NaN."""
    for n in (1 << 12, 1 << 14, 1 << 16, 1 << 20):
        for dtype in (torch.float32, torch.bfloat16):
            torch.full((n,), float("nan"), dtype=dtype)


def test_losses_and_predictions_are_float32_under_cpu_bf16_autocast():
    model = make_model()
    images, targets = make_batch(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Autocast is on: the shared features are bf16, so float32 below is the heads' doing.
        assert model.backbone(images)["fused"].dtype == torch.bfloat16
        _, losses = model(images, targets)
    assert set(losses) == set(model.tasks)
    for task, terms in losses.items():
        for name, value in terms.items():
            assert value.dtype == torch.float32, (task, name, value.dtype)
            assert torch.isfinite(value), (task, name)

    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predictions, _ = model(images)
    for name in ("classification", "segmentation", "depth", "normals"):
        assert predictions[name].dtype == torch.float32, name
    assert all(
        p["boxes"].dtype == torch.float32 and p["scores"].dtype == torch.float32
        for p in predictions["detection"]
    )
    # The pixel heads' outputs are computed in float32, not bf16 values cast up: they have
    # more than bf16's 8 significant bits.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.backbone(images)
        for name in ("segmentation", "depth", "normals"):
            raw = model.heads[name].raw(feats, (SIZE, SIZE))
            assert raw.dtype == torch.float32, name
            assert not torch.equal(raw, raw.bfloat16().float()), name


def test_bf16_training_step_has_finite_and_exact_gradients():
    """P7 reads a 1x1 P6, so only the centre tap of its 3x3 kernel ever meets a pixel: every
    other tap's gradient is exactly zero. Before P6/P7 ran in float32 those taps held
    leftover memory (NaN here) in most tries."""
    model = make_model(("segmentation", "depth"))  # the heads that read fused P2, hence P7
    images, targets = make_batch(model)
    model.train()
    p7 = model.backbone.fpn.extra_blocks.p7.weight
    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    assert model.backbone(images)["p6"].shape[-2:] == (1, 1)
    for _ in range(3):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, losses = model(images, targets)
        poison_freed_memory()
        sum(v for terms in losses.values() for v in terms.values()).backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None]
        bad = [n for n in bad if not torch.isfinite(model.get_parameter(n).grad).all()]
        assert not bad, bad
        assert p7.grad is not None and bool((p7.grad[..., off_centre] == 0).all())
        assert p7.grad[..., 1, 1].abs().sum() > 0


def test_auto_precision_follows_the_cpu_and_explicit_settings_win(monkeypatch):
    """``auto`` on a CPU: bf16 only where the CPU computes bf16 in hardware (MUST_CPU_BF16
    stands in for the detection here); an explicit precision is kept whatever the CPU."""
    cpu = TrainConfig(accelerator="cpu")
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_precision(cpu) == "bf16-mixed"
    assert resolve_precision(cpu.model_copy(update={"precision": "32-true"})) == "32-true"
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert resolve_precision(cpu) == "32-true"
    assert resolve_precision(cpu.model_copy(update={"precision": "bf16-mixed"})) == "bf16-mixed"
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="MUST_CPU_BF16='yes'"):
        resolve_precision(cpu)
    # Without the override the answer is the CPU's own: AVX-512 BF16 or AMX.
    monkeypatch.delenv(CPU_BF16_ENV)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision(cpu) == ("bf16-mixed" if native else "32-true")
