"""The committed reference models (llava3d-tiny, and llava3d-tiny-nodrop trained without random
voxel dropping): load like any checkpoint, answer, calibrate."""

from __future__ import annotations

import json
import os
import shlex

import pytest
import torch

from adatoken_compile.benchmark3d.dataset import iter_samples
from adatoken_compile.calibration.api import calibrate
from adatoken_compile.calibration.batches import sample_batches
from adatoken_compile.calibration.policies import peer_schedule
from adatoken_compile.compiler.pipeline import compile_artifact
from adatoken_compile.compiler.reference import generate
from adatoken_compile.evaluation.accuracy import evaluate
from adatoken_compile.evaluation.answers import reference_answer_fn
from adatoken_compile.models.registry import BUNDLED, DEFAULT_MODEL, load_adapter
from adatoken_compile.runtime.engine import load


@pytest.fixture(scope="module")
def bundled():
    return load_adapter(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def ci_sample():
    return list(iter_samples("test", limit=50))


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_layout_and_provenance(name):
    d = BUNDLED[name]
    adapter = load_adapter(name)
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["model_type"] == "llava_llama" and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert cfg["num_hidden_layers"] >= 6
    prov = json.load(open(os.path.join(d, "TRAINING.json")))
    # the recorded command retrains these weights from the repository root into this folder
    # (tests/training checks that it parses into the recipe recorded here)
    argv = shlex.split(prov["command"])
    assert argv[:3] == ["python", "-m", "reference_model.train"]
    out = argv[argv.index("--out") + 1]
    assert out == "adatoken_compile/models/" + os.path.basename(d) and os.path.abspath(d).replace(os.sep, "/").endswith("/" + out)
    assert isinstance(prov["seed"], int) and prov["data"]["split"] == "train"
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
    assert total < 40 * 2**20
    assert adapter.arch()["num_layers"] == cfg["num_hidden_layers"]


def test_the_two_bundled_models_differ_in_the_decoder_training_alone():
    """llava3d-tiny-nodrop: llava3d-tiny's recipe without --bg-keep-max/--bg-hold, on its very
    vision tower (borrowed through --vision-cache), so a rule's lead on one and not the other is the
    voxel dropping's doing."""
    a, b = (json.load(open(os.path.join(BUNDLED[n], "TRAINING.json"))) for n in ("llava3d-tiny", "llava3d-tiny-nodrop"))
    da, db = a["decoder_training"], b["decoder_training"]
    assert (da["bg_keep_max"], da["bg_hold_steps"]) == (0.1, 7200) and db["bg_hold_steps"] in (None, 0)
    assert db["bg_keep_max"] in (None, 1.0) and db["bg_curriculum_steps"] == da["bg_curriculum_steps"]
    same = {k for k in da if k not in ("bg_keep_max", "bg_hold_steps", "final_loss")}
    assert {k: da[k] for k in same} == {k: db[k] for k in same}
    assert a["vision_pretraining"] == b["vision_pretraining"]
    oa, ob = ({k: v for k, v in zip(argv[3::2], argv[4::2])} for argv in (shlex.split(x["command"]) for x in (a, b)))
    assert {k: oa.pop(k) for k in ("--bg-keep-max", "--bg-hold")} == {"--bg-keep-max": "0.1", "--bg-hold": "0.9"}
    assert ob.pop("--vision-cache") == oa.pop("--out") == "adatoken_compile/models/llava3d_tiny"
    assert ob.pop("--out") == "adatoken_compile/models/llava3d_tiny_nodrop" and oa == ob
    from transformers import CLIPVisionModel

    ta, tb = (CLIPVisionModel.from_pretrained(os.path.join(BUNDLED[n], "vision_tower")).state_dict()
              for n in ("llava3d-tiny", "llava3d-tiny-nodrop"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# llava3d-tiny only: the nodrop model's weights are checked for loading and provenance above, and
# its accuracy by the comparison in docs/selection-rules.md (CI stays under its 20 minutes)
def test_bundled_accuracy_on_fixed_test_sample(bundled, ci_sample):
    """The bundled model reaches 85% on the fixed 50-question test sample, and the weights
    reproduce, through the adapter, the accuracy their training run recorded on it (a regression
    check of weights + adapter). The 90% target is measured on the first 2,000 test questions by
    `adatoken-compile eval --limit 2000` (reference_model/MODEL_CARD.md: 91.25%), too slow for CI."""
    assert len(ci_sample) == 50
    res = evaluate(reference_answer_fn(bundled), ci_sample)
    prov = json.load(open(os.path.join(BUNDLED[DEFAULT_MODEL], "TRAINING.json")))["ci_sample_eval"]
    assert res["n"] == prov["n"] == 50
    # at most one question answered differently (the image processing now rounds as transformers does)
    assert abs(round(res["accuracy"] * 50) - round(prov["accuracy"] * 50)) <= 1, (res["accuracy"], prov["accuracy"])
    assert res["accuracy"] >= 0.85, res["accuracy"]
    assert {k: v["n"] for k, v in res["per_kind"].items()} == {k: v["n"] for k, v in prov["per_kind"].items()}

def test_solver_meets_budget_on_bundled(bundled, tmp_path):
    batches = sample_batches(bundled, iter_samples("calibration", limit=16))
    sched, stats = calibrate(bundled.decoder, batches, policy="adaptive",
                             flops_budget=0.5, fingerprint=bundled.fingerprint(), progress=False, max_validations=4,
                             holdout=0.25)
    assert sched.predicted["flops_ratio"] <= 0.5 + 1e-9
    ratios = [c.keep for c in sched.cuts]
    assert ratios == sorted(ratios, reverse=True) and all(0 < r <= 1 for r in ratios)
    sched.validate()


def test_ort_generation_equals_pytorch_reference_on_20_test_questions(bundled, ci_sample, tmp_path):
    """Greedy answers of the ORT artifact (pruned prefill + per-layer KV-cache decode) equal, token
    for token, the PyTorch reference that prunes and decodes the same way."""


    L = bundled.arch()["num_layers"]
    sched = peer_schedule("pdrop", L, fingerprint=bundled.fingerprint(), family=bundled.family)
    art = str(tmp_path / "art")
    compile_artifact(bundled, sched, art, progress=False)
    rt = load(art)
    qs = ci_sample[:20]
    for i in range(0, 20, 5):  # batches of 5 (mixed scenes, different lengths: left padding)
        group = qs[i : i + 5]
        feeds = rt.prepare([(s.scene, s.question) for s in group])
        steps = list(rt.generate_ids(feeds, max_new_tokens=6))
        ort_ids = []
        for b in range(len(group)):
            row = []
            for t in steps:
                if int(t[b]) == bundled.eos_token_id:
                    break
                row.append(int(t[b]))
            ort_ids.append(row)
        with torch.no_grad():
            ref = generate(bundled.decoder, bundled.prepare(group), sched, max_new_tokens=6,
                                  eos_token_id=bundled.eos_token_id)
        assert ort_ids == ref
    # the KV cache holds what the schedule's arithmetic says
    out = rt.prefill(rt.prepare([(qs[0].scene, qs[0].question)]))
    n_sp = int(rt.prepare([(qs[0].scene, qs[0].question)])["spatial_mask"].sum())
    n_tx = int(out["mask.0"].sum()) - n_sp
    per_tok = 2 * rt.arch["kv_heads"] * rt.arch["head_dim"] * 4
    assert rt.kv_cache_bytes(out)[0] == sum(t + n_tx for t in sched.tokens_per_layer(n_sp)) * per_tok
