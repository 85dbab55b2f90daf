"""Qwen2.5-VL (transformers' own ``Qwen2_5_VLForConditionalGeneration`` on a tiny random checkpoint:
GQA decoder, windowed and full-attention vision blocks, odd image sizes, two images in one prompt)
against transformers itself: the image processor, the vision tower, the M-RoPE positions and
greedy generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adatoken_compile.contract import Sample
from adatoken_compile.errors import InputError
from adatoken_compile.models.testing import random_qwen25vl
from adatoken_compile.runtime.sample import Video

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    # two decoder layers and two vision blocks (one windowed, one full): every kind, exported quickly
    # (seed 1: a random model whose greedy tokens change when decoding continues from the wrong position)
    return random_qwen25vl(str(tmp_path_factory.mktemp("qwen25vl") / "ckpt"), layers=2, vision_depth=2,
                           fullatt_blocks=(1,), seed=1)


@pytest.fixture(scope="module")
def adapter(qwen_dir):
    from adatoken_compile.models.registry import load_adapter

    return load_adapter(qwen_dir)


def images():
    rng = np.random.default_rng(0)
    # 5x7 merged tokens (four 4x4-token windows), 2x3, and a tall 11x1 strip
    return [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((150, 203, 3), (61, 97, 3), (300, 33, 3))]


def samples():
    im = images()
    return [Sample("what color is the ball?", image=im[0]), Sample("how many chairs are there?", image=[im[1], im[2]])]


def hf_generate(adapter, batch_samples, max_new_tokens=NEW_TOKENS):
    hf = adapter.hf_inputs(batch_samples)
    with torch.no_grad():
        out = adapter.vl.generate(**hf, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=adapter.eos_token_id,
                                  pad_token_id=adapter.tokenizer.pad_id)
    rows = []
    for r in out[:, hf["input_ids"].shape[1]:].tolist():
        rows.append(r[:r.index(adapter.eos_token_id)] if adapter.eos_token_id in r else r)
    return rows


def test_patches_are_the_processors(adapter, qwen_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    with open(f"{qwen_dir}/preprocessor_config.json") as f:
        cfg = {k: v for k, v in json.load(f).items() if k != "image_processor_type"}
    proc = Qwen2VLImageProcessorPil(**cfg)
    for im in images():
        want = proc(images=[im], return_tensors="np")
        got, grid = adapter.pixels(im)
        assert np.array_equal(grid[None], want["image_grid_thw"])
        assert np.allclose(got, want["pixel_values"], atol=1e-6)


def test_exported_tower_module_is_the_towers(adapter):
    """The per-image tower with window ids (what the ONNX encoder is) gives transformers' tokens."""
    proc = adapter.processing
    for im in images():
        pix, grid = adapter.pixels(im)
        feeds = proc.encoder_feeds(pix, grid)
        with torch.no_grad():
            want = adapter.vl.model.get_image_features(torch.from_numpy(pix), torch.from_numpy(grid[None])).pooler_output[0]
            got = adapter.tower(*(torch.from_numpy(feeds[k]) for k in ("pixel_values", "vision_position_ids", "window_ids")))
        assert np.allclose(proc.unpermute(got.numpy(), grid), want.numpy(), atol=1e-5)
        assert len(set(feeds["window_ids"].tolist())) == (4 if grid[1] == 10 else 1 if grid[1] == 4 else 3)


def test_positions_are_get_rope_index(adapter):
    """Left-padded batch, two images in the second row: the mrope layout gives transformers'
    positions on every real token and continues where its rope_deltas say."""
    ss = samples()
    batch = adapter.prepare(ss)
    hf = adapter.hf_inputs(ss)
    want, deltas = adapter.vl.model.get_rope_index(hf["input_ids"], image_grid_thw=hf["image_grid_thw"],
                                                   attention_mask=hf["attention_mask"],
                                                   mm_token_type_ids=hf["mm_token_type_ids"])
    am = hf["attention_mask"].bool()
    assert torch.equal(batch.attention_mask.bool(), am)
    got = adapter.spec.positions(batch)
    assert torch.equal(got[:, am], want[:, am])
    for t in (0, 3):
        nxt = adapter.spec.decode_positions(batch, t)
        assert torch.equal(nxt[:, :, 0], (am.sum(1) + deltas[:, 0] + t)[None].expand(3, -1))
    assert torch.equal(batch.spatial_mask, hf["input_ids"] == adapter.image_token_id)


def test_adapter_generation_is_transformers_generate(adapter, monkeypatch):
    from adatoken_compile.compiler.reference import generate
    from adatoken_compile.schedule import identity

    ss = samples()
    want = hf_generate(adapter, ss)
    assert want[0] != want[1]
    batch = adapter.prepare(ss)
    sched = identity(adapter.arch()["num_layers"])
    got = generate(adapter.decoder, batch, sched, max_new_tokens=NEW_TOKENS, eos_token_id=adapter.eos_token_id)
    assert got == want
    # the comparison sees the continuation: decoding from the prompt length instead of rope_deltas differs
    monkeypatch.setattr(adapter.spec, "decode_positions", lambda inputs, steps=0: torch.as_tensor(
        inputs.lengths())[None, :, None].expand(3, -1, 1) + steps)
    assert generate(adapter.decoder, batch, sched, max_new_tokens=NEW_TOKENS, eos_token_id=adapter.eos_token_id) != want


def test_processor_disagreeing_with_the_vision_config_is_refused(qwen_dir, tmp_path):
    import shutil

    from adatoken_compile.models.qwen25vl import Qwen25VLAdapter

    bad = tmp_path / "bad"
    shutil.copytree(qwen_dir, bad)
    with open(bad / "preprocessor_config.json") as f:
        cfg = json.load(f)
    cfg["patch_size"] = 16
    with open(bad / "preprocessor_config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(InputError, match=r"preprocessor_config.json: patch_size 16 disagrees with the vision config's 14"):
        Qwen25VLAdapter(str(bad))


# ----------------------------------------------------------------------------- pruning with M-RoPE

SCHEDULE_CUTS = [(0, 0.6, "stratified"), (1, 0.5, "last_token")]


def pruned_schedule(adapter, cuts=SCHEDULE_CUTS):
    from adatoken_compile.schedule import Cut, Schedule
    from adatoken_compile.selection import Rule

    rules = {"stratified": Rule.of("stratified", rank="random"), "last_token": Rule.of("last_token")}
    return Schedule(cuts=[Cut(layer, keep, rules[r]) for layer, keep, r in cuts],
                    num_layers=adapter.arch()["num_layers"], fingerprint=adapter.fingerprint(), family=adapter.family)


def test_a_cut_before_layer_0_is_the_text_model_on_the_kept_tokens_at_their_positions(adapter):
    """Pruning before the LLM: transformers' text model run on the kept tokens alone, each with its
    ORIGINAL (t, h, w) position ids, gives the executor's logits; decoding continues where the
    unpruned prompt's rope_deltas say (M-RoPE: an image of h x w tokens spans max(h, w) positions)."""
    from adatoken_compile.compiler.executor import pruned_prefill

    ss = samples()
    batch = adapter.prepare(ss)
    sched = pruned_schedule(adapter, [(0, 0.4, "stratified")])
    res = pruned_prefill(adapter.decoder, batch, sched)
    kept = res.kept_indices[0]  # (B, K) original positions, -1 on padding
    pos = adapter.spec.positions(batch)
    for b in range(len(ss)):
        idx = kept[b][kept[b] >= 0]
        assert int(batch.spatial_mask[b, idx].sum()) < int(batch.spatial_mask[b].sum())
        with torch.no_grad():
            out = adapter.decoder.model(inputs_embeds=batch.inputs_embeds[b:b + 1, idx],
                                        position_ids=pos[:, b:b + 1, idx])
            want = adapter.decoder.lm_head(out.last_hidden_state[:, -1])[0]
        assert torch.allclose(res.logits_last[b], want, atol=1e-5)
    hf = adapter.hf_inputs(ss)
    _, deltas = adapter.vl.model.get_rope_index(hf["input_ids"], image_grid_thw=hf["image_grid_thw"],
                                                attention_mask=hf["attention_mask"],
                                                mm_token_type_ids=hf["mm_token_type_ids"])
    start = hf["attention_mask"].sum(1) + deltas[:, 0]
    assert torch.equal(adapter.spec.decode_positions(batch, 0)[0, :, 0], start)
    assert (start != (kept >= 0).sum(1)).all()  # neither the kept length nor the prompt's
    assert (start != hf["attention_mask"].sum(1)).all()


@pytest.fixture(scope="module")
def identity_artifact(adapter, tmp_path_factory):
    from adatoken_compile.compiler.pipeline import compile_artifact
    from adatoken_compile.schedule import Schedule

    out = str(tmp_path_factory.mktemp("qwen_art") / "identity")
    sched = Schedule(cuts=[], num_layers=adapter.arch()["num_layers"], fingerprint=adapter.fingerprint(),
                     family=adapter.family)
    compile_artifact(adapter, sched, out, progress=False)
    return out


def test_identity_artifact_is_transformers_generate(adapter, identity_artifact):
    """The torch-free runtime rebuilds patches, window ids, grids and M-RoPE positions in numpy;
    its greedy tokens are transformers' own generate's."""
    from adatoken_compile.runtime import load

    rt = load(identity_artifact)
    assert rt.positions.name == "mrope"
    ss = samples()
    feeds = rt.prepare(ss)
    batch = adapter.prepare(ss)
    assert np.array_equal(feeds["position_ids"], adapter.spec.positions(batch).numpy())
    assert np.allclose(feeds["inputs_embeds"], batch.inputs_embeds.numpy(), atol=1e-5)
    got = np.stack(list(rt.generate_ids(feeds, NEW_TOKENS, ignore_eos=True)), axis=1).tolist()
    want = hf_generate(adapter, ss)
    assert [g[:len(w)] for g, w in zip(got, want)] == want
    assert rt.generate(ss[1].image, ss[1].question, max_new_tokens=NEW_TOKENS) == \
        adapter.tokenizer.decode(want[1]).strip()


@pytest.fixture(scope="module")
def pruned_artifact(adapter, identity_artifact, tmp_path_factory):
    from adatoken_compile.compiler.pipeline import compile_artifact

    out = str(tmp_path_factory.mktemp("qwen_art") / "pruned")
    compile_artifact(adapter, pruned_schedule(adapter), out, progress=False, reuse=identity_artifact)
    return out


def check_pruned_artifact(adapter, artifact, ss):
    from adatoken_compile.compiler.executor import pruned_prefill
    from adatoken_compile.compiler.reference import generate
    from adatoken_compile.runtime import load

    sched = pruned_schedule(adapter)
    rt = load(artifact)
    feeds = rt.prepare(ss)
    batch = adapter.prepare(ss)
    got = np.stack(list(rt.generate_ids(feeds, NEW_TOKENS, ignore_eos=True)), axis=1).tolist()
    want = generate(adapter.decoder, batch, sched, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert got == want
    ref = pruned_prefill(adapter.decoder, batch, sched)
    assert len(rt.last_kept) == 2
    for k, r in zip(rt.last_kept, ref.kept_indices):
        assert np.array_equal(k, r.numpy())
    # per-layer caches: layer 0 holds the tokens kept before it, layer 1 fewer again
    out = rt.prefill(feeds)
    n0, n1 = out["mask.0"].sum(1), out["mask.1"].sum(1)
    assert (n0 < feeds["attention_mask"].sum(1)).all() and (n1 < n0).all()


def test_pruned_artifact_matches_the_eager_pruned_reference(adapter, pruned_artifact):
    """A cut before layer 0 ranked by (t, h, w) cells and an attention cut after it: the artifact
    keeps the eager reference's tokens and generates its tokens over per-layer pruned caches."""
    check_pruned_artifact(adapter, pruned_artifact, samples())


def test_make_tiny_writes_a_qwen25vl_checkpoint(tmp_path):
    from click.testing import CliRunner

    from adatoken_compile.cli import main
    from adatoken_compile.models.registry import load_adapter

    out = str(tmp_path / "tiny")
    res = CliRunner().invoke(main, ["make-tiny", "--family", "qwen2_5_vl", "--layers", "2", "--out", out])
    assert res.exit_code == 0, res.output
    a = load_adapter(out)
    assert a.family == "qwen2_5_vl" and a.arch()["num_layers"] == 2 and a.arch()["kv_heads"] < a.arch()["heads"]
    bad = CliRunner().invoke(main, ["make-tiny", "--family", "qwen2_5_vl", "--decoder", "qwen2", "--out",
                                    str(tmp_path / "x")])
    assert bad.exit_code == 2 and bad.output.startswith("error: --family qwen2_5_vl writes one tiny checkpoint")


def test_images_past_the_prompt_limit_are_one_line(identity_artifact, monkeypatch):
    from adatoken_compile.runtime import load

    rt = load(identity_artifact)
    monkeypatch.setenv("ADATOKEN_COMPILE_MAX_SPATIAL_TOKENS", "40")
    im = images()
    assert rt.prepare([Sample("what is here?", image=im[0])])["spatial_mask"].sum() == 35
    with pytest.raises(InputError, match=r"^item 0: 2 images give 41 spatial tokens, more than the limit of 40 a prompt"):
        rt.prepare([Sample("what is here?", image=[im[0], im[1]])])
    monkeypatch.setenv("ADATOKEN_COMPILE_MAX_SPATIAL_TOKENS", "5")
    with pytest.raises(InputError, match=r"^item 0: 1 video and 1 image give \d+ spatial tokens, more than the limit"):
        rt.prepare([video_samples()[1]])


# ----------------------------------------------------------------------------- videos


def videos():
    rng = np.random.default_rng(2)
    # 5 frames (odd: the last one repeated) at Qwen's 2 fps, 4 frames at 24 fps (t steps of 1/3 truncated)
    return [Video([rng.integers(0, 255, (61, 97, 3), dtype=np.uint8) for _ in range(5)]),
            Video([rng.integers(0, 255, (75, 131, 3), dtype=np.uint8) for _ in range(4)], fps=24)]


def video_samples():
    v = videos()
    return [Sample("what happens in the video?", image=v[0]),
            Sample("what changes from the video to the picture?", image=[v[1], images()[1]])]


def transformers_video_patchify():
    """``Qwen2VLVideoProcessor.patchify``, transformers' own code, without importing its module (which
    needs torchvision for its resize)."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec("transformers.models.qwen2_vl.video_processing_qwen2_vl").origin
    with open(origin) as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    ns = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), origin, "exec"), ns)
    return ns["patchify"]


def test_video_patches_are_the_video_processors(adapter, qwen_dir):
    """Each frame resized and normalised by the image processor, then the video processor's own
    temporal patching (an odd frame count padded with the last frame) and grid."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    with open(f"{qwen_dir}/preprocessor_config.json") as f:
        proc = Qwen2VLImageProcessorPil(**{k: v for k, v in json.load(f).items() if k != "image_processor_type"})
    frames = []
    own = proc.patchify
    proc.patchify = lambda image, **kw: frames.append(image) or own(image, **kw)
    patchify = transformers_video_patchify()
    for video, grid_t in zip(videos(), (3, 2)):
        frames.clear()
        proc(images=video.frames, return_tensors="np")
        want, *grid = patchify(None, torch.from_numpy(np.stack(frames))[None], 14, 2, 2)
        got, got_grid = adapter.pixels(video)
        assert got_grid.tolist() == grid and grid[0] == grid_t
        assert np.allclose(got, want[0].numpy(), atol=1e-6)
        # transformers' video processor resizes uint8 frames with torchvision, which on CPU is torch's
        # antialiased bicubic: it differs from Pillow's by at most one grey level on these frames
        h, w = 14 * grid[1], 14 * grid[2]
        tv = torch.nn.functional.interpolate(torch.from_numpy(np.stack(video.frames)).permute(0, 3, 1, 2).contiguous(),
                                             size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        mean, std = (torch.tensor(v)[:, None, None] for v in (proc.image_mean, proc.image_std))
        tv_patches = patchify(None, ((tv.float() / 255 - mean) / std)[None], 14, 2, 2)[0][0].numpy()
        assert 0 < np.abs(got - tv_patches).max() <= 1 / 255 / min(proc.image_std) + 1e-5


def test_video_tower_runs_per_temporal_patch_as_transformers(adapter):
    """The exported one-image tower run on each temporal patch (what the runtime does) gives
    transformers' video features: its attention never crosses temporal patches."""
    for video in videos():
        pix, grid = adapter.pixels(video)
        with torch.no_grad():
            want = adapter.vl.model.get_video_features(torch.from_numpy(pix), torch.from_numpy(grid[None])).pooler_output[0]
            got, xyz = adapter.processing.encode(video, lambda feeds: adapter.tower(
                *(torch.from_numpy(feeds[k]) for k in adapter.processing.ENCODER_INPUTS)).numpy())
        assert np.allclose(got, want.numpy(), atol=1e-5)
        assert np.array_equal(xyz, adapter.image_tokens(video)[1].numpy())


def test_video_positions_are_get_rope_index(adapter):
    """A video at 2 fps, one at 24 fps with an image after it, left-padded: transformers' positions
    (t scaled by tokens_per_second * second_per_grid_ts) and its rope_deltas."""
    ss = video_samples()
    batch = adapter.prepare(ss)
    hf = adapter.hf_inputs(ss)
    assert hf["video_grid_thw"].tolist() == [[3, 4, 6], [2, 6, 10]]
    want, deltas = adapter.vl.model.get_rope_index(hf["input_ids"], image_grid_thw=hf["image_grid_thw"],
                                                   video_grid_thw=hf["video_grid_thw"],
                                                   second_per_grid_ts=hf["second_per_grid_ts"],
                                                   attention_mask=hf["attention_mask"],
                                                   mm_token_type_ids=hf["mm_token_type_ids"])
    am = hf["attention_mask"].bool()
    got = adapter.spec.positions(batch)
    assert torch.equal(got[:, am], want[:, am])
    # the first video's time axis runs past its rows and columns (t up to 2 * 4), yet the text goes on
    # after the rows and columns: positions and the decode start both depend on the rule
    assert int(batch.spatial_xyz[0, :, 0].max()) == 8
    nxt = adapter.spec.decode_positions(batch, 0)
    assert torch.equal(nxt[:, :, 0], (am.sum(1) + deltas[:, 0])[None].expand(3, -1))
    assert torch.equal(batch.spatial_mask, hf["mm_token_type_ids"] > 0)


def test_video_generation_is_transformers_generate(adapter, identity_artifact, tmp_path):
    """The PyTorch adapter and the torch-free identity artifact (frames read from files) give
    transformers' own greedy tokens for a video, and a video with an image."""
    from PIL import Image

    from adatoken_compile.compiler.reference import generate
    from adatoken_compile.runtime import load
    from adatoken_compile.schedule import identity

    ss = video_samples()
    want = hf_generate(adapter, ss)
    got = generate(adapter.decoder, adapter.prepare(ss), identity(adapter.arch()["num_layers"]),
                   max_new_tokens=NEW_TOKENS, eos_token_id=adapter.eos_token_id)
    assert got == want
    rt = load(identity_artifact)
    feeds = rt.prepare(ss)
    assert np.array_equal(feeds["position_ids"], adapter.spec.positions(adapter.prepare(ss)).numpy())
    ids = np.stack(list(rt.generate_ids(feeds, NEW_TOKENS, ignore_eos=True)), axis=1).tolist()
    assert [g[:len(w)] for g, w in zip(ids, want)] == want
    paths = []
    for i, frame in enumerate(ss[0].image.frames):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(frame).save(paths[-1])
    assert rt.generate(Video(paths), ss[0].question, max_new_tokens=NEW_TOKENS) == adapter.tokenizer.decode(want[0]).strip()


def test_video_pruned_artifact_matches_the_eager_pruned_reference(adapter, pruned_artifact):
    check_pruned_artifact(adapter, pruned_artifact, video_samples())


def test_bad_videos_are_one_line(adapter, identity_artifact, qwen_dir, tmp_path):
    import shutil

    from click.testing import CliRunner
    from PIL import Image

    from adatoken_compile.cli import main
    from adatoken_compile.models.qwen25vl import Qwen25VLAdapter
    from adatoken_compile.runtime import load

    rng = np.random.default_rng(0)
    mixed = Video([rng.integers(0, 255, (61, 97, 3), dtype=np.uint8), rng.integers(0, 255, (60, 97, 3), dtype=np.uint8)])
    one_size = r"frame 1 of a video is 97x60 pixels, frame 0 97x61; the frames of one video must be one size"
    with pytest.raises(InputError, match=r"^video frame 1: " + one_size):
        adapter.pixels(mixed)
    with pytest.raises(InputError, match=r"^video frame 1: " + one_size):
        load(identity_artifact).prepare([Sample("what is here?", image=mixed)])
    # from a question file: the command names the frame's file, one line, exit 2
    for i, frame in enumerate(mixed.frames):
        Image.fromarray(frame).save(tmp_path / f"f{i}.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "what moves?", "frames": ["f0.png", "f1.png"]}))
    res = CliRunner().invoke(main, ["eval", "--artifact", identity_artifact, "--baseline", identity_artifact,
                                    "--data", str(tmp_path / "q.jsonl"), "--limit", "1"])
    errors = [line for line in res.output.replace("\r", "\n").splitlines() if "error" in line]
    assert res.exit_code == 2 and len(errors) == 1 and res.output.endswith(errors[0] + "\n")
    assert errors[0].startswith(f"error: {tmp_path / 'f1.png'}: " + one_size), res.output
    with pytest.raises(InputError, match=r"^video: fps 0 must be a number > 0"):
        Video(mixed.frames, fps=0)
    bad = tmp_path / "novideo"
    shutil.copytree(qwen_dir, bad)
    with open(bad / "config.json") as f:
        cfg = json.load(f)
    cfg["video_token_id"] = 10 ** 6
    with open(bad / "config.json", "w") as f:
        json.dump(cfg, f)
    a = Qwen25VLAdapter(str(bad))
    assert a.pixels(images()[1])[1].tolist() == [1, 4, 6]  # images still work
    with pytest.raises(InputError, match=r"^video: .*config.json names no video_token_id of its tokenizer"):
        a.prepare(video_samples()[:1])


def test_video_prompt_is_the_chat_templates(adapter, qwen_dir):
    """A video then an image then the question, as the checkpoint's chat template renders those
    content parts, each pad repeated for its tokens: the ids transformers is given."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from adatoken_compile.models.checkpoint import chat_template

    ss = video_samples()[1:]
    hf = adapter.hf_inputs(ss)
    content = [{"type": "video"}, {"type": "image"}, {"type": "text", "text": ss[0].question}]
    text = render_jinja_template([[{"role": "user", "content": content}]], chat_template=chat_template(qwen_dir)[0],
                                 add_generation_prompt=True)[0][0]
    for pad, grid in (("<|video_pad|>", hf["video_grid_thw"][0]), ("<|image_pad|>", hf["image_grid_thw"][0])):
        text = text.replace(pad, pad * (int(grid.prod()) // 4))
    assert adapter.tokenizer.encode(text) == hf["input_ids"][0].tolist()


def test_run_command_answers_a_video_given_as_frames(adapter, identity_artifact, qwen_dir, tmp_path):
    """`run --frames F --frames F ...`: the PyTorch model and the artifact answer as the runtime's
    generate does for the same video; a scene model refuses frames in one line."""
    from click.testing import CliRunner
    from PIL import Image

    from adatoken_compile.cli import main
    from adatoken_compile.runtime import load

    ss = video_samples()
    paths = []
    for i, frame in enumerate(ss[0].image.frames):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(frame).save(paths[-1])
    want = load(identity_artifact).generate(Video(paths, fps=4), ss[0].question, max_new_tokens=NEW_TOKENS)
    args = [x for p in paths for x in ("--frames", p)] + ["--fps", "4", "-q", ss[0].question, "--max-new-tokens",
                                                          str(NEW_TOKENS)]
    for where in (["--model", qwen_dir], ["--artifact", identity_artifact]):
        r = CliRunner().invoke(main, ["run", *where, *args])
        assert r.exit_code == 0, r.output
        assert r.output.split("answer: ", 1)[1].strip() == want.strip()  # a random model's answer may span lines
    r = CliRunner().invoke(main, ["run", "--model", "llava3d-tiny", *args])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: ") and "--frames" in r.output


def test_a_video_file_is_its_sampled_frames(adapter, identity_artifact, tmp_path):
    """A video file (``Video(path)``, ``run --video``) answers as its frames decoded by transformers'
    PyAV reader at the rate they were sampled: the adapter, the artifact and the command line."""
    pytest.importorskip("av")
    from click.testing import CliRunner
    from transformers.video_utils import read_video_pyav

    from adatoken_compile.cli import main
    from adatoken_compile.runtime import load
    from adatoken_compile.runtime.qwen_vision import sample_frame_indices
    from conftest import write_video

    rng = np.random.default_rng(3)
    frames = [np.repeat(np.repeat(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8), 4, 0), 4, 1) for _ in range(5)]
    path = write_video(tmp_path / "clip.mp4", frames, fps=4)
    theirs, meta = read_video_pyav(path, lambda metadata, **_: sample_frame_indices(
        metadata.total_num_frames, metadata.fps, 2, adapter.processing.temporal_patch_size))
    question = "what happens in the video?"
    want = hf_generate(adapter, [Sample(question, image=Video(list(theirs), fps=meta.sampled_fps))])
    assert hf_generate(adapter, [Sample(question, image=Video(path))]) == want
    text = load(identity_artifact).generate(Video(path), question, max_new_tokens=NEW_TOKENS)
    assert text == adapter.tokenizer.decode(want[0]).strip()
    r = CliRunner().invoke(main, ["run", "--artifact", identity_artifact, "--video", path, "-q", question,
                                  "--max-new-tokens", str(NEW_TOKENS)])
    assert r.exit_code == 0 and r.output.split("answer: ", 1)[1].strip() == text, r.output
    r = CliRunner().invoke(main, ["run", "--artifact", identity_artifact, "--video", path, "--frames", path, "-q", "x"])
    assert r.exit_code == 2 and r.output.strip().endswith("--video and --frames both give a video; pass one of them")
