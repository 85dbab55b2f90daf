"""The PyTorch reference of a compiled artifact: the pruned prefill, eager, and generation over
its per-layer KV caches (the torch backend's one generation loop; the identity schedule is the
unpruned model).

Runs the installed transformers decoder layers in a loop, as the model's own forward does
(``create_causal_mask`` once, ``rotary_emb`` once, then ``decoder_layer(hidden, attention_mask=...,
position_embeddings=..., position_ids=..., cache=..., use_cache=True)``), and between
layers applies the SAME pure functions as the graph pass (:mod:`adatoken_compile.passes.token_drop`),
including each cut's selection rule on the same inputs (a cut before layer 0 selects on the
input embeddings).

The scoring query is observed, not recomputed: a :class:`torch.overrides.TorchFunctionMode` active
during layer ``i-1`` records the first argument of the first attention op (``scaled_dot_product_attention``
or the QK^T ``matmul`` of eager attention) -- the same tensor the graph pass reads -- and the keys
come from the recording cache. No modeling code is patched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

import torch
from torch.overrides import TorchFunctionMode
from transformers.masking_utils import create_causal_mask

from adatoken_compile.compiler.capture import RecordingCache, check_decoder
from adatoken_compile.compiler.decode import DecodeModule
from adatoken_compile.contract import DecoderInputs
from adatoken_compile.errors import InputError
from adatoken_compile.passes import token_drop as td
from adatoken_compile.schedule import identity
from adatoken_compile.runtime.sampling import make_rng, next_tokens


@dataclass
class PrefillResult:
    logits_last: torch.Tensor  # (B, V)
    keys: list[torch.Tensor]  # per layer (B, Hkv, L_i, d), post-RoPE
    values: list[torch.Tensor]  # per layer (B, Hkv, L_i, d)
    masks: list[torch.Tensor]  # per layer (B, L_i) bool, valid positions of that layer's cache
    kept_indices: list[torch.Tensor] = field(default_factory=list)  # per effective cut (B, K') original positions, -1 = pad
    cut_layers: list[int] = field(default_factory=list)  # layer of each entry of kept_indices
    positions: list[torch.Tensor] = field(default_factory=list)  # per layer (B, L_i) original position ids (1 on pads)

    def cache_lengths(self) -> list[int]:
        return [int(k.shape[2]) for k in self.keys]


_ATTN_FUNCS = (torch.nn.functional.scaled_dot_product_attention, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class QueryObserver(TorchFunctionMode):
    """Records the query passed to the first attention op run while active."""

    def __init__(self):
        super().__init__()
        self.query: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.query is None and func in _ATTN_FUNCS:
            q = args[0] if args else kwargs.get("query", kwargs.get("input"))
            if isinstance(q, torch.Tensor) and q.dim() == 4:
                self.query = q
        return func(*args, **kwargs)


def _check_inputs(inputs: DecoderInputs, hidden: int) -> None:
    e = inputs.inputs_embeds
    if e.dim() != 3 or e.shape[2] != hidden:
        raise InputError(f"pruned_prefill: inputs_embeds must be (B, L, {hidden}), got {tuple(e.shape)}")
    for name in ("attention_mask", "position_ids", "spatial_mask"):
        t = getattr(inputs, name)
        if tuple(t.shape) != tuple(e.shape[:2]):
            raise InputError(f"pruned_prefill: {name} must be (B, L)={tuple(e.shape[:2])}, got {tuple(t.shape)}")
    xyz = inputs.spatial_xyz
    if xyz is not None and tuple(xyz.shape) != (*e.shape[:2], 3):
        raise InputError(f"pruned_prefill: spatial_xyz must be (B, L, 3)={(*e.shape[:2], 3)}, got {tuple(xyz.shape)}")


class PrefillFlow:
    """The state of one prefill between decoder layers, advanced layer by layer with cuts between them.

    :func:`pruned_prefill` runs a schedule through it; :meth:`branch` copies the state so that
    several schedules sharing an unpruned prefix run that prefix once (the comparison command).
    ``materialize_mask``: build the 4-D mask even for an unpadded batch (a cut gathers it; the
    identity path leaves it to the model, as the model's own forward does).
    """

    def __init__(self, decoder_lm, inputs: DecoderInputs, materialize_mask: bool = True):
        check_decoder(decoder_lm)
        cfg = decoder_lm.config
        self.lm = decoder_lm
        self.n_layers = int(cfg.num_hidden_layers)
        _check_inputs(inputs, int(cfg.hidden_size))
        self.hidden = inputs.inputs_embeds
        attention_mask = inputs.attention_mask.to(torch.int64)
        self.position_ids = inputs.position_ids.to(torch.int64)
        self.spatial = inputs.spatial_mask.to(torch.bool)
        xyz = inputs.spatial_xyz
        self.xyz = xyz.float() if xyz is not None else torch.zeros(*self.spatial.shape, 3)
        self.cache = RecordingCache(self.n_layers)
        self.attention_mask, self.materialize_mask = attention_mask, materialize_mask
        self.mask4 = self._causal_mask()
        self.cos, self.sin = decoder_lm.model.rotary_emb(self.hidden, position_ids=self.position_ids)
        self.valid = attention_mask != 0
        self.n0 = self.srank = self.kept = self.query = None
        self.next_layer = 0
        self.cuts_done = 0
        self.res = PrefillResult(None, [], [], [], [], [], [])

    def _causal_mask(self):
        return create_causal_mask(config=self.lm.config, inputs_embeds=self.hidden, attention_mask=self.attention_mask,
                                  cache=RecordingCache(self.n_layers), position_ids=self.position_ids,
                                  allow_is_causal_skip=not self.materialize_mask)

    def stored(self) -> "PrefillFlow":
        """A copy of this unpruned state without its 4-D mask, to keep many in memory: the mask is
        (B, 1, T, T), at scene lengths larger than the rest of the state. :meth:`resume` rebuilds it."""
        if self.cuts_done:
            raise RuntimeError("PrefillFlow.stored: only an unpruned state can rebuild its mask")
        other = self.branch()
        other.mask4 = None
        return other

    def resume(self) -> "PrefillFlow":
        """An independent copy of a :meth:`stored` state (or any state), ready to run on."""
        other = self.branch()
        if other.mask4 is None:
            other.mask4 = other._causal_mask()
        return other

    def nbytes(self) -> int:
        """Bytes held by this state's tensors (shared tensors counted once)."""
        seen, total = set(), 0
        ts = [self.hidden, self.cos, self.sin, self.position_ids, self.spatial, self.xyz, self.valid,
              self.attention_mask, self.query, self.mask4, *self.cache.keys, *self.cache.values]
        for t in ts:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    def branch(self) -> "PrefillFlow":
        """An independent copy of this state (tensors shared, per-layer records copied)."""
        other = copy.copy(self)
        other.cache = RecordingCache(self.n_layers)
        other.cache.keys, other.cache.values = list(self.cache.keys), list(self.cache.values)
        other.res = PrefillResult(None, [], [], list(self.res.masks), list(self.res.kept_indices),
                                  list(self.res.cut_layers), list(self.res.positions))
        return other

    def cut(self, cut) -> None:
        """Drop spatial tokens before layer ``self.next_layer`` with the cut's keep ratio and rule."""
        i = self.next_layer
        if self.cuts_done == 0:
            self.n0 = td.spatial_count(self.spatial, self.valid)
            self.srank = td.spatial_rank(self.spatial, self.valid)
        needs = cut.rule.needs()
        if "attention" in needs and (self.query is None or self.mask4 is None or i == 0):
            raise RuntimeError(f"pruned_prefill: no query observed before the cut at layer {i}")
        if self.mask4 is None:
            raise RuntimeError("pruned_prefill: no 4-D mask to rebuild at a cut")
        att = "attention" in needs
        scores = td.score_cut(cut.rule, self.cuts_done, cut.keep, self.valid, self.spatial, self.n0,
                              query=self.query if att else None, key=self.cache.keys[i - 1] if att else None,
                              hidden=self.hidden, xyz=self.xyz, srank=self.srank)
        idx, new_valid, _ = td.select_tokens(scores, self.valid, self.spatial, self.n0, cut.keep)
        for name in ("hidden", "cos", "sin", "position_ids", "spatial", "xyz", "srank"):
            setattr(self, name, td.gather_seq(getattr(self, name), idx, (1,)))
        self.mask4 = td.rebuild_mask4d(self.mask4, idx, new_valid)
        self.kept = td.kept_positions(self.kept, idx, new_valid)
        self.valid = new_valid
        self.res.kept_indices.append(self.kept)
        self.res.cut_layers.append(i)
        self.cuts_done += 1

    def layer(self, observe: bool = False) -> None:
        """Run decoder layer ``self.next_layer``; ``observe``: record its query (the next cut scores with it)."""
        i = self.next_layer
        kwargs = dict(attention_mask=self.mask4, position_embeddings=(self.cos, self.sin),
                      position_ids=self.position_ids, cache=self.cache, use_cache=True)
        layer = self.lm.model.layers[i]
        if observe:
            observer = QueryObserver()
            with observer:
                hidden = layer(self.hidden, **kwargs)
            self.query = observer.query
        else:
            hidden = layer(self.hidden, **kwargs)
        self.hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # older transformers returned tuples
        self.res.masks.append(self.valid)
        self.res.positions.append(self.position_ids)
        self.next_layer += 1

    def run(self, schedule, *, until: int | None = None, observe_all: bool = False) -> "PrefillFlow":
        """Apply the schedule's cuts and layers from ``self.next_layer`` up to (not including) layer
        ``until`` (default: every layer); ``observe_all`` records every layer's query."""
        cuts = {c.layer: c for c in schedule.effective_cuts()}
        stop = self.n_layers if until is None else until
        while self.next_layer < stop:
            if self.next_layer in cuts:
                self.cut(cuts[self.next_layer])
            nxt = cuts.get(self.next_layer + 1)
            self.layer(observe_all or (nxt is not None and "attention" in nxt.rule.needs()))
        return self

    def logits(self) -> torch.Tensor:
        """(B, V) next-token logits at the last position (after every layer has run)."""
        return self.lm.lm_head(self.lm.model.norm(self.hidden)[:, -1])

    def result(self) -> PrefillResult:
        self.res.logits_last = self.logits()
        self.res.keys = list(self.cache.keys)
        self.res.values = list(self.cache.values)
        return self.res


@torch.no_grad()
def pruned_prefill(decoder_lm, inputs: DecoderInputs, schedule) -> PrefillResult:
    """Prefill ``inputs`` through ``decoder_lm`` dropping spatial tokens at the schedule's cuts."""
    n_layers = int(decoder_lm.config.num_hidden_layers)
    if schedule.num_layers != n_layers:
        raise InputError(f"pruned_prefill: schedule is for {schedule.num_layers} layers, decoder has {n_layers}")
    flow = PrefillFlow(decoder_lm, inputs, materialize_mask=bool(schedule.effective_cuts()))
    return flow.run(schedule).result()


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
    pos = torch.tensor(lengths, dtype=torch.int64)[:, None]  # ORIGINAL lengths: decoding continues there
    past = _flat_past(pre.keys, pre.values, pre.masks)
    logits = pre.logits_last
    done = np.zeros(B, dtype=bool)
    out: list[list[int]] = [[] for _ in range(B)]
    fill = 0 if eos_token_id is None else int(eos_token_id)
    for t in range(max_new_tokens):
        toks = next_tokens(logits.float().numpy(), temperature, top_p, rng)
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
        res = step(embed(feed), pos, *past)
        logits, past = res[0], list(res[1:])
        pos = pos + 1
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
