"""Shared fixtures: tiny random checkpoints written in the released layouts, simple scenes."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def simple_scene(V: int = 3, H: int = 60, W: int = 80, seed: int = 0):
    """Random colours, depths 1-4 m, cameras translated along x (not a rendered room)."""
    from adatoken_compile.compiler.pipeline import example_scene

    return example_scene(num_views=V, H=H, W=W, seed=seed)


@pytest.fixture(scope="session")
def tiny3d_dir(tmp_path_factory):
    from adatoken_compile.models.testing import random_llava3d

    return random_llava3d(str(tmp_path_factory.mktemp("ckpt") / "tiny3d"), layers=4, seed=0)


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
    from adatoken_compile.contract import Segment, collate

    gen = torch.Generator().manual_seed(seed)
    segs = []
    for n_pre, n_sp, n_post in rows:
        n = n_pre + n_sp + n_post
        spatial = torch.zeros(n, dtype=torch.bool)
        spatial[n_pre : n_pre + n_sp] = True
        segs.append(Segment(torch.randn(n, hidden, generator=gen), spatial))
    return collate(segs)
