"""Model files and checkpoints from elsewhere: none runs code, damaged ones are clear errors,
older pickled model files are refused and convertible, and resumed runs keep their history."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from must.checkpoint import OLD_FORMAT, build_model, load_model, model_spec, save_model
from must.cli import main
from must.config import TeachConfig, load_config
from must.errors import ConfigError
from must.stages.teach import teach
from must.training.module import NonFiniteLossError
from tiny import TINY_BACKBONE, TINY_MODEL, TINY_TRAIN_SECTION, tiny_data, tiny_steps

TINY = [*TINY_MODEL, *tiny_data(), *tiny_steps(2)]


class Payload:
    """Unpickling this creates the file ``path``: the stand-in for a shell command."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained teacher (with its run folder), its dataset, and malicious files."""
    root = tmp_path_factory.mktemp("safe")
    cache = root / "data"
    teacher = root / "teacher"
    teach(tiny_cfg(cache), teacher, progress=False)
    dataset = Path(json.loads((teacher / "summary.json").read_text())["info"]["training"][
        "segmentation"]["dataset"])  # fmt: skip
    sentinel = root / "SENTINEL"
    evil = root / "evil"
    evil.mkdir()
    # A torch (zip) file whose pickle runs code, and a bare pickle named like safetensors.
    torch.save({"format": OLD_FORMAT, "state_dict": {}, "x": Payload(sentinel)}, evil / "model.pt")
    (evil / "model.safetensors.bad").write_bytes(pickle.dumps(Payload(sentinel)))
    return {"root": root, "cache": cache, "teacher": teacher, "dataset": dataset,
            "sentinel": sentinel, "evil_pt": evil / "model.pt"}  # fmt: skip


def tiny_cfg(cache: Path, *extra: str) -> TeachConfig:
    return load_config(
        TeachConfig, "teach_segmentation_cpu", [*TINY, f"data.cache={cache}", *extra]
    )


def teach_args(w: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["teach", "teach_segmentation_cpu", "--out", str(out), "--quiet", *TINY,
            f"data.cache={w['cache']}", *extra]  # fmt: skip


def student_yaml(w: dict[str, Path], tmp_path: Path) -> Path:
    """A supervised multi-task config (no store needed) on the teacher's dataset."""
    cfg = {
        "data": {"image_size": 32, "datasets": [{"dataset": str(w["dataset"])}]},
        "model": {"backbone": TINY_BACKBONE},
        "loss": {"kind": "equal"},
        "train": TINY_TRAIN_SECTION,
    }
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def refused(capsys, argv: list[str], names: str, sentinel: Path, match: str = "") -> str:
    """Run the CLI: exit 2, one line naming ``names``, and the payload never ran."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert not sentinel.exists(), f"{argv}: the pickle payload ran"
    assert err.startswith("must: error:") and len(err.splitlines()) == 1, err
    assert names in err and "Traceback" not in err, err
    assert match.lower() in err.lower(), err
    return err


def plant(file: Path, source: Path) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, file)
    return file


def test_the_payload_runs_when_unpickled_so_the_checks_below_can_fail(world):
    torch.load(world["evil_pt"], weights_only=False)
    assert world["sentinel"].exists()
    world["sentinel"].unlink()


def test_no_verb_that_loads_a_model_runs_a_pickle(world, tmp_path, capsys):
    w, s = world, world["sentinel"]
    pt_dir = tmp_path / "ptdir"
    plant(pt_dir / "model.pt", w["evil_pt"])
    fake = plant(
        tmp_path / "fake" / "model.safetensors", w["evil_pt"].parent / "model.safetensors.bad"
    )
    evil_init = plant(tmp_path / "resnet.pt", w["evil_pt"])
    data = str(w["dataset"])
    for model in (pt_dir, w["evil_pt"], fake, fake.parent):
        shown = str(model / "model.pt") if model == pt_dir else str(model)
        refused(capsys, ["eval", str(model), "--data", data], shown, s)
        refused(capsys, ["label", "--teacher", str(model), "--images", data, "--out",
                         str(tmp_path / "store"), "--workers", "0"], shown, s)  # fmt: skip
        refused(capsys, ["export", str(model), "--out", str(tmp_path / "b.safetensors")], shown, s)
    assert "must convert-model" in refused(capsys, ["eval", str(pt_dir), "--data", data], "", s)
    for init in (pt_dir, fake, evil_init):
        shown = str(init / "model.pt") if init == pt_dir else str(init)
        refused(capsys, ["transfer", "transfer_cpu", "task=segmentation", "--backbone", str(init),
                         "--out", str(tmp_path / "tr"), "--quiet", *TINY,
                         f"data.cache={w['cache']}"], shown, s)  # fmt: skip
        refused(capsys, teach_args(w, tmp_path / "ti", f"init={init}"), shown, s)
        refused(capsys, ["train", str(student_yaml(w, tmp_path)), "--init", str(init), "--out",
                         str(tmp_path / "st"), "--quiet"], shown, s)  # fmt: skip
    refused(capsys, ["convert-model", str(pt_dir), "--out", str(tmp_path / "c")], "model.pt", s)


def test_no_resume_runs_a_pickle(world, tmp_path, capsys):
    w, s = world, world["sentinel"]
    last = w["evil_pt"]
    # A run folder being resumed whose last.ckpt is the payload: teach, train, pretrain.
    out = tmp_path / "teach"
    plant(out / "checkpoints" / "last.ckpt", last)
    refused(capsys, teach_args(w, out), "last.ckpt", s, "delete")
    out = tmp_path / "train"
    plant(out / "checkpoints" / "last.ckpt", last)
    refused(capsys, ["train", str(student_yaml(w, tmp_path)), "--out", str(out), "--quiet"],
            "last.ckpt", s)  # fmt: skip
    out = tmp_path / "simclr"
    plant(out / "checkpoints" / "last.ckpt", last)
    refused(capsys, ["pretrain", "simclr_cpu", "--out", str(out), "--quiet", *TINY_MODEL,
                     f"data.dataset={w['dataset']}", "data.image_size=32", "train.batch_size=4",
                     "train.max_steps=2", "train.val_every=2", "train.warmup_steps=1"], "last.ckpt", s)  # fmt: skip
    # A finished run whose best.ckpt (read after training) is the payload.
    out = tmp_path / "best"
    shutil.copytree(w["teacher"], out)
    for name in ("summary.json", "model.safetensors"):
        (out / name).unlink()
    plant(out / "checkpoints" / "best.ckpt", last)
    refused(capsys, teach_args(w, out), "best.ckpt", s)


def test_must_run_resuming_a_job_does_not_run_a_pickle(world, tmp_path, capsys):
    from test_experiment import tiny_experiment

    exp = tiny_experiment(tmp_path, stages=["teachers"], data_cache=str(world["cache"]))
    run = tmp_path / "run"
    plant(run / "teachers" / "classification" / "checkpoints" / "last.ckpt", world["evil_pt"])
    capsys.readouterr()
    assert main(["run", str(exp), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert not world["sentinel"].exists()
    assert "last.ckpt: refused" in err and "Traceback" not in err


def test_truncated_checkpoints_are_errors_naming_the_file(world, tmp_path, capsys):
    w, s = world, world["sentinel"]
    data = w["teacher"] / "model.safetensors"
    cut = tmp_path / "cut" / "model.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    refused(capsys, ["transfer", "transfer_cpu", "task=segmentation", "--backbone", str(cut),
                     "--out", str(tmp_path / "tr"), "--quiet", *TINY,
                     f"data.cache={w['cache']}"], str(cut), s)  # fmt: skip
    refused(capsys, teach_args(w, tmp_path / "ti", f"init={cut.parent}"), str(cut), s)
    refused(capsys, ["train", str(student_yaml(w, tmp_path)), "--init", str(cut), "--out",
                     str(tmp_path / "st"), "--quiet"], str(cut), s)  # fmt: skip
    refused(capsys, ["eval", str(cut), "--data", str(w["dataset"])], str(cut), s)
    # A truncated last.ckpt on resume: named, with how to go on.
    out = tmp_path / "resume"
    real = w["teacher"] / "checkpoints" / "last.ckpt"
    ckpt = out / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    refused(capsys, teach_args(w, out), str(ckpt), s, f"delete {ckpt.parent} to restart")


def test_an_older_model_file_is_refused_and_converts_to_the_same_model(world, tmp_path, capsys):
    model, payload = load_model(world["teacher"])
    old = tmp_path / "old"
    old.mkdir()
    # What earlier versions wrote: a torch pickle of the spec, info and state dict.
    torch.save({"format": OLD_FORMAT, **model_spec(model), "info": payload["info"],
                "state_dict": model.state_dict()}, old / "model.pt")  # fmt: skip
    with pytest.raises(ConfigError, match="convert-model"):
        load_model(old)
    assert main(["convert-model", str(old), "--out", str(tmp_path / "new")]) == 0
    again, info = load_model(tmp_path / "new")
    assert info["info"] == payload["info"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert summary["format"] == "must-model/2" and summary["tasks"] == payload["tasks"]


def test_the_model_file_is_safetensors_with_json_metadata(world):
    from safetensors import safe_open

    with safe_open(str(world["teacher"] / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "must-model/2"
    spec = json.loads(meta["must"])
    assert list(spec["tasks"]) == ["segmentation"] and spec["info"]["steps"] == 2
    model = build_model(spec)
    save_model(model, world["root"] / "again", spec["info"])
    assert load_model(world["root"] / "again")[1]["tasks"] == spec["tasks"]


def test_nan_stop_says_no_checkpoint_was_saved_when_none_was(world, tmp_path, monkeypatch):
    from must.tasks import segmentation

    original = segmentation.SegmentationHead.forward

    def poisoned(self, feats, image_size, target=None):
        preds, losses = original(self, feats, image_size, target)
        if target is not None:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return preds, losses

    monkeypatch.setattr(segmentation.SegmentationHead, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 0.*no checkpoint was saved") as err:
        teach(tiny_cfg(world["cache"]), tmp_path / "nan", progress=False)
    assert "is kept" not in str(err.value)


def metric_steps(out: Path) -> list[int]:
    """The steps of metrics.csv's training rows, in file order."""
    with (out / "logs" / "metrics.csv").open(newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_sigterm_stops_teach_quickly_and_the_resumed_run_keeps_its_history(world, tmp_path):
    out = tmp_path / "stopped"
    steps = ["train.max_steps=8", "train.val_every=4", "train.log_every=1"]
    args = [sys.executable, "-m", "must.cli", *teach_args(world, out, *steps)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists() and proc.poll() is None:
        time.sleep(0.05)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=30)[1]
    assert time.time() - sent < 10
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert (
        lines[-1].startswith("must: error: SIGTERM received") and "re-running resumes" in lines[-1]
    )
    assert "Traceback" not in err
    first = torch.load(last, map_location="cpu", weights_only=True)
    step = first["global_step"]
    seconds = next(v["seconds"] for k, v in first["callbacks"].items() if "TrainClock" in k)
    assert 0 < step < 8
    assert set(range(step)) <= set(metric_steps(out))  # the first invocation's rows

    summary = teach(tiny_cfg(world["cache"], *steps), out, progress=False)
    info = summary["info"]
    assert info["resumed_from_step"] == step and info["steps"] == 8
    assert info["train_seconds"] >= seconds
    assert metric_steps(out) == list(range(8))  # every step once: before and after the resume
