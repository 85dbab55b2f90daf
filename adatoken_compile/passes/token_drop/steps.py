"""The inserted graph steps: each a tiny module around one pure function of :mod:`.ops`, so that a
re-export keeps it as a named scope (``adatoken_cut{c}_<role>``) in the ONNX graph."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from adatoken_compile.passes.token_drop.ops import (gather_seq, kept_positions, rebuild_mask4d, score_cut, select_tokens,
                                                    spatial_count, spatial_rank)
from adatoken_compile.selection import Rule

class ValidMask(nn.Module):
    def forward(self, attention_mask):
        return attention_mask != 0


class SpatialCount(nn.Module):
    def forward(self, spatial, valid):
        return spatial_count(spatial, valid)


class SpatialRank(nn.Module):
    def forward(self, spatial, valid):
        return spatial_rank(spatial, valid)


class Score(nn.Module):
    """The cut's selection rule; inputs the rule does not read are passed as None."""

    def __init__(self, rule: Rule, cut_index: int, keep: float):
        super().__init__()
        self.rule, self.cut_index, self.keep = rule, int(cut_index), float(keep)

    def forward(self, valid, spatial, n0, query=None, key=None, hidden=None, xyz=None, srank=None):
        return score_cut(self.rule, self.cut_index, self.keep, valid, spatial, n0, query=query, key=key, hidden=hidden,
                         xyz=xyz, srank=srank)

    def extra_repr(self):
        return f"rule={self.rule.label()}"


class Select(nn.Module):
    def __init__(self, keep: float):
        super().__init__()
        self.keep = float(keep)

    def forward(self, scores, valid, spatial, n0):
        return select_tokens(scores, valid, spatial, n0, self.keep)

    def extra_repr(self):
        return f"keep={self.keep}"


class GatherSeq(nn.Module):
    def __init__(self, dims: Sequence[int], batch_dim: int = 0):
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        self.batch_dim = int(batch_dim)

    def forward(self, x, idx):
        return gather_seq(x, idx, self.dims, self.batch_dim)

    def extra_repr(self):
        return f"dims={self.dims}" + (f", batch_dim={self.batch_dim}" if self.batch_dim else "")


class RebuildMask4d(nn.Module):
    def forward(self, mask, idx, new_valid):
        return rebuild_mask4d(mask, idx, new_valid)


class KeptPositions(nn.Module):
    def forward(self, idx, new_valid, prev=None):
        return kept_positions(prev, idx, new_valid)
