"""CDPruner: keep the visual tokens a conditional determinantal point process finds most diverse and relevant.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning
in MLLMs" (NeurIPS 2025), arXiv:2506.10967. The kernel is `L_ij = r_i * cos(x_i, x_j) * r_j`: the
cosine similarity of the visual tokens' features, weighted by each token's relevance `r` to the
instruction (its mean cosine with the instruction's tokens, min-max normalised over the sample).
The kept set approximately maximises det(L_S) by greedy MAP inference with incremental Cholesky
updates (Chen et al., NeurIPS 2018), as in the paper. No attention is needed: the method prunes
before the language model (`layer: 0`) on the projector outputs, and the shortened sequence is
numbered contiguously, as the reference feeds it to the model.

Relevance here: the cosine between a visual token's projector output and the language model's
input embeddings of the instruction (the text after the sample's last visual token), both read
from the sequence entering the site. The reference (LLaVA) uses CLIP instead: the vision tower's
projected patch embeddings against CLIP's text encoder on the question, and it negates the
similarity (a CLIP-specific inversion, its authors say); `negate: true` applies that sign here.
Min-max normalisation runs per sample (per frame with `budget: per_frame`), not over the batch.

Parameters: `negate` (default False): rank relevance by minus the mean cosine, as the reference
code does for CLIP's embeddings.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.contracts.reducer import PositionPolicy, Reducer, Site, TokenView

EPSILON = 1e-6  # the reference's offset: the least relevant token keeps a small positive weight
SPENT = (
    1e-5  # residual variance below this share of a token's own: float noise once the kernel's rank is spent
)


class CDPrunerParams(BaseModel):
    """`negate` (default False): relevance is minus the mean cosine (the reference's sign for CLIP)."""

    model_config = ConfigDict(extra="forbid")

    negate: bool = Field(False, description="minus the mean cosine as relevance, as the reference with CLIP")


def instruction_tokens(view: TokenView) -> Tensor:
    """[B, L] bool: the real text tokens after each sample's last visual token (all its text if none)."""
    visual = view.valid & (view.coords[..., 0] >= 0)
    slot = torch.arange(visual.shape[1], device=visual.device)
    last_visual = torch.where(visual, slot, -1).amax(dim=1, keepdim=True)
    return view.valid & ~visual & (slot > last_visual)


def relevance(features: Tensor, instruction: Tensor, groups: Tensor, n_groups: int, negate: bool) -> Tensor:
    """[B, L] relevance in (0, 1]: each token's mean cosine with the instruction, min-max normalised.

    features [B, L, D] float32; instruction [B, L] bool; groups [B, L] (-1: not ranked). Normalised
    over the members of each group as the reference does, `(r - min + 1e-6) / (max - min)`.
    """
    unit = torch.nn.functional.normalize(features, dim=-1)
    count = instruction.sum(dim=1, keepdim=True).clamp(min=1)
    mean_text = (unit * instruction[..., None]).sum(dim=1) / count  # mean of cosines = cosine with the mean
    score = torch.einsum("bld,bd->bl", unit, mean_text)
    score = -score if negate else score
    slot = groups.masked_fill(groups < 0, n_groups)
    spare = torch.zeros(score.shape[0], n_groups + 1, device=score.device)
    low = spare.scatter_reduce(1, slot, score, "amin", include_self=False).gather(1, slot)
    high = spare.scatter_reduce(1, slot, score, "amax", include_self=False).gather(1, slot)
    span = high - low
    return (score - low + EPSILON) / torch.where(span > 0, span, 1.0)


def conditional_kernel(features: Tensor, weight: Tensor, groups: Tensor) -> Tensor:
    """[B, L, L] DPP kernel `w_i * cos(x_i, x_j) * w_j` between members of one group, 0 elsewhere."""
    unit = torch.nn.functional.normalize(features, dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    same = (groups[:, :, None] == groups[:, None, :]) & (groups >= 0)[:, :, None]
    return weight[:, :, None] * similarity * weight[:, None, :] * same


def greedy_map(kernel: Tensor, groups: Tensor, budget: Tensor) -> Tensor:
    """[B, L] bool: greedy MAP of the DPP `kernel` [B, L, L], `budget[b, g]` picks in group g of row b.

    Each step takes, in every group still short of its budget, the token with the largest gain in
    log det (its residual variance `d`, ties: the earlier token); incremental Cholesky rows `c` update
    every residual, `d_i -= e_i^2` (Chen et al., 2018). Groups are blocks of the kernel, so their
    Cholesky rows have disjoint supports and one row per step holds all of them. A residual below
    `SPENT` of the token's own variance is float noise (the kernel's rank is spent) and counts as 0,
    so such picks go to the earliest tokens, the same alone or in a padded batch.
    """
    batch, length = groups.shape
    n_groups = budget.shape[1]
    support = (groups[:, None, :] == torch.arange(n_groups, device=groups.device)[None, :, None]) & (
        groups[:, None, :] >= 0
    )  # [B, G, L]
    residual = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    floor = SPENT * residual  # a token whose residual variance falls below: nothing new left in it
    steps = int(budget.max()) if budget.numel() else 0  # the loop's length: one host read
    rows = kernel.new_zeros(steps, batch, length)
    keep = torch.zeros(batch, length + 1, dtype=torch.bool, device=groups.device)
    for step in range(steps):
        available = support & ~keep[:, None, :length]
        gains = torch.where(residual > floor, residual, 0.0)  # spent tokens tie at 0: the earliest goes
        pick = gains[:, None, :].masked_fill(~available, float("-inf")).argmax(dim=-1)  # [B, G]
        live = step < budget
        gain = gains.gather(1, pick)
        informative = live & (gain > 0)
        chosen_row = kernel.gather(1, pick[..., None].expand(-1, -1, length))  # [B, G, L]
        earlier = rows[:step].gather(2, pick[None].expand(step, -1, -1))  # [step, B, G]
        scale = torch.where(informative, gain, 1.0).sqrt()[..., None]
        update = (chosen_row - torch.einsum("tbg,tbl->bgl", earlier, rows[:step])) / scale
        rows[step] = torch.where(support & informative[..., None], update, 0.0).sum(dim=1)
        keep.scatter_(1, torch.where(live, pick, length), True)
        residual = residual - rows[step].square()
    return keep[:, :length]


class CDPruner(Reducer):
    """Conditional-DPP selection (CDPruner), per sample or per frame (`budget: per_frame`)."""

    Params: ClassVar[type[BaseModel]] = CDPrunerParams
    sites: ClassVar[frozenset[Site]] = frozenset({"language"})  # relevance needs the instruction's text
    positions: ClassVar[PositionPolicy] = "renumbered"

    def select(self, view: TokenView) -> Tensor:
        budget, groups = view.quota()
        features = view.features()
        weight = relevance(features, instruction_tokens(view), groups, budget.shape[1], self.params.negate)
        return greedy_map(conditional_kernel(features, weight, groups), groups, budget)
