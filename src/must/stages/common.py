"""What every training stage does the same way: claiming its output folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from must.checkpoint import MODEL_FILE, OLD_MODEL_FILE, SUMMARY_FILE
from must.config import same_run
from must.errors import ConfigError
from must.training.fit import CHECKPOINT_DIR

CONFIG_FILE = "config.yaml"


def claim_output(out: Path, config_text: str, overwrite: bool) -> bool:
    """Make ``out`` ours for this config. Returns True when that config already finished there.

    A folder holding another config is refused unless ``overwrite``, so a resumed run never
    mixes checkpoints of two different trainings.
    """
    config_file = out / CONFIG_FILE
    if config_file.exists():
        if same_run(yaml.safe_load(config_file.read_text()), yaml.safe_load(config_text)):
            if (out / SUMMARY_FILE).exists():
                return True
            if config_file.read_text() != config_text:
                config_file.write_text(config_text)  # resumed with the current settings
            return False
        if not overwrite:
            raise ConfigError(
                f"{out}: holds a run with another config ({config_file}); "
                "resume it with the same config, choose another --out, or pass --overwrite"
            )
        for name in (
            CHECKPOINT_DIR,
            "logs",
            "tensorboard",
            SUMMARY_FILE,
            MODEL_FILE,
            OLD_MODEL_FILE,
        ):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(config_text)
    return False
