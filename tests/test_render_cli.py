"""`must data ...` end to end: render, read back, worker-count independence, resume rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from must.cli import main
from must.data.readers import MultiTaskDataset
from must.data.render import render_dataset, split_ranges
from must.data.styles import builtin_style_names, load_style, render_index
from must.errors import ConfigError


def test_styles_lists_every_style_with_a_description(capsys):
    assert main(["data", "styles"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == builtin_style_names()
    for line in lines:
        name, description = line.split(maxsplit=1)
        assert description == load_style(name).description


def test_render_show_check_round_trip(tmp_path, capsys):
    out = tmp_path / "novel"
    args = ["data", "render", "--style", "novel", "--num", "10", "--size", "40", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "val", "test"}
    data = MultiTaskDataset(out, split="train")
    assert data.tasks == ["classification", "detection", "segmentation", "depth", "normals"]
    style = load_style("novel")
    assert data.classes["segmentation"] == style.segmentation_classes
    # Image 0 on disk is exactly the renderer's image 0, with its labels.
    sample = data[data.keys.index("novel_000000")]
    truth = render_index(style, 0, 0, 40)
    np.testing.assert_array_equal(sample["image"].permute(1, 2, 0).numpy(), truth.image)
    np.testing.assert_array_equal(sample["segmentation"].numpy(), truth.semantic)
    np.testing.assert_allclose(sample["depth"][0].numpy(), truth.depth, atol=0.5e-3 + 1e-6)
    np.testing.assert_array_equal(sample["boxes"].numpy(), truth.boxes)
    assert int(sample["classification"]) == truth.image_label
    assert main(["data", "show", str(out), "--num", "3", "--out", str(tmp_path / "p.png")]) == 0
    assert Image.open(tmp_path / "p.png").size[0] > 3 * 40
    assert main(["data", "check", str(out), "--split", "val"]) == 0
    assert "nothing skipped" in capsys.readouterr().out


def test_rendered_files_do_not_depend_on_worker_count(tmp_path):
    a = render_dataset("cluttered", tmp_path / "a", 12, 32, workers=0, progress=False)
    b = render_dataset("cluttered", tmp_path / "b", 12, 32, workers=2, progress=False)
    files_a = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*.png"))
    files_b = sorted(p.relative_to(b.parent) for p in b.parent.rglob("*.png"))
    assert files_a == files_b and files_a
    for rel in files_a:
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes()
    assert (a.parent / "detection" / "train.json").read_text() == (
        b.parent / "detection" / "train.json"
    ).read_text()


def test_finished_render_is_kept_and_other_settings_are_refused(tmp_path):
    out = tmp_path / "d"
    manifest = render_dataset("depth", out, 6, 32, progress=False)
    stamp = manifest.stat().st_mtime_ns
    assert render_dataset("depth", out, 6, 32, progress=False).stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match=r"other settings.*--overwrite"):
        render_dataset("depth", out, 6, 48, progress=False)
    render_dataset("depth", out, 6, 48, overwrite=True, progress=False)
    assert Image.open(next((out / "images" / "train").iterdir())).size == (48, 48)


def test_split_ranges_are_consecutive_and_cover_every_index():
    ranges = split_ranges(10, [0.8, 0.1, 0.1])
    assert [list(r) for r in ranges.values()] == [list(range(8)), [8], [9]]
    assert set(split_ranges(3, [1, 0, 0])) == {"train"}


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    assert main(["data", "render", "--style", "nope", "--num", "2", "--out", str(tmp_path)]) == 2
    assert "unknown style 'nope'" in capsys.readouterr().err
    assert main(["data", "show", str(tmp_path / "missing")]) == 2
    assert "no dataset description" in capsys.readouterr().err
