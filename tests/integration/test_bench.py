"""Measurement machinery: interleaved timing, ORT node profiles, graph FLOPs vs the formula,
prefill bench, the synthetic benchmark at tiny width, plots and tables."""

from __future__ import annotations

import os

import numpy as np
import pytest

from adatoken_compile.benchmarking import prefill, profile, report, synthetic, timing
from adatoken_compile.arch import from_config as arch_of
from adatoken_compile.flops import prefill_flops
from adatoken_compile.schedule import Cut, Schedule, identity

from conftest import make_batch

N_LAYERS = 3
SCHEDULE = Schedule(cuts=[Cut(1, 0.5), Cut(2, 0.25)], num_layers=N_LAYERS)
ROW = (5, 60, 7)  # one unpadded sequence: prefix, spatial, suffix


# ----------------------------------------------------------------------------- timing math


def test_interleaved_alternates_and_stats():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")}
    res = timing.interleaved(fns, repeats=3, warmup=2)
    assert calls == ["a", "b", "c"] * 5
    for name in fns:
        r = res[name]
        assert len(r["runs"]) == 3
        assert r["min_s"] <= r["p25_s"] <= r["median_s"] <= r["p75_s"]
        assert r["median_s"] == float(np.median(r["runs"]))
    with pytest.raises(ValueError):
        timing.interleaved({}, repeats=1)


def test_ratio_math():
    assert timing.ratio({"median_s": 2.0}, {"median_s": 4.0}) == 0.5
    assert timing.ratio(3.0, 1.5) == 2.0
    assert timing.speedup({"median_s": 4.0}, 2.0) == 2.0
    # latency fell 20 %, FLOPs 40 %: half the ideal saving realised
    assert timing.realized_fraction(0.8, 0.6) == pytest.approx(0.5)
    assert timing.realized_fraction(1.0, 0.6) == 0.0
    assert timing.realized_fraction(0.6, 0.6) == pytest.approx(1.0)
    assert np.isnan(timing.realized_fraction(0.9, 1.0))
    assert profile.crosscheck(100.0, {"total": 103.0}) == pytest.approx(0.03)


def test_origin_name_rule():
    assert profile.origin_name("adatoken_cut0_score/matmul/MatMulScaleFusion/_kernel_time") == "adatoken_cut0_score/matmul"
    assert profile.origin_name("node_silu/QuickGeluFusion/") == "node_silu"
    assert profile.origin_name("node_slice_2/GatherSliceToSplitFusion") == "node_slice_2"
    assert profile.origin_name("adatoken_cut1_select/topk__1_kernel_time") == "adatoken_cut1_select/topk__1"


# ----------------------------------------------------------------------------- ONNX fixtures


SYNTH = dict(layers=N_LAYERS, spatial=ROW[1], prefix=ROW[0], suffix=ROW[2],
             schedule_keep=[(c.layer, c.keep) for c in SCHEDULE.cuts], hidden=64, heads=4, kv_heads=4,
             intermediate=128, vocab=101, repeats=2, warmup=1, threads=1, profile_runs=1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The synthetic benchmark at tiny width; its two cached exports serve the profile tests."""
    cache = str(tmp_path_factory.mktemp("bench_cache"))
    return cache, synthetic.synthetic_7b_width(**SYNTH, cache_dir=cache)


@pytest.fixture(scope="module")
def tiny_onnx(synth):
    _, res = synth
    from transformers import LlamaConfig

    cfg = {k: res["config"][k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size")}
    return {**res["onnx"],
            "feeds": make_batch([ROW], seed=2).to_numpy(), "arch": arch_of(LlamaConfig(**cfg))}


@pytest.fixture(scope="module")
def profiles(tiny_onnx):
    return {k: profile.profile_nodes(tiny_onnx[k], tiny_onnx["feeds"], runs=2, threads=1) for k in ("baseline", "pruned")}


def test_profile_inserted_nodes(profiles):
    base, pr = profiles["baseline"], profiles["pruned"]
    assert base.total_s > 0 and base.inserted_s == 0 and base.overhead_fraction == 0
    assert base.original_inserted_nodes == 0
    assert pr.inserted_s > 0 and 0 < pr.overhead_fraction < 1
    assert pr.overhead_fraction == pytest.approx(pr.inserted_s / pr.total_s)
    assert {"cut0_score", "cut0_select", "cut1_score", "cut1_select", "cut0_gather_hidden"} <= set(pr.by_role)
    # the prefix survives ORT_ENABLE_ALL: most inserted nodes run under their own names
    assert pr.executed_inserted_nodes >= 0.8 * pr.original_inserted_nodes
    for n in pr.nodes:
        assert n.inserted == ("adatoken_cut" in n.name)
        # every executed node is an original node (possibly fused) or an ORT-created one
        assert n.origin is not None or not n.name.startswith(("node_", "adatoken_"))
    assert sum(v["time_s"] for v in pr.by_op_type.values()) == pytest.approx(pr.total_s)
    assert all(n.input_shapes or n.output_shapes for n in pr.nodes)


def test_graph_flops_match_formula(tiny_onnx, profiles):
    arch = tiny_onnx["arch"]
    n_pre, n_sp, n_post = ROW
    n_text = n_pre + n_post
    form = {
        "baseline": prefill_flops(arch, n_text, [n_sp] * N_LAYERS),
        "pruned": prefill_flops(arch, n_text, SCHEDULE.tokens_per_layer(n_sp)),
    }
    graph = {k: profile.flops_from_profile(p) for k, p in profiles.items()}
    for k in ("baseline", "pruned"):
        assert not graph[k]["unparsed"], graph[k]["unparsed"]
        assert "Add" in graph[k]["uncounted"]  # elementwise work is listed, not counted as FLOPs
    # attention is one fused node per layer (counted as QK^T + AV); the only Softmax left is the
    # pruned graph's scoring rows
    assert "Softmax" not in graph["baseline"]["uncounted"]
    assert "Softmax" in graph["pruned"]["uncounted"]
    # identity: linear + attention + lm_head of the last position only, exactly the formula
    assert abs(profile.crosscheck(form["baseline"], graph["baseline"])) < 1e-9
    # lm_head: one node with output (1, V) and 2*H*V FLOPs (not computed for all positions)
    lm = [n for n in profiles["baseline"].nodes if n.output_shapes and n.output_shapes[0][1][-1:] == [arch["vocab"]]]
    assert len(lm) == 1 and graph["baseline"]["by_node"][lm[0].name] == 2 * arch["hidden"] * arch["vocab"]
    # pruned: the formula also counts the drop's softmax / head mean / top-k comparisons, which
    # are not matmuls; the inserted matmuls are exactly the scoring rows 2 * n_in * Hq per cut
    rel = profile.crosscheck(form["pruned"], graph["pruned"])
    assert abs(rel) < 0.01, rel
    hq = arch["heads"] * arch["head_dim"]
    tpl = SCHEDULE.tokens_per_layer(n_sp)
    want_ins = sum(2 * (n_text + tpl[c.layer - 1]) * hq for c in SCHEDULE.cuts)
    assert graph["pruned"]["inserted"] == want_ins
    residual = form["pruned"]["total"] - graph["pruned"]["total"]
    assert residual == pytest.approx(form["pruned"]["drop"] - want_ins)


def test_prefill_bench(tiny_onnx):
    n_pre, n_sp, n_post = ROW
    arch = tiny_onnx["arch"]
    formula = {
        "pruned": prefill_flops(arch, n_pre + n_post, SCHEDULE.tokens_per_layer(n_sp))["total"],
        "baseline": prefill_flops(arch, n_pre + n_post, [n_sp] * N_LAYERS)["total"],
    }
    r = prefill.prefill_bench(tiny_onnx["pruned"], tiny_onnx["baseline"], tiny_onnx["feeds"], repeats=3, warmup=1,
                            threads=1, profile_runs=1, formula=formula)
    assert set(r["latency_s"]) == {"pruned", "baseline"}
    assert r["latency_ratio"] == pytest.approx(r["latency_s"]["pruned"]["median_s"] / r["latency_s"]["baseline"]["median_s"])
    assert 0 < r["flops_ratio"] < 1
    assert r["flops_ratio"] == pytest.approx(formula["pruned"] / formula["baseline"], rel=0.01)
    assert r["realized_fraction"] == pytest.approx((1 - r["latency_ratio"]) / (1 - r["flops_ratio"]))
    assert 0 < r["overhead_fraction"] < 1
    assert "formula" in r["flops"] and abs(r["flops"]["graph_vs_formula_rel_err"]["baseline"]) < 1e-9
    for k in ("pruned", "baseline"):
        assert r["peak_memory_bytes"][k]["peak_rss"] > 0


# ----------------------------------------------------------------------------- synthetic (tiny width)


def test_synthetic_bench_tiny_width(synth):
    cache, r = synth
    assert r["config"]["tokens_per_layer"] == SCHEDULE.tokens_per_layer(ROW[1])
    assert 0 < r["flops_ratio"] < 1 and r["wall_s"] > 0 and 0 < r["overhead_fraction"] < 1
    assert abs(r["flops"]["graph_vs_formula_rel_err"]["baseline"]) < 1e-9
    assert abs(r["flops"]["graph_vs_formula_rel_err"]["pruned"]) < 0.01
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(cache) for f in fs if f.endswith(".onnx"))
    assert len(files) == 2
    mtimes = [os.path.getmtime(f) for f in files]
    r2 = synthetic.synthetic_7b_width(**{**SYNTH, "repeats": 1, "warmup": 0}, cache_dir=cache)  # cached exports
    assert [os.path.getmtime(f) for f in files] == mtimes
    assert r2["flops_ratio"] == r["flops_ratio"]


def test_synthetic_bench_measures_each_rule_against_one_baseline(tmp_path):
    """Several rules in one call: one identity export serves them all, each rule gets its own pruned
    graph (coordinates fed to the rules that read them), and its inserted nodes are what the
    profile attributes to the cuts."""
    cache = str(tmp_path)
    rules = ["stratified", "dedup"]
    cuts = [(0, 0.5), (2, 0.5)]
    r = synthetic.synthetic_7b_width(**{**SYNTH, "schedule_keep": cuts, "repeats": 1, "warmup": 0}, rules=rules,
                                     cache_dir=cache)
    assert list(r["rules"]) == rules and r["config"]["rule"] == "stratified"
    files = sorted(f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".onnx"))
    assert len(files) == 1 + len(rules) and "baseline.onnx" in files
    import onnx

    for name, res in r["rules"].items():
        assert res["config"]["rule"] == name and res["config"]["schedule"] == cuts
        assert 0 < res["overhead_fraction"] < 1 and 0 < res["flops_ratio"] < 1
    inputs = [{i.name for i in onnx.load(os.path.join(r["config"]["cache_dir"], f), load_external_data=False).graph.input}
              for f in files]
    assert sum("spatial_xyz" in names for names in inputs) == 1  # stratified alone reads coordinates
    # the similarity rule's pairwise scoring costs more than the cell counting (hash-ranked before layer 0)
    assert r["rules"]["dedup"]["flops"]["pruned"] > r["rules"]["stratified"]["flops"]["pruned"]


@pytest.mark.parametrize("argv, says", [
    (["--cuts", "1-0.3"], "--cuts '1-0.3': give LAYER:KEEP pairs"),
    (["--layers", "3", "--cuts", "1:0.5,3:0.2"], "cut layer 3 out of range"),
    (["--cuts", "0:0.5", "--rules", "text_tail"], "rule 'text_tail' needs attention"),
    (["--rules", "nearest"], "unknown selection rule 'nearest'"),
])
def test_synthetic_bench_bad_cuts_or_rules_are_one_line_before_any_work(argv, says):
    from click.testing import CliRunner

    from adatoken_compile.cli import main

    r = CliRunner().invoke(main, ["bench", "--synthetic-7b", *argv])
    assert r.exit_code == 2 and r.output.startswith("error: ") and says in r.output and r.output.count("\n") == 1


def test_synthetic_bench_all_rules_are_those_that_run_at_every_cut():
    from adatoken_compile.cli.evaluate import _synthetic_plan
    from adatoken_compile.selection import RULES

    assert _synthetic_plan("1:0.8,2:0.3", "all", 4) == ([(1, 0.8), (2, 0.3)], list(RULES))
    plan, names = _synthetic_plan("0:0.5,2:0.3", "all", 4)
    assert plan == [(0, 0.5), (2, 0.3)]
    assert set(names) == {"stratified", "dedup", "diverse", "strided", "random"}


# ----------------------------------------------------------------------------- plots / tables


def _is_png(path):
    with open(path, "rb") as f:
        return os.path.getsize(path) > 1000 and f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots(tmp_path):
    from adatoken_compile.calibration.policies import peer_schedule

    pts = [
        {"policy": "adaptive", "flops_ratio": 0.3, "accuracy": 0.5},
        {"policy": "adaptive", "flops_ratio": 0.5, "accuracy": 0.6},
        {"policy": "adaptive", "flops_ratio": 0.7, "accuracy": 0.62},
        {"policy": "fastv", "flops_ratio": 0.6, "accuracy": 0.55},
        {"policy": "none", "flops_ratio": 1.0, "accuracy": 0.63},
    ]
    p = report.plot_pareto(pts, str(tmp_path / "sub" / "pareto.png"))
    assert _is_png(p)
    scheds = {name: peer_schedule(name, 8) for name in ("none", "fastv", "pdrop", "adatoken-decay")}
    scheds["adaptive"] = Schedule(cuts=[Cut(2, 0.6), Cut(5, 0.2)], num_layers=8)
    assert _is_png(report.plot_keep_curves(scheds, str(tmp_path / "keep.png")))
    assert _is_png(report.plot_keep_curves({"id": identity(8)}, str(tmp_path / "keep_n.png"), n_spatial=1400))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".plot-")]


def test_markdown_table():
    rows = [{"policy": "a|b", "flops_ratio": 0.123456, "acc": None}, {"policy": "c", "flops_ratio": 1, "acc": 0.5}]
    t = report.markdown_table(rows, ["policy", ("flops_ratio", "FLOPs ratio"), "acc"])
    lines = t.strip().split("\n")
    assert len(lines) == 2 + len(rows)
    assert lines[0] == "| policy | FLOPs ratio | acc |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 0.1235 |  |"
    assert all(line.count("|") - line.count("\\|") == 4 for line in lines)
    assert report.markdown_table([("x", 2)], ["k", "v"]).strip().split("\n")[-1] == "| x | 2 |"
