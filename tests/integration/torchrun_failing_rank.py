"""The CLI as torchrun starts it, with one rank's data unreadable: rank ``FAIL_RANK`` (default 1)
cannot load the scenes of its share, as a corrupt scene file on one node would fail."""

import os

from adatoken_compile.benchmark3d import dataset
from adatoken_compile.cli import main
from adatoken_compile.errors import InputError


def unreadable(info):
    raise InputError(f"scenes/scene{info.seed}/depth/0.png: unreadable depth image ; re-export the scene")


if os.environ.get("RANK") == os.environ.get("FAIL_RANK", "1"):
    dataset.render_scene = unreadable

if __name__ == "__main__":
    main()
