"""Parity of compiled artifacts with the PyTorch reference (the README's bench section).

    OMP_NUM_THREADS=2 python -m reference_model.experiments.parity runs/quickstart/artifacts/adaptive \
        runs/quickstart/artifacts/identity [--n 16] [--batch 4]

For each artifact: the first N test questions of the bundled model in padded batches, last-token
logits of ``prefill.onnx`` (ONNX Runtime CPU) against ``compiler.reference.pruned_prefill`` with the
artifact's own schedule; prints the max |ORT - PyTorch| and whether the kept indices agree.
"""
import argparse

import numpy as np
import torch

from adatoken_compile.benchmark3d.dataset import iter_samples
from adatoken_compile.models.registry import DEFAULT_MODEL, load_adapter
from adatoken_compile.compiler.reference import pruned_prefill
from adatoken_compile.runtime.engine import load
from adatoken_compile.schedule import Schedule


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    ad = load_adapter(DEFAULT_MODEL)
    qs = list(iter_samples("test", limit=a.n))
    for art in a.artifacts:
        rt = load(art)
        sched = Schedule.from_dict(rt.manifest.data["schedule"], where=f"{art}/manifest.json")
        worst, kept_same = 0.0, True
        for i in range(0, len(qs), a.batch):
            group = qs[i : i + a.batch]
            got = rt.prefill(rt.prepare([(s.scene, s.question) for s in group]))
            with torch.no_grad():
                ref = pruned_prefill(ad.decoder, ad.prepare(group), sched)
            worst = max(worst, float(np.abs(got["logits"] - ref.logits_last.numpy()).max()))
            for j, idx in enumerate(ref.kept_indices):
                kept_same &= bool(np.array_equal(got[f"kept.{j}"], idx.numpy()))
        cuts = ", ".join(f"L{c.layer}:{c.keep:g}" for c in sched.effective_cuts()) or "none"
        print(f"{art}: cuts {cuts}; {len(qs)} questions in batches of {a.batch}; "
              f"max |ORT - PyTorch| last-token logits {worst:.2e}; kept indices equal: {kept_same}")


if __name__ == "__main__":
    main()
