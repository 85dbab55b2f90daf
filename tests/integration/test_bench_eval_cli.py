"""eval --artifact and bench through the CLI on tiny random artifacts: JSON keys, reference parity."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from adatoken_compile.compiler.pipeline import compile_artifact
from adatoken_compile.flops import decode_flops
from adatoken_compile.cli import main
from adatoken_compile.benchmark3d.dataset import iter_samples
from adatoken_compile.errors import InputError
from adatoken_compile.evaluation.accuracy import evaluate, normalize, paired
from adatoken_compile.evaluation.answers import reference_answer_fn as pruned_answer_fn
from adatoken_compile.models.registry import load_adapter
from adatoken_compile.schedule import Schedule, identity


@pytest.fixture(scope="module")
def arts(tiny3d_dir, tiny_artifact, tmp_path_factory):
    """The tiny pruned artifact (prefill + decode) and an identity artifact that borrows its
    schedule-free graphs (encoders, decode)."""
    a = load_adapter(tiny3d_dir)
    L, fp = a.arch()["num_layers"], a.fingerprint()
    art = tiny_artifact[0]
    sched = Schedule.load(os.path.join(art, "schedule.json"))
    d = tmp_path_factory.mktemp("arts")
    compile_artifact(a, identity(L, fingerprint=fp, family=a.family), str(d / "id"), progress=False, reuse=art)
    return a, sched, str(d / "id"), art


def _json(out: str) -> dict:
    return json.loads(out[out.index("{"):])


def test_eval_artifact_equals_pytorch_reference(arts, tiny3d_dir):
    a, sched, art0, art = arts
    r = CliRunner().invoke(main, ["eval", "--artifact", art, "--model", tiny3d_dir, "--limit", "12", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = _json(r.output)
    assert {"accuracy", "baseline_accuracy", "n", "per_kind"} <= set(res) and res["n"] == 12
    ref = evaluate(pruned_answer_fn(a, sched), list(iter_samples("test", limit=12)))
    assert res["accuracy"] == ref["accuracy"]
    assert res["per_kind"] == ref["per_kind"]
    # the unpruned column is the PyTorch model itself
    ref0 = evaluate(pruned_answer_fn(a, identity(sched.num_layers)), list(iter_samples("test", limit=12)))
    assert res["baseline_accuracy"] == ref0["accuracy"]
    # the paired comparison counts exactly the answers that differ between the two runs
    pc = res["paired"]
    assert pc["n"] == 12 and pc["changed"] == sum(normalize(x["prediction"]) != normalize(y["prediction"])
                                                  for x, y in zip(ref["predictions"], ref0["predictions"]))
    assert abs(pc["delta_points"] - 100 * (res["accuracy"] - res["baseline_accuracy"])) < 1e-9


def _pred(q, truth, p):
    return {"question": q, "answer": truth, "prediction": p}


def test_paired_comparison_counts_and_interval():
    base = [_pred(f"q{i}", "yes", "yes" if i < 6 else "no") for i in range(10)]  # 6 right
    new = [dict(b) for b in base]
    new[0]["prediction"] = "no"    # right -> wrong
    new[1]["prediction"] = "No."   # right -> wrong (normalised)
    new[7]["prediction"] = "yes"   # wrong -> right
    new[8]["prediction"] = "maybe"  # wrong -> wrong, still a change
    new[2]["prediction"] = "Yes!"  # same answer after normalisation: not a change
    pc = paired(new, base)
    assert (pc["changed"], pc["gained"], pc["lost"]) == (4, 1, 2)
    assert abs(pc["delta_points"] + 10.0) < 1e-9
    lo, hi = pc["delta_ci95_points"]
    # var of d_i = 3/10 - 0.01 = 0.29 -> half width 1.96 * sqrt(0.029) = 0.3338
    assert abs(lo + 10 + 33.38) < 0.01 and abs(hi + 10 - 33.38) < 0.01
    same = paired(base, base)
    assert same["changed"] == 0 and same["delta_ci95_points"] == [0.0, 0.0]
    with pytest.raises(InputError, match="same questions"):
        paired(new[:9], base)
    with pytest.raises(InputError, match="same questions"):
        paired([_pred("other", "yes", "yes")] + new[1:], base)


def test_bench_json_keys(arts):
    _, sched, art0, art = arts
    r = CliRunner().invoke(main, ["bench", "--artifact", art, "--baseline", art0, "--repeats", "2", "--new-tokens", "4",
                                  "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = _json(r.output)
    p, e = res["prefill"], res["end_to_end"]
    for k in ("latency_s", "latency_ratio", "flops_ratio", "realized_fraction", "overhead_fraction",
              "peak_memory_bytes", "flops"):
        assert k in p, k
    for k in ("latency_ratio", "flops_ratio", "realized_fraction", "kv_cache_bytes"):
        assert k in e, k
    for k in ("latency_s", "ttft_s", "per_token_decode_s"):
        assert e["pruned"][k]["median_s"] > 0 and e["baseline"][k]["median_s"] > 0
    assert 0 < p["flops_ratio"] < 1 and 0 < e["flops_ratio"] < 1
    # FLOPs formula vs the count over the executed ORT graph (MatMul/Gemm only): close
    assert abs(p["flops"]["graph_vs_formula_rel_err"]["baseline"]) < 0.05
    assert 0 < p["overhead_fraction"] < 1
    assert e["kv_cache_bytes"]["pruned"] < e["kv_cache_bytes"]["baseline"]
    # the pruned KV cache matches the schedule's arithmetic
    n_sp, n_tx = p["tokens"]["spatial"], p["tokens"]["text"]
    arch = load_adapter_arch(art)
    per_tok = 2 * arch["kv_heads"] * arch["head_dim"] * 4
    want = sum(t + n_tx for t in sched.tokens_per_layer(n_sp)) * per_tok
    assert e["kv_cache_bytes"]["pruned"] == want


def load_adapter_arch(art):
    from adatoken_compile.runtime import load

    return load(art).arch


def test_decode_flops_hand_count():
    arch = {"hidden": 8, "intermediate": 16, "vocab": 10, "heads": 4, "kv_heads": 2, "head_dim": 2}
    # one step, one layer with 3 cached positions: linear 2*(8*(8+8) + 8*8 + 3*8*16) = 1152,
    # attention 4*8*(3+1) = 128, lm_head 2*8*10 = 160
    assert decode_flops(arch, [3], 1) == 1152 + 128 + 160


def test_bench_requires_identity_baseline(arts):
    _, _, art0, art = arts
    r = CliRunner().invoke(main, ["bench", "--artifact", art0, "--baseline", art, "--repeats", "1"])
    assert r.exit_code == 2 and "identity-schedule" in r.output
