"""Checkpoint directory reading: config, safetensors (sharded or single), fingerprints.

Weights load from safetensors only. A pickle-format checkpoint (``*.bin`` / ``*.pt``) is refused:
unpickling runs arbitrary code. Convert it once with a trusted tool to safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

import torch
from safetensors import safe_open

from adatoken_compile.errors import InputError
from adatoken_compile.readers import Fields, read_json

FIX_CONFIG = "fix or re-download the checkpoint's config"


def read_config(model_dir: str, name: str = "config.json") -> dict:
    """A checkpoint's JSON config (``name``) as an object, with one-line errors."""
    path = os.path.join(model_dir, name)
    if not os.path.isdir(model_dir):
        raise InputError(f"{model_dir}: model directory not found; pass --model DIR (a checkpoint directory) or a bundled name")
    if not os.path.exists(path):
        raise InputError(f"{path}: missing; a checkpoint directory needs {name} next to its safetensors")
    return read_json(path, "config", FIX_CONFIG)


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint (index order), or a clear error."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        fix = "it needs a 'weight_map' of tensor names to shard file names; re-download it"
        wm = Fields(read_json(index, "safetensors index", fix), index, fix).obj("weight_map").data
        if not wm or not all(isinstance(v, str) and v for v in wm.values()):
            raise InputError(f"{index}: 'weight_map' must map tensor names to shard file names; {fix}")
        files = sorted(set(wm.values()))
        for fn in files:
            p = os.path.join(model_dir, fn)
            if os.path.basename(fn) != fn or fn in (".", "..") or not os.path.isfile(p):
                raise InputError(f"{index}: shard '{fn}' listed in weight_map is missing from {model_dir}")
        return [os.path.join(model_dir, fn) for fn in files]
    if os.path.exists(single):
        return [single]
    pickled = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickled:
        raise InputError(
            f"{os.path.join(model_dir, pickled[0])}: pickle-format weights are refused (unpickling runs code); "
            "convert the checkpoint to safetensors first"
        )
    raise InputError(f"{model_dir}: no model.safetensors or model.safetensors.index.json found")


def load_state_dict(files: Iterable[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files``; a tensor holding NaN or inf is refused (it would
    answer garbage, silently)."""
    sd: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    if k in sd:
                        raise InputError(f"{path}: tensor '{k}' appears in more than one shard")
                    sd[k] = f.get_tensor(k)
                    check_finite(sd[k], path, k)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e}); re-download it")
    return sd


def check_finite(t: torch.Tensor, where: str, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InputError(f"{where}: tensor '{name}' holds NaN or inf values; the checkpoint is corrupt or was saved "
                         "after a diverged training step, re-download or re-export it")


def check_weight_bytes(n_params: int, files: Iterable[str], where: str) -> None:
    """Refuse a config that implies far more weights than its safetensors hold, before a module of
    that size is built (a typo'd hidden_size would otherwise exhaust memory, not fail cleanly).
    Weights are counted at 2 bytes, the smallest dtype a checkpoint of this tool's families ships."""
    on_disk = sum(os.path.getsize(p) for p in files)
    if 2 * n_params > on_disk + (1 << 20):
        raise InputError(f"{where}: the config implies at least {n_params:,} weights ({2 * n_params / 1e9:.2f} GB at "
                         f"16 bits), but the safetensors hold {on_disk / 1e9:.2f} GB; the config does not describe these "
                         f"weights, {FIX_CONFIG}")


def files_digest(paths: Iterable[str], extra: bytes = b"") -> str:
    """sha256 over file names (basename) and bytes, in the given order."""
    h = hashlib.sha256(extra)
    for p in paths:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def config_digest(cfg: dict) -> bytes:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()


def assign_exact(module: torch.nn.Module, sd: dict[str, torch.Tensor], where: str, prefix: str = "") -> None:
    """Load ``sd`` into ``module``; a missing or unexpected key is an error naming the key."""
    own = module.state_dict()
    expected = {k for k in own}
    given = set(sd)
    missing = sorted(expected - given)
    unexpected = sorted(given - expected)
    if missing:
        raise InputError(f"{where}: checkpoint lacks tensor '{prefix}{missing[0]}' ({len(missing)} missing); wrong checkpoint layout?")
    if unexpected:
        raise InputError(f"{where}: unexpected tensor '{prefix}{unexpected[0]}' ({len(unexpected)} unexpected); wrong checkpoint layout?")
    for k, v in sd.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise InputError(
                f"{where}: tensor '{prefix}{k}' has shape {tuple(v.shape)}, the config implies {tuple(own[k].shape)}"
            )
    module.load_state_dict(sd, strict=True)


def embed_token_ids(decoder, ids) -> torch.Tensor:
    """(n, H) input embeddings of token ids through the decoder's own embedding table."""
    with torch.no_grad():
        return decoder.get_input_embeddings()(torch.tensor(list(ids), dtype=torch.long))
