"""Fused attention in the exported prefill: ``com.microsoft.GroupQueryAttention``.

The torch exporter lowers ``scaled_dot_product_attention`` to MatMul + Softmax + IsNaN + Where,
fed by ``repeat_kv``'s Expand, which copies every key and value ``num_heads / kv_heads`` times:
about half of a float32 prefill's kernel time. :func:`fuse_attention` rewrites a captured (or
pruned) prefill before export: each ``sdpa(q, repeat_kv(k), repeat_kv(v), mask)`` becomes
:func:`gqa_attention` on the un-repeated keys and values, an op whose ONNX translation
(:data:`ONNX_TRANSLATIONS`) is one ``GroupQueryAttention`` node (float32 and float16, CPU and
CUDA kernels in onnxruntime). Why this op and not ``MultiHeadAttention`` (needs the repeated
keys) or ONNX ``Attention`` (opset 23): docs/design.md "Fused attention".

What the rewrite keeps, so the pruned graph's semantics do not change:

* rotary stays the model's own, applied before the op at each token's original position (the
  cos/sin the token-drop pass gathered at every cut); the op's ``do_rotary`` is off, since after a
  cut the kept keys are not contiguous in position and a rotary by sequence index would be wrong;
* the (B, 1, L, L) boolean mask becomes one additive bias per mask value (shared by the layers
  that read it), so left padding and the masks the pass rebuilds at each cut hold exactly; the
  op's own causal masking by index agrees with it because kept tokens stay in ascending order;
* the layer's key/value outputs and the query the cuts score with are the values before the op:
  the scoring rows and ``key.i`` / ``value.i`` are untouched.

The rewrite applies only where the pattern is exactly the one above; any other attention (eager
matmuls, a bfloat16 graph, for which onnxruntime's CPU kernel does not exist) is exported as before.
"""

from __future__ import annotations

import torch
import torch.fx as fx

FUSED_DTYPES = (torch.float32, torch.float16)
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


@torch.library.custom_op("adatoken::gqa_attention", mutates_args=())
def gqa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                  num_heads: int, kv_num_heads: int, scale: float) -> torch.Tensor:
    """Grouped-query attention, (B, N, S, H) query, (B, kv, S, H) key/value, (B, 1, S, S) additive
    bias -> (B, N, S, H): what ``GroupQueryAttention`` computes, in torch for the FX graph."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale,
                                                            enable_gqa=num_heads != kv_num_heads)


@gqa_attention.register_fake
def _gqa_attention_fake(query, key, value, bias, num_heads, kv_num_heads, scale):
    return torch.empty_like(query)


_MSFT = "com.microsoft"
# onnxruntime's contrib-op signature (inputs, outputs, attributes, in its order), declared to onnx so
# that onnxscript can emit the node; the onnx package itself knows no com.microsoft operator
_GQA_INPUTS = (("query", "T", False), ("key", "T", True), ("value", "T", True), ("past_key", "T_CACHE", True),
               ("past_value", "T_CACHE", True), ("seqlens_k", "M", False), ("total_sequence_length", "M", False),
               ("cos_cache", "T", True), ("sin_cache", "T", True), ("position_ids", "tensor(int64)", True),
               ("attention_bias", "T", True), ("head_sink", "T", True), ("k_scale", "T_KV_SCALE", True),
               ("v_scale", "T_KV_SCALE", True), ("q_norm_weight", "T", True), ("k_norm_weight", "T", True),
               ("query_seqlens", "M", True))
# the op's fourth output (output_qk) is left out of the declaration: a node that names it runs the
# CPU kernel's slower path (the heads split into two fixed halves, not one task per head)
_GQA_OUTPUTS = (("output", "T", False), ("present_key", "T_CACHE", True), ("present_value", "T_CACHE", True))
_GQA_ATTRS = {"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT", "softcap": "FLOAT", "do_rotary": "INT",
              "rotary_interleaved": "INT", "local_window_size": "INT", "causal": "INT", "smooth_softmax": "INT",
              "qk_output": "INT", "kv_cache_bit_width": "INT", "sliding_window_cache": "INT",
              "k_quant_type": "STRING", "v_quant_type": "STRING", "k_norm_epsilon": "FLOAT",
              "q_norm_epsilon": "FLOAT", "qk_norm_epsilon": "FLOAT"}
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _declare_gqa() -> None:
    import onnx.defs as defs

    if defs.has("GroupQueryAttention", _MSFT):
        return
    opt = defs.OpSchema.FormalParameterOption
    attr_t = defs.OpSchema.AttrType

    def params(rows):
        return [defs.OpSchema.FormalParameter(n, t, "", param_option=opt.Optional if o else opt.Single)
                for n, t, o in rows]

    defs.register_schema(defs.OpSchema(
        "GroupQueryAttention", _MSFT, 1, inputs=params(_GQA_INPUTS), outputs=params(_GQA_OUTPUTS),
        type_constraints=[("T", _FLOATS, ""), ("T_CACHE", _FLOATS + ["tensor(uint8)", "tensor(int8)"], ""),
                          ("T_KV_SCALE", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[defs.OpSchema.Attribute(n, getattr(attr_t, t), "", required=n in ("num_heads", "kv_num_heads"))
                    for n, t in _GQA_ATTRS.items()]))


def _gqa_onnx(query, key, value, bias, num_heads: int, kv_num_heads: int, scale: float):
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    _declare_gqa()
    msft = Opset(_MSFT, 1)
    to_bsd = op.Constant(value_ints=[0, 0, -1])

    def bsd(x):  # (B, n, S, H) -> (B, S, n*H), the op's packed layout
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), to_bsd)

    # sizes read off the value: a query read only by the op lets its rotary take the packed layout
    # (adatoken_compile.compiler.fusions), with no transposes around it
    seq = op.Shape(value, start=2, end=3)
    batch = op.Shape(value, start=0, end=1)
    # no past: every row's last key index is S-1; padding is carried by the bias
    seqlens = op.Cast(op.Expand(op.Sub(seq, op.Constant(value_ints=[1])), batch), to=6)  # int32
    total = op.Cast(op.Squeeze(seq), to=6)
    # the presents (the keys and values again, BNSH) go unused: the layer's key/value outputs come from before the op
    out = msft.GroupQueryAttention(bsd(query), bsd(key), bsd(value), None, None, seqlens, total, None, None, None,
                                   bias, num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, do_rotary=0)[0]
    return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, num_heads, -1])), perm=[0, 2, 1, 3])


ONNX_TRANSLATIONS = {torch.ops.adatoken.gqa_attention.default: _gqa_onnx}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _unrepeated(node: fx.Node) -> fx.Node:
    """The (B, kv, S, H) tensor ``repeat_kv`` expanded into ``node`` (reshape(expand(unsqueeze(x, 2)))),
    or ``node`` itself when it is not a repeat."""
    ops = torch.ops.aten
    if node.op == "call_function" and node.target in (ops.reshape.default, ops.view.default):
        exp = node.args[0]
        if isinstance(exp, fx.Node) and exp.target == ops.expand.default:
            uns = exp.args[0]
            if isinstance(uns, fx.Node) and uns.target == ops.unsqueeze.default and uns.args[1] == 2:
                return uns.args[0]
    return node


def _plain_sdpa(node: fx.Node) -> bool:
    """sdpa with a mask and no dropout or implicit causal mask (the mask then says it all)."""
    extra = dict(zip(("dropout_p", "is_causal"), node.args[4:6]))
    extra.update({k: node.kwargs[k] for k in ("dropout_p", "is_causal") if k in node.kwargs})
    return not extra.get("dropout_p") and not extra.get("is_causal") and len(node.args) in (4, 5, 6)


def fused_copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` (weights shared, meta kept) with its attention fused; ``gm`` is unchanged."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    out_val, old_out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out_val, type_expr=old_out.type).meta = dict(old_out.meta)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new, fuse_attention(new)


def fuse_attention(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place (see module docstring); returns the number of attention ops fused."""
    g = gm.graph
    biases: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    fused = 0
    for node in list(g.nodes):
        if node.op != "call_function" or node.target != _SDPA or not _plain_sdpa(node):
            continue
        q, k, v, mask = node.args[:4]
        qv, mv = _val(q), _val(mask)
        if not (isinstance(qv, torch.Tensor) and isinstance(mv, torch.Tensor) and qv.dim() == 4
                and qv.dtype in FUSED_DTYPES and mv.dtype == torch.bool and mv.dim() == 4 and mv.shape[1] == 1):
            continue
        k0, v0 = _unrepeated(k), _unrepeated(v)
        kv0, vv0 = _val(k0), _val(v0)
        if not (isinstance(kv0, torch.Tensor) and isinstance(vv0, torch.Tensor) and kv0.shape[1] == vv0.shape[1]):
            continue
        heads, kv_heads = int(qv.shape[1]), int(kv0.shape[1])
        if heads % kv_heads or kv0.shape[-1] != qv.shape[-1]:
            continue
        scale = node.kwargs.get("scale")
        scale = float(scale) if scale is not None else float(qv.shape[-1]) ** -0.5
        if (mask, qv.dtype) not in biases:
            with g.inserting_after(mask):
                # finfo.min, not -inf: a fully masked padding row stays finite, as the decomposed
                # lowering's IsNaN guard makes it
                bias = g.call_function(torch.ops.aten.where.Scalar, (mask, 0.0, torch.finfo(qv.dtype).min))
            with g.inserting_after(bias):
                biases[(mask, qv.dtype)] = g.call_function(torch.ops.aten._to_copy.default, (bias,), {"dtype": qv.dtype})
        with g.inserting_before(node):
            new = g.call_function(torch.ops.adatoken.gqa_attention.default,
                                  (q, k0, v0, biases[(mask, qv.dtype)], heads, kv_heads, scale))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        fused += 1
    if fused:
        g.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (n.op == "call_module" and n.target == "_guards_fn"))
        g.lint()
        gm.recompile()
    return fused

