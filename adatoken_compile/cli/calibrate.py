"""``calibrate``: attention statistics on the user's questions -> a validated pruning schedule."""

from __future__ import annotations

import click

from adatoken_compile import api, distributed
from adatoken_compile.calibration.policies import DEFAULT_FIDELITY, POLICIES
from adatoken_compile.calibration.defaults import DEFAULT_RULES
from adatoken_compile.cli.main import (data_options, default, given, load_model, main, model_options, placement_options,
                                       scales_out, user_errors)
from adatoken_compile.io import check_output
from adatoken_compile.selection import spec


@main.command()
@model_options
@click.option("--out", required=True, help="output directory (schedule.json, stats.*, report.md, PNGs)")
@click.option("--overwrite", is_flag=True, help="replace an earlier calibration output at --out")
@click.option("--data", default=None, help="questions to calibrate on: builtin:<split> or a question file (JSONL, "
              "ScanQA / SQA3D JSON; answers not needed) [default: " f"{default(api.calibrate, 'data')}]")
@data_options
@click.option("--samples", default=None, type=click.IntRange(1, None),
              help=f"questions whose attention statistics are mined [default: {default(api.calibrate, 'samples')}]")
@click.option("--holdout", default=None, type=click.IntRange(0, None),
              help="other questions (disjoint scenes) that validate the schedule: agreement of the pruned and the "
                   "unpruned model's next token; a fidelity target needs enough of them (73 for 0.95, 381 for 0.99) "
                   f"[default: {api.HOLDOUT}; {api.RULES_HOLDOUT} with --rules, whose rules differ by less than "
                   f"{api.HOLDOUT} can resolve]")
@click.option("--start-scene", default=0, show_default=True, type=click.IntRange(0, None),
              help="mine from this scene of --data on (scenes counted in the order they first appear) (one shard of a calibration split across machines; see --merge)")
@click.option("--policy", default="adaptive", show_default=True, type=click.Choice(POLICIES))
@click.option("--flops-budget", default=None, type=float, help="adaptive: maximise fidelity under this prefill FLOPs ratio (0,1)")
@click.option("--fidelity", default=None, type=float, help="adaptive: minimise FLOPs with answer agreement >= this (0,1), "
              "shown at 95% confidence (the lower end of the Wilson interval on the held-back rows); when neither this "
              f"nor --flops-budget is given: {DEFAULT_FIDELITY}")
@click.option("--like", default=None, help="random / prellm-* policies: copy the cuts / FLOPs of this schedule.json")
@click.option("--rules", default=None, help="adaptive: selection rules to compare at each chosen cut, comma-separated "
              "(e.g. last_token,stratified,strided) or 'all'; per cut the cheapest rule that a paired test on the "
              "held-back rows does not put below the best is kept; last_token alone skips the comparison "
              f"[default: {','.join(DEFAULT_RULES)}]")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--max-validations", default=None, type=click.IntRange(1, None),
              help="adaptive: most candidate schedules run on the held-back questions (each is one pruned prefill "
                   f"per question) [default: {default(api.calibrate, 'max_validations')}]")
@click.option("--merge", "merge_dirs", multiple=True, help="merge the statistics of these calibration dirs (repeat) "
              "instead of mining new ones; the schedule is validated on --holdout questions")
@placement_options
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "sample", "layered"]),
              help="sample: each batch through the whole model held in memory; layered: the decoder's layers read "
                   "from the checkpoint one at a time, each run over every batch (a model larger than memory; the "
                   "same statistics and schedule); auto: layered when the model does not fit --max-memory")
@click.option("--max-memory", default=None, help="memory the calibration may use, e.g. 12GB (auto picks the engine "
              "by it; layered sizes its chunks by it) [default: this machine's memory]")
@click.option("--spill", default="auto", show_default=True,
              help="layered: where the states that do not fit --max-memory go (memory-mapped files in a directory "
                   "created and removed there), so that one pass over the weights serves every question: auto "
                   "(beside --out, when the disk has room), off (another pass over the weights instead) or DIR")
@user_errors
@scales_out
def calibrate(model, vision_tower, attn, out, overwrite, data, scenes, depth_scale, samples, holdout, start_scene, policy,
              flops_budget, fidelity, like, rules, seed, max_validations, merge_dirs, device, dtype, engine, max_memory,
              spill):
    """Mine attention statistics and derive a static per-layer pruning schedule."""
    if flops_budget is not None and fidelity is not None:
        raise click.UsageError("pass either --flops-budget or --fidelity, not both")
    rule_names = None if rules is None else ("all" if rules.strip() == "all" else
                                             tuple(r.strip() for r in rules.split(",") if r.strip()))
    if rule_names not in (None, "all"):
        for r in rule_names:
            spec(r)  # unknown names: one line before any work
    # device, dtype and memory budget, then the output: all before the model is loaded
    where = api._placement(model, device=device, dtype=dtype, engine=engine, max_memory=max_memory,
                           vision_tower=vision_tower)
    from adatoken_compile.calibration.layered import spill_for

    spill_for(spill, out)  # a --spill DIR that is not there: one line before loading
    check_output(out, "calibration", overwrite=overwrite)
    adapter = load_model(model, vision_tower, attn, dtype=dtype, lazy=where.engine == "layered", device=device)
    cal = api.calibrate(adapter, out=out, overwrite=overwrite, policy=policy, fidelity=fidelity, flops_budget=flops_budget,
                        like=like, seed=seed, start_scene=start_scene, merge=merge_dirs, device=device, dtype=dtype,
                        engine=where.engine, max_memory=max_memory, spill=spill,
                        **given(data=data, scenes=scenes, depth_scale=depth_scale, samples=samples, holdout=holdout,
                                rules=rule_names, max_validations=max_validations))
    if not distributed.is_main():
        return
    schedule = cal.schedule
    pred = schedule.predicted
    click.echo(f"wrote {out}/schedule.json: policy {schedule.policy}, cuts "
               + (", ".join(f"L{c.layer}:{c.keep:.3g} {c.rule.label()}" for c in schedule.cuts) or "none")
               + (f", predicted prefill FLOPs ratio {pred['flops_ratio']:.3f}" if "flops_ratio" in pred else ""))
    fid = schedule.calibration.get("fidelity")
    if fid:
        lo, hi = fid.get("ci95", (None, None))
        click.echo(f"  validated on {fid['rows']} held-back rows: next-token agreement {fid['agreement']:.3f}"
                   + (f" (95% CI {lo:.3f}-{hi:.3f})" if lo is not None else ""))
        target = schedule.calibration.get("fidelity_target")
        if target is not None and lo is not None:
            click.echo(f"  fidelity target {target} met at 95% confidence: the interval's lower end {lo:.3f} >= {target}")
    stab = schedule.calibration.get("stability")
    if stab:
        click.echo(f"  stability: {stab['summary']}")
    ctrl = schedule.calibration.get("random_control")
    if ctrl:
        click.echo(f"  {ctrl['summary']}")
