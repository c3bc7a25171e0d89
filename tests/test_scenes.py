"""The scene world: determinism and geometric truth against closed-form values."""

from __future__ import annotations

import numpy as np
import pytest

from must.data.scenes import Camera, Primitive, Scene, pitch_rotation, render, yaw_rotation
from must.data.styles import builtin_style_names, load_style, render_index

SIZE = 33  # odd, so the centre pixel's ray is the optical axis


def _scene(obj: Primitive | None, position, target, walls="none") -> Scene:
    return Scene(
        objects=[obj] if obj else [],
        camera=Camera(np.asarray(position, float), np.asarray(target, float), fov_deg=40.0),
        light_dir=np.array([0.0, 1.0, 0.0]),
        walls=walls,
    )


def _prim(shape, dims, center, rotation=None) -> Primitive:
    return Primitive(
        shape=shape,
        dims=dims,
        center=np.asarray(center, float),
        rotation=np.eye(3) if rotation is None else rotation,
        color=np.array([0.8, 0.2, 0.2]),
        color2=np.array([0.2, 0.2, 0.8]),
    )


def _render(scene: Scene):
    return render(scene, SIZE, SIZE, semantic_of_object=np.array([3], np.uint8))


C = SIZE // 2


def test_sphere_centre_pixel_depth_and_normal_match_closed_form():
    radius, dist = 0.5, 4.0
    s = _render(_scene(_prim("sphere", (radius,), (0, 1, 0)), (0, 1, -dist), (0, 1, 0)))
    assert s.depth[C, C] == pytest.approx(dist - radius, abs=1e-5)
    np.testing.assert_allclose(s.normals[C, C], [0, 0, -1], atol=1e-5)
    assert s.instances[C, C] == 1 and s.semantic[C, C] == 3


def test_sphere_off_axis_pixel_matches_ray_sphere_formula():
    # An independent computation of one off-centre pixel's hit from the camera model.
    radius, dist = 0.8, 3.0
    s = _render(_scene(_prim("sphere", (radius,), (0, 1, 0)), (0, 1, -dist), (0, 1, 0)))
    u, v = C + 4, C - 3
    focal = 0.5 * SIZE / np.tan(np.radians(20.0))
    ray = np.array([(u + 0.5 - SIZE / 2) / focal, (v + 0.5 - SIZE / 2) / focal, 1.0])
    # Camera frame = world frame here, except y points down.
    d = ray / np.linalg.norm(ray)
    o = np.array([0.0, 0.0, -dist])  # camera relative to the sphere centre, camera axes
    b = o @ d
    t = -b - np.sqrt(b * b - (o @ o - radius**2))
    p = o + t * d
    assert s.depth[v, u] == pytest.approx(p[2] + dist, abs=1e-5)
    np.testing.assert_allclose(s.normals[v, u], p / radius, atol=1e-5)


def test_box_face_depth_and_normal():
    s = _render(_scene(_prim("box", (1.0, 1.0, 0.6), (0, 1, 0)), (0, 1, -3), (0, 1, 0)))
    assert s.depth[C, C] == pytest.approx(3 - 0.3, abs=1e-5)
    np.testing.assert_allclose(s.normals[C, C], [0, 0, -1], atol=1e-6)


def test_cylinder_side_depth_and_normal():
    s = _render(_scene(_prim("cylinder", (0.4, 1.0), (0, 1, 0)), (0, 1, -3), (0, 1, 0)))
    assert s.depth[C, C] == pytest.approx(3 - 0.4, abs=1e-5)
    np.testing.assert_allclose(s.normals[C, C], [0, 0, -1], atol=1e-5)


def test_cone_side_depth_and_slanted_normal():
    r, h = 0.6, 1.2
    s = _render(_scene(_prim("cone", (r, h), (0, 1, 0)), (0, 1, -3), (0, 1, 0)))
    # At mid-height the cone's radius is r/2; its outward normal leans up by atan(r/h).
    assert s.depth[C, C] == pytest.approx(3 - r / 2, abs=1e-5)
    expected = np.array([0.0, -r / h, -1.0])  # camera y points down
    np.testing.assert_allclose(s.normals[C, C], expected / np.linalg.norm(expected), atol=1e-5)


def test_torus_tube_depth_and_normal():
    major, minor = 0.5, 0.15
    # A standing ring faces the camera; the centre pixel aims at the tube's top point.
    ring = _prim("torus", (major, minor), (0, 1, 0), rotation=pitch_rotation(np.pi / 2))
    s = _render(_scene(ring, (0, 1 + major, -3), (0, 1 + major, 0)))
    assert s.depth[C, C] == pytest.approx(3 - minor, abs=1e-4)
    np.testing.assert_allclose(s.normals[C, C], [0, 0, -1], atol=1e-3)
    # Through the hole the ray reaches nothing (no floor behind within view).
    hole = _render(_scene(ring, (0, 1, -3), (0, 1, 0)))
    assert hole.instances[C, C] == 0


def test_floor_depth_under_a_tilted_camera():
    height, pitch = 2.0, np.radians(30)
    target = (0, 0, height / np.tan(pitch))
    s = _render(_scene(None, (0, height, 0), target))
    assert s.depth[C, C] == pytest.approx(height / np.sin(pitch), abs=1e-5)
    # The floor's normal (world up) seen by a camera pitched down by 30 degrees.
    np.testing.assert_allclose(s.normals[C, C], [0, -np.cos(pitch), -np.sin(pitch)], atol=1e-6)
    assert s.semantic[C, C] == 1  # floor
    assert s.depth[0, C] == 0 and s.semantic[0, C] == 0  # above the horizon: background


def test_rotated_box_is_intersected_in_its_own_frame():
    # A box turned 90 degrees about y shows its depth-side to the camera.
    box = _prim("box", (1.0, 1.0, 0.4), (0, 1, 0), rotation=yaw_rotation(np.pi / 2))
    s = _render(_scene(box, (0, 1, -3), (0, 1, 0)))
    assert s.depth[C, C] == pytest.approx(3 - 0.5, abs=1e-5)


def test_floating_box_casts_a_shadow_straight_down():
    # Light from straight above; the camera's centre ray hits the floor point under the box
    # (the box floats above that point, off the camera ray).
    box = _prim("box", (0.6, 0.2, 0.6), (0, 1.4, 0))
    lit = _render(_scene(None, (0, 3, -3), (0, 0, 0)))
    shadowed = _render(_scene(box, (0, 3, -3), (0, 0, 0)))
    assert shadowed.instances[C, C] == 0 and shadowed.semantic[C, C] == 1
    assert shadowed.depth[C, C] == pytest.approx(lit.depth[C, C])
    assert int(shadowed.image[C, C].sum()) < int(lit.image[C, C].sum())


@pytest.mark.parametrize("name", ["objects", "cluttered", "rooms", "novel"])
def test_rendering_is_deterministic_per_seed_and_index(name):
    style = load_style(name)
    a, b = render_index(style, 7, 3, 48), render_index(style, 7, 3, 48)
    for field in ("image", "depth", "normals", "instances", "semantic", "boxes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = render_index(style, 7, 4, 48)
    assert not np.array_equal(a.image, c.image)
    d = render_index(style, 8, 3, 48)
    assert not np.array_equal(a.image, d.image)


@pytest.mark.parametrize("name", ["objects", "cluttered", "rooms", "depth", "novel"])
def test_labels_are_consistent_with_each_other(name):
    style = load_style(name)
    n_stuff = len(style.stuff)
    for index in range(4):
        s = render_index(style, 0, index, 48)
        hit = s.depth > 0
        norms = np.linalg.norm(s.normals, axis=-1)
        np.testing.assert_allclose(norms[hit], 1, atol=1e-4)
        assert np.all(norms[~hit] == 0)
        obj = s.instances > 0
        assert np.all(s.semantic[obj] >= n_stuff) and np.all(s.semantic[~obj] < n_stuff)
        for box, label, inst in zip(s.boxes, s.box_labels, s.box_instances, strict=True):
            mask = s.instances == inst
            ys, xs = np.nonzero(mask)
            # Tight: the box is exactly the visible pixels' extent (x2, y2 exclusive).
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(box.astype(int))
            assert mask.sum() >= style.min_box_pixels
            assert np.all(s.semantic[mask] == n_stuff + label)
        visible = np.bincount(s.instances.ravel())[1:]
        if visible.any():
            assert s.image_label >= 0
            # The image class is the category of the object with the most visible pixels.
            biggest = int(np.argmax(visible)) + 1
            assert s.semantic[s.instances == biggest][0] == n_stuff + s.image_label


def test_object_centric_style_makes_the_main_object_prominent():
    style = load_style("objects")
    shares = []
    for index in range(10):
        s = render_index(style, 0, index, 48)
        counts = np.bincount(s.instances.ravel())[1:]
        shares.append(counts.max() / s.instances.size)
    assert np.median(shares) > 0.08


def test_builtin_styles_cover_the_papers_roles_and_downstream_vocabulary_differs():
    names = set(builtin_style_names())
    assert {"objects", "cluttered", "rooms", "depth", "mixed", "novel"} <= names
    teacher = load_style("objects")
    novel = load_style("novel")
    assert set(novel.category_names).isdisjoint(teacher.category_names)
    assert set(novel.stuff).isdisjoint(teacher.stuff)
    assert "normals" in novel.tasks
    for name in ("cluttered", "rooms", "depth"):
        assert load_style(name).category_names == teacher.category_names
    assert load_style("mixed").tasks == []
