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
    from adatoken_compile.benchmark3d.render import TOP_DOWN_MARGIN, TOP_DOWN_PX_PER_M, TOP_DOWN_SIZE, render_top_down
    from reference_model.qwen.data import top_down_token_xy

    info = make_world(11)
    _, ids = render_top_down(info)
    gh, gw = (s // 28 for s in TOP_DOWN_SIZE)
    xy = top_down_token_xy(gh, gw, 28)
    for j, o in enumerate(info.objects):
        c, r = (o.center[:2] * TOP_DOWN_PX_PER_M + TOP_DOWN_MARGIN).astype(int)
        assert ids[r, c] == j
        tok = (r // 28) * gw + c // 28
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


TINY = ["--steps", "2", "--scenes", "2", "--width", "64", "--layers", "2", "--vision-width", "48", "--vision-depth", "2",
        "--threads", "1", "--log-every", "1", "--tower-steps", "1", "--tower-scenes", "1", "--views-from", "0.5",
        "--count-balance"]


def test_train_end_to_end_writes_a_checkpoint_the_adapter_loads_and_is_seeded(tmp_path):
    from safetensors.torch import load_file

    from adatoken_compile.models.qwen25vl import Qwen25VLAdapter
    from reference_model.qwen.train import main

    for name in ("a", "b"):
        main(["--out", str(tmp_path / name)] + TINY)
    out = tmp_path / "a"
    rec = json.loads((out / "TRAINING.json").read_text())
    assert rec["command"] == "python -m reference_model.qwen.train --out " + str(out) + " " + " ".join(TINY)
    assert rec["steps"] == 2 and len(rec["history"]) == 2 and rec["tower"]["steps"] == 1
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert int(Qwen25VLAdapter(str(out)).vl.config.text_config.num_hidden_layers) == 2
    wa, wb = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_token_label_loss_weighs_object_tokens_and_scores_their_class():
    from reference_model.qwen.model import NUM_CLASSES, NUM_COLOURS, token_label_loss

    head = torch.nn.Identity()
    cls_t, col_t = torch.tensor([-1, 0, 3]), torch.tensor([-1, 2, 5])
    right = torch.full((3, 2 + NUM_CLASSES + NUM_COLOURS), -10.0)
    for i, (c, k) in enumerate(zip(cls_t, col_t)):
        right[i, c + 1] = right[i, 1 + NUM_CLASSES + k + 1] = 10.0
    loss, acc = token_label_loss(head, right, cls_t, col_t)
    assert acc == 1.0 and loss < 1e-6
    wrong = right.clone()
    wrong[1, 1], wrong[1, 2] = -10.0, 10.0  # the first object token names class 1 instead of 0
    light, acc = token_label_loss(head, wrong, cls_t, col_t, 1.0)
    heavy, _ = token_label_loss(head, wrong, cls_t, col_t, 5.0)
    assert acc == 0.5 and heavy > light > 1.0


def test_keep_room_share_keeps_every_object_token_and_cuts_labels_alike():
    from types import SimpleNamespace

    from reference_model.qwen.model import keep_room_share

    cls = np.array([-1, 2, -1, -1, 0, -1, -1, 4, -1])  # two images: the bird's-eye view's 5 tokens, then 4
    ex = SimpleNamespace(token_class=cls.copy(), token_colour=cls.copy() + 1, top_xy=np.arange(10.0).reshape(5, 2))
    feats = [torch.arange(5.0)[:, None], torch.arange(5.0, 9.0)[:, None]]
    coords = [torch.arange(5.0)[:, None].repeat(1, 3), torch.arange(4.0)[:, None].repeat(1, 3)]
    f, c = keep_room_share(feats, coords, ex, 0.0, np.random.default_rng(0))
    # objects and each image's first token (an image is never empty), nothing else
    assert [x[:, 0].tolist() for x in f] == [[0.0, 1.0, 4.0], [5.0, 7.0]]
    assert [x[:, 0].tolist() for x in c] == [[0.0, 1.0, 4.0], [0.0, 2.0]]
    assert ex.token_class.tolist() == [-1, 2, 0, -1, 4] and ex.token_colour.tolist() == [0, 3, 1, 0, 5]
    assert ex.top_xy.tolist() == [[0.0, 1.0], [2.0, 3.0], [8.0, 9.0]]
    ex2 = SimpleNamespace(token_class=cls.copy(), token_colour=cls.copy(), top_xy=np.zeros((5, 2)))
    f, _ = keep_room_share(feats, coords, ex2, 1.0, np.random.default_rng(0))
    assert [len(x) for x in f] == [5, 4]
