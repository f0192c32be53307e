"""FastVID: cut a video into scenes, then per frame keep salient tokens and merge dense static regions.

Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", arXiv:2503.11187.
Before the language model (`layer: 0`), on the projector outputs, per video (segment):

1. DySeg, dynamic temporal segmentation: frames' global features (their mean token) are compared with
   the previous frame's (cosine); the video is cut before the `segments - 1` least similar frames and
   before every frame below `threshold` (tau = 0.9).
2. STPrune per frame: its share k of the budget (in proportion to its tokens) splits into
   floor(`salient` k) salient tokens (ATS, d = 0.4) and k - floor(d k) contextual ones.
   ATS keeps the tokens with the most attention from the frame's global query.
3. DTM, density-based token merging, per temporal segment: every `anchor_step`-th frame (p = 4, from the
   segment's first) is an anchor frame; the segment's contextual budget is shared out over them; in each,
   the tokens with the largest DPC-kNN score (density exp(-mean squared distance to the `neighbours`
   (k = 4) nearest, times the distance to the nearest denser token) among those ATS left become anchors;
   every other token of the segment that ATS left merges into its most cosine-similar anchor.

Deviations: (ATS) the reference ranks by the vision encoder's [CLS] / pooling-head attention, which the
language model's input does not carry: here a token's score is its dot product with its frame's mean
token, the attention logit of a mean-pooled query. (DTM) a survivor is the plain average of its anchor and
its members (`Merge`, no proportional attention); the reference blends alpha anchor + (1 - alpha)
mean(members) with alpha = max(0.6, 1 / (n + 1)), on L2-normalised features. The reference floors the
per-anchor share and drops the remainder; here the earlier anchor frames take it, and the budget is met
exactly. An anchor frame's share beyond the tokens ATS left in it goes to the next most salient tokens
of its segment. Density ties go to the earlier token (the reference adds noise). A frame whose first token
has no cell one frame back (an earlier stage removed it) starts a segment. With `budget: per_frame` each
frame keeps its own share: every frame is an anchor frame of its own contextual tokens (p = 1), and
merges still go to the most similar anchor of the segment. Positions: `renumbered` (the reference feeds a
shorter sequence). An image is a one-frame video.

Batched, with no host reads, and DTM compares pairs where the reference does: densities within frames, in
`GroupBlocks` of the view's `frame_size` s ([B, L / s, s, 3 s] pairs), and merge targets against the anchors
gathered first, at most the view's `max_budget` A ([B, L, A]), not [B, L, L] over the whole video. Those
shapes need Python ints: the view carries them (the core counts both on the host with the budgets, in the
read it already makes), where a frame-sorted layout alone would have to read its sizes back from the device
once per selection. A view built without them falls back to L: the same selection at the [B, L, L] cost.
A token's cosines rank as its dot products over the anchors' norms, so exact features tie exactly.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenprune.strategies.uniform import at_token, dense_groups, per_group
from torch import Tensor

from tokenprune.contracts.reducer import Merge, PositionPolicy, Reducer, Site, TokenView, proportional_shares
from tokenprune.core.frames import (
    cumulative_within,
    first_of_group,
    frame_groups,
    group_extreme,
    group_mean,
    group_sum,
    previous_frame_slots,
    rank_within,
    top_within,
    video_groups,
)


class FastVIDParams(BaseModel):
    """The paper's defaults: c = 8 segments, tau = 0.9, d = 0.4, p = 4, k = 4 neighbours."""

    model_config = ConfigDict(extra="forbid")

    segments: int = Field(8, ge=1, description="c: the video is cut before its c - 1 least similar frames")
    threshold: float = Field(0.9, ge=-1, le=1, description="tau: also cut before every frame below it")
    salient: float = Field(
        0.4, ge=0, le=1, description="d: share of a frame's budget kept by attention (ATS)"
    )
    anchor_step: int = Field(4, ge=1, description="p: every p-th frame of a segment is an anchor frame")
    neighbours: int = Field(4, ge=1, description="k: nearest neighbours of the DPC-kNN density")


def temporal_segments(
    view: TokenView, frames: Tensor, videos: Tensor, means: Tensor, params: FastVIDParams
) -> Tensor:
    """[B, L] long: each candidate's temporal segment (dense per sample), -1 for other tokens (DySeg), from
    its frame's global feature (`means` [B, L, D]: its frame's mean token)."""
    previous = previous_frame_slots(view)
    before = means.gather(1, previous.clamp(min=0)[..., None].expand_as(means))
    similarity = torch.nn.functional.cosine_similarity(means, before, dim=-1)
    head = first_of_group(frames)
    transition = head & (view.coords[..., 0] > 0)
    compared = transition & (previous >= 0)
    lowest = top_within(
        -similarity, videos.masked_fill(~compared, -1), torch.full_like(videos, params.segments - 1)
    )
    cut = transition & (~compared | lowest | (similarity < params.threshold))
    index = cumulative_within(cut.long(), videos)  # cuts at or before each token of its video
    return dense_groups(videos * (videos.shape[1] + 1) + index, videos >= 0)


def density_scores(features: Tensor, members: Tensor, groups: Tensor, neighbours: int, size: int) -> Tensor:
    """[B, L] float32: DPC-kNN density times separation within each group, 0 off `members`.

    Density: exp(-mean squared distance to the `neighbours` nearest members, itself included); separation:
    distance to the nearest denser member (ties: the earlier token is denser), or the group's largest
    distance for its densest. Distances are Euclidean over sqrt(D). A group holds at most `size` members
    (a frame: the view's `frame_size`), so pairs are compared in `GroupBlocks`, not over [L, L].
    """
    blocks = GroupBlocks.of(groups.masked_fill(~members, -1), size)
    distance = blocks.distances(features)
    pair = blocks.pairs()
    nearest = distance.masked_fill(~pair, float("inf"))
    nearest = nearest.topk(min(neighbours, nearest.shape[-1]), dim=-1, largest=False).values
    finite = torch.isfinite(nearest)
    mean_square = nearest.square().masked_fill(~finite, 0).sum(-1) / finite.sum(-1).clamp(min=1)
    density = blocks.scatter(torch.exp(-mean_square)).masked_fill(~members, 0.0)
    rank = rank_within(density, torch.zeros_like(groups))  # by density, ties to the earlier slot
    denser = blocks.keys(rank)[..., None, :] < blocks.rows(rank)[..., None]  # the key is denser than the row
    widest = blocks.scatter(distance.masked_fill(~pair, 0.0).amax(dim=-1))
    farthest = group_extreme(widest, groups.masked_fill(~members, -1), "amax")
    separation = blocks.scatter(distance.masked_fill(~(pair & denser), float("inf")).amin(dim=-1))
    separation = torch.where(torch.isinf(separation), farthest, separation)
    return (separation * density).masked_fill(~members, 0.0)


class GroupBlocks(NamedTuple):
    """Tokens sorted by group (grouped ones first) and cut into `n` blocks of `size` rows, each block's keys
    itself and its neighbours (three blocks; all of them when fewer): when no group has more than `size`
    tokens, every pair of one group meets as (row, key) of exactly one block.

    [B, n, size, 3 size] pairs instead of [B, L, L]: 3 L `size` at most, and never more than L^2.
    """

    order: Tensor  # [B, L] long: the slot at each sorted position
    group: Tensor  # [B, n, size] long: the group at each sorted position, -1 ungrouped or padding
    first: Tensor  # [n] long: the first block of each block's keys

    @classmethod
    def of(cls, groups: Tensor, size: int) -> GroupBlocks:
        """The blocks of `groups` [B, L] (-1: in none), each group at most `size` tokens."""
        length, size = groups.shape[1], max(size, 1)
        keyed = torch.sort(groups.masked_fill(groups < 0, length), dim=1, stable=True)
        group = torch.nn.functional.pad(keyed.values, (0, -length % size), value=length)
        group = group.masked_fill(group == length, -1).view(groups.shape[0], -1, size)
        n = group.shape[1]
        first = (torch.arange(n, device=groups.device) - 1).clamp(min=0, max=max(n - 3, 0))
        return cls(keyed.indices, group, first)

    def rows(self, values: Tensor) -> Tensor:
        """[B, n, size, ...]: `values` [B, L, ...] at each block's rows (padding: zeros)."""
        taken = values[torch.arange(values.shape[0], device=values.device)[:, None], self.order]
        padding = taken.new_zeros(taken.shape[0], self.group[0].numel() - taken.shape[1], *taken.shape[2:])
        return torch.cat([taken, padding], dim=1).view(*self.group.shape, *taken.shape[2:])

    def keys(self, values: Tensor) -> Tensor:
        """[B, n, 3 size]: `values` [B, L] at each block's keys."""
        return torch.cat(self.key_blocks(self.rows(values)), dim=2)

    def key_blocks(self, blocks: Tensor) -> list[Tensor]:
        """Per-block `blocks` [B, n, size, ...] of each block's key blocks, one [B, n, size, ...] each."""
        return [blocks.index_select(1, self.first + shift) for shift in range(min(3, blocks.shape[1]))]

    def pairs(self) -> Tensor:
        """[B, n, size, 3 size] bool: row and key are two tokens (or one) of the same group."""
        keys = torch.cat(self.key_blocks(self.group.masked_fill(self.group < 0, -2)), dim=2)  # -2: no group
        return self.group[..., None] == keys[..., None, :]

    def distances(self, features: Tensor) -> Tensor:
        """[B, n, size, 3 size]: Euclidean distances over sqrt(D) of rows and keys (`features` [B, L, D])."""
        rows = self.rows(features)
        products = torch.cat([rows @ keys.transpose(-1, -2) for keys in self.key_blocks(rows)], dim=-1)
        square = rows.square().sum(-1)
        across = square[..., None] + torch.cat(self.key_blocks(square), dim=2)[..., None, :] - 2 * products
        return across.clamp(min=0).sqrt() / features.shape[-1] ** 0.5

    def scatter(self, values: Tensor) -> Tensor:
        """[B, L]: per-row `values` [B, n, size] back at their slots."""
        flat = values.reshape(values.shape[0], -1)[:, : self.order.shape[1]]
        return torch.empty_like(flat).scatter_(1, self.order, flat)


def anchor_quota(
    view: TokenView, frames: Tensor, scenes: Tensor, salient_count: Tensor, share: Tensor, step: int
) -> tuple[Tensor, Tensor]:
    """(anchor tokens to pick in each anchor frame, at its tokens; what its segment spills to salient tokens).

    The segment's contextual budget (its frames' share - salient) is split over its anchor frames, the
    earlier ones taking the remainder, each capped at the tokens ATS left in it; the rest spills.
    """
    head = first_of_group(frames)
    t = view.coords[..., 0]
    position = t - group_extreme(t, scenes, "amin")
    anchor = (scenes >= 0) & (position % step == 0)
    contextual = group_sum(((share - salient_count) * head)[..., None], scenes)[..., 0]
    anchors = group_sum((anchor & head).long()[..., None], scenes)[..., 0].clamp(min=1)
    quota = contextual // anchors + (position // step < contextual % anchors).long()
    capacity = group_sum(torch.ones_like(frames)[..., None], frames)[..., 0] - salient_count
    taken = torch.where(anchor, torch.minimum(quota, capacity), 0)
    spill = contextual - group_sum((taken * head)[..., None], scenes)[..., 0]
    return taken, spill


def frame_shares(view: TokenView, frames: Tensor) -> Tensor:
    """[B, L] long: at each candidate, its frame's budget: given (`budget: per_frame`), or the sample's
    budget shared in proportion to the frames' tokens (largest remainder); 0 elsewhere."""
    if view.frame_budget is not None:
        return view.frame_budget.gather(1, view.frame.clamp(min=0)).masked_fill(~view.candidates, 0)
    return at_token(proportional_shares(view.budget, per_group(view.candidates.long(), frames)), frames)


class FastVID(Reducer):
    """Dynamic temporal segmentation, then salient tokens per frame and density-based merging (FastVID)."""

    Params: ClassVar[type[BaseModel]] = FastVIDParams
    merges: ClassVar[bool] = True
    sites: ClassVar[frozenset[Site]] = frozenset({"language"})
    positions: ClassVar[PositionPolicy] = "renumbered"  # the reference feeds a shorter sequence

    def select(self, view: TokenView) -> Merge:
        params, features, length = self.params, view.features(), view.candidates.shape[1]
        frames, videos = dense_groups(frame_groups(view), view.candidates), video_groups(view)
        means = group_mean(features, frames)
        scenes = temporal_segments(view, frames, videos, means, params)
        share = frame_shares(view, frames)
        salient_count = (share * params.salient).floor().long()
        attention = (features * means).sum(dim=-1)
        salient = top_within(attention, frames, salient_count)
        if view.frame_budget is None:
            taken, spill = anchor_quota(view, frames, scenes, salient_count, share, params.anchor_step)
        else:  # per-frame budgets: every frame is an anchor frame of its own contextual share
            taken, spill = share - salient_count, torch.zeros_like(share)
        pool = view.candidates & ~salient
        frame_size = length if view.frame_size is None else view.frame_size
        density = density_scores(features, pool, frames, params.neighbours, frame_size)
        anchors = top_within(density, frames.masked_fill(~pool, -1), taken)
        extra = top_within(attention, scenes.masked_fill(~pool | anchors, -1), spill)
        keep = salient | anchors | extra
        most = length if view.max_budget is None else view.max_budget  # anchors are kept: at most the budget
        into = merge_targets(features, pool & ~keep, anchors, scenes, most)
        return Merge(keep, into, proportional_attention=False)


def merge_targets(features: Tensor, merged: Tensor, anchors: Tensor, scenes: Tensor, most: int) -> Tensor:
    """[B, L] long: for each `merged` token, its most cosine-similar anchor of its segment; -1 elsewhere.

    The anchors (at most `most` per sample) are gathered first, in slot order: [B, L, A] similarities, not
    [B, L, L]. A token's cosines rank as its dot products over the anchors' norms: exact on exact features,
    so equal cosines tie (to the earlier anchor) however the product is blocked."""
    count = max(min(most, anchors.shape[1]), 1)
    slots = torch.sort((~anchors).byte(), dim=1, stable=True).indices[:, :count]
    columns = features.gather(1, slots[..., None].expand(-1, -1, features.shape[-1]))
    key = scenes.gather(1, slots).masked_fill(~anchors.gather(1, slots), -2)  # -2: no segment has it
    similarity = (features @ columns.transpose(1, 2)) / columns.norm(dim=-1).clamp(min=1e-12)[:, None, :]
    best = similarity.masked_fill_(scenes[..., None] != key[:, None, :], float("-inf")).max(dim=-1)
    return torch.where(merged & (best.values > float("-inf")), slots.gather(1, best.indices), -1)
