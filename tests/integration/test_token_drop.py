"""Capture -> token-drop FX pass -> ONNX, against the eager reference and the HF model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from adatoken_compile.compiler.capture import capture, output_names
from adatoken_compile.compiler.capture import export_prefill as export_onnx
from adatoken_compile.compiler.parity import max_abs_diff_valid, ort_session, run_prefill as run_ort
from adatoken_compile.passes.graph_diff import diff_graphs
from adatoken_compile.passes.token_drop import apply_token_drop, layer_of
from adatoken_compile.compiler.reference import pruned_prefill
from adatoken_compile.schedule import Cut, Schedule, identity

from conftest import make_batch, tiny_decoder

N_LAYERS = 4
# batch 2, different spatial counts, row 1 left-padded by 6
ROWS = [(3, 10, 4), (2, 6, 3)]
SCHEDULE = Schedule(cuts=[Cut(1, 0.5), Cut(3, 0.25)], num_layers=N_LAYERS)

_CACHE: dict = {}


def setup(family: str, attn: str):
    """(model, example, captured gm, pruned gm) per configuration, built once per test session."""
    key = (family, attn)
    if key not in _CACHE:
        model = tiny_decoder(family, attn, layers=N_LAYERS)
        ex = make_batch(ROWS)
        gm = capture(model, ex)
        _CACHE[key] = (model, ex, gm, apply_token_drop(gm, SCHEDULE))
    return _CACHE[key]


def args_of(ex):
    return (ex.inputs_embeds, ex.attention_mask, ex.position_ids, ex.spatial_mask)


def graph_outputs(gm, ex) -> dict:
    with torch.no_grad():
        out = gm(*args_of(ex))
    return dict(zip(gm.meta["adatoken_layout"]["outputs"], out))


def hf_logits(model, ex):
    with torch.no_grad():
        return model(inputs_embeds=ex.inputs_embeds, attention_mask=ex.attention_mask, position_ids=ex.position_ids).logits[:, -1]


CONFIGS = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager")]


# ----------------------------------------------------------------------------- identity


def test_identity_schedule_leaves_graph_unchanged():
    model, ex, gm, _ = setup("llama", "sdpa")
    for sched in (identity(N_LAYERS), Schedule(cuts=[Cut(2, 1.0)], num_layers=N_LAYERS)):
        same = apply_token_drop(gm, sched)
        assert same is not gm
        assert same.code == gm.code
        assert [(n.name, n.op, n.target) for n in same.graph.nodes] == [(n.name, n.op, n.target) for n in gm.graph.nodes]
        assert not any("adatoken" in n.meta for n in same.graph.nodes)
        out = graph_outputs(same, ex)
        assert (out["logits"] - hf_logits(model, ex)).abs().max() <= 1e-5
    assert not any("adatoken" in n.meta for n in gm.graph.nodes)  # input never mutated


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_identity_reference_matches_hf(family, attn):
    model, ex, gm, _ = setup(family, attn)
    ref = pruned_prefill(model, ex, identity(N_LAYERS))
    assert (ref.logits_last - hf_logits(model, ex)).abs().max() <= 1e-5
    out = graph_outputs(gm, ex)
    assert (out["logits"] - ref.logits_last).abs().max() <= 1e-5
    assert gm.meta["adatoken_layout"]["outputs"] == output_names(N_LAYERS)


# ----------------------------------------------------------------------------- FX pass vs eager reference


@pytest.mark.parametrize("family,attn", CONFIGS)
def test_fx_pruned_equals_reference(family, attn):
    model, ex, _, pg = setup(family, attn)
    out = graph_outputs(pg, ex)
    ref = pruned_prefill(model, ex, SCHEDULE)
    assert (out["logits"] - ref.logits_last).abs().max() <= 1e-5
    for i in range(N_LAYERS):
        assert torch.equal(out[f"mask.{i}"], ref.masks[i])
        assert out[f"key.{i}"].shape == ref.keys[i].shape
        m = ref.masks[i][:, None, :, None]
        assert ((out[f"key.{i}"] - ref.keys[i]).abs() * m).max() <= 1e-5
        assert ((out[f"value.{i}"] - ref.values[i]).abs() * m).max() <= 1e-5
    assert len(ref.kept_indices) == 2
    for c in range(2):
        assert torch.equal(out[f"kept.{c}"], ref.kept_indices[c])
    # pruning changes the answer a little but not wildly; it must not be the unpruned result
    assert [k.shape[2] for k in ref.keys] == [17, 12, 12, 10]


def test_kept_indices_properties():
    model, ex, _, pg = setup("llama", "sdpa")
    out = graph_outputs(pg, ex)
    L = ex.seq_len
    valid0, spatial0 = ex.attention_mask.bool(), ex.spatial_mask
    counts0 = ex.spatial_counts()
    for c, cut in enumerate(SCHEDULE.cuts):
        kept = out[f"kept.{c}"]
        for b in range(ex.batch_size):
            row = kept[b]
            real = row[row >= 0]
            n_pad = int((row < 0).sum())
            assert torch.all(row[:n_pad] == -1), "padding slots must come first"
            assert torch.all(real[1:] > real[:-1]), "kept indices ascending"
            nonspatial = torch.nonzero(valid0[b] & ~spatial0[b]).flatten()
            assert set(nonspatial.tolist()) <= set(real.tolist()), "non-spatial real tokens are always kept"
            assert int(spatial0[b, real].sum()) == SCHEDULE.tokens_per_layer(counts0[b])[cut.layer]
            assert int(real[-1]) == L - 1
        assert kept.shape[1] == int((kept >= 0).sum(1).max())


def test_padded_rows_match_single_rows():
    model, ex, _, pg = setup("llama", "sdpa")
    out = graph_outputs(pg, ex)
    for b in range(ex.batch_size):
        single = ex.row(b)
        off = ex.seq_len - single.seq_len
        ref_b = pruned_prefill(model, single, SCHEDULE)
        assert (ref_b.logits_last[0] - out["logits"][b]).abs().max() <= 1e-4
        for c in range(2):
            batch_kept = out[f"kept.{c}"][b]
            batch_kept = batch_kept[batch_kept >= 0] - off
            assert torch.equal(batch_kept, ref_b.kept_indices[c][0][ref_b.kept_indices[c][0] >= 0])


# ----------------------------------------------------------------------------- graph diff


def test_graph_diff_two_cuts():
    _, _, gm, pg = setup("llama", "sdpa")
    diffs = diff_graphs(gm, pg)
    assert [d.cut for d in diffs] == [0, 1]
    base = {"score", "select", "idx", "valid", "len", "kept_positions", "rebuild_mask", "gather_seq", "gather_hidden"}
    assert diffs[0].roles() == base | {"valid0", "n0", "gather_spatial"}
    assert diffs[1].roles() == base  # the last cut needs no spatial mask afterwards
    for d in diffs:
        assert all(n.name.startswith(f"adatoken_cut{d.cut}_") for n in d.inserted)
    nodes = {n.name: n for n in pg.graph.nodes}
    role_of = {n.name: n.meta["role"] for d in diffs for n in d.inserted}
    spans = [(1, 3), (3, 4)]
    for d, (lo, hi) in zip(diffs, spans):
        got = Counter()
        for r in d.rewired:
            if r.consumer.startswith("output["):
                got[(role_of[r.new], r.consumer)] += 1
                continue
            node = nodes[r.consumer]
            layer = layer_of(node)
            assert layer is not None and lo <= layer < hi, (r, layer)
            tgt = str(node.target).split(".")[-2] if "aten" in str(node.target) else str(node.target)
            if role_of[r.new] == "gather_hidden":
                got[("gather_hidden", layer)] += 0  # consumers checked by layer only
                assert layer == lo
                continue
            got[(role_of[r.new], layer, tgt, r.arg.split("[")[0] + "[" + r.arg.split("[")[1])] += 1
        want = Counter()
        for layer in range(lo, hi):
            want[("rebuild_mask", layer, "scaled_dot_product_attention", "args[3]")] += 1
            want[("gather_seq", layer, "unsqueeze", "args[0]")] += 2  # cos, sin
            want[("len", layer, "view", "args[1]")] += 3  # q, k, v head split
            want[("len", layer, "reshape", "args[1]")] += 2  # sdpa output reshape + merge heads
            want[("valid", f"output[mask.{layer}]")] += 1
        want[("kept_positions", f"output[kept.{d.cut}]")] += 1
        got = Counter({k: v for k, v in got.items() if v})
        assert got == want
        assert any(role_of[r.new] == "gather_hidden" for r in d.rewired)


# ----------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_llama(tmp_path_factory):
    model, ex, _, pg = setup("llama", "sdpa")
    path = tmp_path_factory.mktemp("onnx") / "prefill_pruned.onnx"
    info = export_onnx(pg, ex, str(path))
    return info, ort_session(info.path, level="all")


def test_onnx_export_file(onnx_llama):
    import onnx

    info, _ = onnx_llama
    assert info.opset >= 18
    assert info.external_data is not None
    m = onnx.load(info.path, load_external_data=False)
    onnx.checker.check_model(info.path)
    topk = [n for n in m.graph.node if n.op_type == "TopK"]
    assert len(topk) == 4  # 2 per cut: ranking + ordering
    for n in topk:
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs.get("sorted") == 1
    names = [n.name for n in m.graph.node]
    for c in range(2):
        for role in ("score", "select", "gather_hidden", "rebuild_mask"):
            assert any(nm.startswith(f"adatoken_cut{c}_{role}/") for nm in names), (c, role)
    assert {"adatoken_cut0_select", "adatoken_cut1_select"} <= set(info.adatoken_nodes)


def test_onnx_matches_pruned_graph(onnx_llama):
    info, sess = onnx_llama
    _, ex, _, pg = setup("llama", "sdpa")
    # the export example and a new batch with other sizes (dynamic batch / seq / K')
    for batch in (ex, make_batch([(4, 7, 2), (1, 12, 5), (3, 3, 3)], seed=3)):
        got = run_ort(sess, batch)
        want = {k: v.numpy() for k, v in graph_outputs(pg, batch).items()}
        for name in want:
            assert got[name].shape == want[name].shape, name
        for c in range(2):
            np.testing.assert_array_equal(got[f"kept.{c}"], want[f"kept.{c}"])
        for i in range(N_LAYERS):
            np.testing.assert_array_equal(got[f"mask.{i}"], want[f"mask.{i}"])
        d = max_abs_diff_valid(got, want, N_LAYERS)
        assert d["logits"] <= 1e-4 and d["kv_valid"] <= 1e-4, d


def test_fused_attention_matches_decomposed(tmp_path):
    """Each layer's sdpa over repeated keys exports as one GroupQueryAttention (GQA 4/2 heads);
    the pruned graph keeps the same tokens, masks and, within 1e-4, logits and kept keys/values as
    the exporter's decomposed attention, on the left-padded export batch and on other sizes."""
    import onnx

    _, ex, _, pg = setup("qwen2", "sdpa")
    res = {a: export_onnx(pg, ex, str(tmp_path / f"{a}.onnx"), attention=a) for a in ("fused", "decomposed")}
    ops = {a: Counter(n.op_type for n in onnx.load(r.path, load_external_data=False).graph.node)
           for a, r in res.items()}
    assert res["fused"].fused_attention == N_LAYERS and ops["fused"]["GroupQueryAttention"] == N_LAYERS
    assert res["decomposed"].fused_attention == 0 and ops["decomposed"]["GroupQueryAttention"] == 0
    # one attention Softmax per layer is gone; the cuts' scoring keeps its own
    assert ops["decomposed"]["Softmax"] - ops["fused"]["Softmax"] == N_LAYERS and ops["fused"]["IsNaN"] == 0
    sessions = {a: ort_session(r.path) for a, r in res.items()}
    for batch in (ex, make_batch([(4, 7, 2), (1, 12, 5), (3, 3, 3)], seed=3)):
        got = {a: run_ort(s, batch) for a, s in sessions.items()}
        assert set(got["fused"]) == set(got["decomposed"])
        for c in range(2):
            np.testing.assert_array_equal(got["fused"][f"kept.{c}"], got["decomposed"][f"kept.{c}"])
        for i in range(N_LAYERS):
            np.testing.assert_array_equal(got["fused"][f"mask.{i}"], got["decomposed"][f"mask.{i}"])
            assert got["fused"][f"key.{i}"].shape == got["decomposed"][f"key.{i}"].shape
        d = max_abs_diff_valid(got["fused"], got["decomposed"], N_LAYERS)
        assert d["logits"] <= 1e-4 and d["kv_valid"] <= 1e-4, d


def test_fused_attention_fx_rewrite_keeps_outputs():
    """The rewrite is exact in torch (the op's eager form is sdpa), leaves the input graph alone,
    and applies only to sdpa over a boolean mask in float32 / float16 (eager attention, bfloat16
    are exported as before)."""
    from adatoken_compile.compiler.attention import fused_copy

    _, ex, _, pg = setup("qwen2", "sdpa")
    fused, n = fused_copy(pg)
    assert n == N_LAYERS
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    assert sum(nd.target == sdpa for nd in pg.graph.nodes) == N_LAYERS  # the input is unchanged
    assert not any(nd.target == sdpa for nd in fused.graph.nodes)
    want, got = graph_outputs(pg, ex), graph_outputs(fused, ex)
    for c in range(2):
        assert torch.equal(got[f"kept.{c}"], want[f"kept.{c}"])
    assert (got["logits"] - want["logits"]).abs().max().item() <= 1e-5
    assert fused_copy(setup("qwen2", "eager")[3])[1] == 0
    bex = make_batch([(2, 5, 2), (1, 4, 1)])
    bex.inputs_embeds = bex.inputs_embeds.to(torch.bfloat16)
    bf16 = capture(tiny_decoder("qwen2", "sdpa", layers=2).to(torch.bfloat16), bex)
    assert fused_copy(bf16)[1] == 0


def test_onnx_qwen2_gqa_eager():
    model, ex, _, pg = setup("qwen2", "eager")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        info = export_onnx(pg, ex, f"{tmp}/qwen.onnx")
        got = run_ort(ort_session(info.path), ex)
    ref = pruned_prefill(model, ex, SCHEDULE)
    assert np.abs(got["logits"] - ref.logits_last.numpy()).max() <= 1e-4
    for c in range(2):
        np.testing.assert_array_equal(got[f"kept.{c}"], ref.kept_indices[c].numpy())


def test_compile_after_pass():
    from adatoken_compile.passes.token_drop import compile_pruned, token_drop_backend

    _, ex, gm, pg = setup("llama", "sdpa")
    calls = []

    def recording_backend(g, example_inputs):
        calls.append(g)
        return g.forward

    compiled = compile_pruned(gm, SCHEDULE, backend=recording_backend)
    with torch.no_grad():
        got = compiled(*args_of(ex))
    assert len(calls) == 1  # one graph, no graph break at the data-dependent K'
    want = graph_outputs(pg, ex)
    assert (got[0] - want["logits"]).abs().max() <= 1e-6
    # the backend-style step applies the pass to a captured graph
    fn = token_drop_backend(SCHEDULE)(gm, list(args_of(ex)))
    with torch.no_grad():
        assert (fn(*args_of(ex))[0] - want["logits"]).abs().max() <= 1e-6


# ----------------------------------------------------------------------------- random peer policy

def test_random_policy_pass_reference_and_onnx_agree(tmp_path):
    from adatoken_compile.calibration.policies import peer_schedule
    from adatoken_compile.passes.token_drop import random_scores

    rnd = peer_schedule("random", N_LAYERS, like=SCHEDULE, seed=7)
    rnd.validate()
    model, ex, gm, _ = setup("llama", "sdpa")
    pg = apply_token_drop(gm, rnd)
    ref = pruned_prefill(model, ex, rnd)
    got = graph_outputs(pg, ex)
    assert (got["logits"] - ref.logits_last).abs().max().item() <= 1e-5
    for c in range(2):
        assert torch.equal(got[f"kept.{c}"], ref.kept_indices[c])
    # not the attention choice, and a different seed draws differently
    att = pruned_prefill(model, ex, SCHEDULE)
    assert any(not torch.equal(att.kept_indices[c], ref.kept_indices[c]) for c in range(2))
    other = pruned_prefill(model, ex, peer_schedule("random", N_LAYERS, like=SCHEDULE, seed=8))
    assert any(not torch.equal(other.kept_indices[c], ref.kept_indices[c]) for c in range(2))
    # independent of left padding: a row alone picks the same tokens (in its own coordinates)
    valid = ex.attention_mask != 0
    s = random_scores(valid, 3)
    n = int(valid[1].sum())
    assert torch.equal(s[1, -n:], random_scores(valid[1:, -n:], 3)[0]) and bool((s[~valid] == 0).all())
    info = export_onnx(pg, ex, str(tmp_path / "rnd.onnx"))
    ort = run_ort(ort_session(info.path), ex)
    for c in range(2):
        np.testing.assert_array_equal(ort[f"kept.{c}"], ref.kept_indices[c].numpy())


def test_onnx_keep_count_is_exact_for_non_binary_ratios(tmp_path):
    """keep=0.3 is not exact in float32: ceil(0.3f * 10) = 4, the schedule says 3."""
    sched = Schedule(cuts=[Cut(2, 0.3)], num_layers=N_LAYERS)
    model, _, gm, _ = setup("llama", "sdpa")
    ex = make_batch([(3, 10, 4), (2, 20, 3)], seed=5)
    info = export_onnx(apply_token_drop(gm, sched), ex, str(tmp_path / "k.onnx"))
    got = run_ort(ort_session(info.path), ex)
    for b, n0 in enumerate((10, 20)):
        want = sched.tokens_per_layer(n0)[2] + (ex.lengths()[b] - n0)
        assert int(got["mask.2"][b].sum()) == want == int(pruned_prefill(model, ex, sched).masks[2][b].sum())
