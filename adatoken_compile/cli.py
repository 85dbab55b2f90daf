"""``adatoken-compile``: a thin command-line shell over the Python API."""

from __future__ import annotations

import functools
import json
import sys

import click

from .errors import InputError

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
    from .models.registry import load_adapter

    return load_adapter(model, vision_tower=vision_tower, attn_implementation=attn)


def _sample(adapter, scene: str | None, image: str | None, question: str):
    from .contract import Sample

    if adapter.family == "llava3d":
        if not scene:
            from .data.dataset import iter_samples

            s = next(iter_samples("test", limit=1))
            click.echo(f"(no --scene given: using generated test scene seed {s.meta.get('seed')})", err=True)
            return Sample(question=question or s.question, scene=s.scene, answer=None if question else s.answer)
        from .scene import load_scene

        return Sample(question=question, scene=load_scene(scene))
    if not image:
        raise InputError("HF LLaVA model: pass --image IMG.npy ((H,W,3) uint8) or an image file")
    return Sample(question=question, image=_load_image(image))


def _load_image(path: str):
    import os

    import numpy as np

    if not os.path.exists(path):
        raise InputError(f"{path}: image not found")
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    from PIL import Image

    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except Exception as e:
        raise InputError(f"{path}: unreadable image ({e})")


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
        from .runtime import load as load_runtime

        rt = load_runtime(artifact)
        sample = rt.sample_from_args(scene=scene, question=question)
        click.echo(f"question: {sample.question}")
        click.echo("answer: ", nl=False)
        for piece in rt.stream(sample, max_new_tokens=max_new_tokens):
            click.echo(piece, nl=False)
        click.echo()
        if sample.answer is not None:
            click.echo(f"ground truth: {sample.answer}")
        return
    from .generate import greedy_answers

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
        from .contract import Sample
        from .scene import load_scene

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
    from .data.dataset import make_scene as _make, questions_for

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
    from .models.tiny import random_llava3d

    random_llava3d(out, decoder=decoder, layers=layers, shards=shards, seed=seed, image_size=224)
    click.echo(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
