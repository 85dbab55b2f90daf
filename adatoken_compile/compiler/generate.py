"""Eager PyTorch generation on an adapter (the unpruned reference path)."""

from __future__ import annotations

from typing import Sequence

import torch

from adatoken_compile.contract import DecoderInputs, Sample


@torch.no_grad()
def greedy_ids(adapter, batch: DecoderInputs, max_new_tokens: int = 32) -> list[list[int]]:
    """Greedy continuation ids per row with the installed ``generate`` (EOS stripped)."""
    out = adapter.decoder.generate(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=adapter.eos_token_id,
        pad_token_id=adapter.tokenizer.pad_id,
    )
    rows = []
    for r in out.tolist():
        ids = []
        for t in r:
            if t == adapter.eos_token_id:
                break
            ids.append(t)
        rows.append(ids)
    return rows


def greedy_answers(adapter, samples: Sequence[Sample], max_new_tokens: int = 32) -> list[str]:
    batch = adapter.prepare(samples)
    return [adapter.tokenizer.decode(ids).strip() for ids in greedy_ids(adapter, batch, max_new_tokens)]
