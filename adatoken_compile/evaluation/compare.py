"""The comparison: every selection rule and peer policy at matched prefill FLOPs, on one question set.

For each prefill-FLOPs cut (default 50%, 65%, 80%, 90%) the adaptive solver places the cuts at that
budget (``calibrate --flops-budget``, ranking by the last token's attention), then

* ``<rule>``: the same cuts with every cut ranked by one selection rule (all of
  :mod:`adatoken_compile.selection`; ``random`` once per seed);
* ``prellm-<rule>``: one cut before layer 0 (selection on the projected scene tokens, what serving
  engines do) with the keep ratio that costs the same prefill FLOPs, for every rule that can run
  there (``random`` once per seed);
* ``calibrated``: the solver's choice on the held-back calibration rows, exactly what ``calibrate
  --flops-budget B --rules RULES`` chooses on them (its counts, then a rule per cut by the paired
  test, then a cut before layer 0 at the same FLOPs if that agrees significantly more), when
  ``search`` is on; ``--rules random,strided,last_token,text_tail,dedup --holdout 384`` is the
  default ``calibrate``; at a budget the in-LLM cuts cannot reach (layer 0
  alone costs 1/L of the prefill) only the cuts before layer 0 run;

plus the peers at their published settings (``fastv``, ``pdrop``, ``adatoken-decay``, ``dart``,
``divprune``; their own FLOPs) and the unpruned model. Every configuration answers the same
questions; the tables give paired 95% intervals against the unpruned model and against the best
other configuration at the same budget (peers: against ``calibrated`` at the nearest budget).

Cost: each scene is encoded once for all its questions and configurations; each batch's unpruned
layers before a configuration's first cut run once for all configurations that share them
(:class:`adatoken_compile.compiler.executor.PrefillExecutor` branches), and the answer is the greedy
first token of the pruned prefill (the command checks that every answer of the question set is
one token, so the first token decides the normalised answer exactly).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from adatoken_compile import distributed
from adatoken_compile.benchmarking.report import markdown_table
from adatoken_compile.benchmarking.report import plot_pareto as draw_pareto
from adatoken_compile.calibration.policies import PEERS, keep_for_flops, peer_schedule
from adatoken_compile.calibration.solver import rule_candidates, solve
from adatoken_compile.compiler.executor import PrefillExecutor
from adatoken_compile.contract import collate, spatial_source
from adatoken_compile.errors import InputError
from adatoken_compile.evaluation.accuracy import by_scene, paired, score
from adatoken_compile.flops import schedule_flops
from adatoken_compile.plotting import pyplot, save_png
from adatoken_compile.schedule import Cut, Schedule, identity
from adatoken_compile.selection import RULES, at_layer, params_for, pre_llm

FLOPS_CUTS = (0.5, 0.65, 0.8, 0.9)
SEEDS = (0, 1, 2)
X_BINS = 20  # histogram of kept tokens' x coordinate (relative to the scene's extent)


@dataclass
class Config:
    name: str  # unique: "stratified@65", "random.s1@65", "prellm-strided@65", "calibrated@65", "fastv", "unpruned"
    family: str  # what the plot joins across budgets: "stratified", "prellm-strided", "random", "calibrated", ...
    schedule: Schedule
    budget: float | None = None  # FLOPs cut this configuration was built for (None: a peer's own)
    seed: int | None = None
    flops_ratio: float = 1.0
    predictions: list = field(default_factory=list)
    kept_x: np.ndarray = field(default_factory=lambda: np.zeros(X_BINS, np.int64))

    @property
    def first_layer(self) -> int:
        cuts = self.schedule.effective_cuts()
        return cuts[0].layer if cuts else self.schedule.num_layers


def _tag(budget: float) -> str:
    return f"{round(budget * 100):d}"


def _debiased(stats, schedule: Schedule) -> Schedule | None:
    cuts = []
    for c in schedule.cuts:
        cand = rule_candidates(stats, c.layer, ["debiased"])
        if not cand:
            return None
        cuts.append(Cut(c.layer, c.keep, cand[0]))
    return Schedule(cuts=cuts, num_layers=schedule.num_layers)


def build_configs(decoder, stats, holdout, *, budgets=FLOPS_CUTS, rules=tuple(RULES), seeds=SEEDS, peers=PEERS,
                  search: bool = True, cache=None, log=print, model: dict | None = None) -> list[Config]:
    """The configurations of the comparison (see the module docstring), FLOPs counted with the
    statistics' mean token counts. ``holdout``: the held-back calibration batches the solver
    validates on (never the questions compared)."""
    arch = stats.arch
    L = arch["num_layers"]
    N, nt = stats.mean_spatial_tokens(), stats.mean_text_tokens()
    model = model or {}

    def flops(s):
        return schedule_flops(arch, s, N, nt)["flops_ratio"]

    configs = [Config("unpruned", "unpruned", identity(L, **model))]
    for p in peers:
        s = peer_schedule(p, L, arch=arch, tokens=(N, nt), **model)
        configs.append(Config(p, p, s, flops_ratio=flops(s)))
    for b in budgets:
        if not 0.0 < b < 1.0:
            raise InputError(f"compare: FLOPs cut {b} must be in (0, 1)")
        t0 = time.time()
        tag = _tag(b)
        try:
            base = solve(decoder, stats, holdout, flops_budget=1.0 - b, max_validations=4, cache=cache,
                         rules=("last_token",))
            log(f"[compare] {tag}% FLOPs cut: cuts {', '.join(f'L{c.layer}:{c.keep:g}' for c in base.cuts)} "
                f"({time.time() - t0:.0f} s)")
        except InputError as e:  # out of the in-LLM cuts' reach: only cuts before layer 0 get there
            base = None
            log(f"[compare] {tag}% FLOPs cut: no in-LLM schedule ({e}); cuts before layer 0 only")
        for r in rules:
            seeds_r = seeds if r == "random" else (None,)
            for sd in seeds_r if base is not None else ():
                if r == "debiased":
                    s = _debiased(stats, base)
                    if s is None:
                        log("[compare] debiased skipped: the statistics hold no per-position prior")
                        continue
                else:
                    s = Schedule(cuts=[Cut(c.layer, c.keep, at_layer(r, c.layer, **({"seed": sd} if sd is not None else {})))
                                       for c in base.cuts], num_layers=L)
                s = Schedule(cuts=s.cuts, num_layers=L, policy=r, **model)
                nm = f"{r}.s{sd}" if sd is not None else r
                configs.append(Config(f"{nm}@{tag}", r, s.validate(nm), b, sd, flops(s)))
            rule0 = at_layer(r, 0)
            if not pre_llm(rule0.name, rule0.params_dict()):
                continue
            for sd in seeds_r:
                rr = at_layer(r, 0, **({"seed": sd} if sd is not None else {}))
                try:
                    keep = keep_for_flops(arch, L, 1.0 - b, N, nt, rr)
                except InputError as e:
                    log(f"[compare] prellm-{r} at {tag}%: {e}")
                    continue
                s = Schedule(cuts=[Cut(0, keep, rr)], num_layers=L, policy=f"prellm-{r}", **model).validate(r)
                nm = f"prellm-{r}.s{sd}" if sd is not None else f"prellm-{r}"
                configs.append(Config(f"{nm}@{tag}", f"prellm-{r}", s, b, sd, flops(s)))
        if search:
            t0 = time.time()
            # the solver's own defaults otherwise, so that this row is what `calibrate --flops-budget B
            # --rules RULES` chooses on the same statistics and held-back rows
            cal = solve(decoder, stats, holdout, flops_budget=1.0 - b, cache=cache, rules=tuple(rules))
            cal.policy = "calibrated"
            for k, v in model.items():
                setattr(cal, k, v)
            configs.append(Config(f"calibrated@{tag}", "calibrated", cal, b, None, flops(cal)))
            log(f"[compare] {tag}%: calibrated rules " + ", ".join(f"L{c.layer}:{c.rule.label()}" for c in cal.cuts)
                + f" ({time.time() - t0:.0f} s)")
    return configs


@torch.no_grad()
def answer_all(adapter, samples, configs: list[Config], *, batch_size: int = 8, progress=None) -> None:
    """Greedy first-token answers of every configuration on every sample (into ``config.predictions``),
    and the histogram of each configuration's last kept tokens' x coordinates (``config.kept_x``;
    the unpruned configuration holds every spatial token's)."""
    ids_one = [adapter.tokenizer.encode(" " + (s.answer or "")) for s in samples]
    if any(len(i) != 1 for i in ids_one):
        bad = next(s.answer for s, i in zip(samples, ids_one) if len(i) != 1)
        raise InputError(f"compare: answer {bad!r} is not one token; the first-token comparison needs one-token answers")
    dec = adapter.decoder
    L = int(dec.config.num_hidden_layers)
    firsts = sorted({c.first_layer for c in configs if c.first_layer < L})
    for group in by_scene(samples):
        tokens, xyz = adapter.spatial_tokens_xyz(spatial_source(adapter, group[0]))
        segs = [adapter.segment(s, tokens, xyz) for s in group]
        for i in range(0, len(segs), batch_size):
            chunk = group[i:i + batch_size]
            batch = collate(segs[i:i + batch_size])
            base = PrefillExecutor(dec, batch, materialize_mask=True)
            snaps = {}
            for layer in range(L):
                if layer in firsts:
                    snaps[layer] = base.branch()
                base.layer(observe=layer + 1 in firsts)
            for c in configs:
                if c.first_layer >= L:
                    logits, kept = base.logits(), None
                else:
                    flow = snaps[c.first_layer].branch().run(c.schedule)
                    logits, kept = flow.logits(), flow.kept
                for s, t in zip(chunk, logits.argmax(-1).tolist()):
                    c.predictions.append({"question": s.question, "answer": s.answer, "kind": s.kind,
                                          "template": s.meta.get("template"), "seed": s.meta.get("seed"),
                                          "prediction": adapter.tokenizer.decode([t]).strip()})
                c.kept_x += _x_histogram(batch, kept)
            if progress is not None:
                progress.update(len(chunk))


def gather(configs: list[Config], samples, positions) -> list:
    """Under torchrun: every rank's answers and kept-token histograms merged into each configuration
    in question order, and the questions themselves (without scenes) in that order; one process:
    ``samples`` as they are."""
    if not distributed.active():
        return samples
    merged = distributed.gather_ordered(positions, distributed.portable(samples), *[c.predictions for c in configs])
    hists = distributed.all_reduce_int64({str(i): c.kept_x for i, c in enumerate(configs)}, lambda _: "sum")
    for i, c in enumerate(configs):
        c.predictions, c.kept_x = merged[i + 1], hists[str(i)]
    return merged[0]


def _x_histogram(batch, kept) -> np.ndarray:
    """Counts of kept spatial tokens (all spatial tokens when ``kept`` is None) per bin of x relative
    to each row's scene extent."""
    xyz = batch.xyz()[..., 0]
    sp = batch.spatial_mask & (batch.attention_mask != 0)
    out = np.zeros(X_BINS, np.int64)
    for b in range(batch.batch_size):
        x_all = xyz[b][sp[b]]
        if x_all.numel() == 0:
            continue
        lo, hi = float(x_all.min()), float(x_all.max())
        if kept is None:
            xs = x_all
        else:
            pos = kept[b][kept[b] >= 0]
            pos = pos[sp[b, pos]]
            xs = xyz[b, pos]
        rel = ((xs - lo) / max(hi - lo, 1e-6)).clamp(0, 1).numpy()
        out += np.bincount(np.minimum((rel * X_BINS).astype(np.int64), X_BINS - 1), minlength=X_BINS)
    return out


# ----------------------------------------------------------------------------- summary


def _mean_sd(xs):
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def summarize(configs: list[Config], samples) -> dict:
    """Rows per configuration: accuracy, paired intervals vs the unpruned model and vs the best other
    configuration at the same budget; random families' mean and spread over seeds; per-budget winners."""
    base = next(c for c in configs if c.name == "unpruned")
    acc = {c.name: score(samples, [p["prediction"] for p in c.predictions]) for c in configs}
    budgets = sorted({c.budget for c in configs if c.budget is not None})
    cal = {c.budget: c for c in configs if c.family == "calibrated"}
    rows = []
    for c in configs:
        a = acc[c.name]["accuracy"]
        row = {"config": c.name, "family": c.family, "budget": c.budget, "seed": c.seed,
               "cuts": ", ".join(f"L{x.layer}:{x.keep:g} {x.rule.label()}" for x in c.schedule.effective_cuts()) or "none",
               "flops_ratio": c.flops_ratio, "flops_cut": 1.0 - c.flops_ratio, "accuracy": a,
               "per_kind": {k: v["accuracy"] for k, v in acc[c.name]["per_kind"].items()}}
        if c is not base:
            pb = paired(c.predictions, base.predictions)
            row["vs_unpruned"] = {k: pb[k] for k in ("delta_points", "delta_ci95_points", "changed", "gained", "lost")}
            if c.budget is not None:
                others = [o for o in configs if o.budget == c.budget and o is not c]
            else:  # a peer at its own FLOPs: against the calibrated choice at the nearest budget
                nb = min(budgets, key=lambda b: abs((1.0 - c.flops_ratio) - b)) if budgets else None
                others = [cal[nb]] if nb in cal else []
            if others:
                best = max(others, key=lambda o: (acc[o.name]["accuracy"], o.name))
                po = paired(c.predictions, best.predictions)
                row["vs_best_other"] = {"other": best.name, "other_accuracy": acc[best.name]["accuracy"],
                                        **{k: po[k] for k in ("delta_points", "delta_ci95_points", "changed")}}
        rows.append(row)
    spread = {}
    for c in configs:
        if c.seed is not None:
            key = f"{c.family}@{_tag(c.budget)}"
            spread.setdefault(key, []).append(acc[c.name]["accuracy"])
    spread = {k: {"seeds": len(v), "mean": _mean_sd(v)[0], "sd": _mean_sd(v)[1], "min": min(v), "max": max(v)}
              for k, v in spread.items()}
    return {"n": len(samples), "unpruned_accuracy": acc["unpruned"]["accuracy"], "rows": rows, "random_spread": spread,
            "targets": _targets(configs, acc, spread, budgets, cal)}


def _cuts_key(schedule: Schedule) -> list:
    """What a schedule does: its cuts with every rule parameter spelt out (a default left out and
    the same value written down are one schedule)."""
    return [(c.layer, c.keep, c.rule.name, sorted(params_for(c.rule.name, c.rule.params_dict()).items()))
            for c in schedule.effective_cuts()]


TARGET_MARGIN_POINTS = -0.5  # the paired interval against the strongest alternative may not reach below this
TARGET_SHARE_AT_90 = 0.97  # accuracy kept, as a share of the unpruned model's, with >= 90% of the FLOPs cut


def _targets(configs, acc, spread, budgets, cal) -> list[dict]:
    """Per budget, the bar the calibrated choice has to clear: an accuracy >= random's mean (per
    random family), >= strided's and >= every peer's whose FLOPs cut is nearest this budget, and a
    paired 95% interval against the strongest of these single configurations whose lower end is at
    least ``TARGET_MARGIN_POINTS``; at a cut of 90% or more, also ``TARGET_SHARE_AT_90`` of the
    unpruned accuracy."""
    out = []
    base = acc["unpruned"]["accuracy"]
    for b in budgets:
        c = cal.get(b)
        if c is None:
            continue
        a = acc[c.name]["accuracy"]
        comp = {k: v["mean"] for k, v in spread.items() if k.endswith(f"@{_tag(b)}")}
        single = [o for o in configs if o.budget == b and o.family in ("strided", "prellm-strided", "random", "prellm-random")]
        for o in configs:
            if o.budget is None and o.name != "unpruned" and budgets and \
                    min(budgets, key=lambda x: abs((1.0 - o.flops_ratio) - x)) == b:
                single.append(o)
        # an alternative with the calibrated schedule itself (calibration chose a seeded random
        # subset, say) is no yardstick: a paired interval against itself is [0, 0]
        same = [o.name for o in single if _cuts_key(o.schedule) == _cuts_key(c.schedule)]
        single = [o for o in single if o.name not in same]
        comp.update({o.name: acc[o.name]["accuracy"] for o in single if o.family not in ("random", "prellm-random")})
        ahead = {k: round(100 * (a - v), 2) for k, v in comp.items()}
        t = {"budget": b, "calibrated": a, "calibrated_vs": ahead, "share_of_unpruned": a / base if base else None,
             "same_schedule_as": same}
        if single:
            best = max(single, key=lambda o: (acc[o.name]["accuracy"], o.name))
            pb = paired(c.predictions, best.predictions)
            t["strongest"] = {"config": best.name, "delta_points": pb["delta_points"],
                              "delta_ci95_points": pb["delta_ci95_points"]}
        checks = [all(v >= 0 for v in ahead.values()),
                  "strongest" not in t or t["strongest"]["delta_ci95_points"][0] >= TARGET_MARGIN_POINTS]
        if b >= 0.9 and t["share_of_unpruned"] is not None:
            checks.append(t["share_of_unpruned"] >= TARGET_SHARE_AT_90)
        t["met"] = all(checks)
        out.append(t)
    return out


# ----------------------------------------------------------------------------- outputs


def markdown(summary: dict, meta: dict) -> str:
    def ci(d):
        return "{:+.1f} [{:+.1f}, {:+.1f}]".format(d["delta_points"], *d["delta_ci95_points"]) if d else ""

    lines = [f"# Selection rules compared: {meta['model']}, {summary['n']} questions of {meta['data']}", "",
             f"Unpruned accuracy {summary['unpruned_accuracy']:.4f}. Δ in points with paired 95% intervals "
             "(per-question differences): against the unpruned model, and against the best other configuration "
             "at the same FLOPs cut (peers: against `calibrated` at the nearest cut). FLOPs: the project's prefill "
             f"formula at the calibration's mean token counts. {meta.get('note', '')}".strip(), ""]
    cols = [("config", "config"), ("cuts", "cuts (layer:keep rule)"), ("flops_cut", "FLOPs cut"),
            ("accuracy", "accuracy"), ("vu", "Δ vs unpruned"), ("vb", "Δ vs best other (which)")]
    groups = [("peers (their published settings, own FLOPs)", [r for r in summary["rows"] if r["budget"] is None])]
    for b in sorted({r["budget"] for r in summary["rows"] if r["budget"] is not None}):
        groups.append((f"{_tag(b)}% FLOPs cut", sorted((r for r in summary["rows"] if r["budget"] == b),
                                                       key=lambda r: -r["accuracy"])))
    for title, rows in groups:
        cells = [{**r, "vu": ci(r.get("vs_unpruned")),
                  "vb": (ci(r["vs_best_other"]) + f" ({r['vs_best_other']['other']})") if r.get("vs_best_other") else ""}
                 for r in rows]
        lines += [f"## {title}", "", markdown_table(cells, cols)]
    if summary["random_spread"]:
        lines += ["## random seeds (mean, sd, min-max)", ""]
        lines += [f"- {k}: {v['mean']:.4f} ± {v['sd']:.4f} ({v['min']:.4f}-{v['max']:.4f}, {v['seeds']} seeds)"
                  for k, v in sorted(summary["random_spread"].items())]
        lines.append("")
    if summary["targets"]:
        lines += ["## targets: calibrated choice against random's mean, strided and the peers near its FLOPs "
                  f"(every point estimate ahead, the paired interval against the strongest not below "
                  f"{TARGET_MARGIN_POINTS:+.1f} points, and at >= 90% cut {100 * TARGET_SHARE_AT_90:.0f}% of unpruned)", ""]
        for t in summary["targets"]:
            share = t["share_of_unpruned"]  # None: the unpruned model answers nothing right
            lines.append(f"- {_tag(t['budget'])}%: calibrated {t['calibrated']:.4f} ("
                         + (f"{100 * share:.1f}% of unpruned" if share is not None else "unpruned accuracy 0")
                         + "); " + ("met" if t["met"] else "NOT met") + "; points ahead: "
                         + ", ".join(f"{k} {v:+.1f}" for k, v in sorted(t["calibrated_vs"].items(), key=lambda kv: kv[1]))
                         + ("; against the strongest, {}: {:+.1f} [{:+.1f}, {:+.1f}]".format(
                             t["strongest"]["config"], t["strongest"]["delta_points"], *t["strongest"]["delta_ci95_points"])
                            if "strongest" in t else "")
                         + ("; the calibrated choice is the schedule of " + ", ".join(t["same_schedule_as"])
                            if t.get("same_schedule_as") else ""))
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_pareto(configs: list[Config], summary: dict, path: str, title: str) -> str:
    acc = {r["config"]: r["accuracy"] for r in summary["rows"]}
    points, seen = [], set()
    for c in configs:
        if c.seed is not None:
            key = (c.family, c.budget)
            if key in seen:
                continue
            seen.add(key)
            a = summary["random_spread"][f"{c.family}@{_tag(c.budget)}"]["mean"]
            label = f"{c.family} (mean of seeds)"
        else:
            a, label = acc[c.name], ("unpruned" if c.name == "unpruned" else c.family)
        points.append({"policy": label, "flops_ratio": c.flops_ratio, "accuracy": a})
    return draw_pareto(points, path, highlight="calibrated", title=title)


def plot_kept_x(configs: list[Config], path: str, title: str) -> str:
    """Where the kept tokens lie: per budget, the share of each rule's last kept tokens per bin of the
    scene's x extent, against all spatial tokens (dashed)."""
    plt = pyplot()
    allx = next(c.kept_x for c in configs if c.name == "unpruned").astype(np.float64)
    budgets = sorted({c.budget for c in configs if c.budget is not None})
    fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(4.2 * max(1, len(budgets)), 3.6), squeeze=False)
    xs = (np.arange(X_BINS) + 0.5) / X_BINS
    for ax, b in zip(axes[0], budgets or [None]):
        ax.plot(xs, allx / max(allx.sum(), 1), "k--", lw=2, label="all spatial tokens")
        shown = [c for c in configs if c.budget == b and c.seed in (None, 0)]
        for i, c in enumerate(shown):
            h = c.kept_x.astype(np.float64)
            style = ":" if c.family.startswith("prellm-") else "-"  # selection before the decoder
            ax.plot(xs, h / max(h.sum(), 1), style, color=plt.cm.tab20(i % 20),
                    lw=2.2 if c.family == "calibrated" else 1.2, label=c.family)
        ax.set_xlabel("x within the scene (0 = min, 1 = max)")
        ax.set_ylabel("share of kept tokens")
        ax.set_title(f"{_tag(b)}% FLOPs cut" if b is not None else "")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    return save_png(fig, path)


def write_outputs(tmp: str, configs: list[Config], summary: dict, meta: dict) -> str:
    """compare.md, compare.json, predictions.json, pareto.png and kept_x.png into ``tmp``."""
    text = markdown(summary, meta)
    with open(os.path.join(tmp, "compare.md"), "w") as f:
        f.write(text)
    doc = {**meta, **summary,
           "configs": [{"name": c.name, "family": c.family, "budget": c.budget, "seed": c.seed,
                        "flops_ratio": c.flops_ratio, "schedule": c.schedule.to_dict(),
                        "kept_x_hist": c.kept_x.tolist()} for c in configs]}
    with open(os.path.join(tmp, "compare.json"), "w") as f:
        json.dump(doc, f, indent=2, default=float)
    with open(os.path.join(tmp, "predictions.json"), "w") as f:
        json.dump({c.name: [p["prediction"] for p in c.predictions] for c in configs}, f)
    plot_pareto(configs, summary, os.path.join(tmp, "pareto.png"), f"{meta['model']}: accuracy vs prefill FLOPs")
    plot_kept_x(configs, os.path.join(tmp, "kept_x.png"), f"{meta['model']}: x of the tokens kept to the last layer")
    return text
