"""Uniform: spatially even sampling over each image's token grid.

For each image (segment) the budget share is spread as a strided lattice over its (T, H, W) grid:
rows and columns (and frames) are sampled at even strides, not every k-th index of a flattened
list. The sample's budget is shared between its images in proportion to their token counts;
with `budget: per_frame` each frame (a video frame, an image) gets a lattice of its own budget.

Batched: every token tests whether it is a lattice cell of its own group, in integer arithmetic,
for the whole batch at once; nothing is read back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenprune.contracts.reducer import Reducer, TokenView, proportional_shares


def strided(size: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(size), each at the centre of its stride."""
    return [int((i + 0.5) * size / count) for i in range(count)]


def lattice(extent: tuple[int, ...], k: int) -> list[tuple[int, ...]]:
    """Exactly k cells of a grid of shape `extent` (T, H, W), on an even strided lattice (row-major order).

    As many samples per axis as the grid's aspect allows for at least k points (`lattice_counts`), each
    axis sampled at `strided` indices, then k of those points at `strided` indices of their row-major list.
    """
    cells = torch.cartesian_prod(*[torch.arange(n) for n in extent]).reshape(-1, len(extent))
    n = cells.shape[0]
    picked = on_lattice(
        cells, torch.tensor(extent).expand(n, -1), torch.full((n,), k), max(n, k).bit_length() + 1
    )
    return [tuple(c) for c in cells[picked].tolist()]


# -- the same lattice for tensors: [N, 3] extents and [N] budgets, one lattice per row ----------------


def lattice_counts(extent: Tensor, k: Tensor, steps: int) -> Tensor:
    """[N, 3] long: samples per axis of a lattice of at least k points, as even as the aspect allows.

    One row per lattice (extent [N, 3], k [N]). Greedy: one more sample on the open axis with the
    largest extent / count (ties: the earlier axis) until there are k points. It adds samples in
    decreasing order of the quotients e_a / c (c = 1 .. e_a - 1; ties: the earlier axis), so it
    stops at the largest quotient q* whose "all quotients >= q*" lattice has k points; each axis's
    candidate is found by bisection over c (`steps` >= log2 of the largest k). Quotients are
    compared as exact fractions.
    """
    e, wanted = extent.clamp(min=1).double(), k[:, None].double()
    lo = torch.ones_like(e)
    hi = torch.minimum(e - 1, wanted).clamp(min=1)
    for _ in range(steps):
        mid = torch.floor((lo + hi) / 2)
        enough = points_at_least(e, mid) >= wanted
        hi, lo = torch.where(enough, mid, hi), torch.where(enough, lo, mid + 1)
    valid = (e > 1) & (points_at_least(e, lo) >= wanted)
    e, lo = e.long(), lo.long()
    # q* = the largest e_a / lo_a over valid axes, as a fraction (p, r)
    p, r = e.masked_fill(~valid, 0), lo
    best = torch.zeros_like(k)
    for axis in range(1, 3):
        larger = p[:, axis] * r.gather(1, best[:, None])[:, 0] > p.gather(1, best[:, None])[:, 0] * r[:, axis]
        best = torch.where(larger, axis, best)
    p, r = p.gather(1, best[:, None]), r.gather(1, best[:, None])
    any_axis = valid.any(dim=1, keepdim=True)
    p = torch.where(any_axis, p, 1)
    above = torch.minimum(e - 1, -((-e * r) // p) - 1).clamp(min=0)  # quotients e/c > p/r
    counts = torch.where(any_axis, 1 + above, 1)
    tied = any_axis & ((e * r) % p == 0) & ((e * r) // p >= 1) & ((e * r) // p <= e - 1)
    for axis in range(3):  # quotients equal to q*, in axis order, until there are k points
        short = counts.prod(dim=1) < k
        counts[:, axis] += (short & tied[:, axis]).long()
    return counts


def points_at_least(e: Tensor, c: Tensor) -> Tensor:
    """[N, 3]: for each axis a, the points of the lattice taking every quotient >= e_a / c_a.

    e [N, 3] extents and c [N, 3], float64: small integers, so every division's floor is exact.
    """
    taken = torch.minimum(e[:, None, :] - 1, torch.floor(e[:, None, :] * c[:, :, None] / e[:, :, None]))
    return (1 + taken).prod(dim=-1)


def strided_index(coord: Tensor, size: Tensor, count: Tensor) -> Tensor:
    """Which of the `count` strided indices over range(size) `coord` is (all [N]), -1 if none."""
    size, count = size.clamp(min=1), count.clamp(min=1)
    i = -((size - 2 * coord * count) // (2 * size))  # ceil((2 coord count - size) / (2 size))
    on = (i >= 0) & (i < count) & ((2 * i + 1) * size // (2 * count) == coord)
    return torch.where(on, i, -1)


def on_lattice(coords: Tensor, extent: Tensor, k: Tensor, steps: int) -> Tensor:
    """[N] bool: whether the cell `coords` [N, 3] is one of the k cells of `lattice(extent, k)`."""
    counts = lattice_counts(extent, k, steps)
    return picked_cells(strided_index(coords, extent, counts), counts, k)


def picked_cells(index: Tensor, counts: Tensor, k: Tensor) -> Tensor:
    """[N] bool: whether the lattice point `index` [N, 3] of a (counts [N, 3]) lattice is among its
    k cells kept at `strided` indices of the row-major list (-1 in `index`: not a lattice point)."""
    flat = (index[:, 0] * counts[:, 1] + index[:, 1]) * counts[:, 2] + index[:, 2]
    picked = strided_index(flat, counts.prod(dim=1), k)
    return (index >= 0).all(dim=1) & (picked >= 0) & (k > 0)


# -- groups of a sample, without leaving the device ---------------------------------------------------


def dense_groups(groups: Tensor, members: Tensor) -> Tensor:
    """[B, L] long: `groups` renumbered 0, 1, ... in increasing order within each row (-1: not a member)."""
    n = groups.shape[1]
    ranked = torch.sort(torch.where(members, groups, torch.iinfo(groups.dtype).max), dim=1, stable=True)
    starts = torch.ones_like(ranked.values, dtype=torch.bool)
    starts[:, 1:] = ranked.values[:, 1:] != ranked.values[:, :-1]
    dense = torch.empty_like(groups).scatter_(1, ranked.indices, starts.long().cumsum(1) - 1)
    return dense.masked_fill(~members, -1).clamp(max=n - 1)


def per_group(values: Tensor, groups: Tensor) -> Tensor:
    """[B, L] sums of `values` [B, L] over each dense group (`groups`, -1: none), one column per group."""
    slot = groups.masked_fill(groups < 0, groups.shape[1])
    total = torch.zeros(groups.shape[0], groups.shape[1] + 1, dtype=values.dtype, device=values.device)
    return total.scatter_add_(1, slot, values)[:, :-1]


def at_token(per: Tensor, groups: Tensor) -> Tensor:
    """[B, L]: each token's entry of the per-group `per` [B, G] (0 for tokens of no group)."""
    return per.gather(1, groups.clamp(min=0)).masked_fill(groups < 0, 0)


def rank_in_group(mask: Tensor, groups: Tensor) -> Tensor:
    """[B, L] long: each `mask` token's rank in sequence order among those of its group (-1 elsewhere)."""
    n = groups.shape[1]
    slots = torch.arange(n, device=groups.device)
    key = torch.where(mask, groups * n + slots, torch.iinfo(groups.dtype).max)
    ranked = torch.sort(key, dim=1)
    group_of = torch.where(ranked.values == torch.iinfo(groups.dtype).max, -1, ranked.values // n)
    starts = torch.ones_like(group_of, dtype=torch.bool)
    starts[:, 1:] = group_of[:, 1:] != group_of[:, :-1]
    first = torch.where(starts, slots, 0).cummax(dim=1).values
    rank = torch.empty_like(groups).scatter_(1, ranked.indices, slots - first)
    return rank.masked_fill(~mask, -1)


@dataclass
class Lattices:
    """Each candidate's lattice: its group's grid and share of the budget, where it lies on it.

    groups [B, L] dense group of a candidate (-1 elsewhere); share [B, L] its group's k; extent and
    coords [B, L, 3] its grid and cell (per frame: the frame's (1, H, W)); counts [B, L, 3] the
    lattice's samples per axis; index [B, L, 3] which strided sample its cell is on each axis (-1: none).
    """

    groups: Tensor
    share: Tensor
    extent: Tensor
    coords: Tensor
    counts: Tensor
    index: Tensor

    def cells(self) -> Tensor:
        """[B, L] bool: the tokens at one of their group's k lattice cells."""
        flat = (-1, 3)
        picked = picked_cells(self.index.view(flat), self.counts.view(flat), self.share.flatten())
        return (self.groups >= 0) & picked.view_as(self.groups)


def lattices(view: TokenView) -> Lattices:
    """The `Lattices` of a view: groups are frames with `budget: per_frame` (their own budgets), else
    images, the sample's budget shared in proportion to each image's tokens (the images with candidates)."""
    members = view.candidates
    extent, coords = view.extent, view.coords
    if view.frame_budget is not None:  # one frame of its segment: a lattice over that frame's (H, W)
        share = view.frame_budget.gather(1, view.frame.clamp(min=0)).masked_fill(~members, 0)
        groups = dense_groups(view.frame, members)
        extent, coords = extent.clone(), coords.clone()
        extent[..., 0], coords[..., 0] = 1, 0
    else:
        images = dense_groups(view.segment, view.segment >= 0)
        sizes = per_group((images >= 0).long(), images)
        sizes = sizes.masked_fill(per_group(members.long(), images) == 0, 0)
        share = at_token(proportional_shares(view.budget, sizes), images).masked_fill(~members, 0)
        groups = images.masked_fill(~members, -1)
    steps = members.shape[1].bit_length() + 1
    counts = lattice_counts(extent.view(-1, 3), share.flatten(), steps)
    index = strided_index(coords.view(-1, 3), extent.view(-1, 3), counts)
    return Lattices(groups, share, extent, coords, counts.view_as(extent), index.view_as(extent))


class UniformGrid(Reducer):
    """Strided 2-D (or 3-D, for video) selection per image."""

    positions = "original"  # the position policy of the paper's reference code

    def select(self, view: TokenView) -> Tensor:
        grid = lattices(view)
        groups, k = grid.groups, grid.share
        chosen = grid.cells()
        missing = k - at_token(per_group(chosen.long(), groups), groups)
        # cells absent from this sequence (an earlier stage removed them): every step-th other member
        rest = view.candidates & ~chosen
        rank = rank_in_group(rest, groups)
        step = (at_token(per_group(rest.long(), groups), groups) // missing.clamp(min=1)).clamp(min=1)
        return chosen | (rest & (missing > 0) & (rank % step == 0) & (rank // step < missing))
