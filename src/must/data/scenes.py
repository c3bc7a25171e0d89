"""Procedural 3D scenes ray-cast in NumPy, with exactly derived labels.

A scene is a floor (optionally walls) with analytic primitives resting on it, seen by a
pinhole camera and lit by one directional light that casts shadows. Every label comes from
the same ray hits that colour the pixels, so it is exact: depth along the camera's z axis,
normals in camera coordinates, instance and semantic maps, tight boxes of visible pixels.

World frame: y up, the floor is the plane y = 0. Camera frame: OpenCV's (x right, y down,
z forward). Each object is intersected in its own local frame (centre at the origin, y up),
so shapes only need their canonical intersection code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from must.data.sample import SceneSample

EPS = 1e-4
SHAPES = ("sphere", "box", "cylinder", "cone", "torus")


@dataclass
class Primitive:
    """An analytic shape placed in the world.

    ``dims`` per shape (metres): sphere (radius,), box (width, height, depth),
    cylinder (radius, height), cone (radius, height; apex up), torus (major, minor; ring
    in the local xz plane).
    """

    shape: str
    dims: tuple[float, ...]
    center: np.ndarray  # (3,) world position of the local origin
    rotation: np.ndarray  # (3, 3) local -> world
    color: np.ndarray  # (3,) albedo in [0, 1]
    color2: np.ndarray  # (3,) second albedo for textures
    texture: str = "plain"
    texture_scale: float = 4.0
    category: int = 0

    def bounding_radius(self) -> float:
        d = self.dims
        if self.shape == "sphere":
            return d[0]
        if self.shape == "box":
            return 0.5 * float(np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2))
        if self.shape in ("cylinder", "cone"):
            return float(np.sqrt(d[0] ** 2 + (0.5 * d[1]) ** 2))
        return d[0] + d[1]  # torus

    def half_height(self) -> float:
        """Lowest local y below the origin after rotation (to rest the object on the floor)."""
        d = self.dims
        if self.shape == "sphere":
            return d[0]
        if self.shape == "torus":
            # The ring's extent along world y: minor radius plus the major radius times the
            # tilt of the ring's plane.
            tilt = float(np.hypot(self.rotation[1, 0], self.rotation[1, 2]))
            return d[1] + d[0] * tilt
        height = d[1]
        return 0.5 * height


@dataclass
class Camera:
    position: np.ndarray  # (3,)
    target: np.ndarray  # (3,)
    fov_deg: float  # vertical field of view

    def basis(self) -> np.ndarray:
        """Rows: right, down, forward (world coordinates) — the OpenCV camera axes."""
        forward = self.target - self.position
        forward = forward / np.linalg.norm(forward)
        right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
        right = right / np.linalg.norm(right)
        down = np.cross(forward, right)
        return np.stack([right, down, forward])


@dataclass
class Scene:
    objects: list[Primitive]
    camera: Camera
    light_dir: np.ndarray  # (3,) unit vector pointing towards the light
    light_intensity: float = 1.0
    ambient: float = 0.3
    specular: float = 0.2
    shininess: float = 32.0
    floor_extent: float = 8.0  # the floor is the square |x|, |z| <= extent
    walls: str = "none"  # none | back | room
    room_half_width: float = 4.0
    room_depth: float = 4.0  # back wall at z = room_depth
    wall_height: float = 3.0
    floor_color: np.ndarray = field(default_factory=lambda: np.array([0.6, 0.6, 0.6]))
    floor_color2: np.ndarray = field(default_factory=lambda: np.array([0.4, 0.4, 0.4]))
    floor_texture: str = "checker"
    wall_color: np.ndarray = field(default_factory=lambda: np.array([0.8, 0.78, 0.72]))
    wall_color2: np.ndarray = field(default_factory=lambda: np.array([0.7, 0.68, 0.6]))
    wall_texture: str = "plain"
    sky_top: np.ndarray = field(default_factory=lambda: np.array([0.55, 0.7, 0.9]))
    sky_bottom: np.ndarray = field(default_factory=lambda: np.array([0.85, 0.9, 0.95]))
    noise: float = 0.0


# Surface ids in the hit buffer; objects are 1..K.
NO_HIT, FLOOR, WALL = 0, -1, -2


def camera_rays(camera: Camera, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions (H*W, 3) in world coordinates, and each ray's cos to the optical axis."""
    focal = 0.5 * height / np.tan(np.radians(camera.fov_deg) / 2)
    xs = (np.arange(width, dtype=np.float64) + 0.5 - width / 2) / focal
    ys = (np.arange(height, dtype=np.float64) + 0.5 - height / 2) / focal
    gx, gy = np.meshgrid(xs, ys)
    cam = np.stack([gx.ravel(), gy.ravel(), np.ones(gx.size)], axis=1)
    norm = np.linalg.norm(cam, axis=1, keepdims=True)
    cam /= norm
    dirs = cam @ camera.basis()
    return dirs, cam[:, 2]


# --- intersections in the local frame: (origins (n,3), dirs (n,3)) -> (t (n,), normals (n,3)) ---
# Every function returns t = inf where the ray misses and only needs to give normals where t
# is finite.


def _sphere(o: np.ndarray, d: np.ndarray, dims) -> tuple[np.ndarray, np.ndarray]:
    (r,) = dims
    b = np.einsum("ij,ij->i", o, d)
    c = np.einsum("ij,ij->i", o, o) - r * r
    disc = b * b - c
    t = np.full(len(o), np.inf)
    ok = disc >= 0
    sq = np.sqrt(disc[ok])
    t0, t1 = -b[ok] - sq, -b[ok] + sq
    t[ok] = np.where(t0 > EPS, t0, np.where(t1 > EPS, t1, np.inf))
    p = o + d * np.where(np.isfinite(t), t, 0)[:, None]
    return t, p / r


def _box(o: np.ndarray, d: np.ndarray, dims) -> tuple[np.ndarray, np.ndarray]:
    half = 0.5 * np.asarray(dims)
    # Axis-parallel rays: a tiny direction component instead of 0 keeps the slabs finite.
    inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
    t1 = (-half - o) * inv
    t2 = (half - o) * inv
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    near = tmin.max(axis=1)
    far = tmax.min(axis=1)
    hit = (near <= far) & (far > EPS)
    t = np.where(hit, np.where(near > EPS, near, far), np.inf)
    # The normal is along the axis of the face hit: the one whose slab bound is closest.
    p = o + d * np.where(np.isfinite(t), t, 0)[:, None]
    rel = np.abs(p) / half
    axis = rel.argmax(axis=1)
    n = np.zeros_like(p)
    n[np.arange(len(p)), axis] = np.sign(p[np.arange(len(p)), axis])
    return t, n


def _cylinder(o: np.ndarray, d: np.ndarray, dims) -> tuple[np.ndarray, np.ndarray]:
    r, h = dims
    hh = 0.5 * h
    t = np.full(len(o), np.inf)
    n = np.zeros_like(o)
    # Side.
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - r * r
    disc = b * b - a * c
    ok = (disc >= 0) & (a > 1e-12)
    sq = np.sqrt(np.where(ok, disc, 0))
    safe_a = np.where(ok, a, 1)
    for root in ((-b - sq) / safe_a, (-b + sq) / safe_a):
        y = o[:, 1] + root * d[:, 1]
        good = ok & (root > EPS) & (np.abs(y) <= hh) & (root < t)
        t = np.where(good, root, t)
        side = o + d * root[:, None]
        side[:, 1] = 0
        n = np.where(good[:, None], side / r, n)
    # Caps.
    _caps(o, d, t, n, [(hh, r), (-hh, r)])
    return t, n


def _caps(o, d, t, n, caps) -> None:
    """Intersect horizontal discs (y, radius) in place, keeping the nearest hit."""
    with np.errstate(divide="ignore", invalid="ignore"):
        for y, radius in caps:
            tc = (y - o[:, 1]) / d[:, 1]
            px = o[:, 0] + tc * d[:, 0]
            pz = o[:, 2] + tc * d[:, 2]
            good = (tc > EPS) & (px * px + pz * pz <= radius * radius) & (tc < t)
            t[good] = tc[good]
            n[good] = (0.0, np.sign(y), 0.0)


def _cone(o: np.ndarray, d: np.ndarray, dims) -> tuple[np.ndarray, np.ndarray]:
    r, h = dims
    hh = 0.5 * h
    k2 = (r / h) ** 2
    t = np.full(len(o), np.inf)
    n = np.zeros_like(o)
    # Side: x^2 + z^2 = k^2 (hh - y)^2 for -hh <= y <= hh (apex at y = +hh).
    e = hh - o[:, 1]
    a = d[:, 0] ** 2 + d[:, 2] ** 2 - k2 * d[:, 1] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2] + k2 * e * d[:, 1]
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - k2 * e * e
    disc = b * b - a * c
    ok = (disc >= 0) & (np.abs(a) > 1e-12)
    sq = np.sqrt(np.where(ok, disc, 0))
    safe_a = np.where(ok, a, 1)
    for root in ((-b - sq) / safe_a, (-b + sq) / safe_a):
        y = o[:, 1] + root * d[:, 1]
        good = ok & (root > EPS) & (y >= -hh) & (y <= hh) & (root < t)
        t = np.where(good, root, t)
        p = o + d * root[:, None]
        grad = np.stack([p[:, 0], k2 * (hh - p[:, 1]), p[:, 2]], axis=1)
        grad /= np.linalg.norm(grad, axis=1, keepdims=True) + 1e-12
        n = np.where(good[:, None], grad, n)
    _caps(o, d, t, n, [(-hh, r)])
    return t, n


def _torus_sdf(p: np.ndarray, major: float, minor: float) -> np.ndarray:
    q = np.hypot(p[:, 0], p[:, 2]) - major
    return np.hypot(q, p[:, 1]) - minor


def _torus(o: np.ndarray, d: np.ndarray, dims) -> tuple[np.ndarray, np.ndarray]:
    """March the signed distance at fixed steps through the bounding sphere, then bisect.

    A closed-form quartic per ray is slow and fragile in NumPy; sampling the chord at
    steps shorter than the tube's radius finds the first entry for all but grazing rays
    in a single vectorised evaluation; bisection plus a secant step make it exact to ~1e-5 m.
    """
    major, minor = dims
    t = np.full(len(o), np.inf)
    n = np.zeros((len(o), 3))
    bound = major + minor
    b = np.einsum("ij,ij->i", o, d)
    c = np.einsum("ij,ij->i", o, o) - bound * bound
    disc = b * b - c
    cand = np.nonzero(disc >= 0)[0]
    if cand.size == 0:
        return t, n
    sq = np.sqrt(disc[cand])
    t0 = np.maximum(-b[cand] - sq, EPS)
    t1 = -b[cand] + sq
    # Steps of half the tube radius miss only chords that graze the outer 3% of the tube.
    steps = max(8, int(np.ceil(4 * bound / minor)) + 1)
    ts = t0[:, None] + (t1 - t0)[:, None] * np.linspace(0, 1, steps)[None]
    pts = o[cand, None, :] + d[cand, None, :] * ts[..., None]
    inside = _torus_sdf(pts.reshape(-1, 3), major, minor).reshape(ts.shape) < 0
    any_in = inside.any(axis=1)
    first = inside.argmax(axis=1)
    rows = np.nonzero(any_in & (first > 0))[0]
    lo = ts[rows, first[rows] - 1]
    hi = ts[rows, first[rows]]
    oc, dc = o[cand[rows]], d[cand[rows]]
    for _ in range(6):
        mid = 0.5 * (lo + hi)
        in_mid = _torus_sdf(oc + dc * mid[:, None], major, minor) < 0
        hi = np.where(in_mid, mid, hi)
        lo = np.where(in_mid, lo, mid)
    # One secant step on the distance finishes it (the bracket is now ~1/64 of a step).
    f_lo = _torus_sdf(oc + dc * lo[:, None], major, minor)
    f_hi = _torus_sdf(oc + dc * hi[:, None], major, minor)
    hi = lo + (hi - lo) * f_lo / np.maximum(f_lo - f_hi, 1e-12)
    p = oc + dc * hi[:, None]
    ring = p.copy()
    ring[:, 1] = 0
    ring *= major / (np.linalg.norm(ring, axis=1, keepdims=True) + 1e-12)
    nn = p - ring
    nn /= np.linalg.norm(nn, axis=1, keepdims=True) + 1e-12
    sel = cand[rows]
    t[sel] = hi
    n[sel] = nn
    return t, n


INTERSECT = {
    "sphere": _sphere,
    "box": _box,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
}


def _bounding_sphere_cull(
    objects: list[Primitive], o: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For every (object, ray): ``b`` = (o - c) . d and the discriminant of the ray against the
    object's bounding sphere, as (K, n) arrays from two matrix products for all objects at
    once (``o`` is one origin (3,) or one per ray (n, 3))."""
    centers = np.array([ob.center for ob in objects])
    radii2 = np.array([ob.bounding_radius() ** 2 for ob in objects])
    if o.ndim == 1:
        rel = o - centers
        b = rel @ d.T
        c = (np.einsum("kj,kj->k", rel, rel) - radii2)[:, None]
    else:
        b = np.einsum("ij,ij->i", o, d)[None] - centers @ d.T
        c = (
            np.einsum("ij,ij->i", o, o)[None]
            - 2 * centers @ o.T
            + (np.einsum("kj,kj->k", centers, centers) - radii2)[:, None]
        )
    return b, b * b - c


def _object_hits(
    obj: Primitive,
    o: np.ndarray,
    d: np.ndarray,
    t_max: np.ndarray,
    b: np.ndarray,
    disc: np.ndarray,
):
    """Hits of one object for rays that can still beat ``t_max``; returns (index, t, normal).

    ``b`` and ``disc`` are this object's row of :func:`_bounding_sphere_cull`: only rays that
    reach the bounding sphere before ``t_max`` are intersected with the shape itself.
    """
    idx = np.nonzero(disc >= 0)[0]
    sq = np.sqrt(disc[idx])
    idx = idx[(-b[idx] + sq > EPS) & (-b[idx] - sq < t_max[idx])]
    if idx.size == 0:
        return idx, np.empty(0), np.empty((0, 3))
    rot = obj.rotation
    rel = (o if o.ndim == 1 else o[idx]) - obj.center
    o_local = np.broadcast_to(rel @ rot, (len(idx), 3))  # rot.T @ v for each row
    d_local = d[idx] @ rot
    t, n_local = INTERSECT[obj.shape](o_local, d_local, obj.dims)
    keep = t < t_max[idx]
    return idx[keep], t[keep], n_local[keep] @ rot.T


def _planes(scene: Scene) -> list[tuple[int, np.ndarray, float]]:
    """(surface id, unit normal, offset) for n . p = offset, normals facing into the scene."""
    planes = [(FLOOR, np.array([0.0, 1.0, 0.0]), 0.0)]
    if scene.walls in ("back", "room"):
        planes.append((WALL, np.array([0.0, 0.0, -1.0]), -scene.room_depth))
    if scene.walls == "room":
        w = scene.room_half_width
        planes.append((WALL, np.array([1.0, 0.0, 0.0]), -w))
        planes.append((WALL, np.array([-1.0, 0.0, 0.0]), -w))
    return planes


def _trace(scene: Scene, o: np.ndarray, d: np.ndarray):
    """Nearest hit per ray: (t, surface id, world normal)."""
    n_rays = len(d)
    t = np.full(n_rays, np.inf)
    surface = np.zeros(n_rays, np.int32)
    normal = np.zeros((n_rays, 3))
    for sid, pn, off in _planes(scene):
        denom = d @ pn
        with np.errstate(divide="ignore", invalid="ignore"):
            tp = (off - o @ pn) / denom  # o is one camera origin
        good = (denom < -1e-9) & (tp > EPS) & (tp < t)
        p = o + d * np.where(good, tp, 0)[:, None]
        inside = np.abs(p[:, 0]) <= scene.floor_extent
        inside &= np.abs(p[:, 2]) <= scene.floor_extent
        if sid == WALL:
            inside &= p[:, 1] <= scene.wall_height
        good &= inside
        t[good] = tp[good]
        surface[good] = sid
        normal[good] = pn
    if not scene.objects:
        return t, surface, normal
    b, disc = _bounding_sphere_cull(scene.objects, o, d)
    for k, obj in enumerate(scene.objects, start=1):
        idx, tk, nk = _object_hits(obj, o, d, t, b[k - 1], disc[k - 1])
        t[idx] = tk
        surface[idx] = k
        normal[idx] = nk
    return t, surface, normal


def _in_shadow(scene: Scene, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    shadow = np.zeros(len(points), bool)
    if not scene.objects or not len(points):
        return shadow
    origins = points + normals * 1e-3
    dirs = np.broadcast_to(scene.light_dir, points.shape)
    t_max = np.full(len(points), np.inf)
    b, disc = _bounding_sphere_cull(scene.objects, origins, dirs)
    for k, obj in enumerate(scene.objects):
        idx, _, _ = _object_hits(obj, origins, dirs, t_max, b[k], disc[k])
        shadow[idx] = True
        t_max[idx] = -np.inf  # already in shadow: later objects need not test these rays
    return shadow


def _texture(kind: str, p: np.ndarray, scale: float) -> np.ndarray:
    """Blend factor in [0, 1] between a surface's two colours at local points ``p``."""
    if kind == "plain" or len(p) == 0:
        return np.zeros(len(p))
    q = p * scale
    if kind == "checker":
        return (np.floor(q).sum(axis=1) % 2).astype(float)
    if kind == "stripes":
        return (np.sin(np.pi * q[:, 1] + 0.5 * q[:, 0]) > 0).astype(float)
    if kind == "dots":
        s = np.sin(np.pi * q)
        return ((s[:, 0] * s[:, 1] * s[:, 2]) ** 2 > 0.15).astype(float)
    if kind == "marble":
        return 0.5 + 0.5 * np.sin(q[:, 0] + 3.0 * np.sin(0.7 * q[:, 1] + q[:, 2]))
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(2.5 * np.hypot(q[:, 0], q[:, 2]))
    raise ValueError(f"unknown texture {kind!r}")


TEXTURES = ("plain", "checker", "stripes", "dots", "marble", "rings")


def render(
    scene: Scene,
    height: int,
    width: int,
    *,
    semantic_of_object: np.ndarray,
    stuff_ids: tuple[int, int, int] = (0, 1, 2),
    min_box_pixels: int = 6,
    rng: np.random.Generator | None = None,
) -> SceneSample:
    """Ray-cast ``scene`` and derive every label from the same hits.

    ``semantic_of_object[c]`` maps object category c to its segmentation class;
    ``stuff_ids`` are the segmentation classes of (background, floor, wall).
    """
    dirs, cos_axis = camera_rays(scene.camera, height, width)
    origin = scene.camera.position
    t, surface, normal = _trace(scene, origin, dirs)
    hit = np.isfinite(t)
    points = origin + dirs * np.where(hit, t, 0)[:, None]

    # --- shading: ambient + Lambert + Blinn-Phong, shadows from the one light ---
    albedo = np.zeros((len(t), 3))
    sky_mix = np.clip(0.5 - 0.5 * dirs[:, 1], 0, 1)[:, None]
    colour = scene.sky_top * (1 - sky_mix) + scene.sky_bottom * sky_mix
    for sid, base, alt, kind, pscale in (
        (FLOOR, scene.floor_color, scene.floor_color2, scene.floor_texture, 1.0),
        (WALL, scene.wall_color, scene.wall_color2, scene.wall_texture, 1.5),
    ):
        m = surface == sid
        # Project onto the plane (the coordinate along the normal would otherwise flicker
        # around an integer and speckle the pattern); the floor's pattern lies in (x, z).
        p, nrm = points[m], normal[m]
        uvw = p - np.einsum("ij,ij->i", p, nrm)[:, None] * nrm
        if sid == FLOOR:
            uvw = uvw[:, [0, 2, 1]]
        f = _texture(kind, uvw, pscale)[:, None]
        albedo[m] = base * (1 - f) + alt * f
    for k, obj in enumerate(scene.objects, start=1):
        m = surface == k
        if m.any():
            local = (points[m] - obj.center) @ obj.rotation
            f = _texture(obj.texture, local, obj.texture_scale)[:, None]
            albedo[m] = obj.color * (1 - f) + obj.color2 * f
    hi = np.nonzero(hit)[0]
    n_hit = normal[hi]
    lam = np.clip(n_hit @ scene.light_dir, 0, None)
    lit = lam > 0
    # Only surfaces facing the light can be shadowed; skip shadow rays for the others.
    facing = np.nonzero(lit)[0]
    lit[facing] = ~_in_shadow(scene, points[hi[facing]], n_hit[facing])
    half = scene.light_dir - dirs[hi]
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    spec = scene.specular * np.clip(np.einsum("ij,ij->i", n_hit, half), 0, None) ** scene.shininess
    shade = scene.ambient + scene.light_intensity * lam * lit
    colour[hi] = albedo[hi] * shade[:, None] + (spec * lit * scene.light_intensity)[:, None]
    if scene.noise > 0 and rng is not None:
        colour = colour + rng.normal(0, scene.noise, colour.shape)
    image = (np.sqrt(np.clip(colour, 0, 1)) * 255 + 0.5).astype(np.uint8)  # gamma 2

    # --- labels ---
    basis = scene.camera.basis()
    depth = np.where(hit, t * cos_axis, 0.0).astype(np.float32)
    normals_cam = (normal @ basis.T).astype(np.float32)  # world -> camera (x right, y down, z fwd)
    instances = np.where(surface > 0, surface, 0).astype(np.int32)
    bg, floor_id, wall_id = stuff_ids
    semantic = np.full(len(t), bg, np.uint8)
    semantic[surface == FLOOR] = floor_id
    semantic[surface == WALL] = wall_id
    obj_mask = surface > 0
    cats = np.array([o.category for o in scene.objects], np.int64)
    if obj_mask.any():
        semantic[obj_mask] = semantic_of_object[cats[surface[obj_mask] - 1]]

    inst2d = instances.reshape(height, width)
    counts = np.bincount(instances, minlength=len(scene.objects) + 1)
    boxes, labels, ids = [], [], []
    for k in range(1, len(scene.objects) + 1):
        if counts[k] < min_box_pixels:
            continue
        m = inst2d == k
        rows = np.nonzero(m.any(axis=1))[0]
        cols = np.nonzero(m.any(axis=0))[0]
        boxes.append((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
        labels.append(cats[k - 1])
        ids.append(k)
    visible = counts[1:]
    image_label = int(cats[visible.argmax()]) if visible.size and visible.max() > 0 else -1
    return SceneSample(
        image=image.reshape(height, width, 3),
        depth=depth.reshape(height, width),
        normals=normals_cam.reshape(height, width, 3),
        instances=inst2d,
        semantic=semantic.reshape(height, width),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        box_labels=np.asarray(labels, np.int64),
        box_instances=np.asarray(ids, np.int32),
        image_label=image_label,
    )


def yaw_rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def pitch_rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
