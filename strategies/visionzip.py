"""VisionZip: keep the patches the class token attends to most, merge the rest into a few contextual tokens.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025),
arXiv:2412.04467. Inside the vision encoder, at the layer whose output feeds the projector (LLaVA's
`vision_feature_layer=-2`: layer 22 of CLIP-L's 24). Dominant tokens: the patches with the most
attention from the class token, summed (here: averaged, the same ranking) over heads. Contextual
tokens: among the other patches, in order, every `step`-th is a target (`step = n_rest // C`, the
first C of them); every remaining patch joins the target most similar to it (cosine of the layer's
keys averaged over heads). The stage's budget (`keep`, or `ratio` of the patches) is dominant +
contextual; the class token is protected (never a candidate; LLaVA drops it before the projector).

Position policy: a contextual token is its target: it stays at the target's patch slot (and so at
the target's placeholder and position in the language model); its members' slots are removed.

A contextual token is `target + mean(members)`, as the reference code computes it (the paper's
text speaks of merging; `contextual_merge: average` gives the size-weighted average of the target
and its members instead). Deviation: the reference also passes the class token to the projector
and counts it among the dominant tokens (64 = CLS + 53 + 10); here the class token is dropped as
LLaVA does and the budget counts patches (64 = 54 + 10).

Parameters:
- `contextual_share` (default 10/64): the share of the budget given to contextual tokens,
  `round(budget * share)`, at least 1 when both are positive: the paper's LLaVA-1.5 splits
  64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30. 0: dominant tokens only, the rest dropped (FasterVLM).
- `proportional_attention` (default False): add log(size) to the attention logits of contextual
  tokens in later layers; the reference does not.
- `contextual_merge` (default `target_plus_mean`, the reference's): how a contextual token takes in
  its members; `average` for the size-weighted average.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.contracts.reducer import Merge, Reducer, TokenView, group_counts, top_k_mask


class VisionZipParams(BaseModel):
    """The split of the budget between dominant and contextual tokens, and proportional attention."""

    model_config = ConfigDict(extra="forbid")

    contextual_share: float = Field(
        10 / 64, ge=0.0, le=1.0, description="share of the budget kept as contextual (merged) tokens"
    )
    proportional_attention: bool = Field(False, description="add log(size) to contextual tokens' logits")
    contextual_merge: Literal["target_plus_mean", "average"] = Field(
        "target_plus_mean",
        description="a contextual token: its target plus its members' mean (the reference code), or the "
        "size-weighted average of them all",
    )


def split_counts(budget: Tensor, share: float) -> tuple[Tensor, Tensor]:
    """(dominant, contextual) counts [B, G] long from `budget` [B, G]: `round(budget * share)` contextual
    tokens (half to even; at least 1 when the budget and the share are positive), the rest dominant."""
    contextual = torch.round(budget.double() * share).long()
    if share > 0:
        contextual = torch.where(budget > 0, contextual.clamp(min=1), contextual)
    return budget - contextual, contextual


def rank_in_group(key: Tensor, mask: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """[B, L] long: rank of each `mask` token among those of its group by increasing `key` [B, L] long
    (ties: the earlier slot); -1 elsewhere. `groups` [B, L] holds 0..n_groups-1 where `mask` is set."""
    order = torch.sort(key.masked_fill(~mask, torch.iinfo(key.dtype).max), dim=1, stable=True).indices
    slot = groups.masked_fill(~mask, n_groups).clamp(min=0)
    in_order = F.one_hot(slot.gather(1, order), n_groups + 1)
    ranked = (in_order.cumsum(dim=1) * in_order).sum(-1) - 1
    return torch.empty_like(ranked).scatter_(1, order, ranked).masked_fill(~mask, -1)


def strided_targets(rest: Tensor, order: Tensor, groups: Tensor, contextual: Tensor) -> Tensor:
    """[B, L] bool: the contextual targets, exactly `contextual[b, g]` of the `rest` tokens of each group.

    Tokens are taken in `order` [B, L] (original positions); with `n` of them and `step = max(1, n // C)`,
    the targets are ranks 0, step, 2 step, ... (the first C): the reference's `arange(0, n, step)[:C]`.
    """
    n_groups = contextual.shape[1]
    rank = rank_in_group(order, rest, groups, n_groups)
    step = (group_counts(rest, groups, n_groups) // contextual.clamp(min=1)).clamp(min=1)
    group = groups.clamp(min=0)
    step, quota = step.gather(1, group), contextual.gather(1, group)
    return rest & (rank % step == 0) & (rank // step < quota)


def assign_to_targets(metric: Tensor, members: Tensor, targets: Tensor, groups: Tensor) -> Tensor:
    """[B, L] long: for each of `members`, the slot of the most cosine-similar of `targets` in its group
    (metric [B, L, d]; ties: the earlier target); -1 for every other token or where a group has no target.
    The whole [L, L] product, masked: no host read for the shapes of a [members x targets] block."""
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    allowed = members[:, :, None] & targets[:, None, :] & (groups[:, :, None] == groups[:, None, :])
    best, match = (unit @ unit.transpose(-1, -2)).masked_fill(~allowed, float("-inf")).max(dim=-1)
    return torch.where(members & torch.isfinite(best), match, -1)


class VisionZip(Reducer):
    """Dominant tokens by class attention plus contextual tokens merged into strided targets (VisionZip)."""

    Params: ClassVar[type[BaseModel]] = VisionZipParams
    requires: ClassVar[frozenset[str]] = frozenset({"attention", "keys"})
    merges: ClassVar[bool] = True
    sites: ClassVar[frozenset[str]] = frozenset({"vision"})  # the class token of a vision encoder
    positions: ClassVar[str] = "renumbered"  # the position policy of the paper's reference code

    def select(self, view: TokenView) -> Merge:
        budget, groups = view.quota()
        n_dominant, n_contextual = split_counts(budget, self.params.contextual_share)
        dominant = top_k_mask(view.signals.attention("class"), view.candidates, n_dominant, groups)
        rest = view.candidates & ~dominant
        targets = strided_targets(rest, view.positions, groups, n_contextual)
        into = assign_to_targets(view.signals.keys(), rest & ~targets, targets, groups)
        # the reference's layout where order is free: protected tokens, dominant, then contextual
        part = torch.where(dominant, 1, torch.where(targets, 2, 0))
        slots = torch.arange(view.positions.shape[1], device=part.device)
        rank = part * view.positions.shape[1] + slots
        return Merge(
            dominant | targets, into, rank, self.params.proportional_attention, self.params.contextual_merge
        )
