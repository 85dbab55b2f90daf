"""A random decoder at LLaVA-3D-7B width (reduced depth): prefill pruned vs unpruned through ONNX Runtime."""

from __future__ import annotations

import gc
import hashlib
import json
import math
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
from adatoken_compile.selection import PRIOR_BINS, at_layer

# ----------------------------------------------------------------------------- synthetic 7B width


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _default_cache() -> str:
    return os.environ.get("ADATOKEN_BENCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "adatoken_compile", "bench")


def synthetic_inputs(hidden: int, rows: Sequence[tuple[int, int, int]], seed: int = 0, scale: float = 1.0,
                     xyz: bool = False):
    """Left-padded DecoderInputs with random embeddings; rows = [(prefix, spatial, suffix), ...].

    ``xyz``: the spatial tokens also carry coordinates as LLaVA-3D's do, distinct voxel centres
    (0.2 m voxels of an 8 x 8 x 3 m room) in the order of their raveled voxel key, so sequence
    position follows x (drawn from their own generator: the embeddings do not change).
    """
    gen = torch.Generator().manual_seed(seed)
    gen_xyz = torch.Generator().manual_seed(seed + 7919)
    grid = (40, 40, 15)
    segs = []
    for n_pre, n_sp, n_post in rows:
        n = n_pre + n_sp + n_post
        spatial = torch.zeros(n, dtype=torch.bool)
        spatial[n_pre: n_pre + n_sp] = True
        coords = None
        if xyz:
            key = torch.randperm(math.prod(grid), generator=gen_xyz)[:n_sp].sort().values
            vox = torch.stack([key // (grid[1] * grid[2]), (key // grid[2]) % grid[1], key % grid[2]], dim=1)
            coords = torch.zeros(n, 3)
            coords[n_pre: n_pre + n_sp] = (vox.float() + 0.5) * 0.2
        segs.append(Segment(torch.randn(n, hidden, generator=gen) * scale, spatial, coords))
    return collate(segs)


def rule_schedule(cuts: Sequence[tuple[int, float]], layers: int, rule: str, where: str = "synthetic_7b_width") -> Schedule:
    """The cuts with ``rule`` at each (before layer 0 in its pre-LLM form; ``debiased`` with a flat
    prior: the prior's values do not change what the graph computes, only which tokens win)."""
    params = {"prior": [1.0] * PRIOR_BINS} if rule == "debiased" else {}
    out = [Cut(int(l), float(k), at_layer(rule, int(l), **params)) for l, k in cuts]
    return Schedule(cuts=out, num_layers=layers, policy="bench").validate(where)


def _export_missing(cfg: dict, graphs: dict[str, Schedule | None], paths: dict[str, str], seed: int) -> None:
    """Export every graph whose file is missing (None: the unpruned baseline) from one random model."""
    missing = [n for n in graphs if not os.path.exists(paths[n])]
    if not missing:
        _log(f"using cached exports in {os.path.dirname(paths[next(iter(paths))])}")
        return
    _log(f"building random Llama: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
         f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, intermediate "
         f"{cfg['intermediate_size']}, vocab {cfg['vocab_size']} (fp32)")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.config._attn_implementation = "sdpa"
    model.eval()
    ex = synthetic_inputs(cfg["hidden_size"], [(5, 12, 4), (3, 8, 2)], seed=seed, xyz=True)  # small: the graph is dynamic
    _log("capturing")
    gm = capture(model, ex)
    for name in missing:
        g = gm if graphs[name] is None else apply_token_drop(gm, graphs[name])
        _log(f"exporting {name} -> {paths[name]}")
        t0 = time.perf_counter()
        export_prefill(g, ex, paths[name])
        _log(f"exported {name} in {time.perf_counter() - t0:.0f} s")
        del g
        gc.collect()
    del model, gm
    gc.collect()


def synthetic_7b_width(layers: int = 2, spatial: int = 1400, prefix: int = 35, suffix: int = 20,
                       schedule_keep: Sequence[tuple[int, float]] | None = None, *, rules: Sequence[str] = ("last_token",),
                       hidden: int = 4096, heads: int = 32, kv_heads: int = 32, intermediate: int = 11008,
                       vocab: int = 32000, repeats: int = 5, warmup: int = 2, threads: int | None = 2,
                       cache_dir: str | None = None, seed: int = 0, profile_runs: int = 1,
                       providers: Sequence[str] = ("CPUExecutionProvider",)) -> dict:
    """Prefill benchmark of a random ``LlamaForCausalLM`` at LLaVA-3D-7B width (fp32), depth
    reduced to ``layers``, one sequence laid out as ``prefix`` system tokens, ``spatial`` spatial
    tokens (with voxel coordinates), ``suffix`` question tokens.

    ``schedule_keep``: cuts as ``[(layer, keep), ...]`` (default: one cut before layer 1 keeping
    0.3); ``rules``: the selection rules to measure, each at every cut. Captures the model
    (:func:`adatoken_compile.compiler.capture.capture`, small example; the graph is dynamic in batch
    and length) once, exports the identity and one pruned graph per rule to ONNX under
    ``cache_dir/<key>/`` (reused when present), then runs :func:`prefill_bench` (pruned against the
    identity, interleaved) on a batch of one full-size sequence per rule. Memory: ~0.8 GB per layer
    + 1 GB embeddings/lm_head in fp32; export and two ORT sessions take a few times that. Returns the
    first rule's bench dict plus ``config``, ``formula`` figures, ``onnx`` (the two graphs' paths) and ``wall_s``;
    with more than one rule, ``rules`` maps each to its own bench dict.
    """
    t_start = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(int(threads))
    cuts = [(int(l), float(k)) for l, k in (schedule_keep if schedule_keep is not None else [(1, 0.3)])]
    rules = list(dict.fromkeys(rules))
    if not rules:
        raise ValueError("synthetic_7b_width: no rule to measure")
    scheds = {r: rule_schedule(cuts, layers, r) for r in rules}
    cfg = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5)
    key_src = json.dumps({"cfg": cfg, "seed": seed, "torch": torch.__version__,
                          "transformers": transformers.__version__, "v": 2}, sort_keys=True)
    cdir = os.path.join(cache_dir or _default_cache(),
                        f"llama7bw-L{layers}-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}")
    os.makedirs(cdir, exist_ok=True)
    with open(os.path.join(cdir, "config.json"), "w") as f:
        f.write(key_src + "\n")

    def pruned_path(sched: Schedule) -> str:
        cut_src = json.dumps([c.to_dict() for c in sched.cuts], sort_keys=True)
        return os.path.join(cdir, f"pruned-{hashlib.sha256(cut_src.encode()).hexdigest()[:16]}.onnx")

    paths = {"baseline": os.path.join(cdir, "baseline.onnx"), **{r: pruned_path(s) for r, s in scheds.items()}}
    _export_missing(cfg, {"baseline": None, **scheds}, paths, seed)

    arch = arch_of(LlamaConfig(**cfg))
    n_text = prefix + suffix
    feeds = synthetic_inputs(hidden, [(prefix, spatial, suffix)], seed=seed + 1, xyz=True).to_numpy()
    baseline_flops = prefill_flops(arch, n_text, [spatial] * layers)["total"]
    per_rule = {}
    for r, sched in scheds.items():
        _log(f"rule {r}: {', '.join(f'L{c.layer}:{c.keep:g}' for c in sched.cuts)}")
        formula = {"pruned": prefill_flops(arch, n_text, sched.tokens_per_layer(spatial))["total"],
                   "baseline": baseline_flops}
        res = prefill_bench(paths[r], paths["baseline"], feeds, repeats=repeats, warmup=warmup, threads=threads,
                            profile_runs=profile_runs, formula=formula, log=_log, providers=providers)
        res["config"] = {**cfg, "prefix": prefix, "spatial": spatial, "suffix": suffix, "batch": 1, "rule": r,
                         "schedule": [(c.layer, c.keep) for c in sched.cuts],
                         "tokens_per_layer": sched.tokens_per_layer(spatial), "cache_dir": cdir, "dtype": "float32"}
        res["onnx"] = {"pruned": paths[r], "baseline": paths["baseline"]}
        _log(f"rule {r}: latency ratio {res['latency_ratio']:.3f}, flops ratio {res['flops_ratio']:.3f}, realized "
             f"{res['realized_fraction']:.2f}, overhead {res['overhead_fraction']:.4f}")
        per_rule[r] = res
    out = dict(per_rule[rules[0]])
    if len(rules) > 1:
        out["rules"] = per_rule
    out["wall_s"] = time.perf_counter() - t_start
    _log(f"done in {out['wall_s']:.0f} s")
    return out
