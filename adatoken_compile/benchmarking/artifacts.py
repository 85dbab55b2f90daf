"""Pruned vs unpruned artifact, same inputs, one process: prefill and end-to-end figures.

Definitions (also in docs/results.md):

* prefill latency: one ``prefill.onnx`` run on prepared feeds (the encoder and voxel pooling are
  identical for both artifacts and excluded); end-to-end: prefill + ``new_tokens`` greedy decode
  steps with EOS ignored (a fixed-length answer); time to first token (TTFT): prefill + choosing
  the first token; per-token decode time: (end-to-end - TTFT) / (new_tokens - 1).
* Candidates alternate (pruned, baseline, pruned, ...) so machine noise hits both; medians with
  the 25th/75th percentiles as spread.
* FLOPs: :mod:`adatoken_compile.flops` (one formula, stated there) for the sample's real token
  counts, cross-checked against MatMul/Gemm FLOPs counted on the executed ORT graph
  (:func:`adatoken_compile.benchmarking.profile.flops_from_profile`). End-to-end FLOPs add the decode steps:
  per step and layer, linear 2*(H*(Hq+2Hkv) + Hq*H + 3*H*I) + attention 4*Hq*past_i, + lm_head.
* ``realized_fraction`` = (1 - latency_ratio) / (1 - flops_ratio): how much of the FLOPs-ideal
  time saving the measurement realises.
"""

from __future__ import annotations

import os
import time

import numpy as np

from adatoken_compile.arch import normalize as normalize_arch
from adatoken_compile.artifact import verify
from adatoken_compile.benchmarking.prefill import prefill_bench
from adatoken_compile.benchmarking.timing import realized_fraction
from adatoken_compile.errors import InputError, ScheduleMismatch
from adatoken_compile.flops import FORMULA, decode_flops, prefill_flops
from adatoken_compile.runtime import load
from adatoken_compile.runtime.session import choose_providers
from adatoken_compile.schedule import Schedule

PROMPT_PREFIX = 35  # text tokens before the spatial block in the llava_v1 prompt (system prompt + "USER:")


def _timed_generation(rt, feeds, new_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    ttft = None
    for _ in rt.generate_ids(feeds, max_new_tokens=new_tokens, ignore_eos=True):
        if ttft is None:
            ttft = time.perf_counter() - t0
    return ttft, time.perf_counter() - t0


def _stat(xs) -> dict:
    return {"median_s": float(np.median(xs)), "p25_s": float(np.percentile(xs, 25)),
            "p75_s": float(np.percentile(xs, 75)), "runs": [float(x) for x in xs]}


def formula_flops(arch: dict, sched, n_text: int, n_spatial: int) -> dict:
    """The formula's prefill FLOPs (:mod:`adatoken_compile.flops`), pruned and unpruned."""
    return {"pruned": prefill_flops(arch, n_text, sched.tokens_per_layer(n_spatial))["total"],
            "baseline": prefill_flops(arch, n_text, [n_spatial] * arch["num_layers"])["total"]}


def with_formula(pre: dict, f: dict, sched, n_text: int, n_spatial: int) -> dict:
    """Make a :func:`prefill_bench` result's ``flops_ratio`` (the one the realised fraction uses)
    the formula's ``f``; the executed graph's count stays as ``flops_ratio_graph``, its cross-check."""
    pre["flops_formula"] = {**f, "ratio": f["pruned"] / f["baseline"], "formula": FORMULA}
    pre["tokens"] = {"spatial": n_spatial, "text": n_text, "spatial_per_layer": sched.tokens_per_layer(n_spatial)}
    pre["flops_ratio_graph"] = pre["flops_ratio"]
    pre["flops_ratio"] = f["pruned"] / f["baseline"]
    pre["realized_fraction"] = realized_fraction(pre["latency_ratio"], pre["flops_ratio"])
    return pre


def bench_prefill_tokens(pruned_art: str, baseline_art: str, spatial: int, text: int, *, repeats: int = 3,
                         threads: int | None = None, providers=None, seed: int = 0, log=None) -> dict:
    """Pruned vs identity prefill of two artifacts on one row of random embeddings with ``spatial``
    spatial tokens and ``text`` text tokens (35 before the spatial block, as the llava_v1 prompt
    puts its system prompt, the rest after). Only the two prefill graphs are loaded (no encoder,
    no decode graph): what a 7B model's artifacts allow on a small machine, and the token counts
    of a real scene without rendering one. One profiled run and one warm-up per graph, then
    ``repeats`` interleaved rounds."""
    if spatial < 1 or text < 2:
        raise InputError(f"--tokens {spatial},{text}: give at least 1 spatial and 2 text tokens, e.g. 1400,60")
    say = log or (lambda *a: None)
    mp, mb = verify(pruned_art), verify(baseline_art)
    if mp.fingerprint != mb.fingerprint:
        raise ScheduleMismatch(f"{baseline_art}: baseline was compiled from another model than {pruned_art}")
    sched, base = Schedule.from_dict(mp.data["schedule"]), Schedule.from_dict(mb.data["schedule"])
    if base.effective_cuts():
        raise InputError(f"{baseline_art}: the baseline must be an identity-schedule artifact (compile it without --schedule)")
    arch = normalize_arch(mp.data["model"]["describe"], f"{pruned_art}/manifest.json")
    io = np.dtype((mp.data.get("precision") or {}).get("io_dtype", "float32"))
    prefix = min(PROMPT_PREFIX, text - 1)
    n = text + spatial
    rng = np.random.default_rng(seed)
    sm = np.zeros((1, n), bool)
    sm[0, prefix:prefix + spatial] = True
    feeds = {"inputs_embeds": rng.standard_normal((1, n, arch["hidden"]), dtype=np.float32).astype(io),
             "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n, dtype=np.int64)[None],
             "spatial_mask": sm}
    paths = {k: os.path.join(m.path, m.graphs["prefill"]["file"]) for k, m in (("pruned", mp), ("baseline", mb))}
    say(f"prefill at {spatial} spatial + {text} text tokens: profiling + interleaved timing")
    f = formula_flops(arch, sched, text, spatial)
    pre = prefill_bench(paths["pruned"], paths["baseline"], feeds, repeats=repeats, warmup=1, profile_runs=1,
                        threads=threads, providers=choose_providers(providers), formula=f, log=say)
    with_formula(pre, f, sched, text, spatial)
    return {"pruned_artifact": pruned_art, "baseline_artifact": baseline_art,
            "schedule": {"policy": sched.policy, "cuts": [{"layer": c.layer, "keep": c.keep} for c in sched.cuts]},
            "precision": mp.data.get("precision"), "provider": choose_providers(providers)[0], "prefill": pre}


def bench_artifacts(pruned_art: str, baseline_art: str, samples, *, repeats: int = 7, new_tokens: int = 16,
                    threads: int | None = None, providers=None, log=None) -> dict:
    """Figures for ``pruned_art`` against ``baseline_art`` (identity schedule, same model) on the first sample."""
    say = log or (lambda *a: None)
    rt_p, rt_b = load(pruned_art, providers), load(baseline_art, providers)
    fp_p = rt_p.manifest.data["model"]["fingerprint"]
    if rt_b.manifest.data["model"]["fingerprint"] != fp_p:
        raise ScheduleMismatch(f"{baseline_art}: baseline was compiled from another model than {pruned_art}")
    if rt_b.cuts:
        raise InputError(f"{baseline_art}: the baseline must be an identity-schedule artifact "
                         "(compile it without --schedule)")
    if new_tokens > 1 and not (rt_p.has_decode and rt_b.has_decode):
        raise InputError("bench: both artifacts need a decode graph for end-to-end figures; recompile without --no-decode")
    sample = samples[0]
    feeds = rt_p.prepare([sample])
    n_spatial = int(feeds["spatial_mask"].sum())
    n_text = int(feeds["attention_mask"].sum()) - n_spatial
    arch = rt_p.arch
    sched = rt_p.schedule
    f = formula_flops(arch, sched, n_text, n_spatial)
    f_p, f_b = f["pruned"], f["baseline"]

    say("prefill: profiling + interleaved timing")
    pre = prefill_bench(rt_p.graph_path("prefill"), rt_b.graph_path("prefill"), feeds, providers=rt_p.providers, repeats=repeats,
                              threads=threads, formula=f, log=say)
    with_formula(pre, f, sched, n_text, n_spatial)

    out_p, out_b = rt_p.prefill(feeds), rt_b.prefill(feeds)
    kv_p, kv_b = rt_p.kv_cache_bytes(out_p)[0], rt_b.kv_cache_bytes(out_b)[0]
    e2e = {"new_tokens": new_tokens}
    if new_tokens > 1:
        say(f"end to end: {new_tokens}-token answers, interleaved")
        for rt in (rt_p, rt_b):
            _timed_generation(rt, feeds, new_tokens)  # warm-up
        runs = {"pruned": [], "baseline": []}
        for _ in range(repeats):
            for name, rt in (("pruned", rt_p), ("baseline", rt_b)):
                runs[name].append(_timed_generation(rt, feeds, new_tokens))
        for name in runs:
            ttft = [a for a, _ in runs[name]]
            tot = [b for _, b in runs[name]]
            per_tok = [(b - a) / (new_tokens - 1) for a, b in runs[name]]
            e2e[name] = {"latency_s": _stat(tot), "ttft_s": _stat(ttft), "per_token_decode_s": _stat(per_tok)}
        e2e["latency_ratio"] = e2e["pruned"]["latency_s"]["median_s"] / e2e["baseline"]["latency_s"]["median_s"]
        e2e["ttft_ratio"] = e2e["pruned"]["ttft_s"]["median_s"] / e2e["baseline"]["ttft_s"]["median_s"]
        e2e["per_token_decode_ratio"] = (e2e["pruned"]["per_token_decode_s"]["median_s"]
                                         / e2e["baseline"]["per_token_decode_s"]["median_s"])
        past_p = [int(m[0].sum()) for m in (out_p[f"mask.{i}"] for i in range(rt_p.num_layers))]
        past_b = [int(m[0].sum()) for m in (out_b[f"mask.{i}"] for i in range(rt_b.num_layers))]
        ef_p = f_p + decode_flops(arch, past_p, new_tokens - 1)
        ef_b = f_b + decode_flops(arch, past_b, new_tokens - 1)
        e2e["flops"] = {"pruned": ef_p, "baseline": ef_b}
        e2e["flops_ratio"] = ef_p / ef_b
        e2e["realized_fraction"] = realized_fraction(e2e["latency_ratio"], e2e["flops_ratio"])
    e2e["kv_cache_bytes"] = {"pruned": kv_p, "baseline": kv_b, "ratio": kv_p / kv_b}
    return {
        "pruned_artifact": pruned_art,
        "baseline_artifact": baseline_art,
        "schedule": {"policy": sched.policy, "cuts": [{"layer": c.layer, "keep": c.keep} for c in sched.cuts]},
        "sample": {"question": sample.question, "seed": sample.meta.get("seed")},
        "provider": rt_p.provider,
        "prefill": pre,
        "end_to_end": e2e,
    }
