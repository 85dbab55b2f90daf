"""The one prefill FLOPs formula used everywhere (calibration, reports, benchmarks).

A FLOP is one multiply or one add (a multiply-accumulate is 2). Notation, from ``arch``::

    H  = hidden            I  = intermediate         V = vocab
    d  = head_dim          Hq = heads * d            Hkv = kv_heads * d
    n  = tokens entering the layer = n_text + spatial tokens present at that layer

Per decoder layer with n tokens::

    linear    = 2 * n * (H * (Hq + 2 * Hkv)   # q, k, v projections
                         + Hq * H             # o projection
                         + 3 * H * I)         # SwiGLU FFN: gate, up, down
    attention = 2 * 2 * n * n * Hq            # Q K^T and A V over the FULL n x n square
                                              # (no causal halving; kernels compute the square)

Once per prefill::

    lm_head   = 2 * H * V                     # last position only (next-token logits)

Each drop node (a cut before layer i, with n_in = n_text + s_in tokens present and s_in spatial)::

    score     = 2 * n_in * Hq                 # the scoring row (layer i-1's query of the last token, already in
                                              # the graph) against the n_in cached keys, all heads
              + 5 * n_in * heads              # softmax: max, subtract, exp, sum, divide
              + n_in * heads                  # mean over heads
    select    = s_in * log2(s_in)             # top-k as comparisons
              + k * log2(k)                   # sorting the k kept indices (original order)
    gather    = 0                             # memory movement, no arithmetic

``score`` above is the default ``last_token`` rule; a cut with another selection rule counts that
rule's scoring instead (:func:`adatoken_compile.selection.drop_cost`: e.g. ``dedup``'s pairwise
similarity 2 * s_in^2 * H, ``strided`` / ``random`` almost nothing). A cut before layer 0 is a drop
node too (on the input embeddings).

Not counted (stated, small): RMSNorms, RoPE, SiLU/elementwise products, residual adds,
embedding lookups, the attention mask.

Hand check (``tests/test_calibrate.py``): H=8, d=2, heads=4, kv_heads=2, I=16, V=10, one layer,
n=3 tokens: Hq=8, Hkv=4, linear = 2*3*(8*(8+8) + 8*8 + 3*8*16) = 2*3*(128+64+384) = 3456;
attention = 4*9*8 = 288; lm_head = 2*8*10 = 160; total 3904.
"""

from __future__ import annotations

import math
from typing import Sequence

from adatoken_compile.arch import KEYS
from adatoken_compile.selection import Rule, drop_cost

FORMULA = (
    "per layer (n tokens): linear = 2n(H(Hq+2Hkv) + Hq*H + 3H*I) [q,k,v,o + SwiGLU FFN]; "
    "attention = 4*n^2*Hq [QK^T and AV, full n x n]; plus lm_head 2*H*V for the last position; "
    "plus each drop node: 2*n*Hq + 6*n*heads [one query row vs cached keys, softmax, head mean] + "
    "s*log2(s) + k*log2(k) comparisons [top-k, sort] (other selection rules: their own scoring cost); "
    "Hq=heads*head_dim, Hkv=kv_heads*head_dim; "
    "norms, RoPE, activations, residuals not counted"
)

ARCH_KEYS = KEYS


def _check_arch(arch: dict) -> None:
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"flops: arch is missing {missing}; expected keys {list(ARCH_KEYS)}")


def layer_flops(arch: dict, n: int) -> tuple[int, int]:
    """(linear, attention) FLOPs of one decoder layer over ``n`` tokens."""
    H, I = arch["hidden"], arch["intermediate"]
    hq = arch["heads"] * arch["head_dim"]
    hkv = arch["kv_heads"] * arch["head_dim"]
    linear = 2 * n * (H * (hq + 2 * hkv) + hq * H + 3 * H * I)
    attention = 2 * 2 * n * n * hq
    return int(linear), int(attention)


def drop_flops(arch: dict, n_in: int, s_in: int, k: int, rule: Rule | None = None, n_text: int = 0) -> float:
    """FLOPs of one drop node: the rule's scoring (default: scoring row + softmax + head mean), plus
    top-k/sort comparisons."""
    heads = arch["heads"]
    hq = heads * arch["head_dim"]
    if rule is None or rule.name == "last_token":
        score = 2 * n_in * hq + 5 * n_in * heads + n_in * heads
    else:
        score = drop_cost(rule, arch, n_in, s_in, n_text)
    select = (s_in * math.log2(s_in) if s_in > 1 else 0.0) + (k * math.log2(k) if k > 1 else 0.0)
    return float(score + select)


def prefill_flops(arch: dict, n_text: int, tokens_per_layer: Sequence[int], *, include_drop: bool = True,
                  rules: dict | None = None, n_spatial0: int | None = None) -> dict:
    """Prefill FLOPs of one sequence.

    ``tokens_per_layer[i]`` is the number of SPATIAL tokens entering layer ``i``; every layer also
    sees ``n_text`` text tokens. A drop node is counted before every layer whose count is below the
    previous layer's (before layer 0: below ``n_spatial0``, the original count, when given), scored
    by ``rules[layer]`` (a :class:`~adatoken_compile.selection.Rule`; default ``last_token``).
    Returns ``{"total", "linear", "attention", "lm_head", "drop", "per_layer", "formula"}``.
    """
    _check_arch(arch)
    if len(tokens_per_layer) != arch["num_layers"]:
        raise ValueError(f"flops: tokens_per_layer has {len(tokens_per_layer)} entries, arch has {arch['num_layers']} layers")
    lin_t = att_t = 0
    drop_t = 0.0
    per_layer = []
    prev = n_spatial0
    for layer, s in enumerate(tokens_per_layer):
        n = int(n_text) + int(s)
        lin, att = layer_flops(arch, n)
        drop = 0.0
        if include_drop and prev is not None and s < prev:
            drop = drop_flops(arch, int(n_text) + prev, prev, int(s), (rules or {}).get(layer), int(n_text))
        per_layer.append({"tokens": n, "linear": lin, "attention": att, "drop": drop})
        lin_t += lin
        att_t += att
        drop_t += drop
        prev = s
    lm = 2 * arch["hidden"] * arch["vocab"]
    total = lin_t + att_t + lm + drop_t
    return {
        "total": float(total),
        "linear": float(lin_t),
        "attention": float(att_t),
        "lm_head": float(lm),
        "drop": float(drop_t),
        "per_layer": per_layer,
        "formula": FORMULA,
    }


def schedule_flops(arch: dict, schedule, n_spatial: int, n_text: int) -> dict:
    """Pruned vs unpruned prefill FLOPs of ``schedule`` for one sequence."""
    if schedule.num_layers != arch["num_layers"]:
        raise ValueError(f"flops: schedule has {schedule.num_layers} layers, arch has {arch['num_layers']}")
    n_spatial = int(round(n_spatial))
    n_text = int(round(n_text))
    tpl = schedule.tokens_per_layer(n_spatial)
    rules = {c.layer: c.rule for c in schedule.effective_cuts()}
    pruned = prefill_flops(arch, n_text, tpl, rules=rules, n_spatial0=n_spatial)
    full = prefill_flops(arch, n_text, [n_spatial] * arch["num_layers"])
    return {
        "flops_ratio": pruned["total"] / full["total"],
        "flops": pruned["total"],
        "flops_unpruned": full["total"],
        "spatial_tokens": n_spatial,
        "text_tokens": n_text,
        "tokens_per_layer": tpl,
        "formula": FORMULA,
    }


def schedule_flops_ratio(arch: dict, schedule, n_spatial: int, n_text: int) -> float:
    """Predicted prefill FLOPs of ``schedule`` divided by the unpruned prefill's."""
    return schedule_flops(arch, schedule, n_spatial, n_text)["flops_ratio"]


def kv_cache_bytes(arch: dict, schedule, n_spatial: int, n_text: int, new_tokens: int = 0, dtype_bytes: int = 4) -> int:
    """Bytes of one row's K+V cache from the schedule's arithmetic (no padding):
    sum over layers of (spatial tokens at that layer + n_text + new_tokens) x 2 x kv_heads x head_dim x dtype_bytes.
    ``arch``: :mod:`adatoken_compile.arch` keys (kv_heads, head_dim)."""
    kvh = int(arch["kv_heads"])
    hd = int(arch["head_dim"])
    per_tok = 2 * kvh * hd * int(dtype_bytes)
    return sum((s + int(n_text) + int(new_tokens)) * per_tok for s in schedule.tokens_per_layer(int(n_spatial)))


def decode_flops(arch: dict, past_per_layer: Sequence[int], steps: int) -> float:
    """FLOPs of ``steps`` decode steps for one row whose layer ``i`` cache starts at ``past_per_layer[i]``."""
    H, I, V = arch["hidden"], arch["intermediate"], arch["vocab"]
    hq = arch["heads"] * arch["head_dim"]
    hkv = arch["kv_heads"] * arch["head_dim"]
    lin = 2 * (H * (hq + 2 * hkv) + hq * H + 3 * H * I)
    total = 0.0
    for t in range(steps):
        for p in past_per_layer:
            total += lin + 4 * hq * (p + t + 1)
        total += 2 * H * V
    return total
