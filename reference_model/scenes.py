"""Training data of llava3d-tiny: rendered procedural rooms, the per-patch labels the renderer's
instance map gives, the questions asked of a training scene, and the frozen tower's features of a
scene as stage 2 keeps them."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from adatoken_compile.runtime.scene import preprocess_scene, resize_crop_params, unproject_patches, voxelize
from reference_model.config import VISION

ROOM_LABELS = 3  # patch/voxel class labels 0..2 are floor, wall, ceiling; objects are ROOM_LABELS + class index
VISION_SEED_OFFSET = 500_000  # stage-1 scenes: train seeds shifted by this, disjoint from the QA scenes


def render(seed: int):
    """(scene info, render) of the procedural room ``seed``."""
    from adatoken_compile.benchmark3d.render import render_scene
    from adatoken_compile.benchmark3d.world import make_world

    info = make_world(seed)
    return info, render_scene(info)


def _patch_ids(instance: np.ndarray, H: int, W: int, size: int, patch: int) -> np.ndarray:
    """Instance id of each patch, (V, g*g): the render's id (object index, or a negative room id)
    at the patch's centre pixel after resize+crop, nearest."""
    nh, nw, top, left = resize_crop_params(H, W, size)
    g = size // patch
    centre = np.arange(g) * patch + patch // 2
    ri = np.minimum(((centre + top) * H / nh).astype(np.int64), H - 1)
    ci = np.minimum(((centre + left) * W / nw).astype(np.int64), W - 1)
    return instance[:, ri][:, :, ci].reshape(instance.shape[0], -1).astype(np.int64)


def patch_instances(instance: np.ndarray, H: int, W: int, size: int, patch: int) -> torch.Tensor:
    """Per patch (flattened over views), 0 for the room and i + 1 for object i (labels for
    ``voxel_majority``, whose result minus 1 is then a voxel's instance or -1)."""
    return torch.from_numpy(np.clip(_patch_ids(instance, H, W, size, patch) + 1, 0, None).reshape(-1))


def patch_labels(instance: np.ndarray, info, H: int, W: int, size: int, patch: int):
    """Class / colour label of each patch (centre pixel after resize+crop, nearest), (V, g*g)
    each, and the numbers of class and colour labels."""
    from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES

    ids = _patch_ids(instance, H, W, size, patch)
    cls_of = np.array([ROOM_LABELS + CLASSES.index(o.cls) for o in info.objects] or [0], np.int64)
    col_of = np.array([1 + COLOR_NAMES.index(o.color) for o in info.objects] or [0], np.int64)
    obj = ids >= 0
    cls = np.where(obj, cls_of[np.clip(ids, 0, None)], -1 - ids)  # floor -1 -> 0, wall -2 -> 1, ceiling -3 -> 2
    col = np.where(obj, col_of[np.clip(ids, 0, None)], 0)
    return cls, col, ROOM_LABELS + len(CLASSES), 1 + len(COLOR_NAMES)


def render_labels(r, info):
    """``patch_labels`` of a render at the tower's input size."""
    return patch_labels(r.instance, info, *r.scene.images.shape[1:3], VISION["image_size"], VISION["patch_size"])


def training_questions(info, seed: int, relation_draws: int = 4):
    """Every unambiguous question about a training scene, for supervision density (about 25 per
    scene instead of the ~6 the evaluation splits ask): counting and existence for every class,
    colour of every unique class, class of every unique colour, and the relation questions of
    ``relation_draws`` draws of the evaluation generator. Same templates and answers as the
    evaluation splits; only the mixture differs."""
    from adatoken_compile.benchmark3d.questions import (Question, q_class_of_color, q_color_of_class, q_count, q_exist,
                                                        questions_for)
    from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES, MAX_COUNT

    out = []
    for c in CLASSES:
        n = info.count(c)
        if n <= MAX_COUNT:
            out.append(Question(q_count(c), str(n), "counting", "count"))
        out.append(Question(q_exist(c), "yes" if n > 0 else "no", "existence", "exist"))
        if n == 1:
            o = next(o for o in info.objects if o.cls == c)
            out.append(Question(q_color_of_class(c), o.color, "attribute", "color_of_class"))
    for col in COLOR_NAMES:
        objs = [o for o in info.objects if o.color == col]
        if len(objs) == 1:
            out.append(Question(q_class_of_color(col), objs[0].cls, "attribute", "class_of_color"))
    seen = {q.text for q in out}
    for d in range(relation_draws):
        for q in questions_for(info, seed=seed + d * 10_000_000):
            if q.kind == "relation" and q.text not in seen:
                seen.add(q.text)
                out.append(q)
    return out


def count_answer_weights(infos) -> dict[str, float]:
    """Loss weight of a counting question by its answer, from the answers' frequencies over the
    training scenes ``infos``: w(a) = 1 / (K * f(a)) over the K answers seen, so every answer
    carries the same total weight and the weights average 1 over the counting questions. Random
    rooms hold many classes once or not at all (train answers 0/1/2/3/4 about 42/26/17/10/6%)
    while the evaluation splits ask every count about equally often; unweighted, the answer prior
    says "2" wherever the scene evidence between 2 and 4 is not sharp."""
    from collections import Counter

    from adatoken_compile.benchmark3d.world import CLASSES, MAX_COUNT

    freq = Counter(str(info.count(c)) for info in infos for c in CLASSES if info.count(c) <= MAX_COUNT)
    total = sum(freq.values())
    return {a: total / (len(freq) * n) for a, n in sorted(freq.items())}


def data_fingerprint() -> str:
    """Hash of the scene generator's and renderer's source (``benchmark3d/world.py``,
    ``benchmark3d/render.py``): a stage-1 cache is reused only for renders made by the same code (a
    changed pattern or camera rule retrains the tower; so does any edit of those files, comments
    included)."""
    from adatoken_compile.benchmark3d import render as render_module, world

    h = hashlib.sha256()
    for mod in (world, render_module):
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


class SceneCache:
    """Frozen-tower features of a scene: (V*P, Dv) + voxel map, computed once per scene."""

    def __init__(self, vision, mean, std):
        self.vision, self.mean, self.std = vision, mean, std

    @torch.no_grad()
    def __call__(self, scene):
        pre = preprocess_scene(scene, VISION["image_size"], self.mean, self.std)
        xyz = unproject_patches(pre.depths, pre.intrinsics, pre.poses, VISION["patch_size"]).reshape(-1, 3)
        f = self.vision(pixel_values=torch.from_numpy(pre.pixel_values), output_hidden_states=True).hidden_states[-2][:, 1:]
        return f.reshape(-1, f.shape[-1]).clone(), torch.from_numpy(xyz), voxelize(xyz)


def scene_entry(cache, scene_seed: int, relation_draws: int, templates, instances: bool):
    """What stage 2 keeps of a training scene: ((features, patch xyz, voxel map), (questions,
    scene info), (patch class, patch colour, patch instance or None)), or None when the scene asks
    no question of ``templates`` (then nothing is rendered)."""
    from adatoken_compile.benchmark3d.render import render_scene
    from adatoken_compile.benchmark3d.world import make_world

    info = make_world(scene_seed)
    qs_all = [q for q in training_questions(info, scene_seed, relation_draws) if templates is None or q.template in templates]
    if not qs_all:
        return None
    r = render_scene(info)
    c, k, _, _ = render_labels(r, info)
    pi = patch_instances(r.instance, *r.scene.images.shape[1:3], VISION["image_size"], VISION["patch_size"]) \
        if instances else None
    return cache(r.scene), (qs_all, info), (torch.from_numpy(c.reshape(-1)), torch.from_numpy(k.reshape(-1)), pi)
