"""A random decoder at LLaVA-3D-7B width (reduced depth): prefill pruned vs unpruned through ONNX Runtime."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from typing import Sequence

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from adatoken_compile.arch import from_config as arch_of
from adatoken_compile.benchmarking.prefill import prefill_bench
from adatoken_compile.compiler.capture import capture, export_prefill
from adatoken_compile.contract import Segment, collate
from adatoken_compile.flops import prefill_flops
from adatoken_compile.passes.token_drop import apply_token_drop
from adatoken_compile.schedule import Cut, Schedule

# ----------------------------------------------------------------------------- synthetic 7B width


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _default_cache() -> str:
    return os.environ.get("ADATOKEN_BENCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "adatoken_compile", "bench")


def synthetic_inputs(hidden: int, rows: Sequence[tuple[int, int, int]], seed: int = 0, scale: float = 1.0):
    """Left-padded DecoderInputs with random embeddings; rows = [(prefix, spatial, suffix), ...]."""
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
                       profile_runs: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)) -> dict:
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
    t_start = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(int(threads))
    cuts = [Cut(int(l), float(k)) for l, k in (schedule_keep if schedule_keep is not None else [(1, 0.3)])]
    sched = Schedule(cuts=cuts, num_layers=layers, policy="bench").validate("synthetic_7b_width")
    cfg = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5)
    key_src = json.dumps({"cfg": cfg, "cuts": [(c.layer, c.keep) for c in cuts], "seed": seed,
                          "torch": torch.__version__, "transformers": transformers.__version__, "v": 1}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cdir = os.path.join(cache_dir or _default_cache(), f"llama7bw-L{layers}-{key}")
    os.makedirs(cdir, exist_ok=True)
    paths = {"pruned": os.path.join(cdir, "pruned.onnx"), "baseline": os.path.join(cdir, "baseline.onnx")}
    with open(os.path.join(cdir, "config.json"), "w") as f:
        f.write(key_src + "\n")

    config = LlamaConfig(**cfg)
    arch = arch_of(config)
    if not all(os.path.exists(p) for p in paths.values()):
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
            export_prefill(g, ex, paths[name])
            _log(f"exported {name} in {time.perf_counter() - t0:.0f} s")
            del g
            gc.collect()
        del model, gm
        gc.collect()
    else:
        _log(f"using cached exports in {cdir}")
    n_text = prefix + suffix
    inputs = synthetic_inputs(hidden, [(prefix, spatial, suffix)], seed=seed + 1)
    feeds = inputs.to_numpy()
    formula = {
        "pruned": prefill_flops(arch, n_text, sched.tokens_per_layer(spatial))["total"],
        "baseline": prefill_flops(arch, n_text, [spatial] * layers)["total"],
    }
    res = prefill_bench(paths["pruned"], paths["baseline"], feeds, repeats=repeats, warmup=warmup, threads=threads,
                        profile_runs=profile_runs, formula=formula, log=_log, providers=providers)
    res["config"] = {**cfg, "prefix": prefix, "spatial": spatial, "suffix": suffix, "batch": 1,
                     "schedule": [(c.layer, c.keep) for c in cuts],
                     "tokens_per_layer": sched.tokens_per_layer(spatial), "cache_dir": cdir, "dtype": "float32"}
    res["wall_s"] = time.perf_counter() - t_start
    _log(f"done in {res['wall_s']:.0f} s: latency ratio {res['latency_ratio']:.3f}, flops ratio "
         f"{res['flops_ratio']:.3f}, realized {res['realized_fraction']:.2f}, overhead {res['overhead_fraction']:.4f}")
    return res
