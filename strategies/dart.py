"""DART: keep the visual tokens least duplicated by a few pivot tokens.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More" (EMNLP 2025), arXiv:2502.11494. No attention map is needed. Pivots are the visual tokens and
the text tokens after the image whose keys at layer K-1 (after the rotary embedding, heads
concatenated) have the largest L1 norm. Each pivot in turn takes its share of the budget from a
shared pool of visual tokens: those with the lowest cosine similarity to it, on the hidden states
entering the site passed through the language model's final norm. Kept: the visual pivots and every
token chosen. The paper prunes before layer K = 2 (`layer: 2`) and reports 93.7% of the full model's
accuracy at 64 tokens on LLaVA-1.5-7B.

Parameters (defaults are the paper's):
- `image_pivots` (4): visual pivots, the highest key norms among the visual tokens; they are kept.
- `text_pivots` (4): text pivots, the highest key norms among the text tokens after the sample's last
  visual token; they only choose visual tokens (text is always kept).

Budget: exact. The visual pivots count against the budget and the rest is shared as evenly as
possible between all pivots, in sequence order (visual pivots, then text pivots), the earlier ones
taking one more when it does not divide. The reference gives every pivot `budget // 8` tokens on
top of the visual pivots (68 tokens for a budget of 64). With `budget: per_frame`, each frame (image,
video frame, sub-grid) runs the selection on its own tokens and budget, with its own visual pivots
and the sample's text pivots.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.contracts.reducer import Reducer, TokenView, proportional_shares
from tokenprune.core.selection import group_members


class DartParams(BaseModel):
    """`image_pivots` (default 4) and `text_pivots` (default 4): pivots chosen by key L1 norm."""

    model_config = ConfigDict(extra="forbid")

    image_pivots: int = Field(4, ge=1, description="visual pivots (kept), by the L1 norm of their keys")
    text_pivots: int = Field(4, ge=0, description="text pivots after the image, by the L1 norm of their keys")


def top_slots(values: Tensor, mask: Tensor, k: int, limit: Tensor | None = None) -> Tensor:
    """[..., k] long: the slots of the k largest `values` [..., L] where `mask` (ties: the earlier slot),
    at most `limit` [...] of them, in sequence order; -1 fills where fewer are taken."""
    n_slots = values.shape[-1]
    ranked = torch.sort(values.masked_fill(~mask, float("-inf")), dim=-1, descending=True, stable=True)
    top = ranked.indices[..., :k]
    taken = mask.gather(-1, top)
    if limit is not None:
        taken &= torch.arange(top.shape[-1], device=top.device) < limit[..., None]
    top = torch.nn.functional.pad(top.masked_fill(~taken, n_slots), (0, k - top.shape[-1]), value=n_slots)
    top = top.sort(dim=-1).values
    return top.masked_fill(top == n_slots, -1)


def anchor_shares(present: Tensor, n_pivots: Tensor, budget: Tensor) -> Tensor:
    """[B, G, A] long: each present anchor's share of the budget left after the `n_pivots` [B, G].

    present [B, G, A] bool; the rest is split as evenly as possible between the present anchors in
    order, the earlier ones taking one more when it does not divide (`split_budget` of equal sizes).
    """
    rest = (budget - n_pivots).flatten()
    return proportional_shares(rest, present.flatten(0, -2).long()).view_as(present)


def chosen_order(
    unit: Tensor, norms: Tensor, groups: Tensor, text: Tensor, budget: Tensor, image_pivots: int
) -> Tensor:
    """[B, G, L] long: when each token is chosen in its group (0, 1, ...), -1 if never.

    unit [B, L, D] unit features; norms [B, L] key L1 norms; groups [B, L] each candidate's group
    (-1: none); text [B, T] slots of the text pivots (-1: none); budget [B, G]. Per group: the
    `image_pivots` members with the largest norms (at most the budget) in sequence order, then
    each anchor (those pivots, then the text pivots) in turn takes its share of the rest of the
    budget from the members nobody took yet, lowest cosine similarity first (ties: the earlier slot).
    """
    n_slots = unit.shape[1]
    members = group_members(groups, budget.shape[1])  # [B, G, L]
    pivots = top_slots(norms[:, None, :].expand_as(members), members, image_pivots, budget)  # [B, G, P]
    anchors = torch.cat([pivots, text[:, None, :].expand(-1, members.shape[1], -1)], dim=-1)  # [B, G, A]
    is_pivot = slot_mask(pivots, n_slots)  # [B, G, L]
    n_pivots = is_pivot.sum(-1)
    shares = anchor_shares(anchors >= 0, n_pivots, budget)
    index = anchors.clamp(min=0).flatten(1)[..., None].expand(-1, -1, unit.shape[-1])
    similarity = (unit.gather(1, index) @ unit.transpose(-1, -2)).view(*anchors.shape, n_slots)
    ranked = torch.sort(similarity, dim=-1, stable=True).indices  # [B, G, A, L]: least similar first
    chosen_at = torch.where(is_pivot, is_pivot.cumsum(-1) - 1, -1)
    taken, free = n_pivots[..., None], members & ~is_pivot
    for a in range(anchors.shape[-1]):
        in_order = ranked[:, :, a]
        free_in_order = free.gather(-1, in_order)
        rank = free_in_order.cumsum(-1) - 1  # among the free tokens, by similarity
        take = free_in_order & (rank < shares[:, :, a, None])
        chosen_at = chosen_at.scatter(
            -1, in_order, torch.where(take, taken + rank, chosen_at.gather(-1, in_order))
        )
        taken, free = taken + shares[:, :, a, None], free & ~(chosen_at >= 0)
    return chosen_at


def slot_mask(slots: Tensor, n_slots: int) -> Tensor:
    """[..., L] bool: the slots named in `slots` [..., K] (-1: none)."""
    mask = torch.zeros(*slots.shape[:-1], n_slots + 1, dtype=torch.bool, device=slots.device)
    return mask.scatter_(-1, slots.masked_fill(slots < 0, n_slots), True)[..., :n_slots]


def least_duplicated(
    visual: Tensor, norms: Tensor, text_pivots: Tensor, k: int, image_pivots: int
) -> list[int]:
    """k row indices of `visual` [n, D] in the order `chosen_order` picks them (one group).

    `norms` [n]: the key L1 norm of each visual token; `text_pivots` [m, D]: features of the text
    pivots (appended after the visual rows, never candidates).
    """
    n, m = visual.shape[0], text_pivots.shape[0]
    features = torch.nn.functional.normalize(torch.cat([visual, text_pivots]).float(), dim=-1)[None]
    groups = torch.cat([torch.zeros(n, dtype=torch.long), torch.full((m,), -1)])[None].to(visual.device)
    text = torch.arange(n, n + m, device=visual.device)[None]
    budget = torch.tensor([[k]], device=visual.device)
    chosen_at = chosen_order(
        features, torch.cat([norms, norms.new_zeros(m)])[None], groups, text, budget, image_pivots
    )
    order = chosen_at[0, 0, :n]
    return order.argsort()[(order < 0).sum() :].tolist()


def text_pivot_slots(view: TokenView, norms: Tensor, count: int) -> Tensor:
    """[B, count] slots of the text pivots (-1: none): the real text tokens after the sample's last
    visual token with the largest key norms, in sequence order."""
    visual = view.valid & (view.coords[..., 0] >= 0)
    slots = torch.arange(visual.shape[1], device=visual.device)
    last_visual = torch.where(visual, slots, -1).amax(dim=1, keepdim=True)
    text = view.valid & ~visual & (slots > last_visual)
    return top_slots(norms, text, count)


class Dart(Reducer):
    """Duplication-aware selection around key-norm pivots (DART), per sample or per frame."""

    Params: ClassVar[type[BaseModel]] = DartParams
    requires: ClassVar[frozenset[str]] = frozenset({"keys", "normed_output"})
    sites: ClassVar[frozenset[str]] = frozenset({"language"})  # signals of a language model
    positions: ClassVar[str] = "original"  # the position policy of the paper's reference code

    def select(self, view: TokenView) -> Tensor:
        norms = view.signals.get("keys", rope=True, heads="concat").abs().sum(dim=-1)  # [B, L] L1 norm
        unit = torch.nn.functional.normalize(view.signals.get("normed_output"), dim=-1)  # [B, L, D]
        budget, groups = view.quota()
        text = text_pivot_slots(view, norms, self.params.text_pivots)
        chosen_at = chosen_order(unit, norms, groups, text, budget, self.params.image_pivots)
        return (chosen_at >= 0).any(dim=1)
