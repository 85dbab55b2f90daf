"""Selection rules on hand-checked tiny cases, the schedule's rule per cut (version 2, version 1 still
loading), the per-position prior, rule-aware FLOPs and the solver's rule choice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from adatoken_compile.calibration import solver
from adatoken_compile.calibration.stats import CalibrationStats
from adatoken_compile.errors import InputError
from adatoken_compile.flops import schedule_flops
from adatoken_compile.passes.token_drop import score_cut, select_tokens, spatial_count, spatial_rank
from adatoken_compile.schedule import Cut, Schedule
from adatoken_compile.selection import PRIOR_BINS, Rule, at_layer, check_rule, needs, pre_llm

ARCH = {"num_layers": 4, "hidden": 16, "heads": 2, "kv_heads": 2, "head_dim": 8, "intermediate": 32, "vocab": 11}

FP = "sha256:" + "a" * 64  # a schedule names its model


def _row(n_pre: int, n_sp: int, n_post: int, pad: int = 0):
    """valid / spatial masks of one left-padded row."""
    L = pad + n_pre + n_sp + n_post
    valid = torch.zeros(1, L, dtype=torch.bool)
    valid[:, pad:] = True
    spatial = torch.zeros(1, L, dtype=torch.bool)
    spatial[:, pad + n_pre: pad + n_pre + n_sp] = True
    return valid, spatial


def _kept(rule, keep, valid, spatial, **inputs):
    """Spatial ranks (0-based, scene order) a cut keeps."""
    n0 = spatial_count(spatial, valid)
    s = score_cut(rule, 0, keep, valid, spatial, n0, srank=spatial_rank(spatial, valid), **inputs)
    idx, new_valid, _ = select_tokens(s, valid, spatial, n0, keep)
    pos = idx[0][new_valid[0]]
    pos = pos[spatial[0, pos]]
    return (spatial_rank(spatial, valid)[0, pos]).tolist()


def test_strided_keeps_every_kth():
    valid, spatial = _row(3, 12, 2, pad=2)
    assert _kept(Rule.of("strided"), 1 / 3, valid, spatial) == [0, 3, 6, 9]
    assert _kept(Rule.of("strided"), 0.5, valid, spatial) == [0, 2, 4, 6, 8, 10]
    valid, spatial = _row(1, 10, 1)
    assert _kept(Rule.of("strided"), 0.3, valid, spatial) == [0, 4, 7]  # k=3 of 10: floor(r*3/10) steps up


@pytest.mark.parametrize("counts,keep", [((8, 4, 2, 2), 0.5), ((5, 5, 3, 3), 7 / 16), ((9, 1, 3, 3), 0.25)])
def test_stratified_keeps_each_cells_quota(counts, keep):
    n = sum(counts)
    valid, spatial = _row(2, n, 3)
    x = torch.cat([torch.full((c,), float(i)) + torch.linspace(0, 0.5, c) for i, c in enumerate(counts)])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # cells interleaved in scene order
    xyz = torch.zeros(1, spatial.shape[1], 3)
    xyz[0, spatial[0], 0] = x[order]
    cell = torch.zeros(spatial.shape[1], dtype=torch.long)
    cell[spatial[0]] = torch.clamp((x[order] / 3.5 * 4).floor().long(), 0, 3)
    rule = Rule.of("stratified", grid=[4, 1, 1], rank="random")
    kept = _kept(rule, keep, valid, spatial, xyz=xyz)
    k = math.ceil(keep * n - 1e-9)
    assert len(kept) == k
    sp_pos = torch.nonzero(spatial[0]).flatten()
    got = torch.bincount(cell[sp_pos[kept]], minlength=4).tolist()
    quota = [(k * c) // n for c in counts]
    assert all(g >= q for g, q in zip(got, quota)), (got, quota)
    assert sum(got) - sum(quota) == k - sum(quota) < 4  # the remainder: fewer tokens than cells
    # inside a cell, the quota goes to the best-ranked tokens (here the seeded hash)
    from adatoken_compile.passes.token_drop.rules import random_scores

    r = random_scores(valid, 7919)[0]
    for c in range(4):
        members = [j for j in range(n) if cell[sp_pos[j]] == c]
        best = sorted(members, key=lambda j: -float(r[sp_pos[j]]))[:quota[c]]
        assert set(best) <= set(kept)


def test_dedup_never_keeps_two_identical_tokens_while_a_distinct_one_is_left():
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        distinct = torch.randn(6, 16, generator=gen)
        which = torch.randint(0, 6, (14,), generator=gen)
        which[:6] = torch.arange(6)
        which = which[torch.randperm(14, generator=gen)]
        valid, spatial = _row(2, 14, 2)
        hidden = torch.randn(1, 18, 16, generator=gen)
        hidden[0, 2:16] = distinct[which] * (1 + torch.rand(14, 1, generator=gen))  # same direction, other norms
        for k in range(1, 15):
            kept = _kept(Rule.of("dedup", pivots=3), k / 14, valid, spatial, hidden=hidden)
            ids = which[kept].tolist()
            if k <= 6:
                assert len(set(ids)) == len(ids), (trial, k, ids)  # all distinct while distinct ones are left
            else:
                assert set(ids) == set(range(6))


def test_diverse_covers_clusters_first():
    valid, spatial = _row(1, 12, 1)
    centres = torch.eye(3, 8) * 5
    feats = centres[torch.tensor([0] * 8 + [1] * 2 + [2] * 2)] + 0.01 * torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.zeros(1, 14, 8)
    hidden[0, 1:13] = feats
    kept = _kept(Rule.of("diverse", seed="norm", xyz_weight=0.0, steps=3), 3 / 12, valid, spatial, hidden=hidden)
    assert sorted({0 if j < 8 else (1 if j < 10 else 2) for j in kept}) == [0, 1, 2]


def test_text_tail_is_the_mean_attention_of_the_question_rows():
    gen = torch.Generator().manual_seed(0)
    valid, spatial = _row(2, 6, 4, pad=2)
    L = valid.shape[1]
    q, k = torch.randn(1, 2, L, 4, generator=gen), torch.randn(1, 2, L, 4, generator=gen)
    n0 = spatial_count(spatial, valid)
    got = score_cut(Rule.of("text_tail"), 0, 0.5, valid, spatial, n0, query=q, key=k)
    rows = [p for p in range(L) if valid[0, p] and not spatial[0, p] and p > 2 + 2 + 5]  # after the scene
    want = torch.zeros(L)
    for p in rows:
        logits = (q[0, :, p, None] @ k[0].transpose(-1, -2))[:, 0] / 2.0  # (heads, L)
        logits[:, ~(valid[0] & (torch.arange(L) <= p))] = -float("inf")
        want += torch.softmax(logits, -1).mean(0)
    torch.testing.assert_close(got[0], want / len(rows))


def test_debiased_divides_by_the_prior_of_the_token_position():
    valid, spatial = _row(1, 8, 1)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 10, 4, generator=gen), torch.randn(1, 2, 10, 4, generator=gen)
    prior = [1.0 + b for b in range(PRIOR_BINS)]
    n0 = spatial_count(spatial, valid)
    srank = spatial_rank(spatial, valid)
    got = score_cut(Rule.of("debiased", prior=prior), 0, 0.5, valid, spatial, n0, query=q, key=k, srank=srank)
    att = score_cut(Rule.of("last_token"), 0, 0.5, valid, spatial, n0, query=q, key=k)
    for j, p in enumerate(range(1, 9)):
        assert float(got[0, p]) == pytest.approx(float(att[0, p]) / prior[(j * PRIOR_BINS) // 8])


def test_rule_catalogue_needs_and_layer_zero():
    assert needs("last_token") == {"attention"} and not pre_llm("last_token")
    assert pre_llm("strided") and pre_llm("random") and pre_llm("dedup")
    assert not pre_llm("stratified") and pre_llm("stratified", {"rank": "random"})
    assert at_layer("stratified", 0).get("rank") == "random" and at_layer("diverse", 0).get("seed") == "norm"
    assert at_layer("stratified", 2) == Rule.of("stratified")
    for bad, layer, msg in [(Rule.of("last_token"), 0, "needs attention"), (Rule.of("nope"), 1, "unknown selection rule"),
                            (Rule.of("dedup", pivot=3), 1, "no parameter 'pivot'"),
                            (Rule.of("debiased"), 1, "needs 'prior'"), (Rule.of("stratified", grid=[4, 4]), 1, "grid"),
                            (Rule.of("diverse", seed="x"), 1, "seed='x'")]:
        with pytest.raises(InputError, match=msg):
            check_rule(bad, layer)


def test_schedule_v2_round_trip_and_v1_still_loads(tmp_path):
    s = Schedule(cuts=[Cut(0, 0.8, Rule.of("strided")), Cut(2, 0.4, Rule.of("stratified", grid=[2, 2, 1]))],
                 num_layers=4, policy="x", fingerprint=FP, family="llava3d").validate()
    d = s.to_dict()
    assert d["version"] == 2 and d["cuts"][1]["rule"] == {"name": "stratified", "grid": [2, 2, 1]}
    again = Schedule.from_dict(json.loads(json.dumps(d)))
    assert again.cuts == s.cuts and again.needs() == {"xyz", "attention"}
    v1 = {"schema": "adatoken-compile/schedule", "version": 1, "policy": "adaptive",
          "model": {"fingerprint": FP, "family": "llava3d", "num_layers": 8, "name": None},
          "cuts": [{"layer": 1, "keep": 0.7}, {"layer": 2, "keep": 0.4}],
          "scoring": {"query": "last_token", "keys": "prev_layer_rope", "normalize": "softmax_real_keys",
                      "head_reduction": "mean"}, "positions": "original"}
    old = Schedule.from_dict(v1)
    assert [(c.layer, c.keep, c.rule) for c in old.cuts] == [(1, 0.7, Rule()), (2, 0.4, Rule())]
    v1["scoring"] = {"query": "random", "keys": "none", "normalize": "none", "head_reduction": "none", "seed": 5}
    assert {c.rule for c in Schedule.from_dict(v1).cuts} == {Rule.of("random", seed=5)}
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**d, "cuts": [{"layer": 0, "keep": 0.5, "rule": {"name": "last_token"}}]}))
    with pytest.raises(InputError, match="needs attention"):
        Schedule.load(str(path))


def test_stats_prior_and_old_stats_files(tmp_path):
    import hashlib

    st = CalibrationStats.empty(ARCH, "fp")
    assert st.position_prior(0) is None
    st.arrays["prior_rows"][0] = 2
    st.arrays["prior_frac"][:] = 2 * (2**32) // PRIOR_BINS
    st.arrays["prior_attn"][1, :] = np.linspace(0.5, 1.5, PRIOR_BINS) * 2 * (2**32) / PRIOR_BINS
    prior = st.position_prior(1)
    assert prior[0] == pytest.approx(0.5, abs=1e-5) and prior[-1] == pytest.approx(1.5, abs=1e-5)
    st.save(str(tmp_path))
    # statistics written before the prior existed read with no prior
    with np.load(tmp_path / "stats.npz") as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("prior_")}
    np.savez(tmp_path / "stats.npz", **arrays)
    head = json.loads((tmp_path / "stats.json").read_text())
    head["npz_sha256"] = hashlib.sha256((tmp_path / "stats.npz").read_bytes()).hexdigest()
    (tmp_path / "stats.json").write_text(json.dumps(head))
    assert CalibrationStats.load(str(tmp_path)).position_prior(1) is None


def test_flops_count_the_rule_and_a_cut_before_layer_zero():
    base = Schedule(cuts=[Cut(1, 0.5)], num_layers=4)
    f = {r: schedule_flops(ARCH, base.with_rule(Rule.of(r)), 400, 20)["flops_ratio"] for r in ("last_token", "strided", "dedup")}
    assert f["strided"] < f["last_token"] < f["dedup"]
    pre = schedule_flops(ARCH, Schedule(cuts=[Cut(0, 0.5, Rule.of("strided"))], num_layers=4), 400, 20)
    assert pre["tokens_per_layer"] == [200] * 4 and pre["flops_ratio"] < f["strided"]


class _Measured(solver.ValidationCache):
    """Held-back 'measurements' constructed per rule: the first ``agreed`` of 100 rows agree, so two
    rules differ on exactly |a - b| rows, all one way (significant from 6 on: 2 / 2**6 < 0.05)."""

    def __init__(self, agreed: dict):
        self.agreed, self.calls = agreed, []

    def measure(self, decoder, holdout, schedule, max_disagree=None, against=None):
        key = tuple(c.rule.name for c in schedule.cuts)
        self.calls.append((key, max_disagree))
        a = self.agreed[key]
        tally = solver._Tally(100, max_disagree, against)  # one row a batch
        for row in [True] * a + [False] * (100 - a):
            if tally.add([row], 0.0):
                break
        return tally.measurement()

    def measure_at_cut(self, decoder, holdout, schedules, layer, max_disagree=None, against=None):
        return [self.measure(decoder, holdout, s, max_disagree, against) for s in schedules]


def _constructed():
    st = CalibrationStats.empty(ARCH, "fp")
    st.arrays["samples"][0] = 1
    st.arrays["spatial_tokens_sum"][0] = 400
    st.arrays["text_tokens_sum"][0] = 20
    first = {"strided": 3, "random": 12}
    second = {"stratified": 16, "last_token": 14, "random": 12}
    names = ("last_token", "strided", "stratified", "random", "dedup")
    agreed = {(a, b): 70 + first.get(a, 0) + second.get(b, 0) + (4 if "dedup" in (a, b) else 0)
              for a in names for b in names}
    return st, Schedule(cuts=[Cut(1, 0.5), Cut(2, 0.25)], num_layers=4), names, _Measured(agreed)


def test_solver_keeps_the_cheapest_rule_the_paired_test_cannot_separate_from_the_best():
    st, s, names, fake = _constructed()
    limit = schedule_flops(ARCH, s, 400, 20)["flops_ratio"]
    best, m, trials = solver.choose_rules(None, st, [], s, names, fake, limit)
    # cut 1: random 96 vs strided 87 (9 rows apart: significant) -> random, the best;
    # cut 2 (after random): stratified 98 is best, random 94 only 4 rows behind -> random, the cheaper
    assert [c.rule.name for c in best.cuts] == ["random", "random"] and m["agreed"] == 94
    at2 = {t["rule"]: t for t in trials if t["cut"] == 2 and "agreed" in t}
    assert at2["random"]["chosen"] and at2["random"]["below_best"] == {"margin": 0.04, "p_value": 0.125}
    assert not at2["stratified"]["chosen"] and at2["strided"]["below_best"]["p_value"] < 0.05
    # dedup would agree most, but its pairwise similarity costs more than the budget allows
    assert all(t.get("skipped") for t in trials if t["rule"] == "dedup")
    # under a fidelity target (0.89: 94 of 100 fails, 96 passes) the cheapest passing rule not
    # significantly below the best: last_token (96), 2 rows behind stratified (98)
    best, m, _ = solver.choose_rules(None, st, [], s, names, fake, limit, target=0.89)
    assert [c.rule.name for c in best.cuts] == ["random", "last_token"] and m["agreed"] == 96


def test_a_cut_before_layer_0_replaces_the_schedule_only_when_significantly_better():
    st, s, names, fake = _constructed()
    limit = schedule_flops(ARCH, s, 400, 20)["flops_ratio"]
    best, m, _ = solver.choose_rules(None, st, [], s, names, fake, limit)
    fake.agreed.update({("strided",): 97, ("random",): 98})  # 3 and 4 rows above 94: not significant
    pre, m2, more = solver.choose_pre_llm(None, st, [], best, m, ["strided", "random", "last_token"], fake, limit)
    assert pre is best and not any(t["chosen"] for t in more)
    assert {t["rule"] for t in more} == {"strided", "random"}  # last_token cannot run before layer 0
    fake.agreed.update({("strided",): 90, ("random",): 100})  # 6 rows above the schedule, 10 above strided
    pre, m2, more = solver.choose_pre_llm(None, st, [], best, m, ["strided", "random", "last_token"], fake, limit)
    assert [(c.layer, c.rule.name) for c in pre.cuts] == [(0, "random")] and m2["agreed"] == 100
    # a schedule disagreeing on 5 rows cannot be beaten at 0.05 (2 / 2**5 = 0.0625): nothing is run
    calls = len(fake.calls)
    five = {**m, "agreed": 95, solver.ROW_KEY: [True] * 95 + [False] * 5}
    pre, _, more = solver.choose_pre_llm(None, st, [], best, five, ["strided", "random"], fake, limit)
    assert pre is best and len(fake.calls) == calls and all(t["skipped"] for t in more)
    assert not solver.out_of_reach([], m[solver.ROW_KEY]) and solver.out_of_reach([], five[solver.ROW_KEY])
    assert schedule_flops(ARCH, pre, 400, 20)["flops_ratio"] <= limit + 1e-3


def test_paired_test_matches_a_hand_computed_case():
    a = [True] * 10 + [False] * 2 + [True] * 50 + [False] * 8
    b = [False] * 10 + [True] * 2 + [True] * 50 + [False] * 8
    t = solver.paired_test(a, b)
    # 10 wins, 2 losses: two-sided sign test 2 * (C(12,0) + C(12,1) + C(12,2)) / 2**12 = 158 / 4096
    assert (t["wins"], t["losses"], t["rows"]) == (10, 2, 70) and t["p_value"] == pytest.approx(158 / 4096)
    assert t["margin"] == pytest.approx(8 / 70) and t["significant"]
    lo, hi = t["ci95"]
    assert 0 < lo < 8 / 70 < hi
    back = solver.paired_test(b, a)  # swapping the two negates the margin and its interval
    assert back["p_value"] == t["p_value"] and back["ci95"] == pytest.approx([-hi, -lo])
    # 5 wins and no loss: p = 2 / 32, not significant; the exact lower end of the wins' share is
    # 0.025 ** (1/5), so the margin's interval is 5/100 * (2 * 0.025 ** 0.2 - 1) .. 5/100
    t = solver.paired_test([True] * 100, [False] * 5 + [True] * 95)
    assert t["p_value"] == pytest.approx(0.0625) and not t["significant"]
    assert t["ci95"] == pytest.approx([0.05 * (2 * 0.025 ** 0.2 - 1), 0.05])
    assert solver.clopper_pearson(3, 10) == pytest.approx((0.0667, 0.6525), abs=1e-4)  # tabulated
    assert solver.paired_test([True, False], [True, False])["ci95"] == [0.0, 0.0]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 120), st.floats(0.5, 1.0))
def test_out_of_reach_is_the_best_case_and_no_completion_beats_it(seed, n, rate):
    rng = np.random.default_rng(seed)
    against = (rng.random(n) < rate).tolist()
    ran = int(rng.integers(0, n + 1))
    prefix = (rng.random(ran) < rng.uniform(0.5, 1.0)).tolist()
    best = solver.paired_test(prefix + [True] * (n - ran), against)  # every remaining row agreeing
    reach = best["significant"] and best["margin"] > 0
    assert solver.out_of_reach(prefix, against) == (not reach)
    if not reach:
        for _ in range(20):
            t = solver.paired_test(prefix + (rng.random(n - ran) < rng.uniform(0.5, 1.0)).tolist(), against)
            assert not (t["significant"] and t["margin"] > 0)


def _tallied(vecs, batch, stop_at):
    """A measure(indices, against) over constructed per-row vectors, ``batch`` rows at a time."""
    def measure(idx, against):
        out = []
        for i in idx:
            tally = solver._Tally(len(vecs[i]), stop_at, against)
            for s in range(0, len(vecs[i]), batch):
                if tally.add(vecs[i][s:s + batch], 0.0):
                    break
            out.append(tally.measurement())
        return out
    return measure


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.integers(0, 2**32 - 1), st.integers(73, 240), st.integers(2, 6), st.integers(1, 9),
       st.sampled_from([None, 0.8, 0.9]))
def test_curtailed_candidates_never_change_the_paired_choice(seed, n, k, batch, target):
    # rules at one cut share most of their agreeing rows; each differs on a few with its own rate
    rng = np.random.default_rng(seed)
    base = rng.random(n)
    vecs = []
    for _ in range(k):
        p = rng.uniform(0.75, 1.0)
        own = rng.random(n) < rng.uniform(0.0, 0.2)
        vecs.append(np.where(own, rng.random(n) < p, base < p).tolist())
    stop_at = solver.max_disagreements(n, target) if target is not None else None
    measure = _tallied(vecs, batch, stop_at)
    cands = list(range(k))
    full = measure(cands, None)
    want, _ = solver.pick(full, target)
    ms, got, _ = solver.pick_curtailed(cands, measure, target)
    assert got == want
    for m, f in zip(ms, full):
        assert m[solver.ROW_KEY] == f[solver.ROW_KEY][:m["rows"]]
        assert m == f or m.get("curtailed") and m["rows"] < n and got == 0


def test_candidates_stop_once_they_cannot_agree_significantly_more_than_the_first():
    first = [True] * 90 + [False] * 10
    mid = [False] * 5 + [True] * 95  # 5 losses in the first batch of 10: 10 wins at best, p = 0.30
    ms, k, _ = solver.pick_curtailed([0, 1], _tallied([first, mid], 10, None))
    assert k == 0 and ms[1]["rows"] == 10 and ms[1]["curtailed"] and ms[1]["stopped"]
    # the last wins all 10 of the first's disagreements (p = 0.002): the first is out, and the
    # curtailed candidate, run in full, is only 5 rows below the best (p = 0.06): it is chosen
    ms, k, _ = solver.pick_curtailed([0, 1, 2], _tallied([first, mid, [True] * 100], 10, None))
    assert k == 1 and ms[1]["rows"] == 100 and not ms[1].get("stopped")
    # a first that fails the target (90 of 100 shows >= 0.83) is no yardstick: nothing is curtailed
    ms, k, _ = solver.pick_curtailed([0, 1], _tallied([first, mid], 10, None), target=0.85)
    assert k == 1 and ms[1]["rows"] == 100


def test_shared_prefix_measures_as_the_schedules_alone():
    from conftest import make_batch, tiny_decoder

    model = tiny_decoder("qwen2", "sdpa", layers=4)
    hold = [make_batch([(3, 30, 4), (2, 24, 3)], seed=i) for i in range(2)]
    scheds = [Schedule(cuts=[Cut(1, 0.6, Rule.of("strided")), Cut(2, 0.3, Rule.of(r))], num_layers=4)
              for r in ("random", "strided", "last_token", "text_tail")]
    shared = solver.ValidationCache().measure_at_cut(model, hold, scheds, 2)
    for sch, m in zip(scheds, shared):
        alone = solver.ValidationCache().measure(model, hold, sch)
        assert m[solver.ROW_KEY] == alone[solver.ROW_KEY] and m["kl"] == pytest.approx(alone["kl"], rel=1e-5, abs=1e-7)
    assert len({round(m["kl"], 9) for m in shared}) > 1  # the rules do differ


def test_rules_stopped_within_a_round_of_ranks_count_as_in_one_process(monkeypatch):
    """Under torchrun every rank computes its batch of a round before any is counted, so a rule that
    stops on the round's first batch comes back from the others' too: those rows are not counted
    (one process never ran them) and the rule stays stopped."""
    from adatoken_compile import distributed

    from conftest import make_batch, tiny_decoder

    model = tiny_decoder("qwen2", "sdpa", layers=4)
    hold = [make_batch([(3, 60, 4), (3, 50, 3)], seed=30 + i) for i in range(6)]
    scheds = [Schedule(cuts=[Cut(1, 0.6, Rule.of("strided")), Cut(2, 0.1, Rule.of(r))], num_layers=4)
              for r in ("random", "strided", "last_token")]
    one = solver.ValidationCache().measure_at_cut(model, hold, scheds, 2, max_disagree=0)
    # the case under test: rules stop on the first batch of a round while another runs on
    assert [m["rows"] for m in one] == [2, 12, 2] and one[0]["stopped"] and not one[1].get("stopped")

    def two_ranks(items, fn):  # rounds of two items, both computed before either is yielded
        for k in range(0, len(items), 2):
            yield from [fn(item) for item in items[k:k + 2]]

    monkeypatch.setattr(distributed, "in_order", two_ranks)
    assert solver.ValidationCache().measure_at_cut(model, hold, scheds, 2, max_disagree=0) == one


def test_calibrate_compares_the_default_rules_and_reports_the_random_control(tmp_path):
    from adatoken_compile.calibration.api import calibrate, write_calibration

    from conftest import make_batch, tiny_decoder

    model = tiny_decoder("qwen2", "sdpa", layers=4)
    data = [make_batch([(3, 30, 4), (2, 24, 3)], seed=i) for i in range(8)]
    names = ("last_token", "strided", "random")
    s, _ = calibrate(model, data, policy="adaptive", flops_budget=0.6, holdout=6, progress=False, rules=names)
    trials = s.calibration["rules"]["trials"]
    assert {t["rule"] for t in trials} >= {"strided", "random"} and any(t["cut"] == 0 for t in trials)
    assert s.predicted["flops_ratio"] <= 0.6 + solver.RULE_FLOPS_SLACK
    # without rules: the default set, the controls and the cheap attention rules among them
    assert {"random", "strided", "last_token", "text_tail"} <= set(solver.DEFAULT_RULES)
    d, stats = calibrate(model, data, policy="adaptive", flops_budget=0.6, holdout=6, progress=False)
    assert tuple(d.calibration["rules"]["considered"]) == solver.DEFAULT_RULES
    assert {t["rule"] for t in d.calibration["rules"]["trials"]} >= {"random", "strided", "last_token", "text_tail"}
    ctrl = d.calibration["random_control"]
    assert ctrl["rows"] == 6 and ctrl["ci95"][0] <= ctrl["margin"] <= ctrl["ci95"][1]
    assert ctrl["margin"] == pytest.approx(d.calibration["fidelity"]["agreement"] - ctrl["agreement"], abs=1e-5)
    write_calibration(str(tmp_path / "cal"), d, stats)
    assert "random tokens at the same counts" in (tmp_path / "cal" / "report.md").read_text()
    # a budget no in-LLM cut reaches (layer 0 alone is a quarter of it) is met before layer 0
    s2, _ = calibrate(model, data, policy="adaptive", flops_budget=0.3, holdout=6, progress=False, rules=names)
    assert [c.layer for c in s2.cuts] == [0] and s2.predicted["flops_ratio"] <= 0.3 + 1e-3
    with pytest.raises(InputError, match="unreachable"):
        calibrate(model, data, policy="adaptive", flops_budget=0.3, holdout=6, progress=False, rules=("last_token",))
    with pytest.raises(InputError, match="even before layer 0"):  # the text tokens alone cost more
        calibrate(model, data, policy="adaptive", flops_budget=0.1, holdout=6, progress=False, rules=names)
