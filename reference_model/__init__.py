"""The reference model llava3d-tiny's training: a project folder of its own, not installed with
adatoken_compile (pyproject packages only ``adatoken_compile*``). Run from the repository root:
``python -m reference_model.train --out DIR ...``; README.md and MODEL_CARD.md here describe it."""
