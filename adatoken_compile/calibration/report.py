"""Calibration report: report.md + report.json + PNG plots (matplotlib Agg)."""

from __future__ import annotations

import json
import os

import numpy as np

from adatoken_compile.flops import FORMULA, schedule_flops
from adatoken_compile.plotting import pyplot, save_png
from adatoken_compile.schedule import Schedule
from adatoken_compile.calibration.policies import DECODER_PEERS, peer_schedule
from adatoken_compile.calibration.stats import CalibrationStats



def _plot_share(path, stats):
    plt = pyplot()
    L = stats.arch["num_layers"]
    x = np.arange(L)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for g, lab in (("last", "last prompt token"), ("instr", "instruction tokens"), ("answer", "answer tokens")):
        s = stats.spatial_share(g, "attn")
        if np.all(np.isnan(s)):
            continue
        m = np.nanmean(s, axis=1)
        ax.plot(x, m, marker="o", label=f"{lab} (attention)")
        ax.fill_between(x, np.nanmin(s, axis=1), np.nanmax(s, axis=1), alpha=0.15)
    f = stats.spatial_share("last", "flow")
    if not np.all(np.isnan(f)):
        ax.plot(x, np.nanmean(f, axis=1), ls="--", label="last token (information flow)")
    ax.set_xlabel("layer")
    ax.set_ylabel("share on spatial tokens")
    ax.set_ylim(0, 1.02)
    ax.set_title("Text -> spatial attention share (band: min..max over heads)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def _plot_cdf(path, stats):
    plt = pyplot()
    L = stats.arch["num_layers"]
    h = stats.hist("last", "flow_mean").astype(np.float64)
    edges = np.arange(1, stats.num_bins + 1) / stats.num_bins
    layers = sorted(set(np.linspace(0, L - 1, min(L, 6)).round().astype(int).tolist()))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for l in layers:
        tot = h[l].sum()
        if tot > 0:
            ax.plot(edges, np.cumsum(h[l]) / tot, label=f"layer {l}")
    ax.axvline(0.05, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("contribution relative to the row's largest (head-mean flow, last token)")
    ax.set_ylabel("fraction of spatial tokens <= x")
    ax.set_title("Spatial-token contribution CDF")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def _plot_keep(path, schedule, peers):
    plt = pyplot()
    x = np.arange(schedule.num_layers + 1)  # layer l spans [l, l+1)

    def ys(s):
        k = s.keep_per_layer()
        return k + k[-1:]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, s in peers.items():
        ax.step(x, ys(s), where="post", alpha=0.6, label=name)
    ax.step(x, ys(schedule), where="post", lw=2.5, color="black", label=f"chosen ({schedule.policy})")
    ax.set_xlabel("layer (input of)")
    ax.set_ylabel("spatial tokens kept (ratio of original)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Keep curves")
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def _plot_retained(path, stats):
    plt = pyplot()
    L = stats.arch["num_layers"]
    ret = stats.retained("attn")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for l in range(1, L):
        ax.plot(stats.ratios, ret[l - 1, l], marker=".", label=f"layer {l} (scored at {l - 1})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="uniform")
    ax.set_xlabel("keep ratio")
    ax.set_ylabel("last-token spatial attention retained")
    ax.set_title("Top-k retained mass (run-time score of layer i-1, measured at i)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def write_report(out_dir: str, schedule: Schedule, stats: CalibrationStats) -> None:
    """Write report.md, report.json and the PNG plots into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    L = schedule.num_layers
    peers = {p: peer_schedule(p, L) for p in DECODER_PEERS}
    N, nt = stats.mean_spatial_tokens(), stats.mean_text_tokens()
    rows = []
    for name, s in [("chosen: " + schedule.policy, schedule), *peers.items(), ("none", peer_schedule("none", L))]:
        f = schedule_flops(stats.arch, s, N, nt)
        rows.append({"policy": name, "cuts": [[c.layer, c.keep] for c in s.cuts], "flops_ratio": f["flops_ratio"],
                     "tokens_per_layer": f["tokens_per_layer"]})
    _plot_share(os.path.join(out_dir, "spatial_share.png"), stats)
    _plot_cdf(os.path.join(out_dir, "contribution_cdf.png"), stats)
    _plot_keep(os.path.join(out_dir, "keep_curves.png"), schedule, peers)
    _plot_retained(os.path.join(out_dir, "retained_mass.png"), stats)
    share = np.nanmean(stats.spatial_share("last", "attn"), axis=1)
    below = stats.fraction_below(0.05, "last", "flow_mean")
    fid = schedule.calibration.get("fidelity", {})
    summary = {
        "model": {"fingerprint": stats.fingerprint, "arch": stats.arch},
        "samples": stats.samples,
        "mean_spatial_tokens": N,
        "mean_text_tokens": nt,
        "per_layer": [{"layer": l, "last_token_spatial_share": float(share[l]), "fraction_under_5pct": float(below[l])} for l in range(L)],
        "flops": rows,
        "formula": FORMULA,
        "fidelity": fid,
        "random_control": schedule.calibration.get("random_control"),
    }
    lines = [
        "# Calibration report",
        "",
        f"Model `{str(stats.fingerprint)[:16]}`: {L} layers, hidden {stats.arch['hidden']}, {stats.arch['heads']} heads "
        f"({stats.arch['kv_heads']} KV). {stats.samples} calibration samples, mean {N:.1f} spatial + {nt:.1f} text tokens.",
        "",
        f"Chosen schedule (`{schedule.policy}`): cuts {[(c.layer, c.keep) for c in schedule.cuts]}.",
    ]
    if fid:
        lines.append(f"Measured fidelity on held-back samples: {fid}.")
    ctrl = schedule.calibration.get("random_control")
    if ctrl:
        lines += ["", f"Against random tokens at the same counts ({ctrl['rule']}), paired on the same held-back rows: "
                  f"{ctrl['summary']}."]
    lines += [
        "",
        "## Predicted prefill FLOPs",
        "",
        f"Formula: {FORMULA}.",
        "",
        "| policy | cuts (layer, keep) | FLOPs ratio | reduction |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['cuts']} | {r['flops_ratio']:.3f} | {100 * (1 - r['flops_ratio']):.1f}% |")
    lines += ["", "## Per layer (last prompt token)", "", "| layer | spatial attention share | spatial tokens under 5% of max contribution |", "|---|---|---|"]
    for l in range(L):
        lines.append(f"| {l} | {share[l]:.3f} | {below[l]:.3f} |")
    lines += ["", "![spatial share](spatial_share.png)", "", "![contribution CDF](contribution_cdf.png)", "",
              "![keep curves](keep_curves.png)", "", "![retained mass](retained_mass.png)", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
        f.write("\n")
