"""The prefill executor: per-layer callbacks, a layer-major walk over several batches, the base spec."""

from __future__ import annotations

import pytest
import torch

from adatoken_compile.compiler.executor import PrefillExecutor, full_logits, pruned_prefill
from adatoken_compile.models.spec import BASE, spec_for
from adatoken_compile.schedule import Cut, Schedule

from conftest import make_batch, tiny_decoder

SCHEDULE = Schedule(cuts=[Cut(1, 0.5), Cut(3, 0.25)], num_layers=4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layer_major_walk_equals_one_batch_at_a_time(family):
    """Advancing several batches one layer at a time (one layer resident, as a layer-major driver
    does) gives exactly what each batch's own prefill gives."""
    model = tiny_decoder(family)
    batches = [make_batch([(3, 20, 4), (2, 13, 6)], seed=0), make_batch([(4, 9, 3), (1, 30, 2), (2, 5, 5)], seed=1)]
    with torch.no_grad():
        execs = [PrefillExecutor(model, b) for b in batches]
        for layer in range(4):
            for ex in execs:
                ex.run(SCHEDULE, until=layer + 1)
        for ex, b in zip(execs, batches):
            want = pruned_prefill(model, b, SCHEDULE)
            got = ex.result()
            assert torch.equal(got.logits_last, want.logits_last)
            assert all(torch.equal(x, y) for x, y in zip(got.kept_indices, want.kept_indices))
            assert got.cache_lengths() == want.cache_lengths() and got.cache_lengths()[3] < got.cache_lengths()[0]


def test_callbacks_see_every_layer_and_keep_kv_false_holds_none():
    model = tiny_decoder("qwen2")
    batch = make_batch([(3, 20, 4), (2, 13, 6)])
    seen = []

    def on_layer(ev):
        seen.append((ev.index, ev.key.clone(), tuple(ev.attention_input.shape)))
        assert ev.attention is ev.spec.layers(model)[ev.index].self_attn

    with torch.no_grad():
        kept = PrefillExecutor(model, batch).run(on_layer=on_layer).result()
        ex = PrefillExecutor(model, batch, materialize_mask=False, keep_kv=False).run()
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert all(torch.equal(k, kept.keys[i]) for i, k, _ in seen)
    assert all(s == tuple(batch.inputs_embeds.shape) for _, _, s in seen)
    assert ex.cache.keys == [None] * 4 and torch.allclose(ex.logits(), kept.logits_last, atol=1e-5)
    # the unpruned executor is the model's own forward
    with torch.no_grad():
        hf = model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits[:, -1]
    assert torch.allclose(full_logits(model, batch), hf, atol=1e-5)


def test_installed_families_use_the_base_spec():
    assert spec_for(tiny_decoder("llama")) is BASE and spec_for(tiny_decoder("qwen2")) is BASE
    assert BASE.layer_of_path("lm.model.layers.12.self_attn.q_proj") == 12
    assert BASE.layer_of_path("lm.model.norm") is None
    batch = make_batch([(2, 6, 3), (1, 4, 2)])
    assert BASE.decode_positions(batch, 2)[:, 0].tolist() == [n + 2 for n in batch.lengths()]
