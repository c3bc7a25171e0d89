"""Our model file: weights plus everything needed to rebuild and trust them.

``model.pt`` holds the backbone settings, each task's vocabulary and head settings, the
weights, and what the model was trained with (data, batch size, learning rate: MuST's loss
weights need the teachers' values) and its metrics. A checkpoint directory (what
``must teach`` writes) holds ``model.pt`` next to ``summary.json`` (the same information minus
the weights, for people and scripts).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from must.errors import ConfigError
from must.models.backbone import BackboneConfig, load_resnet_weights
from must.models.model import MultiTaskModel
from must.tasks import build_task

FORMAT = "must-model/1"
MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"


def model_spec(model: MultiTaskModel) -> dict[str, Any]:
    return {
        "backbone": model.backbone.config.model_dump(mode="json") | {"weights": None},
        "tasks": {name: task.describe() for name, task in model.tasks.items()},
    }


def build_model(spec: dict[str, Any]) -> MultiTaskModel:
    backbone = BackboneConfig.model_validate(spec["backbone"])
    tasks = {
        name: build_task(name, t.get("classes"), t.get("config", {}))
        for name, t in spec["tasks"].items()
    }
    return MultiTaskModel(backbone, tasks)


def save_model(model: MultiTaskModel, out_dir: str | Path, info: dict[str, Any]) -> Path:
    """Write ``model.pt`` and ``summary.json`` into ``out_dir`` (each via a temporary file)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **model_spec(model), "info": info}
    tmp = out_dir / f".{MODEL_FILE}.tmp"
    torch.save({**payload, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, out_dir / MODEL_FILE)
    summary = {**payload, "sha256": file_sha256(out_dir / MODEL_FILE)}
    tmp = out_dir / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out_dir / SUMMARY_FILE)
    return out_dir / MODEL_FILE


def resolve_model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path}: no model file (give a checkpoint directory written by must, or its model.pt)"
        )
    return path


def load_model(path: str | Path) -> tuple[MultiTaskModel, dict[str, Any]]:
    """Rebuild a model from ``model.pt`` (or a directory holding it); returns (model, payload)."""
    file = resolve_model_file(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # report any unreadable file with its path
        raise ConfigError(f"{file}: cannot read model file: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{file}: not a must model file (expected format {FORMAT})")
    model = build_model(payload)
    model.load_state_dict(payload["state_dict"])
    return model, {k: v for k, v in payload.items() if k != "state_dict"}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def initialise(model: MultiTaskModel, path: str, heads: bool = True) -> dict[str, Any]:
    """Start from a must checkpoint (backbone, and with ``heads`` the heads of tasks with the
    same name and shapes) or from a torchvision/timm ResNet state dict (backbone body only)."""
    file = Path(path)
    file = file / "model.pt" if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"init: {path}: no such checkpoint or weights file")
    payload = torch.load(file, map_location="cpu", weights_only=False)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        theirs = payload["state_dict"]
        own = model.state_dict()
        backbone = [k for k in own if k.startswith("backbone.")]
        bad = [k for k in backbone if k not in theirs or theirs[k].shape != own[k].shape]
        if bad:
            raise ConfigError(
                f"init: {file}: its backbone does not fit this model's (e.g. {bad[:3]}); "
                "check model.backbone"
            )
        head_keys = [
            k
            for k in own
            if heads and k.startswith("heads.") and k in theirs and theirs[k].shape == own[k].shape
        ]
        model.load_state_dict({k: theirs[k] for k in backbone + head_keys}, strict=False)
        tasks = sorted({k.split(".")[1] for k in head_keys})
        return {"from": str(file), "backbone": True, "heads": tasks}
    load_resnet_weights(model.backbone.body, file)
    return {"from": str(file), "backbone": "body only", "heads": []}
