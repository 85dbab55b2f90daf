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

import contextlib
import os
import time
from dataclasses import dataclass

from tqdm import tqdm

from adatoken_compile import distributed
# the held-back defaults live with the engine, which takes the same ones
from adatoken_compile.calibration.defaults import HOLDOUT, RULES_HOLDOUT, default_holdout  # noqa: F401
from adatoken_compile.calibration.policies import DEFAULT_FIDELITY, PEERS, POLICIES
from adatoken_compile.data import (
    builtin_split,
    for_input,
    holdout_start,
    iter_samples,
    load_samples,
)
from adatoken_compile.environment import environment
from adatoken_compile.errors import InputError
from adatoken_compile.io import atomic_dir, check_output, scratch_dir
from adatoken_compile.runtime import Runtime, load
from adatoken_compile.runtime.sample import Sample
from adatoken_compile.runtime.sampling import check_sampling
from adatoken_compile.runtime.session import choose_providers
from adatoken_compile.schedule import Schedule, identity
from adatoken_compile.selection import RULES, spec

DEFAULT_MODEL = "llava3d-tiny"
# One set of calibration defaults for the API, the CLI and the main job.
CALIBRATION_DATA = "builtin:calibration"
SAMPLES = 64  # questions whose attention statistics are mined
HOLDOUT_START_SCENE = 200  # built-in data: held-back questions come from this scene on, disjoint from the statistics'
EVAL_DATA = "builtin:test"
MIN_OPSET = 18  # the oldest opset torch's ONNX exporter writes; older ones fail its version conversion


__all__ = ["Calibration", "DEFAULT_MODEL", "bench", "calibrate", "compare", "compile", "evaluate", "generate", "load",
           "load_model"]


def load_model(model=None, *, vision_tower: str | None = None, attn: str = "sdpa", dtype: str = "float32",
               lazy: bool = False, device: str | None = None):
    """Load a checkpoint directory or a bundled name as a model adapter (PyTorch).

    ``model``: a directory in the released LLaVA-3D layout (``model_type`` ``llava_llama`` /
    ``llava_qwen``) or an HF ``LlavaForConditionalGeneration`` checkpoint, or a bundled name
    (default ``llava3d-tiny``); an adapter is returned as is. ``attn``: ``sdpa`` or ``eager``.
    ``dtype``: ``float32``, ``float16`` or ``bfloat16`` (the modules are built in it). ``lazy``:
    the decoder's weights stay on disk until :func:`compile` writes them, one at a time (what a
    7B model needs on a 24 GB machine); such a model can be compiled, or calibrated layer-major
    (``calibrate(engine="layered")``). ``device``: ``cpu`` (default) or ``cuda[:N]``, where the
    decoder runs (the encoder stays on the CPU); refused in one line when it is not there.

    Example::

        model = load_model("checkpoints/LLaVA-3D-7B", vision_tower="checkpoints/clip-vit-large-patch14-336")
    """
    if isinstance(model, str) and not model.strip():  # never the bundled model in place of what was meant
        raise InputError("--model '': empty; pass a checkpoint directory or a bundled name, or leave --model out "
                         f"for {DEFAULT_MODEL}")
    if model is not None and not isinstance(model, str):
        from adatoken_compile.contract import (
            Adapter,  # torch: not in the runtime install
        )

        if not isinstance(model, Adapter):
            raise InputError(f"model: expected a checkpoint directory, a bundled name or a loaded model, got "
                             f"{type(model).__name__}")
        return model
    from adatoken_compile.compiler.weights import (
        torch_dtype,  # torch: not in the runtime install
    )
    from adatoken_compile.calibration.layered import check_device
    from adatoken_compile.models.registry import load_adapter

    _placement_checked(device, dtype)  # before anything loads
    dev = check_device(device)
    adapter = load_adapter(model or DEFAULT_MODEL, vision_tower=vision_tower, attn_implementation=attn,
                           dtype=torch_dtype(dtype), lazy=lazy)
    if dev.type != "cpu" and not lazy:
        adapter.decoder.to(dev)
    return adapter


def _placement_checked(device, dtype) -> None:
    """``device`` and ``dtype`` refused in one line (before any model loads) when unusable here."""
    from adatoken_compile.calibration.layered import check_device, check_dtype
    from adatoken_compile.compiler.weights import torch_dtype

    check_dtype(torch_dtype(dtype), check_device(device))


def _placement(model, *, device, dtype, engine, max_memory, vision_tower=None):
    """The :class:`adatoken_compile.calibration.layered.Plan` of a calibration of ``model`` (a name,
    a directory or a loaded adapter), checked before anything loads."""
    from adatoken_compile.calibration import layered
    from adatoken_compile.models.checkpoint import read_config
    from adatoken_compile.models.registry import resolve_model_dir

    if model is None or isinstance(model, str):
        model_dir = resolve_model_dir(model)
        vt = vision_tower or read_config(model_dir).get("mm_vision_tower")
        vision_dir = vt if vision_tower or not isinstance(vt, str) else os.path.join(model_dir, vt)
    else:
        model_dir, vision_dir = getattr(model, "model_dir", None), getattr(model, "vision_dir", None)
    return layered.plan(model_dir, device=device, dtype=dtype, engine=engine, max_memory=max_memory,
                        vision_dir=vision_dir if isinstance(vision_dir, str) else None)


@dataclass
class Calibration:
    """What :func:`calibrate` returns: the schedule, the statistics and where they were written."""

    schedule: object  # adatoken_compile.schedule.Schedule
    stats: object  # adatoken_compile.calibration.stats.CalibrationStats
    path: str | None = None
    holdout: list | None = None  # the held-back batches it was validated on (to derive more schedules on them)


def holdout_samples(data: str, n: int, stats_scenes: int, start_scene: int = 0, *, scenes: str | None = None,
                    depth_scale: float | None = None, keep=None) -> list:
    """``n`` validation questions from scenes the statistics (``stats_scenes`` scenes from
    ``start_scene`` on) did not use: after the statistics' last scene (built-in data: from scene
    ``HOLDOUT_START_SCENE`` on, if that is later). A question file's held-back questions never
    share a scene with the statistics' questions. ``keep``: this process's share (see
    ``data.iter_samples``)."""
    if n <= 0:
        return []
    start = holdout_start(data, start_scene, stats_scenes, HOLDOUT_START_SCENE)
    listed = 0

    def counted(i: int, j: int) -> bool:
        nonlocal listed
        listed += 1
        return keep is None or keep(i, j)

    held = list(iter_samples(data, limit=n, start_scene=start, scenes=scenes, depth_scale=depth_scale, keep=counted))
    if not listed:
        raise InputError(f"--data {data}: the statistics' questions use every scene from scene {start_scene} on "
                         f"({stats_scenes} scenes), none is left for held-back questions; pass fewer --samples, a "
                         "file with more scenes, or --holdout 0")
    return held


@distributed.collective
def calibrate(model=None, *, data: str = CALIBRATION_DATA, scenes: str | None = None, depth_scale: float | None = None,
              samples: int = SAMPLES, holdout: int | None = None,
              policy: str = "adaptive", fidelity: float | None = None, flops_budget: float | None = None,
              like=None, seed: int = 0, start_scene: int = 0, merge=(), out: str | None = None, overwrite: bool = False,
              progress: bool = True, cache=None, max_validations: int = 16, rules=None, device: str = "cpu",
              dtype: str | None = None, engine: str = "auto", max_memory=None, spill: str = "auto") -> Calibration:
    """Mine attention statistics on ``samples`` questions of ``data`` and derive a schedule.

    ``data``: ``builtin:<split>`` or a question file (JSONL, ScanQA, SQA3D; docs/data.md) whose
    scene ids resolve under ``scenes``; answers are not needed (the schedule is validated by
    agreement with the unpruned model). ``depth_scale``: depth units per metre of scene folders.

    ``policy``: ``adaptive`` (solved from the statistics: the cheapest schedule whose greedy
    next-token agreement with the unpruned model on ``holdout`` other questions (default 384, or
    1,536 with ``rules``: see :func:`default_holdout`) is at least
    ``fidelity`` (default 0.95) at 95% confidence, or the best agreement under ``flops_budget``),
    or a peer rule (``fastv``, ``pdrop``, ``adatoken-decay``, ``dart``, ``divprune``, ``random`` /
    ``prellm-strided`` / ``prellm-random`` with ``like``, ``none``).
    ``rules``: selection rules the adaptive solver compares at each chosen cut, keeping per cut the
    cheapest one a paired test on the held-back rows does not put below the most agreeing one
    (None: ``solver.DEFAULT_RULES``, the random and strided controls and the cheap attention rules;
    ``"all"`` or names such as ``("last_token", "stratified", "strided")``; ``("last_token",)``: no
    comparison).
    ``start_scene``: mine from this scene on (shards of one calibration run on several machines).
    ``merge``: calibration directories whose statistics replace the mining (disjoint shards).
    ``out``: also write schedule.json, stats and a report there (``overwrite`` an earlier one).
    Under torchrun: each process mines and validates its share, every process returns the same
    result, and rank 0 writes ``out``.
    ``device``: ``cpu`` or ``cuda[:N]`` (under torchrun ``cuda`` is each process's LOCAL_RANK GPU);
    ``dtype``: ``float32`` (default), ``bfloat16`` or ``float16`` (a loaded model: its own); the
    statistics and the selection scores are accumulated in float32 whatever it is. ``engine``:
    ``sample`` (each batch through the whole resident model), ``layered`` (the decoder's layers
    read from the checkpoint one at a time, each run over every batch of a chunk: a model larger
    than memory; same statistics and schedule) or ``auto`` (layered when the model does not fit
    ``max_memory``, e.g. ``"12GB"``; default: this machine's memory). ``spill``: where the layered
    engine puts the states that do not fit ``max_memory``, in memory-mapped files, so that one pass
    over the weights serves every batch: ``auto`` (beside ``out``, when the disk has room), ``off``
    (another pass over the weights per chunk instead) or a directory. See docs/calibration.md.

    Example::

        cal = calibrate(out="runs/cal")              # bundled model, built-in calibration questions
        print(cal.schedule.cuts, cal.schedule.predicted["flops_ratio"])
    """
    from adatoken_compile.calibration import (
        api as engine_api,  # torch: not in the runtime install
    )
    from adatoken_compile.calibration.batches import (
        BATCH_SIZE,
        input_batches,
        sample_batches,
    )
    from adatoken_compile.calibration.solver import require_rows

    if holdout is None:
        holdout = default_holdout(rules)
    if not isinstance(holdout, int) or isinstance(holdout, bool) or holdout < 0:
        raise InputError(f"--holdout {holdout!r}: give a whole number of held-back questions, e.g. --holdout 384")
    for name, v, lo in (("--samples", samples, 1), ("--start-scene", start_scene, 0), ("--seed", seed, None)):
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo):
            raise InputError(f"{name} {v!r}: give a whole number" + (f" >= {lo}" if lo is not None else ""))
    for name, v, hi in (("--fidelity", fidelity, "1]"), ("--flops-budget", flops_budget, "1)")):
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1
                              or (v == 1 and hi == "1)")):
            raise InputError(f"{name} {v!r}: give a ratio in (0, {hi}")
    if policy not in POLICIES:
        raise InputError(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if isinstance(merge, str) or not all(isinstance(m, str) for m in merge):
        raise InputError("merge: pass a list of calibration directories (--merge DIR, repeated)")
    if policy == "adaptive" and flops_budget is None:  # the solver's own check, before any mining
        require_rows(holdout, DEFAULT_FIDELITY if fidelity is None else fidelity, "calibrate")
    if out is not None:
        distributed.on_main(check_output, out, "calibration", overwrite=overwrite)
    loaded = model is not None and not isinstance(model, str)
    if dtype is None:
        dtype = str(model.dtype).removeprefix("torch.") if loaded and hasattr(model, "dtype") else "float32"
    where = _placement(model, device=device, dtype=dtype, engine=engine, max_memory=max_memory)
    spiller = engine_api.layered.spill_for(spill, out)
    like_s = Schedule.load(like) if isinstance(like, str) else like
    shards = [engine_api.load_stats(d) for d in merge]  # read (and refused) before the model and the mining
    adapter = load_model(model, dtype=dtype, lazy=where.engine == "layered", device=device)
    lazy = adapter.lazy_weights if getattr(adapter, "lazy_weights", None) else None
    if loaded and hasattr(adapter, "dtype") and adapter.dtype != where.dtype:
        raise InputError(f"calibrate: the model was loaded in {str(adapter.dtype).removeprefix('torch.')}, not "
                         f"{dtype}; load it with load_model(..., dtype={dtype!r}) or leave dtype out")
    if lazy is not None and where.engine == "sample":
        raise InputError("calibrate: this model's decoder weights were left on disk (load_model(lazy=True)); "
                         "calibrate it with engine='layered'")
    layers = None
    if where.engine == "layered":
        from adatoken_compile.calibration.layered import StreamedLayers

        layers = StreamedLayers(adapter.decoder, lazy, where.device, where.chunk_bytes(), spiller)
    elif loaded and where.device.type != "cpu":
        adapter.decoder.to(where.device)
    with spiller or contextlib.nullcontext():  # the spilled states' directory goes, whatever happens
        share = distributed.Share(block=BATCH_SIZE)  # whole batches: each is the batch one process forms
        stats_samples = for_input(load_samples(data, limit=samples, start_scene=start_scene, scenes=scenes,
                                               depth_scale=depth_scale, keep=share), adapter.input_kind)
        hold = input_batches(adapter, for_input(holdout_samples(
            data, holdout, share.scenes, start_scene, scenes=scenes, depth_scale=depth_scale,
            keep=distributed.Share(block=BATCH_SIZE)), adapter.input_kind))
        kw = dict(policy=policy, fidelity=fidelity, flops_budget=flops_budget, seed=seed, progress=progress,
                  fingerprint=adapter.fingerprint(), family=adapter.family, model_name=adapter.name, like=like_s,
                  max_validations=max_validations, cache=cache, rules=rules)
        if merge:
            if layers is not None:
                kw["cache"] = kw["cache"] or engine_api.layered.validation_cache(layers)
            schedule, stats = engine_api.calibrate_from_stats(adapter.decoder, shards, hold, **kw)
        else:
            schedule, stats = engine_api.calibrate(adapter.decoder, sample_batches(adapter, stats_samples),
                                                   holdout_batches=hold, layers=layers, **kw)
        schedule.calibration.update({"data": data, "start_scene": start_scene, "holdout_questions": holdout,
                                     "environment": environment()})
        if scenes is not None:
            schedule.calibration["scenes"] = scenes
        path = (distributed.on_main(engine_api.write_calibration, out, schedule, stats, overwrite=overwrite)
                if out else None)
    return Calibration(schedule, stats, path, hold)


def _schedule_for(adapter, schedule):
    """The schedule ``schedule`` names (None: identity), checked against ``adapter``'s model."""

    if schedule is None or (isinstance(schedule, str) and schedule in ("none", "identity")):
        return identity(adapter.arch()["num_layers"], fingerprint=adapter.fingerprint(), family=adapter.family)
    if isinstance(schedule, str):
        s, where = Schedule.load(schedule), schedule
    elif isinstance(schedule, Schedule):
        s, where = schedule.validate(), "schedule"
    else:
        raise InputError(f"schedule: expected a Schedule, a schedule.json path or None, got {type(schedule).__name__}")
    s.check_model(adapter.fingerprint(), adapter.arch()["num_layers"], where, family=adapter.family)
    return s


def compile(model=None, schedule=None, out: str | None = None, *, dtype: str = "float32", quantize: str | None = None,
            block_size: int = 32, decode: bool = True, overwrite: bool = False, opset: int | None = None,
            progress: bool = True, reuse: str | None = None):
    """Capture the model, insert the schedule's token-drop nodes and write an ONNX artifact to ``out``.

    ``schedule``: a Schedule, a schedule.json path, or None for the unpruned (identity) artifact.
    ``dtype``: what the graphs compute in (``float32``, ``float16``, ``bfloat16``; the inserted
    token-drop nodes score in float32 whatever it is). ``quantize="int4"``: the decoder's linear
    layers (lm_head included) as onnxruntime ``MatMulNBits`` int4 weights in blocks of
    ``block_size``. A model given by name or directory is loaded in ``dtype`` with its decoder
    weights left on disk and written one at a time (a 7B model compiles in a few GB of memory);
    a loaded model must be in ``dtype`` already. ``reuse``: an earlier artifact of the same model
    and precision whose encoder and decode graphs (which no schedule changes) are copied instead of
    exported. Returns the manifest; ``manifest.digest`` (``sha256:...``) identifies the artifact.

    Example::

        man = compile(schedule="runs/cal/schedule.json", out="runs/art", quantize="int4")
        print(man.digest)
    """
    from adatoken_compile.compiler.pipeline import (
        compile_artifact,  # torch: not in the runtime install
    )
    from adatoken_compile.compiler.weights import Quantization, torch_dtype

    if not out:
        raise InputError("compile: pass out=DIR (--out), the artifact directory to write")
    if opset is not None:
        import onnx  # the exporter's own dependency: not in the runtime install

        top = onnx.defs.onnx_opset_version()
        if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= top:
            raise InputError(f"--opset {opset!r}: give an ONNX opset from {MIN_OPSET} (the exporter's oldest) to {top}")
    torch_dtype(dtype)
    q = Quantization(quantize, int(block_size)).validate() if quantize else None
    check_output(out, "artifact", overwrite=overwrite)  # before the model is loaded
    adapter = load_model(model, dtype=dtype, lazy=True)
    return compile_artifact(adapter, _schedule_for(adapter, schedule), out, opset=opset, progress=progress,
                            decode=decode, overwrite=overwrite, dtype=dtype, quantize=q, reuse=reuse)


def generate(model, source, question, *, schedule=None, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None):
    """Answer ``question`` about ``source`` (a scene for 3D models: a Scene, ``.npz``, ScanNet
    folder or info file; an image for 2D LLaVA: an array or an image path).

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
    from adatoken_compile.compiler.reference import (
        answers,  # torch: not in the runtime install
    )

    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    check_sampling(temperature, top_p, seed)
    adapter = load_model(model)
    single = isinstance(question, str)
    if not single and not isinstance(question, (list, tuple)):
        raise InputError(f"generate: question must be a string or a list of strings, got {type(question).__name__}")
    sources = [source] if single else list(source) if isinstance(source, (list, tuple)) else [source] * len(question)
    questions = [question] if single else list(question)
    if len(sources) != len(questions):
        raise InputError(f"generate: {len(sources)} sources but {len(questions)} questions; pass one per question")
    samples = [Sample(q, scene=s) if adapter.input_kind == "scene" else Sample(q, image=s)
               for s, q in zip(sources, questions)]
    out = answers(adapter, samples, _schedule_for(adapter, schedule), max_new_tokens=max_new_tokens,
                  temperature=temperature, top_p=top_p, seed=seed)
    return out[0] if single else out


@distributed.collective
def evaluate(model=None, *, artifact: str | None = None, baseline: str | None = None, data: str = EVAL_DATA,
             scenes: str | None = None, depth_scale: float | None = None, limit: int = 500, kinds=(), schedule=None,
             max_new_tokens: int = 8, providers=None, progress=None, device: str = "cpu", dtype: str = "float32") -> dict:
    """Answer accuracy on ``limit`` questions of ``data``, overall and per question kind.

    ``data``: ``builtin:<split>`` or a question file (docs/data.md) whose scene ids resolve under
    ``scenes``. Scores: ``accuracy`` (first word), ``em1`` / ``em1_refined`` (ScanQA's
    normalisation), and for question files BLEU-4 / CIDEr (with pycocoevalcap installed).
    With ``artifact``: that artifact through ONNX Runtime, next to the unpruned model on the same
    questions (``baseline``, an identity artifact, or the PyTorch ``model`` it was compiled from),
    with a paired comparison and the answers' agreement. Without: the PyTorch ``model`` (pruned by
    ``schedule`` when given; then, for questions without answers, its agreement with the unpruned
    model). ``kinds``: keep only those question kinds / templates among the first ``limit``.
    Under torchrun each process answers its share of the scenes and every process returns the
    result of all of them. ``device`` / ``dtype``: where and in what precision a PyTorch model given
    by name or directory runs (see :func:`load_model`).

    Example::

        res = evaluate(artifact="runs/art", limit=60)
        print(res["accuracy"], res["baseline_accuracy"], res["paired"]["delta_ci95_points"])
    """
    from adatoken_compile.evaluation.accuracy import (  # torch: not in the runtime install
        agreement,
    )
    from adatoken_compile.evaluation.accuracy import evaluate as run_eval
    from adatoken_compile.evaluation.answers import eval_artifact, reference_answer_fn

    choose_providers(providers)  # "cuda" without CUDA: refused before any model is loaded
    _placement_checked(device, dtype)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InputError(f"--limit {limit!r}: give a whole number of questions >= 1")

    share = distributed.Share(by_scene=True)  # a scene's questions are answered together
    loaded = load_samples(data, limit=limit, scenes=scenes, depth_scale=depth_scale, keep=share)
    picked = [(s, i) for s, i in zip(loaded, share.positions)
              if not kinds or s.kind in kinds or s.meta.get("template") in kinds]
    samples, positions = [s for s, _ in picked], [i for _, i in picked]
    if not distributed.total(len(samples)):
        raise InputError(f"eval: no {' / '.join(kinds)} question among the first {limit} of {data}; raise --limit")
    captions = builtin_split(data) is None
    if artifact:
        adapter = None if baseline else load_model(model, device=device, dtype=dtype)
        res = eval_artifact(artifact, samples, baseline=baseline, adapter=adapter, progress=progress,
                            providers=providers, captions=captions, positions=positions)
    else:
        adapter = load_model(model, device=device, dtype=dtype)
        samples = for_input(samples, adapter.input_kind)
        sched = _schedule_for(adapter, schedule)
        res = run_eval(reference_answer_fn(adapter, sched, max_new_tokens), samples, progress=progress,
                       captions=captions, positions=positions)
        if res["n"] == 0 and sched.cuts:  # no answers to score: how often the pruned model answers as the unpruned
            ref = run_eval(reference_answer_fn(adapter, None, max_new_tokens), samples, positions=positions)
            res["agreement"] = agreement(res["predictions"], ref["predictions"])
        res["model"] = adapter.fingerprint()
    res["data"] = data
    if scenes is not None:
        res["scenes"] = scenes
    res["environment"] = environment()
    return res


def bench(artifact: str, *, baseline: str | None = None, model=None, data: str = EVAL_DATA, scenes: str | None = None,
          repeats: int = 7, new_tokens: int = 16, threads: int | None = None, providers=None, log=None,
          tokens=None) -> dict:
    """Pruned vs unpruned artifact on the first question of ``data``: prefill and end-to-end latency
    (interleaved runs, medians), FLOPs (formula and executed graph), realised fraction, inserted-node
    overhead and KV-cache bytes. ``baseline``: an identity artifact of the same model (default:
    compiled from ``model`` into a temporary directory).

    ``tokens=(spatial, text)``: the prefill graphs only, on random embeddings at those token counts
    (e.g. ``(1400, 60)``, LLaVA-3D's), without loading encoders or decode graphs (a 7B artifact
    on a small machine); needs ``baseline``.

    Example::

        res = bench("runs/art", baseline="runs/art0", threads=1)
        print(res["prefill"]["latency_ratio"], res["prefill"]["flops_ratio"])
    """
    from adatoken_compile.benchmarking.artifacts import (  # profiles with onnx
        bench_artifacts,
        bench_prefill_tokens,
    )

    choose_providers(providers)  # "cuda" without CUDA: refused before any model is loaded or compiled
    if tokens is not None:
        if not baseline:
            raise InputError("bench --tokens: pass --baseline ART0, an identity artifact of the same model")
        spatial, text = tokens
        res = bench_prefill_tokens(artifact, baseline, int(spatial), int(text), repeats=repeats, threads=threads,
                                   providers=providers, log=log)
        res["environment"] = environment()
        return res
    samples = load_samples(data, limit=1, scenes=scenes)
    with scratch_dir("adatoken-baseline-") as tmp:
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


@distributed.collective
def compare(model=None, *, out: str, data: str = EVAL_DATA, limit: int = 2000, budgets=(0.5, 0.65, 0.8, 0.9),
            seeds=(0, 1, 2), rules=None, peers=PEERS,
            search: bool = True, samples: int = SAMPLES, holdout: int | None = None, stats: str | None = None,
            batch_size: int = 8, overwrite: bool = False, progress: bool = True, log=print, device: str = "cpu",
            dtype: str = "float32") -> dict:
    """Every selection rule and peer policy at matched prefill FLOPs on the first ``limit`` questions of
    ``data``: ``out``/compare.md (tables with paired 95% intervals), compare.json, predictions.json,
    pareto.png (accuracy vs prefill FLOPs) and kept_x.png (where each rule's kept tokens lie).

    ``budgets``: prefill-FLOPs cuts (0.65 = 65% fewer FLOPs); at each, the adaptive solver's cuts with
    every rule of ``rules`` (default: all), one pre-LLM cut of equal FLOPs per rule that can run
    before layer 0, ``random`` once per seed of ``seeds``, and (``search``) the solver's own rule
    choice, validated on ``holdout`` held-back calibration questions (default 1,536 with ``search``,
    else 384: :func:`default_holdout`). ``peers`` run at their
    published settings. ``stats``: a calibration directory of this model whose statistics to use
    instead of mining ``samples`` questions. The statistics and held-back questions come from the
    built-in calibration split for built-in ``data``, and from ``data`` itself for a question file
    (scenes or images, whichever the model reads), from the scenes after those the answered
    questions use. See :mod:`adatoken_compile.evaluation.compare`. ``device`` / ``dtype``: where and
    in what precision a model given by name or directory runs (see :func:`load_model`).
    Under torchrun each process mines and validates its share of the calibration questions and
    answers its share of the scenes; rank 0 writes ``out``, which holds what one process writes.

    Example::

        res = compare(out="runs/compare", limit=500, budgets=(0.65, 0.9))
        print(res["targets"])
    """
    from adatoken_compile.calibration import (
        api as engine,  # torch: not in the runtime install
    )
    from adatoken_compile.calibration.batches import BATCH_SIZE, input_batches, sample_batches
    from adatoken_compile.calibration.solver import ValidationCache, require_rows
    from adatoken_compile.evaluation import compare as cmp

    names = tuple(RULES) if rules in (None, "all") else tuple(rules)
    for r in names:
        spec(r)
    for p in peers:
        if p not in PEERS:
            raise InputError(f"compare: unknown peer '{p}'; choose from {', '.join(PEERS)}")
    if not budgets:
        raise InputError("compare: give at least one FLOPs cut (--budgets 0.5,0.65,0.8,0.9)")
    if holdout is None:
        holdout = default_holdout(search)
    require_rows(holdout, 0.5, "compare")
    _placement_checked(device, dtype)
    distributed.on_main(check_output, out, "comparison", overwrite=overwrite)
    if not distributed.is_main():
        log = _quiet  # rank 0 alone reports
    t0 = time.time()
    adapter = load_model(model, device=device, dtype=dtype)
    tshare = distributed.Share(by_scene=True)  # a scene's questions are answered together
    test = for_input(load_samples(data, limit=limit, keep=tshare), adapter.input_kind)
    cal_data, cal_start = _calibration_source(data, tshare.scenes)
    share = distributed.Share(block=BATCH_SIZE)  # whole batches, as calibrate shares them
    stats_samples = for_input(_compare_samples(cal_data, samples, cal_start, share, limit), adapter.input_kind)
    if stats is not None:
        st = engine.load_stats(stats)
        if st.fingerprint != adapter.fingerprint():
            raise InputError(f"{stats}: statistics of another model ({str(st.fingerprint)[:12]}); calibrate this one")
    else:
        _, st = engine.calibrate(adapter.decoder, sample_batches(adapter, stats_samples), policy="none",
                                 holdout_batches=[], progress=progress, fingerprint=adapter.fingerprint())
    hold = input_batches(adapter, for_input(holdout_samples(cal_data, holdout, share.scenes, cal_start,
                                                            keep=distributed.Share(block=BATCH_SIZE)),
                                            adapter.input_kind))
    log(f"[compare] statistics of {st.samples} questions, {holdout} held-back questions ({time.time() - t0:.0f} s)")
    model_kw = dict(fingerprint=adapter.fingerprint(), family=adapter.family, model_name=adapter.name)
    configs = cmp.build_configs(adapter.decoder, st, hold, budgets=tuple(budgets), rules=names, seeds=tuple(seeds),
                                peers=tuple(peers), search=search, cache=ValidationCache(), log=log, model=model_kw)
    n_test = distributed.total(len(test))
    log(f"[compare] {len(configs)} configurations x {n_test} questions")
    # rank 0 shows its own share's progress (the others' is not exchanged while they answer)
    bar = tqdm(total=len(test), desc="compare" + (" (rank 0's share)" if distributed.active() else ""), unit="q",
               disable=not progress or not distributed.is_main())
    cmp.answer_all(adapter, test, configs, batch_size=batch_size, progress=bar)
    bar.close()
    test = cmp.gather(configs, test, tshare.positions)
    summary = cmp.summarize(configs, test)
    meta = {"model": adapter.name or "model", "fingerprint": adapter.fingerprint(), "data": data, "limit": limit,
            "calibration_data": cal_data,
            "budgets": list(budgets), "seeds": list(seeds), "rules": list(names), "peers": list(peers),
            "search": search, "holdout_questions": holdout, "statistics_questions": st.samples,
            "wall_s": round(time.time() - t0, 1), "environment": environment(),
            # the last token's attention per bin of the scene order over the bin's token share, per layer
            "position_prior": {str(i): st.position_prior(i) for i in range(st.arch["num_layers"])}}
    distributed.on_main(_write_comparison, out, configs, summary, meta, overwrite)
    return {**meta, **summary}


def _calibration_source(data: str, answered_scenes: int) -> tuple[str, int]:
    """Where compare mines statistics and held-back questions: the built-in calibration split for
    built-in data; otherwise the question file itself, from the first scene its answered questions
    do not use (so no scene is both calibrated on and answered)."""
    if builtin_split(data) is not None:
        return CALIBRATION_DATA, 0
    return data, answered_scenes


def _compare_samples(cal_data: str, n: int, start_scene: int, keep, limit: int) -> list:
    try:
        return load_samples(cal_data, limit=n, start_scene=start_scene, keep=keep)
    except InputError:
        if start_scene == 0:
            raise
        raise InputError(f"--data {cal_data}: its first {limit} questions use all of its {start_scene} scenes, none "
                         "is left to calibrate on; pass a smaller --limit or a file with more scenes") from None


def _quiet(*_a, **_kw) -> None:
    pass


def _write_comparison(out, configs, summary, meta, overwrite):
    from adatoken_compile.evaluation import compare as cmp  # torch: not in the runtime install

    with atomic_dir(out, "comparison", overwrite=overwrite, marker=True) as tmp:
        cmp.write_outputs(tmp, configs, summary, meta)
