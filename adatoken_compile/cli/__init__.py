"""``adatoken-compile``: thin click commands over the public API (:mod:`adatoken_compile.api`).

Each command parses its options, calls one API function and prints. Defaults are the API's
(options left out are not passed), so the CLI, the Python API and the main job share one set.
"""

from adatoken_compile.cli import calibrate, compare, compile, evaluate, models, quickstart  # noqa: F401  (register commands)
from adatoken_compile.cli.main import main

__all__ = ["main"]
