"""Scene input format, validation, and the LLaVA-3D geometric preprocessing.

Pure numpy (+ Pillow for the bicubic RGB resize) so that the torch-free runtime and the PyTorch
adapter share exactly the same code.

Scene file (``.npz``), V views of H x W pixels:

=============  ==============  =========  ================================================
key            shape           dtype      meaning
=============  ==============  =========  ================================================
``images``     (V, H, W, 3)    uint8      RGB
``depths``     (V, H, W)       float32    depth in metres (0 = no reading)
``poses``      (V, 4, 4)       float32/64 camera-to-world (OpenCV camera: x right, y down,
                                          z forward)
``intrinsics`` (V, 4, 4)       float32/64 pinhole K in the top-left 3x3 (pixels)
=============  ==============  =========  ================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from adatoken_compile.errors import InputError

VOXEL_SIZE = 0.2
MAX_SPATIAL_TOKENS = 2560

SCENE_KEYS = {
    "images": ("(V,H,W,3)", (np.uint8,)),
    "depths": ("(V,H,W)", (np.float32,)),
    "poses": ("(V,4,4)", (np.float32, np.float64)),
    "intrinsics": ("(V,4,4)", (np.float32, np.float64)),
}


@dataclass
class Scene:
    images: np.ndarray  # (V, H, W, 3) uint8
    depths: np.ndarray  # (V, H, W) float32
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
    for key, (shape, dtypes) in SCENE_KEYS.items():
        if key not in arrays:
            raise InputError(f"{name}: missing key '{key}' (expected {shape} {dtypes[0].__name__}); {fix}")
    images, depths = np.asarray(arrays["images"]), np.asarray(arrays["depths"])
    poses, intr = np.asarray(arrays["poses"]), np.asarray(arrays["intrinsics"])
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"{name}: key 'images' has shape {images.shape}, expected (V,H,W,3) uint8 RGB")
    V, H, W = images.shape[:3]
    expected = {
        "images": (images, (V, H, W, 3)),
        "depths": (depths, (V, H, W)),
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
    for key in ("depths", "poses", "intrinsics"):
        if not np.isfinite(expected[key][0]).all():
            raise InputError(f"{name}: key '{key}' contains NaN or inf; expected finite {SCENE_KEYS[key][0]} values")
    if not (depths > 0).any():
        raise InputError(f"{name}: key 'depths' is all zero; expected (V,H,W) float32 depth in metres")
    if (depths < 0).any():
        raise InputError(f"{name}: key 'depths' has negative values; expected (V,H,W) float32 depth in metres >= 0")
    return Scene(images, depths, poses.astype(np.float64), intr.astype(np.float64), name=name)


def load_scene(path: str) -> Scene:
    """Load and validate a scene ``.npz``."""
    if not os.path.exists(path):
        raise InputError(f"{path}: scene file not found; pass an existing .npz (see docs/formats.md: scene .npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / format errors
        raise InputError(f"{path}: not a readable .npz scene ({type(e).__name__}: {e}); see docs/formats.md: scene .npz")
    return validate_scene(arrays, name=path)


# --------------------------------------------------------------------------- preprocessing


@dataclass
class Preprocessed:
    pixel_values: np.ndarray  # (V, 3, S, S) float32, normalised
    depths: np.ndarray  # (V, S, S) float32
    intrinsics: np.ndarray  # (V, 4, 4) float64, adjusted for resize + crop
    poses: np.ndarray  # (V, 4, 4) float64


def resize_crop_params(H: int, W: int, size: int) -> tuple[int, int, int, int]:
    """Shortest side -> size (as CLIPImageProcessor), then centre crop size x size."""
    if H <= W:
        nh, nw = size, int(round(W * size / H))
    else:
        nh, nw = int(round(H * size / W)), size
    top = (nh - size) // 2
    left = (nw - size) // 2
    return nh, nw, top, left


def preprocess_scene(scene: Scene, image_size: int, mean, std) -> Preprocessed:
    V, H, W, _ = scene.images.shape
    nh, nw, top, left = resize_crop_params(H, W, image_size)
    pix = np.empty((V, 3, image_size, image_size), np.float32)
    dep = np.empty((V, image_size, image_size), np.float32)
    mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(std, np.float32).reshape(3, 1, 1)
    # nearest resize for depth: source index for each destination pixel
    ri = np.minimum((np.arange(nh) * H / nh).astype(np.int64), H - 1)[top : top + image_size]
    ci = np.minimum((np.arange(nw) * W / nw).astype(np.int64), W - 1)[left : left + image_size]
    for v in range(V):
        if (nh, nw) == (H, W):
            img = scene.images[v]
        else:
            img = np.asarray(Image.fromarray(scene.images[v]).resize((nw, nh), Image.BICUBIC))
        img = img[top : top + image_size, left : left + image_size].astype(np.float32) / 255.0
        pix[v] = (img.transpose(2, 0, 1) - mean) / std
        dep[v] = scene.depths[v][np.ix_(ri, ci)]
    K = scene.intrinsics.copy()
    K[:, 0, :] *= nw / W
    K[:, 1, :] *= nh / H
    K[:, 0, 2] -= left
    K[:, 1, 2] -= top
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
