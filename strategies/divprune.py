"""DivPrune: keep the most diverse visual tokens, by greedy max-min cosine distance.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(CVPR 2025), arXiv:2503.02175. The paper prunes before the language model (`layer: 0`, on the
projector outputs; its ablation finds layer 0 better than 1 or 3) and keeps 9.8% of the tokens
(56 of 576: `keep: 56`). No attention is needed, so it runs on any backend and at any layer.

Batched: every sample (or frame) of the batch runs its greedy chain at once, one tensor step per
kept token, with masks for ragged budgets; the only host read is the largest budget (the number
of steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenprune.contracts.reducer import Reducer, TokenView
from tokenprune.core.selection import group_members


def cosine_distance(features: Tensor) -> Tensor:
    """[B, L, L] float32: 1 - cosine similarity between the rows of `features` [B, L, d]."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return torch.baddbmm(unit.new_ones(1, 1, 1), unit, unit.transpose(-1, -2), alpha=-1)


def max_min_picks(features: Tensor, groups: Tensor, budget: Tensor) -> Tensor:
    """[B, G, K] long: the slots each group picks from its members, in greedy max-min order.

    features [B, L, d]; groups [B, L] each candidate's group (-1: none); budget [B, G] picks per
    group; K = the largest budget; -1 past a group's budget.
    First the member whose nearest other member is farthest; then, each time, the member whose
    distance to the nearest already-chosen one is largest (ties: the earlier slot). Distance = 1 - cosine.
    """
    steps = int(budget.max()) if budget.numel() else 0  # the one host read: how many greedy steps
    distance = cosine_distance(features)
    n_slots = distance.shape[-1]
    members = group_members(groups, budget.shape[1])  # [B, G, L]
    alone = (groups[:, :, None] != groups[:, None, :]) | (groups[:, None, :] < 0)
    alone.diagonal(dim1=1, dim2=2).fill_(True)  # a token is not its own neighbour
    # in place: a masked entry is never read again (its row's or column's token is out of the group)
    nearest = distance.masked_fill_(alone, float("inf")).amin(dim=-1)  # [B, L]: the nearest other member
    score = nearest[:, None, :].masked_fill(~members, float("-inf"))
    to_chosen = torch.where(members, float("inf"), float("-inf"))
    picks, rows = [], torch.empty_like(to_chosen)
    for _ in range(steps):
        pick = score.argmax(dim=-1, keepdim=True)  # [B, G, 1]: first maximum, the earlier slot on ties
        picks.append(pick)
        torch.gather(distance, 1, pick.expand(-1, -1, n_slots), out=rows)  # [B, G, L]: distances to the pick
        torch.minimum(to_chosen, rows, out=to_chosen).scatter_(-1, pick, float("-inf"))
        score = to_chosen
    picks = torch.cat(picks, dim=-1) if picks else budget.new_zeros((*budget.shape, 0))
    within = torch.arange(steps, device=budget.device) < budget[..., None]
    return picks.masked_fill(~within, -1)


def max_min_diverse(features: Tensor, k: int) -> list[int]:
    """k row indices of `features` [n, d], in the greedy max-min order of `max_min_picks` (one set)."""
    groups = torch.zeros(1, features.shape[0], dtype=torch.long, device=features.device)
    picks = max_min_picks(features[None], groups, torch.tensor([[k]], device=features.device))
    return picks[0, 0].tolist()


def picked_mask(picks: Tensor, n_slots: int) -> Tensor:
    """[B, L] bool: the slots named in `picks` [B, G, K] (-1: none)."""
    flat = picks.flatten(1)
    keep = torch.zeros(flat.shape[0], n_slots + 1, dtype=torch.bool, device=flat.device)
    return keep.scatter_(1, flat.masked_fill(flat < 0, n_slots), True)[:, :n_slots]


class DivPrune(Reducer):
    """Diversity-based selection (DivPrune), per sample or per frame (`budget: per_frame`)."""

    positions = "renumbered"  # the position policy of the paper's reference code

    def select(self, view: TokenView) -> Tensor:
        budget, groups = view.quota()
        picks = max_min_picks(view.features(), groups, budget)
        return picked_mask(picks, view.candidates.shape[1])
