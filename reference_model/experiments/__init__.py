"""Diagnostics of llava3d-tiny and of the compiler on it; each runs from the repository root as
``python -m reference_model.experiments.NAME ...`` (reference_model/README.md lists them)."""
