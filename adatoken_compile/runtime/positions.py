"""Position ids in the layout an artifact declares (``preprocess.json`` ``positions``), in numpy.

The compiler writes the decoder spec's layout name (:meth:`adatoken_compile.models.spec.DecoderSpec.position_layout`);
the runtime builds the prefill's ``position_ids`` and each decode step's from it, so a family whose
positions are not one index per token runs on the same runtime without the runtime naming it.
Artifacts without the key use ``sequence`` (what every artifact did before the key existed).

Each layout is three pure functions of the left-padded batch:

* ``prefill(attention_mask (B, L), spatial_mask (B, L), spatial_xyz (B, L, 3) or None)`` -> the
  prefill graph's ``position_ids``;
* ``start(attention_mask, spatial_mask, spatial_xyz)`` -> (B,) the index the first decoded token takes
  (whatever the cuts dropped: positions are the ORIGINAL prompt's);
* ``decode(start (B,), step)`` -> the decode graph's ``position_ids`` of the token decoded after
  ``step`` others.

Layouts:

``sequence``
    ``(B, L)``: ``0..n-1`` over a row's ``n`` valid tokens, 1 on padding; decoding continues at
    ``n + step``, ``(B, 1)``.
``grid3``
    ``(3, B, L)`` (M-RoPE's shape): a text token has its running index on all three axes; the n
    spatial tokens of a span starting at running index s sit on a grid ``w = ceil(sqrt(n))`` wide,
    ``(s, s + r // w, s + r % w)`` for the r-th; text after the span continues at the span's
    largest position + 1; padding is 1. Decoding continues from the largest prompt position + 1
    (what Qwen2.5-VL's ``rope_deltas`` carry), the same index on each axis, ``(3, B, 1)``.
``mrope``
    Qwen2.5-VL's M-RoPE (``get_rope_index``): as ``grid3``, but a spatial span's tokens sit at
    the span's start s plus their own (t, h, w) from ``spatial_xyz`` (the image's merged-token
    grid; a video's t is its temporal patch scaled by ``tokens_per_second * second_per_grid_ts``),
    so images and videos of any shape keep transformers' positions; text after the span continues
    at its largest h / w position + 1 (a video's t may run further: transformers steps over the
    rows and columns only), and decoding from the largest prompt position + 1 as in ``grid3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError


def _sequence_prefill(attention_mask: np.ndarray, spatial_mask: np.ndarray, spatial_xyz=None) -> np.ndarray:
    valid = np.asarray(attention_mask).astype(bool)
    pos = np.cumsum(valid, axis=1, dtype=np.int64) - 1
    return np.where(valid, pos, 1).astype(np.int64)


def _sequence_start(attention_mask: np.ndarray, spatial_mask: np.ndarray, spatial_xyz=None) -> np.ndarray:
    return np.asarray(attention_mask).astype(bool).sum(1).astype(np.int64)


def _sequence_decode(start: np.ndarray, step: int) -> np.ndarray:
    return (np.asarray(start, np.int64) + int(step))[:, None]


def _spans(attention_mask: np.ndarray, spatial_mask: np.ndarray, offsets) -> np.ndarray:
    """(3, B, L) positions: text tokens count up on all three axes; a spatial span starting at
    position s puts its tokens at s + ``offsets(b, cols)`` ((3, n) per-axis offsets of row b's span
    columns ``cols``), and the text after it continues at the span's largest h / w position + 1;
    padding is 1."""
    valid = np.asarray(attention_mask).astype(bool)
    spatial = np.asarray(spatial_mask).astype(bool) & valid
    B, L = valid.shape
    pos = np.ones((3, B, L), np.int64)
    for b in range(B):
        t, j = 0, 0
        idx = np.flatnonzero(valid[b])
        while j < len(idx):
            if not spatial[b, idx[j]]:
                pos[:, b, idx[j]] = t
                t, j = t + 1, j + 1
                continue
            end = j
            while end < len(idx) and spatial[b, idx[end]]:
                end += 1
            cols = idx[j:end]
            pos[:, b, cols] = t + offsets(b, cols)
            # the text goes on past the span's rows and columns; a video's time axis may reach further
            t = int(pos[1:, b, cols].max()) + 1
            j = end
    return pos


def _square(b: int, cols: np.ndarray) -> np.ndarray:
    # the r-th of n tokens at (0, r // w, r % w) on a ceil(sqrt(n))-wide grid
    r = np.arange(len(cols))
    w = math.ceil(math.sqrt(len(cols)))
    return np.stack([np.zeros_like(r), r // w, r % w])


def _grid3_prefill(attention_mask: np.ndarray, spatial_mask: np.ndarray, spatial_xyz=None) -> np.ndarray:
    return _spans(attention_mask, spatial_mask, _square)


def _mrope_prefill(attention_mask: np.ndarray, spatial_mask: np.ndarray, spatial_xyz=None) -> np.ndarray:
    if spatial_xyz is None:
        if (np.asarray(spatial_mask).astype(bool) & np.asarray(attention_mask).astype(bool)).any():
            raise InputError("mrope positions: spatial tokens without their (t, h, w) coordinates (spatial_xyz)")
        spatial_xyz = np.zeros((*np.shape(attention_mask), 3), np.float32)
    thw = np.rint(np.asarray(spatial_xyz, np.float64)).astype(np.int64)
    return _spans(attention_mask, spatial_mask, lambda b, cols: thw[b, cols].T)


def _after(prefill) -> Callable[..., np.ndarray]:
    """A 3-axis layout's ``start``: one past the largest position of each row's prompt."""

    def start(attention_mask: np.ndarray, spatial_mask: np.ndarray, spatial_xyz=None) -> np.ndarray:
        pos = prefill(attention_mask, spatial_mask, spatial_xyz)
        valid = np.broadcast_to(np.asarray(attention_mask).astype(bool)[None], pos.shape)
        return (np.where(valid, pos, -1).max(axis=(0, 2)) + 1).astype(np.int64)

    return start


def _grid3_decode(start: np.ndarray, step: int) -> np.ndarray:
    row = np.asarray(start, np.int64) + int(step)
    return np.ascontiguousarray(np.broadcast_to(row[None, :, None], (3, row.shape[0], 1)))


@dataclass(frozen=True)
class PositionLayout:
    """One layout: its name, the rank of its ``position_ids`` and its three functions."""

    name: str
    rank: int
    prefill: Callable[..., np.ndarray]
    start: Callable[..., np.ndarray]
    decode: Callable[[np.ndarray, int], np.ndarray]

    def to_dict(self) -> dict:
        return {"layout": self.name}


LAYOUTS = {
    "sequence": PositionLayout("sequence", 2, _sequence_prefill, _sequence_start, _sequence_decode),
    "grid3": PositionLayout("grid3", 3, _grid3_prefill, _after(_grid3_prefill), _grid3_decode),
    "mrope": PositionLayout("mrope", 3, _mrope_prefill, _after(_mrope_prefill), _grid3_decode),
}
DEFAULT = "sequence"


def layout_of(declared, where: str, fix: str) -> PositionLayout:
    """The layout a ``preprocess.json`` ``positions`` value declares (None: ``sequence``)."""
    if declared is None:
        return LAYOUTS[DEFAULT]
    name = declared.get("layout") if isinstance(declared, dict) else None
    if name not in LAYOUTS:
        raise InputError(f"{where}: 'positions' must be {{\"layout\": one of {', '.join(sorted(LAYOUTS))}}}, got "
                         f"{repr(declared)[:80]}; {fix}")
    return LAYOUTS[name]
