"""DivPrune: keep the most diverse visual tokens, by greedy max-min cosine distance.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(CVPR 2025), arXiv:2503.02175. The paper prunes before the language model (`layer: 0`, on the
projector outputs; its ablation finds layer 0 better than 1 or 3) and keeps 9.8% of the tokens
(56 of 576: `keep: 56`). No attention is needed, so it runs on any backend and at any layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenprune.contracts.reducer import Reducer, TokenView


def max_min_diverse(features: Tensor, k: int) -> list[int]:
    """k row indices of `features` [n, d] float32, greedily maximising the minimum cosine distance.

    First the row whose nearest neighbour is farthest; then, each time, the row whose distance to
    the nearest already-chosen row is largest (ties: the earlier row). Distance = 1 - cosine.
    """
    if k == 0:
        return []
    unit = torch.nn.functional.normalize(features, dim=-1)
    distance = 1 - unit @ unit.T
    nearest = distance.fill_diagonal_(float("inf")).min(dim=1).values
    distance.fill_diagonal_(0.0)
    chosen = [int(nearest.argmax())]
    to_chosen = distance[chosen[0]].clone()
    to_chosen[chosen] = float("-inf")
    for _ in range(k - 1):
        pick = int(to_chosen.argmax())
        chosen.append(pick)
        to_chosen = torch.minimum(to_chosen, distance[pick])
        to_chosen[chosen] = float("-inf")
    return chosen


class DivPrune(Reducer):
    """Diversity-based selection (DivPrune), per sample or per frame (`budget: per_frame`)."""

    def select(self, view: TokenView) -> Tensor:
        keep = torch.zeros_like(view.candidates)
        budget, groups = view.quota()
        features = view.features()
        for b in range(keep.shape[0]):
            for group, k in enumerate(budget[b].tolist()):
                members = (view.candidates[b] & (groups[b] == group)).nonzero().squeeze(1)
                keep[b, members[max_min_diverse(features[b, members], k)]] = True
        return keep
