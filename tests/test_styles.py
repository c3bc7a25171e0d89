"""Style files: validation errors name the file and the key; users extend built-in styles."""

from __future__ import annotations

import numpy as np
import pytest

from must.data.styles import load_style, render_index
from must.errors import ConfigError


def _write(tmp_path, text: str, name: str = "mine.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_user_style_extends_a_builtin_and_overrides_fields(tmp_path):
    path = _write(
        tmp_path,
        """
name: sparse-novel
extends: novel
description: novel objects, one or two per image
objects: {count: [1, 2]}
""",
    )
    style = load_style(path)
    novel = load_style("novel")
    assert style.objects.count == (1, 2)
    assert style.category_names == novel.category_names  # inherited
    assert style.objects.area == novel.objects.area  # nested fields merge, not replace
    sample = render_index(style, 0, 0, 32)
    assert 1 <= len(np.unique(sample.instances)) - 1 <= 2


def test_misspelled_key_is_named(tmp_path):
    path = _write(
        tmp_path, "name: x\nextends: novel\ndescription: d\ncamera: {fov_deg: [30, 40]}\n"
    )
    with pytest.raises(ConfigError, match=r"mine\.yaml.*\n.*camera\.fov_deg"):
        load_style(path)


def test_dims_must_match_the_shape(tmp_path):
    path = _write(
        tmp_path,
        """
name: x
extends: novel
description: d
categories:
  - {name: blob, shape: sphere, dims: {width: [0.1, 0.2]}}
""",
    )
    with pytest.raises(ConfigError, match=r"categories\.0.*needs dims \['radius'\]"):
        load_style(path)


def test_inverted_range_and_unknown_texture_are_refused(tmp_path):
    bad_range = _write(
        tmp_path,
        "name: x\nextends: novel\ndescription: d\n"
        "categories: [{name: b, shape: sphere, dims: {radius: [0.5, 0.1]}}]\n",
    )
    with pytest.raises(ConfigError, match=r"low 0\.5 is above high 0\.1"):
        load_style(bad_range)
    bad_texture = _write(
        tmp_path,
        "name: y\nextends: novel\ndescription: d\ntextures: {floor: {plaid: 1}}\n",
        "t.yaml",
    )
    with pytest.raises(ConfigError, match="unknown texture 'plaid'"):
        load_style(bad_texture)


def test_unknown_style_lists_the_builtin_ones():
    with pytest.raises(ConfigError, match=r"unknown style 'nope'.*novel"):
        load_style("nope")


def test_extends_cycle_is_refused(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(f"name: a\nextends: {b}\ndescription: d\n")
    b.write_text(f"name: b\nextends: {a}\ndescription: d\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_style(str(a))


def test_mixed_style_needs_a_shared_vocabulary(tmp_path):
    path = _write(tmp_path, "name: m\ndescription: d\ntasks: []\nmix: [objects, novel]\n")
    with pytest.raises(ConfigError, match="must share categories"):
        load_style(path)
