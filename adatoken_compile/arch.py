"""The one description of a decoder's architecture, used by FLOPs, statistics, compile and runtime.

``arch`` is a plain dict with these keys (ints), made from a transformers config by
:func:`from_config` and read back from any file by :func:`normalize`::

    num_layers  hidden  heads  kv_heads  head_dim  intermediate  vocab

Files written before this description existed name the depth ``layers``; :func:`normalize`
accepts that spelling, so they still load.
"""

from __future__ import annotations

from .errors import InputError

KEYS = ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab")
_ALIASES = {"layers": "num_layers"}


def from_config(config) -> dict:
    """The arch dict of a transformers decoder config (LlamaConfig, Qwen2Config, ...) or its dict."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    try:
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        arch = {
            "num_layers": int(get("num_hidden_layers")),
            "hidden": hidden,
            "heads": heads,
            "kv_heads": int(get("num_key_value_heads", None) or heads),
            "head_dim": int(get("head_dim", None) or hidden // heads),
            "intermediate": int(get("intermediate_size")),
            "vocab": int(get("vocab_size")),
        }
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise InputError(f"config: decoder architecture fields missing or not integers ({type(e).__name__}: {e}); "
                         "check num_hidden_layers, hidden_size, num_attention_heads, intermediate_size, vocab_size")
    return validate(arch)


def validate(arch: dict, where: str = "config") -> dict:
    bad = [k for k in KEYS if not isinstance(arch.get(k), int) or isinstance(arch.get(k), bool) or arch[k] < 1]
    if bad:
        raise InputError(f"{where}: architecture field {bad[0]}={arch.get(bad[0])!r} must be a positive integer")
    if arch["heads"] % arch["kv_heads"]:
        raise InputError(f"{where}: {arch['heads']} attention heads are not a multiple of {arch['kv_heads']} KV heads")
    return arch


def normalize(d: dict, where: str = "arch") -> dict:
    """The arch dict of a stored description (accepts ``layers`` for ``num_layers``)."""
    if not isinstance(d, dict):
        raise InputError(f"{where}: architecture must be an object, got {type(d).__name__}")
    out = {_ALIASES.get(k, k): v for k, v in d.items()}
    return validate({k: out.get(k) for k in KEYS}, where)
