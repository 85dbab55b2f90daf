"""Answer accuracy on the procedural benchmark, overall and per question kind."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Callable, Iterable, Sequence

from .contract import Sample


def normalize(ans: str) -> str:
    """First word, lowercase, trailing punctuation dropped (answers are one word)."""
    words = ans.strip().lower().split()
    return words[0].strip(".,!?;:") if words else ""


def by_scene(samples: Iterable[Sample]) -> Iterable[list[Sample]]:
    """Consecutive samples sharing one scene object (one encoder pass each)."""
    for _, group in itertools.groupby(samples, key=lambda s: id(s.scene) if s.scene is not None else id(s)):
        yield list(group)


def score(samples: Sequence[Sample], predictions: Sequence[str]) -> dict:
    per = defaultdict(lambda: [0, 0])
    for s, p in zip(samples, predictions):
        k = s.kind or "all"
        per[k][0] += int(normalize(p) == normalize(s.answer or ""))
        per[k][1] += 1
    n = sum(v[1] for v in per.values())
    correct = sum(v[0] for v in per.values())
    return {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "per_kind": {k: {"accuracy": c / t, "n": t} for k, (c, t) in sorted(per.items())},
    }


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
        {"question": s.question, "answer": s.answer, "prediction": p, "kind": s.kind, "seed": s.meta.get("seed")}
        for s, p in zip(done, preds)
    ]
    return out


def torch_answer_fn(adapter, max_new_tokens: int = 8):
    from .generate import greedy_answers

    return lambda group: greedy_answers(adapter, group, max_new_tokens=max_new_tokens)
