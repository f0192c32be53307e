"""Uniform: spatially even sampling over each image's token grid.

For each image (segment) the budget share is spread as a strided lattice over its (T, H, W) grid:
rows and columns (and frames) are sampled at even strides, not every k-th index of a flattened
list. The sample's budget is shared between its images in proportion to their token counts;
with `budget: per_frame` each frame (a video frame, an image) gets a lattice of its own budget.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenprune.contracts.reducer import Reducer, TokenView, split_budget


def axis_counts(extent: tuple[int, ...], k: int) -> list[int]:
    """Samples per axis of a lattice with at least k points, as even as the grid's aspect allows."""
    counts = [1] * len(extent)
    while math.prod(counts) < k:
        open_axes = [a for a in range(len(extent)) if counts[a] < extent[a]]
        axis = max(open_axes, key=lambda a: (extent[a] / counts[a], -a))
        counts[axis] += 1
    return counts


def strided(size: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(size), each at the centre of its stride."""
    return [int((i + 0.5) * size / count) for i in range(count)]


def lattice(extent: tuple[int, ...], k: int) -> list[tuple[int, ...]]:
    """Exactly k cells of a grid of shape `extent`, on an even strided lattice (row-major order)."""
    if k == 0:
        return []
    axes = [strided(size, n) for size, n in zip(extent, axis_counts(extent, k), strict=True)]
    cells = [
        tuple(c)
        for c in torch.cartesian_prod(*[torch.tensor(a) for a in axes]).reshape(-1, len(axes)).tolist()
    ]
    return [cells[i] for i in strided(len(cells), k)]


class UniformGrid(Reducer):
    """Strided 2-D (or 3-D, for video) selection per image."""

    def select(self, view: TokenView) -> Tensor:
        keep = torch.zeros_like(view.candidates)
        for b in range(view.candidates.shape[0]):
            self._select_sample(view, b, keep[b])
        return keep

    def _select_sample(self, view: TokenView, b: int, keep: Tensor) -> None:
        per_frame = view.frame_budget is not None
        groups = view.frame[b] if per_frame else view.segment[b]
        ids = groups[view.candidates[b]].unique().tolist()
        sizes = [int((groups == g).sum()) for g in ids]
        shares = view.frame_budget[b, ids].tolist() if per_frame else split_budget(int(view.budget[b]), sizes)
        for group, share in zip(ids, shares, strict=True):
            where = (groups == group).nonzero().squeeze(1)
            extent, coords = view.extent[b, where[0]].tolist(), view.coords[b, where]
            if per_frame:  # one frame of its segment: a lattice over that frame's (H, W) grid
                extent, coords = [1, *extent[1:]], coords * torch.tensor([0, 1, 1], device=coords.device)
            cell_to_token = {tuple(c): int(i) for c, i in zip(coords.tolist(), where.tolist(), strict=True)}
            chosen = [cell_to_token[c] for c in lattice(tuple(extent), share) if c in cell_to_token]
            keep[chosen] = True
            missing = share - len(chosen)
            if missing:  # cells absent from this sequence (an earlier stage removed them): fill in order
                rest = [int(i) for i in where if not keep[i]]
                keep[rest[:: max(1, len(rest) // missing)][:missing]] = True
