"""Training with several processes (DDP over gloo on the CPU): the ranks keep identical
weights, only global rank 0 evaluates, writes and prints, and its metrics are those of the
whole splits, each image counted once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import must.checkpoint as checkpoint
from must.checkpoint import load_model, save_model
from must.data.readers import MultiTaskDataset
from must.data.source import DataSource
from must.models.model import MultiTaskModel
from must.stages.evaluate import evaluate
from must.stages.label import label_images
from must.tasks import build_task
from tiny import TINY_MODEL, tiny_backbone, tiny_data, tiny_steps

# Three images in 'val' and three in 'test' (30 rendered: 24/3/3): two processes would each
# get two of them, one image twice, if the final evaluation were shared between them.
TINY = [*TINY_MODEL, *tiny_data(num=30), *tiny_steps(6, 3)]
TWO_PROCESSES = ["train.devices=2", "train.strategy=ddp", "train.accelerator=cpu"]


# ``must`` with every rank's parameters saved to rank<R>-<when>.pt beside this script when
# training starts (after DDP has set the model up) and when it ends. Lightning starts the
# second process by running this script again.
RANK_WEIGHTS = """
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

import must.training.fit as fit
from must.cli import main

HERE = Path(__file__).parent


class SaveWeights(Callback):
    def save(self, trainer, module, when):
        weights = {n: p.detach().cpu().clone() for n, p in module.named_parameters()}
        torch.save(weights, HERE / f"rank{trainer.global_rank}-{when}.pt")

    def on_train_start(self, trainer, module):
        self.save(trainer, module, "start")

    def on_train_end(self, trainer, module):
        self.save(trainer, module, "end")


make_trainer = fit.make_trainer


def make_trainer_saving_weights(*args, **kwargs):
    trainer = make_trainer(*args, **kwargs)
    trainer.callbacks.append(SaveWeights())
    return trainer


fit.make_trainer = make_trainer_saving_weights
sys.exit(main(sys.argv[1:]))
"""


def must(*args: str | Path, ranks: Path) -> subprocess.CompletedProcess:
    """``must ARGS`` in a new process, each rank's weights saved under the folder ``ranks``."""
    ranks.mkdir(parents=True)
    script = ranks / "must_saving_rank_weights.py"
    script.write_text(RANK_WEIGHTS)
    command = [sys.executable, str(script), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_ranks_trained_the_same_weights(ranks: Path) -> None:
    """Both ranks start training from the same weights (DDP hands rank 0's to the others)
    and, after the steps, hold the same weights again (DDP averages the gradients, so every
    rank takes the same optimizer step); the steps changed them."""
    weights = {
        (rank, when): torch.load(ranks / f"rank{rank}-{when}.pt", weights_only=True)
        for rank in (0, 1)
        for when in ("start", "end")
    }
    for when in ("start", "end"):
        zero, one = weights[0, when], weights[1, when]
        assert zero and zero.keys() == one.keys()
        different = [n for n in zero if not torch.equal(zero[n], one[n])]
        assert not different, (when, different[:5])
    start, end = weights[0, "start"], weights[0, "end"]
    moved = [n for n in start if not torch.equal(start[n], end[n])]
    assert any("heads." in n for n in moved) and any("backbone." in n for n in moved), moved


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, Path, str]:
    """A segmentation teacher trained by two processes: (folder, data cache, stdout)."""
    root = tmp_path_factory.mktemp("ddp")
    out, cache = root / "teacher", root / "data"
    proc = must(
        "teach", "teach_segmentation_cpu", "--out", out, "--quiet",
        *TINY, f"data.cache={cache}", *TWO_PROCESSES, ranks=root / "teacher-ranks",
    )  # fmt: skip
    return out, cache, proc.stdout


@pytest.mark.slow
def test_two_process_teacher_is_written_and_reported_once_with_whole_split_metrics(teacher):
    out, _cache, stdout = teacher
    assert_ranks_trained_the_same_weights(out.parent / "teacher-ranks")
    assert stdout.count("teacher for segmentation written to") == 1
    assert stdout.count("validation (split 'val'):") == 1
    assert stdout.count("test (split 'test'):") == 1
    assert stdout.count("trained 6 steps") == 1
    assert not leftovers(out)
    model, _ = load_model(out)
    assert list(model.tasks) == ["segmentation"]
    info = json.loads((out / "summary.json").read_text())["info"]
    assert info["steps"] == 6 and info["best_checkpoint"] == "best.ckpt"
    # Every process's images count: 6 steps of 4 images in each of 2 processes.
    assert info["images_per_second"] * info["train_seconds"] == pytest.approx(48, rel=0.25)
    dataset = info["training"]["segmentation"]["dataset"]
    for split in ("val", "test"):
        assert len(MultiTaskDataset(dataset, split=split, tasks=[])) % 2 == 1
        # The model file's figures are those of a single-process evaluation of the split.
        again = evaluate(out, dataset, split, progress=False)["segmentation"]
        for metric, value in info[split]["segmentation"].items():
            assert again[metric] == pytest.approx(value, abs=1e-6), (split, metric)


@pytest.mark.slow
def test_two_process_student_is_written_and_reported_once(teacher, tmp_path):
    teacher_dir, cache, _ = teacher
    store = tmp_path / "store"
    label_images(
        [str(teacher_dir)], DataSource(dataset="rooms", cache=str(cache), num=12, render_size=32),
        store, shard_size=8, batch_size=4, workers=0, progress=False,
    )  # fmt: skip
    out = tmp_path / "student"
    proc = must(
        "train", "train_student_cpu", "--store", store, "--out", out, "--quiet",
        *TINY_MODEL, "data.image_size=32", *tiny_steps(4, 2), *TWO_PROCESSES,
        ranks=tmp_path / "ranks",
    )  # fmt: skip
    assert_ranks_trained_the_same_weights(tmp_path / "ranks")
    assert proc.stdout.count("student with tasks segmentation written to") == 1
    assert proc.stdout.count("test (each teacher's own 'test' split):") == 1
    assert proc.stdout.count("trained 4 steps") == 1
    assert not leftovers(out)
    info = json.loads((out / "summary.json").read_text())["info"]
    dataset = info["evaluated_on"]["segmentation"]
    again = evaluate(out, dataset, "test", progress=False)["segmentation"]
    for metric, value in info["test"]["segmentation"].items():
        assert again[metric] == pytest.approx(value, abs=1e-6), metric


def tiny_model() -> MultiTaskModel:
    return MultiTaskModel(tiny_backbone(), {"depth": build_task("depth", None)})


def test_two_writers_of_one_folder_never_share_a_temporary(tmp_path, monkeypatch):
    """A second writer finishing while the first is between writing and renaming its model
    file leaves both writes whole."""
    real_save_file = checkpoint.save_file
    calls = []

    def save_file_then_let_another_writer_run(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        calls.append(filename)
        if len(calls) == 1:
            save_model(tiny_model(), tmp_path, {"writer": "second"})

    monkeypatch.setattr(checkpoint, "save_file", save_file_then_let_another_writer_run)
    save_model(tiny_model(), tmp_path, {"writer": "first"})
    assert calls[0] != calls[1]
    assert load_model(tmp_path)[1]["info"] == {"writer": "first"}
    assert not leftovers(tmp_path)


def test_a_failed_model_write_leaves_no_temporary(tmp_path, monkeypatch):
    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model(), tmp_path, {})
    assert list(tmp_path.iterdir()) == []
