"""Prefill benchmark of two ONNX files on the same feeds: latency, FLOPs, overhead, memory."""

from __future__ import annotations

import gc
from typing import Mapping, Sequence

import numpy as np

from adatoken_compile.benchmarking.profile import _feeds_for, crosscheck, flops_from_profile, profile_nodes
from adatoken_compile.benchmarking.timing import interleaved, peak_rss_bytes, ratio, realized_fraction, reset_peak_rss, rss_bytes, speedup
from adatoken_compile.flops import FORMULA
from adatoken_compile.runtime.session import make_session

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
