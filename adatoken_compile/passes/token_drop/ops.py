"""Token drop, the tensor math: score -> select -> gather. Pure functions, no model classes.

Exportable with static shapes: topk / scatter / gather only, no boolean indexing, no nonzero,
no sort. Shared by the FX pass (:mod:`.rewrite`) and the eager reference
(:mod:`adatoken_compile.compiler.reference`), so both prune exactly alike.

* :func:`score_cut` -- a cut's selection rule (:mod:`.rules`: last-token attention, debiased,
  stratified, dedup, diverse, strided, random, ...) on what the cut provides. Attention rules use
  only the layer's post-RoPE queries and keys; nothing is read from the attention kernel.
* :func:`select_tokens` -- per row keep the non-spatial valid tokens plus the top-k spatial ones,
  ``k = clamp(ceil(keep * N0), 1, N_now)``; returns kept indices ascending with left padding,
  the new valid mask and the new length ``K'`` (max kept count over rows).
* :func:`gather_seq` / :func:`kept_positions` -- carry values with a sequence axis into the new
  layout; :func:`rebuild_mask4d` -- the attention mask of the new layout.
"""

from __future__ import annotations

from typing import Sequence

import torch

from adatoken_compile.passes.token_drop.rules import RuleInputs, last_token_scores, random_scores, rule_scores  # noqa: F401

# ----------------------------------------------------------------------------- pure tensor math


def score_cut(rule, cut_index: int, keep: float, valid, spatial, n0, *, query=None, key=None, hidden=None, xyz=None,
              srank=None) -> torch.Tensor:
    """(B, L) scores of a cut's selection rule (``rule``: a :class:`adatoken_compile.schedule.Rule`)
    from whatever the cut provides (see :class:`.rules.RuleInputs`)."""
    k = keep_counts(n0, (valid & spatial).sum(dim=1), keep)
    inp = RuleInputs(valid=valid, spatial=spatial, n0=n0, k=k, cut_index=int(cut_index), query=query, key=key,
                     hidden=hidden, xyz=xyz, srank=srank)
    return rule_scores(rule.name, rule.params_dict(), inp)


def spatial_rank(spatial: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L) int64 rank of each spatial token in the row's original scene order (-1 before the first)."""
    return torch.cumsum((spatial & valid).to(torch.int64), dim=1) - 1


def spatial_count(spatial: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) int64 number of spatial tokens per row (N0)."""
    return (spatial & valid).sum(dim=1)


def keep_millionths(keep: float) -> int:
    return int(round(float(keep) * 1_000_000))


def keep_counts(n0: torch.Tensor, n_now: torch.Tensor, keep: float) -> torch.Tensor:
    """k = clamp(ceil(keep * n0), 1, n_now) per row (0 where n_now == 0), with keep in millionths,
    exactly as :meth:`adatoken_compile.schedule.Schedule.keep_count` (a float constant would be
    rounded to float32 in ONNX and could keep one token too many).

    The ceiling is taken in float64 on integers, exact while n0 * num < 2**53, rather than in
    int64: onnxruntime's OpenVINO provider computes int64 Mul in int32 (wrapping past 2,147 tokens
    at keep 1.0) and int64 Div through float32 (984,999,999 // 10**6 gives 985), and its Clip with
    only a lower bound returns 0 on int64, so the bounds are Max / Min."""
    num, den = keep_millionths(keep), 1_000_000
    k = torch.floor((n0.to(torch.float64) * num + (den - 1)) / den).to(torch.int64)
    return torch.minimum(torch.maximum(k, torch.ones_like(k)), n_now)


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


def gather_seq(x: torch.Tensor, idx: torch.Tensor, dims: Sequence[int], batch_dim: int = 0) -> torch.Tensor:
    """Gather ``x`` (batch on ``batch_dim``, size B or 1) with per-row indices idx (B, K') on each of
    ``dims`` (a family's position ids may hold the batch on another axis, as M-RoPE's (3, B, L))."""
    if batch_dim != 0:
        moved = [d + (d < batch_dim) for d in dims]  # each dim's axis once the batch is moved to 0
        return torch.movedim(gather_seq(torch.movedim(x, batch_dim, 0), idx, moved), 0, batch_dim)
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
