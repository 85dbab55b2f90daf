"""``eval`` and ``bench``: accuracy on a question set, and latency / FLOPs side by side."""

from __future__ import annotations

import click

from adatoken_compile import api, distributed
from adatoken_compile.benchmarking.report import format_bench
from adatoken_compile.cli.main import (check_provider, data_options, default, echo_json, given, load_model, main,
                                       model_options, placement_options, progress, provider_option, scales_out,
                                       user_errors)
from adatoken_compile.errors import InputError
from adatoken_compile.io import check_output, write_json
from adatoken_compile.runtime.session import choose_providers


@main.command("eval")
@model_options
@click.option("--artifact", default=None, help="evaluate a compiled artifact (ONNX Runtime) next to the unpruned model")
@click.option("--baseline", default=None, help="with --artifact: identity-schedule artifact used as the unpruned reference "
              "(default: the PyTorch model given by --model)")
@click.option("--data", default=None, help="questions to answer: builtin:<split> or a question file (JSONL, ScanQA / "
              f"SQA3D JSON) [default: {default(api.evaluate, 'data')}]")
@data_options
@click.option("--limit", default=None, type=click.IntRange(1, None),
              help=f"number of questions [default: {default(api.evaluate, 'limit')}]")
@click.option("--kind", "kinds", multiple=True,
              help="keep only the questions of this kind or template among the first --limit (repeatable), so "
                   "that the figures are a subset of the full --limit run's")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@click.option("--predictions", default=None, help="also write per-question predictions to this JSON file")
@click.option("--overwrite", is_flag=True, help="replace a --predictions file an earlier eval wrote")
@provider_option
@placement_options
@user_errors
@scales_out
def eval_cmd(model, vision_tower, attn, artifact, baseline, data, scenes, depth_scale, limit, kinds, as_json, predictions,
             overwrite, provider, device, dtype):
    """Answer accuracy on a question set (overall and per question kind)."""
    check_provider(provider)
    api._placement_checked(device, dtype)  # before the model loads
    if predictions:
        distributed.on_main(check_output, predictions, "predictions", overwrite=overwrite, is_dir=False)
    adapter = None if (artifact and baseline) else load_model(model, vision_tower, attn, device=device, dtype=dtype)
    n = limit or default(api.evaluate, "limit")
    bar = progress(n, "eval")
    try:
        res = api.evaluate(adapter, artifact=artifact, baseline=baseline, kinds=kinds, progress=bar, providers=provider,
                           **given(data=data, scenes=scenes, depth_scale=depth_scale, limit=limit))
    finally:
        bar.close()
    preds = res.pop("predictions", None)
    if predictions and preds is not None:
        distributed.on_main(write_json, predictions, preds, "predictions", overwrite=overwrite)
    if not distributed.is_main():
        return
    if as_json:
        echo_json(res)
        return
    click.echo(format_eval(res))


def _rate(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_eval(res: dict) -> str:
    """The text report of an ``eval`` result (the JSON keys are listed in docs/data.md)."""
    lines = [f"{res['data']}: {res.get('questions', res['n'])} questions, {res['n']} with answers"]
    if res["n"]:
        lines.append(f"  accuracy {_rate(res['accuracy'])}  EM@1 {_rate(res['em1'])}  refined EM {_rate(res['em1_refined'])}"
                     + "".join(f"  {k} {res[k]:.4f}" for k in ("bleu4", "cider") if k in res)
                     + (f"  (unpruned: accuracy {_rate(res['baseline_accuracy'])}, EM@1 {_rate(res.get('baseline_em1'))})"
                        if "baseline_accuracy" in res else ""))
    if "caption_metrics_unavailable" in res:
        lines.append(f"  BLEU-4 / CIDEr: {res['caption_metrics_unavailable']}")
    if "agreement" in res:
        lines.append(f"  answers identical to the unpruned model's: {res['agreement']:.4f}")
    if "paired" in res and res["n"]:
        pc = res["paired"]
        lines.append(f"  vs unpruned, same questions: {pc['changed']} answers changed (+{pc['gained']} right, "
                     f"-{pc['lost']} wrong), delta {pc['delta_points']:+.1f} pts, paired 95% CI "
                     f"{pc['delta_ci95_points'][0]:+.1f} .. {pc['delta_ci95_points'][1]:+.1f}")
    for k, v in res["per_kind"].items():
        lines.append(f"  {k:<10} accuracy {v['accuracy']:.4f}  EM@1 {v['em1']:.4f}  (n={v['n']})")
    if res.get("per_template"):
        lines.append("per template: " + "  ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})"
                                                  for k, v in res["per_template"].items()))
    return "\n".join(lines)


@main.command()
@model_options
@click.option("--artifact", default=None, help="pruned artifact to measure")
@click.option("--baseline", default=None, help="identity-schedule artifact of the same model "
              "(default: compiled from --model into a temporary directory)")
@click.option("--data", default=None, help=f"the question measured is the first of these [default: {default(api.bench, 'data')}]")
@click.option("--scenes", default=None, help="with a question file as --data: where its scene ids resolve")
@click.option("--repeats", default=None, type=click.IntRange(1, None), help=f"[default: {default(api.bench, 'repeats')}]")
@click.option("--new-tokens", default=None, type=click.IntRange(1, 512),
              help=f"end-to-end answer length [default: {default(api.bench, 'new_tokens')}]")
@click.option("--threads", default=None, type=click.IntRange(1, None), help="ORT intra-op threads (default: ORT's choice)")
@click.option("--synthetic-7b", "synthetic", is_flag=True,
              help="also measure a random decoder of LLaVA-3D-7B width (hidden 4096, 32 heads, FFN 11008), reduced depth")
@click.option("--layers", default=2, show_default=True, type=click.IntRange(2, 32), help="depth of the synthetic 7B-width decoder")
@click.option("--cuts", "synthetic_cuts", default="1:0.3", show_default=True, metavar="LAYER:KEEP,...",
              help="the synthetic decoder's cuts: keep this fraction of the spatial tokens before these layers")
@click.option("--rules", "synthetic_rules", default="last_token", show_default=True,
              help="the synthetic decoder's selection rules, comma-separated or 'all' (those that can run at every "
                   "cut): each is measured at every cut against the same unpruned export")
@click.option("--tokens", default=None, metavar="SPATIAL,TEXT",
              help="prefill graphs only, on random embeddings at these token counts (e.g. 1400,60); needs --baseline")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@provider_option
@user_errors
def bench(model, vision_tower, attn, artifact, baseline, data, scenes, repeats, new_tokens, threads, synthetic, layers,
          synthetic_cuts, synthetic_rules, tokens, as_json, provider):
    """Pruned vs unpruned artifact: prefill and end-to-end latency, FLOPs, realised fraction, overhead."""
    if not artifact and not synthetic:
        raise InputError("pass --artifact ART (and optionally --baseline ART0), or --synthetic-7b")
    check_provider(provider)
    log = (lambda m: click.echo(m, err=True))
    res = {}
    if tokens and not baseline:
        raise InputError("--tokens: pass --baseline ART0, an identity artifact of the same model")
    if synthetic:
        cuts, rules = _synthetic_plan(synthetic_cuts, synthetic_rules, layers)  # bad options: before any work
    if artifact:
        adapter = None if baseline else load_model(model, vision_tower, attn)
        if not baseline:
            log("compiling the identity-schedule baseline ...")
        res = api.bench(artifact, baseline=baseline, model=adapter, threads=threads, providers=provider, log=log,
                        tokens=_token_counts(tokens), **given(data=data, scenes=scenes, repeats=repeats,
                                                              new_tokens=new_tokens))
    if synthetic:
        from adatoken_compile.benchmarking.synthetic import synthetic_7b_width  # torch: not in the runtime install

        log(f"synthetic 7B-width decoder, {layers} layers, {len(rules)} rule(s) (minutes each) ...")
        res["synthetic_7b_width"] = synthetic_7b_width(layers=layers, schedule_keep=cuts, rules=rules,
                                                       repeats=repeats or default(api.bench, "repeats"), threads=threads,
                                                       providers=choose_providers(provider))
    if as_json:
        echo_json(res)
        return
    click.echo(format_bench(res))


def _synthetic_plan(cuts: str, rules: str, layers: int):
    """``--cuts``/``--rules`` of the synthetic decoder: [(layer, keep), ...] and the rule names."""
    from adatoken_compile.benchmarking.synthetic import rule_schedule
    from adatoken_compile.selection import RULES, at_layer, pre_llm, spec

    try:
        plan = [(int(a), float(b)) for a, b in (c.split(":") for c in cuts.split(",") if c.strip())]
    except ValueError:
        raise InputError(f"--cuts {cuts!r}: give LAYER:KEEP pairs, e.g. --cuts 1:0.8,2:0.3")
    if not plan:
        raise InputError("--cuts: give at least one LAYER:KEEP pair, e.g. --cuts 1:0.3")
    if rules.strip() == "all":
        before_llm = any(layer == 0 for layer, _ in plan)
        names = [r for r in RULES if not before_llm or pre_llm(r, at_layer(r, 0).params_dict())]
    else:
        names = [spec(r.strip()).name for r in rules.split(",") if r.strip()]
    if not names:
        raise InputError("--rules: name at least one selection rule, or 'all'")
    for r in names:  # one line for a cut past --layers, a bad keep, or a rule that cannot run at a cut
        rule_schedule(plan, layers, r, where=f"--cuts {cuts} --rules {r}")
    return plan, names


def _token_counts(tokens: str | None):
    if tokens is None:
        return None
    try:
        spatial, text = (int(x) for x in tokens.split(","))
    except ValueError:
        raise InputError(f"--tokens {tokens!r}: give SPATIAL,TEXT token counts, e.g. --tokens 1400,60")
    return spatial, text
