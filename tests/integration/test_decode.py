"""Decoding over pruned per-layer KV caches: DecodeModule, its ONNX graph, reference generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adatoken_compile.compiler.capture import capture, describe_decoder
from adatoken_compile.compiler.decode import (BufferedDecodeModule, DecodeModule, buffered_input_names,
                                              buffered_output_names, decode_input_names, decode_output_names,
                                              export_decode)
from adatoken_compile.compiler.reference import generate as generate_pruned
from adatoken_compile.flops import kv_cache_bytes
from adatoken_compile.errors import InputError
from adatoken_compile.compiler.capture import export_prefill as export_onnx
from adatoken_compile.compiler.parity import ort_session, run_prefill as run_ort
from adatoken_compile.passes.token_drop import apply_token_drop
from adatoken_compile.compiler.reference import pruned_prefill
from adatoken_compile.runtime.sampling import next_tokens, sample_next
from adatoken_compile.schedule import Cut, Schedule, identity

from conftest import make_batch, tiny_decoder

N_LAYERS = 4
ROWS = [(3, 10, 4), (2, 6, 3)]  # batch 2, different spatial counts, row 1 left-padded
ROWS_B = [(4, 7, 2), (1, 12, 5)]  # another scene / question length
SCHEDULE = Schedule(cuts=[Cut(1, 0.5), Cut(3, 0.25)], num_layers=N_LAYERS)

_MODELS: dict = {}


def model_of(family: str, attn: str):
    if (family, attn) not in _MODELS:
        _MODELS[(family, attn)] = tiny_decoder(family, attn, layers=N_LAYERS)
    return _MODELS[(family, attn)]


def flat_past(pre) -> list[torch.Tensor]:
    out = []
    for k, v, m in zip(pre.keys, pre.values, pre.masks):
        out += [k, v, m]
    return out


def embed_ids(model, ids) -> torch.Tensor:
    return model.get_input_embeddings()(torch.as_tensor(ids, dtype=torch.int64).reshape(-1, 1))


def first_step(model, ex, schedule):
    """Pruned prefill, then the inputs of the first decode step (greedy token, ORIGINAL positions)."""
    pre = pruned_prefill(model, ex, schedule)
    tok = pre.logits_last.argmax(-1)
    x = embed_ids(model, tok).detach()
    pos = torch.tensor(ex.lengths(), dtype=torch.int64)[:, None]
    return pre, x, pos


def strip(row, eos):
    return row[: row.index(eos)] if eos in row else row


# ----------------------------------------------------------------------------- identity == HF generate


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_identity_generation_matches_hf_generate(family, attn):
    model = model_of(family, attn)
    ex = make_batch(ROWS)
    free = generate_pruned(model, ex, identity(N_LAYERS), max_new_tokens=10, eos_token_id=None)
    # an EOS that row 0 emits mid-way and row 1 later or never: row 0 stops while row 1 goes on
    later = lambda t: free[1].index(t) if t in free[1] else 99  # noqa: E731
    eos = next(t for t in free[0][2:] if later(t) > free[0].index(t))
    ours = generate_pruned(model, ex, identity(N_LAYERS), max_new_tokens=10, eos_token_id=eos)
    with torch.no_grad():
        hf = model.generate(inputs_embeds=ex.inputs_embeds, attention_mask=ex.attention_mask, do_sample=False,
                            max_new_tokens=10, eos_token_id=eos, pad_token_id=eos)
    want = [strip(r, eos) for r in hf.tolist()]
    assert ours == want
    assert len(ours[0]) == free[0].index(eos) < 10 and len(ours[0]) < len(ours[1])


# ----------------------------------------------------------------------------- pruned step correctness


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_pruned_step_matches_per_layer_bruteforce(family, attn):
    """One DecodeModule step after the pruned prefill == the installed model run per row over an HF
    DynamicCache that holds, per layer, exactly that layer's KEPT keys/values (padding stripped),
    with the new token at its ORIGINAL position (layers of different lengths, no mask needed)."""
    from transformers import DynamicCache

    model = model_of(family, attn)
    ex = make_batch(ROWS)
    pre, x, pos = first_step(model, ex, SCHEDULE)
    lens = pre.cache_lengths()
    assert lens == [17, 12, 12, 10]
    with torch.no_grad():
        out = DecodeModule(model)(x, pos, *flat_past(pre))
    logits = out[0]
    for i in range(N_LAYERS):
        k, v, m = out[1 + 3 * i : 4 + 3 * i]
        assert k.shape[2] == v.shape[2] == m.shape[1] == lens[i] + 1
        assert torch.equal(m[:, :-1], pre.masks[i]) and bool(m[:, -1].all())
        assert torch.equal(k[:, :, :-1], pre.keys[i])

    model.config._attn_implementation = "sdpa"  # mask-free reference path (eager would need one mask per layer)
    try:
        for b in range(ex.batch_size):
            data = [(pre.keys[i][b : b + 1][:, :, pre.masks[i][b]], pre.values[i][b : b + 1][:, :, pre.masks[i][b]])
                    for i in range(N_LAYERS)]
            kept = [int(d[0].shape[2]) for d in data]
            n_sp, n = ex.spatial_counts()[b], ex.lengths()[b]
            assert kept == [s + n - n_sp for s in SCHEDULE.tokens_per_layer(n_sp)]
            with torch.no_grad():
                ref = model(inputs_embeds=x[b : b + 1], position_ids=pos[b : b + 1],
                            cache=DynamicCache(ddp_cache_data=data), use_cache=True).logits[0, -1]
            assert (ref - logits[b]).abs().max() <= 1e-5
    finally:
        model.config._attn_implementation = attn


def test_decode_position_is_original_length():
    model = model_of("llama", "sdpa")
    ex = make_batch(ROWS)
    pre, x, pos = first_step(model, ex, SCHEDULE)
    step = DecodeModule(model)
    with torch.no_grad():
        right = step(x, pos, *flat_past(pre))[0]
        pruned_len = pre.masks[-1].sum(1, keepdim=True)  # what a renumbering scheme would continue from
        assert bool((pruned_len < pos).all())
        wrong = step(x, pruned_len, *flat_past(pre))[0]
    assert (right - wrong).abs().max() > 1e-3
    # and the reference generation uses the original length
    ids = generate_pruned(model, ex, SCHEDULE, max_new_tokens=2, eos_token_id=None)
    assert [r[1] for r in ids] == right.argmax(-1).tolist()


# ----------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_graphs(tmp_path_factory):
    model = model_of("llama", "sdpa")
    ex = make_batch(ROWS)
    d = tmp_path_factory.mktemp("decode_onnx")
    dec = export_decode(model, str(d / "decode.onnx"), buffered=False)
    pre = export_onnx(apply_token_drop(capture(model, ex), SCHEDULE), ex, str(d / "prefill.onnx"))
    return dec, ort_session(dec.path, level="all"), ort_session(pre.path, level="all")


def test_decode_onnx_file(onnx_graphs):
    import onnx

    dec, sess, _ = onnx_graphs
    assert dec.opset >= 18 and dec.external_data is not None
    onnx.checker.check_model(dec.path)
    assert [i.name for i in sess.get_inputs()] == decode_input_names(N_LAYERS)
    assert [o.name for o in sess.get_outputs()] == decode_output_names(N_LAYERS)
    m = onnx.load(dec.path, load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(m.graph.input) + list(m.graph.output)}
    for i in range(N_LAYERS):
        assert dims[f"past_key.{i}"][0] == "batch" and dims[f"past_key.{i}"][2] == f"past_{i}"
        assert dims[f"past_mask.{i}"] == ["batch", f"past_{i}"]
    assert len({dims[f"past_key.{i}"][2] for i in range(N_LAYERS)}) == N_LAYERS


def test_decode_onnx_matches_module_two_configs(onnx_graphs):
    _, sess, _ = onnx_graphs
    model = model_of("llama", "sdpa")
    step = DecodeModule(model)
    configs = []
    pre, x, pos = first_step(model, make_batch(ROWS), SCHEDULE)  # past lengths [17, 12, 12, 10]
    configs.append((x, pos, flat_past(pre)))
    pre, x, pos = first_step(model, make_batch(ROWS_B, seed=3), Schedule(cuts=[Cut(2, 0.3)], num_layers=N_LAYERS))
    past = flat_past(pre)
    with torch.no_grad():
        for _ in range(3):  # a few steps in: other past lengths, one graph
            res = step(x, pos, *past)
            past, pos = list(res[1:]), pos + 1
            x = embed_ids(model, res[0].argmax(-1)).detach()
    configs.append((x, pos, past))
    assert [p.shape[2] for p in configs[0][2][0::3]] != [p.shape[2] for p in configs[1][2][0::3]]
    for x, pos, past in configs:
        with torch.no_grad():
            want = [t.numpy() for t in step(x, pos, *past)]
        feeds = dict(zip(decode_input_names(N_LAYERS), [x.numpy(), pos.numpy()] + [t.numpy() for t in past]))
        got = sess.run(None, feeds)
        assert np.abs(got[0] - want[0]).max() <= 1e-4
        for i in range(N_LAYERS):
            gk, gv, gm = got[1 + 3 * i : 4 + 3 * i]
            wk, wv, wm = want[1 + 3 * i : 4 + 3 * i]
            np.testing.assert_array_equal(gm, wm)
            assert gk.shape == wk.shape
            valid = wm[:, None, :, None]
            assert (np.abs(gk - wk) * valid).max() <= 1e-4 and (np.abs(gv - wv) * valid).max() <= 1e-4


def test_ort_greedy_loop_matches_generate_pruned(onnx_graphs):
    _, dec_sess, pre_sess = onnx_graphs
    model = model_of("llama", "sdpa")
    emb = model.get_input_embeddings().weight.detach().numpy()
    for ex in (make_batch(ROWS), make_batch(ROWS_B, seed=3)):
        want = generate_pruned(model, ex, SCHEDULE, max_new_tokens=8, eos_token_id=None)
        out = run_ort(pre_sess, ex)
        past = []
        for i in range(N_LAYERS):
            past += [out[f"key.{i}"], out[f"value.{i}"], out[f"mask.{i}"]]
        pos = np.asarray(ex.lengths(), np.int64)[:, None]
        logits, got = out["logits"], [[] for _ in range(ex.batch_size)]
        for t in range(8):
            tok = next_tokens(logits, 0.0, 1.0, None)
            for b, tb in enumerate(tok):
                got[b].append(int(tb))
            if t == 7:
                break
            res = dec_sess.run(None, dict(zip(decode_input_names(N_LAYERS), [emb[tok][:, None], pos] + past)))
            logits, past, pos = res[0], res[1:], pos + 1
        assert got == want


# ----------------------------------------------------------------------------- in-place buffers, fused attention


def compact(pre, steps: int):
    """The pruned prefill's caches compacted per row to the front of per-layer buffers of
    ``max kept + steps`` slots (what the runtime does once after the prefill)."""
    past = []
    for k, v, m in zip(pre.keys, pre.values, pre.masks):
        n = m.sum(1)
        cap = int(n.max()) + steps
        bk = torch.zeros(k.shape[0], k.shape[1], cap, k.shape[3])
        bv = torch.zeros_like(bk)
        for b in range(k.shape[0]):
            bk[b, :, : n[b]] = k[b][:, m[b]]
            bv[b, :, : n[b]] = v[b][:, m[b]]
        past += [bk, bv, n.to(torch.int32)]
    return past


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_buffered_step_matches_concat_step(family, attn):
    """Several steps over compacted in-place buffers == the concatenating step over padded, masked
    caches: same logits, and each step writes the new key/value at slot past_length (rotary at the
    ORIGINAL position: keys compare equal to the concat step's appended ones)."""
    model = model_of(family, attn)
    ex = make_batch(ROWS)
    pre, x, pos = first_step(model, ex, SCHEDULE)
    buf = compact(pre, steps=3)
    cat = flat_past(pre)
    fused, plain = BufferedDecodeModule(model), DecodeModule(model)
    with torch.no_grad():
        for _ in range(3):
            a, b = fused(x, pos, *buf), plain(x, pos, *cat)
            assert (a[0] - b[0]).abs().max() <= 1e-5
            for i in range(N_LAYERS):
                n = buf[3 * i + 2]
                for r in range(ex.batch_size):
                    for j in (0, 1):  # key, value: the new position at slot n[r], the kept ones untouched
                        got = a[1 + 2 * i + j][r, :, : n[r] + 1]
                        want = b[1 + 3 * i + j][r][:, b[3 + 3 * i][r]]
                        assert (got - want).abs().max() <= 1e-5
                buf[3 * i : 3 * i + 3] = [a[1 + 2 * i], a[2 + 2 * i], n + 1]
            cat = list(b[1:])
            x, pos = embed_ids(model, a[0].argmax(-1)).detach(), pos + 1


@pytest.fixture(scope="module")
def buffered_graph(tmp_path_factory):
    model = model_of("qwen2", "eager")  # GQA 4 / 2
    d = tmp_path_factory.mktemp("decode_buffered")
    res = export_decode(model, str(d / "decode.onnx"))  # the default form
    return res, ort_session(res.path, level="all")


def test_buffered_onnx_in_place_matches_module(buffered_graph):
    """The exported step: GroupQueryAttention (no Concat of a cache), dims capacity_{i}; run with
    each layer's buffer bound as both past and present it updates the buffer in place and gives the
    module's logits, over several steps of a batch with different per-layer, per-row lengths."""
    import onnx
    import onnxruntime as ort

    res, sess = buffered_graph
    assert res.input_names == buffered_input_names(N_LAYERS) and res.output_names == buffered_output_names(N_LAYERS)
    m = onnx.load(res.path, load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("GroupQueryAttention") == N_LAYERS and "Softmax" not in ops
    # onnxruntime's fused norm, and rotary at the graph's position ids inside the attention op, which
    # takes q / k / v packed (their biases added once) in place of the primitive ops
    assert "RotaryEmbedding" not in ops and "Neg" not in ops and ops.count("Split") == N_LAYERS  # gate / up only
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * N_LAYERS and "Pow" not in ops
    assert res.fused_ops["rotary_3d"] == res.fused_ops["rotary_in_attention"] * 2 == 2 * N_LAYERS
    assert res.fused_ops["packed_biases"] == N_LAYERS
    assert res.fused_ops["gemm_as_matmul"] == 1 and "Gemm" not in ops  # the lm_head
    # each buffer is read by its layer's attention alone: nothing concatenates or copies it
    readers = {i: [n.op_type for n in m.graph.node if i in n.input] for i in buffered_input_names(N_LAYERS)}
    assert all(readers[f"past_{k}.{i}"] == ["GroupQueryAttention"] for i in range(N_LAYERS) for k in ("key", "value"))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.input}
    assert [dims[f"past_key.{i}"][2] for i in range(N_LAYERS)] == [f"capacity_{i}" for i in range(N_LAYERS)]

    model = model_of("qwen2", "eager")
    pre, x, pos = first_step(model, make_batch(ROWS), SCHEDULE)
    steps = 4
    buf = compact(pre, steps)
    assert len({int(t.shape[2]) for t in buf[0::3]}) > 1  # per-layer capacities differ
    io = sess.io_binding()
    vals = []
    for i in range(N_LAYERS):
        for j, kind in enumerate(("key", "value")):
            v = ort.OrtValue.ortvalue_from_numpy(buf[3 * i + j].numpy().copy())
            io.bind_ortvalue_input(f"past_{kind}.{i}", v)
            io.bind_ortvalue_output(f"present_{kind}.{i}", v)
            vals.append(v)
    io.bind_output("logits")
    step = BufferedDecodeModule(model)
    lengths = [buf[3 * i + 2].numpy().copy() for i in range(N_LAYERS)]
    for _ in range(steps):
        with torch.no_grad():
            want = step(x, pos, *buf)
        io.bind_cpu_input("inputs_embeds", x.numpy())
        io.bind_cpu_input("position_ids", pos.numpy())
        for i in range(N_LAYERS):
            io.bind_cpu_input(f"past_length.{i}", lengths[i])
        sess.run_with_iobinding(io)
        logits = io.copy_outputs_to_cpu()[-1]
        assert logits.shape == tuple(want[0].shape) and np.abs(logits - want[0].numpy()).max() <= 1e-4
        for i in range(N_LAYERS):
            for j in (0, 1):
                got, ref = vals[2 * i + j].numpy(), want[1 + 2 * i + j].numpy()
                for r in range(len(lengths[i])):
                    n = lengths[i][r] + 1
                    assert np.abs(got[r, :, :n] - ref[r, :, :n]).max() <= 1e-5
            buf[3 * i : 3 * i + 3] = [want[1 + 2 * i], want[2 + 2 * i], buf[3 * i + 2] + 1]
            lengths[i] = lengths[i] + 1
        x, pos = embed_ids(model, want[0].argmax(-1)).detach(), pos + 1


def test_bfloat16_decoder_keeps_the_concat_graph(tmp_path):
    model = tiny_decoder("llama", "sdpa", layers=2).to(torch.bfloat16)
    res = export_decode(model, str(tmp_path / "decode.onnx"))
    assert res.input_names == decode_input_names(2)


# ----------------------------------------------------------------------------- KV cache bytes


def test_kv_cache_bytes_matches_pruned_arrays():
    model = model_of("qwen2", "eager")  # GQA: 2 kv heads
    arch = describe_decoder(model)
    ex = make_batch(ROWS)
    pre, x, pos = first_step(model, ex, SCHEDULE)
    with torch.no_grad():
        step = DecodeModule(model)(x, pos, *flat_past(pre))
    per_tok = 2 * arch["kv_heads"] * arch["head_dim"] * 4
    for b, (n_sp, n) in enumerate(zip(ex.spatial_counts(), ex.lengths())):
        arrays = []
        for i in range(N_LAYERS):
            m = pre.masks[i][b]
            arrays += [pre.keys[i][b][:, m], pre.values[i][b][:, m]]
        got = sum(int(np.asarray(a).nbytes) for a in arrays)
        assert got == kv_cache_bytes(arch, SCHEDULE, n_sp, n - n_sp)
        full = kv_cache_bytes(arch, identity(N_LAYERS), n_sp, n - n_sp)
        assert full == N_LAYERS * n * per_tok
        dropped = sum(n_sp - s for s in SCHEDULE.tokens_per_layer(n_sp))
        assert full - got == dropped * per_tok and dropped > 0
        # after one decode step: one more position per layer
        arrays = []
        for i in range(N_LAYERS):
            k, v, m = step[1 + 3 * i : 4 + 3 * i]
            arrays += [k[b][:, m[b]].numpy(), v[b][:, m[b]].numpy()]
        assert sum(int(np.asarray(a).nbytes) for a in arrays) == kv_cache_bytes(arch, SCHEDULE, n_sp, n - n_sp, new_tokens=1)
    # row 0 (10 spatial): per layer 10, 5, 5, 3 kept -> 17 tokens x 4 layers... 17 dropped in all
    assert sum(10 - s for s in SCHEDULE.tokens_per_layer(10)) == 17


# ----------------------------------------------------------------------------- sampling


def test_sample_next_procedure():
    logits = np.log(np.array([0.1, 0.5, 0.15, 0.25]))
    # top_p 0.7: keep {1: .5, 3: .25} -> renormalised 2/3, 1/3
    assert sample_next(logits, 1.0, 0.7, np.random.default_rng(0)) in (1, 3)
    picks = [sample_next(logits, 1.0, 0.7, r) for r in [np.random.default_rng(s) for s in range(200)]]
    assert set(picks) == {1, 3} and 0.55 < picks.count(1) / 200 < 0.8
    u = np.random.default_rng(7).random()
    assert sample_next(logits, 1.0, 1.0, np.random.default_rng(7)) == [1, 3, 2, 0][int(np.searchsorted(np.cumsum([.5, .25, .15, .1]), u, side="right"))]
    assert sample_next(logits, 0.0, 0.5, None) == 1
    assert sample_next(logits, 1.0, 1e-6, np.random.default_rng(3)) == 1


def test_generation_sampling_seeded():
    model = model_of("llama", "sdpa")
    ex = make_batch(ROWS)
    kw = dict(max_new_tokens=6, eos_token_id=None, temperature=1.5, top_p=0.95)
    a = generate_pruned(model, ex, SCHEDULE, seed=1, **kw)
    assert a == generate_pruned(model, ex, SCHEDULE, seed=1, **kw)
    assert a != generate_pruned(model, ex, SCHEDULE, seed=2, **kw)
    greedy = generate_pruned(model, ex, SCHEDULE, max_new_tokens=6, eos_token_id=None)
    assert generate_pruned(model, ex, SCHEDULE, max_new_tokens=6, eos_token_id=None, temperature=1.5, top_p=1e-6, seed=5) == greedy


# ----------------------------------------------------------------------------- errors


def test_length_errors_are_one_line():
    model = tiny_decoder("llama", "sdpa", layers=2)
    ex = make_batch(ROWS)  # longest prompt: 17 tokens
    model.config.max_position_embeddings = 20
    with pytest.raises(InputError) as e:
        generate_pruned(model, ex, identity(2), max_new_tokens=4, eos_token_id=None)
    assert "\n" not in str(e.value) and "max_new_tokens" in str(e.value) and "<= 3" in str(e.value)
    assert len(generate_pruned(model, ex, identity(2), max_new_tokens=3, eos_token_id=None)[0]) == 3
    model.config.max_position_embeddings = 16
    with pytest.raises(InputError) as e:
        generate_pruned(model, ex, identity(2), max_new_tokens=1, eos_token_id=None)
    assert "\n" not in str(e.value) and "prompt of 17 tokens" in str(e.value)
