"""YAML files that build on others: ``extends: PARENT`` fills in what a file leaves out. One
home for configs and scene-world styles alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from must.errors import ConfigError


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; nested mappings merge key by key (styles, configs)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def resolve_extends(
    raw: dict[str, Any], where: str, read: Callable[[str, str], tuple[dict[str, Any], str]]
) -> dict[str, Any]:
    """``raw`` with its ``extends`` chain merged under it: each parent fills in what its child
    leaves out, the child's own values win. ``read(name, child_where)`` returns a parent's
    mapping and where it came from; a cycle is refused naming the files."""
    chain = [where]
    raw = dict(raw)
    child = where
    while (parent_name := raw.pop("extends", None)) is not None:
        if not isinstance(parent_name, str) or not parent_name:
            raise ConfigError(
                f"{child}: 'extends' must name one file or preset, not {parent_name!r}"
            )
        parent, parent_where = read(parent_name, child)
        if parent_where in chain:
            raise ConfigError(f"{where}: 'extends' forms a cycle through {parent_where}")
        chain.append(parent_where)
        raw = deep_merge(parent, raw)
        child = parent_where
    return raw
