"""ToMe: merge the most similar tokens instead of dropping them.

Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023), arXiv:2210.09461.
Bipartite soft matching: the tokens are split alternately into sets A and B; each A token finds
its most similar B token (cosine of the attention keys averaged over heads); the r A tokens with
the best matches merge into them. Protected tokens (class, distillation and register tokens in a
ViT; text in a VLM) take part in the split but are never merged away nor merged into. One
application merges at most half of the tokens; a larger budget at one site runs several rounds.
The core averages merged tokens by size and, by default, adds log(size) to their attention logits.

Parameters:
- `r` (default None): ViT schedule of merges per block: an int (r in every block) or a list with
  one r per block. None: the budget comes from the config's `ratio`/`keep`/`stages`.
- `inflect` (default 0): the paper's `(r, inflect)` linear schedule around r; -1 goes from 2r in
  the first block down to 0 in the last.
- `proportional_attention` (default True): weight each merged key by its size in attention, as
  the reference timm patch does off the shelf.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt
from torch import Tensor

from tokenprune.contracts.reducer import Merge, Reducer, TokenView, group_counts, top_k_mask
from tokenprune.core.merging import best_matches, merge_average
from tokenprune.core.schedule import removals_per_layer


class ToMeParams(BaseModel):
    """ToMe's r schedule and its proportional attention switch."""

    model_config = ConfigDict(extra="forbid")

    r: NonNegativeInt | list[NonNegativeInt] | None = Field(None, description="merges per block: r or a list")
    inflect: float = Field(0.0, description="slope of the linear schedule around r (-1: 2r down to 0)")
    proportional_attention: bool = Field(True, description="add log(size) to merged keys' attention logits")


def alternate_sets(valid: Tensor) -> tuple[Tensor, Tensor]:
    """(A, B) [B, L] bool: real tokens split alternately by their rank among the real tokens (A first)."""
    rank = valid.long().cumsum(dim=1) - 1
    even = rank % 2 == 0
    return valid & even, valid & ~even


def bipartite_soft_matching(
    metric: Tensor, valid: Tensor, movable: Tensor, r: Tensor, groups: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One round of ToMe's matching: (merged [B, L] bool, into [B, L] long, rank [B, L] long).

    `movable` [B, L]: tokens that may merge or receive (non-protected); r [B, G]: merges in each
    group (`groups` [B, L]) of each row; A tokens with the best matches merge first. `rank` lays
    survivors out in the reference order: protected tokens, then unmerged A tokens (by position
    when any token is protected, else by descending match score), then B tokens.
    """
    set_a, set_b = alternate_sets(valid)
    score, match = best_matches(metric, set_a & movable, set_b & movable, groups)
    merged = top_k_mask(score, torch.isfinite(score), r, groups)
    into = torch.where(merged, match, -1)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    slot = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    place = torch.empty_like(order).scatter_(1, order, slot)  # rank of each token's match score
    any_protected = (valid & ~movable).any(dim=1, keepdim=True)
    within_a = torch.where(any_protected, slot, place)
    part = torch.where(valid & ~movable, 0, torch.where(set_a, 1, 2))
    rank = part * valid.shape[1] + torch.where(part == 1, within_a, slot)
    return merged, into, rank


def round_sizes(movable: Tensor, valid: Tensor, groups: Tensor, remaining: Tensor) -> Tensor:
    """[B, G] merges in the next round: what is left, at most the A tokens of a group with a B token."""
    set_a, set_b = alternate_sets(valid)
    n_groups = remaining.shape[1]
    a_count = group_counts(set_a & movable, groups, n_groups)
    b_count = group_counts(set_b & movable, groups, n_groups)
    return torch.minimum(remaining, torch.where(b_count > 0, a_count, 0))


class ToMe(Reducer):
    """Token merging by bipartite soft matching on head-averaged keys."""

    Params: ClassVar[type[BaseModel]] = ToMeParams
    positions: ClassVar[str] = "original"  # the position policy of the paper's reference code
    requires: ClassVar[frozenset[str]] = frozenset({"keys"})
    merges: ClassVar[bool] = True

    def removals(self, n_layers: int) -> list[int] | None:
        if self.params.r is None:
            return None
        return removals_per_layer(self.params.r, n_layers, self.params.inflect)

    def select(self, view: TokenView) -> Merge:
        """Rounds of matching until each sample (or frame) is down to its budget."""
        keys = view.signals.keys()
        budget, groups = view.quota()
        metric, valid, movable = keys, view.valid.clone(), view.candidates.clone()
        into = torch.full_like(view.positions, -1)
        rank = torch.zeros_like(view.positions)
        remaining = group_counts(movable, groups, budget.shape[1]) - budget
        while True:
            r = round_sizes(movable, valid, groups, remaining)
            # the one host read of a round: whether to go on (the number of rounds depends on the data)
            more, can_merge = torch.stack([(remaining > 0).any(), (r > 0).any()]).tolist()
            if not more:
                break
            if not can_merge:  # a group of one token cannot merge: drop the excess
                movable = top_k_mask(-groups.float(), movable, budget, groups)
                into = into.masked_fill(~movable.gather(1, into.clamp(min=0)), -1)  # its members go too
                break
            merged, step_into, rank = bipartite_soft_matching(metric, valid, movable, r, groups)
            into = _redirect(torch.where(merged, step_into, into))
            valid, movable, remaining = valid & ~merged, movable & ~merged, remaining - r
            metric = merge_average(keys, view.token_sizes(), into)[0]  # the next round's: averaged keys
        return Merge(movable, into, rank, self.params.proportional_attention)


def _redirect(into: Tensor) -> Tensor:
    """A token whose survivor merged in this round follows it to that round's B token: one hop, as
    B tokens never merge in the round that receives (and survivors were followed in every round)."""
    onward = into.gather(1, into.clamp(min=0))
    return torch.where((into >= 0) & (onward >= 0), onward, into)
