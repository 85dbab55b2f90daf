"""The runtime: load a compiled artifact and answer questions with ONNX Runtime, numpy and
tokenizers. A leaf: it imports only the artifact format, the schedule, the errors and the
torch-free scene readers of :mod:`adatoken_compile.data` (no torch).

Example::

    from adatoken_compile.runtime import load
    rt = load("ART")
    print(rt.generate("scene.npz", "what color is the box?"))
"""

from .engine import Runtime, load
from .image import load_image
from .sample import Sample, Video
from .scene import Scene, load_scene

__all__ = ["Runtime", "Sample", "Scene", "Video", "load", "load_image", "load_scene"]
