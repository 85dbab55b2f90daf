"""Procedural rooms with objects, deterministic from a seed (pure numpy).

World frame: z up, metres. The room is the box ``[0, Lx] x [0, Ly] x [0, Lz]`` (floor at z = 0).
Every object stands on the floor and is made of primitives:

* ``("box", lo, hi)``         axis-aligned box, ``lo``/``hi`` (3,) corners;
* ``("sphere", c, r)``        sphere, centre ``c`` (3,), radius ``r``;
* ``("cylinder", c, r, z0, z1)`` vertical cylinder, axis through ``c`` (x, y), radius ``r``,
  from ``z0`` to ``z1``.

Object footprints (xy bounding rectangles) never overlap (clearance ``CLEARANCE``) and are at
least ``WALL_MARGIN`` from the walls; every object is lower than ``MAX_OBJECT_HEIGHT`` so that
cameras at 1.2 m or more are never inside one.

A scene's *composition plan* makes the counting and existence questions balanced by
construction: one class (``count_class``) gets a count drawn uniformly from 0..4 and two other
classes (``exist_classes``) are each present or absent with probability 1/2; everything else is
drawn from the remaining classes (the count class excluded, absent classes excluded). Colours are drawn i.i.d. uniformly per object, so colours are
exchangeable (what keeps colour-referenced questions balanced).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CLASSES = ("box", "ball", "cylinder", "table", "chair")
PLURALS = {"box": "boxes", "ball": "balls", "cylinder": "cylinders", "table": "tables", "chair": "chairs"}
# well separated hues, named by single words
COLORS = {
    "red": (205, 30, 30),
    "green": (35, 175, 45),
    "blue": (35, 70, 215),
    "yellow": (235, 215, 30),
    "purple": (145, 45, 185),
    "cyan": (30, 205, 215),
}
COLOR_NAMES = tuple(COLORS)
MAX_COUNT = 4  # counting answers are 0..MAX_COUNT
NUM_EXIST = 2  # classes planned for existence questions

ROOM_X = (5.0, 9.0)
ROOM_Y = (4.0, 8.0)
ROOM_Z = (2.6, 3.2)
NUM_OBJECTS = (3, 8)
WALL_MARGIN = 0.45
CLEARANCE = 0.3
MAX_OBJECT_HEIGHT = 1.15

# instance ids of room surfaces (objects are 0..n-1)
FLOOR_ID, WALL_ID, CEILING_ID = -1, -2, -3


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent deterministic stream ``stream`` of scene ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))


@dataclass
class Object3D:
    cls: str
    color: str
    prims: list  # [(kind, *params)]
    lo: np.ndarray = field(default=None)  # (3,) AABB
    hi: np.ndarray = field(default=None)

    @property
    def center(self) -> np.ndarray:
        return (self.lo + self.hi) / 2

    @property
    def size(self) -> np.ndarray:
        return self.hi - self.lo

    @property
    def rgb(self) -> tuple:
        return COLORS[self.color]


@dataclass
class SceneInfo:
    seed: int
    room: np.ndarray  # (3,) extents Lx, Ly, Lz
    objects: list  # [Object3D]
    floor_rgb: tuple
    wall_rgb: tuple
    ceiling_rgb: tuple
    count_class: str  # planned: count uniform in 0..MAX_COUNT
    exist_classes: tuple  # planned: each present with probability 1/2, independently

    def count(self, cls: str) -> int:
        return sum(o.cls == cls for o in self.objects)

    def describe(self) -> list[dict]:
        return [
            {"class": o.cls, "color": o.color, "center": o.center.round(3).tolist(), "size": o.size.round(3).tolist()}
            for o in self.objects
        ]


# --------------------------------------------------------------------------- object shapes


def _box(lo, hi):
    return ("box", np.asarray(lo, float), np.asarray(hi, float))


def _shape(cls: str, rng: np.random.Generator, scale: float) -> tuple[list, np.ndarray]:
    """Primitives of one object at the origin (footprint centred on x = y = 0, resting on z = 0)
    and its footprint half extents (2,)."""
    u = rng.uniform
    if cls == "box":
        s = u(0.35, 0.75) * scale
        w, d, h = s * u(0.8, 1.25), s * u(0.8, 1.25), min(s * u(0.8, 1.25), 0.95)
        return [_box((-w / 2, -d / 2, 0), (w / 2, d / 2, h))], np.array([w / 2, d / 2])
    if cls == "ball":
        r = u(0.16, 0.34) * scale
        return [("sphere", np.array([0.0, 0.0, r]), r)], np.array([r, r])
    if cls == "cylinder":
        r, h = u(0.15, 0.3) * scale, u(0.5, 1.1)
        return [("cylinder", np.array([0.0, 0.0]), r, 0.0, h)], np.array([r, r])
    if cls == "table":
        w, d = u(0.9, 1.5) * scale, u(0.6, 0.9) * scale
        if rng.random() < 0.5:
            w, d = d, w
        h, th, lg = u(0.65, 0.8), 0.05, 0.06
        prims = [_box((-w / 2, -d / 2, h - th), (w / 2, d / 2, h))]
        for sx in (-1, 1):
            for sy in (-1, 1):
                x0 = sx * (w / 2 - 0.04) - lg / 2
                y0 = sy * (d / 2 - 0.04) - lg / 2
                prims.append(_box((x0, y0, 0), (x0 + lg, y0 + lg, h - th)))
        return prims, np.array([w / 2, d / 2])
    if cls == "chair":
        s = u(0.4, 0.52) * scale
        h, th, lg, bh = u(0.42, 0.48), 0.05, 0.045, u(0.4, 0.5)
        prims = [_box((-s / 2, -s / 2, h - th), (s / 2, s / 2, h))]
        for sx in (-1, 1):
            for sy in (-1, 1):
                x0 = sx * (s / 2 - 0.03) - lg / 2
                y0 = sy * (s / 2 - 0.03) - lg / 2
                prims.append(_box((x0, y0, 0), (x0 + lg, y0 + lg, h - th)))
        side = int(rng.integers(4))  # back rest on -x, +x, -y or +y
        axis, sign = side // 2, (-1, 1)[side % 2]
        lo = np.array([-s / 2, -s / 2, h])
        hi = np.array([s / 2, s / 2, h + bh])
        if sign < 0:
            hi[axis] = lo[axis] + th
        else:
            lo[axis] = hi[axis] - th
        prims.append(("box", lo, hi))
        return prims, np.array([s / 2, s / 2])
    raise ValueError(cls)


def _translate(prims: list, x: float, y: float) -> list:
    out = []
    off = np.array([x, y, 0.0])
    for p in prims:
        if p[0] == "box":
            out.append(("box", p[1] + off, p[2] + off))
        elif p[0] == "sphere":
            out.append(("sphere", p[1] + off, p[2]))
        else:
            out.append(("cylinder", p[1] + off[:2], p[2], p[3], p[4]))
    return out


def prim_bounds(p) -> tuple[np.ndarray, np.ndarray]:
    if p[0] == "box":
        return p[1], p[2]
    if p[0] == "sphere":
        return p[1] - p[2], p[1] + p[2]
    c, r, z0, z1 = p[1], p[2], p[3], p[4]
    return np.array([c[0] - r, c[1] - r, z0]), np.array([c[0] + r, c[1] + r, z1])


def _with_bounds(cls: str, color: str, prims: list) -> Object3D:
    los, his = zip(*(prim_bounds(p) for p in prims))
    return Object3D(cls, color, prims, np.min(los, axis=0), np.max(his, axis=0))


# --------------------------------------------------------------------------- composition + layout


def _plan(rng: np.random.Generator) -> tuple[list[str], str, tuple[str, ...]]:
    """Class list (shuffled), count_class, exist_classes."""
    count_class = CLASSES[int(rng.integers(len(CLASSES)))]
    k = int(rng.integers(MAX_COUNT + 1))
    others = [c for c in CLASSES if c != count_class]
    exist_classes = tuple(others[int(i)] for i in rng.choice(len(others), NUM_EXIST, replace=False))
    present = [bool(p) for p in rng.random(NUM_EXIST) < 0.5]
    n = int(rng.integers(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1))
    n = max(n, k + sum(present))
    absent = {c for c, p in zip(exist_classes, present) if not p}
    pool = [c for c in others if c not in absent]
    classes = [count_class] * k + [c for c, p in zip(exist_classes, present) if p]
    classes += [pool[int(i)] for i in rng.integers(len(pool), size=n - len(classes))]
    order = rng.permutation(len(classes))
    return [classes[i] for i in order], count_class, exist_classes


def _layout(classes, colors, room, rng) -> list[Object3D] | None:
    """Place objects without footprint overlap; None if it did not fit."""
    for scale in (1.0, 0.9, 0.8, 0.7, 0.6):
        for _attempt in range(8):
            placed: list[tuple[np.ndarray, np.ndarray]] = []  # footprint lo/hi (2,)
            objs = []
            for cls, col in zip(classes, colors):
                prims, half = _shape(cls, rng, scale)
                lo_c = WALL_MARGIN + half
                hi_c = room[:2] - WALL_MARGIN - half
                if (hi_c <= lo_c).any():
                    break
                for _try in range(60):
                    xy = rng.uniform(lo_c, hi_c)
                    flo, fhi = xy - half, xy + half
                    if all(
                        (flo >= phi + CLEARANCE).any() or (fhi + CLEARANCE <= plo).any() for plo, phi in placed
                    ):
                        break
                else:
                    break
                placed.append((flo, fhi))
                objs.append(_with_bounds(cls, col, _translate(prims, xy[0], xy[1])))
            else:
                return objs
    return None


def _grey(rng, lo, hi, tint=(0.0, 0.0, 0.0)):
    g = rng.uniform(lo, hi)
    tint = np.asarray(tint) + rng.uniform(-8, 8, size=3)
    return tuple(int(v) for v in np.clip(g + tint, 0, 255))


def make_world(seed: int) -> SceneInfo:
    """Room + objects of scene ``seed`` (no rendering)."""
    rng = _rng(seed, 0)
    room = np.array([rng.uniform(*ROOM_X), rng.uniform(*ROOM_Y), rng.uniform(*ROOM_Z)])
    classes, count_class, exist_classes = _plan(rng)
    colors = [COLOR_NAMES[int(i)] for i in rng.integers(len(COLOR_NAMES), size=len(classes))]
    objs = _layout(classes, colors, room, rng)
    if objs is None:  # never observed; keep the composition by enlarging the room
        room[:2] = [ROOM_X[1], ROOM_Y[1]]
        objs = _layout(classes, colors, room, rng)
        assert objs is not None, f"scene {seed}: layout failed"
    return SceneInfo(
        seed=int(seed),
        room=room,
        objects=objs,
        floor_rgb=_grey(rng, 85, 120, tint=(8, 2, -8)),
        wall_rgb=_grey(rng, 185, 220),
        ceiling_rgb=_grey(rng, 200, 230),
        count_class=count_class,
        exist_classes=exist_classes,
    )
