"""Training of `qwen25vl-tiny`: a tiny Qwen2.5-VL trained end to end on the benchmark's scenes
given as images (a bird's-eye view and two perspective views, as ``eval --data builtin:test`` feeds
them). ``python -m reference_model.qwen.train --help``."""
