"""Resolve ``--model`` (a checkpoint directory or a bundled short name) to an adapter."""

from __future__ import annotations

import os

import torch

from adatoken_compile.errors import InputError

from adatoken_compile.models.checkpoint import read_config
from adatoken_compile.models.llava3d import Llava3DAdapter
from adatoken_compile.models.llava_hf import LlavaHFAdapter
from adatoken_compile.models.qwen25vl import MODEL_TYPE as QWEN25VL, Qwen25VLAdapter

HERE = os.path.dirname(os.path.abspath(__file__))
# llava3d-tiny-nodrop: the same recipe and vision tower, trained without random background-voxel
# dropping (the reference for whether a selection rule's lead rests on that training trick)
BUNDLED = {"llava3d-tiny": os.path.join(HERE, "llava3d_tiny"),
           "llava3d-tiny-nodrop": os.path.join(HERE, "llava3d_tiny_nodrop")}
DEFAULT_MODEL = "llava3d-tiny"


def resolve_model_dir(model: str | None) -> str:
    model = model or DEFAULT_MODEL
    if model in BUNDLED:
        path = BUNDLED[model]
        if not os.path.exists(os.path.join(path, "config.json")):
            raise InputError(
                f"{path}: the bundled model '{model}' is not present in this install; "
                "retrain it with `python -m reference_model.train` or pass --model DIR"
            )
        return path
    if not os.path.isdir(model):
        raise InputError(f"{model}: no such model directory or bundled name (bundled: {', '.join(BUNDLED)})")
    return model


def load_adapter(model: str | None = None, *, vision_tower: str | None = None, attn_implementation: str = "sdpa",
                 dtype: torch.dtype = torch.float32, lazy: bool = False):
    """An adapter for a LLaVA-3D-layout (``llava_llama``/``llava_qwen``), HF LLaVA (``llava``) or
    Qwen2.5-VL (``qwen2_5_vl``) checkpoint.
    ``lazy``: leave the decoder weights on disk until compile writes them (LLaVA-3D layout; HF LLaVA
    checkpoints load in memory)."""
    if attn_implementation not in ("sdpa", "eager"):
        raise InputError(f"--attn {attn_implementation!r} unsupported: use 'sdpa' or 'eager' (both are exportable)")
    path = resolve_model_dir(model)
    mt = str(read_config(path).get("model_type", ""))
    if mt == "llava":
        if vision_tower:
            raise InputError(f"{path}: --vision-tower applies to LLaVA-3D checkpoints only; HF LLaVA ships its tower")
        adapter = LlavaHFAdapter(path, attn_implementation=attn_implementation, dtype=dtype)
    elif mt == QWEN25VL:
        if vision_tower:
            raise InputError(f"{path}: --vision-tower applies to LLaVA-3D checkpoints only; Qwen2.5-VL ships its tower")
        adapter = Qwen25VLAdapter(path, attn_implementation=attn_implementation, dtype=dtype)
    elif mt.startswith("llava_"):
        adapter = Llava3DAdapter(path, vision_tower=vision_tower, attn_implementation=attn_implementation, dtype=dtype,
                                 lazy=lazy)
    else:
        raise InputError(
            f"{os.path.join(path, 'config.json')}: model_type '{mt}' unsupported; expected llava_llama / llava_qwen "
            "(LLaVA-3D layout), llava (HF LlavaForConditionalGeneration) or qwen2_5_vl (Qwen2_5_VLForConditionalGeneration)"
        )
    adapter.name = model or DEFAULT_MODEL  # as the user named it: recorded in schedules, not a machine path
    return adapter
