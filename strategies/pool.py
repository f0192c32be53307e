"""Pool: average pooling of each image's token grid down to the budget (UniPruneBench's "Pool").

A baseline that recent benchmarks find hard to beat (Peng et al., "Can Visual Input Be Compressed? A
Visual Token Compression Benchmark for Large Multimodal Models", arXiv:2511.02650). Each image (or,
with `budget: per_frame`, each frame) is cut into as many windows as its share of the budget; each
window becomes one token, the plain average of its tokens, through the `Merge` contract.

Windows: the `uniform` lattice gives the budget's cells (as many rows and columns as the grid's
aspect allows, at even strides); every other token of the image joins the nearest cell on the grid
(squared distance in (t, row, col); ties: the later cell). When the lattice is a full grid of
strides dividing the image (64 or 144 of 24 x 24, 16 of 12 x 12), the windows are exactly the
non-overlapping s x s windows of average pooling; otherwise they are the nearest-cell regions
around an even lattice. The pooled token sits at its cell's slot, and the language model receives
a shorter, contiguously numbered sequence (`positions = "renumbered"`), as the reference pools
before the language model. No proportional attention: a pooled token is a plain average.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from tokenprune.strategies.uniform import UniformGrid
from torch import Tensor

from tokenprune.contracts.reducer import Merge, PositionPolicy, Reducer, TokenView


def nearest_cell(coords: Tensor, groups: Tensor, cells: Tensor, members: Tensor) -> Tensor:
    """[B, L] long: for each of `members`, the slot of the nearest of `cells` in its group, -1 elsewhere.

    coords [B, L, 3] (t, row, col); groups [B, L]; cells, members [B, L] bool. Squared grid distance;
    ties go to the later cell, so an even stride's middle row joins the window that starts there.
    """
    apart = (groups[:, :, None] != groups[:, None, :]) | ~cells[:, None, :]
    distance = sum((coords[:, :, None, a] - coords[:, None, :, a]).pow(2) for a in range(3)).float()
    distance = distance.masked_fill(apart, float("inf")).flip(-1)  # reversed: argmin's first is the last
    best, slot = distance.min(dim=-1)
    nearest = distance.shape[-1] - 1 - slot
    return torch.where(members & torch.isfinite(best), nearest, -1)


class Pool(Reducer):
    """Average pooling of each image's (or frame's) grid to its share of the budget."""

    merges: ClassVar[bool] = True
    positions: ClassVar[PositionPolicy] = "renumbered"

    def select(self, view: TokenView) -> Merge:
        keep = UniformGrid().select(view)
        groups = view.frame if view.frame_budget is not None else view.segment
        into = nearest_cell(view.coords, groups, keep, view.candidates & ~keep)
        return Merge(keep, into, proportional_attention=False)
