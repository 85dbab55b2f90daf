"""Fused vs decomposed attention in the exported prefill: interleaved timing and parity.

Builds a random Llama decoder (default: 1,024 wide, 8 layers, 16/4 heads, FFN 2,816, vocabulary
32,000, float32), exports the identity and the pruned prefill each way (``attention="fused"``:
one GroupQueryAttention per layer; ``"decomposed"``: the exporter's MatMul / Softmax lowering) and
runs the four graphs round-robin on one row of random embeddings per token count, same thread
count. Prints the median per graph, the fused/decomposed ratios (the machine is shared: ratios of
interleaved runs are the figure to read), and the parity of the fused graphs against the
decomposed ones (kept indices, greedy token, logits). ``--provider`` picks the execution provider
(``--provider openvino`` under onnxruntime-openvino).

    PYTHONPATH=. python scripts/attention_bench.py --tokens 500,1460,3000 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import numpy as np


def _log(msg: str) -> None:
    print(f"[attention-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export_graphs(out: str, cuts, *, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                  dtype: str, seed: int, model: str | None = None, int4: bool = False) -> dict[str, str]:
    """The four prefill graphs under ``out`` (reused when present); ``model``: a checkpoint or
    bundled name whose decoder is exported instead of a random one."""
    names = [f"{s}-{a}" for s in ("identity", "pruned") for a in ("fused", "decomposed")]
    paths = {n: os.path.join(out, f"{n}.onnx") for n in names}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adatoken_compile.benchmarking.synthetic import rule_schedule, synthetic_inputs
    from adatoken_compile.compiler.capture import capture, export_prefill
    from adatoken_compile.compiler.weights import Quantization
    from adatoken_compile.passes.token_drop import apply_token_drop

    torch.manual_seed(seed)
    if model is not None:
        from adatoken_compile.api import load_model

        model = load_model(model, dtype=dtype).decoder.eval()
        hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    else:
        cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                          max_position_embeddings=8192, rms_norm_eps=1e-5)
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
        model.config._attn_implementation = "sdpa"
    ex = synthetic_inputs(hidden, [(5, 12, 4), (3, 8, 2)], seed=seed)
    ex.inputs_embeds = ex.inputs_embeds.to(getattr(torch, dtype))
    gm = capture(model, ex)
    sched = rule_schedule(cuts, layers, "last_token", where="attention_bench")
    graphs = {"identity": gm, "pruned": apply_token_drop(gm, sched)}
    for n, p in paths.items():
        kind, attention = n.split("-")
        t0 = time.perf_counter()
        res = export_prefill(graphs[kind], ex, p, attention=attention, quantize=Quantization() if int4 else None)
        _log(f"exported {n} ({res.fused_attention} fused attention ops) in {time.perf_counter() - t0:.0f} s")
        gc.collect()
    return paths


def feeds_for(n: int, hidden: int, dtype: str, seed: int) -> dict[str, np.ndarray]:
    prefix, suffix = 35, 20
    rng = np.random.default_rng(seed)
    sm = np.zeros((1, n), bool)
    sm[0, prefix:n - suffix] = True
    return {"inputs_embeds": rng.standard_normal((1, n, hidden), dtype=np.float32).astype(dtype),
            "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n, dtype=np.int64)[None],
            "spatial_mask": sm}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1460", help="comma-separated prompt lengths (default 1460)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cuts", default="1:0.7,2:0.4", help="layer:keep,... of the pruned graph")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--int4", action="store_true", help="int4 weights (MatMulNBits), as compile --quantize int4")
    ap.add_argument("--provider", default=None, help="execution provider (runtime --provider names)")
    ap.add_argument("--model", default=None, help="a checkpoint or bundled name (llava3d-tiny): its decoder "
                    "instead of a random one (its own width and depth)")
    ap.add_argument("--graphs", default=None, help="folder for the exported graphs (reused when present)")
    ap.add_argument("--kinds", default="identity,pruned", help="which pairs to load (one pair at 3,000 tokens "
                    "keeps the four sessions' arenas out of memory)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from adatoken_compile.benchmarking.timing import interleaved
    from adatoken_compile.runtime.session import choose_providers, make_session

    cuts = [(int(l), float(k)) for l, k in (c.split(":") for c in a.cuts.split(","))]
    out = a.graphs or tempfile.mkdtemp(prefix="attention-bench-")
    paths = export_graphs(out, cuts, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                          ffn=a.ffn, vocab=a.vocab, dtype=a.dtype, seed=a.seed, model=a.model,
                          int4=a.int4)

    providers = choose_providers(a.provider)
    kinds = a.kinds.split(",")
    sessions = {n: make_session(p, providers, threads=a.threads) for n, p in paths.items() if n.split("-")[0] in kinds}
    hidden = next(iter(sessions.values())).get_inputs()[0].shape[2]
    _log(f"provider {providers[0]}, {a.threads} threads, graphs in {out}")
    for n_tok in (int(t) for t in a.tokens.split(",")):
        feeds = feeds_for(n_tok, hidden, a.dtype, a.seed + 1)
        outs = {}
        for n, s in sessions.items():  # warm-up, and the outputs parity is read from
            names = [o.name for o in s.get_outputs()]
            outs[n] = dict(zip(names, s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})))
        runs = {n: (lambda s=s: s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()}))
                for n, s in sessions.items()}
        # the run above was the warm-up
        med = {n: st["median_s"] for n, st in interleaved(runs, repeats=a.rounds, warmup=0).items()}
        print(f"tokens {n_tok}: " + ", ".join(f"{n} {med[n]:.3f} s" for n in med))
        for kind in kinds:
            f, d = outs[f"{kind}-fused"], outs[f"{kind}-decomposed"]
            kept = all(np.array_equal(f[k], d[k]) for k in f if k.startswith("kept."))
            lf, ld = f["logits"].astype(np.float32), d["logits"].astype(np.float32)
            print(f"  {kind}: fused/decomposed {med[f'{kind}-fused'] / med[f'{kind}-decomposed']:.3f}; kept indices "
                  f"{'equal' if kept else 'DIFFER'}, greedy token {'equal' if (lf.argmax(-1) == ld.argmax(-1)).all() else 'DIFFERS'}, "
                  f"max |logit diff| {float(np.abs(lf - ld).max()):.2e} (logit scale {float(np.abs(ld).max()):.2f})")
        if len(kinds) == 2:
            print(f"  pruned-fused / identity-decomposed {med['pruned-fused'] / med['identity-decomposed']:.3f}, "
                  f"pruned-fused / identity-fused {med['pruned-fused'] / med['identity-fused']:.3f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
