"""The CDPruner comparison's pure parts: arguments, the configurations, OpenVINO's kept-token count,
parity, the summary and its table, the checkpoint key and the question-file generator (nothing is
installed, exported or run)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def bc():
    spec = importlib.util.spec_from_file_location("bench_cdpruner", SCRIPTS / "bench_cdpruner.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments_defaults_and_normalisation(bc, tmp_path):
    a = bc.parse_args(["--model", str(tmp_path), "--data", "q.jsonl", "--out", str(tmp_path / "o"),
                       "--ratios", "90,50,50", "--openvino", "default,f32"])
    assert a.ratios == [50, 90]
    assert a.openvino == ["openvino", "openvino-f32"]
    assert a.prellm_rules == ["random", "diverse"]
    assert (a.rounds, a.threads, a.new_tokens, a.flops_of) == (3, 2, 8, 75)


@pytest.mark.parametrize("argv, what", [
    (["--ratios", "0,50"], "--ratios"),
    (["--ratios", "x"], "--ratios"),
    (["--openvino", "fp16"], "--openvino"),
    (["--prellm-rules", "last_token"], "--prellm-rules"),  # needs attention: cannot run before layer 0
    (["--relevance-weight", "1.5"], "--relevance-weight"),
    (["--rounds", "0"], "--rounds"),
    (["--flops-of", "100"], "--flops-of"),
])
def test_bad_arguments_are_one_error_line_exit_2(bc, argv, what, capsys, tmp_path):
    rc = bc.main(["--model", str(tmp_path), "--data", "q.jsonl", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {what}")


def test_missing_model_is_refused_before_building(bc, capsys, tmp_path):
    rc = bc.main(["--model", str(tmp_path / "none"), "--data", "q.jsonl", "--out", str(tmp_path / "o")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_plan_names_every_configuration_once(bc):
    cs = bc.plan([50, 90], ["random"], ["openvino-f32"])
    names = [c["name"] for c in cs]
    assert names == ["ours:unpruned", "ours:calibrated", "ours:prellm-random@50", "ours:prellm-random@90",
                     "openvino-f32:0", "openvino-f32:50", "openvino-f32:90", "openvino-f32:0:resized"]
    ov = [c for c in cs if c["engine"] == "openvino-f32"]
    assert [c["ratio"] for c in ov] == [0, 50, 90, 0] and ov[-1]["presize"]
    # one worker per artifact, one per OpenVINO precision
    assert len({c["engine"] for c in cs}) == 5


def test_openvino_kept_tokens_and_eos(bc):
    assert bc.ov_kept(35, 73, 47) == 9  # 26 fewer prompt tokens: 26 of 35 visual tokens pruned
    assert bc.strip_eos([5, 6, 253, 7], 253) == [5, 6]
    assert bc.strip_eos([5, 6], [253, 1]) == [5, 6]


def test_parity_counts_questions_and_tokens(bc):
    p = bc.parity({0: [1, 2, 3], 1: [4, 5, 6], 2: [7]}, {0: [1, 2, 3], 1: [4, 9, 6], 2: [7, 8]})
    assert (p["questions"], p["identical"]) == (3, 1)
    assert (p["tokens_same"], p["tokens_of"]) == (6, 8)
    assert p["first_differences"] == {1: 1, 2: 1}


def _sample(config, q, tokens, *, r=0, n_input=10, n_visual=None, per_layer=None, ttft=0.01):
    s = {"config": config, "q": q, "round": r, "tokens": tokens, "ttft_s": ttft, "embed_s": ttft / 2,
         "n_input": n_input, "load_avg_1min": 1.0}
    if n_visual is not None:
        s.update(n_visual=n_visual, spatial_per_layer=per_layer)
    return s


def test_summary_kept_tokens_accuracy_paired_and_parity(bc):
    configs = [c for c in bc.plan([50], ["random"], ["openvino-f32"]) if not c.get("presize")]
    questions = [{"question": "q0", "answers": ["yes"]}, {"question": "q1", "answers": ["no"]}]
    samples = []
    for r, t in ((0, 0.010), (1, 0.030)):
        samples += [
            _sample("ours:unpruned", 0, [1], r=r, n_input=30, n_visual=20, per_layer=[20, 20], ttft=t),
            _sample("ours:unpruned", 1, [2], r=r, n_input=30, n_visual=20, per_layer=[20, 20], ttft=t),
            _sample("ours:calibrated", 0, [1], r=r, n_input=30, n_visual=20, per_layer=[20, 4]),
            _sample("ours:calibrated", 1, [1], r=r, n_input=30, n_visual=20, per_layer=[20, 4]),
            _sample("ours:prellm-random@50", 0, [1], r=r, n_input=30, n_visual=20, per_layer=[10, 10]),
            _sample("ours:prellm-random@50", 1, [2], r=r, n_input=30, n_visual=20, per_layer=[10, 10]),
            _sample("openvino-f32:0", 0, [1], r=r, n_input=30),
            _sample("openvino-f32:0", 1, [3], r=r, n_input=30),
            _sample("openvino-f32:50", 0, [1], r=r, n_input=20),
            _sample("openvino-f32:50", 1, [2], r=r, n_input=21),
        ]
    texts = {}
    for s in samples:
        texts[(s["config"], s["q"])] = {1: "yes", 2: "no", 3: "maybe"}[s["tokens"][0]]
    flops = {"ours:unpruned": 1.0, "openvino-f32:50": 0.6}
    out = bc.summarize(samples, configs, questions, texts, flops)
    c = out["configs"]
    assert c["ours:unpruned"]["ttft_ms"] == pytest.approx(20.0)  # median of both rounds
    assert c["openvino-f32:50"]["kept_mean"] == pytest.approx(10.5)  # 10 and 9 fewer prompt tokens: 10 and 11 kept
    assert c["ours:calibrated"]["kept_per_layer"] == [20, 4]
    assert bc.kept_text(c["ours:calibrated"]) == "20.0 of 20.0, 4.0 from L1"
    assert c["ours:unpruned"]["accuracy"] == 1.0 and c["ours:calibrated"]["accuracy"] == 0.5
    v = c["ours:unpruned"]["vs_calibrated"]
    assert (v["changed"], v["gained"], v["lost"], v["delta_points"]) == (1, 1, 0, 50.0)
    assert c["ours:calibrated"]["vs_calibrated"] is None
    assert c["openvino-f32:0"]["agreement_with_unpruned"] == 1.0
    assert c["openvino-f32:50"]["agreement_with_unpruned"] == 0.5
    assert c["openvino-f32:50"]["flops_ratio"] == 0.6 and c["ours:calibrated"]["flops_ratio"] is None
    par = out["parity"]["openvino-f32:0"]
    assert (par["identical"], par["questions"], par["prompt_lengths_equal"]) == (1, 2, 2)
    md = bc.markdown(out)
    assert md.count("\n| ") == 5 and "1/2 questions identical" in md
    assert "+50.0 [" in md


def test_checkpoint_key_follows_the_files(bc, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    k = bc.checkpoint_key(str(tmp_path))
    assert bc.checkpoint_key(str(tmp_path)) == k
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert bc.checkpoint_key(str(tmp_path)) != k


def test_generated_questions_are_a_question_file(bc, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS.parent))
    path = bc.make_questions(str(tmp_path / "q"), images=4, sides=(30, 60))
    rows = [json.loads(x) for x in open(path)]
    assert len(rows) == 12 and all(r["answers"] for r in rows)
    assert any(isinstance(r["image"], list) for r in rows)  # a question about two images
    qs = bc.load_questions(path, None)
    assert len(qs) == 12 and all(pathlib.Path(p).is_file() for q in qs for p in q["images"])
    assert bc.make_questions(str(tmp_path / "again"), images=4, sides=(30, 60)) and \
        open(tmp_path / "again" / "q.jsonl").read() == open(path).read()


def test_video_questions_are_refused_in_one_line(bc, tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "f.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "what moves?", "frames": ["f.png", "f.png"]}) + "\n")
    with pytest.raises(bc.UsageError, match="video"):
        bc.load_questions(str(tmp_path / "q.jsonl"), None)


def test_an_export_gets_the_image_processor_config_it_lacks(bc, tmp_path):
    model, out = tmp_path / "ckpt", tmp_path / "ov"
    model.mkdir()
    out.mkdir()
    for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml"):  # present: no conversion runs
        (out / name).write_text("")
    nested = {"image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 50176}
    (out / "processor_config.json").write_text(json.dumps({"image_processor": nested}))
    bc.complete_export(str(tmp_path / "venv"), str(model), str(out))
    assert json.loads((out / "preprocessor_config.json").read_text()) == nested
    # without a nested one, the checkpoint's own
    (out / "preprocessor_config.json").unlink()
    (out / "processor_config.json").unlink()
    (model / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136}))
    bc.complete_export(str(tmp_path / "venv"), str(model), str(out))
    assert json.loads((out / "preprocessor_config.json").read_text()) == {"min_pixels": 3136}
