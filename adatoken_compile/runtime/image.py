"""2D image input: loading and the CLIP-style preprocessing shared by the HF LLaVA adapter and the runtime."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..errors import InputError
from .scene import _resize_crop_params


def load_image(path: str) -> np.ndarray:
    """An RGB image (any format Pillow reads, or a (H,W,3) uint8 .npy) as a uint8 array."""
    if not os.path.exists(path):
        raise InputError(f"{path}: image not found")
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise InputError(f"{path}: unreadable image ({type(e).__name__}: {e})")


def preprocess_image(image: np.ndarray, size: int, mean, std) -> np.ndarray:
    """(H,W,3) uint8 -> (3,size,size) float32: shortest side to size (bicubic), centre crop, normalise."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise InputError(f"image has shape {img.shape} dtype {img.dtype}, expected (H,W,3) uint8 RGB")
    H, W = img.shape[:2]
    nh, nw, top, left = _resize_crop_params(H, W, size)
    if (nh, nw) != (H, W):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
    img = img[top : top + size, left : left + size].astype(np.float32) / 255.0
    m = np.asarray(mean, np.float32).reshape(1, 1, 3)
    s = np.asarray(std, np.float32).reshape(1, 1, 3)
    return ((img - m) / s).transpose(2, 0, 1).copy()


def patch_coordinates(n_tokens: int) -> np.ndarray:
    """(n, 3) float32 (row, col, 0) of an image's patch tokens in raster order (what the spatial
    selection rules read for 2D images); a leading class token of a g*g+1 sequence sits at the centre."""
    g = int(np.sqrt(n_tokens))
    cls = n_tokens - g * g
    if cls not in (0, 1):
        g = int(np.sqrt(n_tokens - 1))
        cls = n_tokens - g * g
    rows, cols = np.divmod(np.arange(g * g), g) if g > 0 else (np.zeros(0), np.zeros(0))
    grid = np.stack([rows, cols, np.zeros_like(rows)], axis=1).astype(np.float32)
    centre = np.full((cls, 3), (g - 1) / 2.0, np.float32)
    centre[:, 2] = 0.0
    return np.concatenate([centre, grid], axis=0)[:n_tokens]
