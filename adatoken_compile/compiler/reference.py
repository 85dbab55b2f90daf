"""The PyTorch reference of a compiled artifact: the pruned prefill (run by
:class:`adatoken_compile.compiler.executor.PrefillExecutor`, the same pruning the graph performs) and
generation over its per-layer KV caches (the torch backend's one generation loop; the identity
schedule is the unpruned model)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

import torch

from adatoken_compile.compiler.decode import DecodeModule
from adatoken_compile.compiler.executor import PrefillResult, pruned_prefill  # noqa: F401  (the reference's prefill)
from adatoken_compile.contract import DecoderInputs
from adatoken_compile.errors import InputError
from adatoken_compile.models.spec import spec_for
from adatoken_compile.schedule import identity
from adatoken_compile.runtime.sampling import make_rng, next_tokens


def max_positions(decoder_lm) -> int | None:
    v = getattr(decoder_lm.config, "max_position_embeddings", None)
    return int(v) if v else None


def check_lengths(decoder_lm, prompt_len: int, max_new_tokens: int) -> None:
    """InputError (one line) when the prompt, or prompt + max_new_tokens, passes max_position_embeddings."""
    limit = max_positions(decoder_lm)
    if max_new_tokens < 1:
        raise InputError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if limit is None:
        return
    if prompt_len > limit:
        raise InputError(
            f"generate: prompt of {prompt_len} tokens exceeds the model's max_position_embeddings={limit}; "
            "use fewer spatial tokens or a shorter question"
        )
    if prompt_len + max_new_tokens > limit:
        raise InputError(
            f"generate: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings={limit}; "
            f"use max_new_tokens <= {limit - prompt_len}"
        )


def _flat_past(keys, values, masks) -> list[torch.Tensor]:
    out = []
    for k, v, m in zip(keys, values, masks):
        out += [k, v, m.to(torch.bool)]
    return out


@torch.no_grad()
def generate(
    decoder_lm,
    inputs: DecoderInputs,
    schedule,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[list[int]]:
    """Generated ids per row (EOS and what follows stripped): pruned prefill, then DecodeModule steps.

    Greedy when ``temperature == 0``; otherwise :func:`adatoken_compile.runtime.sampling.next_tokens` with
    ``numpy.random.default_rng(seed)`` (temperature + top-p). Finished rows keep feeding EOS.
    ``embed_fn`` maps (B, 1) int64 ids to (B, 1, H) embeddings (default: the decoder's input embeddings).
    """
    lengths = inputs.lengths()
    check_lengths(decoder_lm, max(lengths) if lengths else 0, max_new_tokens)
    decoder_lm.eval()
    pre = pruned_prefill(decoder_lm, inputs, schedule)
    step = DecodeModule(decoder_lm).eval()
    embed = embed_fn or decoder_lm.get_input_embeddings()
    rng = make_rng(seed) if temperature > 0 else None
    B = inputs.batch_size
    spec = spec_for(decoder_lm)
    dev = next(decoder_lm.parameters()).device
    past = _flat_past(pre.keys, pre.values, pre.masks)
    logits = pre.logits_last
    done = np.zeros(B, dtype=bool)
    out: list[list[int]] = [[] for _ in range(B)]
    fill = 0 if eos_token_id is None else int(eos_token_id)
    for t in range(max_new_tokens):
        toks = next_tokens(logits.float().cpu().numpy(), temperature, top_p, rng)
        for b in range(B):
            if done[b]:
                continue
            if eos_token_id is not None and int(toks[b]) == int(eos_token_id):
                done[b] = True
            else:
                out[b].append(int(toks[b]))
        if done.all() or t == max_new_tokens - 1:
            break
        feed = torch.from_numpy(np.where(done, fill, toks).astype(np.int64))[:, None]
        res = step(embed(feed.to(dev)).to(dev), spec.decode_positions(inputs, t).to(dev), *past)
        logits, past = res[0], list(res[1:])
    return out


def answers(adapter, samples: Sequence, schedule=None, *, max_new_tokens: int = 8, temperature: float = 0.0,
            top_p: float = 1.0, seed: int | None = None, batch: DecoderInputs | None = None) -> list[str]:
    """Answer text per sample through the PyTorch reference (``schedule`` None: unpruned).
    ``batch``: the samples' decoder inputs when already prepared (several schedules, one encoding)."""
    sched = schedule or identity(adapter.arch()["num_layers"])
    batch = adapter.prepare(samples) if batch is None else batch
    ids = generate(adapter.decoder, batch, sched, max_new_tokens=max_new_tokens, eos_token_id=adapter.eos_token_id,
                   temperature=temperature, top_p=top_p, seed=seed)
    return [adapter.tokenizer.decode(row).strip() for row in ids]
