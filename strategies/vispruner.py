"""VisPruner: important patches by the encoder's [CLS] attention, then diverse ones by removing duplicates.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
(ICCV 2025), arXiv:2412.01818 v2 (https://arxiv.org/abs/2412.01818), the successor of FasterVLM. At the
vision encoder layer whose output feeds the projector (LLaVA's `vision_feature_layer=-2`: layer 22 of
CLIP-L's 24), a stage's budget T is split into `floor(T * important_ratio)` important patches, those the
[CLS] token attends to most (head-averaged; the mean attention over every query row where the encoder
has no class token), and diverse patches taken from the rest. The diverse ones are what remains once
duplicates are removed round by round, as the reference code does: the remaining patches, in the order
of their attention (most attended first), are split alternately into A and B; each A patch's duplicate
score is its highest cosine similarity (on the layer's output features) to a B patch; the `step` A
patches with the highest scores are removed (fewer in the last round, to land on the budget exactly);
the survivors are reordered A by decreasing score, then B, and the next round starts. Ties go to the
earlier patch. The class token is protected (LLaVA drops it before the projector).

Acts in a vision encoder only (`site: vision` stages on LLaVA's and Video-LLaVA's towers, a timm ViT's
blocks): its signals are an encoder's. At a language site it is refused when attaching (the method's
point is to avoid the language model's attention). Position policy: `renumbered` (the reference feeds
the language model the shorter sequence).

Parameters:
- `important_ratio` (default 0.5, the reference's): the share of the budget kept by attention,
  `int(T * r)` as the reference computes it; the rest is diverse. 0.75 keeps 48 + 16 of 64.
- `step` (default 8, the reference's): duplicates removed per round.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.contracts.reducer import (
    PositionPolicy,
    Reducer,
    Signals,
    SignalUnavailable,
    Site,
    TokenView,
    group_counts,
    top_k_mask,
)


class VisPrunerParams(BaseModel):
    """The split of the budget between important and diverse patches, and the duplicates removed per round."""

    model_config = ConfigDict(extra="forbid")

    important_ratio: float = Field(0.5, ge=0.0, le=1.0, description="share of the budget kept by attention")
    step: int = Field(8, ge=1, description="duplicates removed per round of the diverse selection")


def importance(signals: Signals) -> Tensor:
    """[B, L] the class token's head-averaged attention, or the mean over every query row where the
    encoder has no class token."""
    try:
        return signals.attention("class")
    except SignalUnavailable:
        return signals.attention("mean")


def group_ranks(order: Tensor, members: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """[B, L] long: each of `members`' rank in its group along `order` [B, L] (a permutation of the slots,
    first first); -1 for the other tokens."""
    slot = groups.clamp(min=0).masked_fill(~members, n_groups)
    in_order = F.one_hot(slot.gather(1, order), n_groups + 1)
    rank = (in_order.cumsum(dim=1) * in_order).sum(-1) - 1
    return torch.empty_like(rank).scatter_(1, order, rank).masked_fill(~members, -1)


def ranks(scores: Tensor, ties: Tensor, members: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """[B, L] long: each of `members`' rank in its group by decreasing `scores` [B, L] float, ties by
    increasing `ties` [B, L] long (then by slot); -1 for the other tokens."""
    by_tie = torch.sort(ties.masked_fill(~members, torch.iinfo(ties.dtype).max), dim=1, stable=True).indices
    ranked = scores.gather(1, by_tie).masked_fill(~members.gather(1, by_tie), float("-inf"))
    order = by_tie.gather(1, torch.sort(ranked, dim=1, descending=True, stable=True).indices)
    return group_ranks(order, members, groups, n_groups)


def remove_duplicates(
    features: Tensor, order: Tensor, rest: Tensor, groups: Tensor, quota: Tensor, step: int
) -> Tensor:
    """[B, L] bool: `quota[b, g]` of the `rest` tokens of each group, left by VisPruner's rounds of
    duplicate removal on `features` [B, L, d] (cosine), starting from the order of `order` [B, L] long.

    Every round removes `min(step, excess)` tokens of a group while it has that many A tokens, and at
    least half of the rest otherwise: `ceil(L / step) + bit_length(step)` rounds always suffice, a bound
    from the shapes alone (every row runs them all; a finished group removes nothing), so nothing waits
    on the device. A group with no diverse quota keeps none of `rest` (the reference skips the rounds).
    """
    n_groups = quota.shape[1]
    group = groups.clamp(min=0)
    unit = F.normalize(features.float(), dim=-1)
    same_group = (groups[:, :, None] == groups[:, None, :]) & rest[:, :, None] & rest[:, None, :]
    similarity = (unit @ unit.transpose(1, 2)).masked_fill(~same_group, float("-inf"))
    alive, key = rest & (quota.gather(1, group) > 0), order
    for _ in range(-(-rest.shape[1] // step) + step.bit_length()):
        by_key = torch.sort(key.masked_fill(~alive, torch.iinfo(key.dtype).max), dim=1, stable=True).indices
        rank = group_ranks(by_key, alive, groups, n_groups)
        is_a, is_b = alive & (rank % 2 == 0), alive & (rank % 2 == 1)
        score = similarity.masked_fill(~is_b[:, None, :], float("-inf")).amax(dim=-1)
        excess = (group_counts(alive, groups, n_groups) - quota).clamp(min=0, max=step)
        rank_a = ranks(score, rank, is_a, groups, n_groups)
        alive = alive & ~(is_a & (rank_a < excess.gather(1, group)))
        key = torch.where(is_a, rank_a, rest.shape[1] + rank)
    return alive


class VisPruner(Reducer):
    """Important patches by class attention plus diverse ones by duplicate removal (VisPruner)."""

    Params: ClassVar[type[BaseModel]] = VisPrunerParams
    requires: ClassVar[frozenset[str]] = frozenset({"attention"})
    sites: ClassVar[frozenset[Site]] = frozenset({"vision"})  # an encoder's class token and features
    positions: ClassVar[PositionPolicy] = "renumbered"

    def select(self, view: TokenView) -> Tensor:
        budget, groups = view.quota()
        n_important = torch.floor(budget.double() * self.params.important_ratio).long()
        attention = importance(view.signals)
        important = top_k_mask(attention, view.candidates, n_important, groups)
        rest = view.candidates & ~important
        by_attention = ranks(attention, view.positions, rest, groups, budget.shape[1])
        diverse = remove_duplicates(
            view.features(), by_attention, rest, groups, budget - n_important, self.params.step
        )
        return important | diverse
