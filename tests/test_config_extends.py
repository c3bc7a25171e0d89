"""Configs that build on a base (``extends:``): the parent fills in, the child wins, errors
name the files."""

from __future__ import annotations

import pytest

from must.config import TeachConfig, load_config
from must.errors import ConfigError

BASE = """\
model:
  backbone: {depth: 18, widths: [8, 16, 32, 64], stem_width: 8, fpn_channels: 16}
  heads:
    detection: {levels: [p2, p3], fc_dim: 32}
train: {lr: 0.5, batch_size: 4}
data: {dataset: novel}
"""


def test_a_child_inherits_what_it_leaves_out_and_its_own_keys_win(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\ntask: detection\ntrain: {lr: 0.1}\n"
        "model:\n  heads:\n    detection: {fc_dim: 64}\n"
    )
    cfg = load_config(TeachConfig, tmp_path / "child.yaml")
    assert cfg.train.lr == 0.1  # the child's
    assert cfg.train.batch_size == 4  # the parent's, merged key by key
    assert list(cfg.model.backbone.widths) == [8, 16, 32, 64]
    assert cfg.model.heads["detection"] == {"levels": ["p2", "p3"], "fc_dim": 64}


def test_a_chain_of_parents_and_a_preset_base_by_name(tmp_path):
    (tmp_path / "middle.yaml").write_text(
        "extends: base/cpu_detection\ntrain: {lr: 0.3}\ndata: {dataset: novel}\n"
    )
    (tmp_path / "child.yaml").write_text("extends: middle.yaml\ntask: classification\n")
    cfg = load_config(TeachConfig, tmp_path / "child.yaml", ["train.lr=0.2"])
    assert cfg.train.lr == 0.2  # the command line over the whole chain
    assert cfg.model.backbone.stem_width == 32  # from base/cpu, two levels up
    assert cfg.model.heads["detection"]["levels"] == ["p2", "p3", "p4"]


def test_every_preset_that_extends_a_base_equals_the_base_plus_its_own_keys():
    # The presets say their backbone once, in configs/base: a teacher and the student of one
    # scale must train the same body, or the student could not start from a teacher.
    for scale in ("cpu", "gpu"):
        names = [f"teach_{t}_{scale}" for t in ("classification", "segmentation", "depth")]
        configs = [load_config(TeachConfig, n) for n in [*names, f"teach_detection_{scale}"]]
        assert len({c.model.backbone.model_dump_json() for c in configs}) == 1


def test_a_cycle_is_refused_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\ntask: depth\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\ndata: {dataset: novel}\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: 'extends' forms a cycle through .*a\.yaml"):
        load_config(TeachConfig, tmp_path / "a.yaml")


def test_a_missing_parent_is_refused_naming_the_child(tmp_path):
    (tmp_path / "a.yaml").write_text("task: depth\nextends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: extends 'nowhere\.yaml': no such file"):
        load_config(TeachConfig, tmp_path / "a.yaml")


def test_a_bad_key_from_the_parent_is_named_by_its_path(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {lrr: 0.5}\ndata: {dataset: novel}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntask: depth\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: invalid config:[\s\S]*train\.lrr"):
        load_config(TeachConfig, tmp_path / "child.yaml")
