"""A round of candidate schedules validated layer-major: one at a time against one prefix tree.

    python scripts/layered_round_bench.py [--model llava3d-tiny] [--holdout 32] [--keep 0.3] [--chunk-mb 0] \
        [--spill DIR]

The round is the FLOPs-budget search's kind: one single-cut candidate per first-cut layer (1 to
L-1, keep ratio ``--keep``), on ``--holdout`` held-back questions of ``builtin:calibration``, the
decoder's layers read from the checkpoint (``calibrate --engine layered``). Prints, per way, the
wall time, how many layers' weights were read and how many question-layers ran, and checks that
both give the same measurements. ``--chunk-mb``: the chunk budget (0: all batches in one chunk);
``--spill DIR``: a third way, the prefix tree with the states past that budget in memory-mapped
files under DIR (one pass over the weights).
"""

from __future__ import annotations

import argparse
import time

from adatoken_compile import api
from adatoken_compile.calibration import layered
from adatoken_compile.calibration.batches import input_batches
from adatoken_compile.schedule import Cut, Schedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava3d-tiny")
    ap.add_argument("--holdout", type=int, default=32)
    ap.add_argument("--keep", type=float, default=0.3)
    ap.add_argument("--chunk-mb", type=float, default=0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--spill", default=None)
    a = ap.parse_args()
    adapter = api.load_model(a.model, lazy=True)
    hold = input_batches(adapter, api.holdout_samples("builtin:calibration", a.holdout, 0))
    L = adapter.arch()["num_layers"]
    round_ = [Schedule([Cut(f, a.keep)], L, policy="adaptive") for f in range(1, L)]
    chunk = int(a.chunk_mb * 2**20) or None
    results = {}
    for rep in range(a.repeat):
        for way in ("one at a time", "prefix tree") + (("spilled tree",) if a.spill else ()):
            spill = layered.Spill(a.spill) if way == "spilled tree" else None
            streamed = layered.StreamedLayers(adapter.decoder, adapter.lazy_weights, "cpu", chunk, spill)
            cache = layered.validation_cache(streamed)
            cache.refs_for(adapter.decoder, hold)
            streamed.timings.clear()
            t0 = time.perf_counter()
            if way != "one at a time":
                ms = cache.measure_all(adapter.decoder, hold, round_)
            else:
                ms = [cache.measure(adapter.decoder, hold, s) for s in round_]
            wall = time.perf_counter() - t0
            if spill is not None:
                spill.close()
            results.setdefault(way, ms)
            assert ms == results["one at a time"], "the two ways measured differently"
            t = streamed.timings
            print(f"{way:>14}: {wall:6.2f} s, {int(t['validation_layer_reads'])} layer reads, "
                  f"{int(t['validation_sample_layers'])} question-layers, "
                  f"{spill.bytes / 1e6 if spill else 0:.0f} MB spilled, load wait {t.get('load_s', 0):.2f} s, "
                  f"in layers {t['validation_s']:.2f} s "
                  f"({len(round_)} candidates, {sum(b.batch_size for b in hold)} questions, {L} layers, run {rep + 1})")
    print("same measurements:", [round(m["agreement"], 4) for m in results["prefix tree"]])


if __name__ == "__main__":
    main()
