"""ORT node profiles and the FLOPs counted on the executed graph.

Everything here works on ONNX files / ORT sessions plus feeds (``name -> np.ndarray``), so any
artifact that ships a ``prefill.onnx`` can be measured.

Definitions used in the reports (stated once, here):

* **latency**: wall time of ``session.run`` (``time.perf_counter``), median over ``repeats``
  after ``warmup`` runs; candidates are run alternately in one process (:func:`interleaved`) so
  that machine noise hits all of them.
* **latency_ratio** = median(pruned) / median(baseline); **flops_ratio** = pruned / baseline
  FLOPs counted on the executed graphs (:func:`flops_from_profile`).
* **realized_fraction** = (1 - latency_ratio) / (1 - flops_ratio): the fraction of the ideal
  time saving (the one FLOPs predict) that the measurement realises. 1 = latency fell exactly as
  much as FLOPs, 0 = no speedup at all, < 0 = slower. (Not the ratio of speedups
  ``(base/pruned - 1) / (base_flops/pruned_flops - 1)``, which is also reported as
  ``realized_speedup_fraction``.)
* **overhead_fraction** = kernel time of inserted nodes / total kernel time of one prefill, from
  the ORT profile (only node kernel time; session overhead between kernels is not in either).

ONNX Runtime and the inserted node names (checked on ORT 1.31, CPU, ORT_ENABLE_ALL): the
profile reports nodes by their ONNX name with ``_kernel_time`` appended. The ``adatoken_cut``
prefix survives: nodes ORT leaves alone keep their name, and a fused node is named
``<name of the first node it absorbed>/<FusionName>/`` (e.g.
``adatoken_cut0_score/matmul/MatMulScaleFusion/``, ``node_silu/QuickGeluFusion/``,
``node_slice_2/GatherSliceToSplitFusion``). :func:`origin_name` maps a profiled name back to an
original node name by stripping those ``/…Fusion`` suffixes. Nodes ORT creates from nothing
(``Transpose_token_N`` from the transpose optimiser) have no origin: they are reported as
``unattributed`` (in a pruned graph, a few such transposes appear next to the gathered RoPE
cos/sin inside the layers; they are part of the cut's cost but are not counted as inserted).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx

from adatoken_compile.io import scratch_dir
from adatoken_compile.runtime.session import make_session

# ----------------------------------------------------------------------------- ORT sessions


def _feeds_for(session, feeds: Mapping[str, np.ndarray]) -> dict:
    wanted = [i.name for i in session.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise ValueError(f"bench: feeds lack inputs {missing}")
    return {n: feeds[n] for n in wanted}


# ----------------------------------------------------------------------------- node profiles

_FUSION_SEG = re.compile(r"/[A-Za-z0-9]*Fusion[A-Za-z0-9]*/?$")
_CUT_RE = re.compile(r"adatoken_cut(\d+)_([A-Za-z0-9]+(?:_[A-Za-z0-9]+)*?)/")


def origin_name(profiled: str) -> str:
    """The ONNX node name a profiled node comes from: ``_kernel_time`` and any trailing
    ``/<FusionName>/`` segments (ORT's fused-node naming) stripped."""
    name = profiled[: -len("_kernel_time")] if profiled.endswith("_kernel_time") else profiled
    prev = None
    while prev != name:
        prev = name
        name = _FUSION_SEG.sub("", name)
    return name


def _shapes(raw) -> list[tuple[str, list[int]]]:
    out = []
    for item in raw or []:
        if isinstance(item, Mapping):
            for dtype, shape in item.items():
                out.append((str(dtype), [int(s) for s in shape]))
    return out


@dataclass
class NodeRecord:
    name: str  # profiled name (kernel_time suffix stripped)
    origin: str | None  # original ONNX node name, None when ORT created the node
    op_type: str
    time_s: float  # mean kernel time per run
    input_shapes: list = field(default_factory=list)  # [(dtype, shape), ...] (last run)
    output_shapes: list = field(default_factory=list)
    inserted: bool = False
    cut: int | None = None
    role: str | None = None
    calls: int = 0  # kernel events per run
    trans_a: bool = False  # transA of the original node (Gemm / FusedMatMul), when known


@dataclass
class NodeProfile:
    path: str
    runs: int
    nodes: list[NodeRecord]
    total_s: float  # sum of node kernel times per run
    run_s: float  # mean model_run wall time per profiled run (includes profiling overhead)
    inserted_s: float
    unattributed_s: float  # nodes created by ORT with no original name
    overhead_fraction: float
    by_op_type: dict  # op -> {"time_s", "nodes"}
    by_role: dict  # "cut{c}_{role}" -> time_s
    original_inserted_nodes: int  # adatoken nodes in the ONNX file
    executed_inserted_nodes: int  # distinct inserted nodes that ran (after ORT fusions / folding)

    def to_dict(self, nodes: bool = False) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "nodes"}
        if nodes:
            d["nodes"] = [n.__dict__ for n in self.nodes]
        return d


def _original_nodes(onnx_path: str) -> dict[str, dict] | None:
    """name -> {"op", "trans_a"} of the nodes in the ONNX file (weights not loaded)."""
    try:
        m = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        return None
    out = {}
    nodes = list(m.graph.node)
    for f in m.functions:  # local functions are inlined by ORT under their call-site names
        nodes.extend(f.node)
    for n in nodes:
        ta = next((a.i for a in n.attribute if a.name == "transA"), 0)
        out[n.name] = {"op": n.op_type, "trans_a": bool(ta)}
    return out


def parse_profile(trace: list, runs: int, originals: Mapping[str, dict] | None = None, path: str = "") -> NodeProfile:
    """Node kernel times of the last ``runs`` ``model_run`` windows of an ORT JSON trace."""
    windows = sorted(
        ((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
    )
    if not windows:
        raise ValueError("bench: profile has no model_run events")
    windows = windows[-runs:]
    runs = len(windows)
    acc: dict[str, NodeRecord] = {}
    for e in trace:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        ts = e["ts"]
        if not any(a <= ts <= b for a, b in windows):
            continue
        name = e["name"][: -len("_kernel_time")]
        args = e.get("args", {})
        rec = acc.get(name)
        if rec is None:
            origin = origin_name(name)
            if originals is not None and origin not in originals:
                origin = None
            m = _CUT_RE.search(name + "/")
            inserted = origin is not None and origin.startswith("adatoken_cut") if originals is not None else "adatoken_cut" in name
            rec = NodeRecord(
                name=name,
                origin=origin,
                op_type=str(args.get("op_name", "?")),
                time_s=0.0,
                inserted=bool(inserted),
                cut=int(m.group(1)) if (m and inserted) else None,
                role=m.group(2) if (m and inserted) else None,
                trans_a=bool(originals[origin]["trans_a"]) if (originals and origin in originals
                                                                and origin == name) else False,
            )
            acc[name] = rec
        rec.time_s += float(e.get("dur", 0)) * 1e-6
        rec.calls += 1
        rec.input_shapes = _shapes(args.get("input_type_shape"))
        rec.output_shapes = _shapes(args.get("output_type_shape"))
    nodes = list(acc.values())
    for n in nodes:
        n.time_s /= runs
        n.calls = int(round(n.calls / runs))
    total = sum(n.time_s for n in nodes)
    inserted = sum(n.time_s for n in nodes if n.inserted)
    unattributed = sum(n.time_s for n in nodes if n.origin is None)
    by_op: dict[str, dict] = {}
    by_role: dict[str, float] = {}
    for n in nodes:
        d = by_op.setdefault(n.op_type, {"time_s": 0.0, "nodes": 0})
        d["time_s"] += n.time_s
        d["nodes"] += 1
        if n.inserted:
            key = f"cut{n.cut}_{n.role}"
            by_role[key] = by_role.get(key, 0.0) + n.time_s
    run_s = float(np.mean([b - a for a, b in windows])) * 1e-6
    return NodeProfile(
        path=str(path),
        runs=runs,
        nodes=nodes,
        total_s=total,
        run_s=run_s,
        inserted_s=inserted,
        unattributed_s=unattributed,
        overhead_fraction=(inserted / total) if total > 0 else 0.0,
        by_op_type=dict(sorted(by_op.items(), key=lambda kv: -kv[1]["time_s"])),
        by_role=dict(sorted(by_role.items())),
        original_inserted_nodes=sum(1 for n in (originals or ()) if n.startswith("adatoken_cut")),
        executed_inserted_nodes=sum(1 for n in nodes if n.inserted),
    )


def profile_nodes(onnx_path: str, feeds: Mapping[str, np.ndarray], providers: Sequence[str] = ("CPUExecutionProvider",),
                  runs: int = 3, *, warmup: int = 1, threads: int | None = None,
                  optimized_model_filepath: str | None = None) -> NodeProfile:
    """Profile ``runs`` prefills (after ``warmup`` runs) with ORT's profiler at ORT_ENABLE_ALL.

    Returns per-node mean kernel time, op type and recorded input/output shapes; total kernel
    time, the time in inserted nodes (original name starts with ``adatoken_cut``, fused names
    mapped back by :func:`origin_name`), ``overhead_fraction = inserted / total`` and a per-op
    breakdown. ``optimized_model_filepath`` additionally saves ORT's optimised graph (for
    inspection; for large models this writes a copy of the weights).
    """
    with scratch_dir("adatoken-prof-") as tmp:
        sess = make_session(onnx_path, providers, threads=threads, profile_prefix=os.path.join(tmp, "ort"),
                            optimized_model_filepath=optimized_model_filepath)
        f = _feeds_for(sess, feeds)
        for _ in range(max(0, warmup) + max(1, runs)):
            sess.run(None, f)
        trace_path = sess.end_profiling()
        del sess
        with open(trace_path) as fh:
            trace = json.load(fh)
    return parse_profile(trace, max(1, runs), _original_nodes(onnx_path), path=str(onnx_path))


# ----------------------------------------------------------------------------- FLOPs on the graph

MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "FusedGemm"}
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedMultiHeadAttention"}
# pure data movement / shape ops: no arithmetic
_MOVEMENT_OPS = {
    "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Concat", "Split", "Slice", "Gather", "GatherElements",
    "GatherND", "Expand", "Shape", "Identity", "Cast", "ScatterElements", "ScatterND", "Range", "Flatten",
    "ConstantOfShape", "Size", "Tile", "MemcpyFromHost", "MemcpyToHost",
}


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _matmul_flops(in_shapes, out_shapes, trans_a: bool = False) -> int | None:
    """2 * (output elements) * K.

    ORT's profile records only the non-initializer inputs, so a MatMul against a weight shows A
    alone: then K = A[-1] (A[-2] when ``trans_a``). With both operands recorded, K comes from the
    last two axes of A and B, so transposed operands (FusedMatMul / Gemm transA/transB) need no
    attributes: (a_m * a_k) * (b_k * b_n) = M * K * K * N."""
    if not in_shapes or not out_shapes:
        return None
    a = in_shapes[0][1]
    out = out_shapes[0][1]
    if not a:
        return None
    if len(in_shapes) < 2 or not in_shapes[1][1]:
        k = a[-2] if (trans_a and len(a) >= 2) else a[-1]
        return 2 * _prod(out) * int(k)
    b = in_shapes[1][1]
    if len(a) == 1:
        k = a[0]
    elif len(b) == 1:
        k = b[0]
    else:
        mn = (out[-2] if len(out) >= 2 else 1) * (out[-1] if out else 1)
        if mn == 0:
            return 0
        kk = (a[-2] * a[-1]) * (b[-2] * b[-1]) / mn
        k = int(round(math.sqrt(kk)))
    return 2 * _prod(out) * int(k)


def _attention_flops(op: str, in_shapes, out_shapes) -> int | None:
    """QK^T + AV of a fused attention op: 4 * B * S_q * S_kv * D_q (all heads together), plus the
    QKV projection for ``Attention`` (its weights are an input). None when the layout is unknown."""
    try:
        q = in_shapes[0][1]
        if op == "Attention":  # input (B,S,Hin), weights (Hin, 3D) when qkv sizes are equal
            B, S, hin = q
            w = in_shapes[1][1]
            d = w[1] // 3
            return 2 * B * S * hin * w[1] + 4 * B * S * S * d
        if op in ("MultiHeadAttention", "GroupQueryAttention"):
            out = out_shapes[0][1]
            B, S, dq = out[0], out[1], out[2]
            k = in_shapes[1][1] if len(in_shapes) > 1 else []
            if op == "MultiHeadAttention" and len(k) == 3:
                skv = k[1]
            elif op == "MultiHeadAttention" and len(k) == 4:
                skv = k[2]
            elif op == "GroupQueryAttention" and len(k) == 3:
                skv = k[1]  # no past (prefill): keys are this call's
            else:
                return None
            return 4 * B * S * skv * dq
    except (IndexError, ValueError, TypeError):
        return None
    return None


def flops_from_profile(profile: NodeProfile) -> dict:
    """FLOPs of one prefill counted over the executed graph from the recorded shapes.

    Counted: MatMul-like ops (2*M*N*K with batch dims) and fused attention ops (QK^T + AV).
    Not counted, reported under ``uncounted``: every other op with arithmetic (elementwise,
    reductions, Softmax, norms, TopK ...), with its output element count as a size hint; pure data
    movement ops are listed under ``movement``. Returns ``{"total", "inserted", "model",
    "by_op_type", "by_node", "uncounted", "movement", "unparsed"}`` (model = not inserted).
    """
    by_op: dict[str, int] = {}
    by_node: dict[str, int] = {}
    uncounted: dict[str, dict] = {}
    movement: dict[str, int] = {}
    unparsed: list[str] = []
    total = inserted = 0
    for n in profile.nodes:
        f = None
        if n.op_type in MATMUL_OPS:
            f = _matmul_flops(n.input_shapes, n.output_shapes, trans_a=n.trans_a)
        elif n.op_type in ATTENTION_OPS:
            f = _attention_flops(n.op_type, n.input_shapes, n.output_shapes)
        else:
            if n.op_type in _MOVEMENT_OPS:
                movement[n.op_type] = movement.get(n.op_type, 0) + 1
            else:
                d = uncounted.setdefault(n.op_type, {"nodes": 0, "output_elements": 0})
                d["nodes"] += 1
                d["output_elements"] += sum(_prod(s) for _, s in n.output_shapes)
            continue
        if f is None:
            unparsed.append(n.name)
            continue
        f *= max(1, n.calls)
        by_op[n.op_type] = by_op.get(n.op_type, 0) + f
        by_node[n.name] = f
        total += f
        if n.inserted:
            inserted += f
    return {
        "total": float(total),
        "inserted": float(inserted),
        "model": float(total - inserted),
        "by_op_type": by_op,
        "by_node": by_node,
        "uncounted": uncounted,
        "movement": movement,
        "unparsed": unparsed,
    }


def crosscheck(formula_flops, graph_flops) -> float:
    """Signed relative error (graph - formula) / formula; accepts numbers or dicts with "total"."""
    f = float(formula_flops["total"] if isinstance(formula_flops, Mapping) else formula_flops)
    g = float(graph_flops["total"] if isinstance(graph_flops, Mapping) else graph_flops)
    return (g - f) / f
