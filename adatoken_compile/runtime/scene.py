"""Scene input format, validation, and the LLaVA-3D geometric preprocessing.

Pure numpy (+ Pillow for the bicubic RGB resize) so that the torch-free runtime and the PyTorch
adapter share exactly the same code.

Scene file (``.npz``), V views of H x W pixels:

=============  ==============  =========  ================================================
key            shape           dtype      meaning
=============  ==============  =========  ================================================
``images``     (V, H, W, 3)    uint8      RGB
``depths``     (V, Hd, Wd)     float32    depth in metres (0 = no reading); usually Hd, Wd =
                                          H, W; ScanNet's depth maps are smaller than its
                                          colour images and registered to them
``poses``      (V, 4, 4)       float32/64 camera-to-world (OpenCV camera: x right, y down,
                                          z forward)
``intrinsics`` (V, 4, 4)       float32/64 pinhole K of the depth map's pixel grid in the
                                          top-left 3x3 (pixels); as LLaVA-3D uses the depth
                                          intrinsics for ScanNet
=============  ==============  =========  ================================================

:func:`validate_scene` (every reader goes through it: ``.npz`` files, arrays handed to the API,
the dataset folder readers) refuses what would give NaN or meaningless spatial tokens -- focal
lengths that are not > 0, camera-to-world rotations that are not rotations, cameras or depth
readings farther from the origin than :data:`DEFAULT_LIMITS` ``extent_m`` (a pose in
millimetres, a depth of 1e30; far out, float32 rounding merges the voxels) -- and scenes over
the resource limits (views, pixels per view). The limits are :func:`limits`, each overridable
by its environment variable (:data:`LIMIT_ENV`). :func:`load_scene` reads only the four arrays,
each checked for its declared size before it is decompressed.

Scene folders (ScanNet export layout, EmbodiedScan info files) are read into the same
:class:`Scene` by :mod:`adatoken_compile.runtime.sources`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from adatoken_compile.errors import InputError
from adatoken_compile.readers import read_npz
from adatoken_compile.runtime.image import ImageProcessing
from adatoken_compile.runtime.limits import (DEFAULT_LIMITS, LIMIT_ENV, MAX_SPATIAL_TOKENS, limit_hint,  # noqa: F401
                                            limits)

VOXEL_SIZE = 0.2
ROTATION_TOL = 1e-2  # |R^T R - I| of a camera-to-world rotation stored in float32 is ~1e-6

SCENE_KEYS = {
    "images": ("(V,H,W,3)", (np.uint8,)),
    "depths": ("(V,Hd,Wd)", (np.float32,)),
    "poses": ("(V,4,4)", (np.float32, np.float64)),
    "intrinsics": ("(V,4,4)", (np.float32, np.float64)),
}


@dataclass
class Scene:
    images: np.ndarray  # (V, H, W, 3) uint8
    depths: np.ndarray  # (V, Hd, Wd) float32 (usually Hd, Wd = H, W)
    poses: np.ndarray  # (V, 4, 4)
    intrinsics: np.ndarray  # (V, 4, 4)
    name: str = "<scene>"

    @property
    def num_views(self) -> int:
        return int(self.images.shape[0])

    def save(self, path: str) -> None:
        """Write the scene ``.npz`` to ``path`` (exactly that name; callers wanting an atomic
        write pass a temporary path, see :func:`adatoken_compile.io.atomic_file`)."""
        with open(path, "wb") as f:
            np.savez_compressed(f, images=self.images, depths=self.depths, poses=self.poses, intrinsics=self.intrinsics)


def validate_scene(arrays: dict, name: str = "<scene>") -> Scene:
    """Check keys, shapes, dtypes and values; raise a one-line InputError naming the key."""
    fix = "see docs/formats.md (scene .npz)"
    if not isinstance(arrays, dict):
        raise InputError(f"{name}: a scene is a dict of arrays (or a Scene, or an .npz path), got {type(arrays).__name__}")
    for key, (shape, dtypes) in SCENE_KEYS.items():
        if key not in arrays:
            raise InputError(f"{name}: missing key '{key}' (expected {shape} {dtypes[0].__name__}); {fix}")
    try:
        images, depths = np.asarray(arrays["images"]), np.asarray(arrays["depths"])
        poses, intr = np.asarray(arrays["poses"]), np.asarray(arrays["intrinsics"])
    except (ValueError, TypeError) as e:
        raise InputError(f"{name}: scene arrays are not rectangular numeric arrays ({e}); {fix}") from None
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"{name}: key 'images' has shape {images.shape}, expected (V,H,W,3) uint8 RGB")
    V, H, W = images.shape[:3]
    Hd, Wd = depths.shape[1:3] if depths.ndim == 3 else (H, W)
    expected = {
        "images": (images, (V, H, W, 3)),
        "depths": (depths, (V, Hd, Wd)),
        "poses": (poses, (V, 4, 4)),
        "intrinsics": (intr, (V, 4, 4)),
    }
    for key, (arr, shp) in expected.items():
        if arr.shape != shp:
            what = "V mismatch: " if arr.ndim >= 1 and arr.shape[0] != V else ""
            raise InputError(
                f"{name}: {what}key '{key}' has shape {arr.shape}, expected {SCENE_KEYS[key][0]} = {shp}"
            )
        allowed = SCENE_KEYS[key][1]
        if arr.dtype not in allowed:
            raise InputError(
                f"{name}: key '{key}' has dtype {arr.dtype}, expected {' or '.join(d.__name__ for d in allowed)}"
            )
    if V == 0 or H == 0 or W == 0:
        raise InputError(f"{name}: key 'images' is empty (shape {images.shape}); a scene needs at least one view")
    lim = limits()
    _check_size(V, H, W, name, lim)
    if Hd == 0 or Wd == 0:
        raise InputError(f"{name}: key 'depths' is empty (shape {depths.shape}); expected (V,Hd,Wd) depth maps")
    for key in ("depths", "poses", "intrinsics"):
        if not np.isfinite(expected[key][0]).all():
            raise InputError(f"{name}: key '{key}' contains NaN or inf; expected finite {SCENE_KEYS[key][0]} values")
    if not (depths > 0).any():
        raise InputError(f"{name}: key 'depths' is all zero; expected (V,H,W) float32 depth in metres")
    if (depths < 0).any():
        raise InputError(f"{name}: key 'depths' has negative values; expected (V,H,W) float32 depth in metres >= 0")
    K, P = intr.astype(np.float64), poses.astype(np.float64)
    _check_geometry(K, P, depths, name, lim["extent_m"])
    return Scene(images, depths, P, K, name=name)


def _check_size(V: int, H: int | None, W: int | None, name: str, lim: dict) -> None:
    if V > lim["views"]:
        raise InputError(f"{name}: {V} views, more than the limit of {lim['views']}; pass fewer views or "
                         f"{limit_hint('views')}")
    if H is not None and W is not None and H * W > lim["view_pixels"]:
        raise InputError(f"{name}: views of {H}x{W} pixels, more than the limit of {lim['view_pixels']} per view; "
                         f"downscale the views or {limit_hint('view_pixels')}")


def _check_geometry(K: np.ndarray, P: np.ndarray, depths: np.ndarray, name: str, extent: float) -> None:
    """Refuse cameras that unproject to NaN or to a meaningless point cloud (see the module docstring)."""
    fx, fy = K[:, 0, 0], K[:, 1, 1]
    bad = np.flatnonzero(~((fx > 0) & (fy > 0)))
    if bad.size:
        v = int(bad[0])
        raise InputError(f"{name}: key 'intrinsics' of view {v} has focal lengths fx={fx[v]:g}, fy={fy[v]:g}; both must "
                         "be > 0 pixels (a pinhole K in the top-left 3x3)")
    R = P[:, :3, :3]
    err = np.abs(R.transpose(0, 2, 1) @ R - np.eye(3)).max(axis=(1, 2))
    bad = np.flatnonzero((err > ROTATION_TOL) | (np.linalg.det(R) <= 0))
    if bad.size:
        v = int(bad[0])
        raise InputError(f"{name}: key 'poses' of view {v} is not a rigid camera-to-world transform (its 3x3 part is "
                         "not a rotation); pass rotation + translation in metres")
    # every unprojected point lies in the box spanned by each view's image corners at depth 0 and
    # at that view's largest depth (the unprojection is linear in u, v and depth separately)
    V, H, W = depths.shape
    dmax = depths.reshape(V, -1).max(axis=1)
    u = np.array([0.0, W - 1.0, 0.0, W - 1.0])
    v = np.array([0.0, 0.0, H - 1.0, H - 1.0])
    with np.errstate(over="ignore", invalid="ignore"):
        cam = np.stack([(u[None] - K[:, 0, 2:3]) / fx[:, None], (v[None] - K[:, 1, 2:3]) / fy[:, None],
                        np.ones((V, 4))], axis=-1) * dmax[:, None, None]  # (V, 4, 3) at the largest depth
        pts = np.concatenate([np.einsum("vij,vpj->vpi", R, cam), np.zeros((V, 1, 3))], axis=1) + P[:, None, :3, 3]
        reach = float(np.nan_to_num(np.abs(pts), nan=np.inf).max())
    if reach > extent:
        raise InputError(f"{name}: cameras and depths reach {reach:.3g} m from the origin, more than the limit of "
                         f"{extent} m; check that poses and depths are in metres and the focal lengths in pixels, or "
                         f"{limit_hint('extent_m')}")


def load_scene(path: str) -> Scene:
    """Load and validate a scene ``.npz``: only its four arrays are read, each after its declared
    size is checked against the limits."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{path!r}: a scene path must be a string")
    fix = "see docs/formats.md (scene .npz) and docs/safety.md (limits)"
    lim = limits()
    pixels = lim["views"] * lim["view_pixels"]
    sizes = {"images": 3 * pixels, "depths": 8 * pixels, "poses": 128 * lim["views"], "intrinsics": 128 * lim["views"]}

    def check_header(key, shape, dtype):  # the clearer refusal, from the .npy header before its data is read
        H, W = (int(shape[1]), int(shape[2])) if key in ("images", "depths") and len(shape) >= 3 else (None, None)
        if len(shape) >= 1:
            _check_size(int(shape[0]), H, W, str(path), lim)

    arrays = read_npz(path, sizes, fix, check_header=check_header)
    return validate_scene({k: v for k, v in arrays.items() if v is not None}, name=str(path))


# --------------------------------------------------------------------------- preprocessing


@dataclass
class Preprocessed:
    pixel_values: np.ndarray  # (V, 3, S, S) float32, normalised
    depths: np.ndarray  # (V, S, S) float32
    intrinsics: np.ndarray  # (V, 4, 4) float64, adjusted for resize + crop
    poses: np.ndarray  # (V, 4, 4) float64


def resize_crop_params(H: int, W: int, size: int) -> tuple[int, int, int, int]:
    """Shortest side -> size (the long side rounded down), then the centre crop's offsets, as
    transformers' CLIPImageProcessor computes them: (resized H, resized W, crop top, crop left)."""
    return ImageProcessing.clip(size).geometry(H, W)


def depth_resize_crop(H: int, W: int, processing: ImageProcessing) -> tuple[int, int, tuple[int, int, int, int]]:
    """LLaVA-3D's depth-map geometry: the short side to the crop height (the long side
    ``int(long * (crop / short))``), then Pillow's crop of the box ``((w - cw) / 2, (h - ch) / 2,
    (w + cw) / 2, (h + ch) / 2)``, which Pillow rounds half to even. Processors without a crop
    resize straight to their size. Returns (resized H, resized W, integer crop box)."""
    if not processing.crop_hw:
        nh, nw = processing.output_hw(H, W)
        return nh, nw, (0, 0, nw, nh)
    ch, cw = processing.crop_hw
    if W < H:
        nw, nh = ch, int(H * (ch / W))
    else:
        nh, nw = ch, int(W * (ch / H))
    box = ((nw - cw) / 2, (nh - ch) / 2, (nw + cw) / 2, (nh + ch) / 2)
    return nh, nw, tuple(int(round(x)) for x in box)


def preprocess_scene(scene: Scene, image_size: int, mean=None, std=None,
                     processing: ImageProcessing | None = None) -> Preprocessed:
    """Views -> the tower's pixel values (the checkpoint's image processor, CLIP's at
    ``image_size`` by default), depth maps on the same ``image_size`` grid (nearest, LLaVA-3D's
    depth geometry) and the depth intrinsics moved onto that grid.

    The intrinsics are scaled for the resize as LLaVA-3D scales them and shifted by the crop
    Pillow actually makes; LLaVA-3D shifts ``cx`` by ``(w - h) / 2`` instead, which is the same
    pixel count for landscape maps with an even difference (ScanNet's 640 x 480 depth at 336:
    448 - 336 = 112) and half a pixel off otherwise."""
    proc = processing or ImageProcessing.clip(image_size, mean, std)
    V, H, W, _ = scene.images.shape
    if proc.output_hw(H, W) != (image_size, image_size):
        raise InputError(f"{scene.name}: the image processor makes {proc.output_hw(H, W)} pixel values, the vision "
                         f"tower takes {image_size}x{image_size}; check the checkpoint's preprocessor_config.json")
    Hd, Wd = scene.depths.shape[1:3]
    nh, nw, box = depth_resize_crop(Hd, Wd, proc)
    proc.resize_target_ok(H, W, f"{scene.name}: views")  # both checked before any view is resized
    proc.resize_target_ok(Hd, Wd, f"{scene.name}: depth maps", (nh, nw))
    pix = np.empty((V, 3, image_size, image_size), np.float32)
    dep = np.empty((V, image_size, image_size), np.float32)
    for v in range(V):
        pix[v] = proc(scene.images[v])
        d = Image.fromarray(np.ascontiguousarray(scene.depths[v], np.float32))  # mode F
        if (nh, nw) != (Hd, Wd):
            d = d.resize((nw, nh), Image.NEAREST)
        dep[v] = np.asarray(d.crop(box), np.float32)
    K = scene.intrinsics.copy()
    K[:, 0] /= Wd / nw
    K[:, 1] /= Hd / nh
    K[:, 0, 2] -= box[0]
    K[:, 1, 2] -= box[1]
    return Preprocessed(pix, dep, K, scene.poses)


def unproject_patches(depths: np.ndarray, intrinsics: np.ndarray, poses: np.ndarray, patch: int) -> np.ndarray:
    """World xyz of each patch, taken at the patch's top-left pixel: (V, (S/p)^2, 3), row-major.

    Upstream unprojects every pixel and nearest-downsamples; the top-left pixel is what survives,
    so only those pixels are computed here. Depth-0 pixels are not masked (as upstream).
    """
    V, S, _ = depths.shape
    g = S // patch
    rows = np.arange(g) * patch
    cols = np.arange(g) * patch
    vv, uu = np.meshgrid(rows, cols, indexing="ij")  # v = row (y), u = column (x)
    d = depths[:, vv, uu].reshape(V, -1).astype(np.float64)  # (V, g*g)
    u = uu.reshape(-1).astype(np.float64)
    v = vv.reshape(-1).astype(np.float64)
    fx, fy = intrinsics[:, 0, 0][:, None], intrinsics[:, 1, 1][:, None]
    cx, cy = intrinsics[:, 0, 2][:, None], intrinsics[:, 1, 2][:, None]
    x = (u[None] - cx) * d / fx
    y = (v[None] - cy) * d / fy
    cam = np.stack([x, y, d, np.ones_like(d)], axis=-1)  # (V, P, 4)
    world = np.einsum("vij,vpj->vpi", poses, cam)[..., :3]
    return world.astype(np.float32)


@dataclass
class VoxelMap:
    """How patches map to voxel tokens: token ``t`` is the mean of patches with ``inverse == t``."""

    inverse: np.ndarray  # (V*P,) int64 token index per patch, -1 if the voxel was capped away
    num_tokens: int
    keys: np.ndarray  # (num_tokens,) voxel keys in token order (ascending)
    centers: np.ndarray  # (num_tokens, 3) mean xyz of the token's patches


def voxelize(xyz: np.ndarray, voxel_size: float = VOXEL_SIZE, max_tokens: int = MAX_SPATIAL_TOKENS) -> VoxelMap:
    """Voxel pooling map: key = round(xyz / size) - per-scene min, raveled x-major.

    Tokens are ordered by key. Over ``max_tokens`` voxels, ``max_tokens`` evenly spaced voxels
    (in key order) are kept -- deterministic, unlike upstream's random subset.
    """
    pts = xyz.reshape(-1, 3).astype(np.float64)
    if not np.isfinite(pts).all():
        raise InputError("scene: unprojected points are NaN or inf; check the scene's intrinsics, poses and depths")
    span = pts.max(axis=0) - pts.min(axis=0)
    # the raveled key must fit int64 (an absurd pose would wrap every point into one voxel)
    if float(np.prod(np.floor(span / voxel_size) + 2)) >= 2.0**62:
        raise InputError(f"scene: {span.max():.3g} m across is too large for {voxel_size} m voxels; check that poses and "
                         "depths are in metres")
    q = np.round(pts / voxel_size).astype(np.int64)
    q -= q.min(axis=0, keepdims=True)
    dims = q.max(axis=0) + 1
    keys = (q[:, 0] * dims[1] + q[:, 1]) * dims[2] + q[:, 2]  # x-major
    uniq, inverse = np.unique(keys, return_inverse=True)
    n = len(uniq)
    if n > max_tokens:
        keep = np.linspace(0, n - 1, max_tokens).round().astype(np.int64)
        remap = np.full(n, -1, np.int64)
        remap[keep] = np.arange(max_tokens)
        inverse = remap[inverse]
        uniq = uniq[keep]
        n = max_tokens
    valid = inverse >= 0
    counts = np.bincount(inverse[valid], minlength=n).astype(np.float64)
    centers = np.zeros((n, 3))
    for c in range(3):
        centers[:, c] = np.bincount(inverse[valid], weights=pts[valid, c], minlength=n) / counts
    return VoxelMap(inverse.astype(np.int64), n, uniq, centers.astype(np.float32))


def pool_numpy(features: np.ndarray, vmap: VoxelMap) -> np.ndarray:
    """Mean of (V*P, D) patch features per voxel token -> (N, D)."""
    feats = features.reshape(-1, features.shape[-1])
    valid = vmap.inverse >= 0
    out = np.zeros((vmap.num_tokens, feats.shape[1]), np.float64)
    np.add.at(out, vmap.inverse[valid], feats[valid].astype(np.float64))
    counts = np.bincount(vmap.inverse[valid], minlength=vmap.num_tokens)
    return (out / counts[:, None]).astype(features.dtype)
