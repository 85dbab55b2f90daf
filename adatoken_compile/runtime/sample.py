"""One question about one scene or image: what every stage (data readers, adapters, the
runtime, evaluation) passes around. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field


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
