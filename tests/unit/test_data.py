"""Procedural 3D QA benchmark: determinism, render-vs-geometry agreement, ground truth, balance."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from functools import lru_cache

import numpy as np
import pytest

from adatoken_compile.benchmark3d import dataset, questions, render, world
from adatoken_compile.benchmark3d.questions import MIN_GAP, WORDS, answer_space, floor_distance, questions_for
from adatoken_compile.benchmark3d.world import CEILING_ID, FLOOR_ID, WALL_ID, make_world
from adatoken_compile.runtime.scene import preprocess_scene, unproject_patches, validate_scene, voxelize

SEEDS = (0, 2_000_001, 3)  # together: every object class


@lru_cache(maxsize=None)
def _render(seed: int):
    info = make_world(seed)
    return info, render.render_scene(info)


# --------------------------------------------------------------------------- determinism, format


def test_same_seed_identical():
    info, r = _render(SEEDS[0])
    info2 = make_world(SEEDS[0])
    r2 = render.render_scene(info2)
    for key in ("images", "depths", "poses", "intrinsics"):
        a, b = getattr(r.scene, key), getattr(r2.scene, key)
        assert a.dtype == b.dtype and np.array_equal(a, b), key
    assert np.array_equal(r.instance, r2.instance)
    assert info.describe() == info2.describe()
    assert questions_for(info) == questions_for(info2)


def test_different_seeds_differ():
    (i0, r0), (i1, r1) = _render(SEEDS[0]), _render(SEEDS[1])
    assert not np.array_equal(r0.scene.images, r1.scene.images)
    assert not np.array_equal(r0.scene.poses, r1.scene.poses)
    assert i0.describe() != i1.describe()
    assert [make_world(s).describe() for s in range(5)] != [make_world(s).describe() for s in range(5, 10)]


@pytest.mark.parametrize("seed", SEEDS)
def test_scene_format(seed):
    info, r = _render(seed)
    s = r.scene
    arrays = {"images": s.images, "depths": s.depths, "poses": s.poses, "intrinsics": s.intrinsics}
    v = validate_scene(arrays, name=s.name)
    assert v.images.shape == (render.NUM_VIEWS, render.HEIGHT, render.WIDTH, 3) and v.images.dtype == np.uint8
    assert s.depths.dtype == np.float32 and (s.depths > 0).all()  # closed room: every ray hits
    # poses are rigid, camera inside the room, OpenCV: the y axis (down) points downward-ish
    R = s.poses[:, :3, :3]
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(R), 1.0)
    assert (R[:, 2, 1] < 0).all()  # camera y (down) has negative world z
    c = s.poses[:, :3, 3]
    assert (c > 0).all() and (c < info.room).all()
    assert np.allclose(s.intrinsics[:, 3, 3], 1) and np.allclose(s.intrinsics[:, :3, :3][:, 2], [0, 0, 1])
    # every object shows up in some view
    ids = set(np.unique(r.instance).tolist())
    assert set(range(len(info.objects))) <= ids
    assert {FLOOR_ID, WALL_ID} <= ids


# --------------------------------------------------------------------------- render vs geometry
# An independent scalar ray caster (math module, one ray at a time).


def _ray_box(o, d, lo, hi):
    t0, t1 = -math.inf, math.inf
    for k in range(3):
        if d[k] == 0:
            if not (lo[k] <= o[k] <= hi[k]):
                return math.inf
            continue
        a, b = (lo[k] - o[k]) / d[k], (hi[k] - o[k]) / d[k]
        t0, t1 = max(t0, min(a, b)), min(t1, max(a, b))
    return t0 if t1 >= t0 and t0 > 0 else math.inf


def _ray_sphere(o, d, c, r):
    oc = [o[k] - c[k] for k in range(3)]
    a = sum(x * x for x in d)
    b = 2 * sum(d[k] * oc[k] for k in range(3))
    cc = sum(x * x for x in oc) - r * r
    disc = b * b - 4 * a * cc
    if disc < 0:
        return math.inf
    t = (-b - math.sqrt(disc)) / (2 * a)
    return t if t > 0 else math.inf


def _ray_cylinder(o, d, c, r, z0, z1):
    best = math.inf
    ox, oy = o[0] - c[0], o[1] - c[1]
    a = d[0] ** 2 + d[1] ** 2
    if a > 0:
        b = 2 * (d[0] * ox + d[1] * oy)
        cc = ox * ox + oy * oy - r * r
        disc = b * b - 4 * a * cc
        if disc >= 0:
            t = (-b - math.sqrt(disc)) / (2 * a)
            if t > 0 and z0 <= o[2] + t * d[2] <= z1:
                best = t
    if d[2] != 0:
        for zc in (z0, z1):
            t = (zc - o[2]) / d[2]
            if 0 < t < best and (ox + t * d[0]) ** 2 + (oy + t * d[1]) ** 2 <= r * r:
                best = t
    return best


def _cast(info, o, d):
    """(t along d, id) of the first surface hit from inside the room."""
    t_room = min(((info.room[k] if d[k] > 0 else 0.0) - o[k]) / d[k] for k in range(3) if d[k] != 0)
    best, bid = t_room, None
    for j, ob in enumerate(info.objects):
        for p in ob.prims:
            if p[0] == "box":
                t = _ray_box(o, d, p[1], p[2])
            elif p[0] == "sphere":
                t = _ray_sphere(o, d, p[1], p[2])
            else:
                t = _ray_cylinder(o, d, p[1], p[2], p[3], p[4])
            if t < best:
                best, bid = t, j
    return best, bid


def _on_object(ob, p, tol=1e-3):
    for q in ob.prims:
        if q[0] == "box":
            lo, hi = q[1], q[2]
            inside = ((p >= lo - tol) & (p <= hi + tol)).all()
            if inside and (np.minimum(abs(p - lo), abs(p - hi)) < tol).any():
                return True
        elif q[0] == "sphere":
            if abs(np.linalg.norm(p - q[1]) - q[2]) < tol:
                return True
        else:
            c, r, z0, z1 = q[1], q[2], q[3], q[4]
            rho = np.linalg.norm(p[:2] - c)
            if z0 - tol <= p[2] <= z1 + tol and (
                abs(rho - r) < tol or (rho <= r + tol and min(abs(p[2] - z0), abs(p[2] - z1)) < tol)
            ):
                return True
    return False


@pytest.mark.parametrize("seed", SEEDS)
def test_render_matches_geometry(seed):
    info, r = _render(seed)
    s = r.scene
    rng = np.random.default_rng(seed)
    V, H, W = s.depths.shape
    picks = [tuple(int(x) for x in rng.integers((V, H, W))) for _ in range(150)]
    obj_pix = np.argwhere(r.instance >= 0)
    picks += [tuple(int(x) for x in obj_pix[i]) for i in rng.choice(len(obj_pix), 250, replace=False)]
    n_obj = 0
    for v, row, col in picks:
        K, T = s.intrinsics[v], s.poses[v]
        dc = np.array([(col - K[0, 2]) / K[0, 0], (row - K[1, 2]) / K[1, 1], 1.0])
        d = T[:3, :3] @ dc
        o = T[:3, 3]
        t, j = _cast(info, list(o), list(d))
        z = float(s.depths[v, row, col])
        assert abs(z - t) <= 1e-4 * t, (v, row, col, z, t)
        rid = int(r.instance[v, row, col])
        if j is None:
            assert rid < 0
            p = o + t * d
            if rid == FLOOR_ID:
                assert abs(p[2]) < 1e-6
            elif rid == CEILING_ID:
                assert abs(p[2] - info.room[2]) < 1e-6
        else:
            assert rid == j
        if rid >= 0:  # unproject with the scene's K and pose: a point on object rid's surface
            n_obj += 1
            x = (col - K[0, 2]) * z / K[0, 0]
            y = (row - K[1, 2]) * z / K[1, 1]
            p = (T @ np.array([x, y, z, 1.0]))[:3]
            assert _on_object(info.objects[rid], p), (v, row, col, rid)
    assert n_obj >= 250


@pytest.mark.parametrize("seed", SEEDS)
def test_object_colour_and_class_pattern(seed):
    """An object pixel is its colour times one brightness factor (hue kept, so colour names read
    off any pixel); the factor is the Lambertian shade times the class pattern's darkening at the
    unprojected surface point: in [AMBIENT, 1] x (1 - PATTERN_DARKEN) in dark cells, [AMBIENT, 1]
    elsewhere."""
    info, r = _render(seed)
    s = r.scene
    rng = np.random.default_rng(seed)
    obj_pix = np.argwhere(r.instance >= 0)
    dark_seen = {False: 0, True: 0}
    for v, row, col in obj_pix[rng.choice(len(obj_pix), 400, replace=False)]:
        ob = info.objects[int(r.instance[v, row, col])]
        K, T, z = s.intrinsics[v], s.poses[v], float(s.depths[v, row, col])
        p = (T @ np.array([(col - K[0, 2]) * z / K[0, 0], (row - K[1, 2]) * z / K[1, 1], z, 1.0]))[:3]
        rgb, px = np.array(ob.rgb, float), s.images[v, row, col].astype(float)
        k = int(np.argmax(rgb))
        f = px[k] / rgb[k]
        assert np.all(np.abs(px - rgb * f) <= 1.5), (px, rgb)
        dark = bool(render.pattern_mask(ob.cls, p - np.asarray(ob.lo)) > 0.5)
        dark_seen[dark] += 1
        lo, hi = render.AMBIENT, render.AMBIENT + render.DIFFUSE
        if dark:
            lo, hi = lo * (1 - render.PATTERN_DARKEN), hi * (1 - render.PATTERN_DARKEN)
        assert lo - 0.01 <= f <= hi + 0.01, (ob.cls, dark, f)
    assert dark_seen[True] > 40 and dark_seen[False] > 40


def test_pipeline_token_count():
    info, r = _render(SEEDS[0])
    pre = preprocess_scene(r.scene, 224, dataset.CLIP_MEAN, dataset.CLIP_STD)
    xyz = unproject_patches(pre.depths, pre.intrinsics, pre.poses, 14)
    assert xyz.shape == (render.NUM_VIEWS, 256, 3)
    # every patch point lies in the room (tolerance: preprocessing's nearest resize)
    assert (xyz > -0.1).all() and (xyz < info.room + 0.1).all()
    n = voxelize(xyz).num_tokens
    assert 700 <= n <= 2560


def test_render_speed():
    import time

    info = make_world(7)
    t0 = time.perf_counter()
    render.render_scene(info)
    assert time.perf_counter() - t0 < 5.0  # ~0.2 s on one idle core; loose for shared CI


# --------------------------------------------------------------------------- questions


@lru_cache(maxsize=None)
def _questions(num_scenes: int = 1500):
    return [(info, q) for _, info, q in dataset.iter_questions("train", num_scenes)]


def test_ground_truth_from_geometry():
    colors = world.COLOR_NAMES
    for info, q in _questions()[:3000]:
        objs = info.objects
        assert q.answer in answer_space(q.template, q.text), q
        assert q.kind == questions.TEMPLATES[q.template]
        words = q.text.rstrip("?").replace(",", "").split()
        if q.template == "count":
            cls = next(c for c in world.CLASSES if world.PLURALS[c] in words)
            assert q.answer == str(sum(o.cls == cls for o in objs))
        elif q.template == "exist":
            cls = words[3]
            assert q.answer == ("yes" if any(o.cls == cls for o in objs) else "no")
        elif q.template == "color_of_class":
            match = [o for o in objs if o.cls == words[-1]]
            assert len(match) == 1 and q.answer == match[0].color
        elif q.template == "class_of_color":
            match = [o for o in objs if o.color == words[3]]
            assert len(match) == 1 and q.answer == match[0].cls
        else:
            c0, c1, c2 = [w for w in words if w in colors]
            by = {c: [o for o in objs if o.color == c] for c in (c0, c1, c2)}
            assert all(len(v) == 1 for v in by.values())
            d1, d2 = floor_distance(by[c0][0], by[c1][0]), floor_distance(by[c0][0], by[c2][0])
            assert abs(d1 - d2) >= MIN_GAP
            expect = {
                "closer": c1 if d1 < d2 else c2,
                "farther": c1 if d1 > d2 else c2,
                "closer_yesno": "yes" if d1 < d2 else "no",
            }[q.template]
            assert q.answer == expect


def test_world_constraints():
    for seed in range(300):
        info = make_world(seed)
        L = info.room
        assert 5 <= L[0] <= 9 and 4 <= L[1] <= 8 and 2.6 <= L[2] <= 3.2
        assert 3 <= len(info.objects) <= 8
        for i, a in enumerate(info.objects):
            assert (a.lo[:2] >= 0).all() and (a.hi[:2] <= L[:2]).all() and abs(a.lo[2]) < 1e-9
            assert a.hi[2] < render.CAM_HEIGHT[0]
            for b in info.objects[i + 1 :]:  # footprints do not overlap
                assert (a.lo[:2] >= b.hi[:2]).any() or (b.lo[:2] >= a.hi[:2]).any()


def test_answers_balanced_per_template():
    qs = _questions()
    by_tpl = defaultdict(Counter)
    for _, q in qs:
        by_tpl[q.template][q.answer] += 1
    assert set(by_tpl) == set(questions.TEMPLATES)
    for tpl, c in by_tpl.items():
        n, m = sum(c.values()), len(answer_space(tpl, "")) if tpl not in ("closer", "farther") else 2
        if tpl in ("closer", "farther"):  # balanced per position of the right answer
            pos = Counter()
            for _, q in qs:
                if q.template == tpl:
                    pos[answer_space(tpl, q.text).index(q.answer)] += 1
            c = pos
        p = 1.0 / m
        tol = 4.5 * math.sqrt(p * (1 - p) / n)
        for a in answer_space(tpl, "") if tpl not in ("closer", "farther") else (0, 1):
            assert abs(c[a] / n - p) < tol, (tpl, a, c, n)


def test_text_only_baseline_near_chance():
    r = dataset.text_only_baseline(train_scenes=1500, test_scenes=600)
    for kind in (*questions.KINDS, "overall"):
        assert r[kind]["text_only"] <= r[kind]["chance"] + 0.06, (kind, r[kind])


def test_vocabulary():
    texts = questions.all_texts()
    vocab = set(WORDS)
    for _, q in _questions()[:2000]:
        assert q.text == q.text.lower() and q.answer == q.answer.lower()
        assert q.text in texts and q.answer in texts
        assert set(questions.text_words(q.text)) <= vocab and q.answer in vocab


# --------------------------------------------------------------------------- splits, iteration


def test_splits_disjoint():
    ranges = sorted(dataset.SPLITS.values())
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a0 < a1 <= b0 < b1
    assert set(dataset.SPLITS) == {"train", "validation", "test", "calibration"}
    assert dataset.KINDS == ("attribute", "counting", "relation", "existence")


def test_iter_samples_test_fixed():
    samples = list(dataset.iter_samples("test", limit=12))
    assert len(samples) == 12
    lo, hi = dataset.SPLITS["test"]
    seeds = [s.meta["seed"] for s in samples]
    assert seeds == sorted(seeds) and all(lo <= x < hi for x in seeds)
    for a, b in zip(samples, samples[1:]):  # one render per scene, questions consecutive
        assert (a.scene is b.scene) == (a.meta["seed"] == b.meta["seed"])
    info = make_world(seeds[0])
    first = [s for s in samples if s.meta["seed"] == seeds[0]]
    assert [(s.question, s.answer, s.kind) for s in first] == [(q.text, q.answer, q.kind) for q in questions_for(info)]
    assert all(s.kind in dataset.KINDS and s.meta["split"] == "test" for s in samples)


def test_image_models_get_a_birds_eye_view_and_two_views_per_scene():
    """For an image model a benchmark scene becomes its bird's-eye view and the views IMAGE_VIEWS:
    the same images for every question about it, the questions and answers unchanged; a scene
    model's samples are left alone."""
    from adatoken_compile.data import for_input, load_samples

    samples = load_samples("builtin:test", limit=7)
    assert for_input(samples, "scene") == samples
    imgs = for_input(samples, "image")
    assert [(s.question, s.answer, s.meta) for s in imgs] == [(s.question, s.answer, s.meta) for s in samples]
    assert all(s.scene is None and len(s.image) == 3 for s in imgs)
    first = [s for s in imgs if s.meta["seed"] == samples[0].meta["seed"]]
    assert len(first) > 1 and all(s.image is first[0].image for s in first)
    top, _ = render.render_top_down(make_world(samples[0].meta["seed"]))
    np.testing.assert_array_equal(first[0].image[0], top)
    for k, v in enumerate(dataset.IMAGE_VIEWS):
        np.testing.assert_array_equal(first[0].image[1 + k], dataset.view_image(samples[0].scene.images[v]))
        assert first[0].image[1 + k].shape == (*dataset.IMAGE_VIEW_SIZE, 3)


def test_top_down_view_shows_each_object_at_its_floor_position_on_a_tinted_floor():
    info = make_world(3)
    rgb, ids = render.render_top_down(info)
    assert rgb.shape == (*render.TOP_DOWN_SIZE, 3) and ids.shape == render.TOP_DOWN_SIZE
    to_px = lambda xy: (np.asarray(xy) * render.TOP_DOWN_PX_PER_M + render.TOP_DOWN_MARGIN).astype(int)
    for j, o in enumerate(info.objects):
        c, r = to_px(o.center[:2])
        assert ids[r, c] == j
    assert ids[-1, -1] == WALL_ID and (rgb[-1, -1] == 0).all()  # outside the room (the largest room's corner): black
    # the floor's red grows along x and its blue along y
    (c0, r0), (c1, r1) = to_px([0.2, 0.2]), to_px(info.room[:2] - 0.2)
    assert ids[r0, c0] == ids[r1, c1] == FLOOR_ID
    assert rgb[r1, c1, 0] > rgb[r0, c0, 0] and rgb[r1, c1, 2] > rgb[r0, c0, 2]
