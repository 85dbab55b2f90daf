"""One question about one scene or image: what every stage (data readers, adapters, the
runtime, evaluation) passes around. Torch-free."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import InputError


@dataclass
class Sample:
    """One question about one scene (3D models) or image (2D LLaVA)."""

    question: str
    scene: object | None = None  # a Scene, or a path / SceneRef / dict of arrays, read when a model asks
    image: object | None = None  # (H, W, 3) uint8 array, or a path / ImageRef, read when a model asks
    answer: str | None = None  # ground truth (first reference answer), when known
    kind: str | None = None  # question type, when the data gives one
    boxes: object | None = None  # optional (M, 3) location prompt(s) for <boxes>
    meta: dict = field(default_factory=dict)  # id, all reference answers ("answers"), source file, ...


@dataclass(eq=False)
class Video:
    """One video as its frames, in time order and all the same size: (H, W, 3) uint8 arrays or
    image paths. Put it where an image goes (``Sample.image``, ``rt.generate(Video(frames), q)``,
    or in a list with images for one prompt). ``fps``: the rate the frames were sampled at, which
    spaces the temporal positions (Qwen2.5-VL: ``second_per_grid_ts = temporal_patch_size / fps``);
    2 is the rate Qwen samples videos at.

    ``frames`` may instead be the path of a video file (``Video("clip.mp4", fps=2)``): its frames are
    decoded with PyAV and sampled at ``fps`` as Qwen2.5-VL's video processor samples them (see
    :func:`~adatoken_compile.runtime.qwen_vision.sample_frame_indices`), when a model reads them."""

    frames: list | str
    fps: float = 2.0

    def __post_init__(self):
        if isinstance(self.frames, os.PathLike) or (isinstance(self.frames, str) and self.frames):
            self.frames = os.fspath(self.frames)
        elif isinstance(self.frames, (str, bytes)) or not hasattr(self.frames, "__len__") or len(self.frames) < 1:
            raise InputError("video: expected a list of one or more frames ((H, W, 3) uint8 arrays or image paths), "
                             "or a video file's path")
        else:
            self.frames = list(self.frames)
        try:
            fps = float(self.fps)
        except (TypeError, ValueError):
            fps = float("nan")
        if not fps > 0 or fps == float("inf"):
            raise InputError(f"video: fps {str(self.fps)[:20]} must be a number > 0; pass the frames' sampling rate")
        self.fps = fps
