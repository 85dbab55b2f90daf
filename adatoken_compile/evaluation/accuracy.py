"""Answer accuracy, overall and per question kind, and paired comparisons of two answer lists.

``accuracy`` is the built-in benchmark's measure (the first word of the answer equals the first
word of a reference answer: its answers are one word); ``em1`` / ``em1_refined`` are the field's
(:mod:`.metrics`, ScanQA's normalisation) and BLEU-4 / CIDEr are added for question files.
Questions without reference answers are answered but not scored.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Callable, Iterable, Sequence

from adatoken_compile import distributed
from adatoken_compile.errors import InputError
from adatoken_compile.evaluation.metrics import answer_match, caption_scores, clean_answer


def normalize(ans: str) -> str:
    """First word, lowercase, trailing punctuation dropped (answers are one word)."""
    words = ans.strip().lower().split()
    return words[0].strip(".,!?;:") if words else ""


def by_scene(samples: Iterable) -> Iterable[list]:
    """Consecutive samples sharing one scene object (one encoder pass each)."""
    for _, group in itertools.groupby(samples, key=lambda s: id(s.scene) if s.scene is not None else id(s)):
        yield list(group)


def references(sample) -> list[str]:
    """A sample's reference answers (all of them when the data gives several)."""
    refs = sample.meta.get("answers") if isinstance(sample.meta.get("answers"), list) else None
    return list(refs) if refs else ([sample.answer] if sample.answer else [])


def hit(prediction: str, refs) -> int:
    """1 when the prediction's first word is a reference answer's first word (``accuracy``)."""
    return int(bool(refs) and normalize(prediction) in {normalize(r) for r in refs})


def _counts() -> list[int]:
    return [0, 0, 0, 0]  # accuracy hits, EM hits, refined-EM hits, questions


def score(samples: Sequence, predictions: Sequence[str], captions: bool = False) -> dict:
    """Accuracy and EM@1 / refined EM overall, per question kind (type) and (when the samples name
    one in ``meta``) per template, over the questions with reference answers; ``captions``: also
    BLEU-4 and CIDEr (ScanQA's caption metrics)."""
    tot, per, per_t = _counts(), defaultdict(_counts), defaultdict(_counts)
    scored_p, scored_r = [], []
    for s, p in zip(samples, predictions):
        refs = references(s)
        if not refs:
            continue
        em, rem = answer_match(clean_answer(p), [clean_answer(r) for r in refs])
        row = (hit(p, refs), em, rem, 1)
        for table in (tot, per[s.kind or "all"]) + ((per_t[s.meta["template"]],) if s.meta.get("template") else ()):
            for i, v in enumerate(row):
                table[i] += v
        scored_p.append(p)
        scored_r.append(refs)

    def rates(t):
        return {"accuracy": t[0] / t[3], "em1": t[1] / t[3], "em1_refined": t[2] / t[3], "n": t[3]}

    n = tot[3]
    out = {"accuracy": tot[0] / n if n else None, "em1": tot[1] / n if n else None,
           "em1_refined": tot[2] / n if n else None, "n": n, "questions": len(predictions),
           "per_kind": {k: rates(t) for k, t in sorted(per.items())}}
    if per_t:
        out["per_template"] = {k: rates(t) for k, t in sorted(per_t.items())}
    if captions and n:
        out.update(caption_scores(scored_p, scored_r))
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
        refs = a.get("answers") or ([a["answer"]] if a.get("answer") else [])
        if normalize(a["prediction"]) != normalize(b["prediction"]):
            changed += 1
            gained += hit(a["prediction"], refs)
            lost += hit(b["prediction"], refs)
    n = len(predictions)
    d = (gained - lost) / n if n else 0.0
    half = z * ((max(0.0, (gained + lost) / n - d * d) / n) ** 0.5) if n else 0.0
    return {"n": n, "changed": changed, "gained": gained, "lost": lost, "delta_points": 100 * d,
            "delta_ci95_points": [100 * (d - half), 100 * (d + half)]}


def agreement(predictions: Sequence[dict], baseline: Sequence[dict]) -> float:
    """Fraction of questions answered exactly as the baseline answered them."""
    return sum(a["prediction"] == b["prediction"] for a, b in zip(predictions, baseline)) / max(1, len(predictions))


def evaluate(answer_fn: Callable[[list], list[str]], samples: Iterable, progress=None, captions: bool = False,
             positions: Sequence[int] | None = None) -> dict:
    """Run ``answer_fn`` scene by scene; return the scores (:func:`score`) and the predictions.
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
    out = score(done, preds, captions=captions)
    out["predictions"] = [
        {"question": s.question, "answer": s.answer, "prediction": p, "kind": s.kind,
         "template": s.meta.get("template"), "seed": s.meta.get("seed"), "id": s.meta.get("id"),
         "scene": s.meta.get("scene_id"), "answers": references(s)}
        for s, p in zip(done, preds)
    ]
    return out
