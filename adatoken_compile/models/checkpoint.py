"""Checkpoint directory reading: config, safetensors (sharded or single), fingerprints.

Weights load from safetensors only. A pickle-format checkpoint (``*.bin`` / ``*.pt``) is refused:
unpickling runs arbitrary code. Convert it once with a trusted tool to safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from adatoken_compile.errors import InputError


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise InputError(f"{model_dir}: model directory not found; pass --model DIR (a checkpoint directory) or a bundled name")
    if not os.path.exists(path):
        raise InputError(f"{path}: missing; a checkpoint directory needs config.json next to its safetensors")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); fix or re-download the checkpoint's config")


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint (index order), or a clear error."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise InputError(f"{index}: malformed safetensors index ({e}); it needs a 'weight_map'")
        files = sorted(set(wm.values()))
        for fn in files:
            p = os.path.join(model_dir, fn)
            if os.path.basename(fn) != fn or not os.path.exists(p):
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


class LazyWeights:
    """Parameters of a model whose values stay on disk: each placeholder tensor (by its storage
    address, which survives torch.export's re-wrapping of parameters) -> a function reading the
    real value."""

    def __init__(self):
        self._by_ptr: dict[int, Callable[[], torch.Tensor]] = {}

    def add(self, tensor: torch.Tensor, load: Callable[[], torch.Tensor]) -> None:
        if tensor.numel():
            self._by_ptr[tensor.data_ptr()] = load

    def __len__(self) -> int:
        return len(self._by_ptr)

    def for_module(self, module: torch.nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
        """``{parameter / buffer name in module: loader}`` (the names the exporter gives initializers)."""
        named = dict(module.named_parameters(remove_duplicate=False))
        named.update(module.named_buffers(remove_duplicate=False))
        return {name: self._by_ptr[t.data_ptr()] for name, t in named.items()
                if t.numel() and t.data_ptr() in self._by_ptr}


class OnDisk:
    """A checkpoint tensor not read yet: file, name, shape and dtype from the safetensors header.
    ``load()`` reads that one tensor."""

    def __init__(self, path: str, key: str, shape, dtype: str):
        self.path, self.key, self.shape, self.dtype = path, key, tuple(int(d) for d in shape), dtype

    def load(self) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(self.key)


def load_state_dict(files: Iterable[str], on_disk=None) -> dict:
    """Every tensor of the safetensors ``files``; those whose name satisfies ``on_disk(name)`` are
    left on disk as :class:`OnDisk` (only the header is read)."""
    sd: dict = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    if k in sd:
                        raise InputError(f"{path}: tensor '{k}' appears in more than one shard")
                    if on_disk is not None and on_disk(k):
                        sl = f.get_slice(k)
                        sd[k] = OnDisk(path, k, sl.get_shape(), sl.get_dtype())
                    else:
                        sd[k] = f.get_tensor(k)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e}); re-download it")
    return sd


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


def assign_exact(module: torch.nn.Module, sd: dict, where: str, prefix: str = "", lazy=None) -> None:
    """Load ``sd`` into ``module``; a missing or unexpected key is an error naming the key.
    :class:`OnDisk` entries are not read: the module keeps its placeholder tensor and ``lazy``
    (:class:`LazyWeights`) records where the value is."""
    own = module.state_dict(keep_vars=True)
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
    later = {k: v for k, v in sd.items() if isinstance(v, OnDisk)}
    if later and lazy is None:
        raise ValueError("assign_exact: tensors left on disk need a LazyWeights to record them")
    for k, v in later.items():
        lazy.add(own[k], v.load)
    module.load_state_dict({k: v for k, v in sd.items() if k not in later}, strict=not later)


def embed_token_ids(decoder, ids) -> torch.Tensor:
    """(n, H) input embeddings of token ids through the decoder's own embedding table."""
    with torch.no_grad():
        return decoder.get_input_embeddings()(torch.tensor(list(ids), dtype=torch.long))
