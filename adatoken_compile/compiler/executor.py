"""The prefill executor: the one code path that runs a prefill's decoder layers eagerly in PyTorch.

:class:`PrefillExecutor` holds the state of one batch's prefill between decoder layers and advances
it layer by layer, through the family's :class:`adatoken_compile.models.spec.DecoderSpec` (mask
and rotary tables once, then each layer as the model's own forward runs it). Between layers it
applies a schedule's cuts with the SAME pure functions as the graph pass
(:mod:`adatoken_compile.passes.token_drop`), so the eager pruned model and the compiled graph prune
alike. It runs:

* **full** -- the identity schedule is the unpruned model (the calibration's reference logits,
  the statistics' forward, PyTorch evaluation);
* **pruned** -- a schedule's cuts (validation, the eager reference of an artifact);
* **resumed** -- from a layer's state (:meth:`PrefillExecutor.branch` / :meth:`~PrefillExecutor.stored`
  / :meth:`~PrefillExecutor.resume`): schedules that share an unpruned prefix run it once.

What an algorithm wants to see of a layer it gets through ``on_layer`` callbacks
(:class:`LayerEvent`: the attention module, its input, the rotary tables, the layer's keys and
values), so observers never drive a forward of their own. Because the state is per batch and per
layer, a driver that keeps one layer resident and walks batches through it is a loop over
:meth:`PrefillExecutor.layer`, not another code path.

The scoring query of an attention rule is observed, not recomputed: a
:class:`torch.overrides.TorchFunctionMode` active during layer ``i-1`` records the first argument of
the first attention op the spec names -- the same tensor the graph pass reads -- and the keys come
from the recording cache. No modeling code is patched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from adatoken_compile.compiler.capture import RecordingCache, check_decoder
from adatoken_compile.contract import DecoderInputs
from adatoken_compile.errors import InputError
from adatoken_compile.models.spec import DecoderSpec, spec_for
from adatoken_compile.passes import token_drop as td


@dataclass
class PrefillResult:
    logits_last: torch.Tensor  # (B, V)
    keys: list[torch.Tensor]  # per layer (B, Hkv, L_i, d), post-RoPE
    values: list[torch.Tensor]  # per layer (B, Hkv, L_i, d)
    masks: list[torch.Tensor]  # per layer (B, L_i) bool, valid positions of that layer's cache
    kept_indices: list[torch.Tensor] = field(default_factory=list)  # per effective cut (B, K') original positions, -1 = pad
    cut_layers: list[int] = field(default_factory=list)  # layer of each entry of kept_indices
    positions: list[torch.Tensor] = field(default_factory=list)  # per layer, the original position ids it ran at

    def cache_lengths(self) -> list[int]:
        return [int(k.shape[2]) for k in self.keys]


@dataclass
class LayerEvent:
    """What one layer's run shows a callback (tensors of the batch in the executor's current layout)."""

    index: int
    attention: torch.nn.Module  # the layer's attention module
    attention_input: torch.Tensor  # (B, T, H) the attention's input (after the layer's input norm)
    position_embeddings: tuple  # the rotary tables the layer ran with (the spec's layout)
    key: torch.Tensor  # (B, kv_heads, T, d) post-RoPE
    value: torch.Tensor  # (B, kv_heads, T, d)
    spec: DecoderSpec


class QueryObserver(TorchFunctionMode):
    """Records the query passed to the first attention op run while active."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.query: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.query is None and self.spec.is_attention_op(func):
            q = args[0] if args else kwargs.get("query", kwargs.get("input"))
            if isinstance(q, torch.Tensor) and q.dim() == 4:
                self.query = q
        return func(*args, **kwargs)


def check_inputs(inputs: DecoderInputs, hidden: int) -> None:
    """InputError (one line) when a batch does not follow the contract's shapes."""
    e = inputs.inputs_embeds
    if e.dim() != 3 or e.shape[2] != hidden:
        raise InputError(f"prefill: inputs_embeds must be (B, L, {hidden}), got {tuple(e.shape)}")
    for name in ("attention_mask", "spatial_mask"):
        t = getattr(inputs, name)
        if tuple(t.shape) != tuple(e.shape[:2]):
            raise InputError(f"prefill: {name} must be (B, L)={tuple(e.shape[:2])}, got {tuple(t.shape)}")
    xyz = inputs.spatial_xyz
    if xyz is not None and tuple(xyz.shape) != (*e.shape[:2], 3):
        raise InputError(f"prefill: spatial_xyz must be (B, L, 3)={(*e.shape[:2], 3)}, got {tuple(xyz.shape)}")


class PrefillExecutor:
    """The state of one prefill between decoder layers, advanced layer by layer with cuts between them.

    ``materialize_mask``: build the 4-D mask even for an unpadded batch (a cut gathers it; the
    unpruned path leaves it to the attention kernel, as the model's own forward does).
    ``keep_kv``: keep every layer's keys and values for :meth:`result` (an observer that reads them
    in its callback passes False, so a prefill holds one layer's cache at a time).
    ``device``: where the state lives (default: the decoder's parameters').

    >>> ex = PrefillExecutor(decoder_lm, batch)                     # doctest: +SKIP
    >>> ex.run(schedule, on_layer=lambda ev: print(ev.index)).logits()  # doctest: +SKIP
    """

    def __init__(self, decoder_lm, inputs: DecoderInputs, materialize_mask: bool = True, *,
                 spec: DecoderSpec | None = None, keep_kv: bool = True, device: torch.device | str | None = None):
        check_decoder(decoder_lm)
        self.spec = spec or spec_for(decoder_lm)
        cfg = decoder_lm.config
        self.lm = decoder_lm
        self.n_layers = int(cfg.num_hidden_layers)
        check_inputs(inputs, int(cfg.hidden_size))
        # a layer-major driver passes the device its layers are loaded on (the resident placeholders
        # stay where they are)
        dev = torch.device(device) if device is not None else next(decoder_lm.parameters()).device
        self.hidden = inputs.inputs_embeds.to(dev)
        attention_mask = inputs.attention_mask.to(torch.int64).to(dev)
        self.position_ids = self.spec.positions(inputs).to(dev)
        self.spatial = inputs.spatial_mask.to(torch.bool).to(dev)
        xyz = inputs.spatial_xyz
        self.xyz = xyz.float().to(dev) if xyz is not None else torch.zeros(*self.spatial.shape, 3, device=dev)
        self.cache = RecordingCache(self.n_layers)
        self.keep_kv = keep_kv
        self.attention_mask, self.materialize_mask = attention_mask, materialize_mask
        self.mask4 = self._causal_mask()
        self.pe = tuple(self.spec.rotary(decoder_lm, self.hidden, self.position_ids))
        self.valid = attention_mask != 0
        self.n0 = self.srank = self.kept = self.query = None
        self.next_layer = 0
        self.cuts_done = 0
        self.res = PrefillResult(None, [], [], [], [], [], [])

    def _causal_mask(self):
        return self.spec.causal_mask(self.lm, self.hidden, self.attention_mask, self.position_ids,
                                     RecordingCache(self.n_layers), self.materialize_mask)

    # ------------------------------------------------------------------ resuming
    def stored(self) -> "PrefillExecutor":
        """A copy of this unpruned state without its 4-D mask, to keep many in memory: the mask is
        (B, 1, T, T), at scene lengths larger than the rest of the state. :meth:`resume` rebuilds it."""
        if self.cuts_done:
            raise RuntimeError("PrefillExecutor.stored: only an unpruned state can rebuild its mask")
        other = self.branch()
        other.mask4 = None
        return other

    def resume(self) -> "PrefillExecutor":
        """An independent copy of a :meth:`stored` state (or any state), ready to run on."""
        other = self.branch()
        if other.mask4 is None:
            other.mask4 = other._causal_mask()
        return other

    def nbytes(self) -> int:
        """Bytes held by this state's tensors (shared tensors counted once)."""
        seen, total = set(), 0
        ts = [self.hidden, *self.pe, self.position_ids, self.spatial, self.xyz, self.valid,
              self.attention_mask, self.query, self.mask4, *self.cache.keys, *self.cache.values]
        for t in ts:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    def branch(self) -> "PrefillExecutor":
        """An independent copy of this state (tensors shared, per-layer records copied)."""
        other = copy.copy(self)
        other.cache = RecordingCache(self.n_layers)
        other.cache.keys, other.cache.values = list(self.cache.keys), list(self.cache.values)
        other.res = PrefillResult(None, [], [], list(self.res.masks), list(self.res.kept_indices),
                                  list(self.res.cut_layers), list(self.res.positions))
        return other

    # ------------------------------------------------------------------ cuts and layers
    def cut(self, cut) -> None:
        """Drop spatial tokens before layer ``self.next_layer`` with the cut's keep ratio and rule."""
        i = self.next_layer
        if self.cuts_done == 0:
            self.n0 = td.spatial_count(self.spatial, self.valid)
            self.srank = td.spatial_rank(self.spatial, self.valid)
        needs = cut.rule.needs()
        att = "attention" in needs
        if att and (self.query is None or i == 0 or self.cache.keys[i - 1] is None):
            raise RuntimeError(f"prefill: no query observed before the cut at layer {i}")
        if self.mask4 is None:
            raise RuntimeError("prefill: no 4-D mask to rebuild at a cut")
        scores = td.score_cut(cut.rule, self.cuts_done, cut.keep, self.valid, self.spatial, self.n0,
                              query=self.query if att else None, key=self.cache.keys[i - 1] if att else None,
                              hidden=self.hidden, xyz=self.xyz, srank=self.srank)
        idx, new_valid, _ = td.select_tokens(scores, self.valid, self.spatial, self.n0, cut.keep)
        for name in ("hidden", "spatial", "xyz", "srank"):
            setattr(self, name, td.gather_seq(getattr(self, name), idx, (1,)))
        self.position_ids = self.spec.gather_positions(self.position_ids, idx)
        self.pe = tuple(self.spec.gather_rotary(self.pe, idx))
        self.mask4 = td.rebuild_mask4d(self.mask4, idx, new_valid)
        self.kept = td.kept_positions(self.kept, idx, new_valid)
        self.valid = new_valid
        self.res.kept_indices.append(self.kept)
        self.res.cut_layers.append(i)
        self.cuts_done += 1

    def layer(self, observe: bool = False, on_layer: Callable[[LayerEvent], None] | None = None) -> None:
        """Run decoder layer ``self.next_layer``; ``observe``: record its query (the next cut scores
        with it); ``on_layer``: called with the layer's :class:`LayerEvent` after it ran."""
        i = self.next_layer
        spec, layer = self.spec, self.spec.layers(self.lm)[i]
        seen: dict = {}
        hook = None
        if on_layer is not None:
            def pre_hook(mod, args, kwargs):
                seen["input"] = spec.attention_input(args, kwargs)
            hook = spec.attention(layer).register_forward_pre_hook(pre_hook, with_kwargs=True)
        observer = QueryObserver(spec) if observe else None
        try:
            kwargs = dict(mask=self.mask4, position_embeddings=self.pe, position_ids=self.position_ids,
                          cache=self.cache)
            if observer is not None:
                with observer:
                    self.hidden = spec.run_layer(self.lm, i, self.hidden, **kwargs)
                self.query = observer.query
            else:
                self.hidden = spec.run_layer(self.lm, i, self.hidden, **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        if on_layer is not None:
            on_layer(LayerEvent(i, spec.attention(layer), seen.get("input"), self.pe, self.cache.keys[i],
                                self.cache.values[i], spec))
        if not self.keep_kv:
            self.cache.keys[i] = self.cache.values[i] = None
        self.res.masks.append(self.valid)
        self.res.positions.append(self.position_ids)
        self.next_layer += 1

    def run(self, schedule=None, *, until: int | None = None, observe_all: bool = False,
            on_layer: Callable[[LayerEvent], None] | None = None) -> "PrefillExecutor":
        """Apply the schedule's cuts (None: none, the unpruned model) and layers from
        ``self.next_layer`` up to (not including) layer ``until`` (default: every layer);
        ``observe_all`` records every layer's query."""
        cuts = {c.layer: c for c in schedule.effective_cuts()} if schedule is not None else {}
        stop = self.n_layers if until is None else until
        while self.next_layer < stop:
            if self.next_layer in cuts:
                self.cut(cuts[self.next_layer])
            nxt = cuts.get(self.next_layer + 1)
            self.layer(observe_all or (nxt is not None and "attention" in nxt.rule.needs()), on_layer)
        return self

    def logits(self) -> torch.Tensor:
        """(B, V) next-token logits at the last position (after every layer has run)."""
        return self.spec.head(self.lm, self.hidden)

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
    flow = PrefillExecutor(decoder_lm, inputs, materialize_mask=bool(schedule.effective_cuts()))
    return flow.run(schedule).result()


@torch.no_grad()
def full_logits(decoder_lm, inputs: DecoderInputs) -> torch.Tensor:
    """The unpruned model's next-token logits (B, V) at the last position, float32 on the CPU."""
    return PrefillExecutor(decoder_lm, inputs, materialize_mask=False, keep_kv=False).run().logits().float().cpu()
