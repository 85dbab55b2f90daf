"""ONNX Runtime's fused decoder ops, matched in an exported decoder graph (prefill or decode step).

A transformers decoder exports RMSNorm as Pow / ReduceMean / Add / Sqrt / Reciprocal / Mul / Mul and
rotary as Slice / Neg / Concat / Mul / Add on both halves of every query and key; onnxruntime's
optimizer fuses neither, so one decode step ran ~450 nodes where ONNX Runtime GenAI's model builder
writes ~100, and the per-node cost (kernel launch, small buffers) was most of the step's gap to it.
These rewrites put onnxruntime's own ops in their place, with the same arithmetic:

* ``SimplifiedLayerNormalization`` / ``com.microsoft.SkipSimplifiedLayerNormalization`` (the
  residual add folded in): onnxscript's ORT fusions;
* ``com.microsoft.RotaryEmbedding`` at the graph's own ``position_ids``: onnxscript finds the
  rotate-half pattern; the cos / sin inputs are matched back to ``position_ids`` and replaced
  by constant tables of ``max_positions`` rows (a position is looked up, not recomputed). A
  rotary whose cos / sin come from anything else (a cut's gathered rows, M-RoPE) keeps its
  original nodes. Where the rotated tensor is only reshaped back to ``(B, S, heads*D)`` (the
  decode step's query and key before GroupQueryAttention), the op takes that 3-D form directly
  and the Reshape / Transpose pairs around it go.
* the lm_head's ``Gemm(x, W, transB=1)`` -> ``MatMul(x, W.T)`` (onnxruntime's CPU Gemm with
  transB is the slower kernel for a few rows);
* a decode step's query and key rotated at ``position_ids`` just before ``GroupQueryAttention``,
  all three cut from one packed q/k/v MatMul: the op takes the packed tensor and rotates at those
  same positions itself (``do_rotary`` with its ``position_ids`` input), as ONNX Runtime GenAI's
  graphs do; the Split, both RotaryEmbeddings and the value's Reshape go. Only for one new token
  per row: for a prompt the op reads a row's first position and counts on from it, which a
  left-padded or pruned prompt's positions do not do.

Positions must stay below ``max_positions`` (the runtime refuses longer prompts plus budgets).
Graphs in bfloat16 are left alone: onnxruntime's CPU provider has none of these ops in bfloat16.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

from .weights import gemm_as_matmul

_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate RotaryEmbedding functions


def _freqs(op, position_ids, inv_freq):
    # transformers' rotary_emb for (B, S) positions as exported: (B, S, 1) float * inv_freq (E,)
    pos = op.Cast(op.Unsqueeze(position_ids, [2]), to=ir.DataType.FLOAT)
    half = op.Mul(pos, inv_freq)
    return op.Concat(half, half, axis=-1)


class RotaryFromPositions(pattern.RewriteRuleClassBase):
    """onnxscript's RotaryEmbedding function (x, cos (B,1,S,D), sin) whose tables are computed from
    ``position_ids`` -> ``com.microsoft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache)``."""

    def __init__(self, name: str, max_positions: int, cast: bool):
        super().__init__(name, remove_nodes=False)  # cos / sin are shared by every layer
        self.max_positions = int(max_positions)
        self.cast = cast
        self._tables: dict = {}

    def pattern(self, op, x, position_ids, inv_freq, dtype):
        emb = _freqs(op, position_ids, inv_freq)
        cos, sin = op.Cos(emb), op.Sin(emb)
        if self.cast:
            cos, sin = op.Cast(cos, to=dtype), op.Cast(sin, to=dtype)
        return op.RotaryEmbedding(x, op.Unsqueeze(cos, [1]), op.Unsqueeze(sin, [1]), _allow_other_attributes=True,
                                  _domain=_FUSION_DOMAIN)

    def check(self, context, x, position_ids, inv_freq, **_) -> pattern.MatchResult:
        res = pattern.MatchResult()
        if position_ids.dtype != ir.DataType.INT64 or not _ir_utils.has_rank(position_ids, 2):
            return res.fail("position_ids is not (B, S) int64", position_ids)
        if inv_freq.const_value is None or inv_freq.const_value.size * 2 != (x.shape[-1] if x.shape else -1):
            return res.fail("inv_freq is not a constant of half the head size", inv_freq)
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return res.fail("x is neither float32 nor float16", x)
        return res

    def rewrite(self, op, x, position_ids, inv_freq, **_):
        key = (id(inv_freq), x.dtype)
        if key not in self._tables:
            freqs = np.arange(self.max_positions, dtype=np.float32)[:, None] * inv_freq.const_value.numpy().reshape(1, -1)
            np_dtype, n = x.dtype.numpy(), len(self._tables)
            self._tables[key] = (op.initializer(ir.tensor(np.cos(freqs).astype(np_dtype)), name=f"rotary_cos_cache_{n}"),
                                 op.initializer(ir.tensor(np.sin(freqs).astype(np_dtype)), name=f"rotary_sin_cache_{n}"))
        cos, sin = self._tables[key]
        return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=0, _domain="com.microsoft")


class Rotary3D(pattern.RewriteRuleClassBase):
    """Reshape(Transpose(RotaryEmbedding(Transpose(Reshape(x (B,S,N*D))))))) -> RotaryEmbedding(x,
    num_heads=N): the op rotates the (B, S, N*D) layout itself."""

    def pattern(self, op, x, shape_in, shape_out, position_ids, cos, sin):
        heads = op.Transpose(op.Reshape(x, shape_in, _allow_other_attributes=True), perm=[0, 2, 1, 3])
        rot = op.RotaryEmbedding(heads, position_ids, cos, sin, _allow_other_attributes=True, _domain="com.microsoft",
                                 _outputs=["rot"])
        return op.Reshape(op.Transpose(rot, perm=[0, 2, 1, 3]), shape_out, _allow_other_attributes=True,
                          _outputs=["out"])

    def check(self, context, x, rot, out, **_) -> pattern.MatchResult:
        res = pattern.MatchResult()
        if not (_ir_utils.has_rank(x, 3) and _ir_utils.has_rank(rot, 4)):
            return res.fail("not (B,S,N*D) <-> (B,N,S,D)", x)
        n, d = rot.shape[1], rot.shape[3]
        if not (isinstance(n, int) and isinstance(d, int) and x.shape[2] == n * d):
            return res.fail("head count or size unknown", rot)
        if (out.shape is None or out.shape.rank() != 3 or out.shape[2] != n * d):
            return res.fail("the result is not (B, S, N*D)", out)
        return res

    def rewrite(self, op, x, position_ids, cos, sin, rot, **_):
        return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=0, num_heads=int(rot.shape[1]),
                                  _domain="com.microsoft")


class UnfuseLoneRMSNorm(pattern.RewriteRuleClassBase):
    """An RMSNorm left without a residual add to fold in goes back to the primitive ops:
    onnxruntime registers ``SimplifiedLayerNormalization`` in the ONNX domain, where the ONNX
    checker knows no such op (its ``Skip`` form is in ``com.microsoft``, which the checker skips)."""

    def pattern(self, op, x, scale):
        return op.SimplifiedLayerNormalization(x, scale, _allow_other_attributes=True, _outputs=["y"])

    def rewrite(self, op, x, scale, y, **_):
        node = y.producer()
        eps = node.attributes.get_float("epsilon", 1e-5)
        stash = ir.DataType(node.attributes.get_int("stash_type", ir.DataType.FLOAT))
        h = x if x.dtype == stash else op.Cast(x, to=stash)
        var = op.ReduceMean(op.Mul(h, h), op.Constant(value_ints=[-1]), keepdims=1)
        inv = op.Reciprocal(op.Sqrt(op.Add(var, op.Constant(value=ir.tensor(np.array(eps, stash.numpy()))))))
        normed = op.Mul(h, inv)
        if normed.dtype != x.dtype and x.dtype is not None:
            normed = op.Cast(normed, to=x.dtype)
        return op.Mul(scale, normed)


def _side_by_side(g: ir.Graph, name: str, values: list[ir.Value]) -> ir.Value:
    """An initializer ``name`` of the constants ``values`` concatenated along their last axis, built
    when the model is written (like the transposed weights, :mod:`adatoken_compile.compiler.weights`)."""
    tensors = [v.const_value for v in values]
    shape = ir.Shape([*values[0].shape[:-1], sum(int(v.shape[-1]) for v in values)])

    def value():
        return ir.Tensor(np.concatenate([np.asarray(t.numpy()) for t in tensors], axis=-1), name=name)

    packed = ir.Value(name=name, shape=shape, type=ir.TensorType(values[0].dtype),
                      const_value=ir.LazyTensor(value, dtype=values[0].dtype, shape=shape, name=name))
    g.register_initializer(packed)
    return packed


def _drop_unread(g: ir.Graph, values: list[ir.Value]) -> None:
    """The initializers of ``values`` that nothing reads any more leave the graph."""
    for v in values:
        if not v.uses() and v.name in g.initializers:
            g.initializers.pop(v.name)


def pack_sibling_matmuls(model: ir.Model) -> int:
    """MatMuls of one input by constant 2-D weights (a layer's q / k / v projections, its gate /
    up projections) -> one MatMul by the weights side by side, then Split: one kernel (one
    MatMulNBits once quantised) instead of two or three. The packed weight is built when the model
    is written, like the transposed weights (:mod:`adatoken_compile.compiler.weights`). Returns how
    many MatMuls went."""
    g = model.graph
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in g:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        x, w = node.inputs
        if (x is None or w is None or not w.is_initializer() or w.const_value is None or w.shape is None
                or len(w.shape) != 2 or not all(isinstance(d, int) for d in w.shape)):
            continue
        groups.setdefault(x, []).append(node)
    removed = 0
    for x, nodes in groups.items():
        ws = [n.inputs[1] for n in nodes]
        if len(nodes) < 2 or len({(w.shape[0], w.dtype) for w in ws}) != 1:
            continue
        widths = [int(w.shape[1]) for w in ws]
        name = ws[0].name + ".packed"
        packed = _side_by_side(g, name, ws)
        sizes = ir.Value(name=name + ".split", shape=ir.Shape([len(widths)]), type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(np.asarray(widths, np.int64), name=name + ".split"))
        g.register_initializer(sizes)
        mm = ir.node("MatMul", [x, packed], name=nodes[0].name + "/packed")
        split = ir.node("Split", [mm.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(nodes),
                        name=nodes[0].name + "/unpack")
        g.insert_before(nodes[0], [mm, split])
        for old, new in zip(nodes, split.outputs):
            new.shape, new.type = old.outputs[0].shape, old.outputs[0].type
            old.outputs[0].replace_all_uses_with(new)
            if old.outputs[0].is_graph_output():
                raise RuntimeError("pack_sibling_matmuls: a packed MatMul's output is a graph output")
            g.remove(old, safe=True)
        _drop_unread(g, ws)
        removed += len(nodes) - 1
    return removed


def pack_split_biases(model: ir.Model) -> int:
    """A Split whose every output gets its own constant bias added (Qwen2's q / k / v after
    :func:`pack_sibling_matmuls`) -> one Add of the biases side by side before the Split: one node
    for three, and the packed q / k / v stay one tensor for :func:`fold_rotary_into_gqa`. Returns
    how many Splits were changed."""
    g = model.graph
    changed = 0
    for split in list(g):
        if split.op_type != "Split" or split.domain not in ("", "ai.onnx") or split.inputs[0] is None \
                or split.attributes.get_int("axis", 0) not in (-1, len(split.inputs[0].shape or []) - 1):
            continue
        adds = [_bias_add(out) for out in split.outputs]
        if not adds or None in adds:
            continue
        biases = [b for _, b in adds]
        add = ir.node("Add", [split.inputs[0], _side_by_side(g, split.name + ".bias", biases)],
                      name=split.name + ".bias/add")
        add.outputs[0].shape, add.outputs[0].type = split.inputs[0].shape, split.inputs[0].type
        g.insert_before(split, add)
        split.replace_input_with(0, add.outputs[0])
        for out, (node, _) in zip(split.outputs, adds):
            node.outputs[0].replace_all_uses_with(out)
        g.remove([n for n, _ in adds], safe=True)
        _drop_unread(g, biases)
        changed += 1
    return changed


def _bias_add(out: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    """(the Add, its constant 1-D bias) when ``out``'s only reader adds such a bias of its width."""
    users = list(out.uses())
    node = users[0].node if len(users) == 1 else None
    if out.is_graph_output() or node is None or node.op_type != "Add" or node.domain not in ("", "ai.onnx") \
            or len(node.inputs) != 2:
        return None
    bias = node.inputs[1 - users[0].idx]
    if (bias is None or bias.const_value is None or bias.shape is None or len(bias.shape) != 1 or out.shape is None
            or bias.shape[0] != out.shape[-1]):
        return None
    return node, bias


def _through_reshapes(v: ir.Value) -> tuple[ir.Value | None, list[ir.Node]]:
    """The value ``v`` is reshaped from, back through Reshapes to one of the same (B, S, width) shape
    (the value's head split and merge around attention), and those Reshapes; (None, []) if there is
    none."""
    nodes, src = [], v
    while (node := src.producer()) is not None and node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
        nodes.append(node)
        src = node.inputs[0]
        if src is None:
            return None, []
    if nodes and (src.shape is None or v.shape is None or src.shape != v.shape or len(v.shape) != 3):
        return None, []
    return src, nodes


def fold_rotary_into_gqa(model: ir.Model) -> int:
    """The decode step's RotaryEmbedding pairs into GroupQueryAttention (module docstring). Returns
    how many attention nodes now rotate themselves."""
    g = model.graph
    folded = 0
    for node in list(g):
        if (node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.inputs) != 7
                or node.attributes.get_int("do_rotary", 0)):
            continue
        q, k, v = node.inputs[:3]
        rq, rk = (x.producer() if x is not None else None for x in (q, k))
        if not all(r is not None and r.op_type == "RotaryEmbedding" and r.domain == "com.microsoft"
                   and not r.attributes.get_int("interleaved", 0) for r in (rq, rk)):
            continue
        if list(rq.inputs[1:]) != list(rk.inputs[1:]) or len(rq.inputs) != 4:
            continue  # one position_ids and one pair of tables for both
        heads, kv_heads = node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")
        if rq.attributes.get_int("num_heads", 0) != heads or rk.attributes.get_int("num_heads", 0) != kv_heads:
            continue
        xv, reshapes = _through_reshapes(v)
        split = rq.inputs[0].producer()
        if (split is None or split.op_type != "Split" or xv is None or list(split.outputs) != [rq.inputs[0], rk.inputs[0], xv]
                or q.shape is None or len(q.shape) != 3 or q.shape[1] != 1):
            continue
        chain = [rq, rk, split] + reshapes
        outs = [o for n in chain for o in n.outputs]
        if any(o.is_graph_output() or any(u.node not in chain + [node] for u in o.uses()) for o in outs):
            continue
        pos, cos, sin = rq.inputs[1:]
        gqa = ir.node("GroupQueryAttention", [split.inputs[0], None, None, *node.inputs[3:], cos, sin, pos],
                      attributes={**{a.name: a for a in node.attributes.values()}, "do_rotary": 1},
                      domain="com.microsoft", num_outputs=len(node.outputs), name=node.name)
        g.insert_before(node, gqa)
        for old, new in zip(node.outputs, gqa.outputs):
            new.shape, new.type, new.name = old.shape, old.type, old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        g.remove([node, *chain], safe=True)
        folded += 1
    return folded


def _is_bfloat16(model: ir.Model) -> bool:
    return any(v.dtype == ir.DataType.BFLOAT16 for v in model.graph.initializers.values())


def fuse_decoder(model: ir.Model, max_positions: int | None) -> dict[str, int]:
    """Rewrite ``model`` in place with onnxruntime's fused ops (module docstring); returns how many
    of each were put in. ``max_positions``: rows of the rotary tables (None: rotary left as is)."""
    if _is_bfloat16(model):
        return {}
    counts = {"packed_matmuls": pack_sibling_matmuls(model), "packed_biases": pack_split_biases(model)}
    # the lm_head exports as Gemm(transB=1): onnxruntime's CPU Gemm over the (vocab, hidden) weight
    # runs one token's logits ~20% slower than MatMul over its transpose
    counts["gemm_as_matmul"] = sum(gemm_as_matmul(model.graph, n) is not None
                                   for n in list(model.graph) if n.op_type == "Gemm" and n.domain in ("", "ai.onnx"))
    shapes = common_passes.ShapeInferencePass()
    shapes(model)
    counts["rms_norm"] = fuse_rms_normalization(model)
    shapes(model)
    counts["skip_rms_norm"] = fuse_skip_rms_normalization(model)
    counts["rotary"] = counts["rotary_3d"] = 0
    if max_positions:
        shapes(model)
        if fuse_rotary_embedding(model):
            rules = pattern.RewriteRuleSet([RotaryFromPositions.rule("RotaryFromPositions", max_positions, cast=False),
                                            RotaryFromPositions.rule("RotaryFromPositionsCast", max_positions, cast=True)])
            counts["rotary"] = rules.apply_to_model(model)
            shapes(model)
            counts["rotary_3d"] = pattern.RewriteRuleSet([Rotary3D.rule()]).apply_to_model(model)
            counts["rotary_in_attention"] = fold_rotary_into_gqa(model)
    pattern.RewriteRuleSet([UnfuseLoneRMSNorm.rule()]).apply_to_model(model)
    # onnxscript's rotary functions left unmatched are inlined back; unused nodes and functions go
    optimize(model)
    common_passes.RemoveUnusedFunctionsPass()(model)
    return counts
