"""The inserted graph steps: each a tiny module around one pure function of :mod:`.ops`, so that a
re-export keeps it as a named scope (``adatoken_cut{c}_<role>``) in the ONNX graph."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from adatoken_compile.passes.token_drop.ops import gather_seq, kept_positions, rebuild_mask4d, score_for, select_tokens, spatial_count

class ValidMask(nn.Module):
    def forward(self, attention_mask):
        return attention_mask != 0


class SpatialCount(nn.Module):
    def forward(self, spatial, valid):
        return spatial_count(spatial, valid)


class Score(nn.Module):
    def __init__(self, scoring: dict | None = None, cut_index: int = 0):
        super().__init__()
        self.scoring = dict(scoring or {"query": "last_token"})
        self.cut_index = int(cut_index)

    def forward(self, query, key, valid):
        return score_for(self.scoring, self.cut_index, query, key, valid)

    def extra_repr(self):
        return f"query={self.scoring.get('query')}"


class Select(nn.Module):
    def __init__(self, keep: float):
        super().__init__()
        self.keep = float(keep)

    def forward(self, scores, valid, spatial, n0):
        return select_tokens(scores, valid, spatial, n0, self.keep)

    def extra_repr(self):
        return f"keep={self.keep}"


class GatherSeq(nn.Module):
    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = tuple(int(d) for d in dims)

    def forward(self, x, idx):
        return gather_seq(x, idx, self.dims)

    def extra_repr(self):
        return f"dims={self.dims}"


class RebuildMask4d(nn.Module):
    def forward(self, mask, idx, new_valid):
        return rebuild_mask4d(mask, idx, new_valid)


class KeptPositions(nn.Module):
    def forward(self, idx, new_valid, prev=None):
        return kept_positions(prev, idx, new_valid)
