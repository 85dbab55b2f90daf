"""The runtime's decode loop: in-place KV buffers (IO binding) against the concatenating numpy path,
what crosses the session boundary per step, and batched generation against each request alone."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from adatoken_compile.artifact import sha256_file
from adatoken_compile.compiler.decode import decode_input_names, export_decode
from adatoken_compile.runtime import load
from adatoken_compile.runtime.decoding import BufferedSteps

from conftest import TINY_CUTS, simple_scene

torch.set_num_threads(1)

SCENES = [simple_scene(V=3, seed=0), simple_scene(V=2, H=48, W=64, seed=1), simple_scene(V=4, seed=2)]
QUESTIONS = ["what is here?", "how many chairs are next to the big red table by the window in this room?",
             "is the lamp on?"]


@pytest.fixture(scope="module")
def buffered_art(tiny_artifact):
    return tiny_artifact[0]


@pytest.fixture(scope="module")
def concat_art(tiny_artifact, tiny3d_dir, tmp_path_factory):
    """The same artifact with the concatenating decode graph an older compile wrote."""
    from adatoken_compile.models.registry import load_adapter

    dst = str(tmp_path_factory.mktemp("concat") / "art")
    shutil.copytree(tiny_artifact[0], dst)
    with open(os.path.join(dst, "manifest.json")) as f:
        m = json.load(f)
    g = m["graphs"]["decode"]
    for name in [g["file"], *g.get("external_data", [])]:
        os.remove(os.path.join(dst, name))
        del m["files"][name]
    res = export_decode(load_adapter(tiny3d_dir).decoder, os.path.join(dst, g["file"]), buffered=False)
    g["external_data"] = [res.external_data] if res.external_data else []
    for name in [g["file"], *g["external_data"]]:
        p = os.path.join(dst, name)
        m["files"][name] = {"sha256": sha256_file(p), "size": os.path.getsize(p)}
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        json.dump(m, f)
    return dst


def test_buffers_match_the_numpy_path(buffered_art, concat_art):
    """Same greedy tokens and logits (batch of 2, left padding, pruned layers) through both decode
    forms; the buffered one moves no KV byte per step, the numpy one the whole cache both ways."""
    a, b = load(buffered_art), load(concat_art)
    assert "past_length.0" in a._inputs["decode"] and b._inputs["decode"] == decode_input_names(a.num_layers)
    # the step's attention rotates the packed q / k / v at the graph's position ids itself (the
    # pruned layers' positions are not their slots), as ONNX Runtime GenAI's graphs do
    import onnx

    g = onnx.load(os.path.join(buffered_art, "decode.onnx"), load_external_data=False).graph
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == a.num_layers and not any(n.op_type == "RotaryEmbedding" for n in g.node)
    assert all({x.name: x.i for x in n.attribute}["do_rotary"] == 1 and n.input[9] == "position_ids"
               and n.input[1] == n.input[2] == "" for n in gqa)
    feeds = a.prepare(list(zip(SCENES[:2], QUESTIONS[:2])))
    steps = 6
    got = {}
    for name, rt in (("buffers", a), ("concat", b)):
        out = rt.prefill(feeds)
        pos = feeds["attention_mask"].sum(1)[:, None]
        ids = [toks.copy() for toks in rt.continue_ids(out, pos, steps, ignore_eos=True)]
        got[name] = (np.stack(ids), dict(rt.last_transfer))
    np.testing.assert_array_equal(got["buffers"][0], got["concat"][0])
    ta, tb = got["buffers"][1], got["concat"][1]
    assert ta["kv"] == "buffers" and tb["kv"] == "concat" and ta["steps"] == tb["steps"] == steps - 1
    V = a.embed.shape[0]
    assert ta["kv_bytes_per_step"] == 0.0 and ta["logits_bytes_per_step"] == tb["logits_bytes_per_step"] == 2 * V * 4
    # the numpy path: every layer's padded cache in, one position longer out (mean over the steps)
    out = a.prefill(feeds)
    lens = [out[f"mask.{i}"].shape[1] for i in range(a.num_layers)]
    kv = a.arch["kv_heads"] * a.arch["head_dim"] * 4 * 2 * 2  # K and V, float32, batch 2
    per_step = [sum((L + t) * kv + (L + t) * 2 + (L + t + 1) * kv + (L + t + 1) * 2 for L in lens) for t in range(steps - 1)]
    assert tb["kv_bytes_per_step"] == pytest.approx(np.mean(per_step))


def test_only_the_decode_session_spin_waits(buffered_art):
    """The once-per-request graphs' thread pools sleep when idle, so that after a prefill they leave
    the cores to the decode step's pool, which keeps ONNX Runtime's spin-waiting between its many
    small sections."""
    def spin(session):
        try:
            return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: onnxruntime's default, spinning
            return None

    rt = load(buffered_art, threads=2)
    spins = {name: spin(s) for name, s in rt.sessions.items()}
    assert set(spins) >= {"encoder", "prefill", "decode"}
    assert spins.pop("decode") != "0" and set(spins.values()) == {"0"}


def test_buffered_logits_match_the_numpy_path(buffered_art, concat_art):
    from adatoken_compile.runtime.decoding import ConcatSteps

    a, b = load(buffered_art), load(concat_art)
    feeds = a.prepare(list(zip(SCENES[1:], QUESTIONS[1:])))
    out = a.prefill(feeds)
    budget = 5
    sa = BufferedSteps(a.sessions["decode"], out, a.num_layers, budget)
    sb = ConcatSteps(b.sessions["decode"], out, b.num_layers)
    sc = BufferedSteps(a.sessions["decode"], out, a.num_layers, budget, bind=False)  # same graph, numpy each step
    # per-layer buffers at that layer's kept length (longest row) + the budget: pruned layers are shorter
    kept = [int(np.asarray(out[f"mask.{i}"], bool).sum(1).max()) for i in range(a.num_layers)]
    assert sa.capacities == [k + budget for k in kept] and len(set(sa.capacities)) > 1
    pos = feeds["attention_mask"].sum(1)[:, None]
    toks = out["logits"].argmax(-1)
    for _ in range(budget):
        la = sa.step(a.embed[toks][:, None], pos)
        lb = sb.step(b.embed[toks][:, None], pos)
        lc = sc.step(a.embed[toks][:, None], pos)
        assert np.abs(la - lb).max() <= 1e-4 and np.array_equal(la, lc)
        toks, pos = la.argmax(-1), pos + 1
    assert sa.kv_bytes == 0 and sc.kv_bytes == 2 * budget * sum(4 * 2 * a.arch["kv_heads"] * c * a.arch["head_dim"] * 2
                                                                  for c in sa.capacities)


def _alone(rt, k, steps):
    rt.generate(SCENES[k], QUESTIONS[k], max_new_tokens=steps)
    return rt.last_ids[0]


def test_batched_rows_equal_each_alone(buffered_art):
    """Three requests (different scenes, hence spatial counts, and prompt lengths) in one batch on
    the same buffers, rows finishing at different steps: each row's tokens == that request alone."""
    rt = load(buffered_art)
    steps = 8
    rt.eos_id = None
    free = [_alone(rt, k, steps) for k in range(3)]
    # an "EOS" that some rows emit sooner than others (or never): rows stop at different steps
    first = lambda row, t: row.index(t) if t in row else steps  # noqa: E731
    eos = next(t for r in free for t in r[1:] if len({first(row, t) for row in free}) > 1)
    rt.eos_id = eos
    alone = [_alone(rt, k, steps) for k in range(3)]
    rt.generate(SCENES, QUESTIONS, max_new_tokens=steps)
    assert rt.last_ids == alone
    assert len({len(r) for r in alone}) > 1 and min(len(r) for r in alone) < steps
    assert rt.last_transfer["kv"] == "buffers" and rt.last_transfer["kv_bytes_per_step"] == 0.0


def test_gpu_check_decode_step_rehearsed_on_cpu(buffered_art, tmp_path):
    """The GPU check's decode step (bound buffers vs numpy every step), run on the CPU."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "gpu_check.py"), "--out", str(tmp_path),
                        "--rehearse-decode-on-cpu", buffered_art], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "results.json") as f:
        res = json.load(f)["decode_cpu"]
    assert set(res["contexts"]) == {"60", "100"}
    for c in res["contexts"].values():
        assert c["bound"]["kv"] == "buffers" and c["bound"]["kv_bytes_per_step"] == 0
        assert c["numpy"]["kv"] == "buffers-numpy" and c["numpy"]["kv_bytes_per_step"] > 0
        assert c["bound"]["steps"] == c["numpy"]["steps"] == 4 and c["bound"]["ms_per_token"] > 0
    assert res["contexts"]["100"]["numpy"]["kv_bytes_per_step"] > res["contexts"]["60"]["numpy"]["kv_bytes_per_step"]
    assert "decode on cpu at 100 tokens" in r.stdout
