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

import numpy as np


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
    """(B, V) logits -> (B,) int64 token ids, rows in order (one draw per row when sampling)."""
    logits = np.asarray(logits)
    return np.array([sample_next(logits[b], temperature, top_p, rng) for b in range(logits.shape[0])], dtype=np.int64)
