"""Fused decode-step attention over a KV buffer updated in place: a torch custom op that exports as
onnxruntime's ``com.microsoft.GroupQueryAttention``.

``gqa_step(query (B,1,Hq*D), key (B,1,Hk*D), value (B,1,Hk*D), past_key (B,Hk,C,D), past_value,
past_length (B,) int32, num_heads, kv_heads, scale) -> (out (B,1,Hq*D), present_key, present_value)``

Row ``b`` of a layer's buffer holds its valid (kept) positions in slots ``0..past_length[b]-1``;
the new key/value go to slot ``past_length[b]`` and the query attends over slots
``0..past_length[b]`` (GroupQueryAttention's ``seqlens_k`` is exactly ``past_length``: total length
minus one). ``present_*`` have the buffer's shape: onnxruntime writes the new position into the
buffer itself when the caller binds ``past_key`` and ``present_key`` to the same memory
(``past_present_share_buffer``), so no cache is copied. Keys arrive with rotary already applied
(at the caller's position ids, which for a pruned layer are not slot indices), so the op's own
rotary stays off (``do_rotary`` 0).

In PyTorch the op computes the same thing functionally (a fresh buffer with the slot written): the
reference the ONNX graph is tested against. :func:`attention` is the transformers attention
function that routes a decoder layer's attention through it (registered as ``ATTN_NAME``).
"""

from __future__ import annotations

import onnx_ir as ir
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

ATTN_NAME = "adatoken_gqa_step"


@torch.library.custom_op("adatoken::gqa_step", mutates_args=())
def gqa_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
             past_value: torch.Tensor, past_length: torch.Tensor, num_heads: int, kv_heads: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, S, _ = query.shape
    if S != 1:
        raise ValueError(f"gqa_step: one new token per row, got {S}")
    C, D = past_key.shape[2], past_key.shape[3]
    slot = past_length.to(torch.int64)
    rows = torch.arange(B)
    pk, pv = past_key.clone(), past_value.clone()
    pk[rows, :, slot] = key.reshape(B, kv_heads, D).to(pk.dtype)
    pv[rows, :, slot] = value.reshape(B, kv_heads, D).to(pv.dtype)
    valid = torch.arange(C)[None, :] <= slot[:, None]  # (B, C)
    rep = num_heads // kv_heads
    q = query.reshape(B, num_heads, 1, D).float()
    k = pk.float().repeat_interleave(rep, 1)
    v = pv.float().repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ v  # (B, Hq, 1, D)
    return out.transpose(1, 2).reshape(B, 1, num_heads * D).to(query.dtype), pk, pv


@gqa_step.register_fake
def _(query, key, value, past_key, past_value, past_length, num_heads, kv_heads, scale):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _schema() -> OpSchema:
    P = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[P("query", "T"), P("key", "T"), P("value", "T"), P("past_key", "T"), P("past_value", "T"),
                P("seqlens_k", "M"), P("total_sequence_length", "M")],
        outputs=[P("output", "T"), P("present_key", "T"), P("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=[attr("num_heads", OpSchema.AttrType.INT, ""), attr("kv_num_heads", OpSchema.AttrType.INT, ""),
                    attr("scale", OpSchema.AttrType.FLOAT, "")])


# the exporter builds nodes from a schema; onnx knows none for the com.microsoft domain
_GQA = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _schema())


def gqa_step_onnx(query, key, value, past_key, past_value, past_length, num_heads: int, kv_heads: int, scale: float):
    # total_sequence_length: the longest row after this step (a scalar the op requires)
    total = op.Add(op.ReduceMax(past_length, keepdims=0), op.Constant(value=ir.tensor(1, dtype=ir.DataType.INT32)))
    return _GQA(query, key, value, past_key, past_value, past_length, total, num_heads=num_heads,
                kv_num_heads=kv_heads, scale=scale)


TRANSLATIONS = {torch.ops.adatoken.gqa_step.default: gqa_step_onnx}


class Buffers:
    """Per-layer buffers of one step, read by :func:`attention` (by the module's ``layer_idx``),
    and the presents it returns."""

    def __init__(self, keys, values, lengths):
        self.keys, self.values, self.lengths = list(keys), list(values), list(lengths)
        self.present: list[tuple | None] = [None] * len(self.keys)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: one new token against the layer's in-place buffer.
    ``query`` / ``key`` / ``value``: (B, heads, 1, D) with rotary applied; ``kwargs['kv_buffers']``
    the step's :class:`Buffers`."""
    buf = kwargs.get("kv_buffers")
    if not isinstance(buf, Buffers):
        raise RuntimeError(f"{ATTN_NAME}: called without kv_buffers (only the buffered decode step uses it)")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{ATTN_NAME}: attention with {name} is not fused")
    i = module.layer_idx
    B, Hq, S, D = query.shape
    Hk = key.shape[1]
    scale = float(scaling if scaling is not None else D ** -0.5)
    q = query.transpose(1, 2).reshape(B, S, Hq * D)
    k = key.transpose(1, 2).reshape(B, S, Hk * D)
    v = value.transpose(1, 2).reshape(B, S, Hk * D)
    out, pk, pv = torch.ops.adatoken.gqa_step(q, k, v, buf.keys[i], buf.values[i], buf.lengths[i], Hq, Hk, scale)
    buf.present[i] = (pk, pv)
    return out.reshape(B, S, Hq, D), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, attention)
