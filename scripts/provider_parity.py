"""An artifact on two execution providers: kept indices, greedy answers, prefill logits and time.

A provider is offered by ``--provider`` only once this agrees with the CPU provider. Torch-free:
run it in the environment of the provider under test (onnxruntime-openvino replaces onnxruntime)::

    PYTHONPATH=. ov/bin/python scripts/provider_parity.py ART --provider openvino --questions 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from adatoken_compile.benchmark3d.dataset import iter_samples
from adatoken_compile.runtime import load


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--provider", default="openvino", help="the provider compared with cpu")
    ap.add_argument("--questions", type=int, default=20, help="first test questions, in batches of 5")
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved prefill timings of the first batch")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    rts = {p: load(a.artifact, providers=p, threads=a.threads) for p in ("cpu", a.provider)}
    samples = list(iter_samples("test", limit=a.questions))
    batches = kept_same = rows_same = rows = 0
    worst = 0.0
    for i in range(0, len(samples), 5):
        group = [(s.scene, s.question) for s in samples[i:i + 5]]
        got = {}
        for p, rt in rts.items():
            feeds = rt.prepare(group)
            got[p] = (rt.prefill(feeds), np.stack(list(rt.generate_ids(feeds, max_new_tokens=a.new_tokens)), 1))
        (oc, ic), (oo, io) = got["cpu"], got[a.provider]
        batches += 1
        kept_same += all(np.array_equal(oc[k], oo[k]) for k in oc if k.startswith("kept."))
        rows_same += int((ic == io).all(axis=1).sum())
        rows += len(group)
        worst = max(worst, float(np.abs(oc["logits"].astype(np.float32) - oo["logits"].astype(np.float32)).max()))
    print(f"{a.provider} vs cpu, {rows} test questions: kept indices equal in {kept_same}/{batches} batches, "
          f"{a.new_tokens} greedy tokens equal in {rows_same}/{rows} rows, max |prefill logit diff| {worst:.2e}")
    feeds = {p: rt.prepare([(s.scene, s.question) for s in samples[:5]]) for p, rt in rts.items()}
    times = {p: [] for p in rts}
    for _ in range(a.rounds):
        for p, rt in rts.items():
            t0 = time.perf_counter()
            rt.prefill(feeds[p])
            times[p].append(time.perf_counter() - t0)
    med = {p: float(np.median(t)) for p, t in times.items()}
    print(f"prefill of 5 questions, median of {a.rounds} interleaved rounds, {a.threads} threads: "
          f"cpu {med['cpu']:.3f} s, {a.provider} {med[a.provider]:.3f} s, ratio {med[a.provider] / med['cpu']:.3f}")


if __name__ == "__main__":
    main()
