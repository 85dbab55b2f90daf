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


def test_pruned_artifact_matches_the_eager_pruned_reference(adapter, identity_artifact, tmp_path):
    """A cut before layer 0 ranked by (t, h, w) cells and an attention cut after it: the artifact
    keeps the eager reference's tokens and generates its tokens over per-layer pruned caches."""
    from adatoken_compile.compiler.executor import pruned_prefill
    from adatoken_compile.compiler.pipeline import compile_artifact
    from adatoken_compile.compiler.reference import generate
    from adatoken_compile.runtime import load

    sched = pruned_schedule(adapter)
    out = str(tmp_path / "pruned")
    compile_artifact(adapter, sched, out, progress=False, reuse=identity_artifact)
    rt = load(out)
    ss = samples()
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
