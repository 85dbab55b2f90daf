"""Decoding over pruned per-layer KV caches: one decode step as a module, its ONNX export, and the
torch reference generation loop.

:class:`DecodeModule` is ONE step for ``B x 1`` new token over caches whose lengths differ per layer
(layers behind a cut hold fewer positions)::

    forward(inputs_embeds (B,1,H), position_ids (B,1) int64,
            past_key.0, past_value.0, past_mask.0, past_key.1, ...)   # per layer (B,KVH,P_i,D), (B,P_i) bool
      -> (logits (B,V), present_key.0, present_value.0, present_mask.0, ...)  # P_i + 1 positions

Layer ``i`` attends over ITS OWN past plus the new token, masked by ``past_mask.i`` (padding and
pruned slots False). The new token's RoPE position is whatever the caller passes: the row's ORIGINAL
(unpruned) prompt length plus the steps already decoded (schedule ``positions: "original"``).

The installed transformers modules are called as they are: ``rotary_emb`` once, each
``model.layers[i]`` with a 4-D mask in the attention implementation's format (bool for sdpa,
additive float for eager) and a duck-typed cache (:class:`StepCache`) whose ``update`` concatenates
that layer's past with the new key/value; then ``model.norm`` and ``lm_head``.

I/O layout (interleaved per layer; :func:`decode_input_names` / :func:`decode_output_names`) is the
ONNX graph's too: one graph with dynamic batch and a separate dynamic past length per layer serves
every step of every scene. The prefill graph's ``key.i``/``value.i``/``mask.i`` feed the first
step's ``past_key.i``/``past_value.i``/``past_mask.i`` as they are; ``present_*`` feed the next.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from adatoken_compile.compiler.capture import check_decoder, describe_decoder
from adatoken_compile.contract import DecoderInputs
from adatoken_compile.errors import InputError
from adatoken_compile.runtime.sampling import make_rng, next_tokens

KINDS = ("key", "value", "mask")


def decode_input_names(num_layers: int) -> list[str]:
    return ["inputs_embeds", "position_ids"] + [f"past_{k}.{i}" for i in range(num_layers) for k in KINDS]


def decode_output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present_{k}.{i}" for i in range(num_layers) for k in KINDS]


class StepCache:
    """Duck-typed ``past_key_values`` for one decode step over per-layer pasts of different lengths.

    ``update(k, v, layer_idx)`` returns ``cat(past_i, new)`` on the sequence axis and records it.
    """

    is_compileable = False

    def __init__(self, past_keys: Sequence[torch.Tensor], past_values: Sequence[torch.Tensor]):
        self.past_keys = list(past_keys)
        self.past_values = list(past_values)
        n = len(self.past_keys)
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = torch.cat([self.past_keys[layer_idx].to(key_states.dtype), key_states], dim=2)
        v = torch.cat([self.past_values[layer_idx].to(value_states.dtype), value_states], dim=2)
        self.keys[layer_idx] = k
        self.values[layer_idx] = v
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.past_keys[layer_idx].shape[2])


def layer_mask(valid: torch.Tensor, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) bool valid keys -> (B, 1, 1, K) mask: bool for sdpa (True = attend), additive for eager."""
    m = valid[:, None, None, :]
    if attn_impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=valid.device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=valid.device)
        return torch.where(m, zero, neg)
    return m


class DecodeModule(nn.Module):
    """One decode step of ``decoder_lm`` over pruned per-layer KV caches (see module docstring)."""

    def __init__(self, decoder_lm: nn.Module):
        super().__init__()
        check_decoder(decoder_lm)
        self.lm = decoder_lm
        self.num_layers = int(decoder_lm.config.num_hidden_layers)

    def forward(self, inputs_embeds, position_ids, *past):
        n = self.num_layers
        if len(past) != 3 * n:
            raise InputError(f"DecodeModule: expected {3 * n} past tensors (key, value, mask per layer), got {len(past)}")
        model = self.lm.model
        impl = self.lm.config._attn_implementation
        pk, pv, pm = past[0::3], past[1::3], past[2::3]
        x = inputs_embeds
        cos, sin = model.rotary_emb(x, position_ids=position_ids)
        cache = StepCache(pk, pv)
        masks = []
        for i, layer in enumerate(model.layers[:n]):
            m = pm[i].to(torch.bool)
            valid = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
            masks.append(valid)
            x = layer(
                x,
                attention_mask=layer_mask(valid, impl, x.dtype),
                position_embeddings=(cos, sin),
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            if isinstance(x, tuple):  # older transformers returned tuples
                x = x[0]
        x = model.norm(x)
        logits = self.lm.lm_head(x[:, -1])
        out = [logits]
        for i in range(n):
            out += [cache.keys[i], cache.values[i], masks[i]]
        return tuple(out)


# ----------------------------------------------------------------------------- limits


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


# ----------------------------------------------------------------------------- torch reference generation


def _flat_past(keys, values, masks) -> list[torch.Tensor]:
    out = []
    for k, v, m in zip(keys, values, masks):
        out += [k, v, m.to(torch.bool)]
    return out


@torch.no_grad()
def generate_pruned(
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
    from adatoken_compile.compiler.reference import pruned_prefill

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


# ----------------------------------------------------------------------------- KV cache accounting


def kv_cache_bytes(arch: dict, schedule, n_spatial: int, n_text: int, new_tokens: int = 0, dtype_bytes: int = 4) -> int:
    """Bytes of one row's K+V cache from the schedule's arithmetic (no padding):
    sum over layers of (spatial tokens at that layer + n_text + new_tokens) x 2 x kv_heads x head_dim x dtype_bytes.
    ``arch`` is :func:`adatoken_compile.compiler.capture.describe_decoder`-shaped (num_kv_heads, head_dim)."""
    kvh = int(arch.get("num_kv_heads", arch.get("kv_heads", 0)))
    hd = int(arch["head_dim"])
    per_tok = 2 * kvh * hd * int(dtype_bytes)
    return sum((s + int(n_text) + int(new_tokens)) * per_tok for s in schedule.tokens_per_layer(int(n_spatial)))


def cache_bytes_of(arrays) -> int:
    """Total bytes of the given arrays (numpy or torch), as held."""
    total = 0
    for a in arrays:
        if isinstance(a, torch.Tensor):
            total += a.numel() * a.element_size()
        else:
            total += int(np.asarray(a).nbytes)
    return total


# ----------------------------------------------------------------------------- ONNX export


@dataclass
class DecodeExport:
    path: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    export_s: float
    external_data: str | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def example_decode_feeds(decoder_lm, batch: int = 2, past_lengths: Sequence[int] | None = None, seed: int = 0) -> dict:
    """Random decode inputs with distinct per-layer past lengths (so export keeps them separate)."""
    a = describe_decoder(decoder_lm)
    n = a["num_layers"]
    past_lengths = list(past_lengths or [batch + 3 + 2 * i for i in range(n)])
    g = torch.Generator().manual_seed(seed)
    feeds = {
        "inputs_embeds": torch.randn(batch, 1, a["hidden_size"], generator=g),
        "position_ids": torch.full((batch, 1), max(past_lengths), dtype=torch.int64),
    }
    for i, p in enumerate(past_lengths):
        feeds[f"past_key.{i}"] = torch.randn(batch, a["num_kv_heads"], p, a["head_dim"], generator=g)
        feeds[f"past_value.{i}"] = torch.randn(batch, a["num_kv_heads"], p, a["head_dim"], generator=g)
        m = torch.ones(batch, p, dtype=torch.bool)
        m[0, 0] = False
        feeds[f"past_mask.{i}"] = m
    return feeds


def _check_example_feeds(feeds: dict, n: int) -> list[torch.Tensor]:
    names = decode_input_names(n)
    missing = [k for k in names if k not in feeds]
    if missing:
        raise InputError(f"export_decode_onnx: example_feeds lacks {missing[:3]}; pass all of {names[:5]}...")
    args = [torch.as_tensor(feeds[k]) for k in names]
    B = int(args[0].shape[0])
    lens = [int(args[2 + 3 * i].shape[2]) for i in range(n)]
    sizes = [B] + lens
    if B < 2 or min(lens) < 2 or len(set(sizes)) != len(sizes):
        raise InputError(
            f"export_decode_onnx: example batch {B} and past lengths {lens} must all differ and be >= 2 "
            "(torch.export specialises size 1 and ties equal sizes); use example_decode_feeds()"
        )
    return args


def _name_dims(model, n: int) -> None:
    """Rename the exporter's symbolic dims (s12, s12 + 1, ...) to batch / past_{i} on every value."""
    import re

    import onnx_ir as ir

    names = {}
    for v in model.graph.inputs:
        dims = list(v.shape) if v.shape is not None else []
        if dims and isinstance(dims[0], ir.SymbolicDim) and dims[0].value:
            names.setdefault(dims[0].value, "batch")
        axis = {"past_key": 2, "past_value": 2, "past_mask": 1}.get(v.name.split(".")[0])
        if axis is not None and len(dims) > axis and isinstance(dims[axis], ir.SymbolicDim) and dims[axis].value:
            names.setdefault(dims[axis].value, "past_" + v.name.split(".")[1])
    if not names:
        return
    pat = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True)) + r")\b")

    def rename(v):
        if v.shape is None:
            return
        dims = []
        changed = False
        for d in v.shape:
            if isinstance(d, ir.SymbolicDim) and d.value and pat.search(d.value):
                dims.append(pat.sub(lambda m: names[m.group(1)], d.value))
                changed = True
            else:
                dims.append(d.value if isinstance(d, ir.SymbolicDim) else d)
        if changed:
            v.shape = ir.Shape(dims)

    for v in list(model.graph.inputs) + list(model.graph.outputs):
        rename(v)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for v in node.outputs:
            rename(v)


def export_decode_onnx(decoder_lm, path: str, example_feeds: dict | None = None, *, external_data_threshold: int = 1024,
                       optimize: bool = True, opset_version: int | None = None, check: bool = True) -> DecodeExport:
    """Export :class:`DecodeModule` to ``path`` (.onnx, weights in ``<name>.onnx.data``) with dynamic batch
    and one dynamic past length per layer. Written to a temp dir and renamed into place."""
    from adatoken_compile.compiler.export import save_model_atomic

    decoder_lm.eval()
    mod = DecodeModule(decoder_lm).eval()
    n = mod.num_layers
    feeds = example_feeds if example_feeds is not None else example_decode_feeds(decoder_lm)
    args = tuple(_check_example_feeds(feeds, n))
    in_names, out_names = decode_input_names(n), decode_output_names(n)

    batch = torch.export.Dim("batch", min=1, max=1024)
    # Dim.DYNAMIC, not a named Dim: GQA's repeat_kv adds a (true) guard on the past length that a named
    # Dim's strict range check rejects; the ONNX dims are renamed past_{i} afterwards
    past_dims = [torch.export.Dim.DYNAMIC(min=2, max=1 << 17) for _ in range(n)]
    past_spec = []
    for i in range(n):
        past_spec += [{0: batch, 2: past_dims[i]}, {0: batch, 2: past_dims[i]}, {0: batch, 1: past_dims[i]}]
    dyn = ({0: batch}, {0: batch}, tuple(past_spec))  # *past is one varargs entry
    dynamic_axes = {"inputs_embeds": {0: "batch"}, "position_ids": {0: "batch"}, "logits": {0: "batch"}}
    for i in range(n):
        for k in ("key", "value"):
            dynamic_axes[f"past_{k}.{i}"] = {0: "batch", 2: f"past_{i}"}
            dynamic_axes[f"present_{k}.{i}"] = {0: "batch", 2: f"past_{i} + 1"}
        dynamic_axes[f"past_mask.{i}"] = {0: "batch", 1: f"past_{i}"}
        dynamic_axes[f"present_mask.{i}"] = {0: "batch", 1: f"past_{i} + 1"}

    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(mod, args, dynamic_shapes=dyn, strict=False)
        kw = {} if opset_version is None else {"opset_version": opset_version}
        prog = torch.onnx.export(ep, args, dynamo=True, input_names=in_names, output_names=out_names,
                                 optimize=optimize, verbose=False, **kw)
    model = prog.model
    _name_dims(model, n)
    opset = int(model.opset_imports.get("", 0))

    path = os.path.abspath(path)
    has_data, data_name = save_model_atomic(model, path, external_data_threshold, check)
    got_in = [v.name for v in model.graph.inputs]
    got_out = [v.name for v in model.graph.outputs]
    if got_in != in_names or got_out != out_names:
        raise RuntimeError(f"export_decode_onnx: unexpected graph I/O names {got_in} / {got_out}")
    return DecodeExport(path=path, opset=opset, input_names=got_in, output_names=got_out, dynamic_axes=dynamic_axes,
                        export_s=time.perf_counter() - t0, external_data=data_name if has_data else None)
