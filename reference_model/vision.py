"""Stage 1, the vision stage (stands in for CLIP's pretraining): a small CLIP-architecture
``CLIPVisionModel`` learns, per patch, the object class and colour under the patch's centre pixel
(labels from the renderer's instance map), read from the penultimate layer, the layer LLaVA-3D
uses. The tower is then frozen, as upstream."""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
from torch import nn

from reference_model.config import VISION
from reference_model.prefetch import process_pool
from reference_model.progress import log
from reference_model.scenes import ROOM_LABELS, VISION_SEED_OFFSET, data_fingerprint, render, render_labels

LR = 2e-3
BATCH = 32


def _stage1_views(s: int, mean, std, views_per_scene: int | None):
    """Stage 1's data of one scene: the pixel values and patch class / colour labels of its
    (seeded random subset of) views, as numpy arrays (cheap to send from a worker process)."""
    from adatoken_compile.runtime.scene import preprocess_scene

    info, r = render(s)
    pre = preprocess_scene(r.scene, VISION["image_size"], mean, std)
    c, k, n_cls, n_col = render_labels(r, info)
    V = len(c)
    views = np.arange(V) if not views_per_scene or views_per_scene >= V else \
        np.sort(np.random.default_rng(s).choice(V, views_per_scene, replace=False))
    return pre.pixel_values[views], c[views], k[views], n_cls, n_col


def _render_stage1(seeds, mean, std, views_per_scene: int | None, workers: int):
    """Pixel values, class labels and colour labels of every stage-1 view (tensors), and the
    numbers of class and colour labels; rendered in a pool of ``workers`` + 1 processes when
    ``workers`` (the training process only waits for them)."""
    pix, cls_l, col_l = [], [], []
    job = functools.partial(_stage1_views, mean=mean, std=std, views_per_scene=views_per_scene)
    with process_pool(workers + 1 if workers else 0) as pool:
        for p, c, k, n_cls, n_col in (pool.imap(job, seeds, chunksize=4) if pool else map(job, seeds)):
            pix.append(torch.from_numpy(p))
            cls_l.append(torch.from_numpy(c))
            col_l.append(torch.from_numpy(k))
    return torch.cat(pix), torch.cat(cls_l), torch.cat(col_l), n_cls, n_col


def pretrain_vision(seeds, steps: int, mean, std, log_every: int = 50, object_weight: float = 1.0,
                    views_per_scene: int | None = None, workers: int = 0):
    """``object_weight``: loss weight of object patches relative to floor/wall/ceiling ones
    (objects cover a quarter of the patches; the room's patches are easy and dominate the loss).
    ``views_per_scene``: use only this many (seeded random) views of each scene, so that more
    scenes fit in memory -- the tower overfits the objects of few scenes (linear probe on object
    patches: 0.85 on its training scenes, 0.74 on new ones, with 150 scenes x 20 views).
    ``workers``: render the scenes in a pool of that many background processes + 1 (the same
    arrays)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionModel(CLIPVisionConfig(**VISION))
    pix, cls_l, col_l, n_cls, n_col = _render_stage1(seeds, mean, std, views_per_scene, workers)
    log(f"vision pretraining on {len(pix)} views of {len(seeds)} scenes")
    d = VISION["hidden_size"]
    heads = nn.ModuleDict({"cls": nn.Linear(d, n_cls), "col": nn.Linear(d, n_col)})
    params = list(vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    vision.train()
    for step in range(steps):
        idx = torch.randint(0, len(pix), (BATCH,), generator=g)
        hs = vision(pixel_values=pix[idx], output_hidden_states=True).hidden_states[-2][:, 1:]
        yc, yk = cls_l[idx].flatten(), col_l[idx].flatten()
        w = torch.where(yc >= ROOM_LABELS, object_weight, 1.0)
        loss = ((nn.functional.cross_entropy(heads["cls"](hs).flatten(0, 1), yc, reduction="none")
                 + nn.functional.cross_entropy(heads["col"](hs).flatten(0, 1), yk, reduction="none")) * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        for pg in opt.param_groups:
            pg["lr"] = LR * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            log(f"vision step {step}/{steps} loss {loss.item():.3f}")
    vision.eval()
    for p in vision.parameters():
        p.requires_grad_(False)
    return vision, _patch_accuracy(vision, heads, pix, cls_l, col_l)


@torch.no_grad()
def _patch_accuracy(vision, heads, pix, cls_l, col_l, n: int = 64) -> dict:
    """Class and colour accuracy of the heads on the first ``n`` training views (a sanity check
    recorded in TRAINING.json, not a held-out figure)."""
    hs = vision(pixel_values=pix[:n], output_hidden_states=True).hidden_states[-2][:, 1:]
    acc_c = (heads["cls"](hs).argmax(-1) == cls_l[:n]).float().mean().item()
    acc_k = (heads["col"](hs).argmax(-1) == col_l[:n]).float().mean().item()
    log(f"vision patch accuracy (train views): class {acc_c:.3f} colour {acc_k:.3f}")
    return {"patch_class_acc": acc_c, "patch_colour_acc": acc_k}


def frozen_tower(state_dict: dict):
    """The stage-1 tower from its weights, frozen (eval mode, no gradients) as stage 2 uses it."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionModel(CLIPVisionConfig(**VISION))
    vision.load_state_dict(state_dict)
    return vision.eval().requires_grad_(False)


def lent_tower_provenance(model_dir: str, settings: dict) -> dict:
    """The stage-1 record of a trained model folder (``vision_tower/`` and ``TRAINING.json``) whose
    tower a run borrows, read only: a stage 2 on a tower that is already shipped (e.g. another recipe
    on the bundled model's tower, so that only the decoder's training differs). Refused in one line
    when the folder is not a model or its stage 1 had other settings (checked before any work)."""
    import json

    from adatoken_compile.errors import InputError

    prov_path = os.path.join(model_dir, "TRAINING.json")
    if not (os.path.isfile(prov_path) and os.path.isdir(os.path.join(model_dir, "vision_tower"))):
        raise InputError(f"{model_dir}: --vision-cache folder holds no TRAINING.json and vision_tower/ ; pass a model "
                         "folder written by reference_model.train or a cache file")
    with open(prov_path) as f:
        prov = json.load(f).get("vision_pretraining", {})
    theirs = {k: prov.get(k) for k in settings}
    if theirs != settings:
        raise InputError(f"{prov_path}: its vision tower was trained with {theirs}, not {settings} ; pass the same "
                         "--seed and --vision-* settings or another --vision-cache")
    return prov


def _model_tower(model_dir: str, settings: dict):
    """(tower, stats) of a model folder's tower (:func:`lent_tower_provenance`); the folder is never
    retrained into or written."""
    from transformers import CLIPVisionModel

    prov = lent_tower_provenance(model_dir, settings)
    tower_dir = os.path.join(model_dir, "vision_tower")
    log(f"vision tower from {tower_dir} (its TRAINING.json records the same stage-1 settings {settings})")
    state = CLIPVisionModel.from_pretrained(tower_dir).state_dict()
    return frozen_tower(state), {k: float(prov[k]) for k in ("patch_class_acc", "patch_colour_acc")}


def _cached_tower(cache: str | None, settings: dict, data: str):
    """(tower, stats) from ``cache`` when it holds a tower of ``settings`` trained on renders of
    the scene code ``data`` (or is a model folder with such a tower: :func:`_model_tower`);
    otherwise None, saying why when the file exists."""
    if cache and os.path.isdir(cache):
        return _model_tower(cache, settings)
    blob = torch.load(cache, weights_only=True) if cache and os.path.exists(cache) else None
    if blob is None:
        return None
    if blob.get("settings") == settings and blob.get("data") == data:
        log(f"vision tower from {cache} (stage 1 of an earlier run with the same settings {settings})")
        return frozen_tower(blob["state_dict"]), {k: float(v) for k, v in blob["stats"].items()}
    if blob.get("settings") != settings:
        log(f"{cache} holds a tower trained with {blob.get('settings')}, not {settings}: retraining stage 1")
    else:
        log(f"{cache} holds a tower trained on renders of other generator/renderer code (data {blob.get('data')}, "
            f"now {data}): retraining stage 1")
    return None


def stage1_settings(seed: int, scenes: int, steps: int, object_weight: float, views: int | None) -> dict:
    """What makes a stage-1 tower: the key of its cache, recorded in TRAINING.json."""
    return {"seed": seed, "scenes": scenes, "steps": steps, "object_weight": object_weight, "views_per_scene": views,
            "tower": {k: VISION[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}}


def vision_stage(seed: int, scenes: int, steps: int, object_weight: float = 1.0, views: int | None = None,
                 cache: str | None = None, workers: int = 0):
    """Stage 1, or its result from ``cache`` when that file was written with the same settings and
    the same scene code (:func:`data_fingerprint`); otherwise stage 1 is retrained and the cache
    overwritten. Returns (tower, settings, stats)."""
    from adatoken_compile.benchmark3d.dataset import SPLITS
    from adatoken_compile.models.testing import CLIP_MEAN, CLIP_STD

    lo = SPLITS["train"][0] + VISION_SEED_OFFSET
    settings = stage1_settings(seed, scenes, steps, object_weight, views)
    data = data_fingerprint()
    cached = _cached_tower(cache, settings, data)
    if cached is not None:
        return cached[0], settings, cached[1]
    torch.manual_seed(seed)
    vision, stats = pretrain_vision(range(lo, lo + scenes), steps, CLIP_MEAN, CLIP_STD, object_weight=object_weight,
                                    views_per_scene=views, workers=workers)
    if cache:
        tmp = cache + ".tmp"
        torch.save({"state_dict": vision.state_dict(), "stats": stats, "settings": settings, "data": data}, tmp)
        os.replace(tmp, cache)
    return vision, settings, stats
