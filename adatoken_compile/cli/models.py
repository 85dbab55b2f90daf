"""``run``, ``inspect``, ``make-scene``, ``make-tiny``: answer a question, look at a model, write inputs."""

from __future__ import annotations

import click

import os

from adatoken_compile import api
from adatoken_compile.cli.main import (check_provider, echo_json, load_model, main, model_options, provider_option,
                                       user_errors)
from adatoken_compile.benchmark3d.dataset import SPLITS, make_scene as render, questions_for
from adatoken_compile.data import load_samples
from adatoken_compile.runtime import embodiedscan, scannet
from adatoken_compile.data.questions import write_scanqa
from adatoken_compile.runtime.sources import SceneRef
from adatoken_compile.errors import InputError
from adatoken_compile.io import atomic_dir, atomic_file, check_output, mark_scene
from adatoken_compile.runtime.image import load_image
from adatoken_compile.runtime.prompt import check_question
from adatoken_compile.runtime.sample import Sample, Video

SCENE_HELP = "scene: .npz, ScanNet export folder, or EmbodiedScan info .json (INFO.json#SCENE)"


def depth_scale_option(fn):
    return click.option("--depth-scale", default=None, type=click.FloatRange(0, None, min_open=True),
                        help="depth PNG units per metre of a scene folder [default: the info file's, else 1000]")(fn)


def sample_from_args(input_kind: str, scene: str | None, image: str | None, question: str | None,
                     depth_scale: float | None = None, frames=(), fps: float = 2.0, video: str | None = None) -> Sample:
    """The sample a command line asks about. Scene models without --scene: the first built-in test
    scene and (without --question) its first question, with the ground truth. ``frames``: one
    video's frame files, after ``image`` in the prompt when both are given (as question files order
    them); ``video``: a video file instead, its frames sampled at ``fps``."""
    if video and frames:
        raise InputError("--video and --frames both give a video; pass one of them")
    if question is not None:
        check_question(question)
    if input_kind == "scene":
        if image or frames or video:
            given = "image" if image else ("video" if video else "frames")
            raise InputError(f"this model takes scenes: pass --scene, not --{given}")
        if scene:
            if not question:
                raise InputError("pass --question with --scene")
            return Sample(question=question, scene=SceneRef(scene, depth_scale))
        s = load_samples("builtin:test", limit=1)[0]
        click.echo(f"(no --scene given: using generated test scene seed {s.meta.get('seed')})", err=True)
        return Sample(question=question or s.question, scene=s.scene, answer=None if question else s.answer)
    if scene:
        raise InputError("this model takes images: pass --image, not --scene")
    if not (image or frames or video) or not question:
        raise InputError("this model takes images: pass --image IMG (.npy (H,W,3) uint8 or an image file) "
                         "or a video (--video FILE, or its --frames), and --question")
    media = [load_image(image)] if image else []
    if frames or video:
        media.append(Video(video or list(frames), fps))
    return Sample(question=question, image=media[0] if len(media) == 1 else media)


@main.command()
@model_options
@click.option("--scene", default=None, help=f"{SCENE_HELP} (3D models); default: a generated test scene")
@depth_scale_option
@click.option("--image", default=None, help="image file or .npy (HF LLaVA, Qwen2.5-VL)")
@click.option("--frames", multiple=True, help="one video's frames in order, a file each (repeat the option; "
              "Qwen2.5-VL); after --image in the prompt when both are given")
@click.option("--video", default=None, help="a video file (Qwen2.5-VL; decoded with PyAV, frames sampled at --fps); "
              "after --image in the prompt when both are given")
@click.option("--fps", default=2.0, show_default=True, type=click.FloatRange(0, None, min_open=True),
              help="with --frames: the rate they were sampled at (spaces their temporal positions); with --video: "
                   "the rate to sample it at")
@click.option("--question", "-q", default=None, help="question text")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--artifact", default=None, help="run a compiled artifact with ONNX Runtime instead of PyTorch")
@click.option("--digest", default=None, help="with --artifact: the sha256:... digest compile printed; refuse any other")
@provider_option
@user_errors
def run(model, vision_tower, attn, scene, depth_scale, image, frames, video, fps, question, max_new_tokens, artifact,
        digest, provider):
    """Answer a question about a scene or image (greedy)."""
    check_provider(provider)
    if artifact:
        rt = api.load(artifact, provider, expected_digest=digest)
        sample = sample_from_args(rt.input_kind, scene, image, question, depth_scale, frames, fps, video)
        pieces = rt.stream(sample, max_new_tokens=max_new_tokens)
        first = next(pieces, "")  # a refused input is refused here, before anything is printed
        click.echo(f"question: {sample.question}")
        click.echo("answer: " + first, nl=False)
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()
    else:
        adapter = load_model(model, vision_tower, attn)
        sample = sample_from_args(adapter.input_kind, scene, image, question, depth_scale, frames, fps, video)
        source = sample.scene if adapter.input_kind == "scene" else sample.image
        ans = api.generate(adapter, source, sample.question, max_new_tokens=max_new_tokens)
        click.echo(f"question: {sample.question}")
        click.echo(f"answer: {ans}")
    if sample.answer is not None:
        click.echo(f"ground truth: {sample.answer}")


@main.command()
@model_options
@click.option("--scene", default=None, help=f"{SCENE_HELP}: also print the token layout")
@depth_scale_option
@click.option("--question", "-q", default="what is in the room?", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@user_errors
def inspect(model, vision_tower, attn, scene, depth_scale, question, as_json):
    """Print the architecture and, with --scene, the token layout."""
    adapter = load_model(model, vision_tower, attn)
    info = adapter.describe()
    if scene:
        seg = adapter.segment(Sample(question=question, scene=SceneRef(scene, depth_scale)))
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


def scene_id_of(seed: int) -> str:
    return f"scene{seed}_00"


@main.command("make-scene")
@click.option("--seed", default=SPLITS["test"][0], show_default=True, type=click.IntRange(0, None),
              help="scene seed (the test split starts at 2,000,000)")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 100_000),
              help="scenes seed, seed+1, ...; with more than one, --out is the folder that holds them")
@click.option("--format", "fmt", default="npz", show_default=True, type=click.Choice(["npz", "scannet", "embodiedscan"]),
              help="npz: one scene file; scannet: a ScanNet export folder; embodiedscan: frames + an info .json")
@click.option("--image-format", default="png", show_default=True, type=click.Choice(["png", "jpg"]),
              help="colour frames of folder formats: PNG (lossless) or JPEG at quality 100")
@click.option("--out", required=True, help="output .npz, scene folder, or (--count > 1) the folder of scenes")
@click.option("--questions", "questions_out", default=None,
              help="also write the scenes' questions to this ScanQA-form .json (scene_id = the scene folder's name)")
@click.option("--overwrite", is_flag=True, help="replace an earlier output of this command")
@user_errors
def make_scene(seed, count, fmt, image_format, out, questions_out, overwrite):
    """Render procedural scenes: a scene .npz, or the ScanNet / EmbodiedScan layouts, and their
    questions in ScanQA form."""
    if fmt == "npz" and count > 1:
        raise InputError("--count > 1 needs a folder format: pass --format scannet or --format embodiedscan")
    if questions_out:
        check_output(questions_out, "questions", overwrite=overwrite, is_dir=False)
    seeds = range(seed, seed + count)
    single = count == 1
    ids = [os.path.basename(os.path.normpath(out)) if single and fmt == "scannet" else scene_id_of(s) for s in seeds]
    rows = []
    if fmt == "npz":
        check_output(out, "scene", overwrite=overwrite, is_dir=False)
    else:
        check_output(out, "scenes", overwrite=overwrite)

    def rendered():
        for sid, s in zip(ids, seeds):
            scene, info = render(s)
            for i, q in enumerate(questions_for(info, s)):
                rows.append({"question_id": f"{sid}-{i}", "scene_id": sid, "question": q.text, "answers": [q.answer],
                             "object_ids": [], "object_names": [], "type": q.kind})
            yield sid, scene

    if fmt == "npz":
        (_, scene), = rendered()
        with atomic_file(out, "scene", overwrite=overwrite) as tmp:
            scene.save(tmp)
            mark_scene(tmp)
        what = f"{scene.num_views} views {scene.images.shape[1]}x{scene.images.shape[2]}"
    else:
        with atomic_dir(out, "scenes", overwrite=overwrite, marker=True) as tmp:
            if fmt == "scannet":
                for sid, scene in rendered():
                    scannet.write(scene, tmp if single else os.path.join(tmp, sid), sid, image_format)
            else:
                embodiedscan.write(list(rendered()), tmp, image_format)
        what = f"{count} scene(s) in the {fmt} layout"
    click.echo(f"wrote {out}: {what}")
    if questions_out:
        with atomic_file(questions_out, "questions", overwrite=overwrite) as tmp:
            write_scanqa(tmp, rows)
        where = (os.path.dirname(os.path.abspath(out)) if single and fmt == "scannet"
                 else os.path.join(out, "embodiedscan_infos.json") if fmt == "embodiedscan" else out)
        click.echo(f"wrote {questions_out}: {len(rows)} questions (ScanQA form; pass --scenes {where})")
    elif single:
        for r in rows:
            click.echo(f"  [{r['type']}] {r['question']} -> {r['answers'][0]}")


@main.command("make-tiny")
@click.option("--out", required=True, help="output checkpoint directory")
@click.option("--preset", default=None, type=click.Choice(["llava3d-7b"]),
              help="full-size random checkpoint instead of a tiny one: llava3d-7b = 32 layers x 4096, 32 heads, "
                   "FFN 11008, vocab 32000, CLIP-L/14-336 tower, float16 shards of 2 GB (13.5 GB on disk; written "
                   "shard by shard, a few GB of memory)")
@click.option("--family", default="llava3d", type=click.Choice(["llava3d", "qwen2_5_vl"]), show_default=True,
              help="llava3d: the released LLaVA-3D layout; qwen2_5_vl: a Qwen2_5_VLForConditionalGeneration checkpoint "
                   "(GQA decoder, windowed + full-attention vision blocks, Qwen2VLImageProcessor, chat template)")
@click.option("--decoder", default="llama", type=click.Choice(["llama", "qwen2"]), show_default=True)
@click.option("--layers", default=None, type=click.IntRange(1, 64),
              help="decoder depth [default: 4, or the preset's]")
@click.option("--shards", default=1, show_default=True, type=click.IntRange(1, 64), help="tiny checkpoints only")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--overwrite", is_flag=True, help="replace an earlier make-tiny output at --out")
@user_errors
def make_tiny(out, family, preset, decoder, layers, shards, seed, overwrite):
    """Write a RANDOM checkpoint in the released LLaVA-3D layout, or a tiny Qwen2.5-VL one (offline
    demos, tests, scale checks)."""
    from adatoken_compile.models.testing import (random_llava3d, random_llava3d_preset,  # torch: not in the runtime install
                                                 random_qwen25vl)

    check_output(out, "checkpoint", overwrite=overwrite)
    if family == "qwen2_5_vl":
        if preset or decoder != "llama" or shards != 1:
            raise InputError("--family qwen2_5_vl writes one tiny checkpoint; drop --preset / --decoder / --shards")
        random_qwen25vl(out, layers=layers or 4, seed=seed, overwrite=overwrite)
    elif preset:
        if decoder != "llama" or shards != 1:
            raise InputError(f"--preset {preset} fixes the decoder and the sharding; drop --decoder / --shards")
        random_llava3d_preset(out, preset, seed=seed, overwrite=overwrite, log=lambda m: click.echo(m, err=True),
                              **({"layers": layers} if layers else {}))
    else:
        random_llava3d(out, decoder=decoder, layers=layers or 4, shards=shards, seed=seed, image_size=224,
                       overwrite=overwrite)
    click.echo(f"wrote {out}")
