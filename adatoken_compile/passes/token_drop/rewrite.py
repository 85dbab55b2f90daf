"""The FX pass: insert token-drop steps at a schedule's cuts into a captured prefill graph.

:func:`apply_token_drop` rewrites a graph captured by :func:`adatoken_compile.compiler.capture.capture`:
for each effective cut before layer ``i`` it scores with layer ``i-1``'s query (the first input of
that layer's attention op) and the recorded cache key, selects, and gathers every value that
crosses from before the cut into layers ``>= i`` (hidden state, 4-D mask on both axes, RoPE
cos/sin, ...); SymInt uses of the sequence length become the new length. Inserted steps are
``call_module`` nodes named ``adatoken_cut{c}_<role>`` (:mod:`.steps`).
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch import nn

from adatoken_compile.models.spec import BASE, DecoderSpec, spec_for_type
from adatoken_compile.passes.token_drop.steps import (GatherSeq, KeptPositions, RebuildMask4d, Score, Select, SpatialCount,
                                                      SpatialRank, ValidMask)

XYZ_INPUT = "spatial_xyz"  # (B, L, 3) float32 token coordinates: a graph input only when a cut's rule reads them

# ----------------------------------------------------------------------------- graph helpers

class TokenDropError(RuntimeError):
    """The graph does not have the structure the pass needs (named in the message)."""


def layer_of(node: fx.Node, spec: DecoderSpec = BASE) -> int | None:
    """Decoder layer index owning ``node`` (its innermost module path in nn_module_stack that the
    family's spec places in a layer), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        i = spec.layer_of_path(str(path))
        if i is not None:
            return i
    return None


def node_regions(graph: fx.Graph, spec: DecoderSpec = BASE) -> dict[fx.Node, float]:
    """Layer index per node; nodes outside a layer take the max region of their inputs (-1 = before
    the first layer)."""
    region: dict[fx.Node, float] = {}
    for n in graph.nodes:
        if n.op == "output":
            continue
        li = layer_of(n, spec) if n.op in ("call_function", "call_module", "call_method") else None
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


def find_query(graph: fx.Graph, region: dict, layer: int, spec: DecoderSpec = BASE) -> fx.Node:
    """Post-RoPE query of ``layer``: first input of the first attention op the spec names (sdpa, or
    the QK^T matmul of eager attention) in that layer."""
    for n in graph.nodes:
        if n.op == "call_function" and spec.is_attention_op(n.target) and region.get(n) == layer:
            q = n.args[0] if n.args else n.kwargs.get("query")
            v = _val(q)
            if isinstance(v, torch.Tensor) and v.dim() == 4:
                return q
    raise TokenDropError(f"token_drop: no attention op (sdpa / matmul) found in decoder layer {layer}")


def find_hidden(graph: fx.Graph, region: dict, layer: int, seq_expr) -> fx.Node:
    """The hidden state entering ``layer`` (>= 1): the last (B, L, H) value of layer ``layer-1`` that a
    node of a later layer reads (the residual output)."""
    found = None
    for n in graph.nodes:
        if region.get(n) != layer - 1 or n.op not in ("call_function", "call_module", "call_method"):
            continue
        v = _val(n)
        if not (isinstance(v, torch.Tensor) and v.dim() == 3 and _same_sym(v.shape[1], seq_expr)):
            continue
        if any(u.op != "output" and region.get(u, -1) >= layer for u in n.users):
            found = n
    if found is None:
        raise TokenDropError(f"token_drop: no hidden state found between decoder layers {layer - 1} and {layer}")
    return found


def _add_xyz_input(gm: fx.GraphModule, after: fx.Node, embeds: fx.Node) -> fx.Node:
    """A ``spatial_xyz`` (B, L, 3) float32 placeholder after ``after``, its fake value on the same
    symbolic batch and sequence sizes as ``embeds``."""
    with gm.graph.inserting_after(after):
        node = gm.graph.placeholder(XYZ_INPUT)
    ev = _val(embeds)
    if ev is not None:
        mode = getattr(ev, "fake_mode", None)
        if mode is not None:
            with mode:
                node.meta["val"] = torch.empty((ev.shape[0], ev.shape[1], 3), dtype=torch.float32)
    return node


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
    ``mask.{i}`` become the layer's pruned valid mask. When a cut's rule reads token coordinates the
    graph gains the input ``spatial_xyz`` (B, L, 3) after ``spatial_mask``. A cut before layer 0
    selects on the input embeddings. The identity schedule returns an unchanged copy.
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
    rw = _Rewrite(new, layout, schedule.needs())
    for ci, cut in enumerate(cuts):
        rw.rewire(*rw.insert_cut(ci, cut))
    rw.finish(cuts)
    g = new.graph
    g.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (n.op == "call_module" and n.target == "_guards_fn"))
    g.lint()
    new.recompile()
    if propagate_meta:
        _propagate_meta(new)
    return new


class _Rewrite:
    """One pass over a copied graph: the cuts' steps (:meth:`insert_cut`), the values that cross each
    cut moved into the new layout (:meth:`rewire`), then the outputs (:meth:`finish`)."""

    def __init__(self, new: fx.GraphModule, layout: dict, needs):
        self.new, self.layout, self.needs = new, layout, needs
        g = self.g = new.graph
        placeholders = {n.name: n for n in g.nodes if n.op == "placeholder"}
        try:
            ph = [placeholders[name] for name in layout["inputs"]]
        except KeyError as e:
            raise TokenDropError(f"token_drop: input {e} not among graph placeholders {list(placeholders)}")
        self.embeds, self.attn_mask, _pos_ids, self.spatial_in = ph[:4]
        self.inputs = list(layout["inputs"])
        xyz_in = placeholders.get(XYZ_INPUT)
        if "xyz" in needs and xyz_in is None:
            xyz_in = _add_xyz_input(new, self.spatial_in, self.embeds)
            self.inputs.insert(self.inputs.index(self.spatial_in.name) + 1, XYZ_INPUT)
        self.out_node = next(n for n in g.nodes if n.op == "output")
        self.outs = list(self.out_node.args[0])
        self.out_names = list(layout["outputs"])
        if len(self.outs) != len(self.out_names):
            raise TokenDropError(f"token_drop: graph has {len(self.outs)} outputs, layout names {len(self.out_names)}")
        ev = _val(self.embeds)
        seq_expr_v = ev.shape[1] if ev is not None else None
        if not isinstance(seq_expr_v, torch.SymInt):
            raise TokenDropError("token_drop: the captured sequence axis is static; capture with a dynamic sequence dim")
        self.seq_expr = seq_expr_v.node.expr
        batch_v = ev.shape[0]
        self.batch_expr = batch_v.node.expr if isinstance(batch_v, torch.SymInt) else None
        self.spec = spec_for_type(layout.get("model_type"))
        self.region = node_regions(g, self.spec)
        self.counter: dict[str, int] = {}
        # per inserted carrier across cuts: its sequence dims, role, source and batch axis
        self.carriers: dict[fx.Node, tuple] = {}
        self.len_nodes: set[fx.Node] = set()
        self.cur_valid = self.cur_spatial = self.n0 = self.kept = None
        self.cur_xyz, self.cur_srank = xyz_in, None
        self.masks_after: list[tuple[int, fx.Node]] = []
        self.kept_outs: list[fx.Node] = []

    def add_module(self, name: str, mod: nn.Module, args, cut_i, cut, role, **extra) -> fx.Node:
        self.new.add_submodule(name, mod)
        node = self.g.create_node("call_module", name, tuple(args), name=name)
        _set_meta(node, cut_i, cut.layer, cut.keep, role, **extra)
        self.region[node] = cut.layer - 0.5
        return node

    def add_getitem(self, src: fx.Node, i: int, name: str, cut_i, cut, role) -> fx.Node:
        node = self.g.create_node("call_function", operator.getitem, (src, i), name=name)
        _set_meta(node, cut_i, cut.layer, cut.keep, role)
        self.region[node] = cut.layer - 0.5
        return node

    def insert_cut(self, ci: int, cut):
        """The cut's own steps before layer ``cut.layer``: score, select, the new valid / spatial masks
        and kept positions, and the per-token values later rules read."""
        g, region, i = self.g, self.region, cut.layer
        pre = f"adatoken_cut{ci}_"
        rule_needs = cut.rule.needs()
        first_after = next(
            (n for n in g.nodes if n.op not in ("placeholder", "get_attr", "output") and region.get(n, -1) >= i),
            self.out_node,
        )
        reads = {}
        if "attention" in rule_needs:
            if i == 0:
                raise TokenDropError(f"token_drop: rule '{cut.rule.name}' needs attention; it cannot cut before layer 0")
            reads["query"] = find_query(g, region, i - 1, self.spec)
            reads["key"] = self.outs[self.out_names.index(f"key.{i - 1}")]
        if "hidden" in rule_needs:
            reads["hidden"] = self.embeds if i == 0 else find_hidden(g, region, i, self.seq_expr)
        add = self.add_module
        with g.inserting_before(first_after):
            inserted_here = set()
            if ci == 0:
                self.cur_valid = add(pre + "valid0", ValidMask(), (self.attn_mask,), ci, cut, "valid0")
                self.n0 = add(pre + "n0", SpatialCount(), (self.spatial_in, self.cur_valid), ci, cut, "n0")
                self.cur_spatial = self.spatial_in
                inserted_here |= {self.cur_valid, self.n0}
                if "srank" in self.needs:
                    self.cur_srank = add(pre + "srank0", SpatialRank(), (self.spatial_in, self.cur_valid), ci, cut, "srank0")
                    inserted_here.add(self.cur_srank)
            if "xyz" in rule_needs:
                reads["xyz"] = self.cur_xyz
            if "srank" in rule_needs:
                reads["srank"] = self.cur_srank
            names = ("query", "key", "hidden", "xyz", "srank")
            valid, spatial, n0 = self.cur_valid, self.cur_spatial, self.n0
            score = add(pre + "score", Score(cut.rule, ci, cut.keep),
                        (valid, spatial, n0) + tuple(reads.get(k) for k in names), ci, cut, "score",
                        rule=cut.rule.label(), **{k: v.name for k, v in reads.items()})
            sel = add(pre + "select", Select(cut.keep), (score, valid, spatial, n0), ci, cut, "select")
            idx = self.add_getitem(sel, 0, pre + "idx", ci, cut, "idx")
            new_valid = self.add_getitem(sel, 1, pre + "valid", ci, cut, "valid")
            new_len = self.add_getitem(sel, 2, pre + "len", ci, cut, "len")
            new_spatial = add(pre + "gather_spatial", GatherSeq((1,)), (spatial, idx), ci, cut,
                              "gather_spatial", source=self.spatial_in.name)
            kargs = (idx, new_valid) if self.kept is None else (idx, new_valid, self.kept)
            self.kept = add(pre + "kept_positions", KeptPositions(), kargs, ci, cut, "kept_positions")
            inserted_here |= {score, sel, idx, new_valid, new_len, new_spatial, self.kept}
            # per-token values later cuts' rules read travel with the tokens (unused ones are removed below)
            if self.cur_xyz is not None:
                self.cur_xyz = add(pre + "gather_xyz", GatherSeq((1,)), (self.cur_xyz, idx), ci, cut, "gather_xyz",
                                   source=XYZ_INPUT)
                inserted_here.add(self.cur_xyz)
            if self.cur_srank is not None:
                self.cur_srank = add(pre + "gather_srank", GatherSeq((1,)), (self.cur_srank, idx), ci, cut,
                                     "gather_srank", source="srank")
                inserted_here.add(self.cur_srank)
        return ci, cut, first_after, inserted_here, idx, new_valid, new_len, new_spatial

    def _carrier(self, v: fx.Node, i: int):
        """(sequence dims, role, source, batch axis) of a value crossing the cut before layer ``i``,
        or None when it has no sequence axis."""
        if v in self.carriers:
            return self.carriers[v]
        vv = _val(v)
        dims = seq_dims(v, self.seq_expr)
        if not dims:
            if isinstance(vv, torch.SymInt) and self.seq_expr in vv.node.expr.free_symbols:
                raise TokenDropError(f"token_drop: '{v.name}' ({vv}) derives from the sequence length; unsupported")
            return None  # no sequence axis (weights, batch size, ...)
        # the batch axis: the one sized like the inputs' batch (a family's position values may put it
        # after a leading axis); batch first when none is
        bdim = next((a for a, d in enumerate(vv.shape) if self.batch_expr is not None and _same_sym(d, self.batch_expr)), 0)
        if bdim in dims:
            raise TokenDropError(f"token_drop: '{v.name}' has the sequence on its batch axis {bdim}")
        if len(dims) >= 2:
            role = "rebuild_mask"
        elif self.region.get(v, -1) == i - 1 and len(vv.shape) == 3:
            role = "gather_hidden"
        else:
            role = "gather_seq"
        return dims, role, v.name, bdim

    def rewire(self, ci: int, cut, first_after, inserted_here, idx, new_valid, new_len, new_spatial) -> None:
        """Every value defined before the cut and used at or after its layer (outputs are
        :meth:`finish`'s) moves to the new layout: lengths become ``new_len``, sequence values are
        gathered, the 4-D mask is rebuilt."""
        g, region, i = self.g, self.region, cut.layer
        pre = f"adatoken_cut{ci}_"
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
            if v in self.len_nodes or (isinstance(vv, torch.SymInt) and vv.node.expr == self.seq_expr):
                repl = new_len
            else:
                carrier = self._carrier(v, i)
                if carrier is None:
                    continue
                dims, role, src, bdim = carrier
                name = pre + role if role in ("rebuild_mask", "gather_hidden") else f"{pre}gather_{src}"
                if name in self.counter:
                    self.counter[name] += 1
                    name = f"{name}_{self.counter[name]}"
                else:
                    self.counter[name] = 0
                anchor = first_after if order[v] < order[first_after] else v.next
                with g.inserting_before(anchor):
                    if role == "rebuild_mask":
                        if tuple(dims) != (2, 3):
                            raise TokenDropError(f"token_drop: mask '{v.name}' has sequence axes {dims}, expected (2, 3)")
                        repl = self.add_module(name, RebuildMask4d(), (v, idx, new_valid), ci, cut, role, source=src)
                    else:
                        repl = self.add_module(name, GatherSeq(dims, bdim), (v, idx), ci, cut, role, source=src)
                self.carriers[repl] = (dims, role, src, bdim)
                order = {n: k for k, n in enumerate(g.nodes)}
            for u in users:
                u.replace_input_with(v, repl)
        self.len_nodes.add(new_len)
        self.cur_valid, self.cur_spatial = new_valid, new_spatial
        self.masks_after.append((i, new_valid))
        self.kept_outs.append(self.kept)

    def finish(self, cuts) -> None:
        """Outputs: per-layer valid masks at the layer's length, plus kept positions per cut."""
        outs, out_names = self.outs, self.out_names
        for j, name in enumerate(out_names):
            if name.startswith("mask."):
                layer = int(name.split(".")[1])
                cur = None
                for li, nv in self.masks_after:
                    if li <= layer:
                        cur = nv
                if cur is not None:
                    outs[j] = cur
        self.out_node.args = (tuple(outs) + tuple(self.kept_outs),)
        self.new.meta["adatoken_layout"] = dict(self.layout, inputs=self.inputs,
                                                outputs=out_names + [f"kept.{c}" for c in range(len(cuts))])
        self.new.meta["adatoken_cuts"] = [{"cut": c, "layer": k.layer, "keep": k.keep, "rule": k.rule.to_dict()}
                                          for c, k in enumerate(cuts)]


def _propagate_meta(gm: fx.GraphModule) -> None:
    """Refresh ``meta['val']`` (shape/dtype, unbacked SymInt for K') on every node by fake propagation.
    Best effort: on failure the inserted nodes keep shape info in ``meta['adatoken']`` only."""
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
            from torch._dynamo import lookup_backend  # loads the compiler stack: only for a named backend

            return lookup_backend(inner)(pruned, example_inputs)
        return inner(pruned, example_inputs)

    return backend


def compile_pruned(gm: fx.GraphModule, schedule, backend: str | Callable = "inductor", **compile_kwargs):
    """Apply the pass to a captured prefill, then ``torch.compile`` it (one graph, dynamic shapes;
    the data-dependent K' needs ``capture_scalar_outputs``)."""
    import torch._dynamo  # loads the compiler stack: only when torch.compile is asked for

    torch._dynamo.config.capture_scalar_outputs = True
    pruned = apply_token_drop(gm, schedule)
    compile_kwargs.setdefault("fullgraph", True)
    compile_kwargs.setdefault("dynamic", True)
    return torch.compile(pruned, backend=backend, **compile_kwargs)
