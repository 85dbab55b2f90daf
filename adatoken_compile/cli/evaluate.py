"""``eval`` and ``bench``: accuracy on a question set, and latency / FLOPs side by side."""

from __future__ import annotations

import click

from adatoken_compile import api, distributed
from adatoken_compile.benchmarking.report import format_bench
from adatoken_compile.cli.main import (default, echo_json, given, load_model, main, model_options, progress,
                                       provider_option, scales_out, user_errors)
from adatoken_compile.errors import InputError
from adatoken_compile.io import check_output, write_json


@main.command("eval")
@model_options
@click.option("--artifact", default=None, help="evaluate a compiled artifact (ONNX Runtime) next to the unpruned model")
@click.option("--baseline", default=None, help="with --artifact: identity-schedule artifact used as the unpruned reference "
              "(default: the PyTorch model given by --model)")
@click.option("--data", default=None, help=f"questions to answer [default: {default(api.evaluate, 'data')}]")
@click.option("--limit", default=None, type=click.IntRange(1, None),
              help=f"number of questions [default: {default(api.evaluate, 'limit')}]")
@click.option("--kind", "kinds", multiple=True,
              help="keep only the questions of this kind or template among the first --limit (repeatable), so "
                   "that the figures are a subset of the full --limit run's")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@click.option("--predictions", default=None, help="also write per-question predictions to this JSON file")
@click.option("--overwrite", is_flag=True, help="replace an existing --predictions file")
@provider_option
@user_errors
@scales_out
def eval_cmd(model, vision_tower, attn, artifact, baseline, data, limit, kinds, as_json, predictions, overwrite, provider):
    """Answer accuracy on a question set (overall and per question kind)."""
    if predictions:
        distributed.on_main(check_output, predictions, "file", overwrite=overwrite, is_dir=False)
    adapter = None if (artifact and baseline) else load_model(model, vision_tower, attn)
    n = limit or default(api.evaluate, "limit")
    bar = progress(n, "eval")
    try:
        res = api.evaluate(adapter, artifact=artifact, baseline=baseline, kinds=kinds, progress=bar, providers=provider,
                           **given(data=data, limit=limit))
    finally:
        bar.close()
    preds = res.pop("predictions", None)
    if predictions and preds is not None:
        distributed.on_main(write_json, predictions, preds, overwrite=overwrite)
    if not distributed.is_main():
        return
    if as_json:
        echo_json(res)
        return
    click.echo(f"{res['data']}: n={res['n']}  accuracy {res['accuracy']:.4f}"
               + (f"  (unpruned {res['baseline_accuracy']:.4f})" if "baseline_accuracy" in res else ""))
    if "paired" in res:
        pc = res["paired"]
        click.echo(f"  vs unpruned, same questions: {pc['changed']} answers changed (+{pc['gained']} right, -{pc['lost']} wrong), "
                   f"delta {pc['delta_points']:+.1f} pts, paired 95% CI {pc['delta_ci95_points'][0]:+.1f} .. "
                   f"{pc['delta_ci95_points'][1]:+.1f}")
    for k, v in res["per_kind"].items():
        click.echo(f"  {k:<10} {v['accuracy']:.4f}  (n={v['n']})")
    if res.get("per_template"):
        click.echo("per template: " + "  ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})"
                                                for k, v in res["per_template"].items()))


@main.command()
@model_options
@click.option("--artifact", default=None, help="pruned artifact to measure")
@click.option("--baseline", default=None, help="identity-schedule artifact of the same model "
              "(default: compiled from --model into a temporary directory)")
@click.option("--data", default=None, help=f"the question measured is the first of these [default: {default(api.bench, 'data')}]")
@click.option("--repeats", default=None, type=click.IntRange(1, None), help=f"[default: {default(api.bench, 'repeats')}]")
@click.option("--new-tokens", default=None, type=click.IntRange(1, 512),
              help=f"end-to-end answer length [default: {default(api.bench, 'new_tokens')}]")
@click.option("--threads", default=None, type=click.IntRange(1, None), help="ORT intra-op threads (default: ORT's choice)")
@click.option("--synthetic-7b", "synthetic", is_flag=True,
              help="also measure a random decoder of LLaVA-3D-7B width (hidden 4096, 32 heads, FFN 11008), reduced depth")
@click.option("--layers", default=2, show_default=True, type=click.IntRange(2, 32), help="depth of the synthetic 7B-width decoder")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@provider_option
@user_errors
def bench(model, vision_tower, attn, artifact, baseline, data, repeats, new_tokens, threads, synthetic, layers, as_json,
          provider):
    """Pruned vs unpruned artifact: prefill and end-to-end latency, FLOPs, realised fraction, overhead."""
    if not artifact and not synthetic:
        raise InputError("pass --artifact ART (and optionally --baseline ART0), or --synthetic-7b")
    log = (lambda m: click.echo(m, err=True))
    res = {}
    if artifact:
        adapter = None if baseline else load_model(model, vision_tower, attn)
        if not baseline:
            log("compiling the identity-schedule baseline ...")
        res = api.bench(artifact, baseline=baseline, model=adapter, threads=threads, providers=provider, log=log,
                        **given(data=data, repeats=repeats, new_tokens=new_tokens))
    if synthetic:
        from adatoken_compile.benchmarking.synthetic import synthetic_7b_width  # torch: not in the runtime install

        log(f"synthetic 7B-width decoder, {layers} layers (minutes) ...")
        res["synthetic_7b_width"] = synthetic_7b_width(layers=layers, schedule_keep=[(1, 0.3)],
                                                       repeats=repeats or default(api.bench, "repeats"), threads=threads)
    if as_json:
        echo_json(res)
        return
    click.echo(format_bench(res))
