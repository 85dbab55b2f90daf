"""The main job: calibrate -> compile -> eval -> bench on the bundled model, adaptive vs peers.

Everything lands in one output directory (written under a temporary name, renamed at the end):

    calibration/            schedule.json, stats, report.md + plots of the adaptive calibration
    schedules/<policy>.json every compared schedule (peers, adaptive, adaptive at each peer's FLOPs)
    artifacts/identity/     unpruned (identity-schedule) ONNX artifact
    artifacts/adaptive/     the pruned ONNX artifact
    artifacts/<policy>/     prefill-only artifacts of the other policies (prefill latency)
    results.json            every figure below, machine-readable
    predictions.json        every policy's answer to every test question (paired comparisons)
    summary.md              the summary table
    pareto.png              accuracy vs prefill FLOPs ratio, every policy
    keep_curves.png         kept spatial tokens per layer, every policy

Accuracy of every policy comes from the same greedy answers on the same test questions. For the
identity and adaptive schedules it is measured through ONNX Runtime (the shipped artifact); for
the other policies through the PyTorch reference of the same pruned prefill + KV-cache decode
(:func:`adatoken_compile.compiler.reference.generate`, token-for-token equal to ORT in the tests), unless
``all_artifacts`` asks for ORT everywhere.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
from tqdm import tqdm

from adatoken_compile import api
from adatoken_compile.benchmarking.artifacts import bench_artifacts
from adatoken_compile.benchmarking.report import markdown_table, plot_keep_curves, plot_pareto
from adatoken_compile.calibration.api import derive_schedule
from adatoken_compile.calibration.policies import DECODER_PEERS, peer_schedule
from adatoken_compile.calibration.solver import DEFAULT_FIDELITY, ValidationCache, require_rows
from adatoken_compile.compiler.pipeline import compile_artifact
from adatoken_compile.data import load_samples
from adatoken_compile.environment import environment
from adatoken_compile.errors import InputError
from adatoken_compile.evaluation.accuracy import evaluate, paired
from adatoken_compile.evaluation.answers import reference_answer_fn, runtime_answer_fn
from adatoken_compile.flops import schedule_flops
from adatoken_compile.io import atomic_dir, check_output
from adatoken_compile.runtime import load
from adatoken_compile.schedule import Schedule, identity

# the main job's peers: the decoder peers, and a random choice at the adaptive schedule's cuts
PEERS = (*DECODER_PEERS, "random")
# exporting a graph is mostly single-threaded Python: the peers' artifacts compile side by side, in
# processes that each hold a copy of the model (only for models this small)
PARALLEL_COMPILE_MAX_PARAMS = 200_000_000

_worker_adapter = None


def _start_worker(model) -> None:
    global _worker_adapter
    torch.set_num_threads(1)
    _worker_adapter = api.load_model(model)


def _compile_in_worker(schedule: dict, path: str, decode: bool, reuse: str) -> str:
    compile_artifact(_worker_adapter, Schedule.from_dict(schedule), path, progress=False, decode=decode, reuse=reuse)
    return path


def compile_side_by_side(model, adapter, jobs: list[tuple[Schedule, str]], *, decode: bool, reuse: str,
                         workers: int = 2) -> None:
    """Compile ``(schedule, path)`` jobs: in ``workers`` processes when the machine has the cores
    and the model is small, else one after the other in this process."""
    small = sum(p.numel() for p in adapter.decoder.parameters()) <= PARALLEL_COMPILE_MAX_PARAMS
    workers = min(workers, len(jobs), os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="compile", unit="artifact")
    if workers < 2 or not small:
        for sched, path in jobs:
            compile_artifact(adapter, sched, path, progress=False, decode=decode, reuse=reuse)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                                 initargs=(model,)) as pool:
            for done in as_completed([pool.submit(_compile_in_worker, s.to_dict(), p, decode, reuse) for s, p in jobs]):
                done.result()
                bar.update()
    bar.close()


def _fmt_cuts(s) -> str:
    return ", ".join(f"L{c.layer}:{c.keep:.3g}" for c in s.effective_cuts()) or "none"


def example_table(base: list[dict], pruned: list[dict]) -> str:
    """The first test scene's questions: ground truth next to the unpruned and the adaptive artifact's
    answers (both through ONNX Runtime), so the main job shows what the model is asked and says."""
    seed = base[0]["seed"]
    rows = [{"question": b["question"], "kind": b["kind"], "truth": b["answer"], "none": b["prediction"],
             "adaptive": a["prediction"]} for b, a in zip(base, pruned) if b["seed"] == seed]
    cols = [("question", "question"), ("kind", "kind"), ("truth", "ground truth"), ("none", "unpruned answer"),
            ("adaptive", "adaptive answer")]
    return f"Example: the questions of test scene {seed}\n\n" + markdown_table(rows, cols)


class _Stages:
    """Numbered stage lines with the wall time of each, for the progress log and results.json."""

    def __init__(self, log, total: int):
        self.log, self.total, self.n, self.t = log, total, 0, time.time()
        self.times: dict[str, float] = {}
        self.name = None

    def next(self, name: str, msg: str) -> None:
        self.close()
        self.n += 1
        self.name, self.t = name, time.time()
        self.log(f"[{self.n}/{self.total}] {msg}")

    def close(self) -> None:
        if self.name is not None:
            self.times[self.name] = round(time.time() - self.t, 1)
            self.log(f"      {self.name} done in {self.times[self.name]:.0f} s")
            self.name = None


def run_quickstart(out: str, *, limit: int = 60, samples: int | None = None, holdout: int | None = None,
                   repeats: int = 3, all_artifacts: bool = False, model: str | None = None,
                   fidelity: float | None = None, overwrite: bool = False, log=print) -> str:
    """The main job; see the module docstring for what lands in ``out``. Returns the summary text."""
    samples = api.SAMPLES if samples is None else samples
    holdout = api.HOLDOUT if holdout is None else holdout
    target = DEFAULT_FIDELITY if fidelity is None else fidelity
    if not (0.0 < target < 1.0):
        raise InputError(f"quickstart: --fidelity {target} must be in (0, 1)")
    require_rows(holdout, target, "quickstart")  # the solver's own check, before anything runs or is written
    check_output(out, "quickstart", overwrite=overwrite)
    t0 = time.time()
    with atomic_dir(out, "quickstart", overwrite=overwrite, marker=True) as tmp:
        os.makedirs(os.path.join(tmp, "schedules"))
        os.makedirs(os.path.join(tmp, "artifacts"))
        summary = _run(tmp, out, t0, limit=limit, samples=samples, holdout=holdout, repeats=repeats,
                       all_artifacts=all_artifacts, model=model, fidelity=fidelity, log=log)
    return summary + f"\n\nwrote {out}/ (results.json, summary.md, predictions.json, pareto.png, keep_curves.png, artifacts/)"


def _run(tmp, out, t0, *, limit, samples, holdout, repeats, all_artifacts, model, fidelity, log) -> str:
    stages = _Stages(log, 5)
    adapter = api.load_model(model)
    fp, L = adapter.fingerprint(), adapter.arch()["num_layers"]
    arch = adapter.arch()
    model_kw = dict(fingerprint=fp, family=adapter.family, model_name=adapter.name)

    # ------------------------------------------------------------------ 1. calibrate
    stages.next("calibrate", f"calibrate: statistics of {samples} calibration questions, adaptive schedules validated on "
                f"{holdout} others")
    # the same path and defaults as `adatoken-compile calibrate`; the held-back rows and the measured
    # schedules are shared with the adaptive solves at the peers' FLOPs below
    cache = ValidationCache()
    cal = api.calibrate(adapter, samples=samples, holdout=holdout, fidelity=fidelity, cache=cache,
                        out=os.path.join(tmp, "calibration"))
    sched_a, stats = cal.schedule, cal.stats
    n_sp, n_tx = stats.mean_spatial_tokens(), stats.mean_text_tokens()
    schedules = {"none": identity(L, **model_kw), "adaptive": sched_a}
    for p in PEERS:
        schedules[p] = peer_schedule(p, L, like=sched_a if p == "random" else None, seed=0, **model_kw)
    # the side table's matched-FLOPs solves are the count search alone (last_token, no rule stage):
    # comparing every rule again at each peer's FLOPs, with no early stop in a budget search, took
    # longer than the whole calibration
    for p in DECODER_PEERS:
        budget = schedule_flops(arch, schedules[p], n_sp, n_tx)["flops_ratio"]
        log(f"      adaptive at {p}'s prefill FLOPs ratio {budget:.3f}")
        s = derive_schedule(adapter.decoder, stats, cal.holdout, policy="adaptive", flops_budget=budget, seed=0,
                            progress=False, family=adapter.family, model_name=adapter.name, max_validations=2,
                            cache=cache, rules=())
        s.policy = f"adaptive@{p}"
        schedules[f"adaptive@{p}"] = s
    flops = {}
    for name, s in schedules.items():
        s.fingerprint = fp
        s.save(os.path.join(tmp, "schedules", f"{name}.json"))
        flops[name] = schedule_flops(arch, s, n_sp, n_tx)["flops_ratio"]

    # ------------------------------------------------------------------ 2. compile
    stages.next("compile", "compile: identity and adaptive artifacts (prefill + decode)")
    arts = {}
    for name in ("none", "adaptive"):
        path = os.path.join(tmp, "artifacts", "identity" if name == "none" else name)
        # the encoder and decode graphs do not depend on the schedule: exported once, for the identity
        compile_artifact(adapter, schedules[name], path, progress=False, reuse=arts.get("none"))
        arts[name] = path
    # peers always get a (prefill-only) artifact for their latency; the adaptive schedules solved at
    # each peer's FLOPs only with --all-artifacts (their accuracy comes from the parity-tested
    # PyTorch reference either way)
    others = [n for n in schedules if n not in arts and (all_artifacts or not n.startswith("adaptive@"))]
    log(f"      prefill-only artifacts for {len(others)} other policies" + (" (+ decode)" if all_artifacts else ""))
    for name in others:
        arts[name] = os.path.join(tmp, "artifacts", name.replace("@", "_at_"))
    compile_side_by_side(model, adapter, [(schedules[n], arts[n]) for n in others], decode=all_artifacts,
                         reuse=arts["none"])

    # ------------------------------------------------------------------ 3. eval
    test = load_samples(api.EVAL_DATA, limit=limit)
    stages.next("eval", f"eval: {len(test)} test questions x {len(schedules)} policies")
    acc, paths = {}, {}
    bar = tqdm(total=len(test) * len(schedules), desc="eval", unit="q")
    prepared: dict = {}  # each scene's decoder inputs, encoded once for every policy answered in PyTorch

    def prepare(group):
        key = tuple(id(s) for s in group)
        if key not in prepared:
            prepared[key] = adapter.prepare(group)
        return prepared[key]

    for name, s in schedules.items():
        if name in ("none", "adaptive") or all_artifacts:
            fn, paths[name] = runtime_answer_fn(load(arts[name]), max_new_tokens=4), "onnxruntime"
        else:
            fn, paths[name] = reference_answer_fn(adapter, s, max_new_tokens=4, prepare=prepare), "pytorch-reference"
        acc[name] = evaluate(fn, test, progress=bar)
    bar.close()

    # ------------------------------------------------------------------ 4. bench
    stages.next("bench", f"bench: interleaved ORT timing, {repeats} repeats")
    benches = {"adaptive": bench_artifacts(arts["adaptive"], arts["none"], test, repeats=repeats, new_tokens=16)}
    for name in others:
        benches[name] = bench_artifacts(arts[name], arts["none"], test, repeats=repeats,
                                        new_tokens=16 if all_artifacts else 1)

    # ------------------------------------------------------------------ 5. report
    stages.next("report", "report")
    summary = _report(tmp, out, t0, adapter, schedules, acc, paths, benches, flops, sched_a, stats, test)
    stages.close()
    with open(os.path.join(tmp, "results.json")) as f:
        results = json.load(f)
    results["stage_seconds"] = stages.times
    with open(os.path.join(tmp, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    return summary


def _report(tmp, out, t0, adapter, schedules, acc, paths, benches, flops, sched_a, stats, test) -> str:
    n_sp, n_tx = stats.mean_spatial_tokens(), stats.mean_text_tokens()
    base_acc = acc["none"]["accuracy"]
    rows, points = [], []
    for name, s in schedules.items():
        b = benches.get(name)
        pc = paired(acc[name]["predictions"], acc["none"]["predictions"])
        row = {
            "policy": name,
            "cuts": _fmt_cuts(s),
            "accuracy": acc[name]["accuracy"],
            "delta_points": 100 * (acc[name]["accuracy"] - base_acc),
            "delta_ci95_points": pc["delta_ci95_points"],
            "answers_changed": pc["changed"],
            "answers_gained_lost": [pc["gained"], pc["lost"]],
            "accuracy_path": paths[name],
            "prefill_flops_ratio": flops[name],
            "flops_reduction": 1 - flops[name],
            "prefill_speedup": (1 / b["prefill"]["latency_ratio"]) if b else (1.0 if name == "none" else None),
            "e2e_speedup": (1 / b["end_to_end"]["latency_ratio"]) if b and "latency_ratio" in b["end_to_end"] else None,
            "realized_fraction": b["prefill"]["realized_fraction"] if b else None,
            "overhead_fraction": b["prefill"]["overhead_fraction"] if b else None,
        }
        rows.append(row)
        # the adaptive schedules at several budgets form one curve
        points.append({"policy": "adaptive" if name.startswith("adaptive") else ("unpruned" if name == "none" else name),
                       "flops_ratio": flops[name], "accuracy": acc[name]["accuracy"]})
    name = adapter.name or "model"
    plot_pareto(points, os.path.join(tmp, "pareto.png"), title=f"{name}: accuracy vs prefill FLOPs")
    plot_keep_curves(schedules, os.path.join(tmp, "keep_curves.png"), n_spatial=int(round(n_sp)))
    cols = [("policy", "policy"), ("cuts", "cuts"), ("accuracy", "accuracy"), ("delta_points", "Δ acc (pts)"),
            ("delta_ci95", "Δ 95% CI (paired)"), ("changed", "answers changed (+right -wrong)"),
            ("flops_reduction", "prefill FLOPs cut"), ("prefill_speedup", "prefill speedup"),
            ("e2e_speedup", "e2e speedup (16 tok)"), ("realized_fraction", "realized fraction"),
            ("overhead_fraction", "overhead fraction")]
    # the paired columns as text cells (blank for the baseline itself)
    cells = [{**r, "delta_ci95": "{:+.1f} .. {:+.1f}".format(*r["delta_ci95_points"]),
              "changed": "{} (+{} -{})".format(r["answers_changed"], *r["answers_gained_lost"])}
             if r["policy"] != "none" else r for r in rows]
    table = markdown_table(cells, cols)
    wall = time.time() - t0
    who = ("Bundled model llava3d-tiny (small reference model, not the 7B)" if name == api.DEFAULT_MODEL
           else f"Model {name}")
    header = (f"{who}; {len(test)} test questions; "
              f"ORT {benches['adaptive']['provider']}; mean {n_sp:.0f} spatial + {n_tx:.0f} text tokens; "
              f"{wall / 60:.1f} min")
    fid = sched_a.calibration["fidelity"]
    header += (f"\nadaptive: fidelity target {sched_a.calibration['fidelity_target']} = greedy next-token agreement "
               f"with the unpruned model on {fid['rows']} held-back calibration questions, passed when the lower "
               f"end of its 95% CI reaches the target; chosen schedule "
               f"{fid['agreement']:.3f} (95% CI {fid['ci95'][0]:.3f}-{fid['ci95'][1]:.3f})")
    stab = sched_a.calibration.get("stability")
    if stab:
        header += f"\nstability of the choice: {stab['summary']}"
    header += ("\nΔ 95% CI: paired over the same questions (per-question difference in {-1, 0, 1}); answers changed: "
               "greedy answers that differ from the unpruned model's, + now right, - now wrong")
    summary = header + "\n\n" + table + "\n\n" + example_table(acc["none"]["predictions"], acc["adaptive"]["predictions"])
    results = {
        "model": {"name": name, "fingerprint": adapter.fingerprint(), "arch": adapter.arch()},
        "test_questions": len(test),
        "tokens": {"spatial_mean": n_sp, "text_mean": n_tx},
        "rows": rows,
        "accuracy": {k: {kk: v[kk] for kk in ("accuracy", "n", "per_kind")} for k, v in acc.items()},
        "bench": benches,
        "wall_s": wall,
        "environment": environment(),
    }
    with open(os.path.join(tmp, "results.json"), "w") as f:
        f.write(json.dumps(results, indent=2, default=float).replace(tmp, os.path.abspath(out)))
    with open(os.path.join(tmp, "predictions.json"), "w") as f:  # per question, for paired analyses
        json.dump({k: v["predictions"] for k, v in acc.items()}, f)
    with open(os.path.join(tmp, "summary.md"), "w") as f:
        f.write(summary + "\n")
    return summary
