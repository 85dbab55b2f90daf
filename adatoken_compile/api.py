"""The public Python API: every command of the CLI is one of these functions, with the same defaults.

Example (the main job, step by step)::

    import adatoken_compile as ac

    model = ac.load_model()                               # the bundled llava3d-tiny
    cal = ac.calibrate(model, out="runs/cal")             # statistics + validated schedule
    man = ac.compile(model, cal.schedule, out="runs/art") # pruned ONNX artifact
    rt = ac.load("runs/art")                              # ONNX Runtime, no torch needed
    print(rt.generate("scene.npz", "what color is the box?"))
    print(ac.evaluate(artifact="runs/art", model=model, limit=60)["accuracy"])

Heavy stages (torch, transformers) are imported inside the functions that need them: the
runtime install (``pip install adatoken-compile``) has neither, and ``load`` works there.

``calibrate`` and ``evaluate`` scale out under torchrun (``torchrun --nproc-per-node N script.py``,
every process calling them alike): each process takes its share of the questions and every
process returns what one process would (:mod:`adatoken_compile.distributed`); rank 0 alone writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from adatoken_compile import distributed
from adatoken_compile.environment import environment
from adatoken_compile.errors import InputError
from adatoken_compile.runtime import Runtime, load

DEFAULT_MODEL = "llava3d-tiny"
# One set of calibration defaults for the API, the CLI and the main job.
CALIBRATION_DATA = "builtin:calibration"
SAMPLES = 64  # questions whose attention statistics are mined
HOLDOUT = 384  # other questions that validate candidate schedules (agreement with the unpruned model)
HOLDOUT_START_SCENE = 200  # built-in data: held-back questions come from this scene on, disjoint from the statistics'
EVAL_DATA = "builtin:test"

__all__ = ["Calibration", "DEFAULT_MODEL", "bench", "calibrate", "compile", "evaluate", "generate", "load",
           "load_model"]


def load_model(model=None, *, vision_tower: str | None = None, attn: str = "sdpa"):
    """Load a checkpoint directory or a bundled name as a model adapter (PyTorch).

    ``model``: a directory in the released LLaVA-3D layout (``model_type`` ``llava_llama`` /
    ``llava_qwen``) or an HF ``LlavaForConditionalGeneration`` checkpoint, or a bundled name
    (default ``llava3d-tiny``); an adapter is returned as is. ``attn``: ``sdpa`` or ``eager``.

    Example::

        model = load_model("checkpoints/LLaVA-3D-7B", vision_tower="checkpoints/clip-vit-large-patch14-336")
    """
    if model is not None and not isinstance(model, str):
        return model
    from adatoken_compile.models.registry import load_adapter  # torch: not in the runtime install

    return load_adapter(model or DEFAULT_MODEL, vision_tower=vision_tower, attn_implementation=attn)


@dataclass
class Calibration:
    """What :func:`calibrate` returns: the schedule, the statistics and where they were written."""

    schedule: object  # adatoken_compile.schedule.Schedule
    stats: object  # adatoken_compile.calibration.stats.CalibrationStats
    path: str | None = None
    holdout: list | None = None  # the held-back batches it was validated on (to derive more schedules on them)


def holdout_samples(data: str, n: int, stats_scenes: int, start_scene: int = 0, keep=None) -> list:
    """``n`` validation questions from scenes the statistics (``stats_scenes`` scenes from
    ``start_scene`` on) did not use: from scene ``HOLDOUT_START_SCENE`` on, or after the statistics'
    last scene if that is later. ``keep``: this process's share (see ``data.load_samples``)."""
    from adatoken_compile.data import load_samples

    start = max(HOLDOUT_START_SCENE, start_scene + stats_scenes)
    return load_samples(data, limit=n, start_scene=start, keep=keep) if n > 0 else []


@distributed.collective
def calibrate(model=None, *, data: str = CALIBRATION_DATA, samples: int = SAMPLES, holdout: int = HOLDOUT,
              policy: str = "adaptive", fidelity: float | None = None, flops_budget: float | None = None,
              like=None, seed: int = 0, start_scene: int = 0, merge=(), out: str | None = None, overwrite: bool = False,
              progress: bool = True, cache=None, max_validations: int = 16) -> Calibration:
    """Mine attention statistics on ``samples`` questions of ``data`` and derive a schedule.

    ``policy``: ``adaptive`` (solved from the statistics: the cheapest schedule whose greedy
    next-token agreement with the unpruned model on ``holdout`` other questions is at least
    ``fidelity`` (default 0.95) at 95% confidence, or the best agreement under ``flops_budget``),
    or a peer rule (``fastv``, ``pdrop``, ``adatoken-decay``, ``random`` with ``like``, ``none``).
    ``start_scene``: mine from this scene on (shards of one calibration run on several machines).
    ``merge``: calibration directories whose statistics replace the mining (disjoint shards).
    ``out``: also write schedule.json, stats and a report there (``overwrite`` an earlier one).
    Under torchrun: each process mines and validates its share, every process returns the same
    result, and rank 0 writes ``out``.

    Example::

        cal = calibrate(out="runs/cal")              # bundled model, built-in calibration questions
        print(cal.schedule.cuts, cal.schedule.predicted["flops_ratio"])
    """
    from adatoken_compile.calibration import api as engine  # torch: not in the runtime install
    from adatoken_compile.calibration.batches import BATCH_SIZE, input_batches, sample_batches
    from adatoken_compile.data import load_samples
    from adatoken_compile.io import check_output
    from adatoken_compile.schedule import Schedule

    if not isinstance(holdout, int) or isinstance(holdout, bool) or holdout < 0:
        raise InputError(f"--holdout {holdout!r}: give a whole number of held-back questions, e.g. --holdout 384")
    if out is not None:
        distributed.on_main(check_output, out, "calibration", overwrite=overwrite)
    adapter = load_model(model)
    like_s = Schedule.load(like) if isinstance(like, str) else like
    share = distributed.Share(block=BATCH_SIZE)  # whole batches: each is the batch one process forms
    stats_samples = load_samples(data, limit=samples, start_scene=start_scene, keep=share)
    hold = input_batches(adapter, holdout_samples(data, holdout, share.scenes, start_scene,
                                                  keep=distributed.Share(block=BATCH_SIZE)))
    kw = dict(policy=policy, fidelity=fidelity, flops_budget=flops_budget, seed=seed, progress=progress,
              fingerprint=adapter.fingerprint(), family=adapter.family, model_name=adapter.name, like=like_s,
              max_validations=max_validations, cache=cache)
    if merge:
        schedule, stats = engine.calibrate_from_stats(adapter.decoder, [engine.load_stats(d) for d in merge], hold, **kw)
    else:
        schedule, stats = engine.calibrate(adapter.decoder, sample_batches(adapter, stats_samples), holdout_batches=hold,
                                           **kw)
    schedule.calibration.update({"data": data, "start_scene": start_scene, "holdout_questions": holdout,
                                 "environment": environment()})
    path = distributed.on_main(engine.write_calibration, out, schedule, stats, overwrite=overwrite) if out else None
    return Calibration(schedule, stats, path, hold)


def _schedule_for(adapter, schedule):
    from adatoken_compile.schedule import Schedule, identity

    if schedule in (None, "none", "identity"):
        return identity(adapter.arch()["num_layers"], fingerprint=adapter.fingerprint(), family=adapter.family)
    return Schedule.load(schedule) if isinstance(schedule, str) else schedule


def compile(model=None, schedule=None, out: str | None = None, *, decode: bool = True, overwrite: bool = False,
            opset: int | None = None, progress: bool = True):
    """Capture the model, insert the schedule's token-drop nodes and write an ONNX artifact to ``out``.

    ``schedule``: a Schedule, a schedule.json path, or None for the unpruned (identity) artifact.
    Returns the manifest; ``manifest.digest`` (``sha256:...``) identifies the artifact.

    Example::

        man = compile(schedule="runs/cal/schedule.json", out="runs/art")
        print(man.digest)
    """
    from adatoken_compile.compiler.pipeline import compile_artifact  # torch: not in the runtime install

    if not out:
        raise InputError("compile: pass out=DIR (--out), the artifact directory to write")
    adapter = load_model(model)
    return compile_artifact(adapter, _schedule_for(adapter, schedule), out, opset=opset, progress=progress,
                            decode=decode, overwrite=overwrite)


def generate(model, source, question, *, schedule=None, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None):
    """Answer ``question`` about ``source`` (a scene for 3D models, an image for 2D LLaVA).

    ``model``: a loaded artifact (:class:`~adatoken_compile.runtime.Runtime`, ONNX Runtime) or a
    model / checkpoint name (the PyTorch reference, pruned by ``schedule`` when given). Lists of
    sources and questions answer a batch. Greedy unless ``temperature`` > 0.

    Example::

        generate(load("runs/art"), "scene.npz", "how many chairs are there?")
    """
    if isinstance(model, Runtime):
        if schedule is not None:
            raise InputError("generate: an artifact runs the schedule it was compiled with; do not pass schedule=")
        return model.generate(source, question, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed)
    from adatoken_compile.compiler.reference import answers  # torch: not in the runtime install
    from adatoken_compile.runtime.scene import load_scene
    from adatoken_compile.runtime.sample import Sample

    adapter = load_model(model)
    single = isinstance(question, str)
    sources = [source] if single else list(source) if isinstance(source, (list, tuple)) else [source] * len(question)
    questions = [question] if single else list(question)
    if len(sources) != len(questions):
        raise InputError(f"generate: {len(sources)} sources but {len(questions)} questions; pass one per question")
    samples = [Sample(q, scene=load_scene(s) if isinstance(s, str) else s) if adapter.input_kind == "scene"
               else Sample(q, image=s) for s, q in zip(sources, questions)]
    out = answers(adapter, samples, _schedule_for(adapter, schedule), max_new_tokens=max_new_tokens,
                  temperature=temperature, top_p=top_p, seed=seed)
    return out[0] if single else out


@distributed.collective
def evaluate(model=None, *, artifact: str | None = None, baseline: str | None = None, data: str = EVAL_DATA,
             limit: int = 500, kinds=(), schedule=None, max_new_tokens: int = 8, providers=None,
             progress=None) -> dict:
    """Answer accuracy on ``limit`` questions of ``data``, overall and per question kind.

    With ``artifact``: that artifact through ONNX Runtime, next to the unpruned model on the same
    questions (``baseline``, an identity artifact, or the PyTorch ``model`` it was compiled from),
    with a paired comparison. Without: the PyTorch ``model`` (pruned by ``schedule`` when given).
    ``kinds``: keep only those question kinds / templates among the first ``limit``.
    Under torchrun each process answers its share of the scenes and every process returns the
    result of all of them.

    Example::

        res = evaluate(artifact="runs/art", limit=60)
        print(res["accuracy"], res["baseline_accuracy"], res["paired"]["delta_ci95_points"])
    """
    from adatoken_compile.data import load_samples
    from adatoken_compile.evaluation.accuracy import evaluate as run_eval  # torch: not in the runtime install
    from adatoken_compile.evaluation.answers import eval_artifact, reference_answer_fn

    share = distributed.Share(by_scene=True)  # a scene's questions are answered together
    picked = [(s, i) for s, i in zip(load_samples(data, limit=limit, keep=share), share.positions)
              if not kinds or s.kind in kinds or s.meta.get("template") in kinds]
    samples, positions = [s for s, _ in picked], [i for _, i in picked]
    if not distributed.total(len(samples)):
        raise InputError(f"eval: no {' / '.join(kinds)} question among the first {limit} of {data}; raise --limit")
    if artifact:
        adapter = None if baseline else load_model(model)
        res = eval_artifact(artifact, samples, baseline=baseline, adapter=adapter, progress=progress,
                            providers=providers, positions=positions)
    else:
        adapter = load_model(model)
        res = run_eval(reference_answer_fn(adapter, _schedule_for(adapter, schedule), max_new_tokens), samples,
                       progress=progress, positions=positions)
        res["model"] = adapter.fingerprint()
    res["data"] = data
    res["environment"] = environment()
    return res


def bench(artifact: str, *, baseline: str | None = None, model=None, data: str = EVAL_DATA, repeats: int = 7,
          new_tokens: int = 16, threads: int | None = None, providers=None, log=None) -> dict:
    """Pruned vs unpruned artifact on the first question of ``data``: prefill and end-to-end latency
    (interleaved runs, medians), FLOPs (formula and executed graph), realised fraction, inserted-node
    overhead and KV-cache bytes. ``baseline``: an identity artifact of the same model (default:
    compiled from ``model`` into a temporary directory).

    Example::

        res = bench("runs/art", baseline="runs/art0", threads=1)
        print(res["prefill"]["latency_ratio"], res["prefill"]["flops_ratio"])
    """
    import tempfile

    from adatoken_compile.benchmarking.artifacts import bench_artifacts  # torch-free, but profiles with onnx
    from adatoken_compile.data import load_samples

    samples = load_samples(data, limit=1)
    with tempfile.TemporaryDirectory(prefix="adatoken-baseline-") as tmp:
        if not baseline:
            adapter = load_model(model)
            if adapter.fingerprint() != load(artifact, "cpu", check_hashes=False).manifest.fingerprint:
                raise InputError(f"{artifact}: compiled from another model than {model or DEFAULT_MODEL}; "
                                 "pass --model DIR or --baseline ART0")
            baseline = f"{tmp}/identity"
            compile(adapter, None, baseline, progress=False)
        res = bench_artifacts(artifact, baseline, samples, repeats=repeats, new_tokens=new_tokens, threads=threads,
                              providers=providers, log=log)
    res["environment"] = environment()
    return res
