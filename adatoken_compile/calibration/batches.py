"""Calibration batches from samples: the decoder inputs, and the answer ids when known (the
answer-side statistics are teacher-forced; without answers they are simply not collected)."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch


BATCH_SIZE = 4


def sample_batches(adapter, samples: Iterable, batch_size: int = BATCH_SIZE) -> Iterator[tuple]:
    """``(DecoderInputs, answers)`` per ``batch_size`` samples; ``answers[b]`` is the answer's token ids
    followed by EOS, or None for a sample without an answer. No samples, no batches (no held-back
    questions, or a torchrun rank's empty share): the calibration says what it lacks."""
    todo = list(samples)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        answers = [None if not s.answer else
                   torch.tensor(adapter.tokenizer.encode(" " + s.answer) + [adapter.eos_token_id]) for s in chunk]
        yield adapter.prepare(chunk), (None if all(a is None for a in answers) else answers)


def input_batches(adapter, samples: Iterable, batch_size: int = BATCH_SIZE) -> list:
    """Decoder inputs only (validation batches: agreement needs no answers); none for no samples."""
    todo = list(samples)
    return [b for b, _ in sample_batches(adapter, todo, batch_size)] if todo else []
