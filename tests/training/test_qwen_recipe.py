"""Training of qwen25vl-tiny (reference_model.qwen): the images and token labels a training scene
gives, the packed questions against the adapter's own prompts, and a whole tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adatoken_compile.benchmark3d.world import make_world


@pytest.fixture(autouse=True)
def restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint of the recipe's layout, loaded through the package's adapter."""
    from reference_model.qwen.train import build, parse

    args = parse(["--out", "unused", "--width", "64", "--layers", "2", "--vision-width", "48", "--vision-depth", "2"])
    tok, adapter = build(args, str(tmp_path_factory.mktemp("q") / "init"))
    return args, tok, adapter


def test_training_images_are_the_benchmark_images_of_the_scene():
    """Training renders only the views an image model gets, and they are the evaluation's pixels."""
    from adatoken_compile.benchmark3d.dataset import make_scene, scene_images
    from reference_model.qwen.data import scene_images_and_instances

    scene, info = make_scene(2_000_003)
    images, instances = scene_images_and_instances(info)
    assert len(images) == len(instances) == 3
    for a, b in zip(scene_images(info, scene), images):
        np.testing.assert_array_equal(a, b)


def test_token_instances_take_the_majority_object_above_the_share():
    from reference_model.qwen.data import token_instances

    inst = np.full((4, 8), -1, np.int16)
    inst[:2, :2] = 3  # fills the first 2x2 token
    inst[2:, 4] = 5  # one column of four pixels: half of the token at row 1, column 2
    inst[0, 6] = 7  # one pixel of four: 25%
    out = token_instances(inst, 2, 4, 2)
    assert out.tolist() == [3, -1, -1, 7, -1, -1, 5, -1]


def test_top_down_token_positions_are_the_floor_positions_of_their_pixels():
    """Each object's centre pixel in the bird's-eye view shows that object, at the position the
    position targets give the token that holds it."""
    from adatoken_compile.benchmark3d.render import TOP_DOWN_MARGIN, TOP_DOWN_PX_PER_M, render_top_down
    from reference_model.qwen.data import top_down_token_xy

    info = make_world(11)
    _, ids = render_top_down(info)
    xy = top_down_token_xy(7, 8, 28)
    for j, o in enumerate(info.objects):
        c, r = (o.center[:2] * TOP_DOWN_PX_PER_M + TOP_DOWN_MARGIN).astype(int)
        assert ids[r, c] == j
        tok = (r // 28) * 8 + c // 28
        assert np.abs(xy[tok] - o.center[:2]).max() <= 14 / TOP_DOWN_PX_PER_M + 1e-6


def test_packed_questions_get_the_adapters_logits(tiny):
    """Packed behind one prefix, each question's answer logits equal transformers' own forward of
    the adapter's prompt of that question alone (same ids, M-RoPE positions and images)."""
    from adatoken_compile.runtime.sample import Sample
    from reference_model.qwen.data import scene_example, scene_images_and_instances
    from reference_model.qwen.model import Vocab, image_features, pack, split_prompt

    _, tok, adapter = tiny
    ex = scene_example(5, adapter.processing, relation_draws=1)
    ex.questions = ex.questions[:3]
    with torch.no_grad():
        feats, coords = image_features(adapter, ex)
        p = pack(adapter, Vocab.of(tok), feats, coords, ex, dense=False)
        lm = adapter.vl.model.language_model
        h = lm(inputs_embeds=p.x, attention_mask={"full_attention": p.allow[None, None]}, position_ids=p.pos)
        packed = adapter.vl.lm_head(h.last_hidden_state[0])
        imgs = scene_images_and_instances(ex.info)[0]
        for q, s, a in zip(ex.questions, p.starts, p.answer_at):
            out = adapter.vl(**adapter.hf_inputs([Sample(question=q.text, image=imgs)])).logits[0, -1]
            torch.testing.assert_close(packed[s + a], out, atol=1e-4, rtol=1e-4)
            pre, suf = split_prompt(adapter, q.text, 3)
            assert pre + suf == adapter.prompt_ids(q.text, 3)


def test_train_end_to_end_writes_a_checkpoint_the_adapter_loads(tmp_path):
    from adatoken_compile.models.qwen25vl import Qwen25VLAdapter
    from reference_model.qwen.train import main

    out = tmp_path / "ckpt"
    main(["--out", str(out), "--steps", "2", "--scenes", "2", "--width", "64", "--layers", "2", "--vision-width", "48",
          "--vision-depth", "2", "--threads", "1", "--log-every", "1"])
    rec = json.loads((out / "TRAINING.json").read_text())
    assert rec["command"].startswith("python -m reference_model.qwen.train --out ")
    assert rec["steps"] == 2 and len(rec["history"]) == 2
    a = Qwen25VLAdapter(str(out))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert int(a.vl.config.text_config.num_hidden_layers) == 2
