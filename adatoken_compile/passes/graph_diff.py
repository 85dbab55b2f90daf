"""Diff of two GraphModules (before / after a pass), grouped per cut.

Reports only what a pass did: nodes present in ``after`` but not in ``before`` (matched by name)
and uses that were rewired, i.e. a node common to both whose argument at some position now points
at an inserted node. Output-node rewires are reported with the output's layout name when known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx


@dataclass
class InsertedNode:
    name: str
    op: str
    target: str
    meta: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "target": self.target, "meta": self.meta}


@dataclass
class RewiredUse:
    consumer: str  # node name (or "output[<name>]")
    arg: str  # argument position, e.g. "args[0]", "args[1][2]", "kwargs['x']"
    old: str | None  # producer before (None if the position did not exist)
    new: str  # inserted producer now

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CutDiff:
    cut: int | None
    layer: int | None
    keep: float | None
    inserted: list[InsertedNode] = field(default_factory=list)
    rewired: list[RewiredUse] = field(default_factory=list)
    rule: str | None = None  # the cut's selection rule (label)

    def roles(self) -> set[str]:
        return {n.meta.get("role") for n in self.inserted}

    def to_dict(self) -> dict:
        return {
            "cut": self.cut,
            "layer": self.layer,
            "keep": self.keep,
            "rule": self.rule,
            "inserted": [n.to_dict() for n in self.inserted],
            "rewired": [r.to_dict() for r in self.rewired],
        }


def _target_str(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", None) or str(t)


def _flat_args(n: fx.Node):
    """(position, value) for every Node-valued leaf of args/kwargs."""
    out = []

    def walk(x, pos):
        if isinstance(x, fx.Node):
            out.append((pos, x))
        elif isinstance(x, (list, tuple)):
            for i, y in enumerate(x):
                walk(y, f"{pos}[{i}]")
        elif isinstance(x, dict):
            for k, y in x.items():
                walk(y, f"{pos}[{k!r}]")

    for i, a in enumerate(n.args):
        walk(a, f"args[{i}]")
    for k, a in n.kwargs.items():
        walk(a, f"kwargs[{k!r}]")
    return out


def _meta_summary(n: fx.Node) -> dict:
    m = dict(n.meta.get("adatoken", {}))
    v = n.meta.get("val")
    if "shape" not in m and hasattr(v, "shape"):
        m["shape"] = tuple(str(d) for d in v.shape)
        m["dtype"] = str(v.dtype)
    return m


def diff_graphs(before: fx.GraphModule, after: fx.GraphModule) -> list[CutDiff]:
    """Per-cut diff (ordered by cut; inserted nodes without ``meta['adatoken']`` go to cut None)."""
    old_nodes = {n.name: n for n in before.graph.nodes}
    new_nodes = list(after.graph.nodes)
    inserted = {n.name: n for n in new_nodes if n.name not in old_nodes}
    groups: dict = {}

    def group(n: fx.Node) -> CutDiff:
        m = n.meta.get("adatoken", {})
        key = m.get("cut")
        if key not in groups:
            groups[key] = CutDiff(key, m.get("layer"), m.get("keep"))
        return groups[key]

    for n in new_nodes:
        if n.name in inserted:
            g = group(n)
            g.inserted.append(InsertedNode(n.name, n.op, _target_str(n), _meta_summary(n)))
            g.rule = n.meta.get("adatoken", {}).get("rule", g.rule)

    out_names_after = (getattr(after, "meta", {}).get("adatoken_layout") or {}).get("outputs")
    for n in new_nodes:
        if n.name in inserted or n.name not in old_nodes:
            continue
        old = old_nodes[n.name]
        old_args = dict(_flat_args(old))
        for pos, v in _flat_args(n):
            if v.name not in inserted:
                continue
            prev = old_args.get(pos)
            prev_name = prev.name if isinstance(prev, fx.Node) else None
            consumer = n.name
            if n.op == "output" and out_names_after and pos.startswith("args[0]["):
                k = int(pos[len("args[0][") : pos.index("]", len("args[0]["))])
                if k < len(out_names_after):
                    consumer = f"output[{out_names_after[k]}]"
            group(inserted[v.name]).rewired.append(RewiredUse(consumer, pos, prev_name, v.name))
    return [groups[k] for k in sorted(groups, key=lambda c: (c is None, c if c is not None else 0))]


def format_diff(diffs: list[CutDiff]) -> str:
    lines = []
    for d in diffs:
        if d.cut is None:
            lines.append("outside the cuts (new graph inputs)")
        else:
            lines.append(f"cut {d.cut}: before layer {d.layer}, keep {d.keep}, rule {d.rule}")
        for n in d.inserted:
            lines.append(f"  + {n.name:<48} {n.op}:{n.target}  role={n.meta.get('role')} shape={n.meta.get('shape')}")
        for r in d.rewired:
            lines.append(f"  ~ {r.consumer}.{r.arg}: {r.old} -> {r.new}")
    return "\n".join(lines)
