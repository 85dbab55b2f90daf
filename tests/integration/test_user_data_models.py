"""Models on the user's data: scene folders and question files through run / calibrate / eval give
what the built-in path gives on the same scenes; HF LLaVA on a JSONL of images, against
transformers' own ``LlavaForConditionalGeneration.generate`` with a ``LlavaProcessor``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adatoken_compile import api
from adatoken_compile.benchmark3d import dataset
from adatoken_compile.cli import main
from adatoken_compile.runtime import scannet
from adatoken_compile.data.questions import write_scanqa
from adatoken_compile.schedule import Schedule, identity

CAL0 = dataset.SPLITS["calibration"][0]
SIZES = ((33, 50), (57, 91), (300, 171), (56, 56))  # 50 * 56 / 33 = 84.8: CLIP rounds the long side down


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _quantised(render_scene):
    """The built-in renders with depth in whole millimetres, as a ScanNet depth PNG stores it."""

    def render(*args, **kwargs):
        out = render_scene(*args, **kwargs)
        scene = out.scene
        scene.depths = np.round(scene.depths.astype(np.float64) * 1000).astype(np.uint16).astype(np.float32) / np.float32(1000)
        return out

    return render


def test_folder_and_npz_give_the_same_answer(tiny3d_dir, tmp_path):
    scene, _ = dataset.make_scene(CAL0)
    scene.save(str(tmp_path / "s.npz"))
    scannet.write(scene, str(tmp_path / "s"), "s")
    q = ["run", "--model", tiny3d_dir, "-q", "what color is the ball?", "--max-new-tokens", "6"]
    a, b = _run([*q, "--scene", str(tmp_path / "s.npz")]), _run([*q, "--scene", str(tmp_path / "s")])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert a.output.splitlines()[-1].startswith("answer:") and a.output == b.output
    (tmp_path / "s" / "pose" / "3.txt").write_text("-inf -inf -inf -inf\n" * 4)  # lost tracking, as ScanNet writes it
    r = _run(["inspect", "--model", tiny3d_dir, "--scene", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    warnings = [x for x in r.output.splitlines() if x.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 's'}: skipped 1 frame(s) (1 with an inf/nan pose)"]


def test_question_file_calibrates_and_evaluates_as_the_builtin_data(tiny3d_dir, tmp_path, monkeypatch):
    """The first calibration scene for the statistics and scenes 200-201 (where the built-in data's
    held-back questions start), written as ScanNet folders with a ScanQA file: the same schedule,
    the same validation and the same answers."""
    monkeypatch.setattr(dataset, "render_scene", _quantised(dataset.render_scene))
    rows = []
    for off in (0, 200, 201):
        sid = f"scene{CAL0 + off}_00"
        scene, info = dataset.make_scene(CAL0 + off)
        scannet.write(scene, str(tmp_path / sid), sid)
        rows += [{"question_id": f"{sid}-{i}", "scene_id": sid, "question": q.text, "answers": [q.answer], "type": q.kind}
                 for i, q in enumerate(dataset.questions_for(info))]
    write_scanqa(str(tmp_path / "q.json"), rows)
    n0 = sum(r["scene_id"] == f"scene{CAL0}_00" for r in rows)  # the statistics: exactly the first scene
    common = ["--model", tiny3d_dir, "--samples", str(n0), "--holdout", "8", "--flops-budget", "0.6"]
    for out, data in (("a", []), ("b", ["--data", str(tmp_path / "q.json"), "--scenes", str(tmp_path)])):
        r = _run(["calibrate", "--out", str(tmp_path / out), *common, *data])
        assert r.exit_code == 0, r.output
    a, b = (Schedule.load(str(tmp_path / o / "schedule.json")) for o in "ab")
    assert a.cuts and [(c.layer, c.keep) for c in a.cuts] == [(c.layer, c.keep) for c in b.cuts]
    assert a.calibration["fidelity"] == b.calibration["fidelity"] and a.calibration["samples"] == b.calibration["samples"]
    assert b.calibration["data"] == str(tmp_path / "q.json") and b.calibration["scenes"] == str(tmp_path)
    res, preds = [], []
    for i, data in enumerate((["--data", "builtin:calibration"], ["--data", str(tmp_path / "q.json"), "--scenes", str(tmp_path)])):
        r = _run(["eval", "--model", tiny3d_dir, "--limit", "10", "--json", "--predictions", str(tmp_path / f"p{i}.json"), *data])
        assert r.exit_code == 0, r.output
        res.append(json.loads(r.output[r.output.index("{"):]))
        preds.append(json.loads((tmp_path / f"p{i}.json").read_text()))
    a, b = res
    for key in ("n", "accuracy", "em1", "em1_refined", "per_kind"):
        assert a[key] == b[key], key
    assert [p["prediction"] for p in preds[0]] == [p["prediction"] for p in preds[1]]
    assert preds[1][0]["id"] == f"scene{CAL0}_00-0" and "cider" in b and "cider" not in a


# ----------------------------------------------------------------------------- HF LLaVA

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from adatoken_compile.models.testing import CHATML_TEMPLATE, LLAVA15_CHAT_TEMPLATE, random_llava_hf

    d = tmp_path_factory.mktemp("hf")
    return {"llama": random_llava_hf(str(d / "llama"), decoder="llama", chat_template=LLAVA15_CHAT_TEMPLATE),
            "qwen2": random_llava_hf(str(d / "qwen2"), decoder="qwen2", kv_heads=2, image_processor="siglip",
                                     chat_template=CHATML_TEMPLATE)}


@torch.no_grad()
def _hf_generate(model_dir, images, question, max_new_tokens=8):
    """Greedy ids of transformers' own LlavaProcessor + LlavaForConditionalGeneration.generate (EOS cut)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    proc = LlavaProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    out = []
    for img in images:
        inp = proc(images=img, text=prompt, return_tensors="pt")
        ids = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        out.append(ids[:ids.index(eos)] if eos in ids else ids)
    return out


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_hf_llava_reference_matches_transformers_generate(hf_dirs, decoder):
    """The chat template's prompt and the image processor's pixels (CLIP; SigLIP for Qwen2) for odd
    image sizes: the PyTorch reference's greedy tokens are transformers' own."""
    from adatoken_compile.compiler.reference import generate
    from adatoken_compile.runtime.sample import Sample

    ad = api.load_model(hf_dirs[decoder])
    assert ad.prompt.template == "chat_template"
    q = "what color is the ball?"
    ours = [generate(ad.decoder, ad.prepare([Sample(q, image=im)]), identity(2), max_new_tokens=8,
                     eos_token_id=ad.eos_token_id)[0] for im in _images()]
    assert ours == _hf_generate(hf_dirs[decoder], _images(), q)


def test_a_rule_search_holds_back_more_questions_and_a_small_file_gives_what_it_has(hf_dirs, tmp_path):
    """Without --holdout, calibrate asks for api.RULES_HOLDOUT held-back questions when --rules
    searches (rules differ by less than api.HOLDOUT questions resolve) and api.HOLDOUT otherwise; a
    question file with fewer questions past the statistics' scenes validates on all of them."""
    from PIL import Image

    for i, im in enumerate(_images()):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    lines = [{"image": f"{i}.png", "question": q} for i in range(len(SIZES)) for q in ("what is it?", "how many?")]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for out, rules, asked in (("plain", [], api.HOLDOUT), ("rules", ["--rules", "strided,random"], api.RULES_HOLDOUT)):
        r = _run(["calibrate", "--model", hf_dirs["llama"], "--out", str(tmp_path / out), "--data",
                  str(tmp_path / "q.jsonl"), "--samples", "4", "--flops-budget", "0.9", *rules])
        assert r.exit_code == 0, r.output
        cal = Schedule.load(str(tmp_path / out / "schedule.json")).calibration
        assert cal["holdout_questions"] == asked and cal["holdout_rows"] == len(lines) - 4, (out, cal)
    assert api.RULES_HOLDOUT > api.HOLDOUT and "trials" in cal["rules"]


def test_hf_llava_on_a_jsonl_of_images_calibrate_artifact_eval(hf_dirs, tmp_path):
    """Label-free calibration on a JSONL of images, the unpruned artifact answering as transformers
    does (Qwen2, GQA), and `eval --artifact` on the same file."""
    from PIL import Image

    from adatoken_compile.runtime import load

    d = hf_dirs["qwen2"]
    imgs = _images()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    qs = ["what color is the ball?", "how many chairs are there?"]
    lines = [{"image": f"{i}.png", "question": q} for i in range(len(imgs)) for q in qs]
    (tmp_path / "nolabels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps({**x, "answers": ["red", "two"]}) + "\n" for x in lines))
    r = _run(["calibrate", "--model", d, "--out", str(tmp_path / "cal"), "--data", str(tmp_path / "nolabels.jsonl"),
              "--samples", "4", "--holdout", "4", "--flops-budget", "0.9"])
    assert r.exit_code == 0, r.output
    sched = Schedule.load(str(tmp_path / "cal" / "schedule.json"))
    assert sched.calibration["fidelity"]["rows"] == 4 and sched.calibration["samples"] == 4
    art = str(tmp_path / "art")
    api.compile(d, None, art, progress=False)
    rt = load(art)
    want = _hf_generate(d, imgs, qs[0])
    for im, w in zip(imgs, want):
        rt.generate(im, qs[0], max_new_tokens=8)
        assert rt.last_ids[0] == w
    r = _run(["eval", "--artifact", art, "--model", d, "--data", str(tmp_path / "labels.jsonl"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["n"] == len(lines) and res["agreement"] == 1.0 and res["paired"]["changed"] == 0
    assert res["em1"] == res["baseline_em1"] and {"bleu4", "cider"} <= set(res)
    r = _run(["eval", "--model", d, "--data", str(tmp_path / "nolabels.jsonl"), "--json", "--limit", "2"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["n"] == 0 and res["questions"] == 2 and res["accuracy"] is None
    assert os.path.exists(art) and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # a video for a model that takes one image a prompt: one line, exit 2, from the model and the artifact
    from adatoken_compile.errors import InputError
    from adatoken_compile.runtime import Video

    (tmp_path / "video.jsonl").write_text(json.dumps({"frames": ["0.png", "0.png"], "question": qs[0]}))
    r = CliRunner().invoke(main, ["eval", "--model", d, "--data", str(tmp_path / "video.jsonl"), "--limit", "1"])
    errors = [line for line in r.output.replace("\r", "\n").splitlines() if "error" in line]
    assert r.exit_code == 2 and errors == ["error: video: an HF LLaVA prompt holds one image, not a video; ask about one "
                                           "frame at a time"], r.output
    with pytest.raises(InputError, match=r"^video: this artifact's model takes images, not videos"):
        rt.generate(Video([imgs[0], imgs[0]]), qs[0])


def test_compare_on_a_jsonl_of_images_calibrates_on_the_file(hf_dirs, tmp_path):
    """compare with an image model and a question file: the statistics and held-back questions come
    from the file's images after those answered (no built-in scenes are needed), and a file whose
    answered questions use every image is a one-line error."""
    from PIL import Image

    rng = np.random.default_rng(1)
    n_img = 10
    for i in range(n_img):
        Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lines = [{"image": f"{i}.png", "question": q, "answers": [a]}
             for i in range(n_img) for q, a in (("what color is it?", "red"), ("is it there?", "yes"))]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = api.compare(hf_dirs["llama"], out=str(tmp_path / "cmp"), data=str(tmp_path / "q.jsonl"), limit=4,
                      budgets=(0.5,), seeds=(0,), rules=("strided",), peers=("fastv",), search=False, samples=4,
                      holdout=8, progress=False, log=lambda *a: None)
    assert res["calibration_data"] == str(tmp_path / "q.jsonl")
    assert res["statistics_questions"] == 4 and res["holdout_questions"] == 8
    preds = json.load(open(tmp_path / "cmp" / "predictions.json"))
    assert {"unpruned", "fastv"} <= set(preds) and all(len(p) == 4 for p in preds.values()), preds
    # the answered questions use images 0-1; the statistics images 2-3; the held-back ones 4-7
    r = _run(["compare", "--model", hf_dirs["llama"], "--out", str(tmp_path / "all"), "--data",
              str(tmp_path / "q.jsonl"), "--limit", str(len(lines)), "--budgets", "0.5", "--rules", "strided",
              "--peers", "fastv", "--no-search", "--samples", "4", "--holdout", "8"])
    last = r.output.strip().splitlines()[-1]  # (transformers' weight-loading bar may come before)
    assert r.exit_code == 2 and last.startswith("error: ") and "none is left to calibrate on" in last, r.output
