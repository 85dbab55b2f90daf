"""Next-token choice shared by the torch reference and the ONNX Runtime loop (numpy only, no torch).

The procedure is fixed so that any implementation given the same logits and seed picks the same
token:

* ``temperature <= 0``: greedy, ``argmax`` (lowest index on ties); the generator is not touched.
* otherwise, in float64: ``p = softmax(logits / temperature)``; order the vocabulary by ``p``
  descending (stable: ties by ascending index); keep the shortest prefix whose cumulative sum
  reaches ``top_p`` (at least one token); renormalise it; draw ``u = rng.random()`` (ONE draw);
  pick the first kept token whose renormalised cumulative sum exceeds ``u``.
* Batches (:func:`next_tokens`): rows in order ``0..B-1``, one :func:`sample_next` call per row per
  step, finished rows included (their pick is discarded), so the generator's state depends only on
  the step count and the batch size. The generator is ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError


def check_sampling(temperature, top_p, seed) -> None:
    """Refuse sampling settings that are not numbers in range (NaN would silently pick token 0)."""
    def num(v):
        return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)

    if not num(temperature) or temperature < 0:
        raise InputError(f"temperature {temperature!r}: must be a finite number >= 0 (0 = greedy)")
    if not num(top_p) or not (0.0 < top_p <= 1.0):
        raise InputError(f"top_p {top_p!r}: must be a number in (0, 1]")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise InputError(f"seed {seed!r}: must be a whole number >= 0, or None")


def sample_next(logits_row: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator | None) -> int:
    """One token id from a (V,) logits row (see the module docstring for the exact procedure)."""
    x = np.asarray(logits_row, dtype=np.float64).reshape(-1)
    if temperature is None or temperature <= 0.0:
        return int(np.argmax(x))
    if rng is None:
        raise ValueError("sample_next: sampling (temperature > 0) needs a numpy Generator")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"sample_next: top_p must be in (0, 1], got {top_p}")
    z = x / float(temperature)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    cum = np.cumsum(ps)
    n_keep = int(np.searchsorted(cum, top_p, side="left")) + 1
    n_keep = min(max(n_keep, 1), ps.shape[0])
    q = ps[:n_keep] / ps[:n_keep].sum()
    u = rng.random()
    j = int(np.searchsorted(np.cumsum(q), u, side="right"))
    return int(order[min(j, n_keep - 1)])


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


def next_tokens(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator | None) -> np.ndarray:
    """(B, V) logits -> (B,) int64 token ids, rows in order (one draw per row when sampling).

    NaN or inf logits are refused: argmax would answer token 0, silently (both generation loops,
    the PyTorch reference and ONNX Runtime, pick every token here)."""
    logits = np.asarray(logits)
    if not np.isfinite(logits).all():
        raise InputError("the model's logits came out NaN or inf: its weights or config values (norm epsilon, rope "
                         "settings) or the input are out of range; check the checkpoint and the scene or image")
    return np.array([sample_next(logits[b], temperature, top_p, rng) for b in range(logits.shape[0])], dtype=np.int64)
