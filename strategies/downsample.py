"""Downsample: each image's feature grid resampled to a smaller grid by area interpolation (VTC-Bench).

The baseline of VTC-Bench (Liao et al., "Are We Using the Right Benchmark: An Evaluation Framework
for Visual Token Compression Methods", arXiv:2510.07143), which finds that plain image downsampling
beats many compression methods: it stands for "a lower-resolution image". Before the language model
(`layer: 0`), each image (or, with `budget: per_frame`, each frame) of T x H x W tokens becomes a
grid of t x h x w tokens, each the mean of its area bin, as `F.interpolate(mode="area")` (adaptive
average pooling) computes it: output cell i of n along an axis of size e averages the inputs
floor(i e / n) .. ceil((i + 1) e / n) - 1, so on a grid the budget does not divide, a token feeds
two neighbouring cells (the fractional weights of `Merge.weights`).

The output grid is the `uniform` lattice's: as many rows and columns (and frames) as the image's
aspect allows for at least the image's share k of the budget; each output cell sits at its lattice
token's slot, and the language model receives a shorter, contiguously numbered sequence
(`positions = "renumbered"`). Deviation: when k is not a full grid (t h w > k, e.g. 18 of 6 x 6
needs a 4 x 5 grid of 20), the k cells `uniform` keeps of that grid are kept and the others' bins
are dropped; choose `keep` as a grid (9, 16, 64, 144 of a square image) for the plain resampling.
No proportional attention: a resampled token is a plain average.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from tokenprune.strategies.uniform import Lattices, lattices
from torch import Tensor

from tokenprune.contracts.reducer import Merge, PositionPolicy, Reducer, TokenView


def area_bins(grid: Lattices, cells: Tensor) -> Tensor:
    """[B, L, L] float: 1 where token j lies in the area bin of output cell i (a kept lattice cell of
    its group), else 0. The bin of lattice sample c of n along an axis of size e holds the inputs
    floor(c e / n) <= x < ceil((c + 1) e / n)."""
    e, n, c = grid.extent, grid.counts.clamp(min=1), grid.index.clamp(min=0)
    start, end = c * e // n, -((-(c + 1) * e) // n)  # [B, L, 3] of each cell
    inside = (start[:, :, None, :] <= grid.coords[:, None, :, :]) & (
        grid.coords[:, None, :, :] < end[:, :, None, :]
    )
    same = grid.groups[:, :, None] == grid.groups[:, None, :]
    return (inside.all(dim=-1) & same & cells[:, :, None] & (grid.groups >= 0)[:, None, :]).float()


class Downsample(Reducer):
    """Area interpolation of each image's (or frame's) grid to its share of the budget."""

    merges: ClassVar[bool] = True
    positions: ClassVar[PositionPolicy] = "renumbered"

    def select(self, view: TokenView) -> Merge:
        grid = lattices(view)
        cells = grid.cells()
        weights = area_bins(grid, cells)
        into = weights.argmax(dim=1)  # a removed token's first bin: its survivor for source tracking
        into = torch.where(view.candidates & ~cells & (weights.sum(dim=1) > 0), into, -1)
        return Merge(cells, into, proportional_attention=False, weights=weights)
