"""Training-sequence construction of the bundled model (adatoken_compile.train)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adatoken_compile.train import packed_sequence, qa_targets


def test_packed_questions_equal_separate_sequences():
    """Packing k questions behind one copy of the scene with the block mask and per-question
    position ids gives each question exactly the logits of its own unpacked sequence."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, rope_theta=1e6)
    cfg._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(cfg).eval()
    prefix, n_sp = [1, 7, 8], 11
    spatial = torch.randn(n_sp, 32)
    qa = [[3, 4, 5, 9], [6, 2], [10, 11, 12]]
    emb = lm.get_input_embeddings()
    allow, pos, starts = packed_sequence(prefix, n_sp, qa)
    x = torch.cat([emb(torch.tensor(prefix)), spatial] + [emb(torch.tensor(q)) for q in qa])[None]
    with torch.no_grad():
        packed = lm(inputs_embeds=x, attention_mask=allow[None, None], position_ids=pos[None]).logits[0]
        for s, q in zip(starts, qa):
            xs = torch.cat([emb(torch.tensor(prefix)), spatial, emb(torch.tensor(q))])[None]
            alone = lm(inputs_embeds=xs).logits[0, -len(q):]
            torch.testing.assert_close(packed[s : s + len(q)], alone, atol=1e-5, rtol=1e-5)
    # a question never sees another question's tokens
    assert not allow[starts[1], starts[0]] and not allow[starts[2], starts[1] + 1]


def test_qa_targets_main_and_dense():
    # suffix of 6 tokens ("\n", first word, ..., ":"), answer = one word + EOS
    main, dense = qa_targets(6, [40, 2], dense=True)
    assert main == [-100, -100, -100, -100, -100, 40, 2, -100]
    # positions after the first word up to (not including) the last suffix token predict 40
    assert dense == [-100, -100, 40, 40, 40, -100, -100, -100]
    main2, dense2 = qa_targets(6, [40, 2])
    assert main2 == main and set(dense2) == {-100}


def test_voxel_majority_votes_per_voxel():
    from adatoken_compile.train import voxel_majority

    labels = torch.tensor([3, 3, 0, 5, 5, 4, 1, 2])
    inverse = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])  # patch -> voxel
    # voxel 0: 3 wins 2:1; voxel 1: 5 wins; voxel 2: tie 1/2 -> the smaller label
    assert voxel_majority(labels, inverse, 3).tolist() == [3, 5, 1]
