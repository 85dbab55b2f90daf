"""Where samples come from (torch-free): ``--data`` specifications (``builtin:<split>`` or a
question file) turned into samples in a fixed order (:mod:`.specs`), and the question files
themselves (:mod:`.questions`: JSONL, ScanQA, SQA3D, LLaVA-3D question JSON). Scene paths (.npz,
ScanNet export folders, EmbodiedScan info files) are read by the runtime
(:mod:`adatoken_compile.runtime.sources`), which serves them too."""

from .specs import BUILTIN_SPLITS, builtin_split, for_input, holdout_start, iter_samples, load_samples, scene_key

__all__ = ["BUILTIN_SPLITS", "builtin_split", "for_input", "holdout_start", "iter_samples", "load_samples", "scene_key"]
