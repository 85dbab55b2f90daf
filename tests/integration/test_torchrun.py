"""calibrate, eval and compare launched by torchrun (2 processes, gloo on CPU) against the same command in
one process: the same bytes, apart from recorded timings and the world size; a bad input on one
rank ends every rank with its one-line error and writes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAILING_RANK = os.path.join(ROOT, "tests", "integration", "torchrun_failing_rank.py")
# 10 samples and 26 held-back rows: batches of 4 split 2 + 1 and 4 + 3 between the ranks (uneven
# shares, a short last batch); at fidelity 0.6 some candidates stop early, mid-way through the rows
CALIBRATE = ["calibrate", "--samples", "10", "--holdout", "26", "--fidelity", "0.6"]


def _start(args, *, ranks: int = 1, program=("-m", "adatoken_compile"), env=None) -> subprocess.Popen:
    # one thread per process both ways: the comparison is of the sharding, not of thread counts
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    return subprocess.Popen([*launch, *program, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(*procs) -> list:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _said(stdout: str, out) -> str:
    """What a run printed, less its output folder and its stage timings ("(3 s)"), which differ by a
    second between runs whenever a stage straddles a second boundary."""
    return re.sub(r"\(\d+ s\)", "(_ s)", stdout.replace(str(out), "<out>"))


def _run(args, **kw) -> subprocess.CompletedProcess:
    return _wait(_start(args, **kw))[0]


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_torchrun_calibrate_writes_what_one_process_writes(tiny3d_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = _wait(_start([*CALIBRATE, "--model", tiny3d_dir, "--out", str(one)]),  # side by side: less waiting
                   _start([*CALIBRATE, "--model", tiny3d_dir, "--out", str(two)], ranks=2))
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("wrote ") == 1 and _said(r2.stdout, two) == _said(r1.stdout, one)  # rank 0 speaks
    assert (one / "stats.npz").read_bytes() == (two / "stats.npz").read_bytes()
    for name in ("report.json", "report.md"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    s1, s2 = _load(one / "stats.json"), _load(two / "stats.json")
    assert s1["meta"].pop("observe_seconds") >= 0 and s2["meta"].pop("observe_seconds") >= 0
    assert s1 == s2
    a, b = _load(one / "schedule.json"), _load(two / "schedule.json")
    assert (a["calibration"]["environment"].pop("world_size"), b["calibration"]["environment"].pop("world_size")) == (1, 2)
    for s in (a, b):
        s["calibration"].pop("observe_seconds")
        s["calibration"]["search"].pop("seconds")
    assert a == b
    validated = a["calibration"]["search"]["validated"]
    assert any(v.get("stopped") for v in validated) and any(v["rows"] == 26 for v in validated)
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]  # no temporary left by either


def test_torchrun_eval_scores_what_one_process_scores(tiny3d_dir, tmp_path):
    args = ["eval", "--model", tiny3d_dir, "--limit", "20", "--json"]
    r1, r2 = _wait(_start([*args, "--predictions", str(tmp_path / "one.json")]),
                   _start([*args, "--predictions", str(tmp_path / "two.json")], ranks=2))
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    a, b = (json.loads(r.stdout[r.stdout.index("{"):]) for r in (r1, r2))  # rank 0 alone prints: one object
    assert (a["environment"].pop("world_size"), b["environment"].pop("world_size")) == (1, 2)
    assert a == b and a["n"] == 20
    preds = (tmp_path / "one.json").read_bytes()
    assert preds == (tmp_path / "two.json").read_bytes() and len(json.loads(preds)) == 20


def test_torchrun_compare_writes_what_one_process_writes(tiny3d_dir, tmp_path):
    """The statistics, the solver's count and rule search on the held-back rows and the answers,
    each sharded: the same tables, schedules, answers and kept-token histograms as one process."""
    args = ["compare", "--model", tiny3d_dir, "--limit", "10", "--budgets", "0.65", "--samples", "10", "--holdout", "26",
            "--seeds", "0", "--rules", "last_token,strided,dedup", "--peers", "fastv"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = _wait(_start([*args, "--out", str(one)]), _start([*args, "--out", str(two)], ranks=2))
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("wrote ") == 1 and _said(r2.stdout, two) == _said(r1.stdout, one)  # rank 0 speaks
    for name in ("compare.md", "predictions.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    a, b = _load(one / "compare.json"), _load(two / "compare.json")
    assert (a["environment"].pop("world_size"), b["environment"].pop("world_size")) == (1, 2)
    assert a.pop("wall_s") >= 0 and b.pop("wall_s") >= 0
    for doc in (a, b):
        for c in doc["configs"]:
            c["schedule"].get("calibration", {}).get("search", {}).pop("seconds", None)
    assert a == b and a["n"] == 10  # scenes of 7 and 3 questions: uneven shares
    assert sum(a["configs"][0]["kept_x_hist"]) > 0  # every rank's scenes counted once
    assert any(c["name"].startswith("calibrated") for c in a["configs"])


def test_a_bad_input_on_one_rank_ends_every_rank_with_its_line(tiny3d_dir, tmp_path):
    out = tmp_path / "cal"
    r = _run([*CALIBRATE, "--model", tiny3d_dir, "--out", str(out)], ranks=2, program=(FAILING_RANK,),
             env={"FAIL_RANK": "1"})  # not the rank that writes and prints
    assert r.returncode != 0  # torchrun's own status (1) once a worker has failed
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: scenes/scene3000000/depth/0.png: unreadable depth image ; re-export the scene"], r.stderr
    assert r.stderr.count("Traceback (most recent call last)") <= 1 and "ChildFailedError" in r.stderr  # torchrun's
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}  # each rank exits 2 (or torchrun stopped it just after)
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("fail_rank", ["0", "1"])
def test_the_launcher_ends_a_failed_launch_with_the_line_and_exit_2(tiny3d_dir, tmp_path, fail_rank):
    """python -m adatoken_compile.launch takes torchrun's arguments: the user sees the tool's one
    line and the launch exits 2, without torchrun's failure summary."""
    out = tmp_path / "cal"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, FAIL_RANK=fail_rank)
    r = subprocess.run([sys.executable, "-m", "adatoken_compile.launch", "--standalone", "--nproc-per-node", "2",
                        FAILING_RANK, *CALIBRATE, "--model", tiny3d_dir, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr
    assert lines == ["error: scenes/scene3000000/depth/0.png: unreadable depth image ; re-export the scene"] or (
        fail_rank == "0" and len(lines) == 1 and lines[0].startswith("error: ")), r.stderr
    assert not out.exists() and os.listdir(tmp_path) == []
