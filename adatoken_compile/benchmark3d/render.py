"""Vectorised numpy ray caster: SceneInfo -> posed multi-view RGB-D (:class:`adatoken_compile.runtime.scene.Scene`).

Cameras follow the scene format: OpenCV convention (x right, y down, z forward), ``poses`` are
camera-to-world, ``intrinsics`` 4x4 with the pinhole K in the top-left 3x3. Pixel ``(u, v)``
(column, row, integer) looks along ``((u - cx) / fx, (v - cy) / fy, 1)`` in camera coordinates,
exactly what :func:`adatoken_compile.runtime.scene.unproject_patches` inverts, and ``depths`` hold the
z-depth (distance along the camera z axis) in metres.

Shading: Lambertian, one fixed directional light plus ambient; no shadows. Surfaces of each object
class carry their own pattern (world-space bands or checks that darken the object's colour, see
``CLASS_PATTERNS``), as real chairs and boxes differ in material as well as shape; the colour's hue
is unchanged, so colour names still read off any pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adatoken_compile.runtime.scene import Scene
from adatoken_compile.benchmark3d.world import CEILING_ID, FLOOR_ID, ROOM_X, ROOM_Y, WALL_ID, SceneInfo, _rng

NUM_VIEWS = 20
HEIGHT, WIDTH = 240, 320
HFOV_DEG = 56.0
CAM_HEIGHT = (1.2, 1.8)
CAM_INSET = (0.2, 0.6)  # distance from the walls
TARGET_DIST = (1.0, 2.0)  # horizontal camera -> aimed object distance, times a per-scene factor
SCAN_SCALE = (0.8, 1.3)  # that per-scene factor (spreads the token counts)
OVERVIEW_EVERY = 10
LIGHT = np.array([0.5, 0.35, 0.8]) / np.linalg.norm([0.5, 0.35, 0.8])
AMBIENT, DIFFUSE = 0.45, 0.55
# class -> (pattern, cell size in metres): a pattern cell darkens the colour by PATTERN_DARKEN
CLASS_PATTERNS = {"box": ("checker", 0.10), "ball": ("z-bands", 0.07), "cylinder": (None, 0.0),
                  "table": ("xy-bands", 0.12), "chair": ("checker", 0.045)}
PATTERN_DARKEN = 0.3
EPS = 1e-6


def pattern_mask(cls: str, p: np.ndarray) -> np.ndarray:
    """1 where a surface point ``p`` (..., 3, metres, object-local) of class ``cls`` lies in a dark
    pattern cell, else 0."""
    kind, s = CLASS_PATTERNS[cls]
    if kind is None:
        return np.zeros(p.shape[:-1])
    p = p / s + 0.25  # grid offset: the faces through the object's lo corner (p = 0) sit mid-cell
    c = np.floor(p).astype(np.int64)
    if kind == "checker":
        return ((c[..., 0] + c[..., 1] + c[..., 2]) % 2).astype(float)
    if kind == "z-bands":
        return (c[..., 2] % 2).astype(float)
    return (np.floor(p[..., 0] + p[..., 1]).astype(np.int64) % 2).astype(float)  # xy-bands


@dataclass
class Render:
    scene: Scene
    instance: np.ndarray  # (V, H, W) int16: object index, or FLOOR_ID / WALL_ID / CEILING_ID


def intrinsics_matrix(H: int = HEIGHT, W: int = WIDTH, hfov_deg: float = HFOV_DEG) -> np.ndarray:
    f = (W / 2) / np.tan(np.radians(hfov_deg) / 2)
    K = np.eye(4)
    K[0, 0] = K[1, 1] = f
    K[0, 2], K[1, 2] = (W - 1) / 2, (H - 1) / 2
    return K


def look_at(pos: np.ndarray, target: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """Camera-to-world 4x4, OpenCV axes, world z up."""
    f = target - pos
    f = f / np.linalg.norm(f)
    x = np.cross(f, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(f, x)
    c, s = np.cos(roll), np.sin(roll)
    x, y = c * x + s * y, -s * x + c * y
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, f, pos
    return T


def _perimeter_point(L: np.ndarray, s: float, inset: float) -> np.ndarray:
    """Point at arc length fraction ``s`` in [0, 1) of the rectangle inset from the walls."""
    a, b = L[0] - 2 * inset, L[1] - 2 * inset
    s = (s % 1.0) * 2 * (a + b)
    if s < a:
        return np.array([inset + s, inset])
    if s < a + b:
        return np.array([L[0] - inset, inset + (s - a)])
    if s < 2 * a + b:
        return np.array([L[0] - inset - (s - a - b), L[1] - inset])
    return np.array([inset, L[1] - inset - (s - 2 * a - b)])


def make_cameras(info: SceneInfo, num_views: int = NUM_VIEWS) -> np.ndarray:
    """(V, 4, 4) camera-to-world poses, like frames of a hand-held scan.

    Every ``OVERVIEW_EVERY``-th view stands near a wall (walking around the room) and looks at
    a random interior point; the others look at an object (the least-looked-at one, so every
    object is seen several times) from ``TARGET_DIST`` (times a per-scene ``SCAN_SCALE``) metres away at a random azimuth, from
    1.2-1.8 m high (above every object)."""
    rng = _rng(info.seed, 1)
    L = info.room
    start = rng.uniform()
    scale = rng.uniform(*SCAN_SCALE)
    counts = np.zeros(len(info.objects), int)
    lo_xy, hi_xy = np.full(2, CAM_INSET[0]), L[:2] - CAM_INSET[0]
    poses = []
    for i in range(num_views):
        h = rng.uniform(*CAM_HEIGHT)
        pos = target = None
        if i % OVERVIEW_EVERY != OVERVIEW_EVERY - 1 and info.objects:
            best = np.flatnonzero(counts == counts.min())
            j = int(best[int(rng.integers(len(best)))])
            counts[j] += 1
            c = info.objects[j].center
            for _ in range(20):
                az, r = rng.uniform(0, 2 * np.pi), scale * rng.uniform(*TARGET_DIST)
                xy = c[:2] + r * np.array([np.cos(az), np.sin(az)])
                if (xy >= lo_xy).all() and (xy <= hi_xy).all():
                    pos = np.array([xy[0], xy[1], h])
                    target = c + np.array([*rng.normal(0, 0.15, 2), rng.uniform(-0.15, 0.15)])
                    break
        if pos is None:
            xy = _perimeter_point(L, start + (i + rng.uniform(-0.3, 0.3)) / num_views, rng.uniform(*CAM_INSET))
            pos = np.array([xy[0], xy[1], h])
            target = np.array([*rng.uniform(0.25 * L[:2], 0.75 * L[:2]), rng.uniform(0.0, 0.8)])
        target[2] = np.clip(target[2], 0.0, 1.2)
        poses.append(look_at(pos, target, roll=rng.normal(0, 0.04)))
    return np.stack(poses)


# --------------------------------------------------------------------------- intersections
# Structure of arrays: ray origin o (3,) shared, directions dx, dy, dz (same shape, never exactly
# 0: render_scene nudges zeros to 1e-12), inverse directions ix, iy, iz. Directions are not
# normalised (camera z component = 1), so t is the z-depth. Misses return t = inf.


def hit_box(o, d, inv, lo, hi):
    """Slab test. Returns (t, axis of the entry face: 0/1/2)."""
    tn, tf = [], []
    for k in range(3):
        t1 = (lo[k] - o[k]) * inv[k]
        t2 = (hi[k] - o[k]) * inv[k]
        tn.append(np.minimum(t1, t2))
        tf.append(np.maximum(t1, t2))
    tmin = np.maximum(np.maximum(tn[0], tn[1]), tn[2])
    tmax = np.minimum(np.minimum(tf[0], tf[1]), tf[2])
    t = np.where((tmax >= tmin) & (tmin > EPS), tmin, np.inf)
    axis = np.where(tmin == tn[0], 0, np.where(tmin == tn[1], 1, 2))
    return t, axis


def hit_sphere(o, d, c, r):
    ocx, ocy, ocz = o[0] - c[0], o[1] - c[1], o[2] - c[2]
    a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    b = d[0] * ocx + d[1] * ocy + d[2] * ocz
    cc = ocx * ocx + ocy * ocy + ocz * ocz - r * r
    disc = b * b - a * cc
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc >= 0) & (t > EPS), t, np.inf)


def hit_cylinder(o, d, c, r, z0, z1):
    """Vertical cylinder (side + both caps). Returns (t, True where the side was hit)."""
    ox, oy = o[0] - c[0], o[1] - c[1]
    dx, dy, dz = d
    a = dx * dx + dy * dy
    b = dx * ox + dy * oy
    cc = ox * ox + oy * oy - r * r
    disc = b * b - a * cc
    ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    zs = o[2] + ts * dz
    ts = np.where((disc >= 0) & (ts > EPS) & (zs >= z0) & (zs <= z1), ts, np.inf)
    best = ts
    for zc in (z0, z1):
        tc = (zc - o[2]) / dz
        px, py = ox + tc * dx, oy + tc * dy
        best = np.where((tc > EPS) & (px * px + py * py <= r * r) & (tc < best), tc, best)
    return best, best == ts


def _object_rect(lo, hi, w2c, K, H, W):
    """Pixel rectangle (r0, r1, c0, c1) covering the projection of an AABB, or None if off-screen."""
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    cam = corners @ w2c.T
    z = cam[:, 2]
    if (z <= 1e-3).all():
        return None
    if (z <= 1e-3).any():  # straddles the camera plane: no tight bound
        return 0, H, 0, W
    u = K[0, 0] * cam[:, 0] / z + K[0, 2]
    v = K[1, 1] * cam[:, 1] / z + K[1, 2]
    c0, c1 = int(np.floor(u.min())) - 1, int(np.ceil(u.max())) + 2
    r0, r1 = int(np.floor(v.min())) - 1, int(np.ceil(v.max())) + 2
    c0, r0 = max(c0, 0), max(r0, 0)
    c1, r1 = min(c1, W), min(r1, H)
    if c0 >= c1 or r0 >= r1:
        return None
    return r0, r1, c0, c1


def render_scene(
    info: SceneInfo,
    poses: np.ndarray | None = None,
    H: int = HEIGHT,
    W: int = WIDTH,
    hfov_deg: float = HFOV_DEG,
) -> Render:
    """Ray cast every pixel of every view (float64; one view's pixels at a time, objects culled to
    the pixel rectangle of their bounding box)."""
    if poses is None:
        poses = make_cameras(info)
    poses = np.asarray(poses, np.float64)
    V = len(poses)
    K = intrinsics_matrix(H, W, hfov_deg)
    a = ((np.arange(W) - K[0, 2]) / K[0, 0])[None, :]  # (1, W)
    b = ((np.arange(H) - K[1, 2]) / K[1, 1])[:, None]  # (H, 1)
    L = info.room
    surf_rgb = np.array([info.ceiling_rgb, info.wall_rgb, info.floor_rgb], float)  # ids -3, -2, -1
    palette = np.concatenate([surf_rgb, np.array([o.rgb for o in info.objects], float).reshape(-1, 3)])
    light = LIGHT

    images = np.empty((V, H, W, 3), np.uint8)
    depths = np.empty((V, H, W), np.float32)
    inst = np.empty((V, H, W), np.int16)
    for v in range(V):
        R, o = poses[v, :3, :3], poses[v, :3, 3]
        w2c = np.linalg.inv(poses[v])
        d = []
        for k in range(3):
            dk = R[k, 0] * a + R[k, 1] * b + R[k, 2]
            d.append(np.where(dk == 0, 1e-12, dk))
        inv = [1.0 / dk for dk in d]
        # room interior: the ray leaves through the nearest of walls / floor / ceiling
        tr = [np.where(d[k] > 0, L[k] - o[k], -o[k]) * inv[k] for k in range(3)]
        t = np.minimum(np.minimum(tr[0], tr[1]), tr[2])
        on_z = t == tr[2]
        ids = np.where(on_z, np.where(d[2] > 0, CEILING_ID, FLOOR_ID), WALL_ID).astype(np.int16)
        # n . light for the inward normal of the face hit
        lam = np.where(
            on_z,
            np.where(d[2] > 0, -light[2], light[2]),
            np.where(t == tr[0], np.where(d[0] > 0, -light[0], light[0]), np.where(d[1] > 0, -light[1], light[1])),
        )
        for j, ob in enumerate(info.objects):
            rect = _object_rect(ob.lo, ob.hi, w2c, K, H, W)
            if rect is None:
                continue
            sl = (slice(rect[0], rect[1]), slice(rect[2], rect[3]))
            ts = t[sl]
            tb, _ = hit_box(o, [x[sl] for x in d], [x[sl] for x in inv], ob.lo, ob.hi)
            rows, cols = np.nonzero(tb < ts)
            if len(rows) == 0:
                continue
            rows, cols = rows + rect[0], cols + rect[2]
            dd = [x[rows, cols] for x in d]
            ii = [x[rows, cols] for x in inv]
            best = t[rows, cols]
            bl = lam[rows, cols]
            hit_any = np.zeros(len(rows), bool)
            for p in ob.prims:
                if p[0] == "box":
                    tp, ax = hit_box(o, dd, ii, p[1], p[2])
                    m = tp < best
                    if m.any():
                        dax = np.where(ax == 0, dd[0], np.where(ax == 1, dd[1], dd[2]))
                        bl = np.where(m, -np.sign(dax) * light[ax], bl)
                elif p[0] == "sphere":
                    tp = hit_sphere(o, dd, p[1], p[2])
                    m = tp < best
                    if m.any():
                        tp0 = np.where(m, tp, 0.0)
                        nl = sum((o[k] + tp0 * dd[k] - p[1][k]) * light[k] for k in range(3)) / p[2]
                        bl = np.where(m, nl, bl)
                else:
                    tp, side = hit_cylinder(o, dd, p[1], p[2], p[3], p[4])
                    m = tp < best
                    if m.any():
                        tp0 = np.where(m, tp, 0.0)
                        qx, qy = o[0] + tp0 * dd[0] - p[1][0], o[1] + tp0 * dd[1] - p[1][1]
                        nl_side = (qx * light[0] + qy * light[1]) / p[2]
                        nl_cap = np.where(o[2] + tp0 * dd[2] > (p[3] + p[4]) / 2, light[2], -light[2])
                        bl = np.where(m, np.where(side, nl_side, nl_cap), bl)
                best = np.where(m, tp, best)
                hit_any |= m
            rows, cols = rows[hit_any], cols[hit_any]
            t[rows, cols] = best[hit_any]
            lam[rows, cols] = bl[hit_any]
            ids[rows, cols] = j
        shade = AMBIENT + DIFFUSE * np.maximum(lam, 0.0)
        for j, ob in enumerate(info.objects):
            rows, cols = np.nonzero(ids == j)
            if len(rows):
                hit = np.stack([o[k] + t[rows, cols] * d[k][rows, cols] - ob.lo[k] for k in range(3)], -1)
                shade[rows, cols] *= 1.0 - PATTERN_DARKEN * pattern_mask(ob.cls, hit)
        images[v] = np.clip(palette[ids + 3] * shade[..., None] + 0.5, 0, 255).astype(np.uint8)
        depths[v] = t  # z-depth: the camera z component of every direction is 1
        inst[v] = ids
    intr = np.repeat(K[None], V, axis=0)
    scene = Scene(images, depths, poses, intr, name=f"synth-{info.seed}")
    return Render(scene, inst)


# --------------------------------------------------------------------------- bird's-eye view

# one fixed scale for every room (floor distances read the same in every image), fine enough that an
# object fills much of a 28-pixel merged Qwen2.5-VL token (0.78 m) and its class pattern shows
TOP_DOWN_PX_PER_M = 36.0
TOP_DOWN_SIZE = (308, 336)  # (H, W): the largest room (9 x 8 m) plus a margin, multiples of 28
TOP_DOWN_MARGIN = 4  # pixels between the image border and the room's (0, 0) corner
TOP_DOWN_SUPERSAMPLE = 2  # rays per pixel side, averaged: fine patterns blur instead of aliasing
# the map's floor is tinted by position, like a map's coordinate grid: red from x 0.75 to 1.25 times
# the floor colour over the largest room's length, blue likewise along y, so that where a patch
# lies in the room reads off its own pixels (attention alone knows only relative positions)
TOP_DOWN_FLOOR_RAMP = 0.5


def top_down_rays(H: int, W: int, ss: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """World (x, y) of the rays of a top-down image, (H*ss, W*ss) each: column -> x, row -> y,
    ``TOP_DOWN_PX_PER_M`` pixels a metre from the room corner at ``TOP_DOWN_MARGIN`` pixels."""
    step = 1.0 / (TOP_DOWN_PX_PER_M * ss)
    u = (np.arange(W * ss) + 0.5) * step - TOP_DOWN_MARGIN / TOP_DOWN_PX_PER_M
    v = (np.arange(H * ss) + 0.5) * step - TOP_DOWN_MARGIN / TOP_DOWN_PX_PER_M
    return np.meshgrid(u, v, indexing="xy")


def render_top_down(info: SceneInfo, H: int = TOP_DOWN_SIZE[0], W: int = TOP_DOWN_SIZE[1],
                    ss: int = TOP_DOWN_SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Orthographic bird's-eye view of the room without its ceiling: (H, W, 3) uint8 RGB and the
    (H, W) int16 instance map of each pixel's centre ray (object index, ``FLOOR_ID``, or
    ``WALL_ID`` outside the room, which is black; the floor tinted by position,
    ``TOP_DOWN_FLOOR_RAMP``). Each ray looks straight down and shades the
    highest surface it meets with the views' light and class patterns, so an object shows its
    top (box and table tops, chair seat and back, ball and cylinder from above) at its true floor
    position: distances between objects in pixels are floor distances times the fixed scale."""
    x, y = top_down_rays(H, W, ss)
    L = info.room
    inside = (x >= 0) & (x <= L[0]) & (y >= 0) & (y <= L[1])
    top = np.zeros(x.shape)
    lam = np.full(x.shape, LIGHT[2])  # the floor's normal is +z
    ids = np.where(inside, FLOOR_ID, WALL_ID).astype(np.int16)
    for j, ob in enumerate(info.objects):
        for p in ob.prims:
            if p[0] == "box":
                hit = (x >= p[1][0]) & (x <= p[2][0]) & (y >= p[1][1]) & (y <= p[2][1])
                z, nl = np.full(x.shape, p[2][2]), LIGHT[2]
            elif p[0] == "sphere":
                r2 = (x - p[1][0]) ** 2 + (y - p[1][1]) ** 2
                hit = r2 <= p[2] ** 2
                h = np.sqrt(np.maximum(p[2] ** 2 - r2, 0.0))
                z = p[1][2] + h
                nl = ((x - p[1][0]) * LIGHT[0] + (y - p[1][1]) * LIGHT[1] + h * LIGHT[2]) / p[2]
            else:
                hit = (x - p[1][0]) ** 2 + (y - p[1][1]) ** 2 <= p[2] ** 2
                z, nl = np.full(x.shape, p[4]), LIGHT[2]
            m = hit & (z > top)
            top = np.where(m, z, top)
            lam = np.where(m, nl, lam)
            ids = np.where(m, j, ids).astype(np.int16)
    shade = AMBIENT + DIFFUSE * np.maximum(lam, 0.0)
    for j, ob in enumerate(info.objects):
        m = ids == j
        if m.any():
            local = np.stack([x[m] - ob.lo[0], y[m] - ob.lo[1], top[m] - ob.lo[2]], -1)
            shade[m] *= 1.0 - PATTERN_DARKEN * pattern_mask(ob.cls, local)
    palette = np.concatenate([np.zeros((1, 3)), [info.wall_rgb], [info.floor_rgb],
                              np.array([o.rgb for o in info.objects], float).reshape(-1, 3)])
    rgb = palette[np.where(inside, ids, WALL_ID) + 3] * np.where(inside, shade, 0.0)[..., None]
    floor = ids == FLOOR_ID
    rgb[..., 0] *= np.where(floor, 1 + TOP_DOWN_FLOOR_RAMP * (x / ROOM_X[1] - 0.5), 1.0)
    rgb[..., 2] *= np.where(floor, 1 + TOP_DOWN_FLOOR_RAMP * (y / ROOM_Y[1] - 0.5), 1.0)
    rgb = rgb.reshape(H, ss, W, ss, 3).mean(axis=(1, 3))
    centre = ids[ss // 2 :: ss, ss // 2 :: ss]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), centre
