"""adatoken-compile: calibrate, compile and run spatial-token pruning for LLaVA-3D-style models."""

__version__ = "0.1.0"
