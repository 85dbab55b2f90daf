"""Scenes and images named by path: which reader a path needs, LLaVA-3D's frame selection, and
lazy references that samples hold until a model asks for the arrays (torch-free).

A scene path is one of

* ``S.npz``: the scene format of :mod:`adatoken_compile.runtime.scene` (its views as given);
* a ScanNet export folder (``color/``, ``depth/``, ``pose/``, ``intrinsic/``; :mod:`.scannet`);
* an EmbodiedScan-style info JSON holding one scene, ``INFO.json#SCENE`` for one of several, or
  a folder holding exactly one such JSON (:mod:`.embodiedscan`).

Folders and info files hold whole scans; ``num_frames`` of them are selected as LLaVA-3D does
(:func:`select_frames`) and only those are decoded.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import re
import warnings

import numpy as np

from adatoken_compile.runtime import embodiedscan, scannet
from adatoken_compile.errors import InputError
from adatoken_compile.runtime.image import load_image
from adatoken_compile.runtime.limits import limit_hint, limits
from adatoken_compile.runtime.scene import Scene, load_scene, validate_scene

DEFAULT_NUM_FRAMES = 20  # LLaVA-3D's num_frames when the checkpoint config names none
DEFAULT_DEPTH_SCALE = 1000.0  # depth PNG units per metre (ScanNet: millimetres)
SCENE_FORMATS = ("npz", "scannet", "embodiedscan")
FORMAT_HELP = ("a scene is a .npz, a ScanNet export folder (color/ depth/ pose/ intrinsic/), or an EmbodiedScan "
               "info .json (INFO.json#SCENE for one of several); see docs/data.md")


class DataWarning(UserWarning):
    """Input that was read with something left out (frames skipped); the CLI prints it as one line."""


def warn(msg: str) -> None:
    warnings.warn(msg, DataWarning, stacklevel=3)


def select_frames(n: int, num_frames: int) -> list[int]:
    """LLaVA-3D's frame selection from ``n`` frames: ``num_frames`` with stride ``n // num_frames``
    from the first; all of them when there are exactly ``num_frames``; the list repeated (and cut
    to ``num_frames``) when there are fewer."""
    if n < 1 or num_frames < 1:
        return []
    if n > num_frames:
        step = n // num_frames
        return [i * step for i in range(num_frames)]
    return [i % n for i in range(num_frames)]


def split_key(path: str) -> tuple[str, str | None]:
    """``INFO.json#SCENE`` -> (``INFO.json``, ``SCENE``); other paths -> (path, None)."""
    if "#" in path and not os.path.exists(path):
        p, key = path.rsplit("#", 1)
        return p, key or None
    return path, None


def scene_format(path: str) -> str:
    """Which reader ``path`` needs; a one-line error when it names nothing readable."""
    p, key = split_key(path)
    if not os.path.exists(p):
        raise InputError(f"{p}: scene not found; {FORMAT_HELP}")
    if os.path.isdir(p):
        if os.path.isdir(os.path.join(p, "color")):
            return "scannet"
        if len(glob.glob(os.path.join(p, "*.json"))) == 1:
            return "embodiedscan"
        raise InputError(f"{p}: a folder without color/ (ScanNet export) or exactly one info .json (EmbodiedScan); "
                         f"{FORMAT_HELP}")
    if p.endswith(".json"):
        return "embodiedscan"
    if key is None and p.endswith(".npz"):
        return "npz"
    raise InputError(f"{path}: not a scene path; {FORMAT_HELP}")


def _info_file(p: str) -> str:
    return glob.glob(os.path.join(p, "*.json"))[0] if os.path.isdir(p) else p


def _read(path: str, num_frames: int, depth_scale: float | None) -> Scene:
    fmt = scene_format(path)
    if fmt == "npz":
        return load_scene(path)
    if fmt == "scannet":
        arrays, skipped = scannet.read(path, num_frames, depth_scale or DEFAULT_DEPTH_SCALE, select_frames)
        name = path
    else:
        p, key = split_key(path)
        arrays, skipped, name = embodiedscan.read(_info_file(p), key, num_frames, depth_scale, select_frames,
                                                  DEFAULT_DEPTH_SCALE)
    if skipped:
        warn(f"{name}: skipped {sum(skipped.values())} frame(s) ("
             + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) + ")")
    return validate_scene(arrays, name=name)


def open_scene(path: str, *, num_frames: int | None = None, depth_scale: float | None = None) -> Scene:
    """The :class:`Scene` at ``path`` (any scene format; folders and info files: ``num_frames``
    selected frames, default 20; ``depth_scale`` depth units per metre, default the file's or 1000),
    read from disk on every call."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"scene path must be a string, got {type(path).__name__}")
    frames = check_num_frames(DEFAULT_NUM_FRAMES if num_frames is None else num_frames, "num_frames")
    return _read(os.fspath(path), frames, check_depth_scale(depth_scale, "depth_scale"))


def check_num_frames(value, where: str) -> int:
    """``num_frames`` (a checkpoint config's, or a caller's) as the views it will cost: a whole
    number in [1, the views limit], checked before a frame is selected or decoded."""
    top = limits()["views"]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 1 <= value <= top:
        raise InputError(f"{where}: num_frames must be a whole number in [1, {top}] (the views limit), got "
                         f"{str(value)[:40]}; fix num_frames or {limit_hint('views')}")
    return int(value)


def check_depth_scale(value, where: str) -> float | None:
    """A depth scale (depth PNG units per metre): None (the file's or the default), or a finite
    number > 0; 0 or a negative scale would silently mean the default or flip the scene."""
    if value is None:
        return None
    if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or not math.isfinite(value) \
            or value <= 0:
        raise InputError(f"{where}: depth_scale must be a finite number > 0 (depth units per metre, 1000 for "
                         f"millimetres), got {str(value)[:40]}; fix the depth scale")
    return float(value)


@functools.lru_cache(maxsize=2)
def _load_ref(ref: "SceneRef", num_frames: int | None) -> Scene:
    # keyed by the reference object: the samples of one scene share it, so consecutive questions
    # (and batches) about a scene decode it once; a new reading of the questions reads afresh
    return open_scene(ref.path, num_frames=num_frames, depth_scale=ref.depth_scale)


class SceneRef:
    """A scene named by path, read on first use (with the asking model's ``num_frames``)."""

    def __init__(self, path: str, depth_scale: float | None = None):
        scene_format(path)  # refuse a wrong path when the questions are read, not mid-run
        self.path = path
        self.depth_scale = depth_scale

    def load(self, num_frames: int | None = None) -> Scene:
        """The scene (the last two loaded stay cached)."""
        return _load_ref(self, num_frames)

    @property
    def name(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"SceneRef({self.path!r})"


class ImageRef:
    """An image named by path, decoded on use (question files can name thousands)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise InputError(f"{path}: image not found; image paths in a question file are relative to the file")
        self.path = path

    def load(self) -> np.ndarray:
        return load_image(self.path)

    def __repr__(self) -> str:
        return f"ImageRef({self.path!r})"


def resolve_scene(obj, num_frames: int | None = None, where: str = "scene") -> Scene:
    """A :class:`Scene` from what a sample or a caller holds: a Scene, a :class:`SceneRef`, a path,
    or a dict of the ``.npz`` arrays."""
    if isinstance(obj, Scene):
        return obj
    if isinstance(obj, SceneRef):
        return obj.load(num_frames)
    if isinstance(obj, (str, os.PathLike)):
        return open_scene(obj, num_frames=num_frames)
    if isinstance(obj, dict):
        return validate_scene(obj, name=where)
    raise InputError(f"{where}: expected a Scene, a scene path or a dict of scene arrays, got {type(obj).__name__}")


def resolve_image(obj) -> np.ndarray:
    """An (H,W,3) uint8 array from an array, an :class:`ImageRef` or an image path."""
    if isinstance(obj, ImageRef):
        return obj.load()
    if isinstance(obj, (str, os.PathLike)):
        return load_image(os.fspath(obj))
    return obj


def find_scene(root: str, scene_id: str, where: str) -> str:
    """The scene path of ``scene_id`` under ``--scenes ROOT``: ``ROOT/<id>`` (a folder),
    ``ROOT/<id>.npz``, or the scene of that name in ``ROOT`` when it is an info JSON. ``scene_id``
    may carry a dataset prefix (``scannet/scene0000_00``, as LLaVA-3D's question files do)."""
    if root.endswith(".json") and os.path.isfile(root):
        key = embodiedscan.match_key(embodiedscan.load_info(root), scene_id, root)
        return f"{root}#{key}"
    # the id's last component names the scene (docs/data.md): a dataset prefix is dropped, and the
    # scene is looked for directly under ROOT, never elsewhere
    name = re.split(r"[\\/]", scene_id.rstrip("/\\"))[-1]
    if name in ("", ".", "..") or "\x00" in name:
        raise InputError(f"{where}: scene id '{scene_id}' names no scene; give the scene folder's name")
    for p in (os.path.join(root, name), os.path.join(root, name + ".npz")):
        if os.path.exists(p):
            return p
    raise InputError(f"{where}: scene '{scene_id}' not found under --scenes {root} (looked for {root}/{name}/ "
                     f"and {root}/{name}.npz); pass the folder that holds the scene folders")
