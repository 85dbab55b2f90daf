"""2D image input: loading, and the checkpoint's own image preprocessing, shared by the adapters
(PyTorch) and the runtime (numpy + Pillow).

:class:`ImageProcessing` reproduces transformers' PIL-backend image processors
(``CLIPImageProcessor`` / ``SiglipImageProcessor`` as LLaVA and LLaVA-3D use them): resize with
Pillow (``shortest_edge``: the short side to N, the long side ``int(N * long / short)``, i.e.
rounded down; or ``height`` x ``width``), centre crop at ``((h - ch) // 2, (w - cw) // 2)`` with
zero padding when the image is smaller, rescale in float64 then float32, normalise in float32.
The compile tier reads the settings through transformers and stores them in the artifact's
``preprocess.json`` (``image_processing``), so the runtime applies exactly the same steps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import InputError
from .limits import limit_hint, limits

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
PIL_FILTERS = {0, 1, 2, 3, 4, 5}  # nearest, lanczos, bilinear, bicubic, box, hamming
MAX_SIDE = 4096  # a tower's input side; CLIP towers use 224-448


class UnreadableImage(InputError):
    """A file Pillow cannot open as an image (scene readers skip such frames and count them)."""


def check_pixels(where, H: int, W: int) -> None:
    """Refuse an image of ``H`` x ``W`` pixels before any of it is decoded or resized: each side at
    least one pixel, the product within the per-view limit."""
    max_pixels = limits()["view_pixels"]
    if H < 1 or W < 1:
        raise InputError(f"{where}: {W}x{H} pixels; an image needs at least one pixel")
    if H * W > max_pixels:
        raise InputError(f"{where}: {W}x{H} pixels, more than the limit of {max_pixels}; downscale it or "
                         f"{limit_hint('view_pixels')}")


def open_image(path, what: str = "image"):
    """A lazily opened Pillow image of the regular file ``path`` whose header size passed
    :func:`check_pixels`; no pixel is decoded yet. The caller closes it."""
    from adatoken_compile.readers import regular_file

    regular_file(path, what, "pass an image file (PNG, JPEG, ...)")
    try:
        im = Image.open(path)
    except Exception as e:  # Pillow raises many types for a file that is not an image
        raise UnreadableImage(f"{path}: unreadable {what} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    try:
        check_pixels(path, im.size[1], im.size[0])
    except InputError:
        im.close()
        raise
    return im


def load_image(path: str) -> np.ndarray:
    """An RGB image (any format Pillow reads, or a (H,W,3) uint8 .npy) as a uint8 array; its
    pixels are counted against the per-view limit before it is decoded."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.lexists(path):
        raise InputError(f"{path}: image not found")
    max_pixels = limits()["view_pixels"]
    try:
        if str(path).endswith(".npy"):
            from adatoken_compile.readers import regular_file

            if regular_file(path, "image", "pass an image file") > 3 * max_pixels + (1 << 16):
                raise InputError(f"{path}: larger than an image of {max_pixels} pixels; downscale it or "
                                 f"{limit_hint('view_pixels')}")
            return np.load(path, allow_pickle=False)
        with open_image(path) as im:
            return np.asarray(im.convert("RGB"))
    except InputError:
        raise
    except Exception as e:  # Pillow and numpy raise many types for a broken file
        raise InputError(f"{path}: unreadable image ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def check_normalization(mean, std, where: str = "preprocessing") -> None:
    """Refuse an image normalisation that divides by zero or spreads NaN."""
    m, s = np.asarray(mean, np.float64).reshape(-1), np.asarray(std, np.float64).reshape(-1)
    if m.shape != (3,) or s.shape != (3,) or not np.isfinite(m).all() or not np.isfinite(s).all() or (s <= 0).any():
        raise InputError(f"{where}: image mean {m.tolist()} / std {s.tolist()} must be 3 finite numbers each, std > 0; "
                         "fix image_mean / image_std")


def shortest_edge_size(H: int, W: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``size``: the long side rounded down, as
    transformers' ``get_resize_output_image_size`` computes it."""
    short, long = (W, H) if W <= H else (H, W)
    new_long = int(size * long / short)
    return (new_long, size) if W <= H else (size, new_long)


@dataclass(frozen=True)
class ImageProcessing:
    """One image processor's settings (``None`` = that step is off)."""

    shortest_edge: int | None = None  # resize: short side to this
    resize_hw: tuple[int, int] | None = None  # resize: to exactly (height, width)
    resample: int = BICUBIC  # PIL filter id
    crop_hw: tuple[int, int] | None = None  # centre crop (height, width)
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = CLIP_MEAN
    std: tuple[float, ...] | None = CLIP_STD

    def __post_init__(self):
        # every number that sizes or steers the resize is checked here, before an image meets it
        if not isinstance(self.resample, int) or isinstance(self.resample, bool) or self.resample not in PIL_FILTERS:
            raise InputError(f"preprocessing: resample {str(self.resample)[:20]} is not a Pillow filter (one of "
                             f"{sorted(PIL_FILTERS)}: 0 nearest, 2 bilinear, 3 bicubic, ...); fix 'resample'")
        for name, hw in (("resize", self.resize_hw), ("crop", self.crop_hw)):
            if hw is not None:
                check_pixels(f"preprocessing: {name} size", hw[0], hw[1])
        if self.shortest_edge is not None and not 1 <= self.shortest_edge <= MAX_SIDE:
            raise InputError(f"preprocessing: shortest_edge {self.shortest_edge} must be in [1, {MAX_SIDE}]; fix the "
                             "resize size")
        if self.mean is not None or self.std is not None:
            check_normalization(self.mean, self.std)

    @classmethod
    def clip(cls, size: int, mean=None, std=None) -> "ImageProcessing":
        """CLIPImageProcessor with ``size`` for both the short side and the square crop."""
        return cls(shortest_edge=int(size), crop_hw=(int(size), int(size)),
                   mean=tuple(map(float, CLIP_MEAN if mean is None else mean)),
                   std=tuple(map(float, CLIP_STD if std is None else std)))

    @classmethod
    def from_dict(cls, d: dict, where: str = "preprocess.json") -> "ImageProcessing":
        try:
            return cls(shortest_edge=d.get("shortest_edge"),
                       resize_hw=tuple(d["resize_hw"]) if d.get("resize_hw") else None,
                       resample=int(d.get("resample", BICUBIC)),
                       crop_hw=tuple(d["crop_hw"]) if d.get("crop_hw") else None,
                       rescale=d.get("rescale"),
                       mean=tuple(d["mean"]) if d.get("mean") is not None else None,
                       std=tuple(d["std"]) if d.get("std") is not None else None)
        except (TypeError, ValueError, KeyError) as e:
            raise InputError(f"{where}: malformed image_processing ({type(e).__name__}: {e}); recompile the artifact")

    def to_dict(self) -> dict:
        return {"shortest_edge": self.shortest_edge, "resize_hw": list(self.resize_hw) if self.resize_hw else None,
                "resample": self.resample, "crop_hw": list(self.crop_hw) if self.crop_hw else None,
                "rescale": self.rescale, "mean": list(self.mean) if self.mean is not None else None,
                "std": list(self.std) if self.std is not None else None}

    def resized_hw(self, H: int, W: int) -> tuple[int, int]:
        if self.shortest_edge:
            return shortest_edge_size(H, W, self.shortest_edge)
        if self.resize_hw:
            return self.resize_hw
        return H, W

    def output_hw(self, H: int, W: int) -> tuple[int, int]:
        return self.crop_hw if self.crop_hw else self.resized_hw(H, W)

    def geometry(self, H: int, W: int) -> tuple[int, int, int, int]:
        """(resized height, resized width, crop top, crop left) for an (H, W) input."""
        nh, nw = self.resized_hw(H, W)
        return self.geometry_of(nh, nw) if self.crop_hw else (nh, nw, 0, 0)

    def geometry_of(self, nh: int, nw: int) -> tuple[int, int, int, int]:
        """Crop offsets for an already resized (nh, nw) array: ``(n - c) // 2``, or minus the
        padding (half the shortfall, rounded up) where the crop is larger."""
        ch, cw = self.crop_hw
        top = (nh - ch) // 2 if nh >= ch else -math.ceil((ch - nh) / 2)
        left = (nw - cw) // 2 if nw >= cw else -math.ceil((cw - nw) / 2)
        return nh, nw, top, left

    def resize(self, img: np.ndarray) -> np.ndarray:
        """The resized uint8 (h, w, 3) image (unchanged when the size is already right, as PIL does)."""
        H, W = img.shape[:2]
        nh, nw = self.resized_hw(H, W)
        if (nh, nw) == (H, W):
            return img
        self.resize_target_ok(H, W, "image", (nh, nw))
        return np.asarray(Image.fromarray(img).resize((nw, nh), resample=self.resample))

    def resize_target_ok(self, H: int, W: int, where: str = "image", target: tuple[int, int] | None = None) -> bool:
        """Refuse an (H, W) input whose resize target exceeds the per-view limit: a sliver
        (1 x 1,000,000) whose short side goes to the tower's size would ask for a resize of
        billions of pixels. ``target``: the (height, width) it resizes to, when not this
        processor's own resize."""
        nh, nw = target or self.resized_hw(H, W)
        if nh * nw > max(limits()["view_pixels"], H * W):
            raise InputError(f"{where}: {W}x{H} pixels resizes to {nw}x{nh}, more than the limit of "
                             f"{limits()['view_pixels']} pixels; crop it to a less extreme aspect ratio or "
                             f"{limit_hint('view_pixels')}")
        return True

    def crop(self, arr: np.ndarray) -> np.ndarray:
        """Centre crop of an (h, w, ...) array, zero-padded where the crop is larger."""
        if not self.crop_hw:
            return arr
        nh, nw = arr.shape[:2]
        ch, cw = self.crop_hw
        _, _, top, left = self.geometry_of(nh, nw)
        out = np.zeros((ch, cw) + arr.shape[2:], arr.dtype)
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + ch, nh), min(left + cw, nw)
        out[r0 - top : r1 - top, c0 - left : c1 - left] = arr[r0:r1, c0:c1]
        return out

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H,W,3) uint8 -> (3,h,w) float32."""
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise InputError(f"image has shape {img.shape} dtype {img.dtype}, expected (H,W,3) uint8 RGB")
        if 0 in img.shape:
            raise InputError(f"image has shape {img.shape}; it needs at least one pixel")
        H, W = img.shape[:2]
        check_pixels("image", H, W)
        out = self.crop(self.resize(img))
        x = out.astype(np.float64) * self.rescale if self.rescale is not None else out
        x = x.astype(np.float32)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def processing_from_dict(d: dict, where: str = "preprocess.json"):
    """The image processing a ``preprocess.json`` records: Qwen2-VL's (``kind`` ``qwen2_vl``,
    :mod:`adatoken_compile.runtime.qwen_vision`) or the resize / crop one above."""
    if isinstance(d, dict) and d.get("kind") == "qwen2_vl":
        from .qwen_vision import QwenImageProcessing

        return QwenImageProcessing.from_dict(d, where)
    return ImageProcessing.from_dict(d, where)


def preprocess_image(image: np.ndarray, size: int | ImageProcessing, mean=None, std=None) -> np.ndarray:
    """(H,W,3) uint8 -> (3,h,w) float32 with ``size``'s processing (an :class:`ImageProcessing`),
    or CLIP's at ``size`` with ``mean`` / ``std``."""
    proc = size if isinstance(size, ImageProcessing) else ImageProcessing.clip(size, mean, std)
    return proc(image)


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
