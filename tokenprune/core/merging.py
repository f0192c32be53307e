"""Shared mechanics of merging: size-weighted averages, token sizes, key biases and source tracking.

A strategy that returns a `Merge` only says which token joins which; these functions do the rest,
once, for every site (a language model's layer K, a ViT block). Shapes: B samples, L tokens of the
current sequence, N tokens of the original one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tokenprune.indexing import gather_tokens, left_aligned_index

if TYPE_CHECKING:
    from tokenprune.contracts.reducer import Merge


def merge_average(x: Tensor, sizes: Tensor, into: Tensor) -> tuple[Tensor, Tensor]:
    """Each survivor becomes the size-weighted average of itself and of the tokens merged into it.

    x [B, L, D], sizes [B, L] float, into [B, L] long (-1: merges nowhere). Returns (x, sizes) of the
    same shapes: `sum(x * size) / sum(size)` and `sum(size)` at destinations, everything else as it
    was (tokens merged away are dropped by the caller). Computed in float32.
    """
    joined = into >= 0
    batch, length, width = x.shape
    slots = torch.arange(length, device=x.device).expand(batch, length)
    target = torch.where(joined, into, slots)
    weights = sizes.float()
    total = torch.zeros(batch, length, width, dtype=torch.float32, device=x.device)
    total.scatter_add_(1, target[..., None].expand(-1, -1, width), x.float() * weights[..., None])
    weight = torch.zeros_like(weights).scatter_add_(1, target, weights)
    received = torch.zeros_like(into).scatter_add_(1, target, joined.long()) > 0
    merged = torch.where(received[..., None], (total / weight[..., None]).to(x.dtype), x)
    return merged, torch.where(received, weight, sizes.float())


def merge_target_plus_mean(x: Tensor, sizes: Tensor, into: Tensor) -> tuple[Tensor, Tensor]:
    """Each survivor that receives members becomes itself plus their size-weighted mean (VisionZip's code).

    Shapes and sizes as `merge_average` (`sizes` sum at destinations); computed in float32.
    """
    joined = into >= 0
    batch, length, width = x.shape
    slots = torch.arange(length, device=x.device).expand(batch, length)
    target = torch.where(joined, into, slots)  # non-members add 0 to themselves, nothing to others
    weights = sizes.float() * joined
    total = torch.zeros(batch, length, width, dtype=torch.float32, device=x.device)
    total.scatter_add_(1, target[..., None].expand(-1, -1, width), x.float() * weights[..., None])
    received = torch.zeros_like(weights).scatter_add_(1, target, weights)
    mean = total / received.clamp(min=1e-12)[..., None]
    merged = torch.where((received > 0)[..., None], (x.float() + mean).to(x.dtype), x)
    return merged, sizes.float() + received


def merge_weighted(x: Tensor, sizes: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Each survivor becomes the weighted, size-weighted average of the tokens its row of `weights` takes in.

    x [B, L, D], sizes [B, L] float, weights [B, L, L] (row i: the weight of each token j in survivor i;
    all-zero rows: tokens left as they are). Returns (x, sizes): `sum_j w_ij s_j x_j / sum_j w_ij s_j` and
    `sum_j w_ij s_j` where a row has weight, everything else as it was. Computed in float32.
    """
    mass = weights.float() * sizes.float()[:, None, :]
    total = mass.sum(dim=-1)
    received = total > 0
    merged = (mass @ x.float()) / total.clamp(min=1e-12)[..., None]
    return torch.where(received[..., None], merged.to(x.dtype), x), torch.where(
        received, total, sizes.float()
    )


def merge_tokens(x: Tensor, sizes: Tensor, merge: Merge) -> tuple[Tensor, Tensor]:
    """The survivors of `merge` with their members taken in by its `combine` rule (or its `weights`),
    and their new sizes."""
    if merge.weights is not None:
        return merge_weighted(x, sizes, merge.weights)
    combine = merge_average if merge.combine == "average" else merge_target_plus_mean
    return combine(x, sizes, merge.into)


def key_bias(sizes: Tensor | None) -> Tensor | None:
    """[B, L] log(size) per key for proportional attention; None while every size is 1 (no bias at all)."""
    if sizes is None or not bool((sizes != 1).any()):
        return None
    return sizes.float().log()


def initial_groups(valid: Tensor) -> Tensor:
    """[B, N] source map before any reduction: every real token is its own group, padding is -1."""
    positions = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    return positions.masked_fill(~valid, -1)


def follow_groups(groups: Tensor, index: Tensor, survive: Tensor, into: Tensor | None) -> Tensor:
    """Source tracking through one reduction.

    groups [B, N]: for each original token, the original position of the current token holding it
    (-1: removed). index [B, L]: original positions of the current tokens (-1: filler). survive
    [B, L]: current tokens that stay. into [B, L] or None: merge destinations (slots). Returns the
    updated [B, N] map: a token merged into a survivor now belongs to the survivor's group.
    """
    batch, length = index.shape
    slots = torch.arange(length, device=index.device).expand(batch, length)
    destination = slots.masked_fill(~survive, -1)
    if into is not None:
        destination = torch.where(into >= 0, into, destination)
    destination_position = index.gather(1, destination.clamp(min=0)).masked_fill(destination < 0, -1)
    n_original = groups.shape[1]
    slot_of = torch.full((batch, n_original + 1), -1, dtype=torch.long, device=index.device)
    slot_of.scatter_(1, index.masked_fill(index < 0, n_original), slots)
    slot = slot_of.gather(1, groups.clamp(min=0)).masked_fill(groups < 0, -1)
    return destination_position.gather(1, slot.clamp(min=0)).masked_fill(slot < 0, -1)


def sources(groups: Tensor, kept: Tensor) -> Tensor:
    """[B, L, N] bool: which original tokens each kept token covers (ToMe's source map).

    groups [B, N] from `follow_groups`; kept [B, L] original positions of the surviving tokens (-1: filler).
    Rows of real tokens partition the original tokens that were not dropped outright.
    """
    return (kept[:, :, None] == groups[:, None, :]) & (kept[:, :, None] >= 0)


def best_matches(
    metric: Tensor, sources: Tensor, destinations: Tensor, groups: Tensor
) -> tuple[Tensor, Tensor]:
    """For each token, (best cosine similarity, slot of that B token) [B, L]; -inf where it has none.

    metric [B, L, d]; `sources` [B, L] may merge (rows), `destinations` [B, L] may receive (columns),
    within the same group ([B, L], e.g. a frame). Only the [sources x destinations] block is computed.
    """
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    rows, columns = left_aligned_index(sources), left_aligned_index(destinations)
    scores = gather_tokens(unit, rows, 1) @ gather_tokens(unit, columns, 1).transpose(-1, -2)
    apart = gather_tokens(groups, rows, 1)[:, :, None] != gather_tokens(groups, columns, 1)[:, None, :]
    scores = scores.masked_fill(apart | (columns < 0)[:, None, :], float("-inf"))
    best, which = scores.max(dim=-1)
    best = best.masked_fill(rows < 0, float("-inf"))
    slot = rows.masked_fill(rows < 0, sources.shape[1])  # filler rows write to a spare column
    score = torch.full((*sources.shape[:1], sources.shape[1] + 1), float("-inf"), device=metric.device)
    match = torch.full_like(score, -1, dtype=torch.long)
    score = score.scatter(1, slot, best)[:, :-1]
    match = match.scatter(1, slot, columns.gather(1, which))[:, :-1]
    return score, match
