"""Experiment (not a product feature): rank the spatial tokens by the question tail's attention
(mean over the text rows after the scene and over heads) instead of the last token's, at pdrop's,
adatoken-decay's and the main job's adaptive cuts, on the first 500 test questions, through the
PyTorch reference with token_drop.score_for / select_tokens patched.

    OMP_NUM_THREADS=2 python -m reference_model.experiments.tail_scoring
"""
import math

import torch

from adatoken_compile.benchmark3d.dataset import iter_samples
from adatoken_compile.calibration.policies import peer_schedule
from adatoken_compile.evaluation.accuracy import evaluate
from adatoken_compile.evaluation.answers import reference_answer_fn as pruned_answer_fn
from adatoken_compile.models.registry import DEFAULT_MODEL, load_adapter
from adatoken_compile.passes import token_drop as td  # the functions the PyTorch reference calls
from adatoken_compile.schedule import Cut, Schedule

orig_score, orig_select = td.score_for, td.select_tokens


def tail_scores(query, key, valid, spatial):
    """Mean over heads and over the text rows after the scene (under left padding, the last rows
    of the sequence) of the causal softmax attention of each row over the valid keys."""
    B, hq, L, d = query.shape
    hkv = key.shape[1]
    # after a cut the padding slots hold dropped spatial tokens (valid False): count valid ones only
    tail = valid & ~spatial & (torch.cumsum((spatial & valid).long(), 1) > 0)
    T = int(tail.sum(1).max())
    assert bool((tail[:, L - T:].sum(1) == tail.sum(1)).all()), "the text after the scene must end every row"
    q = query[:, :, L - T:].reshape(B, hkv, hq // hkv, T, d).float()
    logits = torch.matmul(q, key.float()[:, :, None].transpose(-1, -2)) / math.sqrt(d)  # B,hkv,g,T,L
    causal = torch.arange(L)[None, :] <= torch.arange(L - T, L)[:, None]  # T,L
    allowed = causal[None] & valid[:, None, :]
    probs = torch.softmax(torch.where(allowed[:, None, None], logits, float("-inf")), -1).mean(dim=(1, 2))
    w = tail[:, L - T:].float()
    return (probs * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)


def score_for(scoring, cut_index, query, key, valid):
    # the tail rows need the spatial mask, which select_tokens receives: defer the scoring to it
    return (query, key) if scoring.get("query") == "tail" else orig_score(scoring, cut_index, query, key, valid)


def select_tokens(scores, valid, spatial, n0, keep):
    if isinstance(scores, tuple):
        scores = tail_scores(*scores, valid, spatial)
    return orig_select(scores, valid, spatial, n0, keep)


td.score_for, td.select_tokens = score_for, select_tokens

ad = load_adapter(DEFAULT_MODEL)
L = ad.describe()["layers"]
qs = list(iter_samples("test", limit=500))
for name, cuts in [("pdrop", None), ("adatoken-decay", None), ("adaptive L1:0.7,L2:0.4", [Cut(1, 0.7), Cut(2, 0.4)])]:
    s = peer_schedule(name, L, fingerprint=ad.fingerprint()) if cuts is None else Schedule(cuts=cuts, num_layers=L, fingerprint=ad.fingerprint())
    s.scoring = {"query": "tail"}
    res = evaluate(pruned_answer_fn(ad, s), qs)
    print(name, "tail scoring:", res["accuracy"], {k: round(v["accuracy"], 3) for k, v in res["per_kind"].items()}, flush=True)
