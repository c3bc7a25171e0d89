"""Model files written by several processes at once never share a temporary."""

from __future__ import annotations

from pathlib import Path

import pytest

import must.checkpoint as checkpoint
from must.checkpoint import load_model, save_model
from must.models.backbone import BackboneConfig
from must.models.model import MultiTaskModel
from must.tasks import build_task


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def tiny_model() -> MultiTaskModel:
    return MultiTaskModel(
        BackboneConfig(depth=10, widths=[8, 16, 32, 64], stem_width=8, fpn_channels=16),
        {"depth": build_task("depth", None)},
    )


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
