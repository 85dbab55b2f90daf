"""What one training scene gives the Qwen2.5-VL recipe: its images exactly as the benchmark feeds
them to an image model, the tower's patches, a label per merged image token (which object it
shows), and the questions of ``reference_model.scenes.training_questions``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adatoken_compile.benchmark3d.dataset import IMAGE_VIEWS, view_image
from adatoken_compile.benchmark3d.render import (TOP_DOWN_MARGIN, TOP_DOWN_PX_PER_M, make_cameras, render_scene,
                                                 render_top_down)
from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES, make_world
from reference_model.scenes import training_questions

OBJECT_SHARE = 0.1  # a merged token shows an object when the object covers this share of its pixels


def qwen_tokenizer():
    """The checkpoint's tokenizer: word-level, trained on the chat template's fixed text and every
    question and answer the benchmark can emit, with Qwen2.5-VL's special tokens."""
    from adatoken_compile.benchmark3d.questions import all_texts
    from adatoken_compile.models.testing import qwen25vl_tokenizer

    return qwen25vl_tokenizer(["system user assistant You are a helpful assistant."] + list(all_texts()))


def scene_images_and_instances(info) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The benchmark's images of a scene (``dataset.scene_images``: bird's-eye view, then the views
    ``IMAGE_VIEWS``) and each one's instance map; only those views are rendered (a view's pixels do
    not depend on the others)."""
    top, top_ids = render_top_down(info)
    r = render_scene(info, poses=make_cameras(info)[list(IMAGE_VIEWS)])
    return [top] + [view_image(v) for v in r.scene.images], [top_ids] + list(r.instance)


def token_instances(instance: np.ndarray, grid_h: int, grid_w: int, factor: int) -> np.ndarray:
    """(grid_h * grid_w,) object index shown by each merged token of an image resized to
    ``grid_h * factor`` x ``grid_w * factor`` (the instance map resized nearest), raster order:
    the object with most pixels in the token if it covers ``OBJECT_SHARE`` of them, else -1."""
    H, W = instance.shape
    rows = np.minimum(((np.arange(grid_h * factor) + 0.5) * H / (grid_h * factor)).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(grid_w * factor) + 0.5) * W / (grid_w * factor)).astype(np.int64), W - 1)
    ids = instance[rows][:, cols].astype(np.int64)
    blocks = ids.reshape(grid_h, factor, grid_w, factor).transpose(0, 2, 1, 3).reshape(grid_h * grid_w, -1)
    out = np.full(len(blocks), -1, np.int64)
    for i, b in enumerate(blocks):
        obj = b[b >= 0]
        if len(obj):
            vals, counts = np.unique(obj, return_counts=True)
            if counts.max() >= OBJECT_SHARE * b.size:
                out[i] = vals[counts.argmax()]
    return out


def top_down_token_xy(grid_h: int, grid_w: int, factor: int) -> np.ndarray:
    """(grid_h * grid_w, 2) floor position (metres) of each merged token's centre in the
    bird's-eye view (drawn at one scale, so every token has one)."""
    hh, ww = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    px = np.stack([ww.ravel(), hh.ravel()], 1) * factor + factor / 2
    return ((px - TOP_DOWN_MARGIN) / TOP_DOWN_PX_PER_M).astype(np.float32)


@dataclass
class SceneExample:
    seed: int
    info: object
    questions: list
    patches: list  # per image (N, patch_dim) float32
    grids: list  # per image (3,) grid_thw
    token_class: np.ndarray  # per merged token of all images in order: class index, -1 for the room
    token_colour: np.ndarray
    top_xy: np.ndarray  # floor position of the bird's-eye view's tokens (the first image)


def scene_example(seed: int, processing, relation_draws: int) -> SceneExample:
    """Scene ``seed`` as the recipe trains on it (``processing``: the checkpoint's image processing)."""
    info = make_world(seed)
    images, instances = scene_images_and_instances(info)
    cls_of = np.array([CLASSES.index(o.cls) for o in info.objects], np.int64)
    col_of = np.array([COLOR_NAMES.index(o.color) for o in info.objects], np.int64)
    patches, grids, tcls, tcol = [], [], [], []
    m = processing.merge_size
    for im, inst in zip(images, instances):
        p, g = processing.patches(im)
        patches.append(p.astype(np.float32))
        grids.append(np.asarray(g))
        ti = token_instances(inst, int(g[1]) // m, int(g[2]) // m, processing.factor)
        tcls.append(np.where(ti >= 0, cls_of[np.clip(ti, 0, None)], -1))
        tcol.append(np.where(ti >= 0, col_of[np.clip(ti, 0, None)], -1))
    top_xy = top_down_token_xy(int(grids[0][1]) // m, int(grids[0][2]) // m, processing.factor)
    return SceneExample(seed, info, training_questions(info, seed, relation_draws), patches, grids,
                        np.concatenate(tcls), np.concatenate(tcol), top_xy)
