"""Answer accuracy, overall and per question kind, and paired comparisons of two answer lists."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Callable, Iterable, Sequence

from adatoken_compile import distributed
from adatoken_compile.errors import InputError


def normalize(ans: str) -> str:
    """First word, lowercase, trailing punctuation dropped (answers are one word)."""
    words = ans.strip().lower().split()
    return words[0].strip(".,!?;:") if words else ""


def by_scene(samples: Iterable) -> Iterable[list]:
    """Consecutive samples sharing one scene object (one encoder pass each)."""
    for _, group in itertools.groupby(samples, key=lambda s: id(s.scene) if s.scene is not None else id(s)):
        yield list(group)


def score(samples: Sequence, predictions: Sequence[str]) -> dict:
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


def evaluate(answer_fn: Callable[[list], list[str]], samples: Iterable, progress=None,
             positions: Sequence[int] | None = None) -> dict:
    """Run ``answer_fn`` scene by scene; return accuracy, n, per_kind and the predictions.
    ``positions``: the samples are this process's share of a torchrun launch, at these positions
    of the whole; every process then scores the whole, in order."""
    samples = list(samples)
    if progress is not None and positions is not None and distributed.active():
        progress.reset(total=len(samples))  # rank 0 shows its own share
    done, preds = [], []
    for group in by_scene(samples):
        preds.extend(answer_fn(group))
        done.extend(group)
        if progress is not None:
            progress.update(len(group))
    if positions is not None:
        done, preds = distributed.gather_ordered(positions, distributed.portable(done), preds)
    out = score(done, preds)
    out["predictions"] = [
        {"question": s.question, "answer": s.answer, "prediction": p, "kind": s.kind,
         "template": s.meta.get("template"), "seed": s.meta.get("seed")}
        for s, p in zip(done, preds)
    ]
    return out
