"""Token drop: the tensor math (score / select / gather) and the FX pass that inserts it.

Pure functions (no model classes; exportable: topk / scatter / gather only, no boolean indexing,
no nonzero, no sort):

* :func:`last_token_scores` -- attention probability the last position pays to every key, from a
  layer's post-RoPE queries and keys (GQA aware), softmax over the row's valid keys, mean over
  query heads. Only the one query row is used; nothing is read from the attention kernel.
* :func:`select_tokens` -- per row keep the non-spatial valid tokens plus the top-k spatial ones,
  ``k = clamp(ceil(keep * N0), 1, N_now)``; returns kept indices ascending with left padding,
  the new valid mask and the new length ``K'`` (max kept count over rows).
* :func:`gather_seq` / :func:`kept_positions` -- carry values with a sequence axis into the new
  layout; :func:`rebuild_mask4d` -- the attention mask of the new layout.

The FX pass :func:`apply_token_drop` rewrites a graph captured by
:func:`adatoken_compile.compiler.capture.capture`: for each effective cut before layer ``i`` it scores with
layer ``i-1``'s query (the first input of that layer's attention op) and the recorded cache key,
selects, and gathers every value that crosses from before the cut into layers ``>= i`` (hidden
state, 4-D mask on both axes, RoPE cos/sin, ...); SymInt uses of the sequence length become the
new length. Inserted steps are ``call_module`` nodes named ``adatoken_cut{c}_<role>`` so that a
re-export keeps them as a module scope (ONNX ``pkg.torch.onnx.name_scopes``) and
:mod:`adatoken_compile.compiler.export` can name the ONNX nodes after them.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

# ----------------------------------------------------------------------------- pure tensor math


def last_token_scores(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the last query position over all keys, mean over query heads.

    query: (B, Hq, Lq, d) post-RoPE queries (only ``[..., -1, :]`` is used);
    key: (B, Hkv, L, d) post-RoPE keys; query head h uses kv head ``h // (Hq // Hkv)``;
    valid: (B, L) bool, keys the row may attend to (padding / dropped tokens False).
    Returns (B, L) float32 (0 on invalid keys).
    """
    B, hq, _, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    q = query[:, :, -1, :].reshape(B, hkv, groups, d).float()
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * (1.0 / math.sqrt(d))  # (B, Hkv, g, L)
    logits = torch.where(valid[:, None, None, :], logits, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.mean(dim=(1, 2))


def random_scores(valid: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded pseudo-random scores for the ``random`` peer policy: (B, L) in [0, 1), 0 on invalid keys.

    An integer hash (multiply, xor-shift, multiply, xor-shift; int64 arithmetic mod 2^24, so
    PyTorch and ONNX Runtime agree exactly) of each token's rank among the row's valid tokens,
    so a row selects the same tokens whatever left padding it has. Each step is a bijection of
    [0, 2^24) and every such value is exact in float32, so distinct ranks never tie.
    """
    m = 16777216
    rank = torch.cumsum(valid.to(torch.int64), dim=1) - 1
    h = (rank * 3635633 + (int(seed) * 2246822519 + 374761393) % m) % m
    h = torch.bitwise_xor(h, h // 4096)
    h = (h * 73244475) % m
    h = torch.bitwise_xor(h, h // 4096)
    return torch.where(valid, h.to(torch.float32) / float(m), torch.zeros_like(h, dtype=torch.float32))


def score_for(scoring: dict, cut_index: int, query, key, valid) -> torch.Tensor:
    """The schedule's scoring rule at one cut (``scoring.query`` 'last_token' or 'random')."""
    if scoring.get("query") == "random":
        return random_scores(valid, int(scoring.get("seed", 0)) * 1000 + cut_index)
    return last_token_scores(query, key, valid)


def spatial_count(spatial: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) int64 number of spatial tokens per row (N0)."""
    return (spatial & valid).sum(dim=1)


def keep_millionths(keep: float) -> int:
    return int(round(float(keep) * 1_000_000))


def keep_counts(n0: torch.Tensor, n_now: torch.Tensor, keep: float) -> torch.Tensor:
    """k = clamp(ceil(keep * n0), 1, n_now) per row (0 where n_now == 0), in INTEGER arithmetic
    with keep in millionths, exactly as :meth:`adatoken_compile.schedule.Schedule.keep_count`
    (a float constant would be rounded to float32 in ONNX and could keep one token too many)."""
    num, den = keep_millionths(keep), 1_000_000
    k = (n0.to(torch.int64) * num + (den - 1)) // den
    return torch.minimum(torch.clamp(k, min=1), n_now)


def select_tokens(
    scores: torch.Tensor, valid: torch.Tensor, spatial: torch.Tensor, n0: torch.Tensor, keep: float
):
    """Choose the tokens a cut keeps.

    scores (B,L) float; valid / spatial (B,L) bool; n0 (B,) int64 original spatial counts.
    Returns ``(idx, new_valid, new_len)``: idx (B, K') int64 positions in the current layout,
    ascending, padding slots first (they point at dropped tokens and are False in new_valid);
    new_valid (B, K') bool; new_len = K' (int, an unbacked SymInt under export).
    """
    B, L = scores.shape
    cand = valid & spatial
    k = keep_counts(n0, cand.sum(dim=1), keep)
    masked = torch.where(cand, scores.float(), float("-inf"))
    order = torch.topk(masked, L, dim=1, largest=True, sorted=True).indices  # full ranking
    pos = torch.arange(L, device=scores.device).unsqueeze(0).expand(B, L)
    rank = torch.zeros_like(order).scatter(1, order, pos)
    keep_mask = (valid & ~spatial) | (cand & (rank < k[:, None]))
    new_len = keep_mask.sum(dim=1).max().item()
    torch._check(new_len >= 1)
    torch._check(new_len <= L)
    # kept tokens get keys L+j, others j: the K' largest are all kept tokens plus the latest dropped
    # ones as padding; descending then flipped -> padding first, kept ascending.
    order_key = torch.where(keep_mask, pos + L, pos).to(torch.float32)
    idx = torch.topk(order_key, new_len, dim=1, largest=True, sorted=True).indices.flip(1)
    new_valid = torch.gather(keep_mask, 1, idx)
    return idx, new_valid, new_len


def gather_seq(x: torch.Tensor, idx: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Gather ``x`` (batch on dim 0, size B or 1) with per-row indices idx (B, K') on each of ``dims``."""
    B, K = idx.shape
    x = x.expand(B, *x.shape[1:])
    for d in dims:
        view = [B] + [1] * (x.dim() - 1)
        view[d] = K
        target = list(x.shape)
        target[d] = K
        x = torch.gather(x, d, idx.reshape(view).expand(target))
    return x


def kept_positions(prev: torch.Tensor | None, idx: torch.Tensor, new_valid: torch.Tensor) -> torch.Tensor:
    """Original sequence positions of the new layout (B, K'), -1 on padding slots.
    ``prev`` are the original positions of the current layout (None before the first cut)."""
    orig = idx if prev is None else torch.gather(prev, 1, idx)
    return torch.where(new_valid, orig, torch.full_like(orig, -1))


def rebuild_mask4d(mask: torch.Tensor, idx: torch.Tensor, new_valid: torch.Tensor) -> torch.Tensor:
    """The (B, 1, K', K') attention mask of the new layout, in ``mask``'s format (bool for sdpa,
    additive float for eager), built from the new valid vector instead of gathering the
    (B, 1, L, L) input on both axes (O(K'^2) instead of an O(L^2) gather: the gather was the
    most expensive inserted node).

    Kept tokens are in ascending original order, so causality in the new layout is ``k <= q``;
    padding / dropped slots are masked as keys. Every query may attend to itself, so padding rows
    are never fully masked (a fully masked row would give NaN that reaches valid rows through
    0 * NaN in the value product). Equal, on valid rows, to gathering a causal + padding mask.
    """
    K = idx.shape[1]
    ar = torch.arange(K, device=idx.device)
    causal = ar[None, :] <= ar[:, None]  # [q, k]
    allowed = (causal[None] & new_valid[:, None, :].to(torch.bool)) | (ar[None, :] == ar[:, None])[None]
    allowed = allowed[:, None]
    if mask.dtype == torch.bool:
        return allowed
    zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
    return torch.where(allowed, zero, torch.full((), torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device))


# ----------------------------------------------------------------------------- step modules
# Each inserted graph step is a tiny module so that a re-export keeps it as a named scope.


class ValidMask(nn.Module):
    def forward(self, attention_mask):
        return attention_mask != 0


class SpatialCount(nn.Module):
    def forward(self, spatial, valid):
        return spatial_count(spatial, valid)


class Score(nn.Module):
    def __init__(self, scoring: dict | None = None, cut_index: int = 0):
        super().__init__()
        self.scoring = dict(scoring or {"query": "last_token"})
        self.cut_index = int(cut_index)

    def forward(self, query, key, valid):
        return score_for(self.scoring, self.cut_index, query, key, valid)

    def extra_repr(self):
        return f"query={self.scoring.get('query')}"


class Select(nn.Module):
    def __init__(self, keep: float):
        super().__init__()
        self.keep = float(keep)

    def forward(self, scores, valid, spatial, n0):
        return select_tokens(scores, valid, spatial, n0, self.keep)

    def extra_repr(self):
        return f"keep={self.keep}"


class GatherSeq(nn.Module):
    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = tuple(int(d) for d in dims)

    def forward(self, x, idx):
        return gather_seq(x, idx, self.dims)

    def extra_repr(self):
        return f"dims={self.dims}"


class RebuildMask4d(nn.Module):
    def forward(self, mask, idx, new_valid):
        return rebuild_mask4d(mask, idx, new_valid)


class KeptPositions(nn.Module):
    def forward(self, idx, new_valid, prev=None):
        return kept_positions(prev, idx, new_valid)


# ----------------------------------------------------------------------------- graph helpers

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_ATTN_TARGETS = {
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten.matmul.default,
    torch.nn.functional.scaled_dot_product_attention,
    torch.matmul,
}


class TokenDropError(RuntimeError):
    """The graph does not have the structure the pass needs (named in the message)."""


def layer_of(node: fx.Node) -> int | None:
    """Decoder layer index owning ``node`` (from nn_module_stack), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        m = _LAYER_RE.search(str(path))
        if m:
            return int(m.group(1))
    return None


def node_regions(graph: fx.Graph) -> dict[fx.Node, float]:
    """Layer index per node; nodes outside a layer take the max region of their inputs (-1 = before
    the first layer)."""
    region: dict[fx.Node, float] = {}
    for n in graph.nodes:
        if n.op == "output":
            continue
        li = layer_of(n) if n.op in ("call_function", "call_module", "call_method") else None
        if li is not None:
            region[n] = float(li)
        else:
            region[n] = max([region.get(a, -1.0) for a in n.all_input_nodes], default=-1.0)
    return region


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_sym(d, expr) -> bool:
    return isinstance(d, torch.SymInt) and d.node.expr == expr


def seq_dims(node: fx.Node, seq_expr) -> tuple[int, ...]:
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return ()
    return tuple(i for i, d in enumerate(v.shape) if _same_sym(d, seq_expr))


def find_query(graph: fx.Graph, region: dict, layer: int) -> fx.Node:
    """Post-RoPE query of ``layer``: first input of the first attention op (sdpa, or the QK^T
    matmul of eager attention) in that layer."""
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _ATTN_TARGETS and region.get(n) == layer:
            q = n.args[0] if n.args else n.kwargs.get("query")
            v = _val(q)
            if isinstance(v, torch.Tensor) and v.dim() == 4:
                return q
    raise TokenDropError(f"token_drop: no attention op (sdpa / matmul) found in decoder layer {layer}")


def _set_meta(node: fx.Node, cut: int, layer: int, keep: float, role: str, **extra) -> None:
    node.meta["adatoken"] = {"cut": cut, "layer": layer, "keep": keep, "role": role, **extra}


# ----------------------------------------------------------------------------- the pass


def _copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    out_val, old_out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out_val, type_expr=old_out.type).meta = dict(old_out.meta)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in gm.meta.items()})
    return new


def apply_token_drop(gm: fx.GraphModule, schedule, *, propagate_meta: bool = True) -> fx.GraphModule:
    """Insert token-drop steps at the schedule's cuts into a captured prefill graph.

    ``gm`` is the output of :func:`adatoken_compile.compiler.capture.capture` (its ``meta["adatoken_layout"]``
    names inputs/outputs). Returns a NEW GraphModule (``gm`` is not modified; weights are shared).
    Outputs gain ``kept.{c}`` (B, K'_c) original positions per effective cut (-1 on padding) and
    ``mask.{i}`` become the layer's pruned valid mask. The identity schedule returns an unchanged copy.
    """
    layout = gm.meta.get("adatoken_layout")
    if not layout:
        raise TokenDropError("token_drop: graph has no meta['adatoken_layout']; capture it with adatoken_compile.compiler.capture.capture")
    n_layers = int(layout["num_layers"])
    if getattr(schedule, "num_layers", n_layers) != n_layers:
        raise TokenDropError(f"token_drop: schedule is for {schedule.num_layers} layers, graph has {n_layers}")
    new = _copy_module(gm)
    cuts = list(schedule.effective_cuts())
    if not cuts:
        return new

    g = new.graph
    placeholders = {n.name: n for n in g.nodes if n.op == "placeholder"}
    try:
        ph = [placeholders[name] for name in layout["inputs"]]
    except KeyError as e:
        raise TokenDropError(f"token_drop: input {e} not among graph placeholders {list(placeholders)}")
    embeds, attn_mask, _pos_ids, spatial_in = ph
    out_node = next(n for n in g.nodes if n.op == "output")
    outs = list(out_node.args[0])
    out_names = list(layout["outputs"])
    if len(outs) != len(out_names):
        raise TokenDropError(f"token_drop: graph has {len(outs)} outputs, layout names {len(out_names)}")
    seq_expr_v = _val(embeds).shape[1] if _val(embeds) is not None else None
    if not isinstance(seq_expr_v, torch.SymInt):
        raise TokenDropError("token_drop: the captured sequence axis is static; capture with a dynamic sequence dim")
    seq_expr = seq_expr_v.node.expr

    region = node_regions(g)
    counter = {}

    def add_module(name: str, mod: nn.Module, args, cut_i, cut, role, **extra) -> fx.Node:
        new.add_submodule(name, mod)
        node = g.create_node("call_module", name, tuple(args), name=name)
        _set_meta(node, cut_i, cut.layer, cut.keep, role, **extra)
        region[node] = cut.layer - 0.5
        return node

    def add_getitem(src: fx.Node, i: int, name: str, cut_i, cut, role) -> fx.Node:
        node = g.create_node("call_function", operator.getitem, (src, i), name=name)
        _set_meta(node, cut_i, cut.layer, cut.keep, role)
        region[node] = cut.layer - 0.5
        return node

    # per-node tracking across cuts: current seq dims of inserted carriers and their roles
    carrier_dims: dict[fx.Node, tuple[int, ...]] = {}
    carrier_role: dict[fx.Node, str] = {}
    carrier_src: dict[fx.Node, str] = {}
    len_nodes: set[fx.Node] = set()
    cur_valid = cur_spatial = n0 = kept = None
    masks_after: list[tuple[int, fx.Node]] = []
    kept_outs: list[fx.Node] = []

    for ci, cut in enumerate(cuts):
        i = cut.layer
        pre = f"adatoken_cut{ci}_"
        first_after = next(
            (n for n in g.nodes if n.op not in ("placeholder", "get_attr", "output") and region.get(n, -1) >= i),
            out_node,
        )
        key_node = outs[out_names.index(f"key.{i - 1}")]
        query_node = find_query(g, region, i - 1)
        with g.inserting_before(first_after):
            if ci == 0:
                cur_valid = add_module(pre + "valid0", ValidMask(), (attn_mask,), ci, cut, "valid0")
                n0 = add_module(pre + "n0", SpatialCount(), (spatial_in, cur_valid), ci, cut, "n0")
                cur_spatial = spatial_in
            score = add_module(pre + "score", Score(getattr(schedule, "scoring", None), ci),
                               (query_node, key_node, cur_valid), ci, cut, "score",
                               query=query_node.name, key=key_node.name)
            sel = add_module(pre + "select", Select(cut.keep), (score, cur_valid, cur_spatial, n0), ci, cut, "select")
            idx = add_getitem(sel, 0, pre + "idx", ci, cut, "idx")
            new_valid = add_getitem(sel, 1, pre + "valid", ci, cut, "valid")
            new_len = add_getitem(sel, 2, pre + "len", ci, cut, "len")
            new_spatial = add_module(pre + "gather_spatial", GatherSeq((1,)), (cur_spatial, idx), ci, cut,
                                     "gather_spatial", source=spatial_in.name)
            kargs = (idx, new_valid) if kept is None else (idx, new_valid, kept)
            kept = add_module(pre + "kept_positions", KeptPositions(), kargs, ci, cut, "kept_positions")
        inserted_here = {score, sel, idx, new_valid, new_len, new_spatial, kept}
        if ci == 0:
            inserted_here |= {cur_valid, n0}

        # values defined before the cut and used at or after layer i (outputs handled below)
        crossing = []
        for v in list(g.nodes):
            if v.op == "output" or v in inserted_here or region.get(v, -1) >= i:
                continue
            users = [u for u in v.users if u.op != "output" and u not in inserted_here and region.get(u, -1) >= i]
            if users:
                crossing.append((v, users))
        order = {n: k for k, n in enumerate(g.nodes)}
        for v, users in crossing:
            vv = _val(v)
            if v in len_nodes or (isinstance(vv, torch.SymInt) and vv.node.expr == seq_expr):
                repl = new_len
            else:
                if v in carrier_dims:
                    dims, role, src = carrier_dims[v], carrier_role[v], carrier_src[v]
                else:
                    dims = seq_dims(v, seq_expr)
                    if not dims:
                        if isinstance(vv, torch.SymInt) and seq_expr in vv.node.expr.free_symbols:
                            raise TokenDropError(f"token_drop: '{v.name}' ({vv}) derives from the sequence length; unsupported")
                        continue  # no sequence axis (weights, batch size, ...)
                    if 0 in dims:
                        raise TokenDropError(f"token_drop: '{v.name}' has the sequence on axis 0; expected batch first")
                    if len(dims) >= 2:
                        role = "rebuild_mask"
                    elif region.get(v, -1) == i - 1 and len(vv.shape) == 3:
                        role = "gather_hidden"
                    else:
                        role = "gather_seq"
                    src = v.name
                name = pre + role if role in ("rebuild_mask", "gather_hidden") else f"{pre}gather_{src}"
                if name in counter:
                    counter[name] += 1
                    name = f"{name}_{counter[name]}"
                else:
                    counter[name] = 0
                anchor = first_after if order[v] < order[first_after] else v.next
                with g.inserting_before(anchor):
                    if role == "rebuild_mask":
                        if tuple(dims) != (2, 3):
                            raise TokenDropError(f"token_drop: mask '{v.name}' has sequence axes {dims}, expected (2, 3)")
                        repl = add_module(name, RebuildMask4d(), (v, idx, new_valid), ci, cut, role, source=src)
                    else:
                        repl = add_module(name, GatherSeq(dims), (v, idx), ci, cut, role, source=src)
                carrier_dims[repl], carrier_role[repl], carrier_src[repl] = dims, role, src
                order = {n: k for k, n in enumerate(g.nodes)}
            for u in users:
                u.replace_input_with(v, repl)
        len_nodes.add(new_len)
        cur_valid, cur_spatial = new_valid, new_spatial
        masks_after.append((i, new_valid))
        kept_outs.append(kept)

    # outputs: per-layer valid masks at the layer's length, plus kept positions per cut
    for j, name in enumerate(out_names):
        if name.startswith("mask."):
            layer = int(name.split(".")[1])
            cur = None
            for li, nv in masks_after:
                if li <= layer:
                    cur = nv
            if cur is not None:
                outs[j] = cur
    out_node.args = (tuple(outs) + tuple(kept_outs),)
    new.meta["adatoken_layout"] = dict(layout, outputs=out_names + [f"kept.{c}" for c in range(len(cuts))])
    new.meta["adatoken_cuts"] = [{"cut": c, "layer": k.layer, "keep": k.keep} for c, k in enumerate(cuts)]
    g.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (n.op == "call_module" and n.target == "_guards_fn"))
    g.lint()
    new.recompile()
    if propagate_meta:
        _propagate_meta(new)
    return new


def _propagate_meta(gm: fx.GraphModule) -> None:
    """Refresh ``meta['val']`` (shape/dtype, unbacked SymInt for K') on every node by fake propagation.
    Best effort: on failure the inserted nodes keep shape info in ``meta['adatoken']`` only."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in phs]
    mode = getattr(vals[0], "fake_mode", None) if vals else None
    if mode is None:
        return
    try:
        with mode.shape_env.ignore_fresh_unbacked_symbols() if mode.shape_env else _nullctx():
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)
    except Exception as e:  # pragma: no cover - informative only
        gm.meta["adatoken_meta_error"] = f"{type(e).__name__}: {e}"[:500]
        return
    for n in gm.graph.nodes:
        if "adatoken" in n.meta:
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor):
                n.meta["adatoken"]["shape"] = tuple(str(d) for d in v.shape)
                n.meta["adatoken"]["dtype"] = str(v.dtype)
            elif v is not None and not isinstance(v, (tuple, list)):
                n.meta["adatoken"]["shape"] = ()
                n.meta["adatoken"]["dtype"] = type(v).__name__


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ----------------------------------------------------------------------------- torch.compile


def token_drop_backend(schedule, inner: Callable | str | None = None):
    """Backend-style step ``backend(gm, example_inputs)``: apply the pass, then hand the pruned graph
    to ``inner`` (None / "eager": run it as is; a backend name or callable: compile it further).

    The pass needs the layer attribution (``nn_module_stack`` with ``layers.{i}``) and the I/O
    layout that :func:`adatoken_compile.compiler.capture.capture` records. A graph Dynamo hands to a
    ``torch.compile`` backend has neither (Dynamo re-traces a GraphModule flat, and its placeholders
    include lifted parameters), so this is NOT usable as ``torch.compile(model, backend=...)`` on
    the HF model; use it on a captured module, or use :func:`compile_pruned` (pass, then
    ``torch.compile``), which is verified to compile with ``fullgraph=True, dynamic=True``.
    """

    def backend(gm: fx.GraphModule, example_inputs):
        if not getattr(gm, "meta", {}).get("adatoken_layout"):
            raise TokenDropError(
                "token_drop_backend: this graph was not produced by adatoken_compile.compiler.capture.capture "
                "(no meta['adatoken_layout']); apply the pass before torch.compile (see compile_pruned)"
            )
        pruned = apply_token_drop(gm, schedule, propagate_meta=False)
        if inner is None or inner == "eager":
            return pruned.forward
        if isinstance(inner, str):
            from torch._dynamo import lookup_backend

            return lookup_backend(inner)(pruned, example_inputs)
        return inner(pruned, example_inputs)

    return backend


def compile_pruned(gm: fx.GraphModule, schedule, backend: str | Callable = "inductor", **compile_kwargs):
    """Apply the pass to a captured prefill, then ``torch.compile`` it (one graph, dynamic shapes;
    the data-dependent K' needs ``capture_scalar_outputs``)."""
    import torch._dynamo

    torch._dynamo.config.capture_scalar_outputs = True
    pruned = apply_token_drop(gm, schedule)
    compile_kwargs.setdefault("fullgraph", True)
    compile_kwargs.setdefault("dynamic", True)
    return torch.compile(pruned, backend=backend, **compile_kwargs)
