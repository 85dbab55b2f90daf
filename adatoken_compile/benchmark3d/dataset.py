"""Splits and iteration over the procedural 3D QA benchmark.

Each scene seed gives one rendered scene (20 posed RGB-D views) and a fixed list of questions.
Splits are disjoint seed ranges (:data:`SPLITS`). ``iter_samples("test", limit=50)`` is the
fixed sample of the CI accuracy test.

Measure the benchmark's own figures (docs/benchmark3d.md) with::

    python -m adatoken_compile.benchmark3d.dataset stats --scenes 200      # render time, tokens
    python -m adatoken_compile.benchmark3d.dataset baseline                # text-only baseline, chance
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
from typing import Callable, Iterator

import numpy as np

from adatoken_compile.runtime.sample import Sample
from adatoken_compile.runtime.scene import Scene, preprocess_scene, unproject_patches, voxelize
from adatoken_compile.benchmark3d.questions import KINDS, TEMPLATES, WORDS, Question, all_texts, questions_for  # noqa: F401
from adatoken_compile.benchmark3d.render import render_scene, render_top_down
from adatoken_compile.benchmark3d.world import SceneInfo, make_world

SPLITS = {
    "train": (0, 1_000_000),
    "validation": (1_000_000, 2_000_000),
    "test": (2_000_000, 3_000_000),
    "calibration": (3_000_000, 4_000_000),
}
# the perspective views an image model gets after the bird's-eye view: the two that walk the walls
# and look into the room (every OVERVIEW_EVERY-th view of render.make_cameras)
IMAGE_VIEWS = (9, 19)
IMAGE_VIEW_SIZE = (168, 224)  # (H, W) they are given at (bicubic, from 240 x 320)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def scene_seeds(split: str) -> range:
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    lo, hi = SPLITS[split]
    return range(lo, hi)


def make_scene(seed: int) -> tuple[Scene, SceneInfo]:
    """Rendered scene and its ground-truth description."""
    info = make_world(seed)
    return render_scene(info).scene, info


def scene_images(info: SceneInfo, scene: Scene) -> list[np.ndarray]:
    """The images a 2D model (Qwen2.5-VL) gets for a scene, in prompt order: the room's
    bird's-eye view (:func:`~adatoken_compile.benchmark3d.render.render_top_down`: relations are
    floor distances, which a top-down view shows at one scale), then the rendered views
    ``IMAGE_VIEWS`` at ``IMAGE_VIEW_SIZE``. A function of the scene alone, the same for every
    question about it."""
    return [render_top_down(info)[0]] + [view_image(scene.images[v]) for v in IMAGE_VIEWS]


def view_image(image: np.ndarray) -> np.ndarray:
    """A rendered view at ``IMAGE_VIEW_SIZE`` (Pillow bicubic)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize(IMAGE_VIEW_SIZE[::-1], Image.BICUBIC))


def as_image_samples(samples) -> list[Sample]:
    """Benchmark samples (a rendered ``scene``, its ``seed`` in ``meta``) as image samples: the
    scene's :func:`scene_images` in ``image``, no scene; each scene's images made once. Other
    samples pass unchanged."""
    out, memo = [], {}
    for s in samples:
        if s.scene is None or s.image is not None or "seed" not in s.meta or "split" not in s.meta:
            out.append(s)
            continue
        key = (s.meta["seed"], id(s.scene))
        if key not in memo:
            memo.clear()  # a scene's questions are consecutive: one scene's images at a time
            memo[key] = scene_images(make_world(s.meta["seed"]), s.scene)
        out.append(Sample(question=s.question, image=memo[key], answer=s.answer, kind=s.kind, boxes=s.boxes,
                          meta=dict(s.meta)))
    return out


def iter_questions(split: str, num_scenes: int, start: int = 0) -> Iterator[tuple[int, SceneInfo, Question]]:
    """(seed, info, question) without rendering -- cheap; for statistics and baselines."""
    for seed in scene_seeds(split)[start : start + num_scenes]:
        info = make_world(seed)
        for q in questions_for(info):
            yield seed, info, q


def iter_samples(split: str, limit: int | None = None, start_scene: int = 0,
                 keep: Callable[[int, int], bool] | None = None, seeds: range | None = None) -> Iterator[Sample]:
    """Samples of ``split`` in a fixed order: scene seeds ascending from the split start (+
    ``start_scene``), each scene rendered once, its questions consecutive. ``limit`` counts
    samples (questions). ``keep(i, j)``: called for every sample with its position and its scene's
    (from 0); only the samples it accepts are yielded, and a scene none of whose samples it accepts
    is not rendered (one process's share of a data-parallel run). ``seeds``: these scene seeds
    instead of the split's (scenes no split holds; ``split`` then only labels the samples)."""
    n = 0
    for j, seed in enumerate((scene_seeds(split) if seeds is None else seeds)[start_scene:]):
        info = make_world(seed)
        qs = questions_for(info)[: None if limit is None else max(0, limit - n)]
        kept = [(i, q) for i, q in enumerate(qs) if keep is None or keep(n + i, j)]
        scene = render_scene(info).scene if kept else None
        for i, q in kept:
            yield Sample(
                question=q.text,
                scene=scene,
                answer=q.answer,
                kind=q.kind,
                meta={"seed": seed, "split": split, "index": i, "template": q.template},
            )
        n += len(qs)
        if limit is not None and n >= limit:
            return


# --------------------------------------------------------------------------- measurements


def text_only_baseline(train_scenes: int = 20000, test_scenes: int = 5000) -> dict:
    """Accuracy of answering from the question text alone, and chance, per kind.

    Baseline: for each distinct question text in the train split, its most frequent train answer
    (ties: lexicographically first); unseen texts fall back to the kind's majority answer.
    Chance: mean over test questions of 1 / (number of possible answers of the question form).
    """
    by_text: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for _, _, q in iter_questions("train", train_scenes):
        by_text[q.text][q.answer] += 1
        by_kind[q.kind][q.answer] += 1

    def top(c: Counter) -> str:
        m = max(c.values())
        return min(a for a, v in c.items() if v == m)

    pred_text = {t: top(c) for t, c in by_text.items()}
    pred_kind = {k: top(c) for k, c in by_kind.items()}
    hit, chance, num = Counter(), Counter(), Counter()
    for _, _, q in iter_questions("test", test_scenes):
        p = pred_text.get(q.text, pred_kind.get(q.kind, ""))
        for key in (q.kind, "overall"):
            hit[key] += p == q.answer
            chance[key] += 1.0 / len(q.choices)
            num[key] += 1
    return {
        k: {"n": num[k], "text_only": hit[k] / num[k], "chance": chance[k] / num[k]}
        for k in (*KINDS, "overall")
        if num[k]
    }


def scene_stats(num_scenes: int = 200, split: str = "train") -> dict:
    """Render time per scene and voxel-token counts (224 px, patch 14, CLIP mean/std)."""
    times, tokens = [], []
    for seed in scene_seeds(split)[:num_scenes]:
        t0 = time.perf_counter()
        scene, _ = make_scene(seed)
        times.append(time.perf_counter() - t0)
        pre = preprocess_scene(scene, 224, CLIP_MEAN, CLIP_STD)
        tokens.append(voxelize(unproject_patches(pre.depths, pre.intrinsics, pre.poses, 14)).num_tokens)
    t, k = np.array(times), np.array(tokens)
    return {
        "scenes": num_scenes,
        "render_s": {"mean": float(t.mean()), "median": float(np.median(t)), "max": float(t.max())},
        "tokens": {
            "min": int(k.min()),
            "mean": float(k.mean()),
            "median": float(np.median(k)),
            "max": int(k.max()),
            "p5": float(np.percentile(k, 5)),
            "p95": float(np.percentile(k, 95)),
        },
    }


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m adatoken_compile.benchmark3d.dataset")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats")
    s.add_argument("--scenes", type=int, default=200)
    b = sub.add_parser("baseline")
    b.add_argument("--train-scenes", type=int, default=20000)
    b.add_argument("--test-scenes", type=int, default=5000)
    args = ap.parse_args(argv)
    if args.cmd == "stats":
        r = scene_stats(args.scenes)
        print(f"{r['scenes']} scenes; render s/scene: " + ", ".join(f"{k} {v:.3f}" for k, v in r["render_s"].items()))
        print("voxel tokens: " + ", ".join(f"{k} {v:g}" for k, v in r["tokens"].items()))
    else:
        r = text_only_baseline(args.train_scenes, args.test_scenes)
        print(f"{'kind':<10} {'n':>7} {'text-only':>10} {'chance':>8}")
        for k, v in r.items():
            print(f"{k:<10} {v['n']:>7} {v['text_only']:>10.3f} {v['chance']:>8.3f}")


if __name__ == "__main__":
    _main()
