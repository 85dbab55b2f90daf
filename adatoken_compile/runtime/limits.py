"""Resource and sanity limits of one request (a scene or an image), each overridable by its
environment variable. A leaf: scenes and images both count against them."""

from __future__ import annotations

import os

from adatoken_compile.errors import InputError

MAX_SPATIAL_TOKENS = 2560  # LLaVA-3D's voxel cap

# Resource and sanity limits of one scene (or image) request, each overridable by its variable.
DEFAULT_LIMITS = {
    "views": 64,  # views per scene: each view costs the encoder a full image (LLaVA-3D uses 20)
    "view_pixels": 2048 * 2048,  # pixels per view (or per image), H x W
    "spatial_tokens": MAX_SPATIAL_TOKENS,  # spatial tokens one prompt may hold (the voxel cap of LLaVA-3D)
    "extent_m": 1000,  # every camera and depth reading within this many metres of the origin (float32 keeps mm)
}
LIMIT_ENV = {
    "views": "ADATOKEN_COMPILE_MAX_VIEWS",
    "view_pixels": "ADATOKEN_COMPILE_MAX_VIEW_PIXELS",
    "spatial_tokens": "ADATOKEN_COMPILE_MAX_SPATIAL_TOKENS",
    "extent_m": "ADATOKEN_COMPILE_MAX_SCENE_EXTENT",
}


def limits() -> dict:
    """The limits in force: :data:`DEFAULT_LIMITS`, each replaced by its environment variable when set."""
    out = dict(DEFAULT_LIMITS)
    for key, var in LIMIT_ENV.items():
        raw = os.environ.get(var)
        if raw is None or not raw.strip():
            continue
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise InputError(f"{var}={raw!r}: must be a whole number >= 1 (default {DEFAULT_LIMITS[key]}); fix or "
                             "unset the variable")
        out[key] = value
    return out


def limit_hint(key: str) -> str:
    return f"set {LIMIT_ENV[key]} to raise the limit"
