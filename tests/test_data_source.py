"""One data-source value: a folder, or a style with its render recipe and cache, the same
for configs, experiments and command-line flags."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml

from must.cli import build_parser
from must.config import DataConfig, LabeledSetConfig
from must.data.source import DataSource, add_source_arguments, source_from_arguments
from must.errors import ConfigError
from must.stages.experiment import PoolConfig, TransferStage


def test_every_place_that_names_data_takes_the_same_fields():
    recipe = {"dataset": "objects", "num": 6, "render_size": 32, "render_seed": 3}
    for kind in (DataConfig, LabeledSetConfig, PoolConfig, TransferStage):
        source = kind(**recipe, cache="c")
        assert isinstance(source, DataSource)
        assert source.recipe_fields() == {**recipe, "splits": (0.8, 0.1, 0.1), "cache": "c"}


def test_a_style_rendered_from_a_config_is_reused_by_the_same_recipe_from_flags(tmp_path):
    cache = str(tmp_path / "cache")
    first = DataConfig(dataset="objects", num=5, render_size=32, render_seed=4, cache=cache)
    folder = first.prepare(progress=False)
    assert folder.name == "objects_n5_px32_seed4"
    manifest = folder / "manifest.json"
    stamp = manifest.stat().st_mtime_ns

    parser = argparse.ArgumentParser()
    add_source_arguments(parser)
    args = parser.parse_args(["--num", "5", "--render-size", "32", "--seed", "4", "--cache", cache])
    again = source_from_arguments("objects", args).prepare(progress=False)
    assert again == folder
    assert manifest.stat().st_mtime_ns == stamp  # read from the cache, not rendered again

    other = source_from_arguments("objects", parser.parse_args(["--render-seed", "5", "--num", "5",
                                  "--render-size", "32", "--cache", cache]))  # fmt: skip
    assert other.prepare(progress=False).name == "objects_n5_px32_seed5"


def test_split_fractions_are_part_of_the_recipe(tmp_path):
    cache = str(tmp_path / "cache")
    source = DataSource(dataset="objects", num=20, render_size=32, splits=(0.25, 0.25, 0.5),
                        cache=cache)  # fmt: skip
    folder = source.prepare(progress=False)
    assert folder.name == "objects_n20_px32_seed0_splits0.25-0.25-0.5"  # not the default's cache
    counts = {
        s: sum(f.is_file() for f in (folder / "images" / s).rglob("*"))
        for s in ("train", "val", "test")
    }
    assert counts == {"train": 5, "val": 5, "test": 10}
    parser = argparse.ArgumentParser()
    add_source_arguments(parser)
    flags = ["--num", "20", "--render-size", "32", "--splits", "0.25,0.25,0.5", "--cache", cache]
    assert source_from_arguments("objects", parser.parse_args(flags)).prepare(False) == folder
    with pytest.raises(ValueError, match="non-negative fractions"):
        DataSource(dataset="objects", splits=(0.5, -0.1, 0.6))


def test_eval_and_label_have_the_recipe_flags_with_their_defaults():
    parser = build_parser()
    ev = parser.parse_args(["eval", "ckpt", "--data", "novel", "--render-seed", "7"])
    assert (ev.num, ev.render_size, ev.render_seed, ev.cache) == (1000, 64, 7, "runs/data")
    lb = parser.parse_args(["label", "run", "--teacher", "t", "--images", "mixed", "--out", "o"])
    assert (lb.num, lb.render_size, lb.render_seed) == (2000, 64, 0)


def test_a_bad_recipe_flag_is_one_line_naming_the_flag():
    parser = argparse.ArgumentParser()
    add_source_arguments(parser)
    with pytest.raises(ConfigError, match=r"data objects:[\s\S]*--render-size"):
        source_from_arguments("objects", parser.parse_args(["--render-size", "8"]))
    with pytest.raises(ConfigError, match=r"--num"):
        source_from_arguments("objects", parser.parse_args(["--num", "0"]))


def test_a_style_file_is_a_style_and_a_description_file_a_dataset(tmp_path):
    style = tmp_path / "mine.yaml"
    style.write_text("name: mine\nextends: objects\n")
    folder = DataSource(dataset=str(style), num=4, render_size=32, cache=str(tmp_path)).prepare(
        progress=False
    )
    assert folder.name == "mine_n4_px32_seed0" and (folder / "manifest.json").is_file()
    described = tmp_path / "data.yaml"
    described.write_text(
        yaml.safe_dump({"splits": {"train": {"images": str(folder / "images/train")}}})
    )
    assert DataSource(dataset=str(described)).prepare() == described


def test_the_command_line_is_built_without_torch():
    # `must --help` and a mistyped verb answer at once: naming data needs no task module.
    code = "import sys, must.cli; must.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
