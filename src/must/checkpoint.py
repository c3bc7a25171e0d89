"""Our model file: weights plus everything needed to rebuild and trust them.

``model.safetensors`` holds the weights as safetensors; its header's metadata holds, as JSON,
the backbone settings, each task's vocabulary and head settings, and what the model was
trained with (data, batch size, learning rate: MuST's loss weights need the teachers' values)
and its metrics. Reading it never runs code: the header is parsed and its format tag checked
before any tensor is read, and safetensors holds nothing but tensors. A checkpoint directory
(what ``must teach`` writes) holds ``model.safetensors`` next to ``summary.json`` (the same
information minus the weights, for people and scripts).

Older versions wrote a pickled ``model.pt``; it is refused (unpickling a file from elsewhere can
run code) and :func:`convert_model` turns a trusted one into the new format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from must.errors import ConfigError
from must.files import (
    file_sha256,
    old_format_message,
    read_metadata,
    read_tensors,
    torch_load,
    write_atomic,
)
from must.models.backbone import RESNET, BackboneConfig
from must.models.model import MultiTaskModel
from must.summary import RunInfo
from must.tasks import build_task

FORMAT = "must-model/2"
OLD_FORMAT = "must-model/1"
MODEL_FILE = "model.safetensors"
OLD_MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"
# The safetensors metadata keys: the format tag, and the JSON payload (spec + info).
META_FORMAT = "format"
META_PAYLOAD = "must"


def model_spec(model: MultiTaskModel) -> dict[str, Any]:
    return {
        "backbone": model.backbone.config.spec(),
        "tasks": {name: task.describe() for name, task in model.tasks.items()},
    }


def build_model(spec: dict[str, Any]) -> MultiTaskModel:
    # A file without a backbone name (written before timm backbones) holds a ResNet.
    backbone = BackboneConfig.model_validate(spec["backbone"])
    tasks = {
        name: build_task(name, t.get("classes"), t.get("config", {}))
        for name, t in spec["tasks"].items()
    }
    return MultiTaskModel(backbone, tasks)


def save_model(model: MultiTaskModel, out_dir: str | Path, info: RunInfo | dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``summary.json`` into ``out_dir`` (each via a temporary
    file, so a killed run never leaves half a model). ``info``: what the run records."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = RunInfo.read(info, out_dir).to_json()
    payload = {"format": FORMAT, **model_spec(model), "info": info}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {META_FORMAT: FORMAT, META_PAYLOAD: json.dumps(payload)}
    model_file = out_dir / MODEL_FILE
    write_atomic(model_file, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    summary = {**payload, "sha256": file_sha256(model_file)}
    text = json.dumps(summary, indent=2) + "\n"
    write_atomic(out_dir / SUMMARY_FILE, lambda tmp: tmp.write_text(text))
    return model_file


def resolve_model_file(path: str | Path) -> Path:
    """The ``model.safetensors`` of a checkpoint directory, or the file itself. An older
    pickled ``model.pt`` is refused with how to convert it (it is not opened)."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file() and (path / OLD_MODEL_FILE).is_file():
            raise ConfigError(old_format_message(path / OLD_MODEL_FILE))
        path = path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path}: no model file (give a checkpoint directory written by must, or its "
            f"{MODEL_FILE})"
        )
    if path.suffix != ".safetensors":
        if path.suffix in (".pt", ".pth"):
            raise ConfigError(old_format_message(path))
        raise ConfigError(f"{path}: not a must model file (expected a {MODEL_FILE})")
    return path


def _must_payload(file: Path) -> dict[str, Any] | None:
    """The JSON payload of a must model file, None for other (plain) safetensors files."""
    meta = read_metadata(file) or {}
    if META_PAYLOAD not in meta:
        return None
    if meta.get(META_FORMAT) != FORMAT:
        raise ConfigError(
            f"{file}: model file format {meta.get(META_FORMAT)!r} is not {FORMAT!r} "
            "(written by another version of must)"
        )
    try:
        payload = json.loads(meta[META_PAYLOAD])
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: its metadata is not valid JSON: {err}") from err
    if not isinstance(payload, dict) or not {"backbone", "tasks"} <= payload.keys():
        raise ConfigError(f"{file}: its metadata lacks the backbone and task settings")
    return payload


def load_model(path: str | Path) -> tuple[MultiTaskModel, dict[str, Any]]:
    """Rebuild a model from ``model.safetensors`` (or a directory holding it); returns
    (model, payload): the payload is the metadata (format, backbone, tasks, info)."""
    file = resolve_model_file(path)
    payload = _must_payload(file)
    if payload is None:
        raise ConfigError(
            f"{file}: not a must model file (plain weights without must's metadata; such a "
            "file can start a backbone: --init, --backbone, model.backbone.weights)"
        )
    model = build_model(payload)
    _load_state(model, read_tensors(file), file)
    return model, payload


def _load_state(model: MultiTaskModel, state: dict[str, torch.Tensor], file: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"{file}: its weights do not fit its own settings: {first}") from err


def check_init(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """The file a starting point names and its must metadata (None for plain weights), read
    from its header only: run before a run folder is claimed, so a bad ``init`` leaves none."""
    file = Path(path)
    if file.is_dir():
        file = resolve_model_file(file)
    if not file.is_file():
        raise ConfigError(f"init: {path}: no such checkpoint or weights file")
    if file.suffix == ".safetensors":
        return file, _must_payload(file)
    return file, None


def initialise(model: MultiTaskModel, path: str, heads: bool = True) -> dict[str, Any]:
    """Start from a must checkpoint (backbone, and with ``heads`` the heads of tasks with the
    same name and shapes) or from a plain state dict of the backbone's body (torchvision/timm
    ResNet weights for the ResNet, the timm model's own for a timm backbone: safetensors, or
    ``.pt``/``.pth`` read with ``weights_only=True``)."""
    file, payload = check_init(path)
    if payload is None:
        model.backbone.load_weights(file)
        return {"from": str(file), "backbone": "body only", "heads": []}
    recorded = payload["backbone"] if isinstance(payload["backbone"], dict) else {}
    theirs_name = recorded.get("name", RESNET)
    if theirs_name != model.backbone.config.name:
        raise ConfigError(
            f"init: {file}: its backbone is {theirs_name!r}, this model's is "
            f"{model.backbone.config.name!r}; set model.backbone.name={theirs_name} (and the "
            "same sizes) to start from it"
        )
    theirs = read_tensors(file)
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


def convert_model(old: str | Path, out: str | Path) -> Path:
    """Write a trusted older ``model.pt`` (a file or a directory holding one) in the current
    format into ``out``. The old file is read with ``weights_only=True`` (its payload is plain
    values and tensors), so even this never runs code from it."""
    old = Path(old)
    file = old / OLD_MODEL_FILE if old.is_dir() else old
    if not file.is_file():
        raise ConfigError(f"{file}: no such model file")
    payload = torch_load(file, "model file")
    if not isinstance(payload, dict) or payload.get("format") != OLD_FORMAT:
        raise ConfigError(f"{file}: not an older must model file (format {OLD_FORMAT})")
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise ConfigError(f"{file}: holds no state_dict")
    model = build_model(payload)
    _load_state(model, state, file)
    return save_model(model, out, payload.get("info", {}))
