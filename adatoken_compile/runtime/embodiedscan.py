"""EmbodiedScan-style info files: the camera-parameter JSON LLaVA-3D reads (torch-free).

One JSON object maps scene keys to scenes::

    {"scannet/scene0191_00": {
        "scannet/posed_images/scene0191_00/00000.jpg": {"pose": [[4x4]], "depth": "scannet/posed_images/scene0191_00/00000.png"},
        ...,
        "intrinsic": [[4x4]], "depth_intrinsic": [[4x4]], "axis_align_matrix": [[4x4]], "depth_scale": 1000}}

Frames are the entries whose value holds a ``pose`` (in file order); EmbodiedScan's own names are
accepted too (``images``: a list of ``{"img_path", "depth_path", "cam2global"}``; ``cam2img``,
``depth_cam2img``). Paths are relative to the folder holding the JSON (LLaVA-3D's
``--video-folder``). The depth intrinsics are used when given (ScanNet), else the colour ones;
a frame may carry its own ``intrinsic`` (Matterport3D). ``axis_align_matrix`` defaults to the
identity, ``depth_scale`` to 1000.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections import Counter

import numpy as np

from adatoken_compile.runtime.scannet import decode_frames, save_color, save_depth
from adatoken_compile.errors import InputError
from adatoken_compile.readers import max_data_json_bytes, read_json, regular_file

FIX = "see docs/data.md (EmbodiedScan info files)"
INTRINSIC_KEYS = ("depth_intrinsic", "depth_cam2img", "intrinsic", "cam2img")


@functools.lru_cache(maxsize=2)
def _load_info(path: str, mtime: float) -> dict:
    info = read_json(path, "info file", FIX, max_bytes=max_data_json_bytes(), expect=object)
    if not isinstance(info, dict) or not info or not all(isinstance(v, dict) for v in info.values()):
        raise InputError(f"{path}: expected an object mapping scene keys to scene objects; {FIX}")
    return info


def load_info(path: str) -> dict:
    """The parsed info file (the last two are kept: one file usually serves every question)."""
    regular_file(path, "info file", FIX, max_data_json_bytes())
    return _load_info(path, os.path.getmtime(path))


def match_key(info: dict, scene_id: str, path: str) -> str:
    """The key of ``scene_id`` in ``info``: exact, or the key whose last component is the id
    (``scene0191_00`` finds ``scannet/scene0191_00``)."""
    if scene_id in info:
        return scene_id
    base = os.path.basename(scene_id.rstrip("/"))
    hits = [k for k in info if os.path.basename(k.rstrip("/")) == base]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise InputError(f"{path}: no scene '{scene_id}' among its {len(info)} scenes; check the scene id")
    raise InputError(f"{path}: scene id '{scene_id}' matches {len(hits)} scenes ({', '.join(hits[:3])}); "
                     "use the full key, e.g. --scene INFO.json#scannet/scene0000_00")


def _inside_root(rel, where: str) -> None:
    # frame paths are relative to the info file's folder: an absolute path or a '..' would read
    # wherever the file points
    if rel is None:
        return
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise InputError(f"{where}: frame path {str(rel)[:40]!r} must be a non-empty string; {FIX}")
    if os.path.isabs(rel) or rel.startswith(("~", "\\")) or ".." in re.split(r"[\\/]", rel):
        raise InputError(f"{where}: frame path '{rel[:80]}' leaves the info file's folder (absolute, or '..'); "
                         f"name frames relative to it; {FIX}")


def _matrix(v, where: str) -> np.ndarray:
    try:
        m = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        m = np.zeros(0)
    if m.shape == (3, 3):
        m4 = np.eye(4)
        m4[:3, :3] = m
        m = m4
    if m.shape != (4, 4):
        raise InputError(f"{where}: expected a 4x4 matrix (list of 4 rows), got shape {m.shape}; {FIX}")
    return m


def frames_of(entry: dict, where: str) -> list[tuple[str, str | None, object, object]]:
    """(image path, depth path, pose, own intrinsic or None) per frame, in file order."""
    if isinstance(entry.get("images"), list):
        out = []
        for i, im in enumerate(entry["images"]):
            if not isinstance(im, dict) or "img_path" not in im:
                raise InputError(f"{where}: images[{i}] needs 'img_path', 'depth_path' and 'cam2global'; {FIX}")
            out.append((im["img_path"], im.get("depth_path"), im.get("cam2global"), im.get("cam2img")))
        return out
    return [(k, v.get("depth"), v.get("pose"), v.get("intrinsic")) for k, v in entry.items()
            if isinstance(v, dict) and "pose" in v]


def read(path: str, key: str | None, num_frames: int, depth_scale: float | None, select,
         default_scale: float) -> tuple[dict, Counter, str]:
    """The arrays of ``num_frames`` frames of one scene of the info file ``path`` (``key``: which;
    None when the file holds one), the frames left out by reason, and the scene's name."""
    info = load_info(path)
    if key is None:
        if len(info) != 1:
            raise InputError(f"{path}: holds {len(info)} scenes; name one as {path}#SCENE "
                             f"(e.g. {path}#{next(iter(info))})")
        key = next(iter(info))
    else:
        key = match_key(info, key, path)
    where = f"{path}#{key}"
    entry = info[key]
    root = os.path.dirname(os.path.abspath(path))
    scene_K = next((entry[k] for k in INTRINSIC_KEYS if k in entry), None)
    scene_K = _matrix(scene_K, f"{where}: intrinsic") if scene_K is not None else None
    align = _matrix(entry["axis_align_matrix"], f"{where}: axis_align_matrix") if "axis_align_matrix" in entry else np.eye(4)
    own = entry.get("depth_scale")
    if own is not None and (not isinstance(own, (int, float)) or isinstance(own, bool) or not math.isfinite(own)
                            or own <= 0):
        raise InputError(f"{where}: 'depth_scale' must be a finite number > 0 (depth units per metre), got "
                         f"{str(own)[:40]}; fix it or pass --depth-scale")
    scale = float(depth_scale or own or default_scale)
    listed = frames_of(entry, where)
    if not listed:
        raise InputError(f"{where}: no frames (entries with a 'pose', or an 'images' list); {FIX}")
    skipped: Counter = Counter()
    frames, intrinsics = [], []
    for img, dep, pose, K in listed:
        for rel in (img, dep):
            _inside_root(rel, where)
        if dep is None or not os.path.isfile(os.path.join(root, dep)):
            skipped["without a depth map"] += 1
            continue
        if not os.path.isfile(os.path.join(root, img)):
            skipped["without a colour image"] += 1
            continue
        P = _matrix(pose, f"{where}: pose of {img}")
        if not np.isfinite(P).all():
            skipped["with an inf/nan pose"] += 1
            continue
        K = _matrix(K, f"{where}: intrinsic of {img}") if K is not None else scene_K
        if K is None:
            raise InputError(f"{where}: no intrinsics ({', '.join(INTRINSIC_KEYS)} or a per-frame 'intrinsic'); {FIX}")
        frames.append((os.path.join(root, img), os.path.join(root, dep), P))
        intrinsics.append(K)
    if not frames:
        raise InputError(f"{where}: none of its {len(listed)} frames has a finite pose, an image and a depth map "
                         f"({', '.join(f'{n} {why}' for why, n in sorted(skipped.items()))}); {FIX}")
    arrays, kept = decode_frames(frames, select(len(frames), num_frames), scale, where, skipped)
    arrays["poses"] = align @ arrays["poses"]
    arrays["intrinsics"] = np.stack([intrinsics[i] for i in kept])
    return arrays, skipped, where


def write(scenes: list[tuple[str, object]], root: str, image_format: str = "png", depth_scale: float = 1000.0) -> str:
    """Write ``(scene_id, Scene)`` pairs under ``root`` as ``posed_images/<id>/<i>.*`` with one
    info file ``root/embodiedscan_infos.json`` (keys ``scannet/<id>``; poses and intrinsics at
    full float64 precision, depth uint16 in ``1 / depth_scale`` metres). Returns the info path."""
    ext = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}.get(image_format)
    if ext is None:
        raise InputError(f"--image-format {image_format}: choose png or jpg")
    info = {}
    for sid, scene in scenes:
        if np.asarray(scene.depths).shape[1:] != np.asarray(scene.images).shape[1:3]:
            raise InputError(f"{scene.name}: depth maps and images differ in size; write one size")
        rel = f"posed_images/{sid}"
        os.makedirs(os.path.join(root, rel))
        K = np.asarray(scene.intrinsics, np.float64)
        shared = bool(np.array_equal(K, np.repeat(K[:1], len(K), axis=0)))
        entry = {}
        for i in range(scene.num_views):
            cname = f"{i:05d}.jpg" if ext == "jpg" else f"{i:05d}_color.png"
            save_color(scene.images[i], os.path.join(root, rel, cname))
            save_depth(scene.depths[i], os.path.join(root, rel, f"{i:05d}.png"), depth_scale)
            entry[f"{rel}/{cname}"] = {"pose": np.asarray(scene.poses[i], np.float64).tolist(),
                                       "depth": f"{rel}/{i:05d}.png"}
            if not shared:
                entry[f"{rel}/{cname}"]["intrinsic"] = K[i].tolist()
        if shared:
            entry["intrinsic"] = entry["depth_intrinsic"] = K[0].tolist()
        entry["axis_align_matrix"] = np.eye(4).tolist()
        entry["depth_scale"] = depth_scale
        info[f"scannet/{sid}"] = entry
    path = os.path.join(root, "embodiedscan_infos.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f)
    return path
