"""Train the bundled reference model ``llava3d-tiny`` from scratch on CPU.

    python -m reference_model.train --out DIR [options]     # see TRAINING.json of the bundled model
                                                             # for the exact command that made it

Two stages, mirroring how LLaVA-3D is built from a pretrained CLIP:

1. *Vision pretraining* (stands in for CLIP's pretraining): a small CLIP-architecture
   ``CLIPVisionModel`` learns, per patch, the object class and colour under the patch's centre
   pixel (labels from the renderer's instance map), read from the penultimate layer -- the layer
   LLaVA-3D uses. The tower is then frozen, as upstream.
2. *LLaVA-3D training*: 3D position embedding, projector and Llama decoder trained end to end
   on question answering (next-token loss on the answer and EOS), through exactly the adapter
   path (preprocessing, unprojection, voxel pooling, llava_v1 prompt, splice).
   All questions of one scene are PACKED into one sequence behind one copy of the scene tokens,
   with a block attention mask and per-question position ids -- mathematically identical to
   separate sequences, about 8x cheaper.

Nothing in training asks for sparse attention or token dropping: any redundancy measured later
comes from learning the task.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import queue
import shlex
import sys
import time

import numpy as np
import torch
from torch import nn

from adatoken_compile.contract import Sample
from adatoken_compile.errors import InputError
from adatoken_compile.runtime.scene import preprocess_scene, unproject_patches, voxelize

VISION = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, image_size=224, patch_size=14)
ROOM_LABELS = 3  # patch/voxel class labels 0..2 are floor, wall, ceiling; objects are ROOM_LABELS + class index
VISION_SEED_OFFSET = 500_000  # stage-1 scenes: train seeds shifted by this, disjoint from the QA scenes
DECODER = dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4, intermediate_size=384,
               max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data helpers

def _patch_ids(instance: np.ndarray, H: int, W: int, size: int, patch: int) -> np.ndarray:
    """Instance id of each patch, (V, g*g): the render's id (object index, or a negative room id)
    at the patch's centre pixel after resize+crop, nearest."""
    from adatoken_compile.runtime.scene import _resize_crop_params

    nh, nw, top, left = _resize_crop_params(H, W, size)
    g = size // patch
    centre = np.arange(g) * patch + patch // 2
    ri = np.minimum(((centre + top) * H / nh).astype(np.int64), H - 1)
    ci = np.minimum(((centre + left) * W / nw).astype(np.int64), W - 1)
    return instance[:, ri][:, :, ci].reshape(instance.shape[0], -1).astype(np.int64)


def _patch_instances(instance: np.ndarray, H: int, W: int, size: int, patch: int) -> torch.Tensor:
    """Per patch (flattened over views), 0 for the room and i + 1 for object i (labels for
    ``voxel_majority``, whose result minus 1 is then a voxel's instance or -1)."""
    return torch.from_numpy(np.clip(_patch_ids(instance, H, W, size, patch) + 1, 0, None).reshape(-1))


def _patch_labels(instance: np.ndarray, info, H: int, W: int, size: int, patch: int):
    """Class / colour label of each patch (centre pixel after resize+crop, nearest)."""
    from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES

    ids = _patch_ids(instance, H, W, size, patch)
    cls_of = np.array([ROOM_LABELS + CLASSES.index(o.cls) for o in info.objects] or [0], np.int64)
    col_of = np.array([1 + COLOR_NAMES.index(o.color) for o in info.objects] or [0], np.int64)
    obj = ids >= 0
    cls = np.where(obj, cls_of[np.clip(ids, 0, None)], -1 - ids)  # floor -1 -> 0, wall -2 -> 1, ceiling -3 -> 2
    col = np.where(obj, col_of[np.clip(ids, 0, None)], 0)
    return cls, col, ROOM_LABELS + len(CLASSES), 1 + len(COLOR_NAMES)


def _render(seed: int):
    from adatoken_compile.benchmark3d.render import render_scene
    from adatoken_compile.benchmark3d.world import make_world

    info = make_world(seed)
    return info, render_scene(info)


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


# --------------------------------------------------------------------------- stage 1

def _stage1_views(s: int, mean, std, views_per_scene: int | None):
    """Stage 1's data of one scene: the pixel values and patch class / colour labels of its
    (seeded random subset of) views, as numpy arrays (cheap to send from a worker process)."""
    info, r = _render(s)
    pre = preprocess_scene(r.scene, VISION["image_size"], mean, std)
    c, k, n_cls, n_col = _patch_labels(r.instance, info, *r.scene.images.shape[1:3], VISION["image_size"], VISION["patch_size"])
    V = len(c)
    views = np.arange(V) if not views_per_scene or views_per_scene >= V else \
        np.sort(np.random.default_rng(s).choice(V, views_per_scene, replace=False))
    return pre.pixel_values[views], c[views], k[views], n_cls, n_col


@contextlib.contextmanager
def _pool(workers: int):
    """A pool of ``workers`` spawned processes (None for 0: work in this process). Spawned, not
    forked: a fork of a process whose torch thread pool has started can hang. One torch thread
    each: a worker is a core that renders."""
    if not workers:
        yield None
        return
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def pretrain_vision(seeds, steps: int, mean, std, log_every: int = 50, object_weight: float = 1.0,
                    views_per_scene: int | None = None, workers: int = 0):
    """``object_weight``: loss weight of object patches relative to floor/wall/ceiling ones
    (objects cover a quarter of the patches; the room's patches are easy and dominate the loss).
    ``views_per_scene``: use only this many (seeded random) views of each scene, so that more
    scenes fit in memory -- the tower overfits the objects of few scenes (linear probe on object
    patches: 0.85 on its training scenes, 0.74 on new ones, with 150 scenes x 20 views).
    ``workers``: render the scenes in a pool of that many background processes + 1 (this process
    only waits for them; the same arrays)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionModel(CLIPVisionConfig(**VISION))
    pix, cls_l, col_l = [], [], []
    job = functools.partial(_stage1_views, mean=mean, std=std, views_per_scene=views_per_scene)
    with _pool(workers + 1 if workers else 0) as pool:  # the training process only waits for them
        for p, c, k, n_cls, n_col in (pool.imap(job, seeds, chunksize=4) if pool else map(job, seeds)):
            pix.append(torch.from_numpy(p))
            cls_l.append(torch.from_numpy(c))
            col_l.append(torch.from_numpy(k))
    pix, cls_l, col_l = torch.cat(pix), torch.cat(cls_l), torch.cat(col_l)
    log(f"vision pretraining on {len(pix)} views of {len(seeds)} scenes")
    d = VISION["hidden_size"]
    heads = nn.ModuleDict({"cls": nn.Linear(d, n_cls), "col": nn.Linear(d, n_col)})
    params = list(vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    vision.train()
    for step in range(steps):
        idx = torch.randint(0, len(pix), (32,), generator=g)
        hs = vision(pixel_values=pix[idx], output_hidden_states=True).hidden_states[-2][:, 1:]
        yc, yk = cls_l[idx].flatten(), col_l[idx].flatten()
        w = torch.where(yc >= ROOM_LABELS, object_weight, 1.0)
        loss = ((nn.functional.cross_entropy(heads["cls"](hs).flatten(0, 1), yc, reduction="none")
                 + nn.functional.cross_entropy(heads["col"](hs).flatten(0, 1), yk, reduction="none")) * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        for pg in opt.param_groups:
            pg["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            log(f"vision step {step}/{steps} loss {loss.item():.3f}")
    vision.eval()
    for p in vision.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        hs = vision(pixel_values=pix[:64], output_hidden_states=True).hidden_states[-2][:, 1:]
        acc_c = (heads["cls"](hs).argmax(-1) == cls_l[:64]).float().mean().item()
        acc_k = (heads["col"](hs).argmax(-1) == col_l[:64]).float().mean().item()
    log(f"vision patch accuracy (train views): class {acc_c:.3f} colour {acc_k:.3f}")
    return vision, {"patch_class_acc": acc_c, "patch_colour_acc": acc_k}


def data_fingerprint() -> str:
    """Hash of the scene generator's and renderer's source (``data/world.py``, ``data/render.py``):
    a stage-1 cache is reused only for renders made by the same code (a changed pattern or camera
    rule retrains the tower; so does any edit of those files, comments included)."""
    from adatoken_compile.benchmark3d import render, world

    h = hashlib.sha256()
    for mod in (world, render):
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def frozen_tower(state_dict: dict):
    """The stage-1 tower from its weights, frozen (eval mode, no gradients) as stage 2 uses it."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionModel(CLIPVisionConfig(**VISION))
    vision.load_state_dict(state_dict)
    return vision.eval().requires_grad_(False)


def vision_stage(seed: int, scenes: int, steps: int, object_weight: float = 1.0, views: int | None = None,
                 cache: str | None = None, workers: int = 0):
    """Stage 1, or its result from ``cache`` when that file was written with the same settings and
    the same scene code (:func:`data_fingerprint`); otherwise stage 1 is retrained and the cache
    overwritten. Returns (tower, settings, stats)."""
    from adatoken_compile.benchmark3d.dataset import SPLITS
    from adatoken_compile.models.testing import CLIP_MEAN, CLIP_STD

    lo = SPLITS["train"][0] + VISION_SEED_OFFSET
    settings = {"seed": seed, "scenes": scenes, "steps": steps, "object_weight": object_weight, "views_per_scene": views,
                "tower": {k: VISION[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}}
    data = data_fingerprint()
    blob = torch.load(cache, weights_only=True) if cache and os.path.exists(cache) else None
    if blob is not None and blob.get("settings") == settings and blob.get("data") == data:
        vision = frozen_tower(blob["state_dict"])
        log(f"vision tower from {cache} (stage 1 of an earlier run with the same settings {settings})")
        return vision, settings, {k: float(v) for k, v in blob["stats"].items()}
    if blob is not None and blob.get("settings") != settings:
        log(f"{cache} holds a tower trained with {blob.get('settings')}, not {settings}: retraining stage 1")
    elif blob is not None:
        log(f"{cache} holds a tower trained on renders of other generator/renderer code (data {blob.get('data')}, "
            f"now {data}): retraining stage 1")
    torch.manual_seed(seed)
    vision, stats = pretrain_vision(range(lo, lo + scenes), steps, CLIP_MEAN, CLIP_STD, object_weight=object_weight,
                                    views_per_scene=views, workers=workers)
    if cache:
        tmp = cache + ".tmp"
        torch.save({"state_dict": vision.state_dict(), "stats": stats, "settings": settings, "data": data}, tmp)
        os.replace(tmp, cache)
    return vision, settings, stats


# --------------------------------------------------------------------------- stage 2

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
    c, k, _, _ = _patch_labels(r.instance, info, *r.scene.images.shape[1:3], VISION["image_size"], VISION["patch_size"])
    pi = _patch_instances(r.instance, *r.scene.images.shape[1:3], VISION["image_size"], VISION["patch_size"]) \
        if instances else None
    return cache(r.scene), (qs_all, info), (torch.from_numpy(c.reshape(-1)), torch.from_numpy(k.reshape(-1)), pi)


def _convert(x, kind: type, to):
    """``x`` with every ``kind`` instance in its nested tuples replaced by ``to(it)`` (tensors to
    numpy and back; nothing else is touched, numpy arrays a voxel map holds included)."""
    if isinstance(x, tuple):
        return tuple(_convert(v, kind, to) for v in x)
    return to(x) if isinstance(x, kind) else x


def _prefetch_worker(state: dict, seeds: list[int], relation_draws: int, templates, instances: bool, threads: int, out):
    """Background process of :class:`ScenePrefetch`: the entries of ``seeds``, in order, as numpy."""
    import traceback

    from adatoken_compile.models.testing import CLIP_MEAN, CLIP_STD

    torch.set_num_threads(threads)
    try:
        cache = SceneCache(frozen_tower({k: torch.from_numpy(v) for k, v in state.items()}), CLIP_MEAN, CLIP_STD)
        for sd in seeds:
            e = scene_entry(cache, sd, relation_draws, templates, instances)
            # numpy, not tensors: torch would pass each tensor as a shared-memory handle, thousands of them
            out.put((sd, None if e is None else _convert(e, torch.Tensor, torch.Tensor.numpy)))
    except BaseException:
        out.put((None, traceback.format_exc()))


class ScenePrefetch:
    """Stage 2's first epoch renders each scene and runs the frozen tower over its 20 views (about
    0.5 s a scene on an idle core, most of an early step's time). ``--workers N`` prepares the
    scenes ahead, in visiting order, in N spawned processes (scene j of the order in worker j mod N,
    at most ``depth`` ahead each), while training steps run. Each worker runs on one torch thread
    (one core); with ``--threads 1`` the entries, and the trained weights, are the same bit for bit
    as without workers. ``done``: every scene of the order has been handed out."""

    def __init__(self, vision, seeds: list[int], workers: int, relation_draws: int, templates, instances: bool,
                 depth: int = 8):
        ctx = multiprocessing.get_context("spawn")
        state = {k: v.numpy() for k, v in vision.state_dict().items()}
        self.seeds, self.next = list(seeds), 0
        self.queues = [ctx.Queue(maxsize=depth) for _ in range(workers)]
        self.procs = [ctx.Process(target=_prefetch_worker, daemon=True,
                                  args=(state, self.seeds[j::workers], relation_draws, templates, instances,
                                        1, q)) for j, q in enumerate(self.queues)]
        for pr in self.procs:
            pr.start()

    def get(self, seed: int):
        """The entry of ``seed``, which must be the next one of the visiting order."""
        if self.next >= len(self.seeds) or self.seeds[self.next] != seed:
            raise RuntimeError(f"scene prefetch: asked for scene {seed} out of the visiting order")
        j = self.next % len(self.queues)
        while True:
            try:
                got, e = self.queues[j].get(timeout=10)
                break
            except queue.Empty:
                if not self.procs[j].is_alive():
                    raise RuntimeError(f"scene prefetch: worker {j} exited (code {self.procs[j].exitcode}) "
                                       f"before scene {seed}") from None
        if got is None:
            raise RuntimeError(f"scene prefetch: worker {j} failed on scene {seed}:\n{e}")
        assert got == seed, (got, seed)
        self.next += 1
        return None if e is None else _convert(e, np.ndarray, torch.from_numpy)

    @property
    def done(self) -> bool:
        return self.next >= len(self.seeds)

    def close(self):
        for pr in self.procs:
            if pr.is_alive():
                pr.terminate()
            pr.join()


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


def packed_sequence(prefix_ids, n_spatial, qa_ids):
    """Layout [prefix][spatial][q1 a1]...[qk ak] with a block-causal mask.

    Returns (text_ids_list, allow (L,L) bool, position ids (L,), segment starts).
    """
    P = len(prefix_ids) + n_spatial
    L = P + sum(len(q) for q in qa_ids)
    allow = torch.zeros(L, L, dtype=torch.bool)
    allow[:P, :P] = torch.tril(torch.ones(P, P, dtype=torch.bool))
    pos = torch.empty(L, dtype=torch.long)
    pos[:P] = torch.arange(P)
    starts, s = [], P
    for q in qa_ids:
        n = len(q)
        allow[s : s + n, :P] = True
        allow[s : s + n, s : s + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        pos[s : s + n] = torch.arange(P, P + n)
        starts.append(s)
        s += n
    return allow, pos, starts


def voxel_majority(patch_labels: torch.Tensor, inverse: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """Per voxel, the most frequent label among its patches (``inverse``: patch -> voxel index);
    ties go to the smaller label."""
    votes = torch.zeros(num_voxels, int(patch_labels.max()) + 1)
    votes.index_add_(0, inverse, nn.functional.one_hot(patch_labels).float())
    return votes.argmax(1)


def object_targets(vc: torch.Tensor, vk: torch.Tensor):
    """Object voxels (majority class label >= ROOM_LABELS) with their class index and colour index
    (-1 where the colour vote tied with the room's "no colour" and went to the room)."""
    obj = vc >= ROOM_LABELS
    return obj, vc[obj] - ROOM_LABELS, vk[obj] - 1


def instance_markers(vc: torch.Tensor, vi: torch.Tensor):
    """The --instance-weight targets of a scene's voxel tokens: ``on`` = object voxels (majority
    class an object, majority instance an object) and, over those, ``mark`` = first token of its
    instance. Over 40 training scenes, the markers of a class equal its count in 194 of 200
    (scene, class) pairs (a fully hidden object is missed, a mixed voxel adds one)."""
    on = (vc >= ROOM_LABELS) & (vi >= 0)
    return on, first_of_instance(torch.where(on, vi, -1))[on]


def first_of_instance(voxel_instance: torch.Tensor) -> torch.Tensor:
    """True at the first token (in sequence order) of each object instance; ``voxel_instance``
    holds a voxel's majority instance id, -1 for room voxels. One marker per object whatever its
    size, so "how many chairs" becomes "how many chair markers": a number of tokens with a sharp
    feature, which attention against a fixed sink (the prefix) can turn into a share that grows
    with the count -- unlike voxel shares, which follow the objects' sizes."""
    out = torch.zeros(len(voxel_instance), dtype=torch.bool)
    ids = voxel_instance[voxel_instance >= 0]
    if len(ids):
        where = torch.nonzero(voxel_instance >= 0).squeeze(1)
        uniq, inv = torch.unique(ids, return_inverse=True)
        first = torch.full((len(uniq),), len(voxel_instance), dtype=torch.long).scatter_reduce(0, inv, where, "amin")
        out[first] = True
    return out


def balanced_bce(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the positives and the negatives each averaged on their own, then
    the two means averaged: a rare positive class (a few markers among hundreds of voxels) weighs
    as much as the rest, so "never" is not a cheap answer."""
    ce = nn.functional.binary_cross_entropy_with_logits(scores, target.float(), reduction="none")
    parts = [ce[m].mean() for m in (target, ~target) if m.any()]
    return sum(parts) / len(parts)


def class_colour_loss(cls_scores, col_scores, cls_t, col_t) -> torch.Tensor:
    """Mean of the class and the colour cross-entropy over object voxels; a voxel without a colour
    target (``col_t`` < 0) counts for the class only."""
    has = col_t >= 0
    col = nn.functional.cross_entropy(col_scores[has], col_t[has]) if has.any() else cls_scores.new_zeros(())
    return 0.5 * (nn.functional.cross_entropy(cls_scores, cls_t) + col)


def qa_targets(suffix_len: int, answer_ids: list[int], dense: bool = False, dense_from: int = 2):
    """Labels of one packed question block ``suffix + answer`` (label at p = token p+1): the
    answer tokens and EOS after the last suffix token; with ``dense`` also a second label row
    where every question position from ``dense_from`` on predicts the answer's first token (deep
    supervision: a scene look-up can then be learned at the question word, one hop, before the
    final position learns to gather it). The default 2 skips "\n" and the first word, which carry
    no question yet; ``key_word_position`` gives the first position where the question text
    determines its answer. Returns (labels, dense_labels), -100 = ignored."""
    n = suffix_len + len(answer_ids)
    main = [-100] * (suffix_len - 1) + list(answer_ids) + [-100]
    extra = [-100] * n
    if dense:
        for p in range(max(2, dense_from), suffix_len - 1):
            extra[p] = answer_ids[0]
    return main, extra


def weighted_cross_entropy(logits, labels, weight) -> torch.Tensor:
    """Cross-entropy averaged over the labelled positions (label != -100) with a weight per
    position: sum(w * ce) / sum(w); equal weights give the plain mean."""
    m = labels != -100
    if not m.any():
        return logits.new_zeros(())
    ce = nn.functional.cross_entropy(logits[m], labels[m], reduction="none")
    return (ce * weight[m]).sum() / weight[m].sum()


def training_tokenizer():
    """The bundled model's tokenizer: trained on the system prompt and every question and answer
    the generator can emit, inside the real llava_v1 prompt pieces ("\n" included)."""
    from adatoken_compile.benchmark3d import dataset as ds
    from adatoken_compile.models.llava3d import SYSTEM_PROMPT, llava_v1_prompt
    from adatoken_compile.runtime.tokenizer import build_word_tokenizer

    texts = [SYSTEM_PROMPT, "USER: ASSISTANT:"] + list(ds.all_texts())
    texts += [llava_v1_prompt(t) for t in ds.all_texts()]
    return build_word_tokenizer(texts, vocab_size=600)


def key_word_ids(tok) -> set[int]:
    """Last token of every class / plural / colour word: the words a question's answer hinges on."""
    from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES, PLURALS

    return {tok.encode(" " + w)[-1] for w in (*CLASSES, *PLURALS.values(), *COLOR_NAMES)}


def key_word_position(suffix_ids: list[int], key_ids: set[int]) -> int:
    """Index of the last class / colour word in a question's token ids (2 if none): before it the
    question text does not yet say what is asked ("which is closer to the red object, the blue
    one" has one candidate of two), so an answer target there can only be met by a guess from the
    scene alone. (Measured in session 8: on its own this did not make the relation answers name a
    candidate; README, model section.)"""
    hits = [i for i, t in enumerate(suffix_ids) if t in key_ids]
    return hits[-1] if hits else 2


def word_of_key_token(tok) -> dict[int, tuple[str, str]]:
    """Token id -> ("class", name) / ("colour", name) for the last token of every singular class
    word and colour word (plurals name several objects and are left out)."""
    from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES

    out = {tok.encode(" " + c)[-1]: ("class", c) for c in CLASSES}
    out.update({tok.encode(" " + c)[-1]: ("colour", c) for c in COLOR_NAMES})
    return out


def room_frame(p, room):
    """Positions in metres from the room's centre, halved (about -2..2 on the floor plane): the
    targets of both position read-outs (``room`` the extents, of p's type and length)."""
    return (p - room / 2) / 2


def locate_targets(suffix_ids: list[int], word_of: dict[int, tuple[str, str]], info) -> list[tuple[int, tuple[float, float]]]:
    """(position, floor position) for every class / colour word of a question that names exactly
    one object of the scene: the object's centre on the floor plane (``room_frame``). A relation question ("which is closer to the red object, the
    blue one or the green one?") names three colour-unique objects; supervising where each is at
    its word gives the distance comparison its inputs one hop early."""
    out = []
    for i, t in enumerate(suffix_ids):
        if t not in word_of:
            continue
        what, name = word_of[t]
        objs = [o for o in info.objects if (o.cls if what == "class" else o.color) == name]
        if len(objs) == 1:
            xy = room_frame(objs[0].center[:2], np.asarray(info.room[:2]))
            out.append((i, (float(xy[0]), float(xy[1]))))
    return out


def position_targets(centres: torch.Tensor, room) -> torch.Tensor:
    """--position-weight's targets: voxel centres (N, 3) in the frame of ``room_frame``."""
    return room_frame(centres.float(), torch.as_tensor(np.asarray(room, np.float32)))


RELATION_TEMPLATES = ("closer", "farther", "closer_yesno")


def relation_objects(suffix_ids: list[int], word_of: dict[int, tuple[str, str]], info, template: str):
    """For a relation question ("which is closer to the red object, the blue one or the green one?";
    every relation template names c0, c1, c2 in that order): [(position of the colour word, object)]
    for the three colour-unique objects it names; None for other questions."""
    if template not in RELATION_TEMPLATES:
        return None
    words = [(i, word_of[t][1]) for i, t in enumerate(suffix_ids) if t in word_of and word_of[t][0] == "colour"]
    named = [(i, [o for o in info.objects if o.color == c]) for i, c in words]
    if len(named) != 3 or any(len(o) != 1 for _, o in named):
        return None  # relation questions name three colour-unique objects; anything else is not one
    return [(i, o[0]) for i, o in named]


def distance_targets(suffix_ids: list[int], word_of: dict[int, tuple[str, str]], info, template: str):
    """--distance-weight's target for a relation question ("which is closer to the red object, the
    blue one or the green one?"): the floor distances (red, blue) and (red, green), in the units of
    ``room_frame`` (metres, halved), in the order the question names them; None for other questions."""
    from adatoken_compile.benchmark3d.questions import floor_distance

    named = relation_objects(suffix_ids, word_of, info, template)
    if named is None:
        return None
    (_, o0), (_, o1), (_, o2) = named
    return (0.5 * floor_distance(o0, o1), 0.5 * floor_distance(o0, o2))


def candidate_distance_targets(suffix_ids: list[int], word_of: dict[int, tuple[str, str]], info,
                               template: str) -> list[tuple[int, float]]:
    """--candidate-distance-weight's targets for a relation question: at each candidate's colour word
    (blue, green in "which is closer to the red object, the blue one or the green one?") its floor
    distance to the reference object (red), in the units of ``room_frame``; [] for other questions.
    Each hop of the comparison is then supervised where it happens (the reference's position is
    known by the candidate words, which the answer only has to compare); the read-out at the last
    position (--distance-weight) asks for both hops at once and was not learnt (session 14).
    Measured on a toy of this comparison: README, "Relation toy"."""
    from adatoken_compile.benchmark3d.questions import floor_distance

    named = relation_objects(suffix_ids, word_of, info, template)
    if named is None:
        return []
    (_, o0), *cands = named
    return [(i, 0.5 * floor_distance(o0, o)) for i, o in cands]


def compare_targets(suffix_ids: list[int], word_of: dict[int, tuple[str, str]], info,
                    template: str) -> list[tuple[int, float]]:
    """--compare-weight's target for a relation question: at the second candidate's colour word
    (green in "which is closer to the red object, the blue one or the green one?") 1.0 if the first
    candidate is the closer one (d(red, blue) < d(red, green)), else 0.0; [] for other questions.
    The candidate-distance read-out gives each candidate word its own distance; this supervises the
    one step left, the comparison, where both distances are one hop apart (session 19: with only
    the distances supervised the answer named a candidate every time but picked at chance)."""
    from adatoken_compile.benchmark3d.questions import floor_distance

    named = relation_objects(suffix_ids, word_of, info, template)
    if named is None:
        return []
    (_, o0), (_, o1), (i2, o2) = named
    return [(i2, 1.0 if floor_distance(o0, o1) < floor_distance(o0, o2) else 0.0)]


DENSE_FROM = ("question", "key-word")
VISION_PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2


def lr_factor(progress: float, decay_frac: float | None = None) -> float:
    """Learning-rate multiplier after warm-up at ``progress`` (0..1 of the post-warm-up steps):
    cosine over the whole run (default), or with ``decay_frac`` F constant 1 until 1 - F and a
    cosine to 0 over the last F (warm-up/stable/decay: the answer accuracy of these runs climbs
    only after a break-away at ~55-70% of the steps, where a whole-run cosine has already
    halved the rate)."""
    p = min(1.0, progress)
    f = 1.0 if decay_frac is None else decay_frac  # F = 1 is the whole-run cosine, float for float
    start = 1.0 - f
    return 1.0 if p <= start else 0.5 * (1 + math.cos(math.pi * (p - start) / f))


def room_keep_share(step: int, bg_steps: int, hold_steps: int, keep_max: float = 1.0) -> float | None:
    """Share of the floor / wall / ceiling voxels a training step keeps (None: the whole scene;
    object voxels are always kept). --bg-curriculum: the first ``bg_steps`` phase the share in
    from 0 to ``keep_max``, so the question tokens first find objects among a few hundred tokens,
    then among the whole scene. --bg-hold: then ``keep_max`` until step ``hold_steps``; room
    surfaces are ~86% of a scene's voxels and answer no question, so such a step costs about a
    third of a whole-scene step (0.33 vs 1.08 s at share 0.2) and the hour buys more steps. The
    steps after both see whole scenes, as evaluated."""
    if step < bg_steps:
        return keep_max * step / bg_steps
    if step < hold_steps:
        return keep_max
    return None


def curriculum_templates(stages, stage_steps: int, step: int) -> set | None:
    """Templates trained at ``step`` under a template curriculum (None: every template): phase j
    (steps j*stage_steps .. (j+1)*stage_steps) trains on the templates of stages 0..j, cumulatively,
    so the easy look-ups are learned before the whole mixture competes for the same heads."""
    if not stages or stage_steps <= 0 or step >= stage_steps * len(stages):
        return None
    return set().union(*stages[: step // stage_steps + 1])


def command_line(argv: list[str]) -> str:
    """The command as a shell would need it typed again: arguments such as a template curriculum
    ('exist,class_of_color;count') carry shell metacharacters and must stay quoted."""
    return "python -m reference_model.train " + shlex.join(argv)


def check_read_out(flag: str, weight: float, layer: int) -> None:
    """One-line error for a training-only read-out's --FLAG-weight (>= 0) and --FLAG-layer (a
    decoder layer, checked only when the read-out is on)."""
    n = DECODER["num_hidden_layers"]
    if weight < 0 or (weight and not 1 <= layer <= n):
        raise InputError(f"train: --{flag}-weight {weight} must be >= 0 and --{flag}-layer {layer} 1..{n} (decoder layers)")


def read_out_head(weight: float, out_dim: int, params: list) -> nn.Linear | None:
    """A training-only linear read-out of the decoder's hidden state (not saved) when its loss
    weight is on, its parameters appended to the optimiser's ``params``; None when off."""
    if not weight:
        return None
    head = nn.Linear(DECODER["hidden_size"], out_dim)
    params += list(head.parameters())
    return head


def word_read_out_at(starts: list[int], per_question: list[list]) -> list:
    """The packed sequence's (position, target) pairs of a read-out whose targets are given per
    question as (offset in the question's block, target): block start + offset."""
    return [(s + i, t) for s, targets in zip(starts, per_question) for i, t in targets]


def read_out_loss(hidden_states, layer: int, head: nn.Module, at: list, errors: list,
                  binary: bool = False) -> torch.Tensor:
    """Loss of a training-only linear read-out: ``head`` applied to the hidden state after decoder
    layer ``layer`` at the positions of ``at`` = [(position, target), ...], against the targets:
    MSE, its value appended to ``errors`` (the log's rms); or with ``binary`` logistic (targets 0/1),
    the share of correct signs appended (the log's accuracy)."""
    pred = head(hidden_states[layer][0, torch.tensor([a for a, _ in at])])
    target = torch.tensor([t for _, t in at]).reshape(pred.shape)
    if binary:
        err = nn.functional.binary_cross_entropy_with_logits(pred, target)
        errors.append(((pred > 0).float() == target).float().mean().item())
        return err
    err = nn.functional.mse_loss(pred, target)
    errors.append(err.item())
    return err


def train(out_dir: str, *, seed: int = 0, vision_scenes: int = 120, vision_steps: int = 400,
          scenes: int = 1200, epochs: float = 2.0, lr: float = 1.5e-3, minutes: float | None = None,
          curriculum_views: int = 0, curriculum_frac: float = 0.3, embed_std: float = 0.3,
          vision_cache: str | None = None, vision_object_weight: float = 1.0, vision_views: int | None = None,
          aux_weight: float = 0.0, bg_curriculum: float = 0.0, dense_answer: float = 0.0, rope_theta: float = 10000.0,
          scenes_per_step: int = 1, align_weight: float = 0.0, bg_keep_max: float = 1.0,
          templates: tuple[str, ...] | None = None, template_stages: tuple[tuple[str, ...], ...] | None = None,
          template_frac: float = 0.5, decoder_seed: int | None = None, dense_from: str = "question",
          relation_draws: int = 4, count_balance: bool = False, locate_weight: float = 0.0,
          locate_layer: int = 4, instance_weight: float = 0.0, instance_layer: int = 3,
          lr_decay_frac: float | None = None, position_weight: float = 0.0, pe_scale: float = 1.0,
          distance_weight: float = 0.0, distance_layer: int = 5, bg_hold: float = 0.0,
          candidate_distance_weight: float = 0.0, candidate_distance_layer: int = 4,
          compare_weight: float = 0.0, compare_layer: int = 7, workers: int = 0) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from adatoken_compile.benchmark3d import dataset as ds
    from adatoken_compile.benchmark3d.questions import TEMPLATES
    from adatoken_compile.benchmark3d.world import make_world
    from adatoken_compile.models.llava3d import PositionEmbedding3D, build_projector, llava_v1_prompt, tokenize_with_placeholders
    from adatoken_compile.models.testing import CLIP_MEAN, CLIP_STD, save_llava3d

    for names, where in [(templates or (), "")] + [(st, " in --template-curriculum") for st in template_stages or ()]:
        bad = sorted(set(names) - set(TEMPLATES))
        if bad:
            raise InputError(f"train: unknown question template(s) {', '.join(bad)}{where}; choose from {', '.join(TEMPLATES)}")
    if dense_from not in DENSE_FROM:
        raise InputError(f"train: --dense-from {dense_from!r} is not one of {', '.join(DENSE_FROM)}")
    for flag, weight, layer in (("locate", locate_weight, locate_layer), ("instance", instance_weight, instance_layer),
                                ("distance", distance_weight, distance_layer),
                                ("candidate-distance", candidate_distance_weight, candidate_distance_layer),
                                ("compare", compare_weight, compare_layer)):
        check_read_out(flag, weight, layer)
    if lr_decay_frac is not None and not 0.0 < lr_decay_frac <= 1.0:
        raise InputError(f"train: --lr-decay-frac {lr_decay_frac} must be in (0, 1] (the share of the steps the decay spans)")
    if position_weight < 0 or pe_scale <= 0:
        raise InputError(f"train: --position-weight {position_weight} must be >= 0 and --pe-scale {pe_scale} > 0")
    if workers < 0:
        raise InputError(f"train: --workers {workers} must be >= 0 (background processes that render scenes; 0: none)")
    if relation_draws < 0:
        raise InputError(f"train: --relation-draws {relation_draws} must be >= 0 (draws of the relation generator per scene)")
    if not 0.0 <= bg_hold < 1.0 or not 0.0 < bg_keep_max <= 1.0:
        raise InputError(f"train: --bg-hold {bg_hold} must be in [0, 1) (the share of the steps that keep only "
                         f"--bg-keep-max of the room voxels) and --bg-keep-max {bg_keep_max} in (0, 1]")
    if template_stages and not 0.0 < template_frac <= 1.0:
        raise InputError(f"train: --template-frac {template_frac} must be in (0, 1] (the share of the steps the curriculum spans)")
    torch.manual_seed(seed)
    np.random.seed(seed)
    t0 = time.time()
    train_lo = ds.SPLITS["train"][0]
    # ---------------------------------------------------------------- tokenizer
    tok = training_tokenizer()
    log(f"tokenizer: {tok.vocab_size} tokens")
    # ---------------------------------------------------------------- stage 1
    vision, vsettings, vstats = vision_stage(seed, vision_scenes, vision_steps, vision_object_weight, vision_views,
                                             vision_cache, workers)
    # ---------------------------------------------------------------- stage 2 modules
    # stage 2 has its own seed (default: --seed) so that decoder runs can be repeated over seeds on one
    # cached stage-1 tower
    dseed = seed if decoder_seed is None else decoder_seed
    torch.manual_seed(dseed + 1)  # same decoder init whether stage 1 ran or came from the cache
    # rope_theta: with head_dim 32 and theta 1e4 only ~3 of 16 rotary pairs stay nearly constant
    # across the ~1,500 positions between a question and a scene token, so content look-ups have
    # few dimensions to work with; theta 1e6 (as in Llama 3 / Qwen2 style configs) leaves about half
    dcfg = LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, rope_theta=rope_theta, **DECODER)
    dcfg._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(dcfg)
    # text embeddings start at the scale of the projected spatial tokens (norm ~3 for hidden 128)
    # instead of HF's std 0.02 (norm ~0.2), so question words are not drowned by ~1,400 scene tokens
    nn.init.normal_(lm.model.embed_tokens.weight, std=embed_std)
    pe = PositionEmbedding3D(3, VISION["hidden_size"])
    if pe_scale != 1.0:
        # --pe-scale: the stage-1 CLIP features that the position embedding is added to have norm
        # ~41 while a default-initialised embedding ends training at ~4.4, so a linear read of a
        # token's position from the decoder's input is poor (docs/experiments/voxel_probe.py on
        # run E: R^2 0.46 / 0.51 for x / y); start the embedding's last layer S times larger
        # (run S, S = 10: 0.84 / 0.84, no accuracy gain; README, model section)
        with torch.no_grad():
            pe.position_embedding_head[-1].weight.mul_(pe_scale)
            pe.position_embedding_head[-1].bias.mul_(pe_scale)
    proj = build_projector("mlp2x_gelu", VISION["hidden_size"], DECODER["hidden_size"], "train")
    params = list(lm.parameters()) + list(pe.parameters()) + list(proj.parameters())
    # --locate-weight: a training-only linear read-out of floor positions (not saved)
    locate_head = read_out_head(locate_weight, 2, params)
    # --instance-weight: a training-only marker read-out (not saved): is this scene token the
    # first of its object instance?
    marker_head = read_out_head(instance_weight, 1, params)
    # --position-weight: a training-only linear read-out (not saved) of each scene token's own
    # position from the token as it enters the decoder, so that attention can copy positions
    # (run P, W = 1: the probe's R^2 0.98 / 0.98; relations 0.50 -> 0.56 on 500 test questions)
    position_head = read_out_head(position_weight, 3, params)
    # --distance-weight: a training-only linear read-out (not saved), at each relation question's
    # last position, of the two distances the answer compares
    distance_head = read_out_head(distance_weight, 2, params)
    # --candidate-distance-weight: a training-only linear read-out (not saved), at each relation
    # candidate's colour word, of its distance to the reference object
    cand_head = read_out_head(candidate_distance_weight, 1, params)
    # --compare-weight: a training-only logistic read-out (not saved), at each relation question's
    # second candidate word, of which candidate is the closer one
    compare_head = read_out_head(compare_weight, 1, params)
    log(f"decoder params {sum(p.numel() for p in lm.parameters())/1e6:.2f}M")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    cache = SceneCache(vision, CLIP_MEAN, CLIP_STD)

    prefix_ids = None
    from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES

    class_word = torch.tensor([tok.encode(" " + c)[0] for c in CLASSES])
    colour_word = torch.tensor([tok.encode(" " + c)[0] for c in COLOR_NAMES])
    key_ids = key_word_ids(tok)
    word_of = word_of_key_token(tok)
    total_steps = int(scenes * epochs) // scenes_per_step  # optimizer steps
    curriculum_steps = int(curriculum_frac * total_steps)
    bg_steps = int(bg_curriculum * total_steps)
    hold_steps = int(bg_hold * total_steps)
    stage_steps = int(template_frac * total_steps) // len(template_stages) if template_stages else 0
    warm = min(100, total_steps // 10)
    count_w = count_answer_weights([make_world(train_lo + i) for i in range(scenes)]) if count_balance else None
    if count_w:
        log("counting-question loss weights by answer: " + ", ".join(f"{a}: {w:.2f}" for a, w in count_w.items()))
    # scene features are cached in memory across epochs (about 1.3 MB per scene)
    feats_cache: dict[int, tuple] = {}
    order = np.random.default_rng(dseed).permutation(scenes)
    step, seen, skipped, losses, t_stage = 0, 0, 0, [], time.time()
    opt.zero_grad()
    hits, tot, dense_hits, dense_tot, locate_err, marker_acc, position_err = [], [], [], [], [], [], []
    distance_err, cand_err, compare_acc = [], [], []
    lm.train()
    prefetch = ScenePrefetch(vision, [train_lo + int(j) for j in order], workers, relation_draws, templates,
                             marker_head is not None) if workers else None
    threads = torch.get_num_threads()
    if prefetch and threads > 1:  # the workers' cores are lent back after the first epoch
        torch.set_num_threads(max(1, threads - workers))
        log(f"first epoch: training on {torch.get_num_threads()} thread(s) while {workers} worker(s) render")
    try:
        while step < total_steps:
            i = int(order[seen % scenes])
            scene_seed = train_lo + i
            if prefetch and prefetch.done and scene_seed in feats_cache:
                prefetch.close()  # every scene is cached: nothing is rendered any more
                prefetch = None
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                    log(f"first epoch done at step {step}: training on {threads} threads")
            if scene_seed not in feats_cache:  # first epoch; None: no question of --templates, nothing rendered
                feats_cache[scene_seed] = prefetch.get(scene_seed) if prefetch else \
                    scene_entry(cache, scene_seed, relation_draws, templates, marker_head is not None)
            entry = feats_cache[scene_seed]
            active = curriculum_templates(template_stages, stage_steps, step)
            qs = [] if entry is None else entry[1][0] if active is None else [q for q in entry[1][0] if q.template in active]
            if not qs:  # no question of --templates (nothing rendered) or of the curriculum's current stage
                seen += 1
                skipped += 1
                if skipped > scenes:
                    raise InputError(f"train: no training scene has a question of the templates {', '.join(templates)}"
                                     if entry is None else "train: no training scene has a question of the curriculum stage "
                                     f"{', '.join(sorted(active))}; put a template that every scene asks (exist, count) first")
                continue
            skipped = 0
            (f, xyz, vmap), _, (pcls, pcol, pinst) = entry
            if curriculum_views and step < curriculum_steps:
                # curriculum: early steps see a random subset of the views (fewer tokens, easier
                # attention discovery); the rest of training sees whole scenes as evaluated
                V = len(f) // VISION_PATCHES
                views = np.random.default_rng(dseed * 7919 + step).choice(V, size=min(curriculum_views, V), replace=False)
                rows = (views[:, None] * VISION_PATCHES + np.arange(VISION_PATCHES)[None]).reshape(-1)
                f, xyz = f[rows], xyz[rows]
                pcls, pcol = pcls[rows], pcol[rows]
                pinst = None if pinst is None else pinst[rows]
                vmap = voxelize(xyz.numpy())
            # scene tokens through the trainable part of the adapter path
            v = f + pe(xyz)
            inv = torch.from_numpy(vmap.inverse)
            pooled = torch.zeros(vmap.num_tokens, v.shape[1]).index_add(0, inv, v) / \
                torch.bincount(inv, minlength=vmap.num_tokens)[:, None].float()
            # per-voxel majority class / colour of its patches (for the alignment loss and curriculum)
            vc, vk = voxel_majority(pcls, inv, vmap.num_tokens), voxel_majority(pcol, inv, vmap.num_tokens)
            vi = None if pinst is None else voxel_majority(pinst, inv, vmap.num_tokens) - 1
            centres = torch.from_numpy(vmap.centers)
            keep_p = room_keep_share(step, bg_steps, hold_steps, bg_keep_max)
            if keep_p is not None:
                rnd = torch.from_numpy(np.random.default_rng(dseed * 104729 + step).random(vmap.num_tokens))
                sel = (vc >= ROOM_LABELS) | (rnd < keep_p)
                pooled, vc, vk, centres = pooled[sel], vc[sel], vk[sel], centres[sel]
                vi = None if vi is None else vi[sel]
            n_sp = len(pooled)
            spatial = proj(pooled)
            # text: prefix (BOS + system + "USER: ") and, per question, "\n{q} ASSISTANT:" + " {a}" + EOS
            qa, targets, answer_at, q_weight, where, dist, cand, comp = [], [], [], [], [], [], [], []
            for q in qs:
                q_weight.append(count_w.get(q.answer, 1.0) if count_w and q.template == "count" else 1.0)
                ids = tokenize_with_placeholders(tok, llava_v1_prompt(q.text))
                k = ids.index(-200)
                if prefix_ids is None:
                    prefix_ids = ids[:k]
                suffix = ids[k + 1 :]
                ans = tok.encode(" " + q.answer) + [tok.eos_id]
                qa.append(suffix + ans)
                targets.append(qa_targets(len(suffix), ans, dense=bool(dense_answer),
                                          dense_from=key_word_position(suffix, key_ids) if dense_from == "key-word" else 2))
                answer_at.append(len(suffix) - 1)  # block offset whose label is the answer's first token
                where.append(locate_targets(suffix, word_of, entry[1][1]) if locate_head is not None else [])
                dist.append(distance_targets(suffix, word_of, entry[1][1], q.template) if distance_head is not None else None)
                cand.append(candidate_distance_targets(suffix, word_of, entry[1][1], q.template) if cand_head is not None else [])
                comp.append(compare_targets(suffix, word_of, entry[1][1], q.template) if compare_head is not None else [])
            allow, pos, starts = packed_sequence(prefix_ids, n_sp, qa)
            emb = lm.get_input_embeddings()
            x = torch.cat([emb(torch.tensor(prefix_ids)), spatial] + [emb(torch.tensor(s)) for s in qa])[None]
            labels = torch.full((x.shape[1],), -100, dtype=torch.long)
            dense_labels = torch.full_like(labels, -100)
            pos_weight = torch.ones(x.shape[1])
            for s, (t, d), w in zip(starts, targets, q_weight):
                labels[s : s + len(t)] = torch.tensor(t)  # label at position p = token p+1
                dense_labels[s : s + len(d)] = torch.tensor(d)
                pos_weight[s : s + len(t)] = w
            out = lm(inputs_embeds=x, attention_mask=allow[None, None], position_ids=pos[None],
                     output_hidden_states=any(h is not None for h in (locate_head, marker_head, distance_head, cand_head, compare_head)))
            logits = out.logits[0]
            if count_w:
                loss = weighted_cross_entropy(logits, labels, pos_weight)
                if dense_answer:
                    loss = loss + dense_answer * weighted_cross_entropy(logits, dense_labels, pos_weight)
            else:  # the unweighted path, kept as it was so that earlier recorded commands reproduce bit for bit
                loss = nn.functional.cross_entropy(logits, labels, ignore_index=-100)
                if dense_answer:
                    loss = loss + dense_answer * nn.functional.cross_entropy(logits, dense_labels, ignore_index=-100)
            at = word_read_out_at(starts, where)
            if at:
                loss = loss + locate_weight * read_out_loss(out.hidden_states, locate_layer, locate_head, at, locate_err)
            at_d = [(s + a, d) for s, a, d in zip(starts, answer_at, dist) if d is not None]
            if at_d:
                loss = loss + distance_weight * read_out_loss(out.hidden_states, distance_layer, distance_head, at_d, distance_err)
            at_c = word_read_out_at(starts, cand)
            if at_c:
                loss = loss + candidate_distance_weight * read_out_loss(out.hidden_states, candidate_distance_layer, cand_head,
                                                                        at_c, cand_err)
            at_k = word_read_out_at(starts, comp)
            if at_k:
                loss = loss + compare_weight * read_out_loss(out.hidden_states, compare_layer, compare_head, at_k,
                                                             compare_acc, binary=True)
            if position_head is not None:
                pos_err = nn.functional.mse_loss(position_head(spatial), position_targets(centres, entry[1][1].room))
                loss = loss + position_weight * pos_err
                position_err.append(pos_err.item())
            obj, cls_t, col_t = object_targets(vc, vk)
            on, mark = instance_markers(vc, vi) if marker_head is not None else (None, None)
            if on is not None and on.any():  # (a voxel can vote object by class but room by instance)
                h = out.hidden_states[instance_layer][0, len(prefix_ids) : len(prefix_ids) + n_sp][on]
                sc = marker_head(h).squeeze(1)
                loss = loss + instance_weight * balanced_bce(sc, mark)
                with torch.no_grad():
                    marker_acc.append(0.5 * (((sc > 0) & mark).sum() / mark.sum().clamp(min=1)
                                             + ((sc <= 0) & ~mark).sum() / (~mark).sum().clamp(min=1)).item())
            if aux_weight > 0 and obj.any():
                # auxiliary "dense caption" of the scene tokens: at each spatial position, the object's
                # class and colour words (majority over the voxel's patches), like LLaVA's alignment stage
                sl = logits[len(prefix_ids) : len(prefix_ids) + n_sp][obj]
                col_words = torch.where(col_t >= 0, colour_word[col_t.clamp(min=0)], -1)
                loss = loss + aux_weight * class_colour_loss(sl, sl, class_word[cls_t], col_words)
            if align_weight > 0 and obj.any():
                # word alignment of the projected scene tokens (before the decoder): an object voxel's
                # token must score highest, by dot product, with the input embeddings of its class and
                # colour words, so "ball" in a question can find ball voxels with a layer-0 match of
                # like with like (the easy attention pattern) instead of a look-up learned from scratch
                s_obj = spatial[obj]
                loss = loss + align_weight * class_colour_loss(s_obj @ emb.weight[class_word].T,
                                                               s_obj @ emb.weight[colour_word].T, cls_t, col_t)
            (loss / scenes_per_step).backward()
            seen += 1
            losses.append(loss.item())
            with torch.no_grad():
                # answer accuracy: the first answer token, predicted at each question's last position
                first = torch.tensor(starts) + torch.tensor(answer_at)
                hits.append((logits[first].argmax(-1) == labels[first]).sum().item())
                tot.append(len(qa))
                dm = dense_labels != -100
                dense_hits.append((logits[dm].argmax(-1) == dense_labels[dm]).sum().item())
                dense_tot.append(int(dm.sum()))
            if seen % scenes_per_step:
                continue  # gradient accumulation: one optimizer step per scenes_per_step scenes
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            # cosine decay on progress = steps done or wall time used, whichever is further along
            prog = (step - warm) / max(1, total_steps - warm)
            if minutes is not None:
                prog = max(prog, (time.time() - t_stage) / max(1.0, minutes * 60 - (t_stage - t0)))
            cur = lr * (step + 1) / warm if step < warm else lr * lr_factor(prog, lr_decay_frac)
            for pg in opt.param_groups:
                pg["lr"] = cur
            opt.step()
            opt.zero_grad()
            step += 1
            if step % 25 == 0:
                el = time.time() - t_stage
                w = 25 * scenes_per_step
                log(f"step {step}/{total_steps} loss {np.mean(losses[-w:]):.4f} "
                    f"answer acc {sum(hits[-w:]) / max(1, sum(tot[-w:])):.3f} "
                    + (f"(at question words {sum(dense_hits[-w:]) / max(1, sum(dense_tot[-w:])):.3f}) " if dense_answer else "")
                    + (f"locate rms {2 * math.sqrt(np.mean(locate_err[-w:])):.2f} m " if locate_err else "")
                    + (f"marker bal. acc {np.mean(marker_acc[-w:]):.3f} " if marker_acc else "")
                    + (f"position rms {2 * math.sqrt(np.mean(position_err[-w:]) * 3):.2f} m " if position_err else "")
                    + (f"distance rms {2 * math.sqrt(np.mean(distance_err[-w:])):.2f} m " if distance_err else "")
                    + (f"cand. distance rms {2 * math.sqrt(np.mean(cand_err[-w:])):.2f} m " if cand_err else "")
                    + (f"compare acc {np.mean(compare_acc[-w:]):.3f} " if compare_acc else "")
                    + f"lr {cur:.2e} "
                    f"{el / step:.2f}s/step eta {el / step * (total_steps - step) / 60:.1f} min")
            if minutes is not None and time.time() - t0 > minutes * 60:
                log(f"time budget of {minutes} min reached at step {step}")
                break
    finally:
        if prefetch:
            prefetch.close()
        torch.set_num_threads(threads)
    lm.eval()
    provenance = {
        "command": command_line(sys.argv[1:]),
        "seed": seed,
        "decoder_seed": dseed,
        "data": {"generator": "adatoken_compile.benchmark3d (procedural rooms)", "split": "train",
                 "scene_seeds": [train_lo, train_lo + scenes - 1],
                 "vision_scene_seeds": [train_lo + VISION_SEED_OFFSET, train_lo + VISION_SEED_OFFSET + vision_scenes - 1]},
        "vision_pretraining": {**vsettings, **vstats},
        "decoder_training": {"steps": step, "epochs": epochs, "lr": lr, "lr_decay_frac": lr_decay_frac, "final_loss": float(np.mean(losses[-50:])),
                             "embed_std": embed_std, "aux_weight": aux_weight,
                             "curriculum": {"views": curriculum_views, "steps": curriculum_steps} if curriculum_views else None,
                             "bg_curriculum_steps": bg_steps, "bg_keep_max": bg_keep_max, "bg_hold_steps": hold_steps or None, "templates": templates, "dense_answer": dense_answer,
                             "dense_from": dense_from, "relation_draws": relation_draws,
                             "count_balance": count_w,
                             "locate": {"weight": locate_weight, "layer": locate_layer} if locate_weight else None,
                             "instance_marker": {"weight": instance_weight, "layer": instance_layer} if instance_weight else None,
                             "position_weight": position_weight or None, "pe_scale": pe_scale if pe_scale != 1.0 else None,
                             "distance": {"weight": distance_weight, "layer": distance_layer} if distance_weight else None,
                             "candidate_distance": {"weight": candidate_distance_weight, "layer": candidate_distance_layer}
                             if candidate_distance_weight else None,
                             "compare": {"weight": compare_weight, "layer": compare_layer} if compare_weight else None,
                             "rope_theta": rope_theta, "scenes_per_step": scenes_per_step,
                             "align_weight": align_weight,
                             "template_curriculum": {"stages": [list(t) for t in template_stages], "steps_per_stage": stage_steps}
                             if template_stages else None},
        "wall_minutes": round((time.time() - t0) / 60, 1),
        "torch": torch.__version__,
    }
    save_llava3d(out_dir, lm, vision, pe, proj, tok, extra={"adatoken_training": provenance})
    with open(os.path.join(out_dir, "TRAINING.json"), "w") as f:
        json.dump(provenance, f, indent=2)
    log(f"saved {out_dir} after {provenance['wall_minutes']} min")
    record_eval(out_dir)
    return provenance


def record_eval(model_dir: str, limit: int = 50) -> dict:
    """Evaluate a saved checkpoint through the real adapter on the fixed CI sample
    (``iter_samples("test", limit=50)``) and record the result in its TRAINING.json."""
    from adatoken_compile.benchmark3d.dataset import iter_samples
    from adatoken_compile.evaluation.accuracy import evaluate, torch_answer_fn
    from adatoken_compile.models.llava3d import Llava3DAdapter

    res = evaluate(torch_answer_fn(Llava3DAdapter(model_dir)), list(iter_samples("test", limit=limit)))
    path = os.path.join(model_dir, "TRAINING.json")
    with open(path) as f:
        prov = json.load(f)
    prov["ci_sample_eval"] = {"split": "test", "limit": limit, "accuracy": res["accuracy"], "n": res["n"],
                              "per_kind": res["per_kind"]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(prov, f, indent=2)
    os.replace(tmp, path)
    log(f"CI-sample accuracy {res['accuracy']:.3f} on {res['n']} test questions")
    return res


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoder-seed", type=int, default=None,
                   help="seed of stage 2 (decoder init, scene order, curricula); default: --seed")
    p.add_argument("--scenes", type=int, default=1200)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--vision-scenes", type=int, default=120)
    p.add_argument("--vision-steps", type=int, default=400)
    p.add_argument("--vision-object-weight", type=float, default=1.0,
                   help="stage-1 loss weight of object patches vs floor/wall/ceiling patches")
    p.add_argument("--vision-views", type=int, default=None,
                   help="stage 1 uses this many random views of each of --vision-scenes scenes (default: all 20)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--lr-decay-frac", type=float, default=None,
                   help="keep the learning rate constant after warm-up and decay it (cosine) over only the last "
                        "fraction F of the steps (default: cosine over the whole run)")
    p.add_argument("--minutes", type=float, default=None, help="stop decoder training after this wall time")
    p.add_argument("--curriculum-views", type=int, default=0,
                   help="views per scene during the first --curriculum-frac of the steps (0: off)")
    p.add_argument("--curriculum-frac", type=float, default=0.3)
    p.add_argument("--embed-std", type=float, default=0.3, help="init std of the text embeddings")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the auxiliary class/colour-word loss on scene tokens (alignment)")
    p.add_argument("--align-weight", type=float, default=0.0,
                   help="weight of the loss tying projected object tokens to their class/colour word embeddings")
    p.add_argument("--dense-from", choices=DENSE_FROM, default="question",
                   help="where --dense-answer's targets start: 'question' = every question word after the "
                        "first; 'key-word' = from the last class/colour word, where the text first says what is "
                        "asked (relation questions name their second candidate last)")
    p.add_argument("--dense-answer", type=float, default=0.0,
                   help="weight of the answer loss at every question position (deep supervision; 0: off)")
    p.add_argument("--relation-draws", type=int, default=4,
                   help="draws of the evaluation generator's relation questions per training scene (duplicates "
                        "dropped): 4 -> about 3 relation questions per scene, 12 -> about 6")
    p.add_argument("--count-balance", action="store_true",
                   help="weight each counting question's loss by 1 / frequency of its answer over the training "
                        "scenes, so the answers 3 and 4 (rare in random rooms, as common as 0 in the test split) "
                        "stop losing to the prior")
    p.add_argument("--locate-weight", type=float, default=0.0,
                   help="weight of a training-only loss that reads, at every class/colour word naming a single "
                        "object, that object's floor position from the hidden state after --locate-layer (0: off)")
    p.add_argument("--locate-layer", type=int, default=4, help="decoder layer whose output --locate-weight reads (1..8)")
    p.add_argument("--instance-weight", type=float, default=0.0,
                   help="weight of a training-only marker loss: from the hidden state after --instance-layer, each "
                        "object scene token tells whether it is the first token of its object instance (0: off)")
    p.add_argument("--instance-layer", type=int, default=3, help="decoder layer whose output --instance-weight reads (1..8)")
    p.add_argument("--position-weight", type=float, default=0.0,
                   help="weight of a training-only loss that reads each scene token's voxel centre (metres from "
                        "the room's centre) linearly from the token as it enters the decoder (0: off)")
    p.add_argument("--pe-scale", type=float, default=1.0,
                   help="initialise the 3D position embedding's last layer this many times larger (the CLIP "
                        "features it is added to are ~10x the default embedding's norm)")
    p.add_argument("--distance-weight", type=float, default=0.0,
                   help="weight of a training-only loss that reads, at each relation question's last position, the "
                        "two floor distances the answer compares from the hidden state after --distance-layer (0: off)")
    p.add_argument("--distance-layer", type=int, default=5, help="decoder layer whose output --distance-weight reads (1..8)")
    p.add_argument("--candidate-distance-weight", type=float, default=0.0,
                   help="weight of a training-only loss that reads, at each relation candidate's colour word, its floor "
                        "distance to the reference object from the hidden state after --candidate-distance-layer (0: off)")
    p.add_argument("--candidate-distance-layer", type=int, default=4,
                   help="decoder layer whose output --candidate-distance-weight reads (1..8)")
    p.add_argument("--compare-weight", type=float, default=0.0,
                   help="weight of a training-only logistic loss that reads, at each relation question's second "
                        "candidate word, whether the first candidate is the closer one, from the hidden state after "
                        "--compare-layer (0: off)")
    p.add_argument("--compare-layer", type=int, default=7, help="decoder layer whose output --compare-weight reads (1..8)")
    p.add_argument("--scenes-per-step", type=int, default=1,
                   help="scenes per optimizer step (gradient accumulation; steps = scenes x epochs / this)")
    p.add_argument("--rope-theta", type=float, default=10000.0, help="decoder RoPE base")
    p.add_argument("--bg-curriculum", type=float, default=0.0,
                   help="fraction of the steps over which floor/wall/ceiling voxels are phased in (0: off)")
    p.add_argument("--templates", default=None,
                   help="train only on these question templates (comma-separated, e.g. color_of_class,exist)")
    p.add_argument("--template-curriculum", default=None,
                   help="cumulative template stages over --template-frac of the steps, e.g. "
                        "'exist,class_of_color;color_of_class;count' (stage j adds its templates; then all)")
    p.add_argument("--template-frac", type=float, default=0.5, help="fraction of the steps the template curriculum spans")
    p.add_argument("--bg-keep-max", type=float, default=1.0,
                   help="share of floor/wall/ceiling voxels kept at the end of --bg-curriculum (phased in from 0)")
    p.add_argument("--bg-hold", type=float, default=0.0,
                   help="keep --bg-keep-max (set it below 1) of the floor/wall/ceiling voxels after --bg-curriculum until "
                        "this share of the steps (cheaper steps; the rest see whole scenes)")
    p.add_argument("--vision-cache", default=None, help="reuse the stage-1 vision tower saved here by a run with the same seed and vision settings, else train and save it")
    p.add_argument("--record-eval-only", action="store_true",
                   help="only evaluate the checkpoint in --out on the fixed CI sample and record it in TRAINING.json")
    p.add_argument("--workers", type=int, default=0,
                   help="render scenes in N background processes, one core each, while training runs (stage 1's "
                        "renders, in N + 1; stage 2's first epoch, tower features included); with --threads 1 the same "
                        "weights bit for bit; on 2 cores, 1")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of training (1 avoids OpenMP collapse on a loaded machine); with "
                        "--workers N, stage 2's first epoch trains on threads - N (at least 1) while the workers render")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.record_eval_only:
        record_eval(a.out)
        return
    try:
        train(a.out, seed=a.seed, decoder_seed=a.decoder_seed, scenes=a.scenes, epochs=a.epochs, vision_scenes=a.vision_scenes,
              vision_steps=a.vision_steps, vision_object_weight=a.vision_object_weight,
              vision_views=a.vision_views, lr=a.lr, minutes=a.minutes, curriculum_views=a.curriculum_views,
              curriculum_frac=a.curriculum_frac, embed_std=a.embed_std, vision_cache=a.vision_cache,
              aux_weight=a.aux_weight, bg_curriculum=a.bg_curriculum,
              dense_answer=a.dense_answer, dense_from=a.dense_from, relation_draws=a.relation_draws,
              count_balance=a.count_balance, locate_weight=a.locate_weight, locate_layer=a.locate_layer,
              distance_weight=a.distance_weight, distance_layer=a.distance_layer,
              candidate_distance_weight=a.candidate_distance_weight, candidate_distance_layer=a.candidate_distance_layer,
              compare_weight=a.compare_weight, compare_layer=a.compare_layer,
              instance_weight=a.instance_weight, instance_layer=a.instance_layer, lr_decay_frac=a.lr_decay_frac,
              position_weight=a.position_weight, pe_scale=a.pe_scale,
              rope_theta=a.rope_theta,
              scenes_per_step=a.scenes_per_step, align_weight=a.align_weight, bg_keep_max=a.bg_keep_max, bg_hold=a.bg_hold,
              templates=tuple(a.templates.split(",")) if a.templates else None,
              template_stages=tuple(tuple(t for t in st.split(",") if t) for st in a.template_curriculum.split(";"))
              if a.template_curriculum else None, template_frac=a.template_frac, workers=a.workers)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
