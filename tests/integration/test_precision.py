"""Deployment formats: float16 / bfloat16 / int4 artifacts, decoder weights streamed from the
checkpoint while the graphs are written, the full-size preset's layout, execution providers."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from safetensors import safe_open

import adatoken_compile as ac
from adatoken_compile.cli import main
from adatoken_compile.compiler.parity import compare_artifacts
from adatoken_compile.compiler.pipeline import compile_artifact
from adatoken_compile.errors import InputError
from adatoken_compile.models.registry import load_adapter
from adatoken_compile.models.testing import PRESETS, preset_plan, random_llava3d_preset
from adatoken_compile.runtime import Sample, load, load_scene
from adatoken_compile.runtime.session import cuda_available
from adatoken_compile.schedule import Cut, Schedule

QUESTIONS = ["what is in the room?", "how many chairs are next to the big table by the window?", "what color is the box?"]


@pytest.fixture(scope="module")
def arts(tiny3d_dir, tiny_identity_artifact, tmp_path_factory):
    """One pruned schedule compiled four ways: float32 in memory, float32 / float16 / int4 with the
    decoder's weights read from the checkpoint as they are written; and the identity artifact."""
    d = tmp_path_factory.mktemp("precision")
    a = load_adapter(tiny3d_dir)
    sched = Schedule([Cut(1, 0.5), Cut(2, 0.25)], a.arch()["num_layers"], fingerprint=a.fingerprint(), family=a.family)
    out = {name: str(d / name) for name in ("mem32", "f32", "f16", "q4")}
    out["id32"] = tiny_identity_artifact
    compile_artifact(a, sched, out["mem32"], progress=False, decode=False)
    ac.compile(tiny3d_dir, sched, out["f32"], decode=False, progress=False)
    ac.compile(tiny3d_dir, sched, out["f16"], dtype="float16", progress=False)
    ac.compile(tiny3d_dir, sched, out["q4"], quantize="int4", block_size=32, progress=False)
    return out


def _data(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_streamed_weights_write_the_same_artifact_graphs(arts):
    """Reading each decoder weight from the checkpoint when it is written gives the bytes the
    in-memory model gives (graph and external data)."""
    for name in ("prefill.onnx", "prefill.onnx.data", "encoder.onnx.data", "projector.onnx.data"):
        assert _data(os.path.join(arts["f32"], name)) == _data(os.path.join(arts["mem32"], name)), name


def test_float16_artifact_keeps_float32_tokens(arts, scene_file):
    rt = load(arts["f16"])
    assert rt.manifest.data["precision"] == {"dtype": "float16", "io_dtype": "float16", "quantize": None}
    assert rt.embed.dtype == np.float16
    m = onnx.load(rt.graph_path("prefill"), load_external_data=False)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {i.data_type for i in m.graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.FLOAT16}
    # float16 attention is one GroupQueryAttention per layer (onnxruntime's CPU kernel has it)
    assert sum(n.op_type == "GroupQueryAttention" for n in m.graph.node) == rt.num_layers
    assert rt.manifest.graphs["prefill"]["fused_attention"] == rt.num_layers
    # a fixed batch: one scene, questions of three lengths (left padding)
    samples = [Sample(q, scene=load_scene(scene_file)) for q in QUESTIONS]
    par = compare_artifacts(arts["f16"], arts["mem32"], samples)
    assert par["kept_equal"] == [1.0, 1.0], par
    assert par["next_token_agreement"] == 1.0 and par["logits_max_abs"] < 0.05, par
    out = rt.prefill(rt.prepare(samples))
    assert out["key.3"].dtype == np.float16 and out["kept.0"].dtype == np.int64
    answers = rt.generate([s.scene for s in samples], QUESTIONS, max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(x, str) for x in answers)
    assert rt.last_transfer["kv"] == "buffers" and rt.last_transfer["kv_bytes_per_step"] == 0


def _rotary_table_bytes(path: str) -> int:
    m = onnx.load(path, load_external_data=False)
    return sum(4 * math.prod(i.dims) for i in m.graph.initializer if i.name.startswith("rotary_"))


def test_int4_artifact_quantises_every_linear_layer(arts, scene_file):
    rt, ref = load(arts["q4"]), load(arts["mem32"])
    q = rt.manifest.data["precision"]["quantize"]
    assert q["method"] == "int4" and q["block_size"] == 32 and q["op"] == "com.microsoft.MatMulNBits"
    L = rt.num_layers
    for g in ("prefill", "decode"):
        m = onnx.load(rt.graph_path(g), load_external_data=False)
        nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == rt.manifest.graphs[g]["quantized_matmuls"]
        assert all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in nbits)
        weights = {i.name for i in m.graph.initializer}
        assert not [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights]
    # the decode step: per layer q/k/v packed in one, o, gate/up packed in one, down; and the lm_head
    assert rt.manifest.graphs["decode"]["quantized_matmuls"] == 4 * L + 1
    assert rt.manifest.graphs["prefill"]["fused_attention"] == L  # int4 weights, float32 attention: fused
    # weights: 4 bits + a float32 scale per 32 -> 5/32 of float32 (the norms stay float32)
    # (less the rotary cos / sin tables, float32 in both and, at this toy width, a third of the file)
    size = {k: r.manifest.files["prefill.onnx.data"]["size"] - _rotary_table_bytes(r.graph_path("prefill"))
            for k, r in (("q4", rt), ("f32", ref))}
    assert size["q4"] < 0.2 * size["f32"], size
    samples = [Sample(q, scene=load_scene(scene_file)) for q in QUESTIONS]
    a = rt.prefill(rt.prepare(samples))["logits"]
    b = ref.prefill(ref.prepare(samples))["logits"]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95  # the same function, to int4 rounding
    answers = rt.generate([s.scene for s in samples], QUESTIONS, max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(x, str) for x in answers)
    assert rt.last_transfer["kv"] == "buffers" and rt.last_transfer["kv_bytes_per_step"] == 0


def test_bench_prefill_at_given_token_counts(arts):
    res = ac.bench(arts["mem32"], baseline=arts["id32"], tokens=(40, 12), repeats=1, threads=1)
    p = res["prefill"]
    assert p["tokens"] == {"spatial": 40, "text": 12, "spatial_per_layer": [40, 20, 10, 10]}
    assert p["flops_ratio"] < 0.7 and abs(p["flops_ratio_graph"] - p["flops_ratio"]) < 0.05
    assert p["latency_ratio"] > 0 and res["precision"]["dtype"] == "float32"
    with pytest.raises(InputError, match="identity"):
        ac.bench(arts["id32"], baseline=arts["mem32"], tokens=(40, 12), repeats=1)
    with pytest.raises(InputError, match="--baseline"):
        ac.bench(arts["mem32"], tokens=(40, 12))


def test_bfloat16_artifact_has_float32_boundary_and_refuses_cpu(tiny3d_dir, tmp_path):
    art = str(tmp_path / "bf16")
    ac.compile(tiny3d_dir, None, art, dtype="bfloat16", decode=False, progress=False)
    with open(os.path.join(art, "manifest.json")) as f:
        man = json.load(f)
    assert man["precision"]["dtype"] == "bfloat16" and man["precision"]["io_dtype"] == "float32"
    m = onnx.load(os.path.join(art, "prefill.onnx"), load_external_data=False)
    floats = [v for v in list(m.graph.input) + list(m.graph.output)
              if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.BFLOAT16)]
    assert floats and {v.type.tensor_type.elem_type for v in floats} == {onnx.TensorProto.FLOAT}
    assert {i.data_type for i in m.graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.BFLOAT16}
    assert np.load(os.path.join(art, "embed_tokens.npy")).dtype == np.float32
    # bfloat16 attention keeps the exporter's lowering (no CPU kernel of the fused op to check it on)
    assert man["graphs"]["prefill"]["fused_attention"] == 0
    assert not [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    with pytest.raises(InputError, match="bfloat16.*--provider cuda"):
        load(art, "cpu")


def test_compile_refuses_a_model_in_another_dtype(tiny3d_dir, tmp_path):
    a = load_adapter(tiny3d_dir)
    with pytest.raises(InputError, match="loaded in float32"):
        ac.compile(a, None, str(tmp_path / "x"), dtype="float16", progress=False)
    with pytest.raises(InputError, match="block-size"):
        ac.compile(tiny3d_dir, None, str(tmp_path / "x"), quantize="int4", block_size=48, progress=False)
    r = CliRunner().invoke(main, ["compile", "--model", tiny3d_dir, "--out", str(tmp_path / "y"), "--block-size", "64"])
    assert r.exit_code == 2 and r.output.startswith("error: --block-size applies to --quantize int4")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_7b_preset_layout_without_weights():
    spec = PRESETS["llava3d-7b"]
    main_t, vision = preset_plan(spec)
    n_dec = sum(math.prod(s) for k, s in main_t.items() if not k.startswith("model.video_tower")
                and not k.startswith("model.mm_projector"))
    assert 6.7e9 < n_dec < 6.8e9  # Llama-2-7B
    assert main_t["model.embed_tokens.weight"] == (32000, 4096) and main_t["lm_head.weight"] == (32000, 4096)
    assert main_t["model.layers.31.self_attn.q_proj.weight"] == (4096, 4096)
    assert main_t["model.layers.31.mlp.down_proj.weight"] == (4096, 11008)
    assert "model.layers.32.self_attn.q_proj.weight" not in main_t
    assert main_t["model.mm_projector.0.weight"] == (4096, 1024) and main_t["model.mm_projector.2.weight"] == (4096, 4096)
    assert main_t["model.video_tower.video_tower.positional_embedding.position_embedding_head.0.weight"] == (1024, 3)
    assert main_t["model.video_tower.prompt_encoder.pos_emb3d.position_embedding_head.3.weight"] == (4096, 4096)
    # CLIP ViT-L/14 at 336 px: 24 layers x 1024, (336 / 14)^2 + 1 = 577 positions
    assert vision["embeddings.position_embedding.weight"] == (577, 1024)
    assert vision["encoder.layers.23.mlp.fc1.weight"] == (4096, 1024) and "encoder.layers.24.mlp.fc1.weight" not in vision


def test_preset_writer_shards_match_the_plan(tmp_path):
    """The preset writer at a small width: safetensors headers equal the plan, float16, sharded
    with an index, and the checkpoint loads through the LLaVA-3D adapter."""
    small = dict(layers=2, hidden=64, heads=4, kv_heads=4, intermediate=128, vocab=500, vision_hidden=32,
                 vision_layers=2, vision_heads=2, vision_intermediate=64, image_size=56)
    out = str(tmp_path / "ckpt")
    random_llava3d_preset(out, max_shard_bytes=40_000, **small)
    main_t, vision = preset_plan({**PRESETS["llava3d-7b"], **small})
    for d, plan in ((out, main_t), (os.path.join(out, "vision_tower"), vision)):
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            wm = json.load(f)["weight_map"]
        assert set(wm) == set(plan) and len(set(wm.values())) > 1
        for name, shard in wm.items():
            with safe_open(os.path.join(d, shard), "pt") as f:
                sl = f.get_slice(name)
                assert tuple(sl.get_shape()) == plan[name] and sl.get_dtype() == "F16", name
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llava_llama" and cfg["mm_hidden_size"] == 32 and cfg["vocab_size"] == 500
    a = load_adapter(out, lazy=True)
    assert a.arch()["num_layers"] == 2 and len(a.lazy_weights) == 2 * 9 + 2  # layers, final norm, lm_head


@pytest.mark.skipif(cuda_available(), reason="CUDA is available here")
@pytest.mark.parametrize("argv", [["run"], ["eval"], ["bench", "--synthetic-7b"]])
def test_provider_cuda_without_cuda_is_one_line(argv, tmp_path):
    r = CliRunner().invoke(main, [*argv, "--provider", "cuda", "--artifact", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert r.output.startswith("error: --provider cuda: the CUDA execution provider is not available")
    assert r.output.count("\n") == 1


@pytest.mark.skipif("OpenVINOExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="onnxruntime-openvino is installed here")
def test_provider_openvino_without_it_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["run", "--provider", "openvino", "--artifact", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert r.output.startswith("error: --provider openvino: the OpenVINO execution provider is not available")
    assert r.output.count("\n") == 1
