"""Decode per token at a given context, for several artifacts (or decode forms) in interleaved rounds.

One row of random embeddings with ``spatial`` spatial and ``text`` text tokens (35 before the
spatial block, as :func:`adatoken_compile.benchmarking.artifacts.bench_prefill_tokens` builds it)
is prefilled once per artifact and context: artifacts with the same prefill graph (the same model
and schedule, compiled with different decode graphs) share it. Each round then times ``steps``
greedy decode steps per variant, in turn; a variant's figure is the median over rounds of its mean
step time, with the bytes its steps moved across the session boundary
(:attr:`adatoken_compile.runtime.Runtime.last_transfer`).
"""

from __future__ import annotations

import time

import numpy as np

from adatoken_compile.errors import InputError
from adatoken_compile.runtime import load

PROMPT_PREFIX = 35


def synthetic_row(hidden: int, spatial: int, text: int, dtype, seed: int = 0) -> dict:
    if spatial < 1 or text < 2:
        raise InputError(f"context {spatial},{text}: give at least 1 spatial and 2 text tokens, e.g. 1400,60")
    prefix = min(PROMPT_PREFIX, text - 1)
    n = spatial + text
    sm = np.zeros((1, n), bool)
    sm[0, prefix:prefix + spatial] = True
    rng = np.random.default_rng(seed)
    return {"inputs_embeds": rng.standard_normal((1, n, hidden), dtype=np.float32).astype(dtype),
            "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n, dtype=np.int64)[None],
            "spatial_mask": sm}


def timed_steps(rt, prefill_out: dict, positions: np.ndarray, steps: int) -> list[float]:
    """Seconds of each decode step after a prefill (``steps`` of them, EOS ignored)."""
    times = []
    t = None
    for _ in rt.continue_ids(prefill_out, positions, steps + 1, ignore_eos=True):
        now = time.perf_counter()
        if t is not None:
            times.append(now - t)
        t = time.perf_counter()
    return times


def bench_decode(variants: dict, contexts: list[tuple[int, int]], *, steps: int = 16, rounds: int = 5,
                 threads: int | None = None, providers=None, log=None) -> dict:
    """``variants``: name -> ``(artifact path, prefill group, bind_kv)``; variants of one prefill
    group share its prefill outputs (same model and schedule). Returns per context and variant the
    median ms per token, all rounds, and the transfer counters."""
    say = log or (lambda *a: None)
    rts = {}
    for name, (path, _, bind) in variants.items():
        rts[name] = load(path, providers, threads=threads)
        rts[name].bind_kv = bind
    res: dict = {"steps": steps, "rounds": rounds, "threads": threads, "contexts": {}}
    for spatial, text in contexts:
        key = f"{spatial + text}"
        prefills = {}
        for name, (_, group, _) in variants.items():
            if group not in prefills:
                rt = rts[name]
                feeds = synthetic_row(rt.arch["hidden"], spatial, text, rt.embed.dtype)
                # positions in the artifact's declared layout
                feeds["position_ids"] = rt.positions.prefill(feeds["attention_mask"], feeds["spatial_mask"])
                t0 = time.perf_counter()
                prefills[group] = rt.prefill(feeds), rt.positions.start(feeds["attention_mask"], feeds["spatial_mask"])
                say(f"context {key}: prefill {group} {time.perf_counter() - t0:.1f} s")
        runs = {name: [] for name in variants}
        transfer = {}
        for name in variants:  # warm-up
            timed_steps(rts[name], *prefills[variants[name][1]], 2)
        for r in range(rounds):
            for name in variants:
                t = timed_steps(rts[name], *prefills[variants[name][1]], steps)
                runs[name].append(float(np.mean(t)))
                transfer[name] = dict(rts[name].last_transfer)
            say(f"context {key} round {r + 1}: " + ", ".join(f"{n} {runs[n][-1] * 1e3:.1f} ms" for n in variants))
        res["contexts"][key] = {
            name: {"ms_per_token": float(np.median(runs[name])) * 1e3, "rounds_ms": [x * 1e3 for x in runs[name]],
                   "kept_per_layer": [int(np.asarray(prefills[variants[name][1]][0][f"mask.{i}"]).sum())
                                      for i in range(rts[name].num_layers)],
                   **transfer[name]}
            for name in variants}
    return res
