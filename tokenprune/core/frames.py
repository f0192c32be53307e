"""Frames of a video as a strategy sees them: ranks, sums and means in groups, a cell in another frame.

Shared by the video strategies (EVS, VidCom2, FastVID). Everything is batched over samples and reads
nothing back to the host: group ids (frames, segments) are bounded by the sequence length L, so no count
of frames or videos is needed up front. A group id of -1 means "in no group".
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenprune.contracts.reducer import TokenView


def _slots(groups: Tensor) -> Tensor:
    """[B, L] long: each token's row in a per-group table of L + 1 rows (the last row: no group)."""
    return groups.masked_fill(groups < 0, groups.shape[1])


def group_sum(values: Tensor, groups: Tensor) -> Tensor:
    """[B, L, C]: at each grouped token, the sum of `values` [B, L, C] over its group (0 for group -1)."""
    slots = _slots(groups)[..., None].expand(-1, -1, values.shape[-1])
    table = values.new_zeros(values.shape[0], values.shape[1] + 1, values.shape[-1])
    sums = table.scatter_add_(1, slots, values).gather(1, slots)
    return sums.masked_fill((groups < 0)[..., None], 0)


def group_mean(values: Tensor, groups: Tensor) -> Tensor:
    """[B, L, C]: at each grouped token, the mean of `values` [B, L, C] over its group (0 for group -1)."""
    counts = group_sum(torch.ones_like(values[..., :1]), groups)
    return group_sum(values, groups) / counts.clamp(min=1)


def group_extreme(values: Tensor, groups: Tensor, reduce: str) -> Tensor:
    """[B, L]: at each grouped token, the `reduce` ("amax" or "amin") of `values` [B, L] over its group."""
    slots = _slots(groups)
    table = values.new_zeros(values.shape[0], values.shape[1] + 1)
    table = table.scatter_reduce(1, slots, values, reduce=reduce, include_self=False)
    return table.gather(1, slots).masked_fill(groups < 0, 0)


def rank_within(scores: Tensor, groups: Tensor) -> Tensor:
    """[B, L] long: each grouped token's rank by descending `scores` within its group, ties to the earlier
    slot (0 = best); -1 for group -1. Two stable sorts: no count of groups is needed."""
    length = scores.shape[1]
    by_score = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    grouped = _slots(groups).gather(1, by_score)
    by_group = torch.sort(grouped, dim=1, stable=True)
    order = by_score.gather(1, by_group.indices)  # slots, group by group, best first
    position = torch.arange(length, device=scores.device).expand_as(order)
    starts = torch.ones_like(order, dtype=torch.bool)
    starts[:, 1:] = by_group.values[:, 1:] != by_group.values[:, :-1]
    first = torch.where(starts, position, 0).cummax(dim=1).values
    rank = torch.empty_like(order).scatter_(1, order, position - first)
    return rank.masked_fill(groups < 0, -1)


def top_within(scores: Tensor, groups: Tensor, quota: Tensor) -> Tensor:
    """[B, L] bool: in each group, its `quota` best-scoring tokens (`quota` [B, L]: the group's count, at
    each of its tokens); ties go to the earlier slot."""
    rank = rank_within(scores, groups)
    return (rank >= 0) & (rank < quota)


def cell_slots(view: TokenView, frame_index: Tensor) -> Tensor:
    """[B, L] long: the slot of the candidate in the same segment and grid cell (row, col) as each candidate,
    at frame index `frame_index` [B, L] (t of its segment); -1 where there is none (t out of range, or a
    token an earlier stage removed)."""
    span = view.candidates.shape[1] + 1  # bounds every segment index, frame index, row and col
    row, col = view.coords[..., 1], view.coords[..., 2]

    def cell(t: Tensor) -> Tensor:
        return ((view.segment * span + t) * span + row) * span + col

    keys = torch.where(view.candidates, cell(view.coords[..., 0]), span**4)
    wanted = torch.where(view.candidates & (frame_index >= 0), cell(frame_index), -1)
    sorted_keys, order = keys.sort(dim=1)
    found_at = torch.searchsorted(sorted_keys, wanted).clamp(max=keys.shape[1] - 1)
    found = sorted_keys.gather(1, found_at) == wanted
    return torch.where(found, order.gather(1, found_at), -1)


def previous_frame_slots(view: TokenView) -> Tensor:
    """[B, L] long: the slot of each candidate's cell one frame earlier in its video, -1 in a first frame."""
    return cell_slots(view, view.coords[..., 0] - 1)


def frame_groups(view: TokenView) -> Tensor:
    """[B, L] long: each candidate's frame (a video frame, an image), -1 for the other tokens."""
    return view.frame.masked_fill(~view.candidates, -1)


def video_groups(view: TokenView) -> Tensor:
    """[B, L] long: each candidate's segment (a video, an image), -1 for the other tokens."""
    return view.segment.masked_fill(~view.candidates, -1)


def cumulative_within(values: Tensor, groups: Tensor) -> Tensor:
    """[B, L]: at each grouped token, the sum of `values` [B, L] (>= 0) over the tokens of its group at or
    before its slot (an inclusive running sum per group, in sequence order); 0 for group -1."""
    by_group = torch.sort(_slots(groups), dim=1, stable=True)
    order, sorted_groups = by_group.indices, by_group.values
    ordered = values.gather(1, order)
    running = ordered.cumsum(dim=1)
    starts = torch.ones_like(order, dtype=torch.bool)
    starts[:, 1:] = sorted_groups[:, 1:] != sorted_groups[:, :-1]
    before = torch.where(starts, running - ordered, torch.zeros_like(running)).cummax(dim=1).values
    within = torch.empty_like(running).scatter_(1, order, running - before)
    return within.masked_fill(groups < 0, 0)


def first_of_group(groups: Tensor) -> Tensor:
    """[B, L] bool: the first token (in sequence order) of each group."""
    slots = torch.arange(groups.shape[1], device=groups.device).expand_as(groups)
    return rank_within(-slots, groups) == 0
