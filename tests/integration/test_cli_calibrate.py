"""calibrate / eval through the CLI on a tiny random LLaVA-3D checkpoint and the procedural data."""

from __future__ import annotations

import json
import os
import re

from click.testing import CliRunner

from adatoken_compile.cli import main
from adatoken_compile.evaluation.accuracy import normalize, score
from adatoken_compile.contract import Sample
from adatoken_compile.schedule import Schedule


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_calibrate_help_states_the_solvers_default_fidelity():
    """The CLI keeps torch out of start-up, so its help text spells the default target out; it must
    be the solver's."""
    from adatoken_compile.calibration.solver import DEFAULT_FIDELITY

    r = _run(["calibrate", "--help"])
    assert r.exit_code == 0 and re.search(rf"given: {re.escape(str(DEFAULT_FIDELITY))}(?![\d])", " ".join(r.output.split()))


def test_calibrate_peer_policy_writes_everything(tiny3d_dir, tmp_path):
    out = tmp_path / "cal"
    r = _run(["calibrate", "--model", tiny3d_dir, "--out", str(out), "--samples", "6", "--policy", "pdrop",
              "--holdout", "2"])
    assert r.exit_code == 0, r.output
    assert "validated on 2 held-back rows" in r.output and "95% CI" in r.output
    files = set(os.listdir(out))
    assert {"schedule.json", "report.md"} <= files and any(f.startswith("stats") for f in files)
    assert any(f.endswith(".png") for f in files)
    s = Schedule.load(str(out / "schedule.json"))
    assert s.policy == "pdrop" and [c.layer for c in s.cuts] == [1, 2, 3]
    fid = s.calibration["fidelity"]
    assert s.calibration["samples"] == 6 and fid["rows"] == 2 and fid["ci95"][0] <= fid["agreement"] <= fid["ci95"][1]
    assert 0 < s.predicted["flops_ratio"] < 1


def test_calibrate_bad_budget_leaves_nothing(tiny3d_dir, tmp_path):
    out = tmp_path / "cal"
    r = CliRunner().invoke(main, ["calibrate", "--model", tiny3d_dir, "--out", str(out), "--samples", "4",
                                  "--flops-budget", "1.5"])
    assert r.exit_code == 2 and "(0, 1)" in r.output and r.output.strip().count("\n") == 0
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".cal")]


def test_calibrate_bad_holdout_is_one_line(tiny3d_dir, tmp_path):
    out = tmp_path / "cal"
    r = CliRunner().invoke(main, ["calibrate", "--model", tiny3d_dir, "--out", str(out), "--holdout", "1.5"])
    assert r.exit_code == 2 and "--holdout" in r.output and r.output.strip().count("\n") == 0
    assert not out.exists()


def test_calibrate_shards_merge(tiny3d_dir, tmp_path):
    a, b, m = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    for d, start in ((a, 0), (b, 3)):
        r = _run(["calibrate", "--model", tiny3d_dir, "--out", str(d), "--samples", "5", "--start-scene", str(start),
                  "--policy", "fastv", "--holdout", "4"])
        assert r.exit_code == 0, r.output
    r = _run(["calibrate", "--model", tiny3d_dir, "--out", str(m), "--merge", str(a), "--merge", str(b),
              "--policy", "fastv", "--holdout", "8"])
    assert r.exit_code == 0, r.output
    ja = json.load(open(a / "schedule.json"))["calibration"]["samples"]
    jb = json.load(open(b / "schedule.json"))["calibration"]["samples"]
    jm = json.load(open(m / "schedule.json"))["calibration"]
    assert jm["samples"] == ja + jb and jm["merged_shards"] == 2
    assert jm["fidelity"]["rows"] == 8
    # adaptive on merged statistics validates on exactly --holdout rows (the count its target needs)
    r = _run(["calibrate", "--model", tiny3d_dir, "--out", str(tmp_path / "ma"), "--merge", str(a), "--merge", str(b),
              "--holdout", "76"])
    assert r.exit_code == 0, r.output
    assert json.load(open(tmp_path / "ma" / "schedule.json"))["calibration"]["fidelity"]["rows"] == 76
    lo = float(re.search(r"lower end (\d\.\d+) >= 0\.95", r.output).group(1))  # the pass rule, printed
    assert lo >= 0.95


def test_score_per_kind():
    s = [Sample("q", answer="red", kind="attribute", meta={"template": "color_of_class"}),
         Sample("q", answer="box", kind="attribute", meta={"template": "class_of_color"}),
         Sample("q", answer="2", kind="counting", meta={"template": "count"}),
         Sample("q", answer="yes", kind="existence", meta={"template": "exist"})]
    r = score(s, ["Red.", "ball", "3", "yes"])
    assert r["n"] == 4 and abs(r["accuracy"] - 2 / 4) < 1e-12
    assert r["per_kind"]["counting"]["accuracy"] == 0.0 and r["per_kind"]["attribute"]["accuracy"] == 0.5
    assert r["per_template"]["color_of_class"] == {"accuracy": 1.0, "em1": 1.0, "em1_refined": 1.0, "n": 1}
    assert r["per_template"]["class_of_color"] == {"accuracy": 0.0, "em1": 0.0, "em1_refined": 0.0, "n": 1}
    assert "per_template" not in score([Sample("q", answer="x", kind="k")], ["x"])  # no templates named: no table
    assert normalize("  Blue  box") == "blue"


def test_eval_json(tiny3d_dir):
    r = _run(["eval", "--model", tiny3d_dir, "--limit", "6", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["n"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    assert sum(v["n"] for v in res["per_kind"].values()) == 6


def test_eval_kind_keeps_a_subset_of_the_same_questions(tiny3d_dir, tmp_path):
    full, sub = tmp_path / "full.json", tmp_path / "sub.json"
    assert _run(["eval", "--model", tiny3d_dir, "--limit", "30", "--json", "--predictions", str(full)]).exit_code == 0
    r = _run(["eval", "--model", tiny3d_dir, "--limit", "30", "--kind", "relation", "--kind", "exist", "--json",
              "--predictions", str(sub)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    want = [p for p in json.loads(full.read_text()) if p["kind"] == "relation" or p["template"] == "exist"]
    assert 0 < len(want) < 30 and res["n"] == len(want)
    assert set(res["per_kind"]) == {"relation", "existence"}
    assert json.loads(sub.read_text()) == want  # the same questions with the same answers, in the same order


def test_eval_kind_with_no_such_question_is_a_one_line_error(tiny3d_dir):
    r = _run(["eval", "--model", tiny3d_dir, "--limit", "1", "--kind", "closer"])
    assert r.exit_code == 2 and "raise --limit" in r.output and r.output.strip().count("\n") == 0


def test_calibrate_through_hf_llava_qwen2_adapter(tmp_path):
    """Calibration depends only on the contract: an HF LLaVA (Qwen2, GQA) adapter's batches work."""
    import numpy as np

    from adatoken_compile.calibration.api import calibrate
    from adatoken_compile.models.testing import random_llava_hf
    from adatoken_compile.models.registry import load_adapter

    a = load_adapter(random_llava_hf(str(tmp_path / "hf"), decoder="qwen2", kv_heads=2, layers=4))
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (60, 80, 3), dtype=np.uint8) for _ in range(6)]
    batches = [a.prepare([Sample("what color is the ball?", image=imgs[i]), Sample("how many?", image=imgs[i + 1])])
               for i in range(0, 6, 2)]
    sched, stats = calibrate(a.decoder, batches, policy="pdrop", fingerprint=a.fingerprint(), progress=False,
                             holdout=0.25)
    assert stats.samples > 0 and sched.fingerprint == a.fingerprint()
    assert stats.mean_spatial_tokens() == (a.image_size // 14) ** 2
    assert [c.layer for c in sched.cuts] == [1, 2, 3] and "fidelity" in sched.calibration


def test_cli_api_and_main_job_share_one_calibration_path(tiny3d_dir, tmp_path):
    """`calibrate` with its defaults is `api.calibrate` with its defaults: the statistics come from the
    first scenes of the calibration questions, the held-back rows from a disjoint later block."""
    from adatoken_compile import api

    out = tmp_path / "cal"
    r = _run(["calibrate", "--model", tiny3d_dir, "--out", str(out), "--samples", "6", "--holdout", "80"])
    assert r.exit_code == 0, r.output
    cli = Schedule.load(str(out / "schedule.json"))
    cal = api.calibrate(tiny3d_dir, samples=6, holdout=80, progress=False)
    assert [(c.layer, c.keep) for c in cli.cuts] == [(c.layer, c.keep) for c in cal.schedule.cuts]
    assert cli.calibration["fidelity"] == cal.schedule.calibration["fidelity"]
    env = cli.calibration["environment"]
    assert env["versions"]["torch"] and env["threads"]["torch_threads"] >= 1
    from adatoken_compile.data import load_samples

    stats = load_samples(api.CALIBRATION_DATA, limit=6)
    hold = api.holdout_samples(api.CALIBRATION_DATA, 80, len({id(s.scene) for s in stats}))
    stats_scenes = {s.meta["seed"] for s in stats}
    assert len(hold) == 80 and not stats_scenes & {s.meta["seed"] for s in hold}


def test_cli_usage_errors_are_one_line(tiny3d_dir, tmp_path):
    for args in (["calibrate", "--model", tiny3d_dir, "--out", str(tmp_path / "c"), "--holdout", "1.5"],
                 ["calibrate", "--out", str(tmp_path / "c"), "--policy", "magic"],
                 ["eval", "--limit", "0"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.strip().count("\n") == 0, r.output
    assert not (tmp_path / "c").exists()


def test_gpu_check_calibration_step_rehearsed_on_cpu(tiny3d_dir, tmp_path):
    """The GPU check's calibration step (layer-major and whole-model on the device, in its dtype),
    run on the CPU in float32: both engines calibrate the same scenes to the same schedule, and
    the figures it reports are recorded."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "gpu_check.py"), "--out", str(tmp_path),
                        "--rehearse-calibrate-on-cpu", tiny3d_dir], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    layered, sample = res["calibrate_cpu_float32_layered"], res["calibrate_cpu_float32_sample"]
    assert layered["cuts"] == sample["cuts"] and layered["cuts"]
    assert layered["precision"]["dtype"] == sample["precision"]["dtype"] == "float32"
    assert layered["precision"]["device"] == "cpu" and layered["wall_s"] > 0
    assert layered["engine"]["order"] == "layer-major" and sample["engine"]["order"] == "sample-major"
    assert layered["engine"]["validation_s_per_sample_layer"] > 0
    assert "calibrate on cpu float32, layered" in r.stdout
