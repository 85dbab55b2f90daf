"""Shared fixtures: tiny random checkpoints written in the released layouts, simple scenes.

Tests are tiered by folder, and each folder's tests carry that marker (``pytest -m unit``):
``unit`` (pure functions and small models, seconds), ``integration`` (capture, ONNX export,
ONNX Runtime, the CLI, packaging), ``model`` (the bundled model and the main job), ``training``
(the reference model's training code). CI runs them all.
"""

from __future__ import annotations

import os

import pytest
import torch

TIERS = ("unit", "integration", "model", "training")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = os.path.relpath(str(item.fspath), os.path.dirname(__file__)).split(os.sep)
        if parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


def simple_scene(V: int = 3, H: int = 60, W: int = 80, seed: int = 0):
    """Random colours, depths 1-4 m, cameras translated along x (not a rendered room)."""
    from adatoken_compile.models.llava3d import example_scene

    return example_scene(num_views=V, H=H, W=W, seed=seed)


@pytest.fixture(scope="session")
def tiny3d_dir(tmp_path_factory):
    from adatoken_compile.models.testing import random_llava3d

    return random_llava3d(str(tmp_path_factory.mktemp("ckpt") / "tiny3d"), layers=4, seed=0)


TINY_CUTS = ((1, 0.5), (3, 0.25))  # the pruned tiny artifact's schedule (4 layers)


@pytest.fixture(scope="session")
def tiny_artifact(tiny3d_dir, tmp_path_factory):
    """The tiny model pruned by :data:`TINY_CUTS`, compiled once through the CLI: (path, CLI output)."""
    from click.testing import CliRunner

    from adatoken_compile.cli import main
    from adatoken_compile.models.registry import load_adapter
    from adatoken_compile.schedule import Cut, Schedule

    adapter = load_adapter(tiny3d_dir)
    sched = Schedule(cuts=[Cut(*c) for c in TINY_CUTS], num_layers=4, fingerprint=adapter.fingerprint(),
                     family=adapter.family)
    d = tmp_path_factory.mktemp("tiny_artifact")
    sched.save(str(d / "schedule.json"))
    res = CliRunner().invoke(main, ["compile", "--model", tiny3d_dir, "--schedule", str(d / "schedule.json"),
                                    "--out", str(d / "pruned")])
    assert res.exit_code == 0, res.output
    return str(d / "pruned"), res.output


@pytest.fixture(scope="session")
def tiny_identity_artifact(tiny3d_dir, tmp_path_factory):
    """The tiny model's identity-schedule artifact, prefill only (no decode graph)."""
    from adatoken_compile.compiler.pipeline import compile_artifact
    from adatoken_compile.models.registry import load_adapter
    from adatoken_compile.schedule import identity

    adapter = load_adapter(tiny3d_dir)
    out = str(tmp_path_factory.mktemp("tiny_identity") / "identity")
    compile_artifact(adapter, identity(4, fingerprint=adapter.fingerprint(), family=adapter.family), out,
                     progress=False, decode=False)
    return out


@pytest.fixture(scope="session")
def scene_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("scenes") / "scene.npz")
    simple_scene().save(path)
    return path


# ----------------------------------------------------------------------------- tiny HF decoders
# (token-drop / capture / ONNX tests)


def tiny_decoder(family: str = "llama", attn: str = "sdpa", layers: int = 4, seed: int = 0):
    """A tiny random fp32 *ForCausalLM (Llama: MHA 4/4 heads; Qwen2: GQA 4 heads / 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128, vocab_size=101)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
    else:
        raise ValueError(family)
    model.config._attn_implementation = attn
    return model.eval()


def make_batch(rows, hidden: int = 64, seed: int = 0):
    """rows: [(n_pre, n_spatial, n_post), ...] -> left-padded DecoderInputs (random embeddings)."""
    from adatoken_compile.benchmarking.synthetic import synthetic_inputs

    return synthetic_inputs(hidden, rows, seed=seed)


@torch.no_grad()
def hf_greedy_ids(adapter, batch, max_new_tokens: int = 32) -> list[list[int]]:
    """Greedy continuation ids per row from transformers' own ``generate`` (EOS stripped): the
    independent oracle the project's generation loops are checked against."""
    out = adapter.decoder.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=adapter.eos_token_id,
                                   pad_token_id=adapter.tokenizer.pad_id)
    rows = []
    for r in out.tolist():
        ids = []
        for t in r:
            if t == adapter.eos_token_id:
                break
            ids.append(t)
        rows.append(ids)
    return rows


def write_video(path, frames, fps: int = 12, codec: str = "mpeg4") -> str:
    """An encoded video of ``frames`` ((H, W, 3) uint8, even sides) at ``fps``, written with PyAV."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return str(path)
