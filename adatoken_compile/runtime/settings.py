"""An artifact's ``preprocess.json``: what the runtime needs to rebuild the decoder inputs, parsed
with exact types (torch-free). Written by compile from the adapter's ``runtime_config()``
(:func:`adatoken_compile.contract.runtime_config`); a hand-edited or hostile file is one line
naming the key, never a traceback or a silent NaN (a zero ``std`` is refused)."""

from __future__ import annotations

from ..arch import normalize as normalize_arch
from ..errors import InputError
from ..readers import Fields, read_json
from .image import processing_from_dict
from .positions import layout_of

# artifacts whose preprocess.json predates the ``input`` key: what their family's encoder takes
_LEGACY_INPUT = {"llava3d": "scene", "llava-hf": "image"}
MAX_POSITIONS = 1 << 22  # positions a prompt and its answer may reach: sizes the runtime's KV buffers
MAX_IMAGE_SIZE = 4096  # the encoder's input side; CLIP towers use 224-448
MAX_VOXEL_M = 10.0  # LLaVA-3D pools 0.2 m voxels; a 1e308 m voxel would pool a whole scene into one token


def read_settings(path: str, fix: str) -> dict:
    """The validated settings of ``path`` (a ``preprocess.json``); unknown keys are kept as they are."""
    d = read_json(path, "preprocess settings file", fix)
    f = Fields(d, path, fix)
    family = f.string("family")
    out = dict(d)
    out["input"] = f.string("input", choices=("scene", "image"), default=_LEGACY_INPUT.get(family, "image"))
    out["image_size"] = f.integer("image_size", lo=1, hi=MAX_IMAGE_SIZE)
    out["patch_size"] = f.integer("patch_size", lo=1, hi=out["image_size"])
    out["mean"] = f.numbers("mean", length=3)
    out["std"] = f.numbers("std", length=3, lo=0.0, lo_open=True)
    if "image_processing" in d:  # the checkpoint's own processor (older artifacts: CLIP's from mean / std)
        out["image_processing"] = processing_from_dict(f.obj("image_processing").data, path).to_dict()
    out["num_frames"] = f.integer("num_frames", lo=1, default=None, null=True)
    prompt = f.obj("prompt")
    field = prompt.string("question_field", default="{question}")
    fmt = prompt.string("format")
    if fmt.count(field) != 1 or fmt.count("<image>") != 1:
        prompt.fail("format", f"a prompt holding '{field}' and '<image>' once each", fmt)
    out["prompt"] = {**prompt.data, "format": fmt, "question_field": field}
    for key in ("bos_id", "eos_id"):
        out[key] = f.integer(key, lo=0, default=None, null=True)
    out["max_positions"] = f.integer("max_positions", lo=1, hi=MAX_POSITIONS, default=None, null=True)
    out["arch"] = normalize_arch(f.obj("arch").data, f"{path}: 'arch'")
    if out["input"] == "scene":
        out["voxel_size"] = f.number("voxel_size", lo=0.0, hi=MAX_VOXEL_M, lo_open=True, default=0.2)
        out["max_tokens"] = f.integer("max_tokens", lo=1, default=2560)
    # the position layout the decoder spec exported (older artifacts: one index per token)
    out["positions"] = layout_of(d.get("positions"), path, fix).to_dict()
    if out["eos_id"] is not None and out["eos_id"] >= out["arch"]["vocab"]:
        raise InputError(f"{path}: 'eos_id' {out['eos_id']} is outside the vocabulary ({out['arch']['vocab']}); {fix}")
    return out
