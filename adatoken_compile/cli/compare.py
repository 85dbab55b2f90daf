"""``compare``: every selection rule and peer policy at matched prefill FLOPs, with paired intervals."""

from __future__ import annotations

import click

from adatoken_compile import api, distributed
from adatoken_compile.cli.main import (default, given, load_model, main, model_options, placement_options, scales_out,
                                       user_errors)
from adatoken_compile.errors import InputError


def _floats(text: str | None, what: str):
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--{what} {text!r}: give comma-separated numbers, e.g. 0.5,0.65,0.8,0.9")


def _names(text: str | None):
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


@main.command()
@model_options
@click.option("--out", required=True, help="output directory (compare.md, compare.json, predictions.json, pareto.png, kept_x.png)")
@click.option("--overwrite", is_flag=True, help="replace an earlier comparison at --out")
@click.option("--data", default=None, help="questions to answer; a question file is calibrated on too, from the scenes "
              f"after the answered ones [default: {default(api.compare, 'data')}]")
@click.option("--limit", default=None, type=click.IntRange(1, None),
              help=f"first N questions [default: {default(api.compare, 'limit')}]")
@click.option("--budgets", default=None, help="prefill-FLOPs cuts, comma-separated "
              f"[default: {','.join(str(b) for b in default(api.compare, 'budgets'))}]")
@click.option("--seeds", default=None, help="random's seeds, comma-separated "
              f"[default: {','.join(str(s) for s in default(api.compare, 'seeds'))}]")
@click.option("--rules", default=None, help="selection rules, comma-separated [default: all]")
@click.option("--peers", default=None, help="peer policies at their published settings, comma-separated "
              f"[default: {','.join(default(api.compare, 'peers'))}]")
@click.option("--no-search", is_flag=True, help="leave out the calibrated rule choice (the solver's rule search)")
@click.option("--stats", default=None, help="use this calibration directory's statistics instead of mining new ones")
@click.option("--samples", default=None, type=click.IntRange(1, None), help="questions whose statistics are mined "
              f"[default: {default(api.compare, 'samples')}]")
@click.option("--holdout", default=None, type=click.IntRange(1, None), help="held-back calibration questions the "
              f"solver validates on [default: {api.RULES_HOLDOUT}; with --no-search {api.HOLDOUT}]")
@click.option("--batch-size", default=None, type=click.IntRange(1, None),
              help=f"questions per forward [default: {default(api.compare, 'batch_size')}]")
@placement_options
@user_errors
@scales_out
def compare(model, vision_tower, attn, out, overwrite, data, limit, budgets, seeds, rules, peers, no_search, stats, samples,
            holdout, batch_size, device, dtype):
    """Selection rules and peers at matched prefill FLOPs: tables, paired 95% intervals, plots."""
    b = _floats(budgets, "budgets")
    sd = _floats(seeds, "seeds")
    api._placement_checked(device, dtype)  # before the model loads
    adapter = load_model(model, vision_tower, attn, device=device, dtype=dtype)
    res = api.compare(adapter, out=out, overwrite=overwrite, search=not no_search, stats=stats,
                      **given(data=data, limit=limit, budgets=b, seeds=None if sd is None else tuple(int(x) for x in sd),
                              rules=_names(rules), peers=_names(peers), samples=samples, holdout=holdout,
                              batch_size=batch_size))
    if not distributed.is_main():
        return
    for t in res["targets"]:
        click.echo(f"{round(100 * t['budget'])}% FLOPs cut: calibrated {t['calibrated']:.4f} "
                   f"({'met' if t['met'] else 'not met'}: " + ", ".join(f"{k} {v:+.1f}" for k, v in sorted(t["calibrated_vs"].items())) + ")")
    click.echo(f"wrote {out}/ (compare.md, compare.json, predictions.json, pareto.png, kept_x.png)")
