"""Decoding over pruned per-layer KV caches: one decode step as a module and its ONNX export.

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

:class:`BufferedDecodeModule` is the same step over per-layer buffers that stay where they are
(the graph :func:`export_decode` writes unless told otherwise)::

    forward(inputs_embeds (B,1,H), position_ids (B,1) int64,
            past_key.0, past_value.0, past_length.0, ...)  # (B,KVH,C_i,D) buffers, (B,) int32 valid slots
      -> (logits (B,V), present_key.0, present_value.0, ...)  # the buffers with slot past_length written

Row ``b`` of layer ``i`` holds its kept positions compacted into slots ``0..past_length.i[b]-1``;
attention is onnxruntime's ``GroupQueryAttention`` (:mod:`adatoken_compile.compiler.gqa`), which
writes the new key/value into the buffer in place when the runtime binds ``past_key.i`` and
``present_key.i`` to the same memory: no cache is concatenated or copied per step, and one
buffer per layer is sized at that layer's kept length plus the generation budget.
"""

from __future__ import annotations

import re
from typing import Sequence

import onnx_ir as ir
import torch
from torch import nn

from adatoken_compile.arch import from_config
from adatoken_compile.compiler import gqa
from adatoken_compile.compiler.capture import check_decoder
from adatoken_compile.compiler.export import ExportResult, export
from adatoken_compile.errors import InputError
from adatoken_compile.models.spec import spec_for

KINDS = ("key", "value", "mask")


def decode_input_names(num_layers: int) -> list[str]:
    return ["inputs_embeds", "position_ids"] + [f"past_{k}.{i}" for i in range(num_layers) for k in KINDS]


def decode_output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present_{k}.{i}" for i in range(num_layers) for k in KINDS]


BUFFER_KINDS = ("key", "value", "length")


def buffered_input_names(num_layers: int) -> list[str]:
    return ["inputs_embeds", "position_ids"] + [f"past_{k}.{i}" for i in range(num_layers) for k in BUFFER_KINDS]


def buffered_output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present_{k}.{i}" for i in range(num_layers) for k in ("key", "value")]


class StepCache:
    """Duck-typed ``cache`` for one decode step over per-layer pasts of different lengths.

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
                cache=cache,
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


class BufferedDecodeModule(nn.Module):
    """One decode step of ``decoder_lm`` over per-layer in-place KV buffers (see module docstring).

    The installed layers run as they are, with the attention implementation switched to the fused
    step for the call (rotary is the model's own, at the caller's position ids)."""

    def __init__(self, decoder_lm: nn.Module):
        super().__init__()
        check_decoder(decoder_lm)
        gqa.register()
        self.lm = decoder_lm
        self.num_layers = int(decoder_lm.config.num_hidden_layers)

    def forward(self, inputs_embeds, position_ids, *past):
        n = self.num_layers
        if len(past) != 3 * n:
            raise InputError(f"BufferedDecodeModule: expected {3 * n} past tensors (key, value, length per layer), "
                             f"got {len(past)}")
        model = self.lm.model
        buf = gqa.Buffers(past[0::3], past[1::3], past[2::3])
        x = inputs_embeds
        cos, sin = model.rotary_emb(x, position_ids=position_ids)
        cfg = self.lm.config
        impl = cfg._attn_implementation
        cfg._attn_implementation = gqa.ATTN_NAME
        try:
            for layer in model.layers[:n]:
                x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=position_ids,
                          cache=None, use_cache=False, kv_buffers=buf)
                if isinstance(x, tuple):
                    x = x[0]
        finally:
            cfg._attn_implementation = impl
        missing = [i for i, p in enumerate(buf.present) if p is None]
        if missing:
            raise NotImplementedError(f"layer {missing[0]}'s attention does not go through transformers' attention "
                                      "interface, so it cannot be fused")
        x = model.norm(x)
        out = [self.lm.lm_head(x[:, -1])]
        for k, v in buf.present:
            out += [k, v]
        return tuple(out)


# ----------------------------------------------------------------------------- ONNX export


def example_decode_feeds(decoder_lm, batch: int = 2, past_lengths: Sequence[int] | None = None, seed: int = 0,
                         buffered: bool = False) -> dict:
    """Random decode inputs with distinct per-layer past lengths (so export keeps them separate);
    ``buffered``: :class:`BufferedDecodeModule`'s, the lengths being buffer capacities and rows
    holding different valid lengths."""
    a = from_config(decoder_lm.config)
    n = a["num_layers"]
    past_lengths = list(past_lengths or [batch + (5 if buffered else 3) + 2 * i for i in range(n)])
    g = torch.Generator().manual_seed(seed)
    dt = decoder_lm.dtype  # the past and the new embedding in the precision the decoder runs in
    feeds = {
        "inputs_embeds": torch.randn(batch, 1, a["hidden"], generator=g).to(dt),
        "position_ids": spec_for(decoder_lm).example_decode_positions(batch, max(past_lengths)),
    }
    for i, p in enumerate(past_lengths):
        feeds[f"past_key.{i}"] = torch.randn(batch, a["kv_heads"], p, a["head_dim"], generator=g).to(dt)
        feeds[f"past_value.{i}"] = torch.randn(batch, a["kv_heads"], p, a["head_dim"], generator=g).to(dt)
        if buffered:
            feeds[f"past_length.{i}"] = torch.tensor([p - 1 - (b % 3) for b in range(batch)], dtype=torch.int32)
        else:
            m = torch.ones(batch, p, dtype=torch.bool)
            m[0, 0] = False
            feeds[f"past_mask.{i}"] = m
    return feeds


def _check_example_feeds(feeds: dict, n: int, buffered: bool = False) -> list[torch.Tensor]:
    names = buffered_input_names(n) if buffered else decode_input_names(n)
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


def _name_dims(model, n: int, prefix: str = "past_") -> None:
    """Rename the exporter's symbolic dims (s12, s12 + 1, ...) to batch / past_{i} (buffered graph:
    capacity_{i}) on every value."""
    names = {}
    for v in model.graph.inputs:
        dims = list(v.shape) if v.shape is not None else []
        if dims and isinstance(dims[0], ir.SymbolicDim) and dims[0].value:
            names.setdefault(dims[0].value, "batch")
        axis = {"past_key": 2, "past_value": 2, "past_mask": 1}.get(v.name.split(".")[0])
        if axis is not None and len(dims) > axis and isinstance(dims[axis], ir.SymbolicDim) and dims[axis].value:
            names.setdefault(dims[axis].value, prefix + v.name.split(".")[1])
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


def export_decode(decoder_lm, path: str, example_feeds: dict | None = None, *, opset: int | None = None,
                  external_data_threshold: int = 1024, optimize: bool = True, check: bool = True, weights=None,
                  quantize=None, buffered: bool | None = None) -> ExportResult:
    """Export one decode step to ``path`` (.onnx, weights in ``<name>.onnx.data``) with dynamic batch
    and one dynamic length per layer; ``weights`` / ``quantize``: see
    :func:`adatoken_compile.compiler.export.export`.

    ``buffered`` True: :class:`BufferedDecodeModule` (in-place buffers, fused attention; dims
    ``capacity_{i}``); False: :class:`DecodeModule` (concatenated caches; dims ``past_{i}``); None
    (default): buffered unless the decoder computes in bfloat16 (onnxruntime's CPU provider has no
    bfloat16 GroupQueryAttention, and such a graph's float32 boundary would convert the whole cache
    every step) or its attention cannot be fused, then concatenated."""
    decoder_lm.eval()
    n = int(decoder_lm.config.num_hidden_layers)
    if buffered is None:
        if decoder_lm.dtype == torch.bfloat16:
            buffered = False
        else:
            try:
                return export_decode(decoder_lm, path, example_feeds, opset=opset,
                                     external_data_threshold=external_data_threshold, optimize=optimize, check=check,
                                     weights=weights, quantize=quantize, buffered=True)
            except NotImplementedError:
                buffered = False
    if buffered:
        mod = BufferedDecodeModule(decoder_lm).eval()
        feeds = example_feeds if example_feeds is not None else example_decode_feeds(decoder_lm, buffered=True)
        in_names, out_names = buffered_input_names(n), buffered_output_names(n)
    else:
        mod = DecodeModule(decoder_lm).eval()
        feeds = example_feeds if example_feeds is not None else example_decode_feeds(decoder_lm)
        in_names, out_names = decode_input_names(n), decode_output_names(n)
    args = tuple(_check_example_feeds(feeds, n, buffered))
    batch = torch.export.Dim("batch", min=1, max=1024)
    # Dim.DYNAMIC, not a named Dim: GQA's repeat_kv adds a (true) guard on the past length that a named
    # Dim's strict range check rejects; the ONNX dims are renamed past_{i} / capacity_{i} afterwards
    dims = [torch.export.Dim.DYNAMIC(min=2, max=1 << 17) for _ in range(n)]
    spec = []
    for i in range(n):
        third = {0: batch} if buffered else {0: batch, 1: dims[i]}  # past_length (B,) / past_mask (B, P)
        spec += [{0: batch, 2: dims[i]}, {0: batch, 2: dims[i]}, third]
    pos_batch_axis = spec_for(decoder_lm).position_axes("decode_position_ids")[0]
    dyn = ({0: batch}, {pos_batch_axis: batch}, tuple(spec))  # *past is one varargs entry
    prefix = "capacity_" if buffered else "past_"
    res = export(mod, args, dyn, path, in_names, out_names, opset=opset, external_data_threshold=external_data_threshold,
                 optimize=optimize, check=check, postprocess=lambda model: _name_dims(model, n, prefix),
                 weights=weights, quantize=quantize, translations=gqa.TRANSLATIONS if buffered else None,
                 fusions=spec_for(decoder_lm).ort_fusions(decoder_lm))
    if res.input_names != in_names or res.output_names != out_names:
        raise RuntimeError(f"export_decode: unexpected graph I/O names {res.input_names} / {res.output_names}")
    return res
