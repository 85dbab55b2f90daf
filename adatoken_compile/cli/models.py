"""``run``, ``inspect``, ``make-scene``, ``make-tiny``: answer a question, look at a model, write inputs."""

from __future__ import annotations

import click

from adatoken_compile import api
from adatoken_compile.cli.main import (check_provider, echo_json, load_model, main, model_options, provider_option,
                                       user_errors)
from adatoken_compile.benchmark3d.dataset import make_scene as render, questions_for
from adatoken_compile.data import load_samples
from adatoken_compile.errors import InputError
from adatoken_compile.io import atomic_file, check_output
from adatoken_compile.runtime.image import load_image
from adatoken_compile.runtime.sample import Sample
from adatoken_compile.runtime.scene import load_scene


def sample_from_args(input_kind: str, scene: str | None, image: str | None, question: str | None) -> Sample:
    """The sample a command line asks about. Scene models without --scene: the first built-in test
    scene and (without --question) its first question, with the ground truth."""
    if input_kind == "scene":
        if image:
            raise InputError("this model takes scenes: pass --scene, not --image")
        if scene:
            if not question:
                raise InputError("pass --question with --scene")
            return Sample(question=question, scene=load_scene(scene))
        s = load_samples("builtin:test", limit=1)[0]
        click.echo(f"(no --scene given: using generated test scene seed {s.meta.get('seed')})", err=True)
        return Sample(question=question or s.question, scene=s.scene, answer=None if question else s.answer)
    if scene:
        raise InputError("this model takes images: pass --image, not --scene")
    if not image or not question:
        raise InputError("this model takes images: pass --image IMG (.npy (H,W,3) uint8 or an image file) and --question")
    return Sample(question=question, image=load_image(image))


@main.command()
@model_options
@click.option("--scene", default=None, help="scene .npz (3D models); default: a generated test scene")
@click.option("--image", default=None, help="image file or .npy (HF LLaVA)")
@click.option("--question", "-q", default=None, help="question text")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--artifact", default=None, help="run a compiled artifact with ONNX Runtime instead of PyTorch")
@click.option("--digest", default=None, help="with --artifact: the sha256:... digest compile printed; refuse any other")
@provider_option
@user_errors
def run(model, vision_tower, attn, scene, image, question, max_new_tokens, artifact, digest, provider):
    """Answer a question about a scene or image (greedy)."""
    check_provider(provider)
    if artifact:
        rt = api.load(artifact, provider, expected_digest=digest)
        sample = sample_from_args(rt.input_kind, scene, image, question)
        click.echo(f"question: {sample.question}")
        click.echo("answer: ", nl=False)
        for piece in rt.stream(sample, max_new_tokens=max_new_tokens):
            click.echo(piece, nl=False)
        click.echo()
    else:
        adapter = load_model(model, vision_tower, attn)
        sample = sample_from_args(adapter.input_kind, scene, image, question)
        source = sample.scene if adapter.input_kind == "scene" else sample.image
        ans = api.generate(adapter, source, sample.question, max_new_tokens=max_new_tokens)
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
    adapter = load_model(model, vision_tower, attn)
    info = adapter.describe()
    if scene:
        seg = adapter.segment(Sample(question=question, scene=load_scene(scene)))
        (s, e), = seg.spans()
        info["layout"] = {"prefix": s, "spatial": e - s, "suffix": int(seg.embeds.shape[0]) - e,
                          "total": int(seg.embeds.shape[0])}
    if as_json:
        echo_json(info)
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
@click.option("--overwrite", is_flag=True, help="replace an existing file")
@user_errors
def make_scene(seed, out, overwrite):
    """Render a procedural scene to a scene .npz and print its questions."""
    check_output(out, "file", overwrite=overwrite, is_dir=False)
    scene, info = render(seed)
    with atomic_file(out, overwrite=overwrite) as tmp:
        scene.save(tmp)
    click.echo(f"wrote {out}: {scene.num_views} views {scene.images.shape[1]}x{scene.images.shape[2]}")
    for q in questions_for(info, seed):
        click.echo(f"  [{q.kind}] {q.text} -> {q.answer}")


@main.command("make-tiny")
@click.option("--out", required=True, help="output checkpoint directory (released LLaVA-3D layout)")
@click.option("--preset", default=None, type=click.Choice(["llava3d-7b"]),
              help="full-size random checkpoint instead of a tiny one: llava3d-7b = 32 layers x 4096, 32 heads, "
                   "FFN 11008, vocab 32000, CLIP-L/14-336 tower, float16 shards of 2 GB (13.5 GB on disk; written "
                   "shard by shard, a few GB of memory)")
@click.option("--decoder", default="llama", type=click.Choice(["llama", "qwen2"]), show_default=True)
@click.option("--layers", default=None, type=click.IntRange(1, 64),
              help="decoder depth [default: 4, or the preset's]")
@click.option("--shards", default=1, show_default=True, type=click.IntRange(1, 64), help="tiny checkpoints only")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="replace an earlier make-tiny output at --out")
@user_errors
def make_tiny(out, preset, decoder, layers, shards, seed, overwrite):
    """Write a RANDOM checkpoint in the released LLaVA-3D layout (offline demos, tests, scale checks)."""
    from adatoken_compile.models.testing import random_llava3d, random_llava3d_preset  # torch: not in the runtime install

    check_output(out, "checkpoint", overwrite=overwrite)
    if preset:
        if decoder != "llama" or shards != 1:
            raise InputError(f"--preset {preset} fixes the decoder and the sharding; drop --decoder / --shards")
        random_llava3d_preset(out, preset, seed=seed, overwrite=overwrite, log=lambda m: click.echo(m, err=True),
                              **({"layers": layers} if layers else {}))
    else:
        random_llava3d(out, decoder=decoder, layers=layers or 4, shards=shards, seed=seed, image_size=224,
                       overwrite=overwrite)
    click.echo(f"wrote {out}")
