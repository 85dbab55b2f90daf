"""One decode step of this tool's decode graphs and ONNX Runtime GenAI's, side by side: interleaved
wall-clock and onnxruntime's per-op kernel times (docs/results.md).

    python scripts/decode_profile.py --peer PEERS/work/ort-genai-int4 \\
        --ours ART_A/decode.onnx --ours ART_B/decode.onnx --context 1460 --reps 40 [--profile]

Each graph runs in its own session (``--threads`` intra-op threads), its KV buffers bound once
with IO binding as both past and present, ``--context`` valid positions, one row; the steps of all
graphs alternate, so a shared machine's load falls on each alike. Prints per graph the median and
25th percentile step time and their ratio to the peer's; ``--profile`` adds the kernel time per op
type per step and the time the session spent outside kernels. The values are random: this times
the graphs, not a generation (scripts/bench_peers.py does that).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
from adatoken_compile.runtime.session import make_session  # noqa: E402


def session(path: str, threads: int, profile: str | None):
    # the runtime's own session options (ORT_ENABLE_ALL, inter-op 1), on the CPU provider
    return make_session(path, threads=threads, profile_prefix=profile or None)


def buffers(s, io, past: str, present, context: int, rng, dims=None) -> list:
    """Every past input bound, with its present, to one (1, KVH, context + 16, D) buffer
    (``dims``: (KVH, D) where the graph leaves them symbolic)."""
    keep = []
    for i in s.get_inputs():
        if not i.name.startswith(past):
            continue
        kvh, d = dims or (i.shape[1], i.shape[3])
        v = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, kvh, context + 16, d), dtype=np.float32))
        io.bind_ortvalue_input(i.name, v)
        io.bind_ortvalue_output(present(i.name), v)
        keep.append(v)
    return keep


def ours_step(path: str, context: int, threads: int, profile: str | None, rng):
    s = session(path, threads, profile)
    io = s.io_binding()
    keep = buffers(s, io, "past_key.", lambda n: n.replace("past_", "present_"), context, rng)
    keep += buffers(s, io, "past_value.", lambda n: n.replace("past_", "present_"), context, rng)
    hidden = s.get_inputs()[0].shape[-1]
    feeds = {"inputs_embeds": rng.standard_normal((1, 1, hidden), dtype=np.float32),
             "position_ids": np.array([[context]], np.int64)}
    lengths = [i.name for i in s.get_inputs() if i.name.startswith("past_length.")]
    length = np.array([context], np.int32)
    io.bind_output("logits")

    def step():
        for k, v in feeds.items():
            io.bind_cpu_input(k, v)
        for n in lengths:
            io.bind_cpu_input(n, length)
        s.run_with_iobinding(io)

    return s, step, keep


def peer_step(folder: str, context: int, threads: int, profile: str | None, rng):
    with open(os.path.join(folder, "genai_config.json")) as f:
        dec = json.load(f)["model"]["decoder"]
    s = session(os.path.join(folder, dec["filename"]), threads, profile)
    io = s.io_binding()
    names = dec["inputs"]
    past_k, past_v = names["past_key_names"], names["past_value_names"]
    out_k, out_v = dec["outputs"]["present_key_names"], dec["outputs"]["present_value_names"]
    layers = int(dec["num_hidden_layers"])
    back = {past_k % i: out_k % i for i in range(layers)} | {past_v % i: out_v % i for i in range(layers)}
    dims = (int(dec["num_key_value_heads"]), int(dec["head_size"]))
    keep = [v for prefix in {past_k.split("%")[0], past_v.split("%")[0]}
            for v in buffers(s, io, prefix, back.get, context, rng, dims)]
    ids, mask = np.array([[5]], np.int64), np.ones((1, context + 1), np.int64)
    io.bind_output("logits")

    def step():
        io.bind_cpu_input(names["input_ids"], ids)
        io.bind_cpu_input(names["attention_mask"], mask)
        s.run_with_iobinding(io)

    return s, step, keep


def kernel_times(s) -> tuple[dict, float, int]:
    """Per op type: kernel ms per step; ms per step outside kernels; steps profiled."""
    with open(s.end_profiling()) as f:
        events = json.load(f)
    per_op: dict = collections.defaultdict(float)
    runs, total = 0, 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"].get("op_name")] += e["dur"] / 1e3
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs, total = runs + 1, total + e["dur"] / 1e3
    runs = max(runs, 1)
    return {k: v / runs for k, v in per_op.items()}, (total - sum(per_op.values())) / runs, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", required=True, help="an ORT GenAI model folder (genai_config.json)")
    ap.add_argument("--ours", action="append", required=True, help="a decode.onnx with past_length inputs")
    ap.add_argument("--context", type=int, default=1460)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    for p in [a.peer] + a.ours:
        if not os.path.exists(p):
            print(f"error: {p}: not found ; give an ORT GenAI folder and decode.onnx files", file=sys.stderr)
            sys.exit(2)
    rng = np.random.default_rng(0)
    prof = (lambda tag: os.path.join(os.environ.get("TMPDIR", "/tmp"), f"decode_profile_{tag}")) if a.profile else (lambda tag: None)
    steps = {"ORT GenAI": peer_step(a.peer, a.context, a.threads, prof("peer"), rng)}
    for i, p in enumerate(a.ours):
        steps[f"ours {i}: {p}"] = ours_step(p, a.context, a.threads, prof(f"ours{i}"), rng)
    for _, step, _ in steps.values():
        step()
        step()
    times = {n: [] for n in steps}
    for _ in range(a.reps):
        for n, (_, step, _) in steps.items():
            t = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - t)
    ref = times["ORT GenAI"]
    print(f"decode step at {a.context} tokens, {a.reps} interleaved steps each, {a.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    for n, t in times.items():
        print(f"{n}: median {np.median(t) * 1e3:.2f} ms (x{np.median(t) / np.median(ref):.3f}), "
              f"p25 {np.percentile(t, 25) * 1e3:.2f} ms (x{np.percentile(t, 25) / np.percentile(ref, 25):.3f})")
    if a.profile:
        for n, (s, _, _) in steps.items():
            ops, outside, runs = kernel_times(s)
            print(f"{n}: kernels {sum(ops.values()):.2f} ms "
                  f"per step, outside kernels {outside:.2f} ms ({runs} steps)")
            for op, ms in sorted(ops.items(), key=lambda x: -x[1]):
                print(f"    {op:34s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
