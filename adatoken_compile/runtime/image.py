"""2D image input: loading and the CLIP-style preprocessing shared by the HF LLaVA adapter and the runtime."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..errors import InputError
from .scene import limit_hint, resize_crop_params, check_normalization, limits


def load_image(path: str) -> np.ndarray:
    """An RGB image (any format Pillow reads, or a (H,W,3) uint8 .npy) as a uint8 array; its
    pixels are counted against the per-view limit before it is decoded."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise InputError(f"{path}: image not found")
    max_pixels = limits()["view_pixels"]
    try:
        if str(path).endswith(".npy"):
            if os.path.getsize(path) > 3 * max_pixels + (1 << 16):
                raise InputError(f"{path}: larger than an image of {max_pixels} pixels; downscale it or "
                                 f"{limit_hint('view_pixels')}")
            return np.load(path, allow_pickle=False)
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > max_pixels:
                raise InputError(f"{path}: {im.size[0]}x{im.size[1]} pixels, more than the limit of {max_pixels}; "
                                 f"downscale it or {limit_hint('view_pixels')}")
            return np.asarray(im.convert("RGB"))
    except InputError:
        raise
    except Exception as e:  # Pillow and numpy raise many types for a broken file
        raise InputError(f"{path}: unreadable image ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def preprocess_image(image: np.ndarray, size: int, mean, std) -> np.ndarray:
    """(H,W,3) uint8 -> (3,size,size) float32: shortest side to size (bicubic), centre crop, normalise."""
    check_normalization(mean, std)
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8 or 0 in img.shape:
        raise InputError(f"image has shape {img.shape} dtype {img.dtype}, expected (H,W,3) uint8 RGB")
    H, W = img.shape[:2]
    if H * W > limits()["view_pixels"]:
        raise InputError(f"image of {H}x{W} pixels, more than the limit of {limits()['view_pixels']}; downscale it or "
                         f"{limit_hint('view_pixels')}")
    nh, nw, top, left = resize_crop_params(H, W, size)
    if (nh, nw) != (H, W):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
    img = img[top : top + size, left : left + size].astype(np.float32) / 255.0
    m = np.asarray(mean, np.float32).reshape(1, 1, 3)
    s = np.asarray(std, np.float32).reshape(1, 1, 3)
    return ((img - m) / s).transpose(2, 0, 1).copy()
