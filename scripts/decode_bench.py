"""Decode per token of several artifacts at several contexts, interleaved rounds (docs/results.md).

    python scripts/decode_bench.py --variant before=ART_OLD:id --variant after=ART_NEW:id \\
        --contexts 1400,60 2940,60 --threads 2 [--steps 16] [--rounds 5] [--json out.json]

``--variant NAME=ARTIFACT:GROUP[:numpy]``: variants of one GROUP share a prefill (same model and
schedule); ``:numpy`` runs a buffered decode graph with its buffers fed and fetched as numpy every
step instead of bound. Prints ms per token per context and variant, the ratio of every variant to
the first, growth per 1,000 context tokens (first to last context) and the KV / logits bytes that
crossed the session boundary per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adatoken_compile.benchmarking.decode import bench_decode  # noqa: E402
from adatoken_compile.errors import InputError  # noqa: E402


def parse_variant(text: str) -> tuple[str, tuple[str, str, bool]]:
    name, sep, rest = text.partition("=")
    parts = rest.split(":")
    if not sep or not name or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "numpy"):
        raise InputError(f"--variant {text!r}: write NAME=ARTIFACT:GROUP or NAME=ARTIFACT:GROUP:numpy")
    return name, (parts[0], parts[1], len(parts) == 2)


def parse_context(text: str) -> tuple[int, int]:
    try:
        s, t = (int(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--contexts {text!r}: write SPATIAL,TEXT, e.g. 1400,60") from None
    return s, t


def report(res: dict) -> list[str]:
    lines = []
    ctx = list(res["contexts"])
    names = list(res["contexts"][ctx[0]])
    lines.append(f"{'variant':<16}" + "".join(f"{c + ' tok':>14}" for c in ctx)
                 + (f"{'growth/1k':>12}" if len(ctx) > 1 else "") + f"{'KV B/step':>14}{'logits B/step':>15}")
    for n in names:
        ms = [res["contexts"][c][n]["ms_per_token"] for c in ctx]
        row = f"{n:<16}" + "".join(f"{m:>11.1f} ms" for m in ms)
        if len(ctx) > 1:
            row += f"{(ms[-1] - ms[0]) / ((int(ctx[-1]) - int(ctx[0])) / 1000):>9.1f} ms"
        last = res["contexts"][ctx[-1]][n]
        row += f"{last['kv_bytes_per_step']:>14.0f}{last['logits_bytes_per_step']:>15.0f}"
        lines.append(row)
    for n in names[1:]:
        lines.append(f"{n} / {names[0]}: " + ", ".join(
            f"{res['contexts'][c][n]['ms_per_token'] / res['contexts'][c][names[0]]['ms_per_token']:.3f} at {c}"
            for c in ctx))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--contexts", nargs="+", default=["1400,60", "2940,60"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--provider", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        variants = dict(parse_variant(v) for v in args.variant)
        contexts = [parse_context(c) for c in args.contexts]
        res = bench_decode(variants, contexts, steps=args.steps, rounds=args.rounds, threads=args.threads,
                           providers=args.provider, log=lambda m: print(m, flush=True))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for line in report(res):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
