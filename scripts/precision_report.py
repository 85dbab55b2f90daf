"""Parity and accuracy of other precisions of one model against its float32 artifact, on the same
test questions: greedy answers (accuracy, agreement, paired change), next-token logits and the
kept tokens. Measures what docs/deploying.md reports for the bundled model.

    python scripts/precision_report.py --reference ART32 --candidate float16=ART16 \\
        --candidate int4=ARTQ4 [--candidate pruned=P32 --candidate pruned_int4=PQ4] --limit 500 --out report.json

Each candidate is compared with the reference artifact of the same schedule when one is given
(``--same-schedule pruned_int4=pruned``), else with ``--reference``. Holds no GPU, no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package

from adatoken_compile.compiler.parity import compare_artifacts
from adatoken_compile.data import load_samples
from adatoken_compile.evaluation.accuracy import evaluate, paired
from adatoken_compile.evaluation.answers import runtime_answer_fn
from adatoken_compile.runtime import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="float32 identity artifact")
    ap.add_argument("--candidate", action="append", default=[], metavar="NAME=ART")
    ap.add_argument("--same-schedule", action="append", default=[], metavar="NAME=OTHER",
                    help="compare logits / kept tokens of NAME with candidate OTHER (same schedule)")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--data", default="builtin:test")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    arts = {"float32": args.reference, **dict(c.split("=", 1) for c in args.candidate)}
    pairs = dict(p.split("=", 1) for p in args.same_schedule)
    samples = load_samples(args.data, limit=args.limit)
    res = {"data": args.data, "n": len(samples), "artifacts": arts, "results": {}}
    preds = {}
    for name, path in arts.items():
        t0 = time.perf_counter()
        rt = load(path, "cpu", threads=args.threads)
        r = evaluate(runtime_answer_fn(rt), samples)
        preds[name] = r["predictions"]
        res["results"][name] = {"accuracy": r["accuracy"], "per_kind": r["per_kind"], "precision": rt.precision,
                                "schedule": [(c.layer, c.keep) for c in rt.schedule.cuts], "eval_s": time.perf_counter() - t0}
        print(f"{name}: accuracy {r['accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    for name in arts:
        if name == "float32":
            continue
        out = res["results"][name]
        out["vs_float32"] = paired(preds[name], preds["float32"])
        out["agreement_with_float32"] = sum(a["prediction"] == b["prediction"] for a, b in
                                            zip(preds[name], preds["float32"])) / len(samples)
        ref = pairs.get(name, "float32")
        if ref != "float32":
            out[f"vs_{ref}"] = paired(preds[name], preds[ref])
            out[f"agreement_with_{ref}"] = sum(a["prediction"] == b["prediction"] for a, b in
                                               zip(preds[name], preds[ref])) / len(samples)
        if out["schedule"] != res["results"][ref]["schedule"]:
            continue  # logits and kept tokens compare within one schedule
        par = compare_artifacts(arts[name], arts[ref], samples)
        out["parity"] = {k: v for k, v in par.items() if k not in ("candidate", "reference", "precision")}
        out["parity"]["against"] = ref
        print(f"{name} vs {ref}: {out['parity']}", file=sys.stderr, flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
