"""Calibrated schedules against random tokens at the same counts, on scenes no built-in split holds.

    python scripts/random_control_check.py out/cal/schedule.json [more schedule.json ...] \
        --first-seed 9000000 --scenes 60 [--model llava3d-tiny]

The built-in splits hold scene seeds 0 to 4,000,000 (:data:`adatoken_compile.benchmark3d.dataset.SPLITS`);
``--first-seed`` picks procedural scenes past all of them. For every schedule it prints the
first-token accuracy of the schedule, of ``calibrate --policy random --like`` it (seed 0: random
tokens at the same cuts and counts) and of the unpruned model, and the paired difference schedule -
random over the same questions: the normal interval of the per-question differences
(:func:`adatoken_compile.evaluation.accuracy.paired`) and the exact McNemar test on the questions
where exactly one of the two is right (:func:`adatoken_compile.calibration.solver.paired_test`).
"""

from __future__ import annotations

import argparse
import json
import time

from adatoken_compile import api
from adatoken_compile.benchmark3d.dataset import SPLITS, iter_samples
from adatoken_compile.calibration.policies import peer_schedule
from adatoken_compile.calibration.solver import paired_test
from adatoken_compile.evaluation.accuracy import hit, paired, score
from adatoken_compile.evaluation.compare import Config, answer_all
from adatoken_compile.schedule import Schedule, identity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("schedules", nargs="+", help="schedule.json files of calibrations of --model")
    ap.add_argument("--model", default=None, help="checkpoint or bundled name [default: llava3d-tiny]")
    ap.add_argument("--first-seed", type=int, default=9_000_000)
    ap.add_argument("--scenes", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    top = max(hi for _, hi in SPLITS.values())
    if args.first_seed < top:
        ap.error(f"--first-seed {args.first_seed} is inside the built-in splits (seeds below {top})")
    adapter = api.load_model(args.model)
    L = adapter.arch()["num_layers"]
    configs = [Config("unpruned", "unpruned", identity(L))]
    for path in args.schedules:
        s = Schedule.load(path)
        configs += [Config(path, "calibrated", s),
                    Config(f"{path} random", "random", peer_schedule("random", L, like=s, seed=0))]
    t0 = time.time()
    samples = list(iter_samples("outside", seeds=range(args.first_seed, args.first_seed + args.scenes)))
    answer_all(adapter, samples, configs, batch_size=args.batch_size)
    right = {c.name: [hit(p["prediction"], [p["answer"]]) for p in c.predictions] for c in configs}
    out = {"model": adapter.name, "scenes": [args.first_seed, args.first_seed + args.scenes], "questions": len(samples),
           "seconds": round(time.time() - t0, 1),
           "unpruned": score(samples, [p["prediction"] for p in configs[0].predictions])["accuracy"], "schedules": []}
    for c, r in zip(configs[1::2], configs[2::2]):
        d = paired(c.predictions, r.predictions)
        t = paired_test(right[c.name], right[r.name])
        out["schedules"].append({
            "schedule": c.name, "cuts": ", ".join(f"L{x.layer}:{x.keep:g} {x.rule.label()}" for x in c.schedule.cuts),
            "accuracy": score(samples, [p["prediction"] for p in c.predictions])["accuracy"],
            "random_same_counts": score(samples, [p["prediction"] for p in r.predictions])["accuracy"],
            "delta_points": round(d["delta_points"], 2), "delta_ci95_points": [round(x, 2) for x in d["delta_ci95_points"]],
            "mcnemar": {"right_only_schedule": t["wins"], "right_only_random": t["losses"], "p_value": round(t["p_value"], 4),
                        "exact_ci95_points": [round(100 * x, 2) for x in t["ci95"]]}})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
