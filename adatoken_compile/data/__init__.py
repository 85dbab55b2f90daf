"""Where samples come from: ``--data`` specifications (torch-free).

``builtin:<split>`` is the procedural 3D benchmark (:mod:`adatoken_compile.benchmark3d`), split
``train``, ``validation``, ``test`` or ``calibration``; a bare split name means the same.
"""

from __future__ import annotations

from typing import Callable, Iterator

from adatoken_compile.benchmark3d.dataset import iter_samples as builtin_samples
from adatoken_compile.errors import InputError
from adatoken_compile.runtime.sample import Sample

BUILTIN_SPLITS = ("train", "validation", "test", "calibration")


def builtin_split(spec: str) -> str | None:
    """The split of a ``builtin:<split>`` (or bare split) spec, None for anything else."""
    name = spec[len("builtin:"):] if spec.startswith("builtin:") else spec
    if name in BUILTIN_SPLITS:
        return name
    if spec.startswith("builtin:"):
        raise InputError(f"--data {spec}: unknown built-in split; choose builtin:{', builtin:'.join(BUILTIN_SPLITS)}")
    return None


def iter_samples(spec: str, *, limit: int | None = None, start_scene: int = 0,
                 keep: Callable[[int, int], bool] | None = None) -> Iterator[Sample]:
    """Samples of a data spec in a fixed order: scene by scene, each scene's questions consecutive.
    ``start_scene`` skips that many scenes (a disjoint block for held-back rows). ``keep(i, j)``:
    called for every sample in order with its position ``i`` and its scene's position ``j`` (from
    0); only the samples it accepts are yielded, and scenes none of them use are not loaded (one
    process's share of a torchrun launch: :class:`adatoken_compile.distributed.Share`)."""
    split = builtin_split(spec)
    if split is None:
        raise InputError(f"--data {spec}: not a built-in split; use builtin:{', builtin:'.join(BUILTIN_SPLITS)}")
    yield from builtin_samples(split, limit=limit, start_scene=start_scene, keep=keep)


def load_samples(spec: str, *, limit: int | None = None, start_scene: int = 0,
                 keep: Callable[[int, int], bool] | None = None) -> list[Sample]:
    listed = 0

    def counted(i: int, j: int) -> bool:  # a share may be empty; the data may not
        nonlocal listed
        listed += 1
        return keep is None or keep(i, j)

    samples = list(iter_samples(spec, limit=limit, start_scene=start_scene, keep=counted))
    if not listed:
        raise InputError(f"--data {spec}: no samples (from scene {start_scene}, limit {limit})")
    return samples
