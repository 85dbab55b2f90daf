"""Token drop, the tensor math: score -> select -> gather. Pure functions, no model classes.

Exportable with static shapes: topk / scatter / gather only, no boolean indexing, no nonzero,
no sort. Shared by the FX pass (:mod:`.rewrite`) and the eager reference
(:mod:`adatoken_compile.compiler.reference`), so both prune exactly alike.

* :func:`last_token_scores` -- attention probability the last position pays to every key, from a
  layer's post-RoPE queries and keys (GQA aware), softmax over the row's valid keys, mean over
  query heads. Only the one query row is used; nothing is read from the attention kernel.
* :func:`select_tokens` -- per row keep the non-spatial valid tokens plus the top-k spatial ones,
  ``k = clamp(ceil(keep * N0), 1, N_now)``; returns kept indices ascending with left padding,
  the new valid mask and the new length ``K'`` (max kept count over rows).
* :func:`gather_seq` / :func:`kept_positions` -- carry values with a sequence axis into the new
  layout; :func:`rebuild_mask4d` -- the attention mask of the new layout.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# ----------------------------------------------------------------------------- pure tensor math


def last_token_scores(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the last query position over all keys, mean over query heads.

    query: (B, Hq, Lq, d) post-RoPE queries (only ``[..., -1, :]`` is used);
    key: (B, Hkv, L, d) post-RoPE keys; query head h uses kv head ``h // (Hq // Hkv)``;
    valid: (B, L) bool, keys the row may attend to (padding / dropped tokens False).
    Returns (B, L) float32 (0 on invalid keys).
    """
    B, hq, _, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    q = query[:, :, -1, :].reshape(B, hkv, groups, d).float()
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * (1.0 / math.sqrt(d))  # (B, Hkv, g, L)
    logits = torch.where(valid[:, None, None, :], logits, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.mean(dim=(1, 2))


def random_scores(valid: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded pseudo-random scores for the ``random`` peer policy: (B, L) in [0, 1), 0 on invalid keys.

    An integer hash (multiply, xor-shift, multiply, xor-shift; int64 arithmetic mod 2^24, so
    PyTorch and ONNX Runtime agree exactly) of each token's rank among the row's valid tokens,
    so a row selects the same tokens whatever left padding it has. Each step is a bijection of
    [0, 2^24) and every such value is exact in float32, so distinct ranks never tie.
    """
    m = 16777216
    rank = torch.cumsum(valid.to(torch.int64), dim=1) - 1
    h = (rank * 3635633 + (int(seed) * 2246822519 + 374761393) % m) % m
    h = torch.bitwise_xor(h, h // 4096)
    h = (h * 73244475) % m
    h = torch.bitwise_xor(h, h // 4096)
    return torch.where(valid, h.to(torch.float32) / float(m), torch.zeros_like(h, dtype=torch.float32))


def score_for(scoring: dict, cut_index: int, query, key, valid) -> torch.Tensor:
    """The schedule's scoring rule at one cut (``scoring.query`` 'last_token' or 'random')."""
    if scoring.get("query") == "random":
        return random_scores(valid, int(scoring.get("seed", 0)) * 1000 + cut_index)
    return last_token_scores(query, key, valid)


def spatial_count(spatial: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) int64 number of spatial tokens per row (N0)."""
    return (spatial & valid).sum(dim=1)


def keep_millionths(keep: float) -> int:
    return int(round(float(keep) * 1_000_000))


def keep_counts(n0: torch.Tensor, n_now: torch.Tensor, keep: float) -> torch.Tensor:
    """k = clamp(ceil(keep * n0), 1, n_now) per row (0 where n_now == 0), in INTEGER arithmetic
    with keep in millionths, exactly as :meth:`adatoken_compile.schedule.Schedule.keep_count`
    (a float constant would be rounded to float32 in ONNX and could keep one token too many)."""
    num, den = keep_millionths(keep), 1_000_000
    k = (n0.to(torch.int64) * num + (den - 1)) // den
    return torch.minimum(torch.clamp(k, min=1), n_now)


def select_tokens(
    scores: torch.Tensor, valid: torch.Tensor, spatial: torch.Tensor, n0: torch.Tensor, keep: float
):
    """Choose the tokens a cut keeps.

    scores (B,L) float; valid / spatial (B,L) bool; n0 (B,) int64 original spatial counts.
    Returns ``(idx, new_valid, new_len)``: idx (B, K') int64 positions in the current layout,
    ascending, padding slots first (they point at dropped tokens and are False in new_valid);
    new_valid (B, K') bool; new_len = K' (int, an unbacked SymInt under export).
    """
    B, L = scores.shape
    cand = valid & spatial
    k = keep_counts(n0, cand.sum(dim=1), keep)
    masked = torch.where(cand, scores.float(), float("-inf"))
    order = torch.topk(masked, L, dim=1, largest=True, sorted=True).indices  # full ranking
    pos = torch.arange(L, device=scores.device).unsqueeze(0).expand(B, L)
    rank = torch.zeros_like(order).scatter(1, order, pos)
    keep_mask = (valid & ~spatial) | (cand & (rank < k[:, None]))
    new_len = keep_mask.sum(dim=1).max().item()
    torch._check(new_len >= 1)
    torch._check(new_len <= L)
    # kept tokens get keys L+j, others j: the K' largest are all kept tokens plus the latest dropped
    # ones as padding; descending then flipped -> padding first, kept ascending.
    order_key = torch.where(keep_mask, pos + L, pos).to(torch.float32)
    idx = torch.topk(order_key, new_len, dim=1, largest=True, sorted=True).indices.flip(1)
    new_valid = torch.gather(keep_mask, 1, idx)
    return idx, new_valid, new_len


def gather_seq(x: torch.Tensor, idx: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Gather ``x`` (batch on dim 0, size B or 1) with per-row indices idx (B, K') on each of ``dims``."""
    B, K = idx.shape
    x = x.expand(B, *x.shape[1:])
    for d in dims:
        view = [B] + [1] * (x.dim() - 1)
        view[d] = K
        target = list(x.shape)
        target[d] = K
        x = torch.gather(x, d, idx.reshape(view).expand(target))
    return x


def kept_positions(prev: torch.Tensor | None, idx: torch.Tensor, new_valid: torch.Tensor) -> torch.Tensor:
    """Original sequence positions of the new layout (B, K'), -1 on padding slots.
    ``prev`` are the original positions of the current layout (None before the first cut)."""
    orig = idx if prev is None else torch.gather(prev, 1, idx)
    return torch.where(new_valid, orig, torch.full_like(orig, -1))


def rebuild_mask4d(mask: torch.Tensor, idx: torch.Tensor, new_valid: torch.Tensor) -> torch.Tensor:
    """The (B, 1, K', K') attention mask of the new layout, in ``mask``'s format (bool for sdpa,
    additive float for eager), built from the new valid vector instead of gathering the
    (B, 1, L, L) input on both axes (O(K'^2) instead of an O(L^2) gather: the gather was the
    most expensive inserted node).

    Kept tokens are in ascending original order, so causality in the new layout is ``k <= q``;
    padding / dropped slots are masked as keys. Every query may attend to itself, so padding rows
    are never fully masked (a fully masked row would give NaN that reaches valid rows through
    0 * NaN in the value product). Equal, on valid rows, to gathering a causal + padding mask.
    """
    K = idx.shape[1]
    ar = torch.arange(K, device=idx.device)
    causal = ar[None, :] <= ar[:, None]  # [q, k]
    allowed = (causal[None] & new_valid[:, None, :].to(torch.bool)) | (ar[None, :] == ar[:, None])[None]
    allowed = allowed[:, None]
    if mask.dtype == torch.bool:
        return allowed
    zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
    return torch.where(allowed, zero, torch.full((), torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device))
