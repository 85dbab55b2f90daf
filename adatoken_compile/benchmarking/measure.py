"""Measurement machinery: interleaved timing, ORT node profiles, FLOPs counted on the executed
graph, prefill benchmarks, a LLaVA-3D-7B-width synthetic benchmark, plots and markdown tables.

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

import gc
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from adatoken_compile.runtime.engine import make_session

# ----------------------------------------------------------------------------- timing


def _stats(runs: Sequence[float]) -> dict:
    a = np.asarray(runs, dtype=np.float64)
    return {
        "median_s": float(np.median(a)),
        "p25_s": float(np.percentile(a, 25)),
        "p75_s": float(np.percentile(a, 75)),
        "min_s": float(a.min()),
        "runs": [float(x) for x in a],
    }


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int = 7, warmup: int = 2) -> dict:
    """Time the candidates alternately in this process: ``warmup`` untimed rounds, then
    ``repeats`` timed rounds, each round calling every candidate once in the given order
    (A B A B ...). Returns ``{name: {"median_s", "p25_s", "p75_s", "min_s", "runs"}}``."""
    if not fns:
        raise ValueError("interleaved: no candidates")
    if repeats < 1:
        raise ValueError("interleaved: repeats must be >= 1")
    names = list(fns)
    for _ in range(max(0, warmup)):
        for n in names:
            fns[n]()
    runs: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            runs[n].append(time.perf_counter() - t0)
    return {n: _stats(runs[n]) for n in names}


def _seconds(x) -> float:
    if isinstance(x, Mapping):
        return float(x["median_s"])
    return float(x)


def ratio(a, b) -> float:
    """a / b for two timings (stats dicts from :func:`interleaved`, by median, or plain numbers)."""
    return _seconds(a) / _seconds(b)


def speedup(baseline, candidate) -> float:
    """baseline / candidate (> 1 means the candidate is faster)."""
    return _seconds(baseline) / _seconds(candidate)


def realized_fraction(latency_ratio: float, flops_ratio: float) -> float:
    """(1 - latency_ratio) / (1 - flops_ratio): share of the FLOPs-ideal time saving realised
    (nan when the FLOPs do not change)."""
    if abs(1.0 - flops_ratio) < 1e-12:
        return float("nan")
    return (1.0 - latency_ratio) / (1.0 - flops_ratio)


# ----------------------------------------------------------------------------- ORT sessions


def _feeds_for(session, feeds: Mapping[str, np.ndarray]) -> dict:
    wanted = [i.name for i in session.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise ValueError(f"bench: feeds lack inputs {missing}")
    return {n: feeds[n] for n in wanted}


# ----------------------------------------------------------------------------- memory

_HWM_RE = re.compile(r"VmHWM:\s+(\d+)\s+kB")
_RSS_RE = re.compile(r"VmRSS:\s+(\d+)\s+kB")


def _proc_status_kb(rx) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = rx.search(f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (/proc/self/status VmRSS)."""
    return _proc_status_kb(_RSS_RE)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (write 5 to /proc/self/clear_refs).
    False where that is not possible (the peak then covers the whole process lifetime)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark (VmHWM; falls back to getrusage ru_maxrss, lifetime peak)."""
    v = _proc_status_kb(_HWM_RE)
    if v is not None:
        return v
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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
        import onnx

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
    with tempfile.TemporaryDirectory(prefix="adatoken-prof-") as tmp:
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


# ----------------------------------------------------------------------------- prefill bench


def prefill_bench(pruned_onnx: str, baseline_onnx: str, feeds: Mapping[str, np.ndarray], repeats: int = 7, *,
                  warmup: int = 2, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",),
                  profile_runs: int = 2, formula: Mapping[str, float] | None = None, log=None) -> dict:
    """Pruned vs baseline prefill on the same feeds.

    * ``latency_s``: :func:`interleaved` stats of plain (non-profiled) sessions, pruned and
      baseline alternating; ``latency_ratio`` = median pruned / median baseline. The first run of
      each session (the memory probe below) counts as one of the ``warmup`` runs.
    * ``flops``: counted on each executed graph (:func:`flops_from_profile`, from a separate
      profiled session); ``flops_ratio`` = pruned / baseline. ``formula`` (optional
      ``{"pruned", "baseline"}`` from :func:`adatoken_compile.flops.prefill_flops` for the same
      feeds) is reported with the relative error of the graph count against it.
    * ``realized_fraction`` = (1 - latency_ratio) / (1 - flops_ratio): the fraction of the
      FLOPs-ideal time saving realised. ``realized_speedup_fraction`` = (baseline/pruned - 1) /
      (baseline_flops/pruned_flops - 1) is given too.
    * ``overhead_fraction``: inserted-node kernel time / total kernel time (pruned profile);
      ``unattributed_kernel_s`` is the time of ORT-created nodes with no original name (not in
      the inserted time), ``by_role_s`` the inserted time per ``cut{c}_{role}``.
    * ``peak_memory_bytes``: per model, the process RSS high-water mark (VmHWM, reset through
      /proc/self/clear_refs before creating that model's timing session) over session creation
      and its warm-up runs, as ``peak_rss`` (absolute, whole process: Python, torch, anything
      already loaded, the other session when it exists) and ``delta`` (peak minus RSS just
      before: that model's weights as ORT holds them + its activations/arena). ``reset_ok``
      False means the peak is the process-lifetime maximum.
    """
    from adatoken_compile.flops import FORMULA

    say = log or (lambda *a: None)
    prof = {}
    flops = {}
    for name, path in (("pruned", pruned_onnx), ("baseline", baseline_onnx)):
        say(f"profiling {name} ({profile_runs} runs)")
        prof[name] = profile_nodes(path, feeds, providers, runs=profile_runs, warmup=1, threads=threads)
        flops[name] = flops_from_profile(prof[name])
        gc.collect()
    sessions, mem, fns = {}, {}, {}
    for name, path in (("baseline", baseline_onnx), ("pruned", pruned_onnx)):
        gc.collect()
        before = rss_bytes()
        ok = reset_peak_rss()
        s = make_session(path, providers, threads=threads)
        f = _feeds_for(s, feeds)
        s.run(None, f)
        peak = peak_rss_bytes()
        mem[name] = {"peak_rss": peak, "delta": (peak - before) if before is not None else None, "reset_ok": ok}
        sessions[name] = s
        fns[name] = (lambda s=s, f=f: s.run(None, f))
    say(f"timing: {warmup} warm-up + {repeats} interleaved rounds")
    lat = interleaved({"pruned": fns["pruned"], "baseline": fns["baseline"]}, repeats=repeats, warmup=max(0, warmup - 1))
    del sessions, fns
    gc.collect()
    lr = ratio(lat["pruned"], lat["baseline"])
    fr = flops["pruned"]["total"] / flops["baseline"]["total"]
    sp = speedup(lat["baseline"], lat["pruned"])
    ideal = 1.0 / fr if fr > 0 else float("inf")
    out = {
        "latency_s": lat,
        "latency_ratio": lr,
        "speedup": sp,
        "flops": {
            "pruned": flops["pruned"]["total"],
            "baseline": flops["baseline"]["total"],
            "inserted": flops["pruned"]["inserted"],
            "counted": "MatMul/Gemm/FusedMatMul (2*M*N*K) and fused attention ops, on the executed ORT graph; "
                       "elementwise, norms, softmax, top-k not counted",
            "formula": FORMULA,
        },
        "flops_ratio": fr,
        "realized_fraction": realized_fraction(lr, fr),
        "realized_speedup_fraction": (sp - 1.0) / (ideal - 1.0) if abs(ideal - 1.0) > 1e-12 else float("nan"),
        "overhead_fraction": prof["pruned"].overhead_fraction,
        "inserted_kernel_s": prof["pruned"].inserted_s,
        "unattributed_kernel_s": prof["pruned"].unattributed_s,
        "kernel_total_s": {k: v.total_s for k, v in prof.items()},
        "by_role_s": prof["pruned"].by_role,
        "peak_memory_bytes": mem,
        "threads": threads,
        "repeats": repeats,
    }
    if formula is not None:
        out["flops"]["formula_values"] = dict(formula)
        out["flops"]["graph_vs_formula_rel_err"] = {
            k: crosscheck(formula[k], flops[k]["total"]) for k in ("pruned", "baseline") if k in formula
        }
        if "pruned" in formula and "baseline" in formula:
            out["flops"]["formula_ratio"] = formula["pruned"] / formula["baseline"]
    return out


# ----------------------------------------------------------------------------- synthetic 7B width


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _default_cache() -> str:
    return os.environ.get("ADATOKEN_BENCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "adatoken_compile", "bench")


def synthetic_inputs(hidden: int, rows: Sequence[tuple[int, int, int]], seed: int = 0, scale: float = 1.0):
    """Left-padded DecoderInputs with random embeddings; rows = [(prefix, spatial, suffix), ...]."""
    import torch

    from adatoken_compile.contract import Segment, collate

    gen = torch.Generator().manual_seed(seed)
    segs = []
    for n_pre, n_sp, n_post in rows:
        n = n_pre + n_sp + n_post
        spatial = torch.zeros(n, dtype=torch.bool)
        spatial[n_pre: n_pre + n_sp] = True
        segs.append(Segment(torch.randn(n, hidden, generator=gen) * scale, spatial))
    return collate(segs)


def synthetic_7b_width(layers: int = 2, spatial: int = 1400, prefix: int = 35, suffix: int = 20,
                       schedule_keep: Sequence[tuple[int, float]] | None = None, *, hidden: int = 4096, heads: int = 32,
                       kv_heads: int = 32, intermediate: int = 11008, vocab: int = 32000, repeats: int = 5,
                       warmup: int = 2, threads: int | None = 2, cache_dir: str | None = None, seed: int = 0,
                       profile_runs: int = 1) -> dict:
    """Prefill benchmark of a random ``LlamaForCausalLM`` at LLaVA-3D-7B width (fp32), depth
    reduced to ``layers``, one sequence laid out as ``prefix`` system tokens, ``spatial`` spatial
    tokens, ``suffix`` question tokens.

    ``schedule_keep``: cuts as ``[(layer, keep), ...]`` (default: one cut before layer 1 keeping
    0.3). Captures the model (:func:`adatoken_compile.compiler.capture.capture`, small example; the graph
    is dynamic in batch and length), applies the token-drop pass and the identity, exports both to
    ONNX under ``cache_dir/<key>/`` (reused when present), then runs :func:`prefill_bench` on a
    batch of one full-size sequence. Memory: ~0.8 GB per layer + 1 GB embeddings/lm_head in fp32;
    export and two ORT sessions take a few times that. Returns the bench dict plus ``config``,
    ``formula`` figures and ``wall_s``.
    """
    import torch

    from adatoken_compile.flops import arch_from_config, prefill_flops
    from adatoken_compile.compiler.export import ort_feeds
    from adatoken_compile.schedule import Cut, Schedule, identity

    t_start = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(int(threads))
    cuts = [Cut(int(l), float(k)) for l, k in (schedule_keep if schedule_keep is not None else [(1, 0.3)])]
    sched = Schedule(cuts=cuts, num_layers=layers, policy="bench").validate("synthetic_7b_width")
    cfg = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5)
    import transformers

    key_src = json.dumps({"cfg": cfg, "cuts": [(c.layer, c.keep) for c in cuts], "seed": seed,
                          "torch": torch.__version__, "transformers": transformers.__version__, "v": 1}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cdir = os.path.join(cache_dir or _default_cache(), f"llama7bw-L{layers}-{key}")
    os.makedirs(cdir, exist_ok=True)
    paths = {"pruned": os.path.join(cdir, "pruned.onnx"), "baseline": os.path.join(cdir, "baseline.onnx")}
    with open(os.path.join(cdir, "config.json"), "w") as f:
        f.write(key_src + "\n")

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg)
    arch = arch_from_config(config)
    if not all(os.path.exists(p) for p in paths.values()):
        from adatoken_compile.compiler.capture import capture
        from adatoken_compile.compiler.export import export_onnx
        from adatoken_compile.passes.token_drop import apply_token_drop

        _log(f"building random Llama: {layers} layers, hidden {hidden}, {heads}/{kv_heads} heads, "
             f"intermediate {intermediate}, vocab {vocab} (fp32)")
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.config._attn_implementation = "sdpa"
        model.eval()
        ex = synthetic_inputs(hidden, [(5, 12, 4), (3, 8, 2)], seed=seed)  # small: the graph is dynamic
        _log("capturing")
        gm = capture(model, ex)
        for name in ("baseline", "pruned"):
            if os.path.exists(paths[name]):
                continue
            g = gm if name == "baseline" else apply_token_drop(gm, sched)
            _log(f"exporting {name} -> {paths[name]}")
            t0 = time.perf_counter()
            export_onnx(g, ex, paths[name])
            _log(f"exported {name} in {time.perf_counter() - t0:.0f} s")
            del g
            gc.collect()
        del model, gm
        gc.collect()
    else:
        _log(f"using cached exports in {cdir}")
    n_text = prefix + suffix
    inputs = synthetic_inputs(hidden, [(prefix, spatial, suffix)], seed=seed + 1)
    feeds = ort_feeds(inputs)
    formula = {
        "pruned": prefill_flops(arch, n_text, sched.tokens_per_layer(spatial))["total"],
        "baseline": prefill_flops(arch, n_text, [spatial] * layers)["total"],
    }
    res = prefill_bench(paths["pruned"], paths["baseline"], feeds, repeats=repeats, warmup=warmup, threads=threads,
                        profile_runs=profile_runs, formula=formula, log=_log)
    res["config"] = {**cfg, "prefix": prefix, "spatial": spatial, "suffix": suffix, "batch": 1,
                     "schedule": [(c.layer, c.keep) for c in cuts],
                     "tokens_per_layer": sched.tokens_per_layer(spatial), "cache_dir": cdir, "dtype": "float32"}
    res["wall_s"] = time.perf_counter() - t_start
    _log(f"done in {res['wall_s']:.0f} s: latency ratio {res['latency_ratio']:.3f}, flops ratio "
         f"{res['flops_ratio']:.3f}, realized {res['realized_fraction']:.2f}, overhead {res['overhead_fraction']:.4f}")
    return res


# ----------------------------------------------------------------------------- plots / tables


def _atomic_savefig(fig, path: str) -> str:
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: str, title: str | None) -> str:
    """Grid, legend, optional title, atomic PNG write, figure closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    try:
        return _atomic_savefig(fig, path)
    finally:
        plt.close(fig)


def plot_pareto(points: Iterable[Mapping], path: str, *, highlight: str = "adaptive", title: str | None = None) -> str:
    """Accuracy vs prefill FLOPs ratio, one marker per policy; points of the ``highlight`` policy
    (several budgets) are joined by a thick line. points: ``{"policy", "flops_ratio", "accuracy"}``."""
    plt = _pyplot()
    groups: dict[str, list] = {}
    for p in points:
        groups.setdefault(str(p["policy"]), []).append((float(p["flops_ratio"]), float(p["accuracy"])))
    if not groups:
        raise ValueError("plot_pareto: no points")
    markers = "osD^v<>pP*Xh"
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (pol, pts) in enumerate(sorted(groups.items(), key=lambda kv: kv[0] != highlight)):
        pts.sort()
        xs, ys = zip(*pts)
        if pol == highlight:
            ax.plot(xs, ys, "-o", color="C3", lw=2.5, ms=8, label=pol, zorder=5)
        else:
            ax.plot(xs, ys, linestyle="--" if len(pts) > 1 else "none", marker=markers[i % len(markers)], ms=7,
                    lw=1, alpha=0.85, label=pol)
    ax.set_xlabel("prefill FLOPs ratio (pruned / unpruned)")
    ax.set_ylabel("accuracy")
    return _finish(plt, fig, ax, path, title)


def plot_keep_curves(schedules: Mapping[str, Any], path: str, *, n_spatial: int | None = None,
                     title: str | None = None) -> str:
    """Spatial tokens kept at each layer's input per policy: the keep ratio, or the token count
    when ``n_spatial`` is given. schedules: name -> :class:`~adatoken_compile.schedule.Schedule`."""
    plt = _pyplot()
    if not schedules:
        raise ValueError("plot_keep_curves: no schedules")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    others = iter(f"C{k}" for k in range(20) if k != 3)  # C3 (red) is reserved for adaptive
    for i, (name, s) in enumerate(schedules.items()):
        ys = s.tokens_per_layer(n_spatial) if n_spatial else s.keep_per_layer()
        xs = list(range(len(ys)))
        ax.step(xs, ys, where="post", lw=2.5 if name == "adaptive" else 1.5, label=name,
                color="C3" if name == "adaptive" else next(others),
                linestyle="--" if name.startswith("adaptive@") else "-")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"spatial tokens kept (of {n_spatial})" if n_spatial else "spatial tokens kept (ratio)")
    return _finish(plt, fig, ax, path, title)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Any], columns: Sequence[Any]) -> str:
    """GitHub markdown table. rows: dicts (or sequences in column order); columns: keys or
    ``(key, header)`` pairs. Floats get 4 significant digits, missing values are blank."""
    cols = [(c, str(c)) if not isinstance(c, (tuple, list)) else (c[0], str(c[1])) for c in columns]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for _, h in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        if isinstance(r, Mapping):
            vals = [r.get(k) for k, _ in cols]
        else:
            vals = list(r) + [None] * (len(cols) - len(r))
        lines.append("| " + " | ".join(_cell(v) for v in vals[: len(cols)]) + " |")
    return "\n".join(lines) + "\n"
