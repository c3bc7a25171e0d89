"""Styles (domains) of the scene world, defined in YAML and validated with pydantic.

A style says which objects exist (its label vocabulary), how they are laid out, how the
camera and light are drawn, which palettes and textures are used, and which tasks it labels.
Built-in styles live next to this file (``styles/*.yaml``); a user style is a YAML file with
the same fields, optionally ``extends:`` another style and overriding some fields.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from must.data.sample import SceneSample
from must.data.scenes import (
    SHAPES,
    TEXTURES,
    Camera,
    Primitive,
    Scene,
    pitch_rotation,
    render,
    yaw_rotation,
)
from must.data.spec import TASKS
from must.errors import ConfigError, describe_validation_error
from must.extends import resolve_extends
from must.tasks import TASK_TYPES

Range = tuple[float, float]
RGB = tuple[float, float, float]
SHAPE_DIMS = {
    "sphere": ("radius",),
    "box": ("width", "height", "depth"),
    "cylinder": ("radius", "height"),
    "cone": ("radius", "height"),
    "torus": ("major", "minor"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_range(r: Range, what: str) -> None:
    if r[0] > r[1]:
        raise ValueError(f"{what}: low {r[0]} is above high {r[1]}")


class CategorySpec(_Strict):
    name: str
    shape: Literal["sphere", "box", "cylinder", "cone", "torus"]
    dims: dict[str, Range]
    cube: bool = False  # box: all sides take the drawn width
    standing: float = Field(0.0, ge=0, le=1)  # torus: probability the ring stands upright
    colors: list[RGB] | None = None  # overrides the style's object palette
    textures: dict[str, float] | None = None  # overrides the style's object textures

    @model_validator(mode="after")
    def _dims_match_shape(self) -> CategorySpec:
        want = set(SHAPE_DIMS[self.shape])
        if self.shape == "box" and self.cube:
            want = {"width"}
        got = set(self.dims)
        if got != want:
            raise ValueError(
                f"category {self.name!r} ({self.shape}) needs dims {sorted(want)}, got {sorted(got)}"
            )
        for k, r in self.dims.items():
            _check_range(r, f"dims.{k}")
            if r[0] <= 0:
                raise ValueError(f"dims.{k} must be positive")
        return self


class ObjectsSpec(_Strict):
    count: tuple[int, int] = (3, 6)
    area: float = Field(2.0, gt=0)  # objects are placed with |x|, |z| <= area
    scale: Range = (1.0, 1.0)  # multiplies every drawn dimension
    # Object-centric styles: the first object is enlarged, placed at the origin, and the
    # camera aims at it, so it is the most prominent object.
    main_scale: float | None = None


class CameraSpec(_Strict):
    distance: Range = (3.5, 5.5)
    elevation: Range = (15.0, 40.0)  # degrees above the horizon
    azimuth: Range = (-40.0, 40.0)  # degrees around the vertical axis, 0 = looking along +z
    fov: Range = (40.0, 60.0)  # vertical field of view, degrees
    target_jitter: float = 0.3
    target_height: Range = (0.2, 0.5)


class LightSpec(_Strict):
    elevation: Range = (35.0, 70.0)
    azimuth: Range = (-120.0, 120.0)
    intensity: Range = (0.8, 1.1)
    ambient: Range = (0.2, 0.35)
    specular: Range = (0.1, 0.3)
    shininess: float = 32.0


class RoomSpec(_Strict):
    walls: Literal["none", "back", "room"] = "none"
    half_width: Range = (3.0, 4.0)
    depth: Range = (3.0, 4.0)
    wall_height: Range = (2.5, 3.5)
    floor_extent: float = 8.0


class PaletteSpec(_Strict):
    objects: list[RGB]
    floor: list[RGB]
    wall: list[RGB]
    sky: list[RGB]


class TextureSpec(_Strict):
    objects: dict[str, float] = {"plain": 1.0}
    floor: dict[str, float] = {"checker": 1.0}
    wall: dict[str, float] = {"plain": 1.0}
    scale: Range = (3.0, 6.0)

    @model_validator(mode="after")
    def _known(self) -> TextureSpec:
        for part in ("objects", "floor", "wall"):
            for name in getattr(self, part):
                if name not in TEXTURES:
                    raise ValueError(f"{part}: unknown texture {name!r}; known: {TEXTURES}")
        return self


class Style(_Strict):
    name: str
    description: str
    tasks: list[str]  # registered task names (must.tasks)
    # A mixed style draws each image from one of these styles (they must share categories).
    mix: list[str] = []
    categories: list[CategorySpec] = []
    stuff: tuple[str, str, str] = ("background", "floor", "wall")
    objects: ObjectsSpec = ObjectsSpec()
    camera: CameraSpec = CameraSpec()
    light: LightSpec = LightSpec()
    room: RoomSpec = RoomSpec()
    palette: PaletteSpec | None = None
    textures: TextureSpec = TextureSpec()
    noise: float = Field(0.01, ge=0)
    min_box_pixels: int = Field(6, ge=1)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
        return tasks

    @model_validator(mode="after")
    def _complete(self) -> Style:
        if not self.mix:
            if not self.categories:
                raise ValueError("a style needs categories (or mix)")
            if self.palette is None:
                raise ValueError("a style needs a palette (or mix)")
        names = [c.name for c in self.categories]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate category names in {names}")
        return self

    # --- vocabularies ---
    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def segmentation_classes(self) -> list[str]:
        return list(self.stuff) + self.category_names

    def classes(self) -> dict[str, list[str]]:
        """Each task's class names in this style: the vocabulary its task says its rendered
        labels index (``Task.scene_vocabulary``); tasks without classes have none."""
        vocabularies = {
            "categories": self.category_names,
            "stuff_and_categories": self.segmentation_classes,
        }
        return {
            name: vocabularies[kind.scene_vocabulary]
            for name, kind in TASK_TYPES.items()
            if kind.scene_vocabulary is not None
        }


def builtin_style_names() -> list[str]:
    root = resources.files("must.data") / "styles"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def rendered_tasks() -> list[str]:
    """The registered tasks some built-in style labels (the scene world renders them), in
    registration order."""
    labelled = {t for name in builtin_style_names() for t in load_style(name).tasks}
    return [t for t in TASKS if t in labelled]


def _raw_style(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        where = str(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read style file: {err}") from err
    else:
        res = resources.files("must.data") / "styles" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"unknown style {name_or_path!r}; built-in styles: "
                f"{', '.join(builtin_style_names())} (or give a path to a style YAML file)"
            )
        where, text = f"style {name_or_path}", res.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a style must be a mapping of fields")
    return raw, where


@lru_cache(maxsize=64)
def load_style(name_or_path: str) -> Style:
    """A built-in style by name, or a style YAML file by path; errors name the bad field."""
    raw, where = _raw_style(name_or_path)
    if "name" not in raw:
        raise ConfigError(f"{where}: a style needs a 'name' (it also seeds the rendering)")
    raw = resolve_extends(raw, where, lambda name, _: _raw_style(name))
    try:
        style = Style.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{where}: invalid style:\n{describe_validation_error(err)}") from err
    if style.mix:
        parts = [load_style(m) for m in style.mix]
        vocab = parts[0].category_names
        for p in parts[1:]:
            if p.category_names != vocab:
                raise ConfigError(
                    f"{where}: mixed styles must share categories; "
                    f"{parts[0].name} has {vocab}, {p.name} has {p.category_names}"
                )
        style = style.model_copy(update={"categories": parts[0].categories})
    return style


# --- drawing a scene from a style ---


def _u(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _colour(rng: np.random.Generator, palette: list[RGB]) -> np.ndarray:
    base = np.array(palette[int(rng.integers(len(palette)))], float)
    return np.clip(base + rng.normal(0, 0.04, 3), 0, 1)


def _second_colour(rng: np.random.Generator, base: np.ndarray, palette: list[RGB]) -> np.ndarray:
    # Textures blend the base colour with a darker/lighter shade or another palette colour.
    if rng.random() < 0.5:
        return np.clip(base * _u(rng, (0.45, 0.75)), 0, 1)
    return _colour(rng, palette)


def _make_object(rng: np.random.Generator, style: Style, cat: int, scale: float) -> Primitive:
    spec = style.categories[cat]
    draw = {k: _u(rng, r) * scale for k, r in spec.dims.items()}
    if spec.shape == "box" and spec.cube:
        dims = (draw["width"],) * 3
    else:
        dims = tuple(draw[k] for k in SHAPE_DIMS[spec.shape])
    rotation = yaw_rotation(_u(rng, (0, 2 * np.pi)))
    if spec.shape == "torus" and rng.random() < spec.standing:
        rotation = rotation @ pitch_rotation(np.pi / 2)
    assert style.palette is not None
    palette = spec.colors or style.palette.objects
    color = _colour(rng, palette)
    return Primitive(
        shape=spec.shape,
        dims=dims,
        center=np.zeros(3),
        rotation=rotation,
        color=color,
        color2=_second_colour(rng, color, palette),
        texture=_pick(rng, spec.textures or style.textures.objects),
        texture_scale=_u(rng, style.textures.scale),
        category=cat,
    )


def sample_scene(style: Style, rng: np.random.Generator) -> Scene:
    """Draw one scene of ``style`` (a non-mixed style) from ``rng``."""
    o = style.objects
    n_objects = int(rng.integers(o.count[0], o.count[1] + 1))
    objects: list[Primitive] = []
    footprints: list[tuple[float, float, float]] = []
    for i in range(n_objects):
        cat = int(rng.integers(len(style.categories)))
        main = i == 0 and o.main_scale is not None
        scale = _u(rng, o.scale) * (o.main_scale if main else 1.0)
        obj = _make_object(rng, style, cat, scale)
        radius = obj.bounding_radius()
        # Rejection sampling for positions whose footprints do not overlap.
        for _ in range(20):
            x, z = (0.0, 0.0) if main else (_u(rng, (-o.area, o.area)), _u(rng, (-o.area, o.area)))
            if all(np.hypot(x - fx, z - fz) > radius + fr for fx, fz, fr in footprints):
                break
        else:
            continue
        footprints.append((x, z, radius))
        obj.center = np.array([x, obj.half_height(), z])
        objects.append(obj)

    cam = style.camera
    if o.main_scale is not None and objects:
        main_obj = objects[0]
        target = main_obj.center.copy()
        distance = _u(rng, cam.distance) * max(main_obj.bounding_radius(), 0.3)
    else:
        j = cam.target_jitter
        target = np.array([_u(rng, (-j, j)), _u(rng, cam.target_height), _u(rng, (-j, j))])
        distance = _u(rng, cam.distance)
    el, az = np.radians(_u(rng, cam.elevation)), np.radians(_u(rng, cam.azimuth))
    offset = np.array([np.sin(az) * np.cos(el), np.sin(el), -np.cos(az) * np.cos(el)])
    camera = Camera(position=target + distance * offset, target=target, fov_deg=_u(rng, cam.fov))

    li = style.light
    lel, laz = np.radians(_u(rng, li.elevation)), np.radians(_u(rng, li.azimuth))
    light_dir = np.array([np.sin(laz) * np.cos(lel), np.sin(lel), -np.cos(laz) * np.cos(lel)])
    pal = style.palette
    assert pal is not None
    floor = _colour(rng, pal.floor)
    wall = _colour(rng, pal.wall)
    sky_i = int(rng.integers(len(pal.sky)))
    room = style.room
    return Scene(
        objects=objects,
        camera=camera,
        light_dir=light_dir / np.linalg.norm(light_dir),
        light_intensity=_u(rng, li.intensity),
        ambient=_u(rng, li.ambient),
        specular=_u(rng, li.specular),
        shininess=li.shininess,
        floor_extent=room.floor_extent,
        walls=room.walls,
        room_half_width=_u(rng, room.half_width),
        room_depth=_u(rng, room.depth),
        wall_height=_u(rng, room.wall_height),
        floor_color=floor,
        floor_color2=_second_colour(rng, floor, pal.floor),
        floor_texture=_pick(rng, style.textures.floor),
        wall_color=wall,
        wall_color2=_second_colour(rng, wall, pal.wall),
        wall_texture=_pick(rng, style.textures.wall),
        sky_top=np.array(pal.sky[sky_i], float),
        sky_bottom=np.clip(np.array(pal.sky[sky_i], float) * 1.15 + 0.1, 0, 1),
        noise=style.noise,
    )


def _seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def render_index(style: Style, seed: int, index: int, size: int | tuple[int, int]) -> SceneSample:
    """Render image ``index`` of ``style``: deterministic in (style, seed, index, size) alone,
    so any worker can render any index and results do not depend on worker count."""
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng([seed, index, _seed_of(style.name)])
    if style.mix:
        style = load_style(style.mix[int(rng.integers(len(style.mix)))])
    semantic_of_object = np.arange(len(style.categories), dtype=np.uint8) + len(style.stuff)
    # A few redraws keep images with no visible object out of datasets that need one.
    for _ in range(10):
        scene = sample_scene(style, rng)
        sample = render(
            scene,
            height,
            width,
            semantic_of_object=semantic_of_object,
            min_box_pixels=style.min_box_pixels,
            rng=rng,
        )
        if sample.image_label >= 0 and len(sample.boxes):
            return sample
    return sample


__all__ = [
    "SHAPES",
    "TASKS",
    "Style",
    "builtin_style_names",
    "load_style",
    "render_index",
    "rendered_tasks",
    "sample_scene",
]
