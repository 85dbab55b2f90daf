"""Answer accuracy on the procedural benchmark, overall and per question kind."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Callable, Iterable, Sequence

from adatoken_compile.contract import Sample
from adatoken_compile.errors import InputError


def normalize(ans: str) -> str:
    """First word, lowercase, trailing punctuation dropped (answers are one word)."""
    words = ans.strip().lower().split()
    return words[0].strip(".,!?;:") if words else ""


def by_scene(samples: Iterable[Sample]) -> Iterable[list[Sample]]:
    """Consecutive samples sharing one scene object (one encoder pass each)."""
    for _, group in itertools.groupby(samples, key=lambda s: id(s.scene) if s.scene is not None else id(s)):
        yield list(group)


def score(samples: Sequence[Sample], predictions: Sequence[str]) -> dict:
    """Accuracy overall, per question kind and (when the samples name one in ``meta``) per template."""
    per, per_t = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    for s, p in zip(samples, predictions):
        hit = int(normalize(p) == normalize(s.answer or ""))
        for table, key in ((per, s.kind or "all"), (per_t, s.meta.get("template"))):
            if key is not None:
                table[key][0] += hit
                table[key][1] += 1
    n = sum(v[1] for v in per.values())
    correct = sum(v[0] for v in per.values())
    out = {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "per_kind": {k: {"accuracy": c / t, "n": t} for k, (c, t) in sorted(per.items())},
    }
    if per_t:
        out["per_template"] = {k: {"accuracy": c / t, "n": t} for k, (c, t) in sorted(per_t.items())}
    return out


def paired(predictions: Sequence[dict], baseline: Sequence[dict], z: float = 1.96) -> dict:
    """Paired comparison of two ``evaluate(...)["predictions"]`` lists over the same questions.

    ``changed``: answers that differ from the baseline's; ``gained`` / ``lost``: of those, now right /
    now wrong. ``delta_points`` = 100 (gained - lost) / n with a normal-approximation interval over the
    per-question differences d_i in {-1, 0, 1} (var = (gained + lost) / n - delta^2): a pruned
    schedule whose interval contains 0 is not distinguishable from the baseline on these questions."""
    if len(predictions) != len(baseline):
        raise InputError(f"paired comparison needs the same questions: {len(predictions)} vs {len(baseline)} answers")
    changed = gained = lost = 0
    for a, b in zip(predictions, baseline):
        if a["question"] != b["question"]:
            raise InputError(f"paired comparison needs the same questions in the same order: {a['question']!r} vs {b['question']!r}")
        pa, pb, truth = normalize(a["prediction"]), normalize(b["prediction"]), normalize(a["answer"] or "")
        if pa != pb:
            changed += 1
            gained += int(pa == truth)
            lost += int(pb == truth)
    n = len(predictions)
    d = (gained - lost) / n if n else 0.0
    half = z * ((max(0.0, (gained + lost) / n - d * d) / n) ** 0.5) if n else 0.0
    return {"n": n, "changed": changed, "gained": gained, "lost": lost, "delta_points": 100 * d,
            "delta_ci95_points": [100 * (d - half), 100 * (d + half)]}


def evaluate(answer_fn: Callable[[list[Sample]], list[str]], samples: Iterable[Sample], progress=None) -> dict:
    """Run ``answer_fn`` scene by scene; return accuracy, n, per_kind and the predictions."""
    done, preds = [], []
    for group in by_scene(samples):
        preds.extend(answer_fn(group))
        done.extend(group)
        if progress is not None:
            progress.update(len(group))
    out = score(done, preds)
    out["predictions"] = [
        {"question": s.question, "answer": s.answer, "prediction": p, "kind": s.kind,
         "template": s.meta.get("template"), "seed": s.meta.get("seed")}
        for s, p in zip(done, preds)
    ]
    return out


def torch_answer_fn(adapter, max_new_tokens: int = 8):
    from adatoken_compile.compiler.generate import greedy_answers

    return lambda group: greedy_answers(adapter, group, max_new_tokens=max_new_tokens)


def runtime_answer_fn(rt, max_new_tokens: int = 8):
    """Answers through an ONNX Runtime artifact (torch-free path)."""

    def fn(group: list[Sample]) -> list[str]:
        return rt.generate([s.scene for s in group], [s.question for s in group], max_new_tokens=max_new_tokens)

    return fn


def eval_artifact(artifact: str, samples: Sequence[Sample], *, baseline: str | None = None, model: str | None = None,
                  progress=None) -> dict:
    """Accuracy of an artifact next to the unpruned model on the same questions.

    The unpruned reference is ``baseline`` (an identity-schedule artifact) when given, else the
    PyTorch adapter of ``model`` (default: the bundled model), which must be the model the
    artifact was compiled from.
    """
    from adatoken_compile.errors import ScheduleMismatch
    from adatoken_compile.runtime.engine import load

    rt = load(artifact)
    res = evaluate(runtime_answer_fn(rt), samples, progress=progress)
    if baseline:
        ref_rt = load(baseline)
        if ref_rt.manifest.data["model"]["fingerprint"] != rt.manifest.data["model"]["fingerprint"]:
            raise ScheduleMismatch(f"{baseline}: baseline artifact was compiled from another model than {artifact}")
        ref = evaluate(runtime_answer_fn(ref_rt), samples)
    else:
        from adatoken_compile.models.registry import load_adapter

        adapter = load_adapter(model)
        if adapter.fingerprint() != rt.manifest.data["model"]["fingerprint"]:
            raise ScheduleMismatch(f"{artifact}: compiled from another model than {model or 'the bundled model'}; "
                                   "pass --model DIR of the model it was compiled from, or --baseline ART0")
        ref = evaluate(torch_answer_fn(adapter), samples)
    res["baseline_accuracy"] = ref["accuracy"]
    res["baseline_per_kind"] = ref["per_kind"]
    if "per_template" in ref:
        res["baseline_per_template"] = ref["per_template"]
    res["agreement"] = sum(a["prediction"] == b["prediction"] for a, b in zip(res["predictions"], ref["predictions"])) / max(1, res["n"])
    res["paired"] = paired(res["predictions"], ref["predictions"])
    res["artifact"] = artifact
    res["schedule"] = {"policy": rt.manifest.data.get("schedule", {}).get("policy"),
                       "cuts": rt.manifest.data.get("schedule", {}).get("cuts")}
    return res


def pruned_answer_fn(adapter, schedule, max_new_tokens: int = 8):
    """Answers of the PyTorch reference of a compiled artifact: the same pruned prefill and
    per-layer KV-cache decoding (``decode.generate_pruned``), parity-tested against ORT."""
    import torch

    from adatoken_compile.compiler.decode import generate_pruned

    def fn(group: list[Sample]) -> list[str]:
        batch = adapter.prepare(group)
        with torch.no_grad():
            ids = generate_pruned(adapter.decoder, batch, schedule, max_new_tokens=max_new_tokens,
                                  eos_token_id=adapter.eos_token_id)
        return [adapter.tokenizer.decode(r).strip() for r in ids]

    return fn


def calibration_batches(adapter, split: str, samples: int, batch_size: int = 4, start_scene: int = 0):
    """(DecoderInputs, answer ids) batches from the procedural benchmark's calibration split."""
    import torch

    from adatoken_compile.benchmark3d.dataset import iter_samples

    todo = list(iter_samples(split, limit=samples, start_scene=start_scene))
    if not todo:
        raise InputError(f"calibration split '{split}' yielded no samples")
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        answers = [torch.tensor(adapter.tokenizer.encode(" " + s.answer) + [adapter.eos_token_id]) for s in chunk]
        yield adapter.prepare(chunk), answers
