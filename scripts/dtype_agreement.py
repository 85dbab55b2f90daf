"""Does a calibration in another precision choose and answer as the float32 one does?

Evaluates the PyTorch model on the same test questions twice: in float32, pruned by the schedule
that a float32 calibration chose, and in ``--dtype``, pruned by the schedule a calibration in that
precision chose; prints both schedules, both accuracies, how often the two answer alike, and the
paired difference (with each precision's unpruned accuracy beside it).

    adatoken-compile calibrate --out runs/cal32
    adatoken-compile calibrate --dtype bfloat16 --out runs/cal16
    python scripts/dtype_agreement.py runs/cal32/schedule.json runs/cal16/schedule.json --limit 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("float32_schedule", help="schedule.json of the float32 calibration")
    ap.add_argument("other_schedule", help="schedule.json of the calibration in --dtype")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--model", default="llava3d-tiny")
    ap.add_argument("--data", default="builtin:test")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from adatoken_compile import api
    from adatoken_compile.evaluation.accuracy import agreement, paired
    from adatoken_compile.schedule import Schedule

    paths = {"float32": args.float32_schedule, args.dtype: args.other_schedule}
    scheds = {d: Schedule.load(p) for d, p in paths.items()}
    runs = {}
    for dtype, sched in scheds.items():
        for name, s in (("pruned", sched), ("unpruned", None)):
            t = time.time()
            runs[dtype, name] = r = api.evaluate(args.model, data=args.data, limit=args.limit,
                                                  schedule=paths[dtype] if s else None, dtype=dtype)
            print(f"{dtype} {name}: accuracy {r['accuracy']:.4f} on {r['n']} questions ({time.time() - t:.0f} s)",
                  flush=True)
    a, b = runs["float32", "pruned"]["predictions"], runs[args.dtype, "pruned"]["predictions"]
    out = {
        "model": args.model, "data": args.data, "questions": len(a),
        "schedules": {d: [[c.layer, c.keep, c.rule.label()] for c in s.cuts] for d, s in scheds.items()},
        "same_schedule": scheds["float32"].cuts == scheds[args.dtype].cuts,
        "accuracy": {f"{d} {n}": r["accuracy"] for (d, n), r in runs.items()},
        "answers_alike": agreement(b, a),
        "paired_vs_float32": paired(b, a),
    }
    print(json.dumps(out, indent=1, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
