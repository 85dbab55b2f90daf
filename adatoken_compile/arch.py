"""The one description of a decoder's architecture, used by FLOPs, statistics, compile and runtime.

``arch`` is a plain dict with these keys (ints), made from a transformers config by
:func:`from_config` and read back from any file by :func:`normalize`::

    num_layers  hidden  heads  kv_heads  head_dim  intermediate  vocab

Files written before this description existed name the depth ``layers``; :func:`normalize`
accepts that spelling, so they still load.
"""

from __future__ import annotations

from .errors import InputError
from .readers import Fields

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


def check_config(cfg: dict, where: str, fix: str) -> dict:
    """Exact types of a checkpoint's raw decoder fields (``config.json`` or its ``text_config``),
    before transformers builds anything from them; returns the arch dict they describe."""
    f = Fields(cfg, where, fix)
    heads = f.integer("num_attention_heads", lo=1, hi=1 << 12)
    hidden = f.integer("hidden_size", lo=1, hi=1 << 17)
    kv = f.integer("num_key_value_heads", lo=1, hi=heads, default=None, null=True) or heads
    head_dim = f.integer("head_dim", lo=1, hi=1 << 12, default=None, null=True)
    if head_dim is None and hidden % heads:
        f.fail("hidden_size", f"a multiple of num_attention_heads ({heads}) when head_dim is not given", hidden)
    if heads % kv:
        f.fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})", kv)
    f.integer("max_position_embeddings", lo=1, default=None, null=True)
    return validate({"num_layers": f.integer("num_hidden_layers", lo=1, hi=1 << 10), "hidden": hidden, "heads": heads,
                     "kv_heads": kv, "head_dim": head_dim or hidden // heads,
                     "intermediate": f.integer("intermediate_size", lo=1, hi=1 << 20),
                     "vocab": f.integer("vocab_size", lo=1, hi=1 << 24)}, where)


def parameter_count(arch: dict) -> int:
    """Weights a decoder of ``arch`` holds at least (embeddings, attention, MLP; biases and norms left out)."""
    q, kv = arch["heads"] * arch["head_dim"], arch["kv_heads"] * arch["head_dim"]
    per_layer = arch["hidden"] * (2 * q + 2 * kv) + 3 * arch["hidden"] * arch["intermediate"]
    return arch["vocab"] * arch["hidden"] + arch["num_layers"] * per_layer


# the most each field may be: what a checkpoint config may hold (check_config), so that an artifact's
# stored description cannot size KV buffers or loops beyond what any model it was compiled from had
MAX = {"num_layers": 1 << 10, "hidden": 1 << 17, "heads": 1 << 12, "kv_heads": 1 << 12, "head_dim": 1 << 12,
       "intermediate": 1 << 20, "vocab": 1 << 24}


def validate(arch: dict, where: str = "config") -> dict:
    bad = [k for k in KEYS if not isinstance(arch.get(k), int) or isinstance(arch.get(k), bool) or arch[k] < 1]
    if bad:
        raise InputError(f"{where}: architecture field {bad[0]}={str(arch.get(bad[0]))[:40]} must be a positive integer")
    big = [k for k in KEYS if arch[k] > MAX.get(k, arch[k])]
    if big:
        raise InputError(f"{where}: architecture field {big[0]}={str(arch[big[0]])[:40]} is over the limit of "
                         f"{MAX[big[0]]}; not a model this tool compiles")
    if arch["heads"] % arch["kv_heads"]:
        raise InputError(f"{where}: {arch['heads']} attention heads are not a multiple of {arch['kv_heads']} KV heads")
    return arch


def normalize(d: dict, where: str = "arch") -> dict:
    """The arch dict of a stored description (accepts ``layers`` for ``num_layers``)."""
    if not isinstance(d, dict):
        raise InputError(f"{where}: architecture must be an object, got {type(d).__name__}")
    out = {_ALIASES.get(k, k): v for k, v in d.items()}
    return validate({k: out.get(k) for k in KEYS}, where)
