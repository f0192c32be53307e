"""DyCoke: temporal token merging before the language model, dynamic KV-cache pruning while decoding.

Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (CVPR 2025),
arXiv:2411.15024 (https://arxiv.org/abs/2411.15024). Two stages in one config:

- Temporal token merging (TTM, a `site: language` stage at `layer: 0`): the frames of each video are
  taken in windows of four. Each odd frame is compared with the frame before it and the third frame
  of a window with its first, token by token at the same (row, col) (cosine of the features); in every
  compared frame the tokens most similar to their counterpart are redundant and leave, the least
  similar stay. The first frame of each window stays whole. The stage's budget is shared over the
  compared frames in proportion to their sizes (the paper's K: `ratio = K * compared / all frames`).
  A budget below the whole frames (an image, which DyCoke leaves alone; a high ratio) is shared by the
  whole frames, which then keep their tokens least like their frame's mean token; `budget: per_frame`
  gives each frame its own.
- Dynamic pruning (a `site: cache` stage, `every: 1`, `restore: true`): before each decode step the
  visual entries the most recent query attended to most stay in the cache of layers >= K, chosen
  afresh among all the prompt's visual entries every time, so an entry pruned at one step may return.

Parameters:
- `merge` (default "drop"): "drop", as the reference code, removes the redundant tokens; "average"
  folds each into the token it was found redundant with (size-weighted, no proportional attention).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.contracts.reducer import (
    Merge,
    PositionPolicy,
    Reducer,
    Site,
    TokenView,
    group_counts,
    proportional_shares,
    top_k_mask,
)
from tokenprune.core.frames import cell_slots, frame_groups, group_mean

WINDOW = 4  # frames per TTM window: pairs (0, 1), (2, 3), then the window's first and third frame


class DyCokeParams(BaseModel):
    """How the temporal stage treats the redundant tokens it removes."""

    model_config = ConfigDict(extra="forbid")

    merge: Literal["drop", "average"] = Field("drop", description="drop redundant tokens or average them in")


def reference_frame(t: Tensor) -> Tensor:
    """[...] long: the frame each frame index `t` is compared with in TTM (-1: a window's first frame)."""
    previous = torch.where(t % 2 == 1, t - 1, t - 2)
    return torch.where(t % WINDOW == 0, -1, previous)


def frame_budgets(view: TokenView, compared: Tensor) -> Tensor:
    """[B, F] long: the budget of each frame (F bounds the frames: no host read). Every window's first
    frame stays whole and the rest goes to the compared frames by size; a budget below the whole frames
    (an image, a high ratio) is shared by the whole frames alone. `budget: per_frame` gives its own."""
    if view.frame_budget is not None:
        return view.frame_budget
    n_frames = view.candidates.shape[1]
    sizes = group_counts(view.candidates, view.frame, n_frames)
    later = group_counts(compared, view.frame, n_frames) > 0
    whole = torch.where(later, 0, sizes)
    for_whole = torch.minimum(view.budget, whole.sum(1))
    rest = view.budget - for_whole
    return proportional_shares(for_whole, whole) + proportional_shares(rest, torch.where(later, sizes, 0))


def redundancy_scores(view: TokenView, counterpart: Tensor) -> Tensor:
    """[B, L] float32, higher kept first: in a compared frame, minus the cosine to the counterpart; a token
    with none (a window's first frame, an image) 2 plus its cosine distance to its frame's mean token."""
    features = torch.nn.functional.normalize(view.features(), dim=-1)
    matched = features.gather(1, counterpart.clamp(min=0)[..., None].expand_as(features))
    similarity = (features * matched).sum(-1)
    frame_mean = torch.nn.functional.normalize(group_mean(features, frame_groups(view)), dim=-1)
    distinct = 1 - (features * frame_mean).sum(-1)
    return torch.where(counterpart >= 0, -similarity, 2.0 + distinct)


def temporal_merge(view: TokenView, average: bool) -> Merge:
    """TTM: in each compared frame, the tokens least similar to their counterpart stay."""
    counterpart = cell_slots(view, reference_frame(view.coords[..., 0]))  # -1: none (a first frame)
    budgets = frame_budgets(view, counterpart >= 0)
    keep = top_k_mask(redundancy_scores(view, counterpart), view.candidates, budgets, frame_groups(view))
    into = joined(counterpart, keep) if average else torch.full_like(counterpart, -1)
    return Merge(keep, into, proportional_attention=False)


def joined(counterpart: Tensor, keep: Tensor) -> Tensor:
    """[B, L] long: the survivor each removed token joins: its counterpart, or the counterpart's own
    when that one left too (a third frame's token, itself compared with the window's first frame)."""
    first = counterpart.clamp(min=0)
    hop = torch.where(keep.gather(1, first), counterpart, counterpart.gather(1, first))
    survives = (hop >= 0) & keep.gather(1, hop.clamp(min=0))  # else dropped: a whole frame was cut too
    return torch.where((counterpart >= 0) & ~keep & survives, hop, -1)


class DyCoke(Reducer):
    """Temporal token merging across frames, then dynamic pruning of the KV cache at every decode step."""

    Params: ClassVar[type[BaseModel]] = DyCokeParams
    merges: ClassVar[bool] = True
    sites: ClassVar[frozenset[Site]] = frozenset({"language", "cache"})
    # The reference's TTM shortens the frames' features before the prompt is assembled.
    positions: ClassVar[PositionPolicy] = "renumbered"

    def select(self, view: TokenView) -> Tensor | Merge:
        if view.site == "cache":
            return top_k_mask(view.signals.attention(), view.candidates, *view.quota())
        return temporal_merge(view, self.params.merge == "average")
