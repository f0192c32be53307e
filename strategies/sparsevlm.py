"""SparseVLM: text raters rank the visual tokens by attention; the best of the pruned are recycled.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference" (ICML 2025), arXiv:2410.04417. Raters are the instruction tokens most relevant to the
image: on the language model's input embeddings, each visual token's dot products with the
instruction's tokens are softmaxed over the instruction and averaged over the visual tokens; the
tokens above the mean are raters. At each stage the visual tokens are ranked by the attention the
raters pay them in layer K-1 (averaged over raters and heads). The top 30% of the pruned tokens (by
the same score) are recycled: clustered by density peaks (DPC-KNN, one cluster per 10 recycled
tokens, plus one) and each cluster merged into its centre, a plain average (the `Merge` contract,
without proportional attention, as the reference). The released LLaVA-1.5 schedules prune after
layers 2, 6 and 15 (sites 3, 7, 16): `configs/sparsevlm-llava.yaml`.

Budgets: the stage's budget is exact and includes the merged tokens (the reference adds them on
top of its count). The paper's rank-based adaptive count (delete lambda * (L_v - rank(P)) tokens, P
the raters' attention to the visual tokens) is replaced, as in the released code, by a fixed count
per layer: here the stage's `keep` or `ratio`. Raters are chosen again at each stage among the
visual tokens still present (the reference chooses them once, on all of them). Ties in density go
to the earlier token (the reference adds random noise). A merged token sits at its centre's slot and
position; the reference appends the merged tokens after the kept ones and renumbers positions, which
the default position policy (`renumbered`) follows for the kept sequence.

Parameters (defaults from the released code v1.0):
- `recycle` (0.3): share of the pruned tokens recycled, the best by rater attention (plus one).
- `cluster_size` (10): recycled tokens per merged token (`recycled // cluster_size + 1` clusters).
- `merge` (True): recycle at all; False prunes only (the code's v2.0 setting).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenprune.strategies.cdpruner import instruction_tokens
from torch import Tensor

from tokenprune.contracts.reducer import (
    Merge,
    PositionPolicy,
    Reducer,
    Site,
    TokenView,
    group_counts,
    top_k_mask,
)


class SparseVLMParams(BaseModel):
    """`recycle` (0.3), `cluster_size` (10) and `merge` (True): how pruned tokens are recycled."""

    model_config = ConfigDict(extra="forbid")

    recycle: float = Field(0.3, ge=0.0, le=1.0, description="share of the pruned tokens recycled (plus one)")
    cluster_size: int = Field(10, ge=1, description="recycled tokens per merged token")
    merge: bool = Field(True, description="recycle pruned tokens into merged ones (False: prune only)")


def text_raters(embeddings: Tensor, visual: Tensor, instruction: Tensor) -> Tensor:
    """[B, L] bool: the instruction tokens whose mean softmaxed relevance to the visual tokens is above
    the instruction's mean (embeddings [B, L, D] float32; visual, instruction [B, L] bool)."""
    logits = (embeddings @ embeddings.transpose(1, 2)).masked_fill(~instruction[:, None, :], float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0) * visual[..., None]  # [B, visual, text]
    relevance = weights.sum(dim=1) / visual.sum(dim=1, keepdim=True).clamp(min=1)
    count = instruction.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (relevance * instruction).sum(dim=1, keepdim=True) / count
    return instruction & (relevance > mean)


def recycled_counts(
    n_candidates: Tensor, budget: Tensor, recycle: float, cluster_size: int
) -> tuple[Tensor, Tensor]:
    """(clusters, recycled) [B, G] long: merged tokens within the budget, and pruned tokens recycled.

    As the reference: recycled = floor(recycle * pruned) + 1, clusters = recycled // cluster_size + 1,
    here with the clusters counted inside the budget (at most budget - 1 of it).
    """
    pruned = n_candidates - budget

    def share(n: Tensor) -> Tensor:
        return (recycle * n.double()).floor().long() + 1

    clusters = torch.minimum(share(pruned) // cluster_size + 1, budget - 1).clamp(min=0)
    clusters = torch.where(pruned > 0, clusters, 0)
    recycled = torch.where(clusters > 0, torch.minimum(share(pruned + clusters), pruned + clusters), 0)
    return clusters, recycled


def density_peaks(
    features: Tensor, members: Tensor, groups: Tensor, clusters: Tensor
) -> tuple[Tensor, Tensor]:
    """DPC-KNN within each group: (centres [B, L] bool, nearest centre's slot [B, L] long, -1 off members).

    features [B, L, D] float32; members [B, L] bool; groups [B, L]; clusters [B, G] centres per group.
    Density: exp(-mean squared distance to the k nearest members, itself included), k = the group's
    clusters; a token's separation is its distance to the nearest denser member (ties: the earlier
    token is denser), or the group's largest distance for the densest; centres have the largest
    density * separation. Distances are Euclidean over sqrt(D).
    """
    length = members.shape[1]
    distance = torch.cdist(features, features) / features.shape[-1] ** 0.5
    pair = members[:, :, None] & members[:, None, :] & (groups[:, :, None] == groups[:, None, :])
    k = clusters.gather(1, groups.clamp(min=0)).clamp(min=1)  # [B, L]
    nearest = distance.masked_fill(~pair, float("inf")).sort(dim=-1).values
    mean_square = nearest.square().cumsum(dim=-1).gather(2, (k - 1)[..., None]).squeeze(-1) / k
    density = torch.exp(-mean_square).masked_fill(~members, 0.0)
    slot = torch.arange(length, device=members.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (slot[None, :] < slot[:, None])
    )  # [B, i, j]: j is denser than i
    farthest = distance.masked_fill(~pair, 0.0).amax(dim=(1, 2))[:, None]
    separation = distance.masked_fill(~(pair & denser), float("inf")).amin(dim=-1)
    separation = torch.where(torch.isinf(separation), farthest, separation)
    centres = top_k_mask(separation * density, members, clusters, groups)
    to_centre = distance.masked_fill(~(pair & centres[:, None, :]), float("inf"))
    return centres, torch.where(members, to_centre.argmin(dim=-1), -1)


class SparseVLM(Reducer):
    """Text-rater attention ranking with recycling of pruned tokens (SparseVLM)."""

    Params: ClassVar[type[BaseModel]] = SparseVLMParams
    requires: ClassVar[frozenset[str]] = frozenset({"attention_from", "embeddings"})
    merges: ClassVar[bool] = True
    sites: ClassVar[frozenset[Site]] = frozenset({"language"})  # attention inside a language model
    positions: ClassVar[PositionPolicy] = "renumbered"

    def select(self, view: TokenView) -> Tensor | Merge:
        visual = view.valid & (view.coords[..., 0] >= 0)
        raters = text_raters(view.signals.get("embeddings"), visual, instruction_tokens(view))
        score = view.signals.get("attention_from", rows=raters)
        budget, groups = view.quota()
        if not self.params.merge:
            return top_k_mask(score, view.candidates, budget, groups)
        n_candidates = group_counts(view.candidates, groups, budget.shape[1])
        clusters, recycled = recycled_counts(
            n_candidates, budget, self.params.recycle, self.params.cluster_size
        )
        ranked = top_k_mask(score, view.candidates, budget - clusters, groups)
        pool = top_k_mask(score, view.candidates & ~ranked, recycled, groups)
        centres, nearest = density_peaks(view.features(), pool, groups, clusters)
        into = torch.where(pool & ~centres, nearest, -1)
        return Merge(ranked | centres, into, proportional_attention=False)
