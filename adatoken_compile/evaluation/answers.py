"""Answer functions for :func:`adatoken_compile.evaluation.accuracy.evaluate`: the PyTorch reference
(unpruned, or pruned by a schedule) and a compiled artifact through ONNX Runtime, and the
comparison of an artifact with the unpruned model on the same questions."""

from __future__ import annotations

from typing import Sequence

import torch

from adatoken_compile.compiler.reference import answers
from adatoken_compile.data import for_input
from adatoken_compile.errors import ScheduleMismatch
from adatoken_compile.evaluation.accuracy import agreement, evaluate, paired
from adatoken_compile.runtime import load


def reference_answer_fn(adapter, schedule=None, max_new_tokens: int = 8, prepare=None):
    """Answers of the PyTorch reference: the pruned prefill and per-layer KV-cache decoding of
    ``schedule`` (None: unpruned), parity-tested against the compiled artifact. ``prepare``: what
    turns a group of samples into decoder inputs (default ``adapter.prepare``; a memo of it lets
    several schedules share one encoding of each scene)."""

    def fn(group: list) -> list[str]:
        with torch.no_grad():
            return answers(adapter, group, schedule, max_new_tokens=max_new_tokens,
                           batch=prepare(group) if prepare is not None else None)

    return fn


def runtime_answer_fn(rt, max_new_tokens: int = 8):
    """Answers through an ONNX Runtime artifact (torch-free path)."""

    def fn(group: list) -> list[str]:
        sources = [s.scene if rt.input_kind == "scene" else s.image for s in group]
        return rt.generate(sources, [s.question for s in group], max_new_tokens=max_new_tokens)

    return fn


def eval_artifact(artifact: str, samples: Sequence, *, baseline: str | None = None, adapter=None, progress=None,
                  providers=None, captions: bool = False, positions: Sequence[int] | None = None) -> dict:
    """Accuracy of an artifact next to the unpruned model on the same questions, and how often the
    two answer alike (``agreement``: all that is measured on questions without answers).

    The unpruned reference is ``baseline`` (an identity-schedule artifact) when given, else the
    PyTorch ``adapter``, which must be the model the artifact was compiled from. ``positions``:
    see :func:`adatoken_compile.evaluation.accuracy.evaluate`.
    """
    rt = load(artifact, providers)
    samples = for_input(samples, rt.input_kind)
    res = evaluate(runtime_answer_fn(rt), samples, progress=progress, captions=captions, positions=positions)
    if baseline:
        ref_rt = load(baseline, providers)
        if ref_rt.manifest.fingerprint != rt.manifest.fingerprint:
            raise ScheduleMismatch(f"{baseline}: baseline artifact was compiled from another model than {artifact}")
        ref = evaluate(runtime_answer_fn(ref_rt), samples, captions=captions, positions=positions)
    else:
        if adapter is None or adapter.fingerprint() != rt.manifest.fingerprint:
            raise ScheduleMismatch(f"{artifact}: compiled from another model than the one given; pass --model DIR of "
                                   "the model it was compiled from, or --baseline ART0")
        ref = evaluate(reference_answer_fn(adapter), samples, captions=captions, positions=positions)
    for key in ("accuracy", "em1", "em1_refined", "per_kind", "per_template", "bleu4", "cider"):
        if key in ref:
            res[f"baseline_{key}"] = ref[key]
    res["agreement"] = agreement(res["predictions"], ref["predictions"])
    res["paired"] = paired(res["predictions"], ref["predictions"])
    res["artifact"] = artifact
    res["schedule"] = {"policy": rt.schedule.policy, "cuts": [{"layer": c.layer, "keep": c.keep} for c in rt.schedule.cuts]}
    return res
