"""ScanNet scenes as ScanNet's SensReader exports them (torch-free)::

    SCENE/color/<i>.jpg            colour frames (any format Pillow reads; .png too)
    SCENE/depth/<i>.png            uint16 depth, ``depth_scale`` units per metre (1000: millimetres)
    SCENE/pose/<i>.txt             4x4 camera-to-world (lost tracking: rows of inf)
    SCENE/intrinsic/intrinsic_depth.txt    4x4 pinhole K of the depth maps (used, as LLaVA-3D does)
    SCENE/intrinsic/intrinsic_color.txt    4x4 pinhole K of the colour frames (written, not used)
    SCENE/<scene_id>.txt           optional scene meta: ``axisAlignment = m00 m01 ... m33``
                                   (or ``SCENE/axis_align_matrix.txt``, a 4x4, as LLaVA-3D's own export)

Frames are ordered by number (``10.jpg`` after ``9.jpg``); frames with a non-finite pose or
without a depth map are left out before the selection, so the selection reads only the pose
files of the scan and decodes only the selected frames. Poses are ``axis_align @ cam2world``.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
from PIL import Image

from adatoken_compile.errors import InputError
from adatoken_compile.readers import read_bytes
from adatoken_compile.runtime.image import UnreadableImage, open_image

COLOR_EXTS = (".jpg", ".jpeg", ".png")
FIX = "see docs/data.md (ScanNet export layout)"
MAX_MATRIX_BYTES = 64 << 10  # a 4x4 matrix is a few hundred bytes
MAX_META_BYTES = 16 << 20  # <scene>.txt holds a few lines of metadata


def read_matrix(path: str, what: str = "4x4 matrix") -> np.ndarray:
    """A whitespace-separated 4x4 matrix (inf / nan allowed: the caller decides)."""
    if not os.path.lexists(path):
        raise InputError(f"{path}: missing; {FIX}")
    raw = read_bytes(path, what, FIX, MAX_MATRIX_BYTES)
    try:
        m = np.array(raw.decode("utf-8").split(), dtype=np.float64)
    except (ValueError, UnicodeDecodeError, OverflowError) as e:
        raise InputError(f"{path}: not a {what} of numbers ({type(e).__name__}); {FIX}")
    if m.size != 16:
        raise InputError(f"{path}: holds {m.size} numbers, expected a {what} (16); {FIX}")
    return m.reshape(4, 4)


def axis_alignment(folder: str) -> np.ndarray:
    """The scene's axis-align matrix (identity when the folder has none)."""
    meta = os.path.join(folder, os.path.basename(os.path.normpath(folder)) + ".txt")
    if os.path.isfile(meta):
        for line in read_bytes(meta, "scene meta file", FIX, MAX_META_BYTES).decode("utf-8", "replace").splitlines():
            if line.strip().startswith("axisAlignment"):
                try:
                    m = np.array(line.split("=", 1)[1].split(), dtype=np.float64)
                except (ValueError, IndexError):
                    m = np.zeros(0)
                if m.size != 16 or not np.isfinite(m).all():
                    raise InputError(f"{meta}: the axisAlignment line does not hold 16 finite numbers; {FIX}")
                return m.reshape(4, 4)
    legacy = os.path.join(folder, "axis_align_matrix.txt")
    if os.path.isfile(legacy):
        m = read_matrix(legacy, "4x4 axis-align matrix")
        if not np.isfinite(m).all():
            raise InputError(f"{legacy}: holds inf or nan; expected a finite 4x4 axis-align matrix")
        return m
    return np.eye(4)


def frame_stems(color_dir: str) -> list[tuple[str, str]]:
    """(stem, file name) of the colour frames, in frame order (numeric when every stem is a number)."""
    items = [(os.path.splitext(n)[0], n) for n in os.listdir(color_dir) if n.lower().endswith(COLOR_EXTS)]
    if all(s.isdigit() for s, _ in items):
        return sorted(items, key=lambda x: int(x[0]))
    return sorted(items)


def decode_depth(path: str) -> np.ndarray:
    with open_image(path, "depth map") as im:  # the header's size is checked before any pixel is decoded
        d = np.asarray(im)
    if d.ndim != 2:
        raise ValueError(f"depth map has shape {d.shape}, expected a single-channel 16-bit PNG")
    return d


def depth_metres(d: np.ndarray, depth_scale: float) -> np.ndarray:
    """A decoded depth map in metres (float32). Integer maps (ScanNet's 16-bit PNG) hold
    ``depth_scale`` units per metre; a floating map (32-bit float TIFF) already holds metres, as
    depth sensors' SDKs write it, and is never divided (a float map in millimetres reads as
    kilometres and is refused by the scene extent limit, not silently shrunk)."""
    if d.dtype.kind == "f":
        return d.astype(np.float32)
    return d.astype(np.float32) / np.float32(depth_scale)


def decode_color(path: str) -> np.ndarray:
    with open_image(path, "colour image") as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _decoded(decode, path: str, why: str, skipped: Counter):
    """``decode(path)``, or None (counted under ``why``) for a file that is not a readable image. A
    frame over the pixel limit, or not a regular file, stops the read instead: skipping it would
    decode the next one, and the next."""
    try:
        return decode(path)
    except UnreadableImage:
        pass
    except InputError:
        raise
    except Exception:  # a truncated or corrupt file: Pillow raises many types
        pass
    skipped[why] += 1
    return None


def decode_frames(frames: list[tuple[str, str, np.ndarray]], picks: list[int], depth_scale: float, where: str,
                  skipped: Counter) -> tuple[dict, list[int]]:
    """Decode the picked (colour path, depth path, pose) frames once each; unreadable ones are
    skipped and counted. Returns the scene arrays (poses as given) and the picks kept."""
    decoded: dict[int, tuple] = {}
    for i in dict.fromkeys(picks):
        cpath, dpath, pose = frames[i]
        rgb = _decoded(decode_color, cpath, "unreadable colour image", skipped)
        dep = None if rgb is None else _decoded(decode_depth, dpath, "unreadable depth map", skipped)
        if dep is None:
            continue
        decoded[i] = (rgb, dep, pose)
    keep = [i for i in picks if i in decoded]
    if not keep:
        raise InputError(f"{where}: none of the selected frames could be read (first: {frames[picks[0]][0]}); "
                         "check the image and depth files")
    shapes = {decoded[i][0].shape for i in keep}, {decoded[i][1].shape for i in keep}
    for k, what in ((0, "colour images"), (1, "depth maps")):
        if len(shapes[k]) > 1:
            raise InputError(f"{where}: the selected {what} differ in size ({sorted(shapes[k])}); a scene needs one size")
    return {"images": np.stack([decoded[i][0] for i in keep]),
            "depths": np.stack([depth_metres(decoded[i][1], depth_scale) for i in keep]),
            "poses": np.stack([decoded[i][2] for i in keep])}, keep


def read(folder: str, num_frames: int, depth_scale: float, select) -> tuple[dict, Counter]:
    """The arrays of ``num_frames`` frames of a ScanNet export folder (``select(n, num_frames)``
    picks frame indices) and the count of frames left out, by reason."""
    color_dir, depth_dir, pose_dir = (os.path.join(folder, d) for d in ("color", "depth", "pose"))
    for d in (depth_dir, pose_dir):
        if not os.path.isdir(d):
            raise InputError(f"{folder}: no {os.path.basename(d)}/ folder; {FIX}")
    K = read_matrix(os.path.join(folder, "intrinsic", "intrinsic_depth.txt"), "4x4 intrinsic matrix")
    if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise InputError(f"{folder}/intrinsic/intrinsic_depth.txt: not a pinhole K (needs finite fx, fy > 0); {FIX}")
    align = axis_alignment(folder)
    stems = frame_stems(color_dir)
    if not stems:
        raise InputError(f"{color_dir}: no colour frames (<i>.jpg or <i>.png); {FIX}")
    skipped: Counter = Counter()
    frames = []
    for stem, name in stems:
        pose_path, depth_path = os.path.join(pose_dir, stem + ".txt"), os.path.join(depth_dir, stem + ".png")
        if not os.path.isfile(pose_path):
            skipped["without a pose file"] += 1
            continue
        pose = read_matrix(pose_path, "4x4 pose")
        if not np.isfinite(pose).all():
            skipped["with an inf/nan pose"] += 1
            continue
        if not os.path.isfile(depth_path):
            skipped["without a depth map"] += 1
            continue
        frames.append((os.path.join(color_dir, name), depth_path, pose))
    if not frames:
        raise InputError(f"{folder}: none of its {len(stems)} frames has a finite pose and a depth map "
                         f"({', '.join(f'{n} {why}' for why, n in sorted(skipped.items()))}); {FIX}")
    arrays, _ = decode_frames(frames, select(len(frames), num_frames), depth_scale, folder, skipped)
    arrays["poses"] = align @ arrays["poses"]
    arrays["intrinsics"] = np.repeat(K[None], len(arrays["poses"]), axis=0)
    return arrays, skipped


def save_color(image, path: str) -> None:
    """Colour frame: PNG (lossless) or JPEG at quality 100 without chroma subsampling."""
    im = Image.fromarray(np.asarray(image, np.uint8))
    if path.endswith(".jpg"):
        im.save(path, quality=100, subsampling=0)
    else:
        im.save(path)


def save_depth(depth, path: str, depth_scale: float) -> None:
    """Depth map as a uint16 PNG in ``1 / depth_scale`` metres (rounded; 0 = no reading)."""
    units = np.clip(np.round(np.asarray(depth, np.float64) * depth_scale), 0, 65535).astype(np.uint16)
    Image.fromarray(units).save(path)


def write(scene, folder: str, scene_id: str, image_format: str = "png", depth_scale: float = 1000.0) -> None:
    """Write ``scene`` into ``folder`` in the export layout (colour PNG, or JPEG quality 100;
    depth uint16 in ``1 / depth_scale`` metres, rounded; poses and intrinsics at full float64
    precision; identity axis alignment). The views must share one intrinsic matrix."""
    K = np.asarray(scene.intrinsics, np.float64)
    if not np.array_equal(K, np.repeat(K[:1], len(K), axis=0)):
        raise InputError(f"{scene.name}: views have different intrinsics; the ScanNet layout holds one matrix")
    if np.asarray(scene.depths).shape[1:] != np.asarray(scene.images).shape[1:3]:
        raise InputError(f"{scene.name}: depth maps and images differ in size; write one size")
    ext = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}.get(image_format)
    if ext is None:
        raise InputError(f"--image-format {image_format}: choose png or jpg")
    for d in ("color", "depth", "pose", "intrinsic"):
        os.makedirs(os.path.join(folder, d))
    fmt = "%.17g"
    for i in range(scene.num_views):
        save_color(scene.images[i], os.path.join(folder, "color", f"{i}.{ext}"))
        save_depth(scene.depths[i], os.path.join(folder, "depth", f"{i}.png"), depth_scale)
        np.savetxt(os.path.join(folder, "pose", f"{i}.txt"), np.asarray(scene.poses[i], np.float64), fmt=fmt)
    for name in ("intrinsic_depth.txt", "intrinsic_color.txt"):
        np.savetxt(os.path.join(folder, "intrinsic", name), K[0], fmt=fmt)
    H, W = np.asarray(scene.images).shape[1:3]
    with open(os.path.join(folder, f"{scene_id}.txt"), "w", encoding="utf-8") as f:
        f.write("axisAlignment = " + " ".join(fmt % x for x in np.eye(4).ravel()) + "\n")
        f.write(f"colorHeight = {H}\ncolorWidth = {W}\ndepthHeight = {H}\ndepthWidth = {W}\n")
        f.write(f"numColorFrames = {scene.num_views}\nnumDepthFrames = {scene.num_views}\n")
