"""``--policy adaptive``: choose cut layers and keep ratios from calibration statistics.

1. Proxy. For a schedule with keep ratio ``r_l`` at layer ``l`` whose tokens were chosen at the
   latest cut ``c <= l`` (scored by layer ``c-1``, the run-time rule), the predicted retained
   information flow at layer ``l`` is ``m_l = retained_flow[c-1, l, r_l]`` from the stats (the
   share of the last token's head-mean spatial flow kept by those tokens in the UNPRUNED model).
   The proxy loss is ``sum_l w_l (1 - m_l)`` with ``w_l`` = the last token's mean flow share on
   spatial tokens at layer ``l`` divided by the number of layers (0 = lossless, at most 1).
2. Candidates. A dynamic programme over layers (state: cuts used, current ratio on the grid,
   last cut layer) minimises ``flops_ratio + lambda * loss`` for a sweep of lambdas; the distinct
   optima form a FLOPs/loss Pareto frontier (non-increasing ratios by construction).
3. Validation. Candidates are run end to end (pruned prefill) on held-back samples and compared
   with the unpruned model: agreement = share of rows whose greedy next token is unchanged.
   A candidate meets a fidelity target T when the lower end of its agreement's 95% Wilson interval
   is >= T (``passes``), not its point estimate: the search picks the cheapest candidate that
   passes, and with a point estimate it picks the luckiest one (on an earlier bundled model, a
   schedule chosen at 0.958 on 96 rows agreed on 0.917 of 480 other rows and changed 11% of 500
   test answers).
   Fidelity target: bisection along the frontier for the cheapest candidate meeting it, then
   bisection on the FLOPs budget between it and the failing candidate below it (``fill_budget``
   schedules), while validations remain and the gap exceeds ``REFINE_GAP``; then the same on each
   first-cut layer's own frontier (``propose(first_layer=f)``, f = 2, 3, ...) below the choice so
   far (the proxy can prefer one shape throughout). A candidate's run stops
   once more rows disagree than the target allows (``max_disagreements``); the identity is not run.
   FLOPs budget: one candidate per first-cut layer within the budget, best measured agreement wins.
4. Rules (``rules``; default ``DEFAULT_RULES``: random, strided, last_token, text_tail, dedup). At
   the chosen cuts, cut by cut from the first, the cut's own rule and every rule of the set that can
   run there (and whose schedule stays within the chosen FLOPs plus ``RULE_FLOPS_SLACK``, which
   leaves dedup out of most budgets) are measured on the same held-back rows; the rows before the
   cut's layer run once per batch and branch there. Two rules on the same rows differ only where
   one agrees and the other does not, so the choice is a paired one (:func:`pick`): the cheapest
   rule (random and strided before the attention rules) that the exact McNemar test on those
   discordant rows does not put significantly below the most agreeing rule; under a fidelity
   target only rules whose agreement still passes it. An attention rule is thus kept only where it
   beats the controls by more than chance. ``debiased`` takes its per-position prior from the
   statistics. Then a single cut before layer 0 at the same prefill FLOPs per rule that can run
   there, chosen over the in-LLM schedule only when significantly better by the same test (not run
   when the schedule disagrees on fewer than 6 rows: no rule can then win at 0.05); a FLOPs budget out of the in-LLM cuts' reach (layer 0 alone costs 1/L of the prefill) is met
   before layer 0. Both choices run fewer rows for the same result (:func:`pick_curtailed`): the
   cheapest rule (or the schedule) runs every row, and another stops once it could not agree
   significantly more even by winning every remaining row the first disagrees on
   (:func:`out_of_reach`), since the first is then kept whatever it does; when one does agree
   significantly more, the stopped ones run in full.
5. Control. The chosen schedule is compared, on the same rows, with random tokens at its counts
   (``calibrate --policy random --like``): its paired margin, exact interval and p-value are
   written to ``calibration.random_control``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import binomtest
import torch

from adatoken_compile import distributed
from adatoken_compile.compiler.executor import PrefillExecutor, full_logits, pruned_prefill
from adatoken_compile.contract import DecoderInputs
from adatoken_compile.errors import InputError
from adatoken_compile.flops import FORMULA, drop_flops, layer_flops, prefill_flops, schedule_flops
from adatoken_compile.schedule import Cut, Schedule
from adatoken_compile.selection import RULES, Rule, at_layer, drop_cost, pre_llm
from adatoken_compile.calibration.defaults import DEFAULT_RULES
from adatoken_compile.calibration.policies import DEFAULT_FIDELITY, keep_for_flops
from adatoken_compile.calibration.stats import CalibrationStats

# Memory for the held-back rows' states after layer 0: every candidate that cuts at layer 1 or
# later starts there, so layer 0 runs once per row instead of once per candidate (about a quarter
# of a validation on the bundled model). Rows beyond it run from the start, with the same results.
PREFIX_CACHE_BYTES = 3 << 30
REFINE_GAP = 0.02  # FLOPs-ratio gap below which the fidelity search stops refining
# a rule may cost this much more of the unpruned prefill FLOPs than the schedule it replaces
# (text_tail's extra query rows: about 0.002 per cut on the bundled model; dedup's pairwise
# similarity, 0.04 there, is a different budget)
RULE_FLOPS_SLACK = 0.005
Z95 = 1.96  # two-sided 95% normal quantile of the Wilson interval
# a rule (or a cut before layer 0) replaces a cheaper one only when the paired test on the held-back
# rows says it agrees more at this level (two-sided)
PAIRED_ALPHA = 0.05


# ---------------------------------------------------------------------- forwards
def reference_logits(decoder, inputs: DecoderInputs) -> torch.Tensor:
    """Unpruned next-token logits (B, vocab) at the last position."""
    return full_logits(decoder, inputs)


def _run_pruned(decoder, inputs: DecoderInputs, schedule: Schedule, start: PrefillExecutor | None = None) -> torch.Tensor:
    """Pruned prefill next-token logits (B, vocab): the same pruning the compiled graph performs.
    ``start``: the batch's unpruned state after layer 0, for a schedule whose first cut is later."""
    if start is not None:
        return _run_from(start, schedule)
    return pruned_prefill(decoder, inputs, schedule).logits_last.float().cpu()


class LayerZeroStates:
    """The held-back batches' unpruned states after layer 0, computed on first use and kept while
    they fit in ``budget`` bytes; the first that does not fit is used once, later ones not computed."""

    def __init__(self, n_batches: int, budget: int = PREFIX_CACHE_BYTES):
        self.flows: list = [None] * n_batches
        self.full = False
        self.used, self.budget = 0, budget

    @torch.no_grad()
    def get(self, i: int, decoder, batch: DecoderInputs) -> PrefillExecutor | None:
        if self.flows[i] is None and not self.full:
            flow = PrefillExecutor(decoder, batch, materialize_mask=True)
            flow.layer(observe=True)  # the query too: a cut at layer 1 may rank by attention
            flow = flow.stored()
            size = flow.nbytes()
            if self.used + size > self.budget:
                self.full = True
                return flow  # computed already: this run starts from it, none after
            self.flows[i], self.used = flow, self.used + size
        return self.flows[i]


@torch.no_grad()
def _run_from(flow: PrefillExecutor, schedule: Schedule) -> torch.Tensor:
    return flow.resume().run(schedule).result().logits_last.float().cpu()


def _compare(decoder, schedule: Schedule, batch: DecoderInputs, ref: torch.Tensor,
             start: PrefillExecutor | None = None) -> tuple[list, float]:
    """Per row of one held-back batch: does the pruned model's next token agree; and the batch's KL sum."""
    return score(_run_pruned(decoder, batch, schedule, start), ref)


def score(lg: torch.Tensor, ref: torch.Tensor) -> tuple[list, float]:
    """Per row: do the pruned logits ``lg`` pick the unpruned ``ref``'s next token; and their KL sum."""
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(lg, -1)
    return (lg.argmax(-1) == ref.argmax(-1)).tolist(), float((lp.exp() * (lp - lq)).sum(-1).sum())


def agreement(decoder, holdout: Sequence[DecoderInputs], refs: Sequence[torch.Tensor], schedule: Schedule,
              max_disagree: int | None = None, states: LayerZeroStates | None = None,
              against=None) -> dict:
    """Greedy next-token agreement (and mean KL) of the pruned vs unpruned model on ``holdout``.
    ``max_disagree``: stop after the batch where more rows than this disagree (the schedule has
    failed a fidelity target whatever the rest do); the result then says ``stopped`` and counts
    only the rows run. Under torchrun ``holdout`` is this rank's share, and the batches' counts are
    taken in one process's order, so every rank stops at the same batch with the same numbers.
    ``states``: the batches' :class:`LayerZeroStates`, from which a schedule whose first cut is at
    layer 1 or later starts (same numbers, one layer fewer per batch).
    ``against``: another schedule's per-row agreement on all rows; stop (``curtailed``) once this one
    cannot agree significantly more than it (:func:`out_of_reach`)."""
    tally = _Tally(distributed.total(sum(b.batch_size for b in holdout)), max_disagree, against)
    cuts = schedule.effective_cuts()
    from_layer_1 = states is not None and bool(cuts) and min(c.layer for c in cuts) >= 1

    def compare(item):
        i, batch, ref = item
        return _compare(decoder, schedule, batch, ref, states.get(i, decoder, batch) if from_layer_1 else None)

    for hit, kl_batch in distributed.in_order(list(zip(range(len(holdout)), holdout, refs)), compare):
        if tally.add(hit, kl_batch):
            break
    return tally.measurement()


class _Tally:
    """One validation's running count over held-back batches: per-row agreement, the KL sum, and
    whether its run can stop: it has failed (more rows disagree than ``max_disagree``: the rest
    cannot save it), or it can no longer agree significantly more than ``against`` (``curtailed``)."""

    def __init__(self, n_rows: int, max_disagree: int | None, against=None):
        self.n_rows, self.max_disagree, self.against = n_rows, max_disagree, against
        self.rows: list[bool] = []
        self.kl, self.disagree, self.stopped, self.curtailed = 0.0, 0, False, False

    def add(self, hit: list, kl_batch: float) -> bool:
        """Count one batch; True once the validation can stop."""
        self.rows += hit
        self.kl += kl_batch
        self.disagree += len(hit) - sum(hit)
        failed = self.max_disagree is not None and self.disagree > self.max_disagree
        left = len(self.rows) < self.n_rows
        self.curtailed = not failed and left and self.against is not None and out_of_reach(self.rows, self.against)
        self.stopped = (failed or self.curtailed) and left
        return failed or self.curtailed

    def measurement(self) -> dict:
        out = _measurement(self.rows, self.kl, self.stopped)
        return {**out, "curtailed": True} if self.curtailed else out


def _measurement(rows: list, kl: float, stopped: bool = False) -> dict:
    """A validation's numbers from its per-row agreement and KL sum."""
    same, total = sum(rows), len(rows)
    out = {"agreement": same / max(1, total), "kl": kl / max(1, total), "rows": total, "agreed": same,
           "ci95": [round(x, 4) for x in wilson_interval(same, total)], ROW_KEY: list(rows)}
    if stopped:
        out["stopped"] = True
    return out


ROW_KEY = "per_row"  # per held-back row: did the next token agree (kept for the stability check, not written)


def public(measured: dict) -> dict:
    """A measurement as written to schedule.json (without the per-row vector)."""
    return {k: v for k, v in measured.items() if k != ROW_KEY}


def stability(candidates: list, chosen, target: float | None, n_rows: int, resamples: int = 1000,
              seed: int = 0) -> dict:
    """How stable the choice is: the search's decision replayed on bootstrap resamples of the
    held-back rows, over the candidates it measured (per-row agreements). A candidate stopped
    early is resampled from the rows it ran. With a fidelity ``target`` the replayed choice is the
    cheapest candidate that passes (the unpruned model always does); without one, the best
    agreement. Reports how often the actual choice is replayed and the spread of the FLOPs cut."""
    rng = np.random.default_rng(seed)
    cands = sorted([c for c in candidates if c.measured is not None and c.measured.get(ROW_KEY) is not None],
                   key=lambda c: c.flops_ratio)
    vecs = [np.asarray(c.measured[ROW_KEY], dtype=bool) for c in cands]
    picks = []
    for _ in range(resamples):
        idx = rng.integers(0, n_rows, n_rows)
        best, best_key = None, None
        for c, v in zip(cands, vecs):
            sub = idx[idx < len(v)]
            k = int(round(v[sub].mean() * n_rows)) if len(sub) else 0
            if target is not None:
                if wilson_interval(k, n_rows, Z95)[0] >= target - 1e-12:
                    best = c
                    break
            elif best_key is None or k > best_key:
                best, best_key = c, k
        picks.append(best)
    cuts = [1.0 - (p.flops_ratio if p is not None else 1.0) for p in picks]
    same = sum(p is not None and p.cuts == chosen.cuts for p in picks) / resamples
    share: dict = {}
    for p in picks:
        key = ", ".join(f"L{c.layer}:{c.keep:.3g}" for c in p.cuts) if p is not None and p.cuts else "none"
        share[key] = share.get(key, 0) + 1 / resamples
    lo, hi = np.percentile(cuts, [5, 95])
    return {
        "method": f"bootstrap of the {n_rows} held-back rows ({resamples} resamples), replaying the choice among "
                  f"the {len(cands)} measured candidates",
        "chosen_share": round(same, 4),
        "flops_cut_p5_p95": [round(float(lo), 4), round(float(hi), 4)],
        "choices": {k: round(v, 4) for k, v in sorted(share.items(), key=lambda kv: -kv[1])},
        "summary": f"replayed in {100 * same:.0f}% of {resamples} bootstrap resamples of the {n_rows} held-back rows; "
                   f"prefill FLOPs cut {100 * lo:.1f}%-{100 * hi:.1f}% (5th-95th percentile)",
    }


class ValidationCache:
    """Reference logits and measured agreements on one held-back set, shared by several solves of
    one decoder (the quickstart solves four times on the same 384 rows: computing the references once
    and measuring each schedule once saves most of the validation time). Keyed by the decoder and
    the held-back batches' contents, so a different set or model starts afresh."""

    def __init__(self, prefix_bytes: int = PREFIX_CACHE_BYTES):
        self.key, self.refs, self.measured, self.states = None, None, {}, None
        self.prefix_bytes = prefix_bytes

    def refs_for(self, decoder, holdout: Sequence[DecoderInputs]) -> list:
        key = (id(decoder),) + tuple((tuple(b.inputs_embeds.shape), float(b.inputs_embeds.double().sum()),
                                      int(b.attention_mask.sum()), int(b.spatial_mask.sum())) for b in holdout)
        if distributed.any_true(key != self.key):  # every rank forgets its measurements alike
            self.key, self.refs, self.measured = key, self.references(decoder, holdout), {}
            self.states = LayerZeroStates(len(holdout), self.prefix_bytes)
        return self.refs

    def references(self, decoder, holdout: Sequence[DecoderInputs]) -> list:
        """The unpruned next-token logits of every held-back batch (an engine may run them otherwise)."""
        return [reference_logits(decoder, b) for b in holdout]

    def agreement(self, decoder, holdout, refs, schedule: Schedule, max_disagree: int | None, against=None) -> dict:
        """``agreement`` of one schedule (an engine may run its prefills otherwise)."""
        return agreement(decoder, holdout, refs, schedule, max_disagree, self.states, against=against)

    def measure(self, decoder, holdout, schedule: Schedule, max_disagree: int | None = None, against=None) -> dict:
        """Agreement of ``schedule`` (see ``agreement``); a measurement that stopped early answers only
        requests that would have stopped there too (a fidelity search), others measure all rows."""
        cuts = _key(schedule)
        if self._stale(cuts, max_disagree):
            refs = self.refs_for(decoder, holdout)
            self.measured[cuts] = self.agreement(decoder, holdout, refs, schedule, max_disagree, against)
        return dict(self.measured[cuts])

    def measure_all(self, decoder, holdout, schedules: list, max_disagree: int | None = None, against=None,
                    until=None) -> list:
        """:meth:`measure` of each of ``schedules`` in order, ending after the first whose measurement
        satisfies ``until`` (None: none ends it); the measurements made, in order. An engine may run
        them together (it then measures the ones after that first too, and keeps them)."""
        return _until((self.measure(decoder, holdout, s, max_disagree, against) for s in schedules),
                      until)

    def _stale(self, key, max_disagree: int | None) -> bool:
        have = self.measured.get(key)
        return have is None or (have.get("stopped") and (max_disagree is None or have["rows"] - have["agreed"] <= max_disagree))

    def measure_at_cut(self, decoder, holdout, schedules: list, layer: int, max_disagree: int | None = None,
                       against=None) -> list:
        """Agreements of ``schedules`` that share every cut before ``layer`` and differ from there
        on (the rules of one cut): each held-back batch runs the shared layers once and branches at
        ``layer`` (same numbers as :meth:`measure` per schedule). ``max_disagree`` and ``against`` as
        in ``agreement``, per schedule. A schedule already measured on every row is not run again."""
        todo = [k for k, sch in enumerate(schedules) if self._stale(_key(sch), max_disagree)]
        if todo:
            refs = self.refs_for(decoder, holdout)
            prefix = Schedule(cuts=[c for c in schedules[0].cuts if c.layer < layer], num_layers=schedules[0].num_layers)
            from_layer_1 = layer >= 1 and all(c.layer >= 1 for c in prefix.effective_cuts())
            n_rows = distributed.total(sum(b.batch_size for b in holdout))
            tallies = {k: _Tally(n_rows, max_disagree, against) for k in todo}
            active = list(todo)

            @torch.no_grad()
            def compare(item):
                i, batch, ref = item
                start = self.states.get(i, decoder, batch) if from_layer_1 else None
                flow = start.resume() if start is not None else PrefillExecutor(decoder, batch, materialize_mask=True)
                if flow.next_layer < layer:  # the shared layers, the last one observed for an attention rule
                    flow.run(prefix, until=layer - 1)
                    flow.run(prefix, until=layer, observe_all=True)
                return {k: score(flow.branch().run(schedules[k]).logits().float().cpu(), ref) for k in active}

            for out in distributed.in_order(list(zip(range(len(holdout)), holdout, refs)), compare):
                # the ranks compute a round's batches before any is counted: a schedule stopped on an
                # earlier batch of the round comes back from the later ones, uncounted as in one process
                for k, (hit, kl_batch) in out.items():
                    if k in active and tallies[k].add(hit, kl_batch):
                        active.remove(k)
                if not active:
                    break
            for k in todo:
                self.measured[_key(schedules[k])] = tallies[k].measurement()
        return [dict(self.measured[_key(sch)]) for sch in schedules]


def _until(measurements, until) -> list:
    """``measurements`` up to and including the first that satisfies ``until`` (None: all)."""
    out = []
    for m in measurements:
        out.append(m)
        if until is not None and until(m):
            break
    return out


def _key(schedule: Schedule) -> tuple:
    return tuple((c.layer, round(float(c.keep), 9), c.rule) for c in schedule.cuts)


def passes(measured: dict, target: float) -> bool:
    """Does a validated candidate meet the fidelity target? The lower end of the 95% Wilson interval
    of its agreement must reach it (computed from the counts, not the rounded ``ci95``); a
    measurement stopped early has failed."""
    if measured.get("stopped"):
        return False
    n = int(measured["rows"])
    k = int(measured.get("agreed", round(measured["agreement"] * n)))
    return wilson_interval(k, n, Z95)[0] >= target - 1e-12


def min_rows(target: float) -> int:
    """Fewest held-back rows on which a schedule can pass ``target`` at all (every row agreeing:
    the Wilson lower end n / (n + z^2) >= target)."""
    if target >= 1.0:
        raise InputError("calibrate: fidelity target 1 cannot be shown on a finite held-back set; "
                         "use --policy none for the unpruned model, or a target below 1 such as 0.99")
    return math.ceil(target * Z95 * Z95 / (1.0 - target) - 1e-9)


def max_disagreements(n_rows: int, target: float) -> int:
    """Most rows of ``n_rows`` that may disagree for a schedule to still pass ``target`` (-1: none
    can pass): on 384 rows at 0.95, 10."""
    k = n_rows
    while k >= 0 and wilson_interval(k, n_rows, Z95)[0] >= target - 1e-12:
        k -= 1
    return n_rows - (k + 1)


def require_rows(n_rows: int, target: float, where: str = "calibrate") -> None:
    """One-line error unless ``n_rows`` held-back rows can show ``target`` at all (``min_rows``)."""
    need = min_rows(target)
    if n_rows < need:
        lo = wilson_interval(n_rows, n_rows)[0]
        raise InputError(
            f"{where}: {n_rows} held-back rows cannot show agreement >= {target} (even all {n_rows} agreeing "
            f"only shows >= {lo:.3f} at 95% confidence); hold back at least {need} rows (--holdout {need}) "
            f"or lower --fidelity"
        )


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (how far a held-back agreement can be trusted:
    16 rows that all agree still allow 0.81)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def clopper_pearson(k: int, n: int, alpha: float = PAIRED_ALPHA) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided ``1 - alpha`` interval of a proportion k/n."""
    if n <= 0:
        return 0.0, 1.0
    ci = binomtest(k, n).proportion_ci(1 - alpha, method="exact")
    return float(ci.low), float(ci.high)


def paired_test(a_rows, b_rows, alpha: float = PAIRED_ALPHA) -> dict:
    """Paired comparison of two schedules on the same held-back rows (per row: did it agree with
    the unpruned model). Only the discordant rows carry information: ``wins`` (a agrees, b not) and
    ``losses``; under "equally good" each discordant row is a fair coin, so the exact McNemar test is
    a two-sided sign test on them. ``margin`` = (wins - losses) / rows, the difference of the two
    agreements; ``ci95``: the exact (Clopper-Pearson) interval of the wins' share of the discordant
    rows, scaled to a margin (conditional on the discordant count). For a fair coin the test is
    significant at ``alpha`` exactly when that interval excludes 0."""
    a, b = np.asarray(a_rows, dtype=bool), np.asarray(b_rows, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired_test: {a.shape[0]} rows vs {b.shape[0]}: a paired test needs the same rows")
    n = int(a.shape[0])
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    d = wins + losses
    p = sign_test_p(wins, losses)
    lo, hi = clopper_pearson(wins, d, alpha) if d else (0.5, 0.5)
    scale = d / n if n else 0.0
    return {"rows": n, "wins": wins, "losses": losses, "margin": (wins - losses) / n if n else 0.0,
            "ci95": [scale * (2 * lo - 1), scale * (2 * hi - 1)], "p_value": p, "significant": p < alpha}


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar) on ``wins`` vs ``losses`` discordant rows."""
    d = wins + losses
    return float(binomtest(wins, d).pvalue) if d else 1.0


def out_of_reach(rows, against, alpha: float = PAIRED_ALPHA) -> bool:
    """Can a schedule that agreed as ``rows`` on the first held-back rows no longer agree
    significantly more than ``against`` (measured on all of them), whatever its other rows do? At
    best it wins every remaining row that ``against`` disagrees on and loses no other; fewer wins or
    more losses only raise the sign test's p-value."""
    a, r = np.asarray(against, dtype=bool), np.asarray(rows, dtype=bool)
    wins = int((r & ~a[:len(r)]).sum() + (~a[len(r):]).sum())
    losses = int((~r & a[:len(r)]).sum())
    return not (wins > losses and sign_test_p(wins, losses) < alpha)


def paired_summary(t: dict, what: str) -> str:
    """One line of a :func:`paired_test` result."""
    lo, hi = t["ci95"]
    return (f"{100 * t['margin']:+.1f} points of agreement over {what} (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}; "
            f"exact McNemar p={t['p_value']:.3g}, {t['wins']} vs {t['losses']} discordant of {t['rows']} rows)")


# ---------------------------------------------------------------------- proxy + DP
def _weights(stats: CalibrationStats, proxy: str) -> np.ndarray:
    w = np.nan_to_num(stats.spatial_share("last", "flow" if proxy == "flow" else "attn").mean(axis=1))
    return w / stats.arch["num_layers"]


def predicted_loss(stats: CalibrationStats, schedule: Schedule, proxy: str = "flow") -> float:
    """Proxy loss of any schedule (ratios between grid points are interpolated)."""
    ret = np.nan_to_num(stats.retained(proxy), nan=0.0)
    w = _weights(stats, proxy)
    grid = np.asarray(stats.ratios)
    src, keep, loss = None, 1.0, 0.0
    cuts = {c.layer: c.keep for c in schedule.effective_cuts()}
    for l in range(schedule.num_layers):
        if l in cuts:
            src, keep = l - 1, cuts[l]
        if src is None or keep >= 1.0:
            continue
        m = float(np.interp(keep, grid, ret[src, l])) if keep >= grid[0] else float(ret[src, l, 0]) * keep / grid[0]
        loss += w[l] * (1.0 - m)
    return float(loss)


@dataclass
class Candidate:
    cuts: list
    flops_ratio: float
    loss: float
    measured: dict | None = None

    def schedule(self, num_layers: int) -> Schedule:
        return Schedule(cuts=list(self.cuts), num_layers=num_layers, policy="adaptive")

    def summary(self) -> dict:
        d = {"cuts": [[c.layer, c.keep] for c in self.cuts], "flops_ratio": round(self.flops_ratio, 5), "proxy_loss": round(self.loss, 6)}
        if self.measured:
            d.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in public(self.measured).items()})
        return d


def propose(stats: CalibrationStats, *, max_cuts: int | None = 4, proxy: str = "flow",
            lambdas: Sequence[float] | None = None, first_layer: int = 1) -> list[Candidate]:
    """Pareto frontier (FLOPs ratio ascending, loss descending) of DP-optimal schedules whose
    cuts all sit at layer ``first_layer`` or deeper."""
    arch = stats.arch
    L = arch["num_layers"]
    if stats.arrays["retained_rows"][0] == 0:
        raise InputError("solver: the calibration statistics hold no sample with spatial tokens; calibrate on data with spatial tokens")
    grid = [float(r) for r in stats.ratios]
    if grid[-1] != 1.0:
        raise InputError("solver: the stats ratio grid must end with 1.0")
    R = len(grid)
    K = (L - 1) if max_cuts is None else max(0, min(int(max_cuts), L - 1))
    N = max(1, int(round(stats.mean_spatial_tokens())))
    nt = int(round(stats.mean_text_tokens()))
    full = prefill_flops(arch, nt, [N] * L)["total"]
    cnt = [Schedule.keep_count(r, N, N) for r in grid]
    cost = np.array([sum(layer_flops(arch, nt + s)) / full for s in cnt])  # (R,)
    drop = np.full((R, R), np.inf)
    for a in range(R):
        for b in range(a):
            drop[a, b] = drop_flops(arch, nt + cnt[a], cnt[a], cnt[b]) / full
    ret = np.nan_to_num(stats.retained(proxy), nan=0.0)  # [src, dst, r]
    w = _weights(stats, proxy)
    # loss_tab[l, r, c]: loss at layer l with ratio r whose latest cut was at layer c (c=0: none)
    loss_tab = np.zeros((L, R, L))
    for l in range(L):
        for c in range(L):
            if 1 <= c <= l:  # c = 0 (no cut yet, ratio 1) and c > l are lossless / unreachable
                loss_tab[l, :, c] = w[l] * (1.0 - ret[c - 1, l, :])
    lambdas = list(lambdas) if lambdas is not None else [0.0] + list(np.logspace(-3, 4, 36))
    seen: dict = {}
    for lam in lambdas:
        cuts = _dp(cost, drop, loss_tab, lam, K, L, R, first_layer)
        key = tuple((l, grid[r]) for l, r in cuts)
        if key not in seen:
            s = Schedule(cuts=[Cut(l, g) for l, g in key], num_layers=L)
            seen[key] = Candidate(list(s.cuts), schedule_flops(arch, s, N, nt)["flops_ratio"], predicted_loss(stats, s, proxy))
    seen.setdefault((), Candidate([], 1.0, 0.0))
    cands = sorted(seen.values(), key=lambda c: (c.flops_ratio, c.loss))
    frontier, best = [], math.inf
    for c in cands:
        if c.loss < best - 1e-12 or not frontier:
            frontier.append(c)
            best = min(best, c.loss)
    if frontier[-1].cuts:  # the identity closes the frontier
        frontier.append(Candidate([], 1.0, 0.0))
    return frontier


def fill_budget(stats: CalibrationStats, start: Candidate, budget: float, proxy: str = "flow", max_steps: int = 200) -> Candidate:
    """Greedy local search from a schedule within ``budget``: repeatedly apply the move with the
    best loss decrease per FLOPs increase (raise one cut's ratio one grid step, or move one cut one
    layer deeper) while the FLOPs ratio stays within the budget. Fills the gap the Lagrangian
    frontier leaves between its (convex-hull) points."""
    arch, L = stats.arch, stats.arch["num_layers"]
    N, nt = stats.mean_spatial_tokens(), stats.mean_text_tokens()
    grid = sorted(float(r) for r in stats.ratios)

    def make(cuts):
        s = Schedule(cuts=[Cut(l, k) for l, k in cuts if k < 1.0], num_layers=L)
        return Candidate(list(s.cuts), schedule_flops(arch, s, N, nt)["flops_ratio"], predicted_loss(stats, s, proxy))

    cur = start
    for _ in range(max_steps):
        base = [(c.layer, c.keep) for c in cur.cuts]
        moves = []
        for j, (l, k) in enumerate(base):
            prev_k = base[j - 1][1] if j else 1.0
            up = [g for g in grid if g > k + 1e-12]
            if up:
                nk = up[0]
                nc = list(base)
                if nk >= prev_k - 1e-12:
                    del nc[j]
                else:
                    nc[j] = (l, nk)
                moves.append(nc)
            nxt = base[j + 1][0] if j + 1 < len(base) else L
            if l + 1 < nxt:
                nc = list(base)
                nc[j] = (l + 1, k)
                moves.append(nc)
        best, best_rate = None, 0.0
        for mv in moves:
            c = make(mv)
            if c.flops_ratio > budget + 1e-12 or c.loss >= cur.loss - 1e-15:
                continue
            rate = (cur.loss - c.loss) / max(c.flops_ratio - cur.flops_ratio, 1e-12)
            if rate > best_rate:
                best, best_rate = c, rate
        if best is None:
            break
        cur = best
    return cur


def _dp(cost, drop, loss_tab, lam, K, L, R, first_layer: int = 1) -> list[tuple[int, int]]:
    INF = np.inf
    V = np.full((K + 1, R, L), INF)
    V[0, R - 1, 0] = cost[R - 1]
    back = {}  # (layer, k, r) of a cut state -> (k-1, r_prev, c_prev)
    for l in range(1, L):
        step = cost[None, :, None] + lam * loss_tab[l][None]
        newV = V + step
        newV[:, :, l] = INF
        if K > 0 and l >= first_layer:
            # best previous state per (k-1, r_prev): min over c
            bc = V[:-1].min(axis=2)  # (K, R)
            bc_arg = V[:-1].argmin(axis=2)
            tot = bc[:, :, None] + drop[None]  # (K, R_prev, R_new); drop inf unless r_new < r_prev
            rp = tot.argmin(axis=1)  # (K, R_new)
            best = tot.min(axis=1)
            val = best + cost[None, :] + lam * loss_tab[l][:, l][None]
            for k in range(1, K + 1):
                for r in range(R):
                    if np.isfinite(val[k - 1, r]):
                        newV[k, r, l] = val[k - 1, r]
                        back[(l, k, r)] = (k - 1, int(rp[k - 1, r]), int(bc_arg[k - 1, rp[k - 1, r]]))
        V = newV
    k, r, c = np.unravel_index(np.argmin(V), V.shape)
    cuts = []
    while c > 0:
        cuts.append((int(c), int(r)))
        k, r, c = back[(int(c), int(k), int(r))]
    return sorted(cuts)


# ---------------------------------------------------------------------- rules
def rule_candidates(stats: CalibrationStats, layer: int, names) -> list[Rule]:
    """The rules named in ``names`` that can run at a cut before ``layer``, with their parameters
    (``debiased``: the prior of layer ``layer-1`` from the statistics; skipped without one)."""
    out = []
    for name in names:
        rule = at_layer(name, layer)
        if name == "debiased":
            prior = stats.position_prior(layer - 1) if layer >= 1 else None
            if prior is None:
                continue
            rule = Rule.of("debiased", prior=prior)
        if layer == 0 and not pre_llm(rule.name, rule.params_dict()):
            continue
        out.append(rule)
    return out


def by_cost(stats: CalibrationStats, rules) -> list[Rule]:
    """``rules`` cheapest first: the FLOPs of their scoring at the statistics' mean token counts
    (equal costs, such as random and strided, keep their given order)."""
    N, nt = stats.mean_spatial_tokens(), stats.mean_text_tokens()
    return sorted(rules, key=lambda r: drop_cost(r, stats.arch, int(round(N + nt)), int(round(N)), int(round(nt))))


def pick(measured: list, target: float | None = None) -> tuple[int | None, list]:
    """The choice among candidates measured on the same held-back rows, ``measured`` cheapest
    first: the cheapest whose agreement the paired test (:func:`paired_test`) does not put
    significantly below the most agreeing one's; with a fidelity ``target``, among those that pass
    it. Returns (its index or None when none can be chosen, each candidate's test against the most
    agreeing one or None when it could not be chosen)."""
    ok = [k for k, m in enumerate(measured) if not m.get("stopped") and (target is None or passes(m, target))]
    tests: list = [None] * len(measured)
    if not ok:
        return None, tests
    best = max(ok, key=lambda k: (measured[k]["agreed"], -k))
    for k in ok:
        tests[k] = paired_test(measured[best][ROW_KEY], measured[k][ROW_KEY])
    chosen = next(k for k in ok if not (tests[k]["significant"] and tests[k]["margin"] > 0))
    return chosen, tests


def pick_curtailed(cands: list, measure, target: float | None = None) -> tuple[list, int | None, list]:
    """:func:`pick` among ``cands`` (cheapest first), running fewer rows for the same choice.
    ``measure(schedules, against)``: their measurements, each stopped (``curtailed``) once it cannot
    agree significantly more than the per-row vector ``against`` (None: no such stop). The first
    candidate runs every row, the others against it when it can be chosen: ``pick`` takes the first
    unless it is significantly below the most agreeing one, so a candidate that cannot agree
    significantly more than it changes nothing. Only when ``pick`` then chooses another do the
    curtailed ones run in full: any of them may be the most agreeing, or the cheapest not below it.
    Returns (the measurements, pick's index, its tests)."""
    ms = measure(cands[:1], None)
    first = ms[0] if ms else {"stopped": True}
    ms += measure(cands[1:], None if first.get("stopped") or (target is not None and not passes(first, target))
                  else first[ROW_KEY])
    k, tests = pick(ms, target)
    redo = [i for i, m in enumerate(ms) if m.get("curtailed")]
    if k and redo:
        for i, m in zip(redo, measure([cands[i] for i in redo], None)):
            ms[i] = m
        k, tests = pick(ms, target)
    return ms, k, tests


def _trial(base: dict, m: dict, test: dict | None, chosen: bool, first: str) -> dict:
    out = {**base, **{k: m[k] for k in ("agreement", "agreed", "rows")}, "stopped": bool(m.get("stopped"))}
    if m.get("curtailed"):
        out["curtailed"] = f"cannot agree significantly more than {first}"
    if test is not None:
        out["below_best"] = {"margin": round(test["margin"], 5), "p_value": round(test["p_value"], 5)}
    return {**out, "chosen": chosen}


def choose_rules(decoder, stats: CalibrationStats, holdout, schedule: Schedule, names, cache: "ValidationCache",
                 flops_limit: float, target: float | None = None, stop_at: int | None = None) -> tuple[Schedule, dict, list]:
    """Per cut (first to last), the rule of ``names`` (or the cut's own) that :func:`pick` chooses
    among those within ``flops_limit`` + ``RULE_FLOPS_SLACK``, all measured on the same held-back
    rows from the cut's shared prefix (see the module docstring, step 4). ``stop_at``: a candidate
    stops once more rows disagree (it cannot pass ``target``). Returns (schedule, its
    measurement, trials)."""
    N, nt = stats.mean_spatial_tokens(), stats.mean_text_tokens()
    best, best_m, trials = schedule, None, []
    for j, cut in enumerate(schedule.cuts):
        own = best.cuts[j].rule
        cands, bases = [], []
        for rule in by_cost(stats, [own] + [r for r in rule_candidates(stats, cut.layer, names) if r != own]):
            cuts = list(best.cuts)
            cuts[j] = Cut(cut.layer, cut.keep, rule)
            cand = Schedule(cuts=cuts, num_layers=schedule.num_layers, policy=schedule.policy)
            fl = schedule_flops(stats.arch, cand, N, nt)["flops_ratio"]
            trial = {"cut": cut.layer, "rule": rule.label(), "flops_ratio": round(fl, 5)}
            if rule != own and fl > flops_limit + RULE_FLOPS_SLACK + 1e-12:
                trials.append({**trial, "skipped": "over the FLOPs budget"})
                continue
            cands.append(cand)
            bases.append(trial)
        ms, k, tests = pick_curtailed(cands, lambda scheds, against: cache.measure_at_cut(
            decoder, holdout, scheds, cut.layer, stop_at, against), target)
        k = cands.index(best) if k is None else k  # nothing passes: the count search's schedule stays
        trials += [_trial(t, m, tt, i == k, bases[0]["rule"]) for i, (t, m, tt) in enumerate(zip(bases, ms, tests))]
        best, best_m = cands[k], ms[k]
    return best, best_m, trials


def choose_pre_llm(decoder, stats: CalibrationStats, holdout, schedule: Schedule | None, measured: dict | None, names,
                   cache: "ValidationCache", flops_ratio: float, target: float | None = None,
                   stop_at: int | None = None) -> tuple[Schedule, dict, list]:
    """One cut before layer 0 at ``flops_ratio`` of the prefill FLOPs, per rule of ``names`` that can
    run there (cheapest first), against ``schedule`` (None: none), chosen by :func:`pick` with
    ``schedule`` first: a cut before layer 0 replaces it only when it agrees significantly more."""
    L = stats.arch["num_layers"]
    N, nt = stats.mean_spatial_tokens(), stats.mean_text_tokens()
    cands, bases = ([schedule] if schedule is not None else []), []
    rules = by_cost(stats, rule_candidates(stats, 0, names))
    if schedule is not None and out_of_reach([], measured[ROW_KEY]):
        return schedule, measured, [{"cut": 0, "rule": r.label(), "skipped": "the schedule disagrees on too few rows "
                                     "for any rule to agree significantly more"} for r in rules]
    for rule in rules:
        keep = keep_for_flops(stats.arch, L, flops_ratio, N, nt, rule)
        cand = Schedule(cuts=[Cut(0, keep, rule)], num_layers=L, policy="adaptive")
        cands.append(cand)
        bases.append({"cut": 0, "keep": keep, "rule": rule.label(),
                      "flops_ratio": round(schedule_flops(stats.arch, cand, N, nt)["flops_ratio"], 5)})
    if not cands:
        raise InputError("calibrate: no rule can cut before layer 0 at this budget; add --rules strided,random")
    def measure(scheds, against):
        ms = iter(cache.measure_all(decoder, holdout, [s for s in scheds if s is not schedule], stop_at, against))
        return [measured if s is schedule else next(ms) for s in scheds]

    ms, k, tests = pick_curtailed(cands, measure, target)
    k = 0 if k is None else k
    off = len(cands) - len(bases)
    first = "the schedule" if off else bases[0]["rule"]
    trials = [_trial(t, ms[i + off], tests[i + off], i + off == k, first) for i, t in enumerate(bases)]
    return cands[k], ms[k], trials


def random_control(decoder, holdout, schedule: Schedule, measured: dict, cache: "ValidationCache", seed: int = 0) -> dict:
    """The chosen schedule against random tokens at its counts (``calibrate --policy random --like``
    with the same seed), paired on the held-back rows."""
    rule = Rule.of("random", **({"seed": int(seed)} if seed else {}))
    ctrl = Schedule(cuts=[Cut(c.layer, c.keep, rule) for c in schedule.cuts], num_layers=schedule.num_layers)
    m = cache.measure(decoder, holdout, ctrl)
    t = paired_test(measured[ROW_KEY], m[ROW_KEY])
    return {"rule": Rule.of("random", seed=int(seed)).label(), "agreement": round(m["agreement"], 6),
            "margin": round(t["margin"], 6), "ci95": [round(x, 6) for x in t["ci95"]], "p_value": round(t["p_value"], 6),
            "wins": t["wins"], "losses": t["losses"], "rows": t["rows"],
            "summary": paired_summary(t, "random tokens at the same counts")}


# ---------------------------------------------------------------------- solve
class _Search:
    """The validated candidates of one solve and the moves of its count search over them."""

    def __init__(self, decoder, stats: CalibrationStats, holdout, cache: ValidationCache, *, max_cuts, proxy,
                 max_validations: int, stop_at: int | None, progress):
        self.decoder, self.stats, self.holdout, self.cache = decoder, stats, holdout, cache
        self.max_cuts, self.proxy, self.max_validations, self.stop_at = max_cuts, proxy, max_validations, stop_at
        self.progress = progress
        self.L = stats.arch["num_layers"]
        self.validated: list[Candidate] = []

    def exhausted(self) -> bool:
        return len(self.validated) >= self.max_validations

    def validate(self, c: Candidate) -> float:
        self.validate_all([c])
        return c.measured["agreement"]

    def validate_all(self, cands: list[Candidate], until=None) -> None:
        """Validate ``cands`` in order, ending after the first whose measurement satisfies ``until``;
        the cache may run them together (one pass over the layers for the whole list)."""
        todo = [c for c in cands if c.measured is None]
        ms = self.cache.measure_all(self.decoder, self.holdout, [c.schedule(self.L) for c in todo], self.stop_at,
                                    until=until)
        for c, m in zip(todo, ms):
            c.measured = m
            self.validated.append(c)
            if self.progress is not None:
                self.progress(c)

    def known(self, c: Candidate) -> Candidate:
        """The validated candidate with ``c``'s cuts if there is one (no second run or count), else ``c``."""
        return next((v for v in self.validated if v.cuts == c.cuts), c)

    def family(self, f: int) -> list[Candidate]:
        """Frontier of schedules whose first cut is at layer ``f`` or deeper (identity left out)."""
        return [self.known(c) for c in propose(self.stats, max_cuts=self.max_cuts, proxy=self.proxy, first_layer=f)[:-1]]

    # ------------------------------------------------------------------ fidelity target
    def cheapest(self, cands: list[Candidate], chosen: Candidate, fidelity: float) -> Candidate:
        """Bisection over ``cands`` (FLOPs ascending, all cheaper than ``chosen``, which passes)
        for the cheapest passing one, assuming agreement grows with FLOPs along a frontier."""
        lo, hi = 0, len(cands)
        while lo < hi and not self.exhausted():
            mid = (lo + hi) // 2
            self.validate(cands[mid])
            if passes(cands[mid].measured, fidelity):
                hi = mid
            else:
                lo = mid + 1
        return cands[hi] if hi < len(cands) else chosen  # cands[hi] was validated and passed

    def refine(self, chosen: Candidate, pool: list[Candidate], fidelity: float) -> Candidate:
        # the frontier holds only the convex-hull points of the FLOPs/loss trade-off, so the cheapest
        # passing point can sit far above the failing one below it (e.g. 0.29 -> 0.63 of the FLOPs);
        # bisect that gap with budget-filled schedules grown from the failing one (of ``pool``: the
        # same search's candidates, so a deeper first cut is not refined from a layer-1 schedule)
        failed = [c for c in pool if c.measured is not None and not passes(c.measured, fidelity)
                  and c.flops_ratio < chosen.flops_ratio]
        if not failed:
            return chosen
        start = max(failed, key=lambda c: c.flops_ratio)
        lo_f, hi_f = start.flops_ratio, chosen.flops_ratio
        while not self.exhausted() and hi_f - lo_f > REFINE_GAP:
            mid = 0.5 * (lo_f + hi_f)
            c = self.known(fill_budget(self.stats, start, mid, self.proxy))
            self.validate(c)
            if passes(c.measured, fidelity) and c.flops_ratio < hi_f:
                chosen, hi_f = c, c.flops_ratio
            else:
                lo_f = mid  # nothing cheaper passes at this budget (the gap halves either way)
        return chosen

    def for_fidelity(self, frontier: list[Candidate], fidelity: float, n_rows: int) -> Candidate:
        """The cheapest candidate found whose agreement passes ``fidelity`` (the identity if none)."""
        identity = frontier[-1]  # agreement 1 by construction: recorded, not run
        identity.measured = {"agreement": 1.0, "kl": 0.0, "rows": n_rows, "agreed": n_rows,
                             "ci95": [round(x, 4) for x in wilson_interval(n_rows, n_rows)], "unpruned": True,
                             ROW_KEY: [True] * n_rows}
        chosen = self.refine(self.cheapest(frontier[:-1], identity, fidelity), frontier, fidelity)
        # the proxy can rank cuts at one layer too well against deeper ones (seen on an earlier bundled
        # model: the whole frontier cut at layer 1, and every candidate that passed there cut under 26%
        # of the FLOPs while L2:0.4, L4:0.2 passes at 63%): search each first-cut layer's own frontier for
        # anything cheaper than the choice so far; deeper first cuts cost more, so the first family
        # with nothing cheaper ends the search
        for f in range(2, self.L):
            cheaper = [c for c in self.family(f) if c.flops_ratio < chosen.flops_ratio - REFINE_GAP]
            if not cheaper or self.exhausted():
                break
            cands = [c for c in cheaper if c.measured is None]
            if not cands:
                continue
            found = self.cheapest(cands, chosen, fidelity)
            if found is not chosen:
                chosen = self.refine(found, cheaper, fidelity)
        return chosen

    # ------------------------------------------------------------------ FLOPs budget
    def for_budget(self, frontier: list[Candidate], flops_budget: float, names) -> Candidate | None:
        """The most agreeing of one candidate per first-cut layer within ``flops_budget``."""
        feasible = [c for c in frontier if c.flops_ratio <= flops_budget + 1e-12]
        pre_names = [r.name for r in rule_candidates(self.stats, 0, names)] if names else []
        if not feasible and not pre_names:
            raise InputError(
                f"calibrate: FLOPs budget {flops_budget} is unreachable; the most aggressive schedule on the ratio grid "
                f"needs {frontier[0].flops_ratio:.3f} of the unpruned FLOPs (a cut before layer 0 can go further: "
                "add --rules strided,random)"
            )
        # one candidate per first-cut layer: the lowest-loss schedule of that layer's frontier within
        # the budget, filled up to it; validated in order of proxy loss (the proxy ranks schedules of
        # one shape well and different shapes less well, so the shapes are measured, not ranked)
        reps = []
        for f in range(1, self.L):
            fam = [c for c in (frontier if f == 1 else self.family(f)) if c.cuts and c.flops_ratio <= flops_budget + 1e-12]
            if not fam:
                break
            rep = fill_budget(self.stats, max(fam, key=lambda c: c.flops_ratio), flops_budget, self.proxy)
            if all(rep.cuts != r.cuts for r in reps):
                reps.append(rep)
        # a candidate that agrees on every row ends the round (none can agree more); the others do not
        # depend on each other's results, so the cache may run the round together
        self.validate_all(sorted(reps, key=lambda c: c.loss)[:self.max_validations],
                          until=lambda m: m["agreement"] >= 1.0)
        return max(self.validated, key=lambda c: (c.measured["agreement"], -c.loss, -c.flops_ratio)) if self.validated else None


def _targets(fidelity: float | None, flops_budget: float | None) -> float | None:
    """The fidelity target to search for (None: a FLOPs budget's search); InputError on bad values."""
    if fidelity is not None and flops_budget is not None:
        raise InputError("calibrate: give either a fidelity target or a FLOPs budget, not both")
    if flops_budget is not None and not (0.0 < flops_budget < 1.0):
        raise InputError(f"calibrate: FLOPs budget {flops_budget} must be a ratio in (0, 1)")
    if fidelity is None and flops_budget is None:
        fidelity = DEFAULT_FIDELITY
    if fidelity is not None and not (0.0 < fidelity <= 1.0):
        raise InputError(f"calibrate: fidelity target {fidelity} must be in (0, 1]")
    return fidelity


def _with_rules(decoder, stats, holdout, s: Schedule | None, measured, names, cache, flops_budget, target, stop_at):
    """The rule stage: per cut the rule :func:`pick` chooses, then a cut before layer 0 at the same FLOPs."""
    if s is not None and s.cuts:
        N, nt = stats.mean_spatial_tokens(), stats.mean_text_tokens()
        limit = flops_budget if flops_budget is not None else schedule_flops(stats.arch, s, N, nt)["flops_ratio"]
        s, measured, trials = choose_rules(decoder, stats, holdout, s, names, cache, limit, target, stop_at)
    else:
        limit, trials = flops_budget, []
    if s is None or s.cuts:  # the identity (fidelity search found nothing cheaper) has no budget to match
        s, measured, more = choose_pre_llm(decoder, stats, holdout, s, measured, names, cache, limit, target, stop_at)
        trials += more
    s.validate("adaptive")
    return s, measured, trials


def solve(decoder, stats: CalibrationStats, holdout: Sequence[DecoderInputs], *, fidelity: float | None = None,
          flops_budget: float | None = None, max_cuts: int | None = 4, max_validations: int = 16,
          proxy: str = "flow", seed: int = 0, progress=None, cache: ValidationCache | None = None,
          rules=None) -> Schedule:
    """Adaptive schedule for ``decoder`` (see module doc). ``holdout``: held-back batches; ``cache``:
    share reference logits and measurements with other solves on the same held-back set.
    ``rules``: selection-rule names to compare at each chosen cut (None: ``DEFAULT_RULES``;
    ``"all"``: every catalogued rule; ``("last_token",)``: no other)."""
    fidelity = _targets(fidelity, flops_budget)
    n_rows = distributed.total(sum(b.batch_size for b in holdout))
    if not n_rows:
        raise InputError("calibrate: policy 'adaptive' needs held-back samples to validate on; use holdout > 0 with at least 2 samples")
    if fidelity is not None:
        require_rows(n_rows, fidelity)
    t0 = time.time()
    L = stats.arch["num_layers"]
    names = DEFAULT_RULES if rules is None else tuple(RULES) if rules == "all" else tuple(rules)
    frontier = propose(stats, max_cuts=max_cuts, proxy=proxy)
    cache = cache if cache is not None else ValidationCache()
    cache.refs_for(decoder, holdout)
    # a fidelity search stops a candidate's run once it has failed (most failing candidates are
    # settled within the first half of the rows); a budget search ranks full measurements
    stop_at = None if fidelity is None else max_disagreements(n_rows, fidelity)
    search = _Search(decoder, stats, holdout, cache, max_cuts=max_cuts, proxy=proxy, max_validations=max_validations,
                     stop_at=stop_at, progress=progress)
    if fidelity is not None:
        chosen = search.for_fidelity(frontier, fidelity, n_rows)
        mode = {"objective": "min_flops", "fidelity_target": fidelity,
                "fidelity_rule": "lower end of the agreement's 95% Wilson interval >= fidelity_target"}
    else:
        chosen = search.for_budget(frontier, flops_budget, names)
        mode = {"objective": "max_fidelity", "flops_budget": flops_budget}
    validated = search.validated
    s = chosen.schedule(L).validate("adaptive") if chosen is not None else None
    measured, trials = (chosen.measured if chosen is not None else None), None
    if names:
        s, measured, trials = _with_rules(decoder, stats, holdout, s, measured, names, cache, flops_budget, fidelity,
                                          stop_at)
    N, nt = stats.mean_spatial_tokens(), stats.mean_text_tokens()
    fl = schedule_flops(stats.arch, s, N, nt)
    s.predicted = {"flops_ratio": fl["flops_ratio"], "formula": FORMULA, "spatial_tokens": fl["spatial_tokens"],
                   "text_tokens": fl["text_tokens"], "tokens_per_layer": fl["tokens_per_layer"],
                   "proxy_loss": chosen.loss if chosen is not None else None}
    s.calibration = {
        "samples": stats.samples,
        "holdout_rows": n_rows,
        "fidelity": {"metric": "greedy_next_token_agreement", **public(measured)},
        # the count search's decision replayed on resamples (the rule trials, when asked for, follow it)
        **({"stability": stability(validated + ([frontier[-1]] if fidelity is not None else []), chosen,
                                   fidelity, n_rows, seed=seed)} if chosen is not None else {}),
        **mode,
        "seed": seed,
        "search": {
            "proxy": f"retained_{proxy} (last token, head mean), loss = sum_l w_l (1 - m_l)",
            "ratio_grid": list(stats.ratios), "max_cuts": max_cuts,
            "frontier_size": len(frontier), "validated": [c.summary() for c in validated],
            "seconds": round(time.time() - t0, 2),
        },
    }
    if trials is not None:
        s.calibration["rules"] = {
            "considered": list(names),
            "rule": f"per cut, among the rules within the chosen FLOPs + {RULE_FLOPS_SLACK}"
                    + (" whose agreement passes the fidelity target" if fidelity is not None else "")
                    + ", measured on the same held-back rows: the cheapest that the exact McNemar test "
                    f"(two-sided, alpha {PAIRED_ALPHA}) does not put below the most agreeing one; then one cut before "
                    "layer 0 at the same FLOPs per rule that can run there, chosen only when significantly better",
            "trials": trials}
    if s.cuts:
        s.calibration["random_control"] = random_control(decoder, holdout, s, measured, cache, seed)
    return s
