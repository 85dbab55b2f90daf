"""Qwen2.5-VL image input in numpy: what ``Qwen2VLImageProcessor`` and the vision tower's
grid bookkeeping compute, for the PyTorch adapter and the torch-free runtime alike.

* :func:`smart_resize` -- the checkpoint's ``min_pixels`` / ``max_pixels`` rule: both sides a
  multiple of ``patch_size * merge_size``, the area inside the limits, the aspect ratio kept.
* :meth:`QwenImageProcessing.patches` -- resize (Pillow, the processor's filter), rescale,
  normalise, then the processor's flat ``(grid_h * grid_w, C * temporal_patch * patch * patch)``
  patches in 2x2-merge-block order, and ``grid_thw``.
* :meth:`QwenImageProcessing.encoder_feeds` -- what the exported vision tower takes for ONE image:
  the patches and their rotary (h, w) ids permuted into window order, and each patch's window
  (the windowed blocks attend within it, the full-attention blocks within the image). The tower
  returns merged tokens in window order; :meth:`QwenImageProcessing.unpermute` restores raster
  order. transformers computes the same indices in ``vision_utils`` from ``grid_thw``.
* :func:`token_coordinates` -- each merged token's (t, h, w) on the language model's grid: the
  M-RoPE offsets of the token inside its image (the ``mrope`` position layout adds them to the
  image's start position) and the coordinates that spatial selection rules read.
* :meth:`QwenImageProcessing.video_patches` -- a :class:`~adatoken_compile.runtime.sample.Video`'s
  frames as ``Qwen2VLVideoProcessor`` lays them out: each frame resized and normalised as an
  image, ``temporal_patch_size`` frames to a temporal patch (an odd count padded with the last
  frame), ``grid_thw = (frames / temporal_patch_size, h, w)``; a video token's t is its temporal
  patch times ``tokens_per_second * second_per_grid_ts`` (``get_rope_index``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, first_line
from .image import BICUBIC, CLIP_MEAN, CLIP_STD, ImageProcessing, check_pixels
from .sample import Video

KIND = "qwen2_vl"
MAX_ASPECT = 200  # the processor refuses more elongated images


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 where: str = "image") -> tuple[int, int]:
    """(height, width) the processor resizes an image to (transformers' ``smart_resize``)."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise InputError(f"{where}: {width}x{height} pixels has an aspect ratio over {MAX_ASPECT}, which the "
                         "image processor refuses; crop it")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def token_coordinates(grid_thw, merge_size: int, time_interval: float = 1.0) -> np.ndarray:
    """(t * h/m * w/m, 3) float32 (t, h, w) of an image's or a video's merged tokens, raster order;
    the temporal index scaled by ``time_interval`` and truncated in float32, as ``get_rope_index``
    does with its float32 ``second_per_grid_ts``."""
    t, h, w = (int(x) for x in grid_thw)
    gh, gw = h // merge_size, w // merge_size
    times = (np.arange(t, dtype=np.float32) * np.float32(time_interval)).astype(np.int64)
    tt, hh, ww = np.meshgrid(times, np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()], axis=1).astype(np.float32)


def window_order(grid_thw, merge_size: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(merged-token order of the windows, tokens per window) of one image, as
    ``get_vision_window_index``: ``window`` merged tokens a side, windows row-major, tokens
    row-major inside a window; empty windows dropped."""
    t, h, w = (int(x) for x in grid_thw)
    gh, gw = h // merge_size, w // merge_size
    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    pad_h, pad_w = window - gh % window, window - gw % window
    nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
    padded = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, window * window)
    sizes = (padded != -100).sum(-1).reshape(-1)
    flat = padded.reshape(-1)
    return flat[flat != -100], sizes[sizes > 0]


def rotary_ids(grid_thw, merge_size: int) -> np.ndarray:
    """(t*h*w, 2) int64 (row, col) of each patch in merge-block order (the tower's rotary ids)."""
    t, h, w = (int(x) for x in grid_thw)
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge_size, merge_size, w // merge_size, merge_size)
    hh = hh.reshape(shape).transpose(0, 2, 1, 3).ravel()
    ww = ww.reshape(shape).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([hh, ww], axis=1), (t, 1)).astype(np.int64)


@dataclass(frozen=True)
class QwenImageProcessing:
    """``Qwen2VLImageProcessor``'s settings plus the tower's window size (in pixels)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    window_size: int = 112
    resample: int = BICUBIC
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = CLIP_MEAN
    std: tuple[float, ...] | None = CLIP_STD
    tokens_per_second: float | None = None  # the vision config's; None: the model takes no video
    kind: str = KIND
    ENCODER_INPUTS = ("pixel_values", "vision_position_ids", "window_ids")  # the exported tower's, per image

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "window_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"preprocessing: {name} {str(v)[:20]} must be a whole number >= 1; fix {name}")
        if self.min_pixels > self.max_pixels:
            raise InputError(f"preprocessing: min_pixels {self.min_pixels} > max_pixels {self.max_pixels}; fix them")
        tps = self.tokens_per_second
        if tps is not None and (isinstance(tps, bool) or not isinstance(tps, (int, float)) or not 0 < tps < 1e6):
            raise InputError(f"preprocessing: tokens_per_second {str(tps)[:20]} must be a number > 0; fix the vision "
                             "config")
        if self.window_size % (self.patch_size * self.merge_size):
            raise InputError(f"preprocessing: window_size {self.window_size} is not a multiple of patch_size x "
                             f"merge_size ({self.patch_size * self.merge_size}); fix the vision config")
        # the resize / rescale / normalise steps are the shared processor's, checked there
        self.pixels_step((self.factor, self.factor))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def max_tokens(self) -> int:
        """The most merged tokens one image can give (its area at ``max_pixels``)."""
        return max(1, self.max_pixels // (self.factor * self.factor))

    @classmethod
    def from_dict(cls, d: dict, where: str = "preprocess.json") -> "QwenImageProcessing":
        try:
            return cls(min_pixels=int(d["min_pixels"]), max_pixels=int(d["max_pixels"]), patch_size=int(d["patch_size"]),
                       temporal_patch_size=int(d["temporal_patch_size"]), merge_size=int(d["merge_size"]),
                       window_size=int(d["window_size"]), resample=int(d.get("resample", BICUBIC)),
                       rescale=d.get("rescale"), mean=tuple(d["mean"]) if d.get("mean") is not None else None,
                       std=tuple(d["std"]) if d.get("std") is not None else None,
                       tokens_per_second=d.get("tokens_per_second"))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise InputError(f"{where}: malformed image_processing ({type(e).__name__}: {e}); recompile the artifact")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size, "window_size": self.window_size, "resample": self.resample,
                "rescale": self.rescale, "mean": list(self.mean) if self.mean is not None else None,
                "std": list(self.std) if self.std is not None else None, "tokens_per_second": self.tokens_per_second}

    def pixels_step(self, hw: tuple[int, int]) -> ImageProcessing:
        return ImageProcessing(resize_hw=hw, resample=self.resample, rescale=self.rescale, mean=self.mean, std=self.std)

    def resized_hw(self, H: int, W: int, where: str = "image") -> tuple[int, int]:
        return smart_resize(H, W, self.factor, self.min_pixels, self.max_pixels, where)

    def patches(self, image: np.ndarray, where: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """(N, patch_dim) float32 patches of one (H, W, 3) uint8 image and its (3,) int64 grid_thw
        (the image is one temporal patch of ``temporal_patch_size`` equal frames)."""
        return self._patchify([self._frame(image, where)], where)

    def video_patches(self, frames, where: str = "video") -> tuple[np.ndarray, np.ndarray]:
        """(N, patch_dim) float32 patches and (3,) int64 grid_thw of a video's frames ((H, W, 3) uint8,
        all one size), temporal patch by temporal patch."""
        frames = [self._frame(f, f"{where} frame {i}") for i, f in enumerate(frames)]
        check_frames(frames, [f"{where} frame {i}" for i in range(len(frames))])
        return self._patchify(frames, where)

    @staticmethod
    def _frame(image, where: str) -> np.ndarray:
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8 or 0 in img.shape:
            raise InputError(f"{where}: shape {img.shape} dtype {img.dtype}, expected (H,W,3) uint8 RGB")
        check_pixels(where, *img.shape[:2])
        return img

    def _patchify(self, frames: list, where: str) -> tuple[np.ndarray, np.ndarray]:
        step = self.pixels_step(self.resized_hw(*frames[0].shape[:2], where))
        T = self.temporal_patch_size
        pixels = [step(f) for f in frames]  # (3, h, w) each
        pixels += pixels[-1:] * (-len(pixels) % T)  # the processor pads with the last frame
        x = np.stack(pixels)
        F_, C, h, w = x.shape
        p, m = self.patch_size, self.merge_size
        gt, gh, gw = F_ // T, h // p, w // p
        x = x.reshape(gt, T, C, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return (np.ascontiguousarray(x.reshape(gt * gh * gw, C * T * p * p), np.float32),
                np.array([gt, gh, gw], np.int64))

    def encoder_feeds(self, patches: np.ndarray, grid_thw) -> dict:
        """The vision tower graph's feeds for one image: patches and rotary ids in window order, each
        patch's window id."""
        unit = self.merge_size ** 2
        order, sizes = window_order(grid_thw, self.merge_size, self.window_size // self.factor)
        n = patches.shape[0]
        pix = patches.reshape(n // unit, unit, -1)[order].reshape(n, -1)
        rot = rotary_ids(grid_thw, self.merge_size).reshape(n // unit, unit, 2)[order].reshape(n, 2)
        windows = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes * unit)
        return {"pixel_values": np.ascontiguousarray(pix), "vision_position_ids": np.ascontiguousarray(rot),
                "window_ids": windows}

    def encode(self, source, run) -> tuple[np.ndarray, np.ndarray]:
        """(N, H) tokens of one image or :class:`Video` (frames as arrays) in raster order and their
        (N, 3) (t, h, w); ``run(feeds)`` runs the tower graph."""
        if not isinstance(source, Video):
            patches, grid = self.patches(source)
            tokens = self.unpermute(np.asarray(run(self.encoder_feeds(patches, grid))), grid)
            return tokens, token_coordinates(grid, self.merge_size)
        interval = self.time_interval(source)
        patches, grid = self.video_patches(source.frames)
        # every vision block attends within one temporal patch (transformers' packed attention has one
        # segment per temporal patch, windows included), so the one-image tower runs on each alone
        one, per = np.array([1, grid[1], grid[2]], np.int64), patches.shape[0] // int(grid[0])
        tokens = [self.unpermute(np.asarray(run(self.encoder_feeds(patches[i * per:(i + 1) * per], one))), one)
                  for i in range(int(grid[0]))]
        return np.concatenate(tokens), token_coordinates(grid, self.merge_size, interval)

    def time_interval(self, video: Video) -> float:
        """M-RoPE steps between temporal patches: ``tokens_per_second * second_per_grid_ts`` with
        ``second_per_grid_ts = temporal_patch_size / fps`` (the processor's), in float32."""
        if self.tokens_per_second is None:
            raise InputError("video: this model takes no video (no tokens_per_second in its vision config, or "
                             "an artifact compiled without it); pass the frames as images, or recompile the artifact")
        return float(np.float32(self.tokens_per_second) * np.float32(self.temporal_patch_size / video.fps))

    def unpermute(self, tokens: np.ndarray, grid_thw) -> np.ndarray:
        """The tower's merged tokens (window order) back in raster order."""
        order, _ = window_order(grid_thw, self.merge_size, self.window_size // self.factor)
        return tokens[np.argsort(order)]


def check_frames(frames, names) -> None:
    """One line naming the first frame whose size is not frame 0's."""
    sizes = [np.shape(f)[:2] for f in frames]
    for i, (h, w) in enumerate(sizes):
        if (h, w) != sizes[0]:
            raise InputError(f"{names[i]}: frame {i} of a video is {w}x{h} pixels, frame 0 {sizes[0][1]}x{sizes[0][0]}; "
                             "the frames of one video must be one size: resize them, or pass them as images")


# transformers' Qwen2VLVideoProcessor: a sampled video has at least 4 and at most 768 frames
VIDEO_MIN_FRAMES, VIDEO_MAX_FRAMES = 4, 768


def sample_frame_indices(total: int, video_fps: float, fps: float, temporal_patch_size: int,
                         min_frames: int = VIDEO_MIN_FRAMES, max_frames: int = VIDEO_MAX_FRAMES) -> np.ndarray:
    """The frames of a ``total``-frame video at ``video_fps`` that Qwen2.5-VL's video processor keeps
    when asked for ``fps`` frames a second (``do_sample_frames``): ``total / video_fps * fps`` frames,
    clamped to [min_frames, max_frames] and to the video, rounded down to whole temporal patches,
    evenly spaced from frame 0. Empty when the video is shorter than one temporal patch."""
    T = temporal_patch_size
    most = math.floor(min(max_frames, total) / T) * T
    n = min(max(total / video_fps * fps, min_frames), most, total)
    n = math.floor(n / T) * T
    if n < 1:
        return np.zeros(0, np.int64)
    # frame i * total / n for i < n: transformers' float arange to `total` can round to an (n+1)-th
    # index, `total` itself, past the last frame; it is not taken here
    return (np.arange(n) * (total / n)).astype(np.int64)


def decode_video(path: str, fps: float, temporal_patch_size: int) -> Video:
    """A video file's frames sampled at ``fps`` (:func:`sample_frame_indices`), decoded with PyAV as
    RGB, as a :class:`Video` at the rate they were actually sampled at (what transformers reports as
    the video's ``sampled_fps``)."""
    try:
        import av
    except ImportError:
        raise InputError(f"{path}: reading a video file needs PyAV; pip install 'adatoken-compile[video]', or pass "
                         "the video's frames as images") from None
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such video file; check the path")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise InputError(f"{path}: holds no video stream; pass a video file, or its frames as images")
            stream = container.streams.video[0]
            total, rate = int(stream.frames), stream.average_rate
            if total < 1 or not rate:
                raise InputError(f"{path}: the container states no frame count or frame rate; re-encode it "
                                 "(e.g. ffmpeg -i IN -c:v libx264 OUT.mp4), or pass its frames as images")
            keep = sample_frame_indices(total, float(rate), fps, temporal_patch_size)
            if keep.size == 0:
                raise InputError(f"{path}: {total} frames, fewer than one temporal patch of {temporal_patch_size}; "
                                 "pass a longer video, or its frames as images")
            wanted, frames = set(keep.tolist()), []
            for i, frame in enumerate(container.decode(video=0)):
                if i > keep[-1]:
                    break
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as e:
        raise InputError(f"{path}: not a readable video ({type(e).__name__}: {first_line(e)}); pass a video file, "
                         "or its frames as images") from None
    if len(frames) < keep.size:
        raise InputError(f"{path}: decoded {len(frames)} of the {keep.size} frames its header promises; re-encode "
                         "it, or pass its frames as images")
    return Video(frames, len(keep) / total * float(rate))


def read_frames(video: Video, resolve, temporal_patch_size: int) -> Video:
    """``video`` with its frames read by ``resolve`` (paths, references) and checked to be one size,
    a frame read from a file named by its path; a video file's frames decoded and sampled
    (:func:`decode_video`)."""
    if isinstance(video.frames, str):
        return decode_video(video.frames, video.fps, temporal_patch_size)
    frames = [resolve(f) for f in video.frames]
    names = [getattr(f, "path", None) or (os.fspath(f) if isinstance(f, (str, os.PathLike)) else f"video frame {i}")
             for i, f in enumerate(video.frames)]
    check_frames(frames, names)
    return Video(frames, video.fps)


def image_list(image) -> list:
    """One sample's images: a list / tuple as given, anything else as one image."""
    return list(image) if isinstance(image, (list, tuple)) else [image]


def prompt_for_images(fmt: str, n: int, unit: str) -> str:
    """The prompt format with its one image ``unit`` (``<|vision_start|><image><|vision_end|>``)
    repeated for ``n`` images, as the chat template renders consecutive image parts."""
    if n < 1:
        raise InputError("the sample has no image; Qwen2.5-VL prompts take one or more")
    return fmt.replace(unit, unit * n, 1)
