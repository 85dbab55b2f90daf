"""Calibrate stage: observers vs brute force, exact merges, FLOPs formula, policies, solver, API."""

import math
import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from adatoken_compile.calibration import api as cal_api
from adatoken_compile.calibration.api import calibrate, write_calibration
from adatoken_compile.calibration.observers import AttentionObserver, extend_with_answers
from adatoken_compile.calibration.policies import peer_schedule
from adatoken_compile.calibration.observers import softmax_rows
from adatoken_compile.models.spec import spec_for
from adatoken_compile.calibration import solver
from adatoken_compile.calibration.solver import reference_logits
from adatoken_compile.calibration.stats import GROUPS, CalibrationStats, merge
from adatoken_compile.contract import Segment, collate
from adatoken_compile.errors import InputError
from adatoken_compile.arch import from_config as arch_of
from adatoken_compile.flops import prefill_flops, schedule_flops_ratio
from adatoken_compile.schedule import Cut, Schedule, identity



class _CaptureCache(DynamicCache):
    """Hands each layer's post-RoPE keys/values to ``on_update``; stores nothing."""

    def __init__(self, config, on_update):
        super().__init__(config=config)
        self._on_update = on_update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._on_update(layer_idx, key_states, value_states)
        return key_states, value_states


@contextmanager
def _capture(decoder, on_layer):
    """The oracle's own view of each layer, apart from the executor's callbacks: a pre-hook on every
    ``self_attn`` and a cache that sees the keys; calls ``on_layer(i, attn, h_norm, (cos, sin), k, v)``."""
    cur, handles = {}, []

    def make_hook(i):
        def hook(mod, args, kwargs):
            cur[i] = (mod, kwargs.get("hidden_states", args[0] if args else None), kwargs.get("position_embeddings"))
        return hook

    for i, layer in enumerate(decoder.model.layers):
        handles.append(layer.self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        yield _CaptureCache(decoder.config, lambda i, k, v: on_layer(i, *cur.pop(i), k, v))
    finally:
        for hd in handles:
            hd.remove()


@torch.no_grad()
def _fallback_pruned_prefill(decoder, inputs, schedule: Schedule) -> torch.Tensor:
    """Eager reference of the pruned prefill, one row at a time (no padding).

    Before each cut layer i: score spatial tokens with layer i-1's last-token query against its
    post-RoPE keys (softmax over all present keys, mean over heads), keep the top
    ``Schedule.keep_count`` in original order with original position ids. An independent,
    row-by-row oracle for ``pruned_forward.pruned_prefill`` (default scoring only).
    """
    spec = spec_for(decoder)
    base = spec.body(decoder)
    layers = spec.layers(decoder)
    dev = next(decoder.parameters()).device
    cuts = {c.layer: c.keep for c in schedule.effective_cuts()}
    outs = []
    for b in range(inputs.batch_size):
        r = inputs.row(b)
        h = r.inputs_embeds.to(dev)
        pos = r.position_ids.to(dev)
        sp = r.spatial_mask[0].clone()
        n0 = int(sp.sum())
        last: dict = {}

        def on_layer(i, attn, hn, pe, k, v):
            last["attn"], last["h"], last["cos"], last["sin"], last["k"] = attn, hn[0, -1:], pe[0][0, -1:], pe[1][0, -1:], k[0]

        with _capture(decoder, on_layer) as cache:
            for i, layer in enumerate(layers):
                if i in cuts and n0 > 0:
                    n_now = int(sp.sum())
                    k = Schedule.keep_count(cuts[i], n0, n_now)
                    sp_idx = torch.nonzero(sp).flatten()
                    q = spec.query_rows(last["attn"], last["h"], last["cos"], last["sin"])
                    n = last["k"].shape[1]
                    p = softmax_rows(last["attn"], q, last["k"], torch.tensor([n - 1]))
                    score = p.mean(0)[0].cpu()[sp_idx]
                    top = torch.topk(score, k, sorted=False).indices
                    keep = torch.cat([torch.nonzero(~sp).flatten(), sp_idx[top]]).sort().values
                    h, pos, sp = h[:, keep.to(dev)], pos[:, keep.to(dev)], sp[keep]
                n = h.shape[1]
                mask = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype, device=dev).triu(1)[None, None]
                pe = base.rotary_emb(h, pos)
                out = layer(h, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, position_embeddings=pe)
                h = out[0] if isinstance(out, tuple) else out
        hl = base.norm(h[:, -1:])
        outs.append(decoder.lm_head(hl)[:, -1].float().cpu())
    return torch.cat(outs)

def _llama(attn="eager"):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=128, vocab_size=101)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def _qwen(attn="eager"):
    torch.manual_seed(1)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=101)
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def _odd(attn="eager"):
    torch.manual_seed(2)
    cfg = LlamaConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3, head_dim=16,
                      intermediate_size=96, vocab_size=101)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def _sharpen(model):
    # random init gives near-uniform attention; larger q/k weights make the stats non-trivial
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def _batch(H, seed, B=2):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        pre, N, post = 3 + b, 24 + 7 * b + seed % 5, 4 + 2 * b
        sp = torch.zeros(pre + N + post, dtype=torch.bool)
        sp[pre : pre + N] = True
        rows.append(Segment(torch.randn(pre + N + post, H, generator=g), sp))
    return collate(rows)


# ---------------------------------------------------------------------- brute force
def _brute(model, inputs, answers, ratios, nb):
    """Full eager attention maps (output_attentions) reduced by hand with plain loops."""
    ext, pend, _ = extend_with_answers(model, inputs, answers)
    with torch.no_grad():
        out = model(inputs_embeds=ext.inputs_embeds, attention_mask=ext.attention_mask, position_ids=ext.position_ids,
                    output_attentions=True, output_hidden_states=True)
    cfg = model.config
    Lyr, heads, kvh = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    B, T = ext.batch_size, ext.seq_len
    acc = {}

    def add(key, v):
        acc.setdefault(key, []).append(v)

    hists = {}
    retained = {}
    for b in range(B):
        off = T - ext.lengths()[b]
        sp = [j for j in range(off, pend[b]) if ext.spatial_mask[b, j]]
        spl = [j - off for j in sp]
        last = pend[b] - 1
        groups = {"instr": [j for j in range(sp[-1] + 1, pend[b]) if not ext.spatial_mask[b, j]], "last": [last],
                  "answer": list(range(pend[b], T))}
        a_last, f_last = [], []
        for i in range(Lyr):
            layer = model.model.layers[i]
            P = out.attentions[i][b].double()
            hn = layer.input_layernorm(out.hidden_states[i][b])
            v = layer.self_attn.v_proj(hn).view(T, kvh, -1)
            d = v.shape[-1]
            Wo = layer.self_attn.o_proj.weight
            u = torch.stack([(v[:, h // (heads // kvh)] @ Wo[:, h * d:(h + 1) * d].T).double().norm(dim=-1) for h in range(heads)])
            for g, rows in groups.items():
                for r in rows:
                    pm = torch.zeros(len(spl), dtype=torch.float64)
                    fm = torch.zeros(len(spl), dtype=torch.float64)
                    for h in range(heads):
                        p = P[h, r, off:]
                        f = p * u[h, off:]
                        f = f / f.sum()
                        add(("attn", g, i, h), p[spl].sum().item())
                        add(("flow", g, i, h), f[spl].sum().item())
                        rel = f[spl] / f[spl].max()
                        for x in rel.tolist():
                            k = ("hist_flow", g, i, h, min(nb - 1, int(math.floor(x * nb))))
                            hists[k] = hists.get(k, 0) + 1
                        pm += p[spl] / heads
                        fm += f[spl] / heads
                    if g == "last":
                        a_last.append(pm)
                        f_last.append(fm)
        for src in range(Lyr):
            order = sorted(range(len(spl)), key=lambda j: -a_last[src][j].item())
            for dst in range(src, Lyr):
                for ri, r in enumerate(ratios):
                    k = max(1, min(len(spl), math.ceil(r * len(spl) - 1e-9)))
                    top = order[:k]
                    retained.setdefault((src, dst, ri), []).append((a_last[dst][top].sum() / a_last[dst].sum()).item())
    return acc, hists, retained


@pytest.mark.parametrize("make", [_llama, _qwen, _odd], ids=["llama", "qwen2-gqa", "odd-heads"])
def test_observers_match_brute_force(make):
    model = _sharpen(make("eager"))
    inputs = _batch(model.config.hidden_size, 0)
    answers = [torch.tensor([5, 7, 9]), None]
    st = CalibrationStats.empty(arch_of(model.config), "fp")
    AttentionObserver(model, st).observe(inputs, answers)
    acc, hists, retained = _brute(model, inputs, answers, st.ratios, st.num_bins)
    assert st.arrays["answer_rows"].tolist() == [3] * model.config.num_hidden_layers
    for g in GROUPS:
        for kind in ("attn", "flow"):
            share = st.spatial_share(g, kind)
            for i in range(model.config.num_hidden_layers):
                for h in range(model.config.num_attention_heads):
                    assert abs(share[i, h] - np.mean(acc[(kind, g, i, h)])) < 1e-5, (g, kind, i, h)
        hf = st.arrays[f"{g}_hist_flow"]
        ref = np.zeros_like(hf)
        for (_, gg, i, h, k), c in hists.items():
            if gg == g:
                ref[i, h, k] += c
        assert np.abs(hf - ref).sum() <= 2  # bin edges may flip under fp noise
    ret = st.retained("attn")
    for (src, dst, ri), vals in retained.items():
        assert abs(ret[src, dst, ri] - np.mean(vals)) < 1e-5


def test_sdpa_matches_eager():
    stats = []
    for attn in ("eager", "sdpa"):
        model = _sharpen(_qwen(attn))
        st = CalibrationStats.empty(arch_of(model.config), "fp")
        AttentionObserver(model, st).observe(_batch(64, 3), [torch.tensor([4, 2]), torch.tensor([8])])
        stats.append(st)
    a, b = stats
    for g in GROUPS:
        for kind in ("attn", "flow"):
            np.testing.assert_allclose(a.spatial_share(g, kind), b.spatial_share(g, kind), atol=1e-5)
    np.testing.assert_allclose(a.retained("flow"), b.retained("flow"), atol=1e-5)
    assert np.abs(a.arrays["last_hist_flow"] - b.arrays["last_hist_flow"]).sum() <= 2


def test_merge_is_exact_and_roundtrips(tmp_path):
    model = _sharpen(_llama())
    batches = [_batch(64, s) for s in range(4)]
    answers = [[torch.tensor([1, 2]), None]] * 4
    arch = arch_of(model.config)

    def run(bs, ans):
        st = CalibrationStats.empty(arch, "fp")
        obs = AttentionObserver(model, st)
        for b, a in zip(bs, ans):
            obs.observe(b, a)
        return st

    whole = run(batches, answers)
    merged = merge(run(batches[:2], answers[:2]), run(batches[2:], answers[2:]))
    merged_rev = merge(run(batches[2:], answers[2:]), run(batches[:2], answers[:2]))
    for k in whole.arrays:
        assert np.array_equal(whole.arrays[k], merged.arrays[k]), k
        assert np.array_equal(whole.arrays[k], merged_rev.arrays[k]), k
    whole.save(str(tmp_path))
    back = CalibrationStats.load(str(tmp_path))
    assert back.fingerprint == "fp" and back.arch == arch
    assert all(np.array_equal(back.arrays[k], v) for k, v in whole.arrays.items())
    other = CalibrationStats.empty(arch, "another-model")
    with pytest.raises(InputError):
        merge(whole, other)


def test_flops_hand_count():
    arch = {"num_layers": 1, "hidden": 8, "heads": 4, "kv_heads": 2, "head_dim": 2, "intermediate": 16, "vocab": 10}
    f = prefill_flops(arch, n_text=1, tokens_per_layer=[2])
    assert f["linear"] == 2 * 3 * (8 * (8 + 8) + 8 * 8 + 3 * 8 * 16) == 3456
    assert f["attention"] == 4 * 9 * 8 == 288
    assert f["lm_head"] == 160 and f["drop"] == 0 and f["total"] == 3904
    arch2 = dict(arch, num_layers=2)
    f2 = prefill_flops(arch2, n_text=1, tokens_per_layer=[4, 2])
    # layer 0: n=5, layer 1: n=3; drop before layer 1 with n_in=5, s_in=4, k=2
    drop = 2 * 5 * 8 + 5 * 5 * 4 + 5 * 4 + 4 * 2 + 2 * 1
    lin5 = 2 * 5 * 576
    assert f2["drop"] == drop
    assert f2["total"] == lin5 + 4 * 25 * 8 + 3456 + 288 + 160 + drop
    s = Schedule([Cut(1, 0.5)], 2)
    full = prefill_flops(arch2, 1, [4, 4])["total"]
    assert schedule_flops_ratio(arch2, s, 4, 1) == pytest.approx(f2["total"] / full)


@pytest.mark.parametrize("L,fastv,pdrop", [
    (4, [(2, 0.5)], [(1, 0.5), (2, 0.25), (3, 0.125)]),
    (8, [(2, 0.5)], [(2, 0.5), (4, 0.25), (6, 0.125)]),
    (32, [(2, 0.5)], [(8, 0.5), (16, 0.25), (24, 0.125)]),
])
def test_peer_policies(L, fastv, pdrop):
    assert [(c.layer, c.keep) for c in peer_schedule("fastv", L).cuts] == fastv
    assert [(c.layer, c.keep) for c in peer_schedule("pdrop", L).cuts] == pdrop
    assert peer_schedule("none", L).cuts == []
    dec = peer_schedule("adatoken-decay", L)
    step = max(1, round(4 * L / 32))
    assert [c.layer for c in dec.cuts] == list(range(step, L, step))
    assert dec.cuts[0].keep == pytest.approx(0.1 ** (step / (L - 1)), abs=1e-6)
    assert dec.cuts[-1].keep == pytest.approx(0.1 ** (dec.cuts[-1].layer / (L - 1)), abs=1e-6)
    assert dec.keep_per_layer() == sorted(dec.keep_per_layer(), reverse=True)
    rnd = peer_schedule("random", L, like=dec, seed=3)
    assert [(c.layer, c.keep) for c in rnd.cuts] == [(c.layer, c.keep) for c in dec.cuts]
    assert {c.rule.to_dict()["name"] for c in rnd.cuts} == {"random"} and rnd.cuts[0].rule.get("seed") == 3
    assert rnd.tokens_per_layer(1000) == dec.tokens_per_layer(1000)


def _data(H, n=8, answers=False):
    out = []
    for s in range(n // 2):
        b = _batch(H, 10 + s)
        out.append((b, [torch.tensor([3, 4]), torch.tensor([5])]) if answers else b)
    return out


def test_fallback_identity_matches_reference():
    model = _qwen("sdpa")
    b = _batch(64, 5)
    assert torch.allclose(_fallback_pruned_prefill(model, b, identity(4)), reference_logits(model, b), atol=1e-5)


@pytest.mark.parametrize("kw", [{"flops_budget": 0.6}, {"fidelity": 0.5}, {}])
def test_solver_meets_target(kw, tmp_path):
    model = _sharpen(_qwen("sdpa"))
    # the default target 0.95 needs >= 73 held-back rows to be shown at all (0.5 needs 4)
    data, hold = (_data(64, answers=True), 4) if kw else (_data(64, n=96, answers=True), 80)
    s, st = calibrate(model, data, policy="adaptive", progress=False, holdout=hold, **kw)
    s.validate()
    keeps = s.keep_per_layer()
    assert keeps == sorted(keeps, reverse=True)
    if "flops_budget" in kw:
        assert s.predicted["flops_ratio"] <= kw["flops_budget"] + 1e-9
    else:
        target = kw.get("fidelity", solver.DEFAULT_FIDELITY)  # no target, no budget: the default target
        fid = s.calibration["fidelity"]
        assert s.calibration["fidelity_target"] == target and solver.passes(fid, target)
        assert solver.wilson_interval(fid["agreed"], fid["rows"])[0] >= target
    assert s.fingerprint == st.fingerprint and s.calibration["search"]["validated"]
    out = write_calibration(str(tmp_path / "cal"), s, st)
    assert sorted(os.listdir(out)) == sorted(["schedule.json", "stats.npz", "stats.json", "report.md", "report.json",
                                              "spatial_share.png", "contribution_cdf.png", "keep_curves.png", "retained_mass.png",
                                              ".adatoken-compile-output.json"])  # the record listing them all
    assert Schedule.load(os.path.join(out, "schedule.json")).cuts == s.cuts
    assert [p for p in os.listdir(tmp_path) if p != "cal"] == []


def _measured(agreed: int, rows: int) -> dict:
    """A constructed validation: the first ``agreed`` of ``rows`` held-back rows agree."""
    return {"agreement": agreed / rows, "kl": 0.0, "rows": rows, "agreed": agreed,
            solver.ROW_KEY: [True] * agreed + [False] * (rows - agreed)}


def test_fidelity_search_refines_the_gap_between_frontier_points(monkeypatch):
    """The Lagrangian frontier jumps (here 0.54 -> 1.0 of the FLOPs); with agreement a step function of
    the FLOPs ratio the fidelity search must land inside the gap, below the frontier's passing point."""
    from adatoken_compile.flops import schedule_flops

    model = _sharpen(_qwen("sdpa"))
    _, st = calibrate(model, _data(64, answers=True), policy="adaptive", progress=False, fidelity=0.5, holdout=4)
    N, nt = st.mean_spatial_tokens(), st.mean_text_tokens()
    frontier = solver.propose(st)
    gaps = [(a.flops_ratio, b.flops_ratio) for a, b in zip(frontier, frontier[1:])]
    lo, hi = max(gaps, key=lambda g: g[1] - g[0])
    assert hi - lo > 0.2  # the premise: a wide jump on this model's frontier
    threshold = lo + 0.5 * (hi - lo)

    def fake_agreement(decoder, holdout, refs, schedule, max_disagree=None, states=None, against=None):
        ok = schedule_flops(st.arch, schedule, N, nt)["flops_ratio"] >= threshold
        return _measured(4 if ok else 2, 4)

    monkeypatch.setattr(solver, "agreement", fake_agreement)
    s = solver.solve(model, st, _data(64, n=4), fidelity=0.5, max_validations=12,  # 4 of 4 shows >= 0.55
                     rules=("last_token",))
    got = s.predicted["flops_ratio"]
    assert threshold <= got < hi - 0.05  # inside the gap, well below the frontier point above it
    assert got - threshold < 0.15
    assert s.calibration["fidelity"]["agreement"] == 1.0
    assert len(s.calibration["search"]["validated"]) <= 12


def test_search_tries_deeper_first_cuts_when_the_proxy_prefers_shallow_ones(monkeypatch):
    """A proxy that prefers one shape: the whole frontier cut at layer 1, every layer-1 cut that passed kept most
    of the FLOPs, and deeper shapes the frontier never offered passed far cheaper. With agreement
    refusing every cut at layer 1 (and the unpruned model never run: it agrees by construction),
    the fidelity search must find a passing schedule whose first cut is deeper, and the budget
    search must measure more than one first-cut layer and choose a deeper one."""

    model = _sharpen(_qwen("sdpa"))
    _, st = calibrate(model, _data(64, answers=True), policy="adaptive", progress=False, fidelity=0.5, holdout=4)
    assert solver.propose(st)[0].cuts[0].layer == 1  # the premise: the proxy's cheapest shape cuts at layer 1
    assert all(c.cuts[0].layer >= 2 for c in solver.propose(st, first_layer=2) if c.cuts)
    runs = []

    def fake_agreement(decoder, holdout, refs, schedule, max_disagree=None, states=None, against=None):
        assert schedule.cuts, "the unpruned schedule was run"
        runs.append(schedule)
        ok = schedule.cuts[0].layer >= 2
        return _measured(4 if ok else 2, 4)

    monkeypatch.setattr(solver, "agreement", fake_agreement)
    s = solver.solve(model, st, _data(64, n=4), fidelity=0.5, max_validations=12, rules=("last_token",))
    assert s.cuts and s.cuts[0].layer >= 2 and s.calibration["fidelity"]["agreed"] == 4
    assert s.predicted["flops_ratio"] < 1.0 and len(runs) <= 12
    cheapest_deep = min(c.flops_ratio for c in solver.propose(st, first_layer=2) if c.cuts)
    assert s.predicted["flops_ratio"] < cheapest_deep + 0.25  # well into the deeper shapes' range

    runs.clear()
    budget = cheapest_deep + 0.03  # the proxy's own candidates at this budget all cut at layer 1 here
    deep = fake_agreement
    monkeypatch.setattr(solver, "agreement", lambda d, h, r, sch, m=None, states=None, against=None:
                        {**deep(d, h, r, sch), **_measured(3, 4)}
                        if sch.cuts[0].layer >= 2 else deep(d, h, r, sch))  # below 1: no early stop
    b = solver.solve(model, st, _data(64, n=4), flops_budget=budget, max_validations=4, rules=("last_token",))
    assert len({r.cuts[0].layer for r in runs}) >= 2  # shapes measured, not ranked by the proxy alone
    assert b.cuts[0].layer >= 2 and b.predicted["flops_ratio"] <= budget + 1e-9

    # nothing passes: the unpruned schedule is returned, recorded as agreeing by construction
    monkeypatch.setattr(solver, "agreement", lambda d, h, r, sch, m=None, states=None, against=None: _measured(2, 4))
    s = solver.solve(model, st, _data(64, n=4), fidelity=0.5, max_validations=6, rules=("last_token",))
    assert s.cuts == [] and s.calibration["fidelity"]["unpruned"] and s.calibration["fidelity"]["agreed"] == 4
    assert len(s.calibration["search"]["validated"]) == 6


def test_a_lucky_point_estimate_does_not_pass(monkeypatch):
    """A lucky point estimate: the cheapest candidate agreeing on 92 of 96 held-back rows (0.958 >= 0.95) was
    chosen and changed 11% of the test answers. A candidate now passes only when the lower end of its
    95% interval reaches the target, so with every cheaper candidate at 92/96 and the dearer ones at
    96/96 the search must return a 96/96 one."""
    from adatoken_compile.flops import schedule_flops

    model = _sharpen(_qwen("sdpa"))
    _, st = calibrate(model, _data(64, answers=True), policy="adaptive", progress=False, fidelity=0.5, holdout=4)
    N, nt = st.mean_spatial_tokens(), st.mean_text_tokens()
    ratios = sorted(c.flops_ratio for c in solver.propose(st))
    threshold = ratios[len(ratios) // 2]

    def fake_agreement(decoder, holdout, refs, schedule, max_disagree=None, states=None, against=None):
        k = 96 if schedule_flops(st.arch, schedule, N, nt)["flops_ratio"] >= threshold - 1e-9 else 92
        return _measured(k, 96)

    monkeypatch.setattr(solver, "agreement", fake_agreement)
    hold = _data(64, n=96)  # 96 rows: all agreeing shows >= 0.962
    s = solver.solve(model, st, hold, fidelity=0.95, max_validations=12, rules=("last_token",))
    assert s.calibration["fidelity"]["agreed"] == 96 and s.predicted["flops_ratio"] >= threshold - 1e-9
    seen = s.calibration["search"]["validated"]
    assert any(v["agreed"] == 92 for v in seen)  # the lucky cheaper ones were measured and refused
    assert not solver.passes({"agreement": 92 / 96, "rows": 96, "agreed": 92}, 0.95)
    assert solver.passes({"agreement": 374 / 384, "rows": 384, "agreed": 374}, 0.95)
    assert not solver.passes({"agreement": 373 / 384, "rows": 384, "agreed": 373}, 0.95)


def test_too_few_held_back_rows_for_the_target_is_an_input_error():
    from adatoken_compile.errors import InputError

    for t in (0.5, 0.9, 0.95, 0.99):
        n = solver.min_rows(t)  # the fewest rows on which all agreeing reaches t
        assert solver.wilson_interval(n, n)[0] >= t > solver.wilson_interval(n - 1, n - 1)[0]
    assert solver.min_rows(0.95) == 73 and solver.min_rows(0.99) == 381
    model = _sharpen(_qwen("sdpa"))
    _, st = calibrate(model, _data(64, answers=True), policy="adaptive", progress=False, fidelity=0.5, holdout=4)
    with pytest.raises(InputError, match="hold back at least 73 rows"):
        solver.solve(model, st, _data(64, n=8), fidelity=0.95)
    with pytest.raises(InputError, match="target 1 cannot be shown"):
        solver.solve(model, st, _data(64, n=8), fidelity=1.0)


def test_validation_cache_computes_references_and_measures_each_schedule_once(monkeypatch):
    """The quickstart solves four times on one held-back set: with a shared cache the references are
    computed once and a schedule measured once; a set with other contents starts afresh; the cached
    solve returns what an uncached one returns."""
    model = _sharpen(_qwen("sdpa"))
    _, st = calibrate(model, _data(64, answers=True), policy="adaptive", progress=False, fidelity=0.5, holdout=4)
    calls = {"agreement": 0, "refs": 0}
    real_agreement, real_refs = solver.agreement, solver.reference_logits

    def counted(name, fn):
        def wrap(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrap

    one = ("last_token",)  # the count search's validations (a rule search adds its own, cached alike)
    plain = solver.solve(model, st, _data(64, n=8), fidelity=0.5, rules=one)
    monkeypatch.setattr(solver, "agreement", counted("agreement", real_agreement))
    monkeypatch.setattr(solver, "reference_logits", counted("refs", real_refs))
    cache = solver.ValidationCache()
    s1 = solver.solve(model, st, _data(64, n=8), fidelity=0.5, cache=cache, rules=one)
    first = dict(calls)
    # each validated candidate once, and the chosen schedule's random control
    assert first["refs"] == 4 and first["agreement"] == len(s1.calibration["search"]["validated"]) + bool(s1.cuts) > 0
    s2 = solver.solve(model, st, _data(64, n=8), fidelity=0.5, cache=cache, rules=one)  # same contents, new objects
    assert calls == first
    s3 = solver.solve(model, st, _data(64, n=8), flops_budget=0.6, cache=cache, max_validations=3, rules=one)
    assert calls["refs"] == first["refs"]
    assert calls["agreement"] - first["agreement"] <= len(s3.calibration["search"]["validated"]) + 1
    assert s1.cuts == s2.cuts == plain.cuts
    assert s1.calibration["fidelity"] == s2.calibration["fidelity"] == plain.calibration["fidelity"]
    solver.solve(model, st, _data(64, n=10), fidelity=0.5, cache=cache, rules=one)  # other rows: new references
    assert calls["refs"] == first["refs"] + 5


def test_a_failing_candidate_stops_early_and_is_measured_in_full_when_ranked(monkeypatch):
    """A fidelity search stops running a candidate once more rows disagree than the target allows;
    the stopped measurement fails, and a budget search (which ranks agreements) measures all rows.
    The pruned forward is replaced by one whose answers differ on batches 1, 3 and 5 (2 rows each)."""
    from adatoken_compile.schedule import Cut

    model = _sharpen(_qwen("sdpa"))
    hold = _data(64, n=16)  # 8 batches of 2 rows
    refs = [solver.reference_logits(model, b) for b in hold]
    runs = []

    def fake_pruned(decoder, batch, schedule, start=None):
        i = next(j for j, b in enumerate(hold) if b is batch)
        runs.append(i)
        return -refs[i] if i in (1, 3, 5) else refs[i]

    monkeypatch.setattr(solver, "_run_pruned", fake_pruned)
    harsh = Schedule(cuts=[Cut(1, 0.025)], num_layers=4)
    full = solver.agreement(model, hold, refs, harsh)
    assert full["rows"] == 16 and full["agreed"] == 10 and "stopped" not in full and runs == list(range(8))
    part = solver.agreement(model, hold, refs, harsh, max_disagree=3)
    assert part["stopped"] and part["rows"] == 8 and part["agreed"] == 4  # batch 3 takes it past 3
    assert not solver.passes(part, 0.01) and solver.passes(full, 0.01)
    assert solver.agreement(model, hold, refs, harsh, max_disagree=16 - full["agreed"]) == full  # never over: runs all
    cache = solver.ValidationCache()
    runs.clear()
    assert cache.measure(model, hold, harsh, 3) == part and cache.measure(model, hold, harsh, 2) == part
    assert runs == [0, 1, 2, 3]  # a stricter request is answered by the stopped run
    looser = cache.measure(model, hold, harsh, 4)  # a looser request runs again, further
    assert (looser["rows"], looser["agreed"], looser["stopped"]) == (12, 6, True)
    assert cache.measure(model, hold, harsh) == full  # a ranking request: all rows
    for n, t in ((384, 0.95), (96, 0.9), (500, 0.97)):
        m = solver.max_disagreements(n, t)
        assert solver.wilson_interval(n - m, n)[0] >= t > solver.wilson_interval(n - m - 1, n)[0]
    assert solver.max_disagreements(384, 0.95) == 10


def test_wilson_interval_of_the_agreement():
    from adatoken_compile.calibration.solver import wilson_interval

    lo, hi = wilson_interval(8, 10)  # textbook value: 0.490 .. 0.943
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    assert wilson_interval(16, 16)[0] < 0.81 < wilson_interval(200, 200)[0]  # more rows, tighter bound
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_invalid_inputs(tmp_path, monkeypatch):
    model = _llama()
    data = _data(64, n=4)
    with pytest.raises(InputError):
        calibrate(model, [], policy="pdrop", progress=False)
    with pytest.raises(InputError):
        calibrate(model, data, policy="adaptive", flops_budget=1.5, progress=False)
    with pytest.raises(InputError):
        calibrate(model, data, policy="adaptive", fidelity=0.0, progress=False)
    with pytest.raises(InputError):
        calibrate(model, data, policy="bogus", progress=False)
    with pytest.raises(InputError):
        calibrate(model, [_batch(32, 0)], policy="pdrop", progress=False, holdout=0.25)
    s, st = calibrate(model, data, policy="pdrop", progress=False, holdout=0.25)
    other = CalibrationStats.empty(st.arch, "other")
    with pytest.raises(InputError):
        calibrate(model, data, policy="pdrop", prior=other, progress=False, holdout=0.25)
    s.fingerprint = "other-model"
    with pytest.raises(InputError):
        write_calibration(str(tmp_path / "bad"), s, st)
    s.fingerprint = st.fingerprint

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cal_api, "write_report", boom)
    with pytest.raises(RuntimeError):
        write_calibration(str(tmp_path / "cal"), s, st)
    assert os.listdir(tmp_path) == []


def test_fallback_matches_pruned_forward():
    pf = pytest.importorskip("adatoken_compile.compiler.reference")
    model = _sharpen(_qwen("sdpa"))
    b = _batch(64, 7)
    s = Schedule([Cut(1, 0.5), Cut(2, 0.2)], 4)
    assert torch.allclose(pf.pruned_prefill(model, b, s).logits_last, _fallback_pruned_prefill(model, b, s), atol=1e-5)


def test_stability_replays_the_choice_on_bootstrap_resamples():
    """The stability report replays the fidelity search's choice on resampled held-back rows: a
    cheapest candidate that agrees everywhere is always chosen again; a borderline cheaper one is
    chosen in some resamples only, and the shares of all choices add up to one."""
    from adatoken_compile.calibration.solver import ROW_KEY, Candidate, stability

    def cand(layer, keep, flops, agree, n=100):
        c = Candidate([Cut(layer, keep)] if layer else [], flops, 0.0)
        c.measured = {ROW_KEY: [True] * agree + [False] * (n - agree)}
        return c

    sure, unpruned = cand(1, 0.5, 0.5, 100), cand(0, 1.0, 1.0, 100)
    st = stability([sure, unpruned], sure, 0.9, 100, resamples=200)
    assert st["chosen_share"] == 1.0 and st["flops_cut_p5_p95"] == [0.5, 0.5]
    borderline = cand(1, 0.2, 0.3, 95)  # lower Wilson bound 0.888 < 0.9 on the rows as measured
    st = stability([borderline, sure, unpruned], sure, 0.9, 100, resamples=400, seed=1)
    assert 0.5 < st["chosen_share"] < 1.0
    assert 0.0 < st["choices"]["L1:0.2"] < 0.5
    assert abs(sum(st["choices"].values()) - 1.0) < 1e-9
    assert st["flops_cut_p5_p95"][0] == 0.5 and st["flops_cut_p5_p95"][1] == 0.7


def test_validation_from_the_layer_zero_states_equals_running_every_layer():
    """Candidates that cut at layer 1 or later start from the held-back batches' states after layer
    0: the same agreement, KL and per-row answers as running every layer, for attention, similarity
    and spatial rules; a cut before layer 0 runs in full; a memory budget too small for every batch
    keeps the first batches and runs the others in full, with the same numbers."""
    from adatoken_compile.selection import Rule

    model = _sharpen(_qwen("sdpa"))
    hold = _data(64, n=8)  # 4 batches of 2 rows
    refs = [solver.reference_logits(model, b) for b in hold]
    schedules = [
        Schedule([Cut(1, 0.5)], 4),
        Schedule([Cut(1, 0.6, Rule("text_tail")), Cut(2, 0.3, Rule("dedup"))], 4),
        Schedule([Cut(2, 0.4, Rule("stratified"))], 4),
        Schedule([Cut(0, 0.5, Rule("strided"))], 4),
    ]
    plain = [solver.agreement(model, hold, refs, s) for s in schedules]
    assert len({m["kl"] for m in plain}) == len(plain)  # the schedules differ, so equality below means something
    roomy = solver.LayerZeroStates(len(hold))
    assert [solver.agreement(model, hold, refs, s, states=roomy) for s in schedules] == plain
    assert all(f is not None for f in roomy.flows) and roomy.flows[0].mask4 is None  # kept without the 4-D mask
    sizes = [f.nbytes() for f in roomy.flows]
    tight = solver.LayerZeroStates(len(hold), budget=sizes[0] + sizes[1])
    assert [solver.agreement(model, hold, refs, s, states=tight) for s in schedules] == plain
    assert [f is not None for f in tight.flows] == [True, True, False, False] and tight.used == tight.budget


def test_the_engine_holds_back_what_the_api_does(monkeypatch):
    """Without ``holdout``, the engine holds back the API's count (one definition), refuses batches
    too few to leave statistics rows, and still takes a fraction or a count when given one."""
    import adatoken_compile.api as api
    from adatoken_compile.calibration import defaults

    assert (api.HOLDOUT, api.RULES_HOLDOUT, api.default_holdout) == \
        (defaults.HOLDOUT, defaults.RULES_HOLDOUT, defaults.default_holdout)
    model = _llama()
    data = _data(64, n=8)
    with pytest.raises(InputError, match=rf"^calibrate: the default holds back {defaults.HOLDOUT} rows .* hold 8; "):
        calibrate(model, data, policy="pdrop", progress=False)
    with pytest.raises(InputError, match=rf"holds back {defaults.RULES_HOLDOUT} rows"):
        calibrate(model, data, policy="pdrop", progress=False, rules="all")
    monkeypatch.setattr(defaults, "HOLDOUT", 3)
    _, st = calibrate(model, data, policy="pdrop", progress=False)
    assert st.meta["holdout_rows"] == 3 and st.samples == 5
    _, st = calibrate(model, data, policy="pdrop", progress=False, holdout=0.25)
    assert st.meta["holdout_rows"] == 2 and st.samples == 6
    _, st = calibrate(model, data, policy="pdrop", progress=False, holdout=1)
    assert st.meta["holdout_rows"] == 1
