"""Plots (accuracy vs FLOPs, kept tokens per layer), markdown tables and the bench summary text."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from adatoken_compile.plotting import pyplot, save_png

# ----------------------------------------------------------------------------- plots / tables


def _finish(plt, fig, ax, path: str, title: str | None) -> str:
    """Grid, legend, optional title, atomic PNG write, figure closed."""
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[1]) > 8:  # a long legend goes beside the axes, off the points
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_png(fig, path)


def plot_pareto(points: Iterable[Mapping], path: str, *, highlight: str = "adaptive", title: str | None = None) -> str:
    """Accuracy vs prefill FLOPs ratio, one marker per policy; points of the ``highlight`` policy
    (several budgets) are joined by a thick line. points: ``{"policy", "flops_ratio", "accuracy"}``."""
    plt = pyplot()
    groups: dict[str, list] = {}
    for p in points:
        groups.setdefault(str(p["policy"]), []).append((float(p["flops_ratio"]), float(p["accuracy"])))
    if not groups:
        raise ValueError("plot_pareto: no points")
    markers = "osD^v<>pP*Xh"
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (pol, pts) in enumerate(sorted(groups.items(), key=lambda kv: kv[0] != highlight)):
        pts.sort()
        xs, ys = zip(*pts)
        if pol == highlight:
            ax.plot(xs, ys, "-o", color="C3", lw=2.5, ms=8, label=pol, zorder=5)
        else:
            ax.plot(xs, ys, linestyle="--" if len(pts) > 1 else "none", marker=markers[i % len(markers)], ms=7,
                    lw=1, alpha=0.85, label=pol)
    ax.set_xlabel("prefill FLOPs ratio (pruned / unpruned)")
    ax.set_ylabel("accuracy")
    return _finish(plt, fig, ax, path, title)


def plot_keep_curves(schedules: Mapping[str, Any], path: str, *, n_spatial: int | None = None,
                     title: str | None = None) -> str:
    """Spatial tokens kept at each layer's input per policy: the keep ratio, or the token count
    when ``n_spatial`` is given. schedules: name -> :class:`~adatoken_compile.schedule.Schedule`."""
    plt = pyplot()
    if not schedules:
        raise ValueError("plot_keep_curves: no schedules")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    others = iter(f"C{k}" for k in range(20) if k != 3)  # C3 (red) is reserved for adaptive
    for i, (name, s) in enumerate(schedules.items()):
        ys = s.tokens_per_layer(n_spatial) if n_spatial else s.keep_per_layer()
        xs = list(range(len(ys)))
        ax.step(xs, ys, where="post", lw=2.5 if name == "adaptive" else 1.5, label=name,
                color="C3" if name == "adaptive" else next(others),
                linestyle="--" if name.startswith("adaptive@") else "-")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"spatial tokens kept (of {n_spatial})" if n_spatial else "spatial tokens kept (ratio)")
    return _finish(plt, fig, ax, path, title)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Any], columns: Sequence[Any]) -> str:
    """GitHub markdown table. rows: dicts (or sequences in column order); columns: keys or
    ``(key, header)`` pairs. Floats get 4 significant digits, missing values are blank."""
    cols = [(c, str(c)) if not isinstance(c, (tuple, list)) else (c[0], str(c[1])) for c in columns]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for _, h in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        if isinstance(r, Mapping):
            vals = [r.get(k) for k, _ in cols]
        else:
            vals = list(r) + [None] * (len(cols) - len(r))
        lines.append("| " + " | ".join(_cell(v) for v in vals[: len(cols)]) + " |")
    return "\n".join(lines) + "\n"


def format_bench(res: dict) -> str:
    lines = []
    if "prefill" in res:
        p, e = res["prefill"], res.get("end_to_end", {})
        lines.append(f"schedule {res['schedule']['policy']}: "
                     + (", ".join(f"L{c['layer']}:{c['keep']:.3g}" for c in res["schedule"]["cuts"]) or "identity")
                     + f"  (provider {res['provider']})")
        lines.append(f"prefill   latency {p['latency_s']['pruned']['median_s'] * 1e3:8.1f} ms vs "
                     f"{p['latency_s']['baseline']['median_s'] * 1e3:8.1f} ms  ratio {p['latency_ratio']:.3f}"
                     f"  ({p['tokens']['spatial']} spatial + {p['tokens']['text']} text tokens)")
        lines.append(f"          FLOPs ratio {p['flops_ratio']:.3f} (graph count {p['flops_ratio_graph']:.3f})  "
                     f"realized fraction {p['realized_fraction']:.2f}  overhead fraction {p['overhead_fraction']:.4f}")
        if "latency_ratio" in e:
            lines.append(f"end2end   {e['new_tokens']} tokens {e['pruned']['latency_s']['median_s'] * 1e3:8.1f} ms vs "
                         f"{e['baseline']['latency_s']['median_s'] * 1e3:8.1f} ms  ratio {e['latency_ratio']:.3f}  "
                         f"FLOPs ratio {e['flops_ratio']:.3f}  realized {e['realized_fraction']:.2f}")
            lines.append(f"          TTFT ratio {e['ttft_ratio']:.3f}  per-token decode "
                         f"{e['pruned']['per_token_decode_s']['median_s'] * 1e3:.2f} ms vs "
                         f"{e['baseline']['per_token_decode_s']['median_s'] * 1e3:.2f} ms")
        if "kv_cache_bytes" in e:
            kv = e["kv_cache_bytes"]
            lines.append(f"KV cache  {kv['pruned'] / 1e6:.2f} MB vs {kv['baseline'] / 1e6:.2f} MB per request "
                         f"(ratio {kv['ratio']:.3f})")
    if "synthetic_7b_width" in res:
        s = res["synthetic_7b_width"]
        for rule, r in (s.get("rules") or {s.get("config", {}).get("rule", "last_token"): s}).items():
            lines.append(f"7B-width synthetic, {rule}: latency ratio {r.get('latency_ratio', float('nan')):.3f}  FLOPs "
                         f"ratio {r.get('flops_ratio', float('nan')):.3f}  realized "
                         f"{r.get('realized_fraction', float('nan')):.2f}  overhead {r.get('overhead_fraction', float('nan')):.4f}")
    return "\n".join(lines)
