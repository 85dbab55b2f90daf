"""Layer-major calibration (decoder layers read one at a time) against the sample-major engine, and
where a calibration runs (device, dtype, memory budget)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from adatoken_compile import api
from adatoken_compile.calibration import layered
from adatoken_compile.calibration.solver import ROW_KEY, ValidationCache
from adatoken_compile.cli import main
from adatoken_compile.contract import Segment, collate
from adatoken_compile.errors import InputError
from adatoken_compile.schedule import Cut, Schedule


def test_layered_statistics_and_schedule_match_sample_major_on_the_bundled_model():
    # three first-cut layers within the budget: the layered engine validates them as one round
    kw = dict(samples=2, holdout=2, flops_budget=0.5, max_validations=3, progress=False)
    sample = api.calibrate("llava3d-tiny", engine="sample", **kw)
    layer = api.calibrate("llava3d-tiny", engine="layered", **kw)
    a, b = sample.stats.arrays, layer.stats.arrays
    assert set(a) == set(b)
    for k in a:  # int64 fixed point: byte for byte
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    s, t = sample.schedule, layer.schedule
    assert [(c.layer, c.keep, c.rule) for c in s.cuts] == [(c.layer, c.keep, c.rule) for c in t.cuts]
    for key in ("fidelity", "stability", "precision"):
        assert s.calibration[key] == t.calibration[key], key
    assert s.calibration["search"]["validated"] == t.calibration["search"]["validated"]
    assert len({str(v["cuts"][0][0]) for v in t.calibration["search"]["validated"]}) == 3
    eng = t.calibration["engine"]
    layers = s.num_layers
    assert eng["order"] == "layer-major" and s.calibration["engine"]["order"] == "sample-major"
    assert eng["statistics_sample_layers"] == 2 * layers and eng["references_sample_layers"] == 2 * layers
    prec = t.calibration["precision"]
    assert prec["device"] == "cpu" and prec["dtype"] == "float32" and prec["min_top1_margin"] > 0


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=37)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # sharper attention: a deep cut changes answers
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def _batch(seed, B=2):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        pre, n, post = 2 + b, 20 + 5 * b + seed % 3, 3 + b
        sp = torch.zeros(pre + n + post, dtype=torch.bool)
        sp[pre:pre + n] = True
        e = torch.randn(pre + n + post, 64, generator=g)
        e[pre + n:] *= 0.01  # a faint text tail: its next token rests on the spatial tokens it attends to
        rows.append(Segment(e, sp))
    return collate(rows)


def test_layered_validation_counts_and_early_stop_match_sample_major():
    dec = _llama()
    hold = [_batch(s) for s in range(4)]
    sched = Schedule([Cut(1, 0.5), Cut(2, 0.25)], 4, policy="adaptive")
    streamed = layered.StreamedLayers(dec, None, "cpu", chunk_bytes=1)  # every batch its own chunk
    lay = layered.validation_cache(streamed)
    ref = ValidationCache()
    for a, b in zip(ref.refs_for(dec, hold), lay.refs_for(dec, hold)):
        assert torch.equal(a, b)
    full_s, full_l = ref.measure(dec, hold, sched), lay.measure(dec, hold, sched)
    assert full_s == full_l and full_s["rows"] == 8
    assert not all(full_s[ROW_KEY])  # the cut changes some answers: the stop below is exercised
    ran = streamed.timings["validation_sample_layers"]
    first_miss = full_s[ROW_KEY].index(False)
    stop_s, stop_l = ValidationCache().measure(dec, hold, sched, 0), layered.validation_cache(streamed).measure(
        dec, hold, sched, 0)
    assert stop_s == stop_l and stop_s["rows"] == 2 * (first_miss // 2 + 1)
    if stop_s.get("stopped"):  # the chunks after the failing one never ran
        assert streamed.timings["validation_sample_layers"] - ran == stop_s["rows"] * 4


def test_streamed_layers_read_the_checkpoint_and_put_the_placeholders_back(tiny3d_dir):
    full = api.load_model(tiny3d_dir)
    lazy = api.load_model(tiny3d_dir, lazy=True)
    streamed = layered.StreamedLayers(lazy.decoder, lazy.lazy_weights, "cpu")
    w = lazy.decoder.model.layers[1].mlp.down_proj.weight
    placeholder = w.data_ptr()
    with streamed.on(lazy.decoder.model.layers[1]):
        assert torch.equal(w, full.decoder.model.layers[1].mlp.down_proj.weight)
    assert w.data_ptr() == placeholder
    with streamed.on(*streamed.head):
        assert torch.equal(lazy.decoder.lm_head.weight, full.decoder.lm_head.weight)


def test_bfloat16_calibration_records_its_precision(tiny3d_dir):
    cal = api.calibrate(tiny3d_dir, samples=4, holdout=2, policy="pdrop", dtype="bfloat16", progress=False)
    prec = cal.schedule.calibration["precision"]
    assert prec["dtype"] == "bfloat16" and prec["device"] == "cpu"
    assert all(np.isfinite(v).all() for v in cal.stats.arrays.values())
    assert cal.stats.arrays["last_attn_spatial"].any()  # float32 statistics of a bfloat16 model, not zeros


def test_memory_sizes_and_engine_choice(tiny3d_dir, monkeypatch):
    assert layered.parse_memory("12GB") == 12 * 10**9 and layered.parse_memory("8GiB") == 8 << 30
    assert layered.parse_memory("500 mb") == 500 * 10**6
    for bad in ("lots", "-3GB", "0", "12XB"):
        with pytest.raises(InputError, match="--max-memory"):
            layered.parse_memory(bad)
    fp = layered.footprint(tiny3d_dir, 4, os.path.join(tiny3d_dir, "vision_tower"))
    assert fp.layers == 4 and fp.layer > 0 and fp.whole > fp.resident + 4 * fp.layer
    assert layered.plan(tiny3d_dir, engine="auto").engine == "sample"
    # a 7B in float32: 28 GB of weights, 0.8 GB a layer, 0.5 GB the head, 2 GB the encoder and embeddings
    big = layered.Footprint(whole=28 * 10**9, layer=8 * 10**8, head=5 * 10**8, resident=2 * 10**9, layers=32)
    monkeypatch.setattr(layered, "footprint", lambda *a, **k: big)
    assert layered.plan(tiny3d_dir, engine="auto", max_memory="40GB").engine == "sample"
    squeezed = layered.plan(tiny3d_dir, engine="auto", max_memory="12GB")
    assert squeezed.engine == "layered"
    assert squeezed.chunk_bytes() == 12 * 10**9 - big.resident - 2 * big.layer - layered.RUNTIME_BYTES
    monkeypatch.setattr(layered, "physical_memory", lambda: 24 * 10**9)  # no budget given: this machine's memory
    assert layered.plan(tiny3d_dir, engine="auto").chunk_bytes() == \
        24 * 10**9 - big.resident - 2 * big.layer - layered.RUNTIME_BYTES
    with pytest.raises(InputError, match="too small.*raise --max-memory"):
        layered.plan(tiny3d_dir, engine="layered", max_memory="3GB")


@pytest.mark.parametrize("args, says", [
    (["--device", "cuda"], "--device cuda"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--engine", "layered", "--max-memory", "100MB"], "too small"),
    (["--max-memory", "plenty"], "--max-memory"),
    (["--engine", "layered", "--spill", "/nonexistent/spill"], "--spill /nonexistent/spill: not a directory"),
])
def test_calibrate_placement_errors_are_one_line_before_loading(tiny3d_dir, tmp_path, monkeypatch, args, says):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the option was checked")

    monkeypatch.setattr(api, "load_model", no_load)
    out = tmp_path / "cal"
    r = CliRunner().invoke(main, ["calibrate", "--model", tiny3d_dir, "--out", str(out), *args])
    assert r.exit_code == 2 and says in r.output and r.output.strip().count("\n") == 0, r.output
    assert not out.exists() and os.listdir(tmp_path) == []


def test_a_gpu_without_bfloat16_refuses_it_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    dev = layered.check_device("cuda:1")
    assert dev == torch.device("cuda", 1)
    with pytest.raises(InputError, match="--dtype bfloat16: Tesla T4 has no bfloat16 matmul; use --dtype float16"):
        layered.check_dtype(torch.bfloat16, dev)
    with pytest.raises(InputError, match="cuda:0 to cuda:1"):
        layered.check_device("cuda:2")


def test_candidates_share_the_unpruned_layers_before_their_first_cut():
    dec = _llama()
    hold = [_batch(s) for s in range(3)]
    streamed = layered.StreamedLayers(dec, None, "cpu", chunk_bytes=1)
    lay, ref = layered.validation_cache(streamed), ValidationCache()
    ran = []
    for cuts in ([Cut(2, 0.5)], [Cut(2, 0.2), Cut(3, 0.1)], [Cut(3, 0.3)], [Cut(1, 0.4)], [Cut(2, 0.3)]):
        s = Schedule(cuts, 4, policy="adaptive")
        before = streamed.timings.get("validation_sample_layers", 0)
        assert lay.measure(dec, hold, s) == ref.measure(dec, hold, s), cuts
        ran.append((streamed.timings["validation_sample_layers"] - before) // 6)  # layers per row
    # from layer 0; from the states before layer 2 (twice); from layer 0, keeping those before layer 1
    assert ran == [4, 2, 2, 4, 3]


@pytest.mark.parametrize("budget", [0.6, 0.9])
def test_curtailed_rule_choice_is_the_full_choice_in_both_engines(monkeypatch, budget):
    """The rule stage stops a rule once it cannot agree significantly more than the cheapest one (or
    a cut before layer 0 than the schedule): the same schedule and trial choices as running every
    rule on every row, fewer rows run, and the layer-major engine stops at the same rows."""
    from adatoken_compile.calibration import api as engine_api, solver

    dec = _llama()
    data, hold = [_batch(s) for s in range(100, 104)], [_batch(s) for s in range(24)]

    def run(**kw):
        s, _ = engine_api.calibrate(dec, data, holdout_batches=hold, policy="adaptive", flops_budget=budget,
                                    progress=False, max_validations=2, **kw)
        return s, [t for t in s.calibration["rules"]["trials"] if "skipped" not in t]

    cut, cut_trials = run()
    lay, lay_trials = run(layers=layered.StreamedLayers(dec, None, "cpu", chunk_bytes=1))
    real = solver.out_of_reach
    # no curtailment; a schedule that no cut before layer 0 can beat at all is still not challenged
    monkeypatch.setattr(solver, "out_of_reach", lambda rows, against, alpha=solver.PAIRED_ALPHA:
                        len(rows) == 0 and real(rows, against, alpha))
    full, full_trials = run()
    assert cut.cuts == full.cuts == lay.cuts
    assert cut.calibration["fidelity"] == full.calibration["fidelity"] == lay.calibration["fidelity"]
    assert cut.calibration["random_control"] == full.calibration["random_control"]
    assert [(t["cut"], t["rule"], t["chosen"]) for t in cut_trials] == \
        [(t["cut"], t["rule"], t["chosen"]) for t in full_trials]
    for c, f in zip(cut_trials, full_trials):
        if "curtailed" in c:
            assert c["stopped"] and c["rows"] < f["rows"] and c["agreed"] <= f["agreed"]
        else:
            assert (c["agreed"], c["rows"]) == (f["agreed"], f["rows"])
    assert any("curtailed" in t for t in cut_trials)
    assert sum(t["rows"] for t in cut_trials) < sum(t["rows"] for t in full_trials)
    assert lay_trials == cut_trials and lay.calibration["random_control"] == cut.calibration["random_control"]


def _round():
    from adatoken_compile.selection import Rule

    rnd, strided = Rule.of("random"), Rule.of("strided")
    return [Schedule(cuts, 4, policy="adaptive") for cuts in (
        [Cut(1, 0.5)], [Cut(1, 0.5), Cut(3, 0.2)], [Cut(1, 0.5, rnd)], [Cut(1, 0.5), Cut(3, 0.2, rnd)],
        [Cut(2, 0.3)], [Cut(0, 0.5, strided)], [])]


@pytest.mark.parametrize("max_disagree", [None, 0])
def test_a_round_runs_as_one_prefix_tree_with_the_counts_of_one_by_one(max_disagree):
    """Candidates sharing their cuts up to a layer share its states and branch at their first
    differing cut: the same measurements as one candidate at a time, each layer's weights read once
    per chunk for the whole round (early stops included)."""
    dec = _llama()
    hold = [_batch(s) for s in range(4)]
    scheds = _round()
    sample = [ValidationCache().measure(dec, hold, s, max_disagree) for s in scheds]
    one = layered.StreamedLayers(dec, None, "cpu", chunk_bytes=1)  # every batch its own chunk
    one_cache = layered.validation_cache(one)
    assert [one_cache.measure(dec, hold, s, max_disagree) for s in scheds] == sample
    tree = layered.StreamedLayers(dec, None, "cpu", chunk_bytes=1)
    tree_cache = layered.validation_cache(tree)
    tree_cache.refs_for(dec, hold)
    assert tree_cache.measure_all(dec, hold, scheds, max_disagree) == sample
    assert not all(m["agreement"] == 1.0 for m in sample)  # the cuts change answers: branches differ
    reads = tree.timings["validation_layer_reads"]
    if max_disagree is None:
        assert reads == 4 * len(hold)  # 4 layers, once per chunk
        assert one.timings["validation_layer_reads"] > 4 * reads
    else:
        assert any(m.get("stopped") for m in sample)
        assert reads <= 4 * len(hold) < one.timings["validation_layer_reads"]
    # a round that ends at its first perfect candidate gives the measurements the sequential one does
    until = lambda m: m["agreement"] >= 1.0  # noqa: E731
    fresh = layered.validation_cache(layered.StreamedLayers(dec, None, "cpu"))
    got = fresh.measure_all(dec, hold, scheds[::-1], max_disagree, until=until)
    assert got == ValidationCache().measure_all(dec, hold, scheds[::-1], max_disagree, until=until)
    assert got == sample[::-1][:len(got)] and until(got[-1]) and len(got) < len(scheds)



def test_spilled_states_give_the_in_memory_numbers_in_one_pass_over_the_weights(tmp_path):
    """Past the chunk budget the states go to memory-mapped files instead of another pass over the
    weights: the same int64 statistics and measurements, each layer read once per phase, and the
    files' directory gone afterwards."""
    from adatoken_compile.calibration import api as engine_api

    dec = _llama()
    data, hold = [_batch(s) for s in range(100, 104)], [_batch(s) for s in range(6)]
    budget = 2 * layered.StreamedLayers(dec).state_bytes(hold[0])  # about two batches a chunk

    def run(spill):
        streamed = layered.StreamedLayers(dec, None, "cpu", chunk_bytes=budget, spill=spill)
        s, st = engine_api.calibrate(dec, data, holdout_batches=hold, policy="adaptive", flops_budget=0.6,
                                     progress=False, max_validations=2, rules=("last_token", "random"), layers=streamed)
        return s, st, streamed.timings

    mem, mem_stats, in_ram = run(None)
    with layered.Spill(str(tmp_path)) as spill:
        sp, sp_stats, spilled = run(spill)
        assert spill.bytes > 0 and spill.files > 0
        assert [os.listdir(os.path.join(tmp_path, d)) for d in os.listdir(tmp_path)] == [[]]  # unlinked when mapped
    assert os.listdir(tmp_path) == []
    for k in mem_stats.arrays:
        assert mem_stats.arrays[k].tobytes() == sp_stats.arrays[k].tobytes(), k
    assert [(c.layer, c.keep, c.rule) for c in mem.cuts] == [(c.layer, c.keep, c.rule) for c in sp.cuts]
    for key in ("fidelity", "stability", "random_control", "rules"):
        assert mem.calibration[key] == sp.calibration[key], key
    assert mem.calibration["search"]["validated"] == sp.calibration["search"]["validated"]
    assert spilled["statistics_layer_reads"] == spilled["references_layer_reads"] == 4  # one pass each
    assert in_ram["statistics_layer_reads"] > 4 and in_ram["references_layer_reads"] > 4
    assert spilled["validation_layer_reads"] < in_ram["validation_layer_reads"]
    assert sp.calibration["engine"]["spilled_bytes"] == spill.bytes
    full = layered.Spill(str(tmp_path))
    full.room = lambda need: False  # a full disk: the chunked passes, said so
    chunked, _, passes = run(full)
    assert {k: v for k, v in passes.items() if not k.endswith("_s")} == {
        k: v for k, v in in_ram.items() if not k.endswith("_s")}  # the same reads and question-layers
    assert chunked.calibration["fidelity"] == mem.calibration["fidelity"]
    assert "no room" in chunked.calibration["engine"]["spill_no_room"] and full.files == 0


def test_the_spill_directory_goes_after_a_failed_calibration(tiny3d_dir, tmp_path, monkeypatch):
    from adatoken_compile.calibration import api as engine_api

    monkeypatch.setattr(layered.Plan, "chunk_bytes", lambda self: 1)  # no state fits: every one spills
    where = tmp_path / "spill"
    where.mkdir()
    cal = api.calibrate(tiny3d_dir, engine="layered", spill=str(where), samples=8, holdout=8, policy="pdrop",
                        progress=False)
    eng = cal.schedule.calibration["engine"]
    assert eng["spilled_bytes"] > 0 and eng["statistics_layer_reads"] == 4 and os.listdir(where) == []

    def fail(*a, **k):
        assert [n for n in os.listdir(where) if n.startswith(".adatoken-spill-")]  # the statistics spilled
        raise RuntimeError("stopped")

    monkeypatch.setattr(engine_api, "derive_schedule", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        api.calibrate(tiny3d_dir, engine="layered", spill=str(where), samples=8, holdout=8, policy="pdrop",
                      progress=False)
    assert os.listdir(where) == []


def test_a_disk_that_fills_while_spilling_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def full(fd, offset, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(layered.os, "posix_fallocate", full)
    with pytest.raises(InputError, match="no room left for the spilled states.*--spill off"):
        with layered.Spill(str(tmp_path)) as spill:
            spill.tensor(torch.ones(3))
    assert os.listdir(tmp_path) == []
