"""Where samples come from (torch-free).

* :mod:`.specs`: ``--data`` specifications (``builtin:<split>`` or a question file) -> samples,
  in a fixed order; ``iter_samples``, ``load_samples``, ``builtin_split``, ``holdout_start`` and
  ``scene_key`` are importable from this package too;
* :mod:`.questions`: question files (JSONL, ScanQA, SQA3D, LLaVA-3D question JSON);
* :mod:`.scenes`: scene paths (``.npz``, ScanNet export folders, EmbodiedScan info files), frame
  selection, lazy scene / image references; :mod:`.scannet` and :mod:`.embodiedscan` read them.
"""

SPECS = ("BUILTIN_SPLITS", "builtin_split", "holdout_start", "iter_samples", "load_samples", "scene_key")


def __getattr__(name):
    if name in SPECS:
        # PEP 562, resolved on use: the runtime imports the scene readers of this package, and the
        # built-in benchmark that specs imports itself imports the runtime
        from adatoken_compile.data import specs

        return getattr(specs, name)
    raise AttributeError(f"module 'adatoken_compile.data' has no attribute {name!r}")
