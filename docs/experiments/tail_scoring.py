"""Experiment (not a product feature): rank the spatial tokens by the question tail's attention
(mean over the text rows after the scene and over heads) instead of the last token's, at pdrop's,
adatoken-decay's and the main job's adaptive cuts, on the first 500 test questions, through the
PyTorch reference with token_drop.score_for patched.

    OMP_NUM_THREADS=2 python docs/experiments/tail_scoring.py
"""
import math

import torch
from adatoken_compile import pruned_forward as pf
from adatoken_compile.data.dataset import iter_samples
from adatoken_compile.evaluate import evaluate, pruned_answer_fn
from adatoken_compile.models.registry import DEFAULT_MODEL, load_adapter
from adatoken_compile.calibrate.policies import peer_schedule
from adatoken_compile.schedule import Cut, Schedule

td = pf.td
state = {}
orig_count, orig_gather, orig_score = td.spatial_count, td.gather_seq, td.score_for

def spatial_count(spatial, valid):
    state["spatial"] = spatial
    state.pop("next_spatial", None)
    return orig_count(spatial, valid)

def gather_seq(x, idx, dims):
    out = orig_gather(x, idx, dims)
    if x is state.get("spatial"):
        state["next_spatial"] = out
    return out

def tail_scores(query, key, valid):
    sp = state["spatial"]
    B, hq, L, d = query.shape
    hkv = key.shape[1]; g = hq // hkv
    tail = valid & ~sp & (torch.cumsum(sp.long(), 1) > 0)  # text after the scene
    q = query.reshape(B, hkv, g, L, d).float()
    logits = torch.matmul(q, key.float()[:, :, None].transpose(-1, -2)) / math.sqrt(d)  # B,hkv,g,L,L
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal[None] & valid[:, None, :]
    logits = torch.where(allowed[:, None, None], logits, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)  # rows of padding are all -inf
    p = p.mean(dim=(1, 2))  # B, L(query), L(key)
    w = tail.float()
    return (p * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)

def score_for(scoring, cut_index, query, key, valid):
    if state.get("next_spatial") is not None and state["next_spatial"].shape[1] == valid.shape[1]:
        state["spatial"] = state.pop("next_spatial")
    if scoring.get("query") == "tail":
        return tail_scores(query, key, valid)
    return orig_score(scoring, cut_index, query, key, valid)

td.spatial_count, td.gather_seq, td.score_for = spatial_count, gather_seq, score_for

ad = load_adapter(DEFAULT_MODEL)
L = ad.describe()["layers"]
qs = list(iter_samples("test", limit=500))
for name, cuts in [("pdrop", None), ("adatoken-decay", None), ("adaptive L1:0.7,L2:0.4", [Cut(1, 0.7), Cut(2, 0.4)])]:
    s = peer_schedule(name, L, fingerprint=ad.fingerprint()) if cuts is None else Schedule(cuts=cuts, num_layers=L, fingerprint=ad.fingerprint())
    s.scoring = {"query": "tail"}
    res = evaluate(pruned_answer_fn(ad, s), qs)
    print(name, "tail scoring:", res["accuracy"], {k: round(v["accuracy"], 3) for k, v in res["per_kind"].items()}, flush=True)
