"""Training of the bundled model llava3d-tiny (reference_model): packed sequences, targets, read-outs,
schedules, the command line, and whole tiny runs through ``python -m reference_model.train``'s ``main``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reference_model.targets import packed_sequence, qa_targets


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """``main(["--threads", N, ...])`` sets torch's process-wide thread count, as the command line
    should; each test gives it back so that the next one runs as configured."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_packed_questions_equal_separate_sequences():
    """Packing k questions behind one copy of the scene with the block mask and per-question
    position ids gives each question exactly the logits of its own unpacked sequence."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, rope_theta=1e6)
    cfg._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(cfg).eval()
    prefix, n_sp = [1, 7, 8], 11
    spatial = torch.randn(n_sp, 32)
    qa = [[3, 4, 5, 9], [6, 2], [10, 11, 12]]
    emb = lm.get_input_embeddings()
    allow, pos, starts = packed_sequence(prefix, n_sp, qa)
    x = torch.cat([emb(torch.tensor(prefix)), spatial] + [emb(torch.tensor(q)) for q in qa])[None]
    with torch.no_grad():
        packed = lm(inputs_embeds=x, attention_mask=allow[None, None], position_ids=pos[None]).logits[0]
        for s, q in zip(starts, qa):
            xs = torch.cat([emb(torch.tensor(prefix)), spatial, emb(torch.tensor(q))])[None]
            alone = lm(inputs_embeds=xs).logits[0, -len(q):]
            torch.testing.assert_close(packed[s : s + len(q)], alone, atol=1e-5, rtol=1e-5)
    # a question never sees another question's tokens
    assert not allow[starts[1], starts[0]] and not allow[starts[2], starts[1] + 1]


def test_qa_targets_main_and_dense():
    # suffix of 6 tokens ("\n", first word, ..., ":"), answer = one word + EOS
    main, dense = qa_targets(6, [40, 2], dense=True)
    assert main == [-100, -100, -100, -100, -100, 40, 2, -100]
    # positions after the first word up to (not including) the last suffix token predict 40
    assert dense == [-100, -100, 40, 40, 40, -100, -100, -100]
    main2, dense2 = qa_targets(6, [40, 2])
    assert main2 == main and set(dense2) == {-100}


def test_dense_targets_start_at_the_last_class_or_colour_word():
    """--dense-from key-word: answer targets only where the question text already says what is
    asked, e.g. not at "which is closer to the red object, the blue one or the" (one candidate)."""
    from adatoken_compile.benchmark3d.questions import TEMPLATES, questions_for, text_words
    from adatoken_compile.benchmark3d.world import CLASSES, COLOR_NAMES, PLURALS, make_world
    from adatoken_compile.runtime.prompt import llava_v1_prompt, tokenize_with_placeholders
    from reference_model.text import key_word_ids, key_word_position, training_tokenizer

    _, dense = qa_targets(8, [40, 2], dense=True, dense_from=5)
    assert dense == [-100] * 5 + [40, 40] + [-100] * 3  # positions 5 and 6; 7 carries the main label
    assert qa_targets(8, [40, 2], dense=True, dense_from=0)[1] == qa_targets(8, [40, 2], dense=True)[1]

    tok = training_tokenizer()
    words = {*CLASSES, *PLURALS.values(), *COLOR_NAMES}
    key_ids = key_word_ids(tok)
    assert len(key_ids) == len(words)  # one distinct token per word
    seen = set()
    for seed in range(2_000_000, 2_000_040):
        for q in questions_for(make_world(seed)):
            ids = tokenize_with_placeholders(tok, llava_v1_prompt(q.text))
            suffix = ids[ids.index(-200) + 1 :]
            k = key_word_position(suffix, key_ids)
            head = text_words(tok.decode(suffix[: k + 1]))
            tail = text_words(tok.decode(suffix[k + 1 :]))
            # every class/colour word of the question is at or before k, and the word at k is one
            assert head[-1] in words and not words & set(tail), q.text
            assert [w for w in head if w in words] == [w for w in text_words(q.text) if w in words]
            seen.add(q.template)
    assert seen == set(TEMPLATES)
    assert key_word_position([5, 6, 7], key_ids={99}) == 2  # no key word: the default start


def test_voxel_majority_votes_per_voxel():
    from reference_model.targets import voxel_majority

    labels = torch.tensor([3, 3, 0, 5, 5, 4, 1, 2])
    inverse = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])  # patch -> voxel
    # voxel 0: 3 wins 2:1; voxel 1: 5 wins; voxel 2: tie 1/2 -> the smaller label
    assert voxel_majority(labels, inverse, 3).tolist() == [3, 5, 1]


def test_vision_stage_cache_is_reused_only_for_the_same_settings(tmp_path, capsys):
    from reference_model.config import VISION
    from reference_model.scenes import data_fingerprint
    from reference_model.vision import vision_stage

    cache = str(tmp_path / "tower.pt")
    first, settings, _ = vision_stage(0, scenes=1, steps=1, views=2, object_weight=5.0, cache=cache)
    assert torch.load(cache, weights_only=True)["settings"] == settings == {
        "seed": 0, "scenes": 1, "steps": 1, "object_weight": 5.0, "views_per_scene": 2,
        "tower": {"hidden_size": VISION["hidden_size"], "intermediate_size": VISION["intermediate_size"],
                  "num_hidden_layers": VISION["num_hidden_layers"]}}
    again, _, _ = vision_stage(0, scenes=1, steps=1, views=2, object_weight=5.0, cache=cache)
    assert "from " + cache in capsys.readouterr().err
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    # other settings: retrained (a different tower) and the cache now records the new settings
    other, _, _ = vision_stage(0, scenes=1, steps=2, views=2, object_weight=5.0, cache=cache)
    assert "retraining stage 1" in capsys.readouterr().err
    assert torch.load(cache, weights_only=True)["settings"]["steps"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))
    # same settings, but a cache written by other scene/renderer code: retrained, not reused
    blob = torch.load(cache, weights_only=True)
    assert blob["data"] == data_fingerprint() and len(blob["data"]) == 16
    blob["data"] = "0" * 16
    torch.save(blob, cache)
    vision_stage(0, scenes=1, steps=2, views=2, object_weight=5.0, cache=cache)
    assert "other generator/renderer code" in capsys.readouterr().err
    assert torch.load(cache, weights_only=True)["data"] == data_fingerprint()
    # a run without a cache gives the cached tower bit for bit (seeded stage 1)
    fresh, _, _ = vision_stage(0, scenes=1, steps=1, views=2, object_weight=5.0)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), fresh.state_dict().values()))


def test_object_targets_and_class_colour_loss():
    from reference_model.scenes import ROOM_LABELS
    from reference_model.targets import class_colour_loss, object_targets

    vc = torch.tensor([0, ROOM_LABELS, ROOM_LABELS + 1, ROOM_LABELS + 4, 2])
    vk = torch.tensor([0, 2, 0, 1, 0])  # the second object voxel's colour vote went to "no colour"
    obj, cls_t, col_t = object_targets(vc, vk)
    assert obj.tolist() == [False, True, True, True, False]
    assert cls_t.tolist() == [0, 1, 4] and col_t.tolist() == [1, -1, 0]
    # tokens equal to (scaled) one-hot class / colour words score their own words highest
    cls_emb, col_emb = torch.eye(5) * 10, torch.eye(6) * 10
    tok_c, tok_k = cls_emb[cls_t], col_emb[col_t.clamp(min=0)]
    good = class_colour_loss(tok_c @ cls_emb.T, tok_k @ col_emb.T, cls_t, col_t)
    bad = class_colour_loss(tok_c.roll(1, 0) @ cls_emb.T, tok_k.roll(1, 0) @ col_emb.T, cls_t, col_t)
    assert good < 1e-3 < 10 < bad
    # no voxel with a colour target: the class term alone, still finite
    none = class_colour_loss(tok_c @ cls_emb.T, tok_k @ col_emb.T, cls_t, torch.full_like(col_t, -1))
    assert torch.isfinite(none) and none < 1e-3


def train_error(tmp_path, capsys, *args: str) -> str:
    """The one-line error of ``train`` on bad arguments: exit 2, one line on stderr, nothing
    written to --out. Returns the line."""
    import pytest

    from reference_model.train import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "m"), *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert not (tmp_path / "m").exists()
    return err


def tiny_stage1(tmp_path) -> list[str]:
    """``train`` arguments for the smallest stage 1 (one scene, one step, two views, one thread),
    cached in ``tmp_path`` so that every run of a test shares one tower."""
    return ["--vision-scenes", "1", "--vision-steps", "1", "--vision-views", "2", "--threads", "1",
            "--vision-cache", str(tmp_path / "tower.pt")]


def test_unknown_training_template_is_a_one_line_error(tmp_path, capsys):
    err = train_error(tmp_path, capsys, "--templates", "color_of_class,colour_of_chair")
    assert "colour_of_chair" in err and "color_of_class" in err


def test_negative_relation_draws_is_a_one_line_error(tmp_path, capsys):
    assert "--relation-draws -1" in train_error(tmp_path, capsys, "--relation-draws", "-1")


def _room(*objects):
    """A hand-made SceneInfo (room 6 x 4 x 3 m) of (class, colour, x, y) objects, 0.4 m wide."""
    import numpy as np

    from adatoken_compile.benchmark3d.world import Object3D, SceneInfo

    objs = [Object3D(c, k, [], np.array([x - 0.2, y - 0.2, 0.0]), np.array([x + 0.2, y + 0.2, 0.5])) for c, k, x, y in objects]
    return SceneInfo(0, np.array([6.0, 4.0, 3.0]), objs, (0, 0, 0), (0, 0, 0), (0, 0, 0), "box", ())


def _question_suffix(tok, text):
    """Token ids after the scene placeholder of ``text``'s prompt (what training reads targets from)."""
    from adatoken_compile.runtime.prompt import llava_v1_prompt, tokenize_with_placeholders

    ids = tokenize_with_placeholders(tok, llava_v1_prompt(text))
    return ids[ids.index(-200) + 1 :]


def test_locate_targets_name_the_single_object_of_each_word():
    import numpy as np

    from adatoken_compile.benchmark3d.questions import q_closer, q_count
    from reference_model.targets import locate_targets
    from reference_model.text import training_tokenizer, word_of_key_token

    info = _room(("ball", "red", 1.0, 1.0), ("box", "blue", 5.0, 3.0), ("box", "green", 3.0, 0.5), ("chair", "green", 2.0, 3.0))
    tok = training_tokenizer()
    word_of = word_of_key_token(tok)

    def suffix(text):
        return _question_suffix(tok, text)

    s = suffix(q_closer("red", "blue", "green"))  # green names two objects: no target
    got = locate_targets(s, word_of, info)
    assert [word_of[s[i]] for i, _ in got] == [("colour", "red"), ("colour", "blue")]
    assert np.allclose([xy for _, xy in got], [((1 - 3) / 2, (1 - 2) / 2), ((5 - 3) / 2, (3 - 2) / 2)])
    assert locate_targets(suffix(q_count("box")), word_of, info) == []  # a plural names several objects
    s = suffix("what color is the ball?")
    assert [(word_of[s[i]], xy) for i, xy in locate_targets(s, word_of, info)] == [(("class", "ball"), (-1.0, -0.5))]


def test_count_answer_weights_give_every_answer_the_same_total():
    from collections import Counter

    from adatoken_compile.benchmark3d.world import CLASSES, MAX_COUNT, make_world
    from reference_model.scenes import count_answer_weights

    infos = [make_world(s) for s in range(200)]
    w = count_answer_weights(infos)
    answers = Counter(str(i.count(c)) for i in infos for c in CLASSES if i.count(c) <= MAX_COUNT)
    assert set(w) == set(answers) == {"0", "1", "2", "3", "4"}
    totals = [w[a] * n for a, n in answers.items()]
    assert max(totals) - min(totals) < 1e-9  # each answer carries the same total weight
    assert abs(sum(totals) / sum(answers.values()) - 1.0) < 1e-9  # mean weight 1 over the questions
    assert w["0"] < 1.0 < w["4"]  # random rooms: 0 is the most common count, 4 the rarest


def test_weighted_cross_entropy_is_the_plain_mean_at_equal_weights():
    from reference_model.targets import weighted_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g)
    labels = torch.tensor([-100, 3, 4, -100, 7, 1])
    plain = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    assert torch.allclose(weighted_cross_entropy(logits, labels, torch.full((6,), 2.5)), plain)
    # weight 0 at one labelled position drops it; weight on an ignored position changes nothing
    w = torch.tensor([9.0, 1.0, 0.0, 9.0, 1.0, 1.0])
    keep = torch.tensor([1, 4, 5])
    assert torch.allclose(weighted_cross_entropy(logits, labels, w),
                          torch.nn.functional.cross_entropy(logits[keep], labels[keep]))
    assert weighted_cross_entropy(logits, torch.full((6,), -100), w) == 0


def test_more_relation_draws_add_relation_questions_only():
    from adatoken_compile.benchmark3d.world import make_world
    from reference_model.scenes import training_questions

    more_total = 0
    for s in range(20):
        info = make_world(s)
        few, many = training_questions(info, s, 4), training_questions(info, s, 12)
        assert {q.text for q in few} <= {q.text for q in many}
        assert all(q.kind == "relation" for q in many if q.text not in {f.text for f in few})
        assert len({q.text for q in many}) == len(many)  # duplicates dropped
        more_total += len(many) - len(few)
        assert not any(q.kind == "relation" for q in training_questions(info, s, 0))
    assert more_total > 20  # 12 draws ask about 3 more relation questions per scene than 4


def test_template_curriculum_phases_are_cumulative_then_everything(tmp_path, capsys):
    from reference_model.schedule import curriculum_templates

    stages = (("exist", "class_of_color"), ("color_of_class",), ("count",))
    assert curriculum_templates(stages, 10, 0) == curriculum_templates(stages, 10, 9) == {"exist", "class_of_color"}
    assert curriculum_templates(stages, 10, 10) == {"exist", "class_of_color", "color_of_class"}
    assert curriculum_templates(stages, 10, 29) == {"exist", "class_of_color", "color_of_class", "count"}
    assert curriculum_templates(stages, 10, 30) is None  # after the curriculum: every template
    assert curriculum_templates(None, 10, 0) is None and curriculum_templates(stages, 0, 0) is None
    err = train_error(tmp_path, capsys, "--template-curriculum", "exist;how_big")
    assert "how_big" in err and "--template-curriculum" in err
    err = train_error(tmp_path, capsys, "--template-curriculum", "exist;count", "--template-frac", "1.5")
    assert "--template-frac 1.5" in err


def test_recorded_command_can_be_typed_again():
    import shlex

    from reference_model.train import command_line

    argv = ["--out", "runs/a b", "--template-curriculum", "exist,class_of_color;color_of_class;count", "--seed", "3"]
    cmd = command_line(argv)
    assert cmd.startswith("python -m reference_model.train ")
    assert shlex.split(cmd)[3:] == argv  # a shell splits it back into the same arguments


def test_train_end_to_end_records_its_recipe_and_decoder_seed(tmp_path, monkeypatch):
    """Two decoder steps through the whole train() path on one cached stage-1 tower: the checkpoint
    with every read-out loads through the real adapter, TRAINING.json records the recipe, and
    --decoder-seed changes the decoder but not the tower."""
    import json

    from safetensors.torch import load_file

    import reference_model.loop as loop
    from reference_model.train import main

    common = ["--scenes", "2", "--epochs", "1", *tiny_stage1(tmp_path), "--template-curriculum", "exist;count",
              "--template-frac", "1"]
    with monkeypatch.context() as mp:  # the plain run is compared by its recipe and weights alone
        mp.setattr(loop, "record_eval", lambda out_dir: None)
        main(["--out", str(tmp_path / "a"), *common])
    main(["--out", str(tmp_path / "b"), "--decoder-seed", "7", "--dense-answer", "1", "--dense-from", "key-word",
          "--relation-draws", "0", "--count-balance", "--locate-weight", "0.5", "--locate-layer", "2",
          "--instance-weight", "0.5", "--instance-layer", "3", "--bg-curriculum", "0.5", "--lr-decay-frac", "0.5",
          "--position-weight", "0.5", "--pe-scale", "10", "--distance-weight", "0.5", "--distance-layer", "4",
          "--candidate-distance-weight", "2", "--candidate-distance-layer", "5",
          "--compare-weight", "1", "--compare-layer", "6", *common])
    prov = [json.load(open(tmp_path / m / "TRAINING.json")) for m in "ab"]
    assert [p["decoder_seed"] for p in prov] == [0, 7] and prov[0]["seed"] == prov[1]["seed"] == 0
    assert [p["decoder_training"]["dense_from"] for p in prov] == ["question", "key-word"]
    assert [p["decoder_training"]["relation_draws"] for p in prov] == [4, 0]
    assert prov[0]["decoder_training"]["count_balance"] is None
    assert [p["decoder_training"]["locate"] for p in prov] == [None, {"weight": 0.5, "layer": 2}]
    assert [p["decoder_training"]["instance_marker"] for p in prov] == [None, {"weight": 0.5, "layer": 3}]
    assert [p["decoder_training"]["lr_decay_frac"] for p in prov] == [None, 0.5]
    assert [p["decoder_training"]["position_weight"] for p in prov] == [None, 0.5]
    assert [p["decoder_training"]["pe_scale"] for p in prov] == [None, 10.0]
    assert [p["decoder_training"]["distance"] for p in prov] == [None, {"weight": 0.5, "layer": 4}]
    assert [p["decoder_training"]["candidate_distance"] for p in prov] == [None, {"weight": 2.0, "layer": 5}]
    assert [p["decoder_training"]["compare"] for p in prov] == [None, {"weight": 1.0, "layer": 6}]
    assert prov[1]["decoder_training"]["count_balance"] and all(w > 0 for w in prov[1]["decoder_training"]["count_balance"].values())
    assert prov[0]["decoder_training"]["steps"] == 2
    assert prov[0]["decoder_training"]["template_curriculum"] == {"stages": [["exist"], ["count"]], "steps_per_stage": 1}
    assert 0.0 <= prov[1]["ci_sample_eval"]["accuracy"] <= 1.0 and prov[1]["ci_sample_eval"]["n"] == 50
    da, db = (load_file(str(tmp_path / m / "model.safetensors")) for m in "ab")
    va, vb = (load_file(str(tmp_path / m / "vision_tower" / "model.safetensors")) for m in "ab")
    assert va and all(torch.equal(va[k], vb[k]) for k in va)  # the same cached tower
    assert not torch.equal(da["model.embed_tokens.weight"], db["model.embed_tokens.weight"])  # another decoder init
    # --pe-scale 10: the position embedding's last layer starts (and after two small steps stays) ~10x larger
    k = "model.video_tower.video_tower.positional_embedding.position_embedding_head.3.weight"
    assert 8 < db[k].norm() / da[k].norm() < 12.5


def test_first_of_instance_marks_the_first_token_of_each_object():
    from reference_model.targets import first_of_instance

    assert first_of_instance(torch.tensor([-1, 2, 2, -1, 0, 2, 1, 0, -1])).nonzero().squeeze(1).tolist() == [1, 4, 6]
    assert not first_of_instance(torch.full((4,), -1)).any()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # against the definition, element by element
        v = torch.randint(-1, 5, (30,), generator=g)
        ref = [int(v[i]) >= 0 and int(v[i]) not in v[:i].tolist() for i in range(30)]
        assert first_of_instance(v).tolist() == ref


def test_instance_markers_count_the_objects_of_rendered_scenes():
    """On real renders (the training path: patch instances -> voxel majority), the markers of a
    class are as many as the scene's objects of that class for nearly every (scene, class)."""
    from adatoken_compile.benchmark3d.render import render_scene
    from adatoken_compile.benchmark3d.world import CLASSES, make_world
    from adatoken_compile.models.testing import CLIP_MEAN, CLIP_STD
    from adatoken_compile.runtime.scene import preprocess_scene, unproject_patches, voxelize
    from reference_model.config import VISION
    from reference_model.scenes import ROOM_LABELS, patch_instances, patch_labels
    from reference_model.targets import instance_markers, voxel_majority

    agree, pairs = 0, 0
    for seed in range(8):
        info = make_world(seed)
        r = render_scene(info)
        pre = preprocess_scene(r.scene, VISION["image_size"], CLIP_MEAN, CLIP_STD)
        vm = voxelize(unproject_patches(pre.depths, pre.intrinsics, pre.poses, VISION["patch_size"]).reshape(-1, 3))
        inv = torch.from_numpy(vm.inverse)
        hw = (*r.scene.images.shape[1:3], VISION["image_size"], VISION["patch_size"])
        vc = voxel_majority(torch.from_numpy(patch_labels(r.instance, info, *hw)[0].reshape(-1)), inv, vm.num_tokens)
        vi = voxel_majority(patch_instances(r.instance, *hw), inv, vm.num_tokens) - 1
        on, mark = instance_markers(vc, vi)
        assert int(mark.sum()) == len(set(vi[on].tolist()))  # one marker per object seen
        for i, c in enumerate(CLASSES):
            agree += int((mark & (vc[on] == ROOM_LABELS + i)).sum()) == info.count(c)
            pairs += 1
    assert agree >= 0.9 * pairs


def test_balanced_bce_weighs_the_rare_class_like_the_rest():
    from reference_model.targets import balanced_bce

    bce = torch.nn.functional.binary_cross_entropy_with_logits
    target = torch.tensor([True] + [False] * 99)
    never = torch.full((100,), -3.0)  # "never a marker": cheap under the plain mean
    assert bce(never, target.float()) < 0.1
    expected = 0.5 * (bce(never[:1], torch.ones(1)) + bce(never[1:], torch.zeros(99)))
    assert torch.allclose(balanced_bce(never, target), expected) and balanced_bce(never, target) > 1.0
    right = torch.where(target, 6.0, -6.0)
    assert balanced_bce(right, target) < 0.01
    assert torch.allclose(balanced_bce(never[1:], target[1:]), bce(never[1:], torch.zeros(99)))  # no positive: negatives only


def test_lr_factor_cosine_by_default_and_stable_then_decay():
    import math

    from reference_model.schedule import lr_factor

    for p in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):  # the whole-run cosine the recorded commands used
        assert lr_factor(p) == 0.5 * (1 + math.cos(math.pi * p))
    assert lr_factor(1.5) == 0.0
    assert [lr_factor(p, 0.2) for p in (0.0, 0.5, 0.8)] == [1.0, 1.0, 1.0]  # stable until 1 - F
    assert abs(lr_factor(0.9, 0.2) - 0.5) < 1e-12 and lr_factor(1.0, 0.2) == 0.0 == lr_factor(1.3, 0.2)
    steps = [lr_factor(p / 100, 0.2) for p in range(101)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # never rises
    assert all(abs(lr_factor(p, 1.0) - lr_factor(p)) < 1e-12 for p in (0.2, 0.6))  # F = 1 is the plain cosine


def test_bad_lr_decay_frac_is_a_one_line_error(tmp_path, capsys):
    assert "--lr-decay-frac 0.0" in train_error(tmp_path, capsys, "--lr-decay-frac", "0")


def test_position_targets_are_metres_from_the_room_centre_halved():
    from reference_model.targets import position_targets

    room = [4.0, 6.0, 3.0]
    got = position_targets(torch.tensor([[2.0, 3.0, 1.5], [4.0, 6.0, 3.0], [0.0, 1.0, 0.5]]), room)
    assert torch.allclose(got, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.5, 0.75], [-1.0, -1.0, -0.5]]))


def test_bad_position_weight_or_pe_scale_is_a_one_line_error(tmp_path, capsys):
    assert "--position-weight -1" in train_error(tmp_path, capsys, "--position-weight", "-1")
    assert "--pe-scale 0" in train_error(tmp_path, capsys, "--pe-scale", "0")


def _relation_room():
    """A room for the relation read-outs' targets (red at (1, 1), blue (4, 5), green (1, 3), two
    yellow chairs), the training tokenizer and its key-word table."""
    from reference_model.text import training_tokenizer, word_of_key_token

    info = _room(("ball", "red", 1.0, 1.0), ("box", "blue", 4.0, 5.0), ("box", "green", 1.0, 3.0),
                 ("chair", "yellow", 2.0, 3.0), ("chair", "yellow", 5.0, 1.0))
    tok = training_tokenizer()
    return info, tok, word_of_key_token(tok)


def test_distance_targets_are_the_two_compared_floor_distances():
    from adatoken_compile.benchmark3d.questions import q_closer, q_closer_yesno, q_count
    from reference_model.targets import distance_targets

    info, tok, word_of = _relation_room()

    def suffix(text):
        return _question_suffix(tok, text)

    # red-blue 5 m, red-green 2 m, halved, in the order the question names them
    assert distance_targets(suffix(q_closer("red", "blue", "green")), word_of, info, "closer") == (2.5, 1.0)
    got = distance_targets(suffix(q_closer_yesno("green", "red", "blue")), word_of, info, "closer_yesno")
    assert got[0] == 1.0 and abs(got[1] - 13 ** 0.5 / 2) < 1e-12  # green-red 2 m, green-blue sqrt(3^2 + 2^2)
    assert distance_targets(suffix(q_closer("red", "blue", "yellow")), word_of, info, "closer") is None  # two yellow
    assert distance_targets(suffix(q_count("box")), word_of, info, "count") is None


def test_candidate_distance_targets_sit_at_the_candidate_words():
    from adatoken_compile.benchmark3d.questions import q_closer, q_closer_yesno, q_count, q_farther
    from reference_model.targets import candidate_distance_targets

    info, tok, word_of = _relation_room()
    s = _question_suffix(tok, q_closer("red", "blue", "green"))
    got = candidate_distance_targets(s, word_of, info, "closer")
    # blue's word reads red-blue 5 m, green's word red-green 2 m (halved); nothing at red's word
    assert [(word_of[s[i]], d) for i, d in got] == [(("colour", "blue"), 2.5), (("colour", "green"), 1.0)]
    assert got[0][0] < got[1][0] and s.count(s[got[0][0]]) == 1
    s = _question_suffix(tok, q_farther("green", "blue", "red"))
    got = candidate_distance_targets(s, word_of, info, "farther")
    assert [(word_of[s[i]][1], d) for i, d in got] == [("blue", 13 ** 0.5 / 2), ("red", 1.0)]
    s = _question_suffix(tok, q_closer_yesno("blue", "green", "red"))
    got = candidate_distance_targets(s, word_of, info, "closer_yesno")
    assert [(word_of[s[i]][1], d) for i, d in got] == [("green", 13 ** 0.5 / 2), ("red", 2.5)]
    assert candidate_distance_targets(_question_suffix(tok, q_closer("red", "blue", "yellow")), word_of, info, "closer") == []
    assert candidate_distance_targets(_question_suffix(tok, q_count("box")), word_of, info, "count") == []


def test_compare_target_sits_at_the_second_candidate_and_says_whether_the_first_is_closer():
    from adatoken_compile.benchmark3d.questions import q_closer, q_closer_yesno, q_count, q_farther
    from reference_model.targets import compare_targets

    info, tok, word_of = _relation_room()
    # red-blue 5 m, red-green 2 m: the first candidate (blue) is not the closer one; read at green's word
    s = _question_suffix(tok, q_closer("red", "blue", "green"))
    [(i, y)] = compare_targets(s, word_of, info, "closer")
    assert word_of[s[i]] == ("colour", "green") and y == 0.0
    # the same fact whatever the template asks: farther and yes/no name the candidates in the same order
    s = _question_suffix(tok, q_farther("red", "green", "blue"))
    [(i, y)] = compare_targets(s, word_of, info, "farther")
    assert word_of[s[i]] == ("colour", "blue") and y == 1.0
    s = _question_suffix(tok, q_closer_yesno("green", "red", "blue"))  # green-red 2 m < green-blue sqrt(13) m
    [(i, y)] = compare_targets(s, word_of, info, "closer_yesno")
    assert word_of[s[i]] == ("colour", "blue") and y == 1.0 and i == max(j for j in range(len(s)) if s[j] in word_of)
    assert compare_targets(_question_suffix(tok, q_closer("red", "blue", "yellow")), word_of, info, "closer") == []
    assert compare_targets(_question_suffix(tok, q_count("box")), word_of, info, "count") == []


@pytest.fixture(scope="module")
def relation_run(tmp_path_factory):
    """One decoder step on relation questions without a read-out: the run each read-out's run is
    compared with (its weights, and the arguments both share). The subject is the weights, so
    neither run evaluates the CI sample."""
    from safetensors.torch import load_file

    import reference_model.loop as loop
    from reference_model.train import main

    d = tmp_path_factory.mktemp("relation")
    common = ["--scenes", "3", "--epochs", "0.34", *tiny_stage1(d), "--templates", "closer,farther,closer_yesno"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "record_eval", lambda out_dir: None)
        n = torch.get_num_threads()
        main(["--out", str(d / "a"), *common])
        torch.set_num_threads(n)
    return common, load_file(str(d / "a" / "model.safetensors"))


@pytest.mark.parametrize("flag", ["distance", "candidate-distance", "compare"])
def test_distance_read_outs_train_the_decoder_on_relation_questions(tmp_path, monkeypatch, relation_run, flag):
    """Same seed and data, with and without --distance-weight (read at the last position) or
    --candidate-distance-weight (read at the candidate words): the read-out's gradient reaches the
    layers below the one it reads (only scene 2 of the first three has relation questions)."""
    import numpy as np
    from safetensors.torch import load_file

    import reference_model.loop as loop
    from reference_model.train import main

    monkeypatch.setattr(loop, "record_eval", lambda out_dir: None)
    common, da = relation_run
    main(["--out", str(tmp_path / "b"), f"--{flag}-weight", "1", f"--{flag}-layer", "3", *common])
    db = load_file(str(tmp_path / "b" / "model.safetensors"))
    # one step: the read-out after layer 3 moves layers 1-3; above it only the gradient clipping's
    # common scale differs (Adam's first step is nearly scale-free), so those barely move
    diff = {k: float((da[k] - db[k]).abs().mean()) for k in da}
    below = np.mean([d for k, d in diff.items() if any(f".layers.{i}." in k for i in range(3))])
    above = np.mean([d for k, d in diff.items() if any(f".layers.{i}." in k for i in range(3, 8)) or k == "lm_head.weight"])
    assert below > 20 * above


@pytest.mark.parametrize("flag", ["locate", "instance", "distance", "candidate-distance", "compare"])
def test_bad_read_out_weight_or_layer_is_a_one_line_error(tmp_path, capsys, flag):
    assert f"--{flag}-layer 9" in train_error(tmp_path, capsys, f"--{flag}-weight", "1", f"--{flag}-layer", "9")
    assert f"--{flag}-layer 0" in train_error(tmp_path, capsys, f"--{flag}-weight", "1", f"--{flag}-layer", "0")
    assert f"--{flag}-weight -1" in train_error(tmp_path, capsys, f"--{flag}-weight", "-1")


def test_room_keep_share_phases_in_holds_then_keeps_the_whole_scene():
    from reference_model.schedule import room_keep_share

    # --bg-curriculum over 4 steps to 0.2, --bg-hold until step 10, then whole scenes
    assert [room_keep_share(s, 4, 10, 0.2) for s in (0, 2)] == [0.0, 0.1]
    assert [room_keep_share(s, 4, 10, 0.2) for s in (4, 9)] == [0.2, 0.2]
    assert room_keep_share(10, 4, 10, 0.2) is None and room_keep_share(50, 4, 10, 0.2) is None
    # no hold: the curriculum ends in whole scenes; no curriculum: hold from step 0
    assert room_keep_share(3, 4, 0, 1.0) == 0.75 and room_keep_share(4, 4, 0, 1.0) is None
    assert room_keep_share(0, 0, 3, 0.3) == 0.3 and room_keep_share(3, 0, 3, 0.3) is None
    assert room_keep_share(0, 0, 0) is None


def test_bg_hold_trains_on_fewer_tokens_then_on_whole_scenes(tmp_path, monkeypatch):
    """Four steps on one scene with --bg-hold 0.75 --bg-keep-max 0.1: the first three decoder inputs
    keep the objects and a tenth of the room voxels, the last is the whole scene; TRAINING.json
    records the hold."""
    import json

    from transformers import LlamaForCausalLM

    import reference_model.loop as loop
    from reference_model.train import main

    lengths = []
    forward = LlamaForCausalLM.forward

    def spy(self, *a, **kw):
        if self.training:
            lengths.append(kw["inputs_embeds"].shape[1])
        return forward(self, *a, **kw)

    monkeypatch.setattr(LlamaForCausalLM, "forward", spy)
    monkeypatch.setattr(loop, "record_eval", lambda out_dir: None)  # the subject is the decoder inputs
    main(["--out", str(tmp_path / "m"), "--scenes", "1", "--epochs", "4", *tiny_stage1(tmp_path),
          "--bg-hold", "0.75", "--bg-keep-max", "0.1"])
    assert len(lengths) == 4
    assert lengths[3] > 2 * max(lengths[:3])  # room surfaces are most of a scene's voxels
    assert json.load(open(tmp_path / "m" / "TRAINING.json"))["decoder_training"]["bg_hold_steps"] == 3


def test_bad_bg_hold_or_keep_share_is_a_one_line_error(tmp_path, capsys):
    assert "--bg-hold 1.0" in train_error(tmp_path, capsys, "--bg-hold", "1")
    assert "--bg-keep-max 0.0" in train_error(tmp_path, capsys, "--bg-keep-max", "0")


def test_workers_render_ahead_and_train_the_same_weights_bit_for_bit(tmp_path, monkeypatch):
    """--workers 2 renders stage 1's scenes in a pool and stage 2's first epoch (tower features,
    patch labels, instance ids) in two background processes: the tower and the decoder come out
    equal, tensor for tensor, to a run without workers (3 scenes, 2 epochs: the second epoch
    reads the cache the workers filled)."""
    from safetensors.torch import load_file

    import reference_model.loop as loop
    import reference_model.train as tr

    monkeypatch.setattr(loop, "record_eval", lambda out_dir: None)  # the subject is the weights, not the CI sample
    common = ["--scenes", "3", "--epochs", "2", "--vision-scenes", "3", "--vision-steps", "2", "--vision-views", "2",
              "--threads", "1", "--instance-weight", "0.5", "--locate-weight", "0.5", "--relation-draws", "2"]
    tr.main(["--out", str(tmp_path / "serial"), *common])

    def not_here(*a):
        raise AssertionError("with --workers the training process renders no stage-2 scene itself")

    monkeypatch.setattr(loop, "scene_entry", not_here)
    tr.main(["--out", str(tmp_path / "workers"), "--workers", "2", *common])
    for part in ("model.safetensors", "vision_tower/model.safetensors"):
        a, b = (load_file(str(tmp_path / m / part)) for m in ("serial", "workers"))
        assert a.keys() == b.keys() and len(a) > 10
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_workers_lend_their_cores_back_after_the_first_epoch(tmp_path, monkeypatch):
    """--threads 2 --workers 1 on 2 cores: stage 1 trains on both threads; stage 2's first epoch
    trains on one while the worker renders on the other, and every later step on two again."""
    import reference_model.loop as loop
    import reference_model.train as tr

    monkeypatch.setattr(loop, "record_eval", lambda out_dir: None)
    at_step, step = [], torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        at_step.append(torch.get_num_threads())
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    tr.main(["--out", str(tmp_path / "m"), "--scenes", "2", "--epochs", "2", "--vision-scenes", "2",
             "--vision-steps", "2", "--vision-views", "2", "--threads", "2", "--workers", "1"])
    assert at_step == [2, 2] + [1, 1] + [2, 2], at_step  # stage 1, epoch 1, epoch 2
    assert torch.get_num_threads() == 2


def test_scene_prefetch_returns_the_entries_in_order_and_rejects_another_order():
    from adatoken_compile.models.testing import CLIP_MEAN, CLIP_STD
    from reference_model.prefetch import ScenePrefetch
    from reference_model.scenes import SceneCache, scene_entry
    from reference_model.vision import vision_stage

    vision, _, _ = vision_stage(0, scenes=1, steps=1, views=2)
    pf = ScenePrefetch(vision, [5, 3, 4], workers=2, relation_draws=1, templates=None, instances=False)
    try:
        got = pf.get(5)
        want = scene_entry(SceneCache(vision, CLIP_MEAN, CLIP_STD), 5, 1, None, False)
        assert torch.equal(got[0][0], want[0][0]) and torch.equal(got[2][0], want[2][0])
        assert [q.text for q in got[1][0]] == [q.text for q in want[1][0]]
        with pytest.raises(RuntimeError, match="out of the visiting order"):
            pf.get(4)  # 3 is next
        assert pf.get(3) is not None
    finally:
        pf.close()
    assert not any(p.is_alive() for p in pf.procs)


def test_negative_workers_is_a_one_line_error(tmp_path, capsys):
    assert "--workers -1" in train_error(tmp_path, capsys, "--workers", "-1")


@pytest.mark.parametrize("name,tower", [("llava3d-tiny", None),
                                        ("llava3d-tiny-nodrop", "adatoken_compile/models/llava3d_tiny")])
def test_bundled_model_command_reproduces_its_recorded_recipe(name, tower):
    """The command in each bundled model's TRAINING.json, parsed by this command line, comes to
    exactly the settings TRAINING.json records for those weights: run from the repository root, it
    retrains them into their own folder (llava3d-tiny-nodrop on llava3d-tiny's stage-1 tower)."""
    import json
    import os
    import shlex
    from types import SimpleNamespace

    from adatoken_compile.models.registry import BUNDLED
    from reference_model.loop import provenance
    from reference_model.schedule import StepPlan
    from reference_model.train import command_line, config_from_args, parser
    from reference_model.vision import stage1_settings

    prov = json.load(open(os.path.join(BUNDLED[name], "TRAINING.json")))
    argv = shlex.split(prov["command"])
    assert argv[:3] == ["python", "-m", "reference_model.train"] and command_line(argv[3:]) == prov["command"]
    a = parser().parse_args(argv[3:])
    assert os.path.abspath(BUNDLED[name]).replace(os.sep, "/").endswith("/" + a.out)
    assert (a.threads, a.workers, a.vision_cache) == (2, 1, tower)  # the setting the recorded minutes are of
    cfg = config_from_args(a)
    v = cfg.vision
    settings = stage1_settings(cfg.seed, v.scenes, v.steps, v.object_weight, v.views)
    stats = {k: prov["vision_pretraining"][k] for k in ("patch_class_acc", "patch_colour_acc")}
    d = prov["decoder_training"]
    run = SimpleNamespace(plan=StepPlan.of(cfg), step=d["steps"], metrics=SimpleNamespace(losses=[d["final_loss"]]),
                          count_w=d["count_balance"], train_lo=0)
    want = provenance(cfg, run, settings, stats, 0.0, prov["command"])
    assert d["steps"] == run.plan.total
    for key in ("command", "seed", "decoder_seed", "data", "vision_pretraining", "decoder_training"):
        assert json.loads(json.dumps(want[key])) == prov[key], key


def test_a_model_folder_lends_its_tower_read_only_when_its_stage_1_settings_match(tmp_path, capsys):
    """--vision-cache MODEL_DIR: the bundled model's stage-1 tower, weight for weight, when the stage-1
    settings are those its TRAINING.json records (how llava3d-tiny-nodrop shares llava3d-tiny's tower);
    other settings are refused in one line; the folder is never written."""
    import json
    import os

    import torch
    from transformers import CLIPVisionModel

    from adatoken_compile.models.registry import BUNDLED, DEFAULT_MODEL
    from reference_model.vision import _cached_tower, stage1_settings

    d = BUNDLED[DEFAULT_MODEL]
    prov = json.load(open(os.path.join(d, "TRAINING.json")))["vision_pretraining"]
    before = {f: os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(d) for f in fs}
    settings = stage1_settings(prov["seed"], prov["scenes"], prov["steps"], prov["object_weight"], prov["views_per_scene"])
    tower, stats = _cached_tower(d, settings, "any scene code")
    want = CLIPVisionModel.from_pretrained(os.path.join(d, "vision_tower")).state_dict()
    got = tower.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.requires_grad for p in tower.parameters())
    assert stats == {k: prov[k] for k in ("patch_class_acc", "patch_colour_acc")}
    capsys.readouterr()  # the loading's log line
    err = train_error(tmp_path, capsys, "--vision-cache", d, "--vision-scenes", "1", "--vision-steps", "1")
    assert err.startswith("error: ") and "TRAINING.json" in err and "'scenes': 1" in err
    assert before == {f: os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(d) for f in fs}
