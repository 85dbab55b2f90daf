"""``--data`` specifications -> samples (torch-free).

* ``builtin:<split>`` is the procedural 3D benchmark (:mod:`adatoken_compile.benchmark3d`), split
  ``train``, ``validation``, ``test`` or ``calibration``; a bare split name means the same;
* a question file (JSONL, ScanQA v1.0 JSON, SQA3D, LLaVA-3D question JSON:
  :mod:`.questions`), its scene ids resolved under ``scenes`` (``--scenes ROOT``).

Every spec yields samples in a fixed order, scene by scene, each scene's questions consecutive;
``start_scene`` skips that many distinct scenes (images, for image questions).
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Iterator

from adatoken_compile.benchmark3d import dataset as benchmark
from adatoken_compile.data.questions import read_questions
from adatoken_compile.errors import InputError
from adatoken_compile.runtime.sample import Sample

BUILTIN_SPLITS = ("train", "validation", "test", "calibration")


def builtin_split(spec: str) -> str | None:
    """The split of a ``builtin:<split>`` (or bare split) spec, None for anything else."""
    name = spec[len("builtin:"):] if spec.startswith("builtin:") else spec
    if name in BUILTIN_SPLITS and not (spec == name and os.path.isfile(spec)):
        return name
    if spec.startswith("builtin:"):
        raise InputError(f"--data {spec}: unknown built-in split; choose builtin:{', builtin:'.join(BUILTIN_SPLITS)}")
    return None


def scene_key(sample: Sample):
    """What identifies a sample's scene (or image) for ``start_scene`` and held-back questions."""
    if "scene_key" in sample.meta:
        return sample.meta["scene_key"]
    if "seed" in sample.meta:
        return ("seed", sample.meta["seed"])
    return id(sample.scene if sample.scene is not None else sample.image)


def iter_samples(spec: str, *, limit: int | None = None, start_scene: int = 0, scenes: str | None = None,
                 depth_scale: float | None = None, keep: Callable[[int, int], bool] | None = None) -> Iterator[Sample]:
    """Samples of a data spec in a fixed order (see the module docstring). ``scenes``: where a
    question file's scene ids resolve; ``depth_scale``: depth units per metre of its scene folders.
    ``keep(i, j)``: called for every sample in order with its position ``i`` and its scene's
    position ``j`` (from 0); only the samples it accepts are yielded, and scenes none of them use
    are not loaded (one process's share of a torchrun launch: :class:`adatoken_compile.distributed.Share`)."""
    if not isinstance(spec, str) or not spec:
        raise InputError(f"--data {spec!r}: pass a question file or builtin:<split>")
    split = builtin_split(spec)
    if split is not None:
        if scenes is not None:
            raise InputError(f"--scenes {scenes}: applies to question files; builtin:{split} renders its own scenes")
        yield from benchmark.iter_samples(split, limit=limit, start_scene=start_scene, keep=keep)
        return
    if not os.path.lexists(spec):  # what exists but is no regular file is named as such by read_questions
        raise InputError(f"--data {spec}: no such question file or built-in split; pass a .jsonl / ScanQA / SQA3D "
                         f"question file, or builtin:{', builtin:'.join(BUILTIN_SPLITS)}")
    samples = read_questions(spec, scenes=scenes, depth_scale=depth_scale)
    groups = itertools.groupby(samples, key=scene_key)
    i = 0
    for j, (_, group) in enumerate(itertools.islice(groups, start_scene, None)):
        for s in group:  # scenes are references, read when a model asks: skipping one costs nothing
            if limit is not None and i >= limit:
                return
            if keep is None or keep(i, j):
                yield s
            i += 1


def load_samples(spec: str, *, limit: int | None = None, start_scene: int = 0, scenes: str | None = None,
                 depth_scale: float | None = None, keep: Callable[[int, int], bool] | None = None) -> list[Sample]:
    """:func:`iter_samples` as a list; none at all is an error (a process's share may be empty)."""
    listed = 0

    def counted(i: int, j: int) -> bool:
        nonlocal listed
        listed += 1
        return keep is None or keep(i, j)

    samples = list(iter_samples(spec, limit=limit, start_scene=start_scene, scenes=scenes, depth_scale=depth_scale,
                                keep=counted))
    if not listed:
        raise InputError(f"--data {spec}: no samples (from scene {start_scene}, limit {limit})")
    return samples


def for_input(samples, input_kind: str) -> list[Sample]:
    """``samples`` as a model that takes ``input_kind`` ("scene" or "image") reads them: built-in
    benchmark scenes become their images for an image model
    (:func:`adatoken_compile.benchmark3d.dataset.scene_images`: a bird's-eye view and two
    perspective views); anything else is unchanged."""
    samples = list(samples)
    return benchmark.as_image_samples(samples) if input_kind == "image" else samples


def holdout_start(spec: str, start_scene: int, stats_scenes: int, builtin_start: int) -> int:
    """The first scene of the held-back questions: after the ``stats_scenes`` scenes the
    statistics' questions came from, and for the built-in data not before ``builtin_start`` (a
    fixed disjoint block)."""
    after = start_scene + stats_scenes
    return max(builtin_start, after) if builtin_split(spec) is not None else after
