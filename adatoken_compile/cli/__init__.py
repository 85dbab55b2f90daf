"""``adatoken-compile``: a thin command-line shell over the Python API."""

from __future__ import annotations

import functools
import os
import json
import sys

import click

from adatoken_compile.errors import InputError

# eval --kind: the benchmark's question kinds and templates (data.questions.KINDS / TEMPLATES,
# spelled out so that the CLI starts without importing the data package; a test keeps them equal)
EVAL_KINDS = ("attribute", "counting", "relation", "existence",
              "color_of_class", "class_of_color", "count", "exist", "closer", "farther", "closer_yesno")
MODEL_HELP = "checkpoint directory (LLaVA-3D layout or HF LLaVA) or bundled name; default: llava3d-tiny"


def user_errors(fn):
    """InputError -> one line on stderr, exit 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def model_options(fn):
    fn = click.option("--attn", "attn", default="sdpa", show_default=True, type=click.Choice(["sdpa", "eager"]),
                      help="attention implementation of the decoder")(fn)
    fn = click.option("--vision-tower", default=None, help="local CLIP vision-tower directory (overrides mm_vision_tower)")(fn)
    fn = click.option("--model", "-m", default=None, help=MODEL_HELP)(fn)
    return fn


def _load(model, vision_tower, attn):
    from adatoken_compile.models.registry import load_adapter

    return load_adapter(model, vision_tower=vision_tower, attn_implementation=attn)


def _sample(adapter, scene: str | None, image: str | None, question: str):
    from adatoken_compile.contract import Sample

    if adapter.family == "llava3d":
        if not scene:
            from adatoken_compile.benchmark3d.dataset import iter_samples

            s = next(iter_samples("test", limit=1))
            click.echo(f"(no --scene given: using generated test scene seed {s.meta.get('seed')})", err=True)
            return Sample(question=question or s.question, scene=s.scene, answer=None if question else s.answer)
        from adatoken_compile.runtime.scene import load_scene

        return Sample(question=question, scene=load_scene(scene))
    if not image:
        raise InputError("HF LLaVA model: pass --image IMG.npy ((H,W,3) uint8) or an image file")
    from adatoken_compile.runtime.engine import load_image

    return Sample(question=question, image=load_image(image))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adatoken-compile")
def main():
    """Calibrate, compile and run spatial-token pruning for LLaVA-3D-style models."""


@main.command()
@model_options
@click.option("--scene", default=None, help="scene .npz (LLaVA-3D); default: a generated test scene")
@click.option("--image", default=None, help="image file or .npy (HF LLaVA)")
@click.option("--question", "-q", default=None, help="question text")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--artifact", default=None, help="run a compiled artifact with ONNX Runtime instead of PyTorch")
@user_errors
def run(model, vision_tower, attn, scene, image, question, max_new_tokens, artifact):
    """Answer a question about a scene (greedy)."""
    if artifact:
        from adatoken_compile.runtime.engine import load as load_runtime

        rt = load_runtime(artifact)
        sample = rt.sample_from_args(scene=scene, image=image, question=question)
        if sample.meta.get("seed") is not None:
            click.echo(f"(no --scene given: using generated test scene seed {sample.meta['seed']})", err=True)
        click.echo(f"question: {sample.question}")
        click.echo("answer: ", nl=False)
        for piece in rt.stream(sample, max_new_tokens=max_new_tokens):
            click.echo(piece, nl=False)
        click.echo()
        if sample.answer is not None:
            click.echo(f"ground truth: {sample.answer}")
        return
    from adatoken_compile.compiler.generate import greedy_answers

    adapter = _load(model, vision_tower, attn)
    if not question and adapter.family != "llava3d":
        raise InputError("pass --question")
    sample = _sample(adapter, scene, image, question)
    ans = greedy_answers(adapter, [sample], max_new_tokens=max_new_tokens)[0]
    click.echo(f"question: {sample.question}")
    click.echo(f"answer: {ans}")
    if sample.answer is not None:
        click.echo(f"ground truth: {sample.answer}")


@main.command()
@model_options
@click.option("--scene", default=None, help="scene .npz: also print the token layout")
@click.option("--question", "-q", default="what is in the room?", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@user_errors
def inspect(model, vision_tower, attn, scene, question, as_json):
    """Print the architecture and, with --scene, the token layout."""
    adapter = _load(model, vision_tower, attn)
    info = adapter.describe()
    if scene:
        from adatoken_compile.contract import Sample
        from adatoken_compile.runtime.scene import load_scene

        seg = adapter.segment(Sample(question=question, scene=load_scene(scene)))
        (s, e), = seg.spans()
        info["layout"] = {"prefix": s, "spatial": e - s, "suffix": int(seg.embeds.shape[0]) - e,
                          "total": int(seg.embeds.shape[0])}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        if isinstance(v, dict):
            click.echo(f"{k}:")
            for k2, v2 in v.items():
                click.echo(f"  {k2}: {v2}")
        else:
            click.echo(f"{k}: {v}")


@main.command("make-scene")
@click.option("--seed", default=2_000_000, show_default=True, type=int, help="scene seed (test split starts at 2,000,000)")
@click.option("--out", required=True, help="output .npz")
@user_errors
def make_scene(seed, out):
    """Render a procedural scene to a scene .npz and print its questions."""
    from adatoken_compile.benchmark3d.dataset import make_scene as _make, questions_for

    scene, info = _make(seed)
    scene.save(out)
    click.echo(f"wrote {out}: {scene.num_views} views {scene.images.shape[1]}x{scene.images.shape[2]}")
    for q in questions_for(info, seed):
        click.echo(f"  [{q.kind}] {q.text} -> {q.answer}")


@main.command("make-tiny")
@click.option("--out", required=True, help="output checkpoint directory (released LLaVA-3D layout)")
@click.option("--decoder", default="llama", type=click.Choice(["llama", "qwen2"]), show_default=True)
@click.option("--layers", default=4, show_default=True, type=int)
@click.option("--shards", default=1, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@user_errors
def make_tiny(out, decoder, layers, shards, seed):
    """Write a tiny RANDOM checkpoint in the released LLaVA-3D layout (offline demos/tests)."""
    from adatoken_compile.models.testing import random_llava3d

    random_llava3d(out, decoder=decoder, layers=layers, shards=shards, seed=seed, image_size=224)
    click.echo(f"wrote {out}")


def _progress(total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True, leave=False)


@main.command("eval")
@model_options
@click.option("--artifact", default=None, help="evaluate a compiled artifact (ONNX Runtime) next to the unpruned model")
@click.option("--baseline", default=None, help="with --artifact: identity-schedule artifact used as the unpruned reference "
              "(default: the PyTorch model given by --model)")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "validation", "test", "calibration"]))
@click.option("--limit", default=500, show_default=True, type=click.IntRange(1, None), help="number of questions")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(EVAL_KINDS),
              help="keep only the questions of this kind or template among the first --limit (repeatable), so "
                   "that the figures are a subset of the full --limit run's")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@click.option("--predictions", default=None, help="also write per-question predictions to this JSON file")
@user_errors
def eval_cmd(model, vision_tower, attn, artifact, baseline, split, limit, kinds, as_json, predictions):
    """Answer accuracy on the procedural benchmark (overall and per question kind)."""
    from adatoken_compile.benchmark3d.dataset import iter_samples
    from adatoken_compile.evaluation.accuracy import evaluate, torch_answer_fn

    samples = [s for s in iter_samples(split, limit=limit)
               if not kinds or s.kind in kinds or s.meta.get("template") in kinds]
    if not samples:
        raise InputError(f"eval: no {' / '.join(kinds)} question among the first {limit} of the {split} split; "
                         "raise --limit")
    bar = _progress(len(samples), f"eval {split}")
    if artifact:
        from adatoken_compile.evaluation.accuracy import eval_artifact

        res = eval_artifact(artifact, samples, progress=bar, model=model, baseline=baseline)
    else:
        adapter = _load(model, vision_tower, attn)
        res = evaluate(torch_answer_fn(adapter), samples, progress=bar)
        res["model"] = adapter.describe()["fingerprint"]
    bar.close()
    res["split"] = split
    preds = res.pop("predictions", None)
    if predictions and preds is not None:
        _write_json(predictions, preds)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"split {split}: n={res['n']}  accuracy {res['accuracy']:.4f}"
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


def _write_json(path, obj):
    import os

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


@main.command()
@model_options
@click.option("--out", required=True, help="output directory (schedule.json, stats.*, report.md, PNGs)")
@click.option("--data", default="calibration", show_default=True,
              help="procedural split to calibrate on (calibration|validation|train)")
@click.option("--samples", default=None, type=click.IntRange(1, None),
              help="calibration questions, the held-back ones included [default: 448 for adaptive, 64 otherwise]")
@click.option("--start-scene", default=0, show_default=True, type=click.IntRange(0, None),
              help="first scene index of the split (shard calibration across machines)")
@click.option("--policy", default="adaptive", show_default=True,
              type=click.Choice(["adaptive", "fastv", "pdrop", "adatoken-decay", "random", "none"]))
@click.option("--flops-budget", default=None, type=float, help="adaptive: maximise fidelity under this prefill FLOPs ratio (0,1)")
@click.option("--fidelity", default=None, type=float, help="adaptive: minimise FLOPs with answer agreement >= this (0,1), "
              "shown at 95% confidence (the lower end of the Wilson interval on the held-back rows); the default when "
              "neither this nor --flops-budget is given: 0.95")
@click.option("--holdout", default=None,
              help="calibration questions held back to validate the schedule: a row count or a fraction in [0,1); "
                   "a fidelity target needs enough of them (73 rows for 0.95, 381 for 0.99) "
                   "[default: 384 for adaptive, 0.25 otherwise]")
@click.option("--like", default=None, help="random policy: copy the cuts of this schedule.json")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--merge", "merge_dirs", multiple=True, help="merge stats of these calibration dirs (repeat) instead of running")
@user_errors
def calibrate(model, vision_tower, attn, out, data, samples, start_scene, policy, flops_budget, fidelity, holdout, like, seed,
              merge_dirs):
    """Mine attention statistics and derive a static per-layer pruning schedule."""
    from adatoken_compile.calibration import api
    from adatoken_compile.evaluation.accuracy import calibration_batches

    if flops_budget is not None and fidelity is not None:
        raise InputError("pass either --flops-budget or --fidelity, not both")
    adaptive = policy == "adaptive"
    samples = samples if samples is not None else (448 if adaptive else 64)
    holdout = holdout if holdout is not None else ("384" if adaptive else "0.25")
    adapter = _load(model, vision_tower, attn)
    like_s = None
    if like:
        from adatoken_compile.schedule import Schedule

        like_s = Schedule.load(like)
    kw = dict(policy=policy, fidelity=fidelity, flops_budget=flops_budget, seed=seed, fingerprint=adapter.fingerprint(),
              family=adapter.family, model_name=str(model or "llava3d-tiny"), like=like_s)
    hold = _holdout(holdout)
    if merge_dirs:
        # the merged statistics need no new samples: validate on --holdout rows (a count), or on that
        # share of --samples (at least 8), from --start-scene on
        n_val = hold if isinstance(hold, int) else max(8, round(hold * samples))
        schedule, stats = api.calibrate_from_stats(adapter.decoder, [api.load_stats(d) for d in merge_dirs],
                                                   calibration_batches(adapter, data, n_val, start_scene=start_scene),
                                                   **kw)
    else:
        schedule, stats = api.calibrate(adapter.decoder, calibration_batches(adapter, data, samples, start_scene=start_scene),
                                        holdout=hold, **kw)
    api.write_calibration(out, schedule, stats)
    pred = schedule.predicted
    click.echo(f"wrote {out}/schedule.json: policy {schedule.policy}, cuts "
               + (", ".join(f"L{c.layer}:{c.keep:.3g}" for c in schedule.cuts) or "none")
               + (f", predicted prefill FLOPs ratio {pred['flops_ratio']:.3f}" if "flops_ratio" in pred else ""))
    fid = (schedule.calibration or {}).get("fidelity")
    if fid:
        lo, hi = fid.get("ci95", (None, None))
        click.echo(f"  validated on {fid['rows']} held-back rows: next-token agreement {fid['agreement']:.3f}"
                   + (f" (95% CI {lo:.3f}-{hi:.3f})" if lo is not None else ""))
        target = schedule.calibration.get("fidelity_target")
        if target is not None and lo is not None:
            click.echo(f"  fidelity target {target} met at 95% confidence: the interval's lower end {lo:.3f} >= {target}")


def _holdout(text: str) -> float | int:
    """--holdout: a fraction in [0, 1) or a whole row count."""
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"--holdout {text!r}: give a fraction in [0, 1) or a row count, e.g. --holdout 128") from None
    if v < 0 or (v >= 1 and v != int(v)):
        raise InputError(f"--holdout {text!r}: give a fraction in [0, 1) or a row count, e.g. --holdout 128")
    return v if v < 1 else int(v)


def _load_schedule(adapter, schedule: str | None):
    from adatoken_compile.schedule import Schedule, identity

    if schedule in (None, "none", "identity"):
        return identity(int(adapter.describe()["layers"]), fingerprint=adapter.fingerprint(), family=adapter.family)
    return Schedule.load(schedule)


@main.command("compile")
@model_options
@click.option("--schedule", "-s", "schedule", default=None,
              help="schedule.json from `calibrate` (default: identity, i.e. unpruned)")
@click.option("--out", "-o", required=True, help="artifact directory to write (replaced only on success)")
@click.option("--opset", default=None, type=int, help="ONNX opset (default: the exporter's)")
@click.option("--no-decode", is_flag=True, help="skip the decode graph (the artifact then answers 1 token)")
@user_errors
def compile_cmd(model, vision_tower, attn, schedule, out, opset, no_decode):
    """Capture, prune (token-drop pass) and export ONNX graphs into an artifact directory."""
    from adatoken_compile.compiler.pipeline import compile_artifact

    adapter = _load(model, vision_tower, attn)
    sched = _load_schedule(adapter, schedule)
    man = compile_artifact(adapter, sched, out, opset=opset, decode=False if no_decode else None)
    click.echo(f"wrote {man.path} in {man.data['compile_s']:.1f}s")
    for name, g in man.graphs.items():
        click.echo(f"  {name:<10} {g['file']:<16} {man.graph_bytes(name) / 1e6:9.2f} MB  opset {g['opset']}")
    total = sum(f["size"] for f in man.files.values())
    click.echo(f"  total      {len(man.files)} files      {total / 1e6:9.2f} MB")


@main.command()
@model_options
@click.option("--schedule", "-s", "schedule", required=True, help="schedule.json")
@user_errors
def diff(model, vision_tower, attn, schedule):
    """Print what the token-drop pass changes in the captured prefill graph, per cut."""
    from adatoken_compile.compiler.pipeline import diff_text

    adapter = _load(model, vision_tower, attn)
    click.echo(diff_text(adapter, _load_schedule(adapter, schedule)))


@main.command()
@model_options
@click.option("--artifact", default=None, help="pruned artifact to measure")
@click.option("--baseline", default=None, help="identity-schedule artifact of the same model "
              "(default: compiled from --model into a temporary directory)")
@click.option("--split", default="test", show_default=True, type=click.Choice(["validation", "test", "calibration"]))
@click.option("--repeats", default=7, show_default=True, type=click.IntRange(1, None))
@click.option("--new-tokens", default=16, show_default=True, type=click.IntRange(1, 512), help="end-to-end answer length")
@click.option("--threads", default=None, type=int, help="ORT intra-op threads (default: ORT's choice)")
@click.option("--synthetic-7b", "synthetic", is_flag=True,
              help="also measure a random decoder of LLaVA-3D-7B width (hidden 4096, 32 heads, FFN 11008), reduced depth")
@click.option("--layers", default=2, show_default=True, type=click.IntRange(2, 32), help="depth of the synthetic 7B-width decoder")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@user_errors
def bench(model, vision_tower, attn, artifact, baseline, split, repeats, new_tokens, threads, synthetic, layers, as_json):
    """Pruned vs unpruned artifact: prefill and end-to-end latency, FLOPs, realised fraction, overhead."""
    import tempfile

    from adatoken_compile.benchmarking.artifacts import bench_artifacts
    from adatoken_compile.benchmark3d.dataset import iter_samples

    if not artifact and not synthetic:
        raise InputError("pass --artifact ART (and optionally --baseline ART0), or --synthetic-7b")
    res = {}
    if artifact:
        samples = list(iter_samples(split, limit=1))
        with tempfile.TemporaryDirectory(prefix="adatoken-baseline-") as tmp:
            if not baseline:
                from adatoken_compile.compiler.pipeline import compile_artifact
                from adatoken_compile.runtime.engine import load as load_rt
                from adatoken_compile.schedule import identity

                adapter = _load(model, vision_tower, attn)
                if adapter.fingerprint() != load_rt(artifact, check_hashes=False).manifest.data["model"]["fingerprint"]:
                    raise InputError(f"{artifact}: compiled from another model than {model or 'the bundled model'}; "
                                     "pass --model DIR or --baseline ART0")
                click.echo("compiling the identity-schedule baseline ...", err=True)
                baseline = os.path.join(tmp, "identity")
                compile_artifact(adapter, identity(adapter.describe()["layers"], fingerprint=adapter.fingerprint()),
                                 baseline, progress=False)
            res = bench_artifacts(artifact, baseline, samples, repeats=repeats, new_tokens=new_tokens, threads=threads,
                                  log=lambda m: click.echo(m, err=True))
    if synthetic:
        from adatoken_compile.benchmarking.measure import synthetic_7b_width

        click.echo(f"synthetic 7B-width decoder, {layers} layers (minutes) ...", err=True)
        res["synthetic_7b_width"] = synthetic_7b_width(layers=layers, schedule_keep=[(1, 0.3)], repeats=repeats,
                                                       threads=threads)
    if as_json:
        click.echo(json.dumps(res, indent=2, default=float))
        return
    click.echo(format_bench(res))


def format_bench(res: dict) -> str:
    lines = []
    if "prefill" in res:
        p, e = res["prefill"], res["end_to_end"]
        lines.append(f"schedule {res['schedule']['policy']}: "
                     + (", ".join(f"L{c['layer']}:{c['keep']:.3g}" for c in res["schedule"]["cuts"]) or "identity")
                     + f"  (provider {res['provider']})")
        lines.append(f"prefill   latency {p['latency_s']['pruned']['median_s'] * 1e3:8.1f} ms vs "
                     f"{p['latency_s']['baseline']['median_s'] * 1e3:8.1f} ms  ratio {p['latency_ratio']:.3f}")
        lines.append(f"          FLOPs ratio {p['flops_ratio']:.3f} (graph count {p['flops_ratio_graph']:.3f})  "
                     f"realized fraction {p['realized_fraction']:.2f}  overhead fraction {p['overhead_fraction']:.4f}")
        if "latency_ratio" in e:
            lines.append(f"end2end   {e['new_tokens']} tokens {e['pruned']['latency_s']['median_s'] * 1e3:8.1f} ms vs "
                         f"{e['baseline']['latency_s']['median_s'] * 1e3:8.1f} ms  ratio {e['latency_ratio']:.3f}  "
                         f"FLOPs ratio {e['flops_ratio']:.3f}  realized {e['realized_fraction']:.2f}")
            lines.append(f"          TTFT ratio {e['ttft_ratio']:.3f}  per-token decode "
                         f"{e['pruned']['per_token_decode_s']['median_s'] * 1e3:.2f} ms vs "
                         f"{e['baseline']['per_token_decode_s']['median_s'] * 1e3:.2f} ms")
        kv = e["kv_cache_bytes"]
        lines.append(f"KV cache  {kv['pruned'] / 1e6:.2f} MB vs {kv['baseline'] / 1e6:.2f} MB per request (ratio {kv['ratio']:.3f})")
    if "synthetic_7b_width" in res:
        s = res["synthetic_7b_width"]
        lines.append(f"7B-width synthetic: latency ratio {s.get('latency_ratio', float('nan')):.3f}  FLOPs ratio "
                     f"{s.get('flops_ratio', float('nan')):.3f}  realized {s.get('realized_fraction', float('nan')):.2f}  "
                     f"overhead {s.get('overhead_fraction', float('nan')):.4f}")
    return "\n".join(lines)


@main.command()
@click.option("--out", default="runs/quickstart", show_default=True, help="output directory")
@click.option("--limit", default=60, show_default=True, type=click.IntRange(10, None),
              help="test questions per policy for accuracy")
@click.option("--samples", default=64, show_default=True, type=click.IntRange(8, None), help="calibration questions")
@click.option("--holdout", default=384, show_default=True, type=click.IntRange(2, None),
              help="other calibration questions that validate the adaptive schedules (the fidelity target needs "
                   "enough of them: 73 for 0.95, 381 for 0.99)")
@click.option("--fidelity", default=None, type=float,
              help="adaptive's agreement target, passed when the lower end of its 95% interval reaches it; default 0.95")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1, None))
@click.option("--all-artifacts", is_flag=True, help="compile every policy's artifact and measure its accuracy with ORT "
              "(default: ORT for adaptive + identity; peers through the parity-tested PyTorch reference)")
@click.option("--model", default=None, help="checkpoint directory or short name (default: the bundled llava3d-tiny)")
@user_errors
def quickstart(out, limit, samples, holdout, fidelity, repeats, all_artifacts, model):
    """The main job: calibrate -> compile -> eval -> bench on the bundled model, adaptive vs peers."""
    from adatoken_compile.quickstart import run_quickstart

    summary = run_quickstart(out, limit=limit, samples=samples, holdout_rows=holdout, repeats=repeats,
                             all_artifacts=all_artifacts, model=model, fidelity=fidelity,
                             log=lambda m: click.echo(m, err=True))
    click.echo(summary)


if __name__ == "__main__":  # pragma: no cover
    main()
