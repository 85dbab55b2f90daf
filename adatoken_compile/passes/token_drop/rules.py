"""Selection rules: which spatial tokens a cut keeps. A small registry of pure tensor functions.

Every rule maps the tensors available at a cut (:class:`RuleInputs`) to a (B, L) float32 score;
:func:`adatoken_compile.passes.token_drop.ops.select_tokens` then keeps the ``k`` best-scored spatial
tokens of each row. Static shapes throughout (top-k, gather, scatter, comparisons, a fixed number
of unrolled steps): no boolean indexing, no data-dependent loop, so every rule exports to ONNX and
the FX pass and the eager reference run the same function.

A cut before layer ``i`` sees layer ``i-1``'s post-RoPE queries and keys (``attention``), the
hidden state entering layer ``i`` (``hidden``; before layer 0: the spliced input embeddings), the
scene coordinates of each token (``xyz``: voxel centres, or (row, col, 0) for 2-D images; a graph
input only when a rule needs it) and each spatial token's rank in the original scene order
(``srank``). A cut before layer 0 (selection on the projected scene tokens, before the decoder, as
serving engines prune) has no attention: the rules that need it cannot run there
(:mod:`adatoken_compile.selection`: what each rule reads, where it can run).

============  =========  =====================================================================
rule          needs      what it keeps
============  =========  =====================================================================
last_token    attention  highest attention of the last prompt token (FastV), mean over heads
text_tail     attention  highest mean attention of the question rows after the scene
debiased      attention  last-token attention divided by a per-position prior measured in
                         calibration (``prior``: one value per bin of the scene order)
stratified    xyz        a quota per spatial cell (``grid`` cells over the row's bounding box,
                         each keeps ``floor(k * n_cell / n)``), ranked inside by attention
                         (``rank: attention``) or a seeded hash (``rank: random``); the
                         remainder by the same ranking over all cells
dedup         hidden     DART-style: ``pivots`` tokens of largest feature norm, then the tokens
                         least similar to them (cosine); a token nearly identical (cosine >=
                         ``threshold``) to an earlier one ranks after every other token
diverse       hidden     farthest-point selection for ``steps`` steps over features (cosine
                         distance) plus ``xyz_weight`` x coordinates (scaled by the row's
                         extent), seeded by the attention maximum (``seed: attention``) or the
                         largest-norm token (``seed: norm``); the rest by distance to them
strided       -          every (n/k)-th token of the scene order (exactly k)
random        -          a seeded integer hash of the token's rank (the ``random`` control)
============  =========  =====================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from adatoken_compile.selection import RULES, params_for, spec


@dataclass
class RuleInputs:
    """What a rule may read at one cut (None where the cut does not provide it)."""

    valid: torch.Tensor  # (B, L) bool, real tokens of the current layout
    spatial: torch.Tensor  # (B, L) bool, spatial tokens of the current layout
    n0: torch.Tensor  # (B,) int64, original spatial tokens per row
    k: torch.Tensor  # (B,) int64, spatial tokens this cut keeps per row
    cut_index: int = 0
    query: torch.Tensor | None = None  # (B, Hq, L, d) post-RoPE queries of layer i-1
    key: torch.Tensor | None = None  # (B, Hkv, L, d) post-RoPE keys of layer i-1
    hidden: torch.Tensor | None = None  # (B, L, H) hidden state entering layer i
    xyz: torch.Tensor | None = None  # (B, L, 3) float32 token coordinates (0 on non-spatial tokens)
    srank: torch.Tensor | None = None  # (B, L) int64 rank of each spatial token in the original scene order


# ----------------------------------------------------------------------------- shared pieces


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
    """Seeded pseudo-random scores: (B, L) in [0, 1), 0 on invalid keys.

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


def _cand(inp: RuleInputs) -> torch.Tensor:
    return inp.valid & inp.spatial


def _cand_rank(cand: torch.Tensor) -> torch.Tensor:
    """(B, L) int64 rank of each candidate among the row's candidates, in sequence order."""
    return torch.cumsum(cand.to(torch.int64), dim=1) - 1


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def _features(inp: RuleInputs, which: str) -> torch.Tensor:
    """(B, L, D) float32 features: the hidden state, or the keys with heads concatenated."""
    if which == "keys":
        B, hkv, L, d = inp.key.shape
        return inp.key.float().transpose(1, 2).reshape(B, L, hkv * d)
    return inp.hidden.float()


def _extent(xyz: torch.Tensor, cand: torch.Tensor):
    """Per-row min (B,1,3) and extent (B,1,3) of the candidates' coordinates."""
    big = torch.full((), 3.0e38, dtype=torch.float32, device=xyz.device)
    x = xyz.float()
    lo = torch.where(cand[..., None], x, big).amin(dim=1, keepdim=True)
    hi = torch.where(cand[..., None], x, -big).amax(dim=1, keepdim=True)
    return lo, hi - lo


# ----------------------------------------------------------------------------- the rules


def _last_token(inp: RuleInputs, p: dict) -> torch.Tensor:
    return last_token_scores(inp.query, inp.key, inp.valid)


def _text_tail(inp: RuleInputs, p: dict) -> torch.Tensor:
    """Mean over heads and over the question rows after the scene (the non-spatial real tokens
    after the row's first spatial token, among its last ``rows`` positions) of each row's causal
    softmax attention over the valid keys. The query axis is padded in front by ``rows`` empty rows
    so that the last ``rows`` exist for any length (a static slice; padded rows weigh 0)."""
    B, hq, L, d = inp.query.shape
    hkv = inp.key.shape[1]
    T = int(p["rows"])
    q = torch.cat([inp.query.new_zeros(B, hq, T, d), inp.query], dim=2)[:, :, -T:].float()
    q = q.reshape(B, hkv, hq // hkv, T, d)
    logits = torch.matmul(q, inp.key.float()[:, :, None].transpose(-1, -2)) * (1.0 / math.sqrt(d))  # B,hkv,g,T,L
    pos = torch.arange(L, device=q.device)
    qpos = (torch.arange(T, device=q.device) - T) + L  # positions of the T rows (< 0: padding)
    allowed = (pos[None, :] <= qpos[:, None])[None] & inp.valid[:, None, :]  # (B, T, L)
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # no row without a key (no NaN; such rows weigh 0)
    logits = torch.where(allowed[:, None, None], logits, float("-inf"))
    probs = torch.softmax(logits, dim=-1).mean(dim=(1, 2))  # (B, T, L)
    cand = _cand(inp)
    tail = inp.valid & ~inp.spatial & (torch.cumsum(cand.to(torch.int64), dim=1) > 0)
    w = torch.cat([tail.new_zeros(B, T), tail], dim=1)[:, -T:].float()
    return (probs * w[:, :, None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1.0)


def _debiased(inp: RuleInputs, p: dict) -> torch.Tensor:
    a = last_token_scores(inp.query, inp.key, inp.valid)
    prior = torch.tensor([float(v) for v in p["prior"]], dtype=torch.float32, device=a.device)
    nb = prior.shape[0]
    n0 = inp.n0.clamp_min(1)[:, None]
    b = torch.clamp((inp.srank.clamp_min(0) * nb) // n0, 0, nb - 1)
    return a / prior[b]


def _ranking(inp: RuleInputs, how: str) -> torch.Tensor:
    """Scores in [0, 1] that order tokens inside a rule: attention or a seeded hash."""
    if how == "attention":
        return last_token_scores(inp.query, inp.key, inp.valid)
    return random_scores(inp.valid, 7919 + inp.cut_index)


def _stratified(inp: RuleInputs, p: dict) -> torch.Tensor:
    cand = _cand(inp)
    B, L = cand.shape
    grid = [int(g) for g in p["grid"]]
    lo, ext = _extent(inp.xyz, cand)
    cell = torch.zeros(B, L, dtype=torch.int64, device=cand.device)
    for a, g in enumerate(grid):
        frac = (inp.xyz[..., a].float() - lo[..., a]) / ext[..., a].clamp_min(1e-6)
        cell = cell * g + torch.clamp(torch.floor(frac * g).to(torch.int64), 0, g - 1)
    C = math.prod(grid)
    cell = torch.where(cand, cell, torch.full_like(cell, C))  # non-candidates in an extra cell
    r = _ranking(inp, p["rank"])
    order = torch.topk(torch.where(cand, r, -1.0), L, dim=1, largest=True, sorted=True).indices
    onehot = (torch.gather(cell, 1, order)[..., None] == torch.arange(C + 1, device=cell.device)).to(torch.int64)
    cum = torch.cumsum(onehot, dim=1)  # (B, L, C+1) in ranking order
    in_cell_sorted = torch.gather(cum, 2, torch.gather(cell, 1, order)[..., None])[..., 0] - 1
    in_cell = torch.zeros_like(in_cell_sorted).scatter(1, order, in_cell_sorted)
    n_cell = torch.gather(onehot.sum(dim=1), 1, cell)  # (B, L) tokens in each token's cell
    n_now = cand.sum(dim=1, keepdim=True).clamp_min(1)
    quota = (inp.k[:, None] * n_cell) // n_now
    return r + 2.0 * (cand & (in_cell < quota)).to(torch.float32)


def _dedup(inp: RuleInputs, p: dict) -> torch.Tensor:
    cand = _cand(inp)
    f = _features(inp, p["features"])
    u = _unit(f)
    B, L = cand.shape
    P = int(p["pivots"])
    # pivots: the P largest feature norms among the candidates; P padding slots behind the row keep
    # top-k's k static whatever the length (a padding pivot is never valid)
    norm = torch.where(cand, torch.linalg.vector_norm(f, dim=-1), -1.0)
    piv = torch.topk(torch.cat([norm, norm.new_full((B, P), -2.0)], dim=1), P, dim=1).indices  # (B, P)
    piv_ok = torch.gather(torch.cat([cand, cand.new_zeros(B, P)], dim=1), 1, piv)
    piv = torch.where(piv_ok, piv, torch.zeros_like(piv))
    u_piv = torch.gather(u, 1, piv[..., None].expand(-1, -1, u.shape[-1]))
    sim_piv = torch.where(piv_ok[:, None, :], torch.matmul(u, u_piv.transpose(1, 2)), -1.0).amax(dim=2)  # (B, L)
    is_piv = torch.zeros_like(cand).scatter(1, piv, piv_ok) & cand
    sim = torch.matmul(u, u.transpose(1, 2))  # (B, L, L) [i, j]
    ar = torch.arange(L, device=cand.device)
    earlier = (ar[:, None] < ar[None, :])[None] & cand[:, :, None]  # i < j, i a candidate
    dup = ((sim >= float(p["threshold"])) & earlier).any(dim=1)  # (B, L) over i
    # pivots first (in norm order), then the others by dissimilarity to the pivots, near-duplicates
    # last (in sequence order); the pivots' and duplicates' own similarity is 1 up to rounding, so
    # their order comes from exact quantities, never from float noise
    piv_rank = torch.zeros(B, L, dtype=torch.float32, device=cand.device).scatter(
        1, piv, (P - torch.arange(P, device=cand.device, dtype=torch.float32)).expand(B, P) / P)
    order = ar.to(torch.float32)[None] / L
    return torch.where(dup, -4.0 - order, torch.where(is_piv, 4.0 + piv_rank, 1.0 - sim_piv))


def _diverse(inp: RuleInputs, p: dict) -> torch.Tensor:
    cand = _cand(inp)
    B, L = cand.shape
    u = _unit(inp.hidden)
    w = float(p["xyz_weight"])
    if w > 0:
        lo, ext = _extent(inp.xyz, cand)
        diag = torch.linalg.vector_norm(ext, dim=-1, keepdim=True).clamp_min(1e-6)  # (B,1,1)
        pts = (inp.xyz.float() - lo) / diag
    if p["seed"] == "attention":
        first = last_token_scores(inp.query, inp.key, inp.valid)
    else:
        first = torch.linalg.vector_norm(inp.hidden.float(), dim=-1)
    cur = torch.where(cand, first, -1.0)
    mind = torch.where(cand, torch.full_like(cur, 3.0e38), torch.full_like(cur, -1.0))
    picked = torch.zeros(B, L, dtype=torch.float32, device=cand.device)
    steps = int(p["steps"])
    ar = torch.arange(L, device=cand.device)
    for t in range(steps):
        j = torch.argmax(cur, dim=1, keepdim=True)  # (B, 1): the first maximum, as ONNX ArgMax
        hit = (ar[None, :] == j) & cand & (picked == 0)
        picked = torch.where(hit, float(steps - t), picked)
        uj = torch.gather(u, 1, j[..., None].expand(-1, -1, u.shape[-1]))  # (B, 1, D)
        d = 1.0 - torch.matmul(u, uj.transpose(1, 2))[..., 0]  # (B, L) cosine distance to the pick
        if w > 0:
            pj = torch.gather(pts, 1, j[..., None].expand(-1, -1, 3))
            d = d + w * torch.linalg.vector_norm(pts - pj, dim=-1)
        mind = torch.where(cand, torch.minimum(mind, d), mind)
        mind = torch.where(picked > 0, -1.0, mind)
        cur = mind
    # picked tokens first (in pick order), then the others by their distance to the nearest pick
    return torch.where(picked > 0, 10.0 + picked, mind.clamp(min=0.0, max=5.0))


def _strided(inp: RuleInputs, p: dict) -> torch.Tensor:
    """Token r (rank among the n candidates) is kept when floor(r k / n) steps up: exactly k tokens,
    every (n/k)-th. Non-negative integer operands only (floor division is exact everywhere)."""
    cand = _cand(inp)
    r = _cand_rank(cand).clamp_min(0)
    n = cand.sum(dim=1, keepdim=True).clamp_min(1)
    k = torch.minimum(inp.k[:, None], n)
    now = (r * k) // n
    before = (r * k + n - k) // n - 1  # floor((r - 1) k / n), operands >= 0
    return (cand & (now > before)).to(torch.float32)


def _random(inp: RuleInputs, p: dict) -> torch.Tensor:
    return random_scores(inp.valid, int(p["seed"]) * 1000 + inp.cut_index)


# ----------------------------------------------------------------------------- registry

FUNCTIONS: dict[str, Callable[[RuleInputs, dict], torch.Tensor]] = {
    "last_token": _last_token, "text_tail": _text_tail, "debiased": _debiased, "stratified": _stratified,
    "dedup": _dedup, "diverse": _diverse, "strided": _strided, "random": _random,
}
assert set(FUNCTIONS) == set(RULES), "every catalogued rule has a tensor function"


def rule_scores(name: str, params: dict, inp: RuleInputs) -> torch.Tensor:
    """(B, L) float32 scores of rule ``name`` (select_tokens keeps the k largest spatial ones)."""
    return FUNCTIONS[spec(name).name](inp, params_for(name, params)).to(torch.float32)
