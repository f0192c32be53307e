"""HiPrune: anchors from a middle layer of the vision encoder, their neighbours, and registers from the last.

Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language
Models" (arXiv:2508.00553, https://arxiv.org/abs/2508.00553). Middle layers of a vision encoder attend to
objects, deep ones to global context. With a stage's budget T (at the layer feeding the projector,
LLaVA's 22 of CLIP-L's 24):
- anchors: the `round(T * alpha / 5)` patches receiving the most attention at the object layer
  (head-averaged, averaged over every query row: the reference's "global attention");
- buffers: the patches next to an anchor (up, down, left, right, in the same image or frame);
- registers: the rest of the budget, the patches receiving the most attention at the stage's layer.
Ties go to the earlier patch. If anchors and buffers exceed T (tiny budgets), anchors come first, then
buffers, each by object-layer attention. Deviation: the reference finds neighbours as flat indices
`i +- 1, i +- 24`, so a patch on the left or right edge of the grid takes one from the neighbouring row;
here neighbours are those of the grid (rows and columns of any size).

Acts in a vision encoder only: its signals are the encoder's attention at two layers (`site: vision`
stages on LLaVA's and Video-LLaVA's towers keep the object layer's queries and keys until the stage;
a timm ViT's blocks keep only the stage's, so there the object layer must be the stage's). Position
policy: `renumbered` (the reference feeds the language model the shorter sequence).

Parameters:
- `alpha` (default 0.1, the reference's): anchors and their buffers take about this share of the budget.
- `object_layer` (default None): the encoder layer whose attention picks the anchors (0-based; the
  reference's `HIPRUNE_OBJECT_LAYER=9` for CLIP-L is 8). None: 8 for a stage at layer 8 or later, the
  stage's own layer on a shallower one. A layer after the stage's is refused when attaching.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.contracts.reducer import PositionPolicy, Reducer, Site, TokenView, top_k_mask

PAPER_OBJECT_LAYER = 8  # CLIP-L's 9th layer, the reference's HIPRUNE_OBJECT_LAYER=9 (1-based)


class HiPruneParams(BaseModel):
    """The share of the budget for anchors and buffers, and the layer whose attention picks the anchors."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.1, ge=0.0, le=1.0, description="share of the budget for anchors and their buffers")
    object_layer: int | None = Field(
        None, ge=0, description="encoder layer (0-based) of the anchors' attention; None: 8, or the stage's"
    )


def neighbours(anchors: Tensor, coords: Tensor, segment: Tensor, bound: int) -> Tensor:
    """[B, L] bool: the tokens one row or one column away from an anchor in the same segment and time step.

    `anchors` [B, L] bool, at most `bound` per row; `coords` [B, L, 3] (t, row, col); `segment` [B, L].
    """
    first = torch.sort((~anchors).to(torch.uint8), dim=1, stable=True).indices[:, :bound]
    present = anchors.gather(1, first)
    place = torch.cat([segment[..., None], coords], dim=-1)  # [B, L, 4]: segment, t, row, col
    anchor_place = place.gather(1, first[..., None].expand(-1, -1, 4))
    offset = place[:, :, None, :] - anchor_place[:, None, :, :]  # [B, L, bound, 4]
    same_frame = (offset[..., :2] == 0).all(dim=-1)
    adjacent = offset[..., 2:].abs().sum(dim=-1) == 1
    return (same_frame & adjacent & present[:, None, :]).any(dim=-1)


class HiPrune(Reducer):
    """Anchors by object-layer attention, their grid neighbours, registers by the stage's (HiPrune)."""

    Params: ClassVar[type[BaseModel]] = HiPruneParams
    requires: ClassVar[frozenset[str]] = frozenset({"attention"})
    sites: ClassVar[frozenset[Site]] = frozenset({"vision"})  # attention inside a vision encoder
    positions: ClassVar[PositionPolicy] = "renumbered"

    def object_layer(self, layer: int) -> int:
        """The layer whose attention picks the anchors of a stage on `layer`'s output."""
        if self.params.object_layer is not None:
            return self.params.object_layer
        return PAPER_OBJECT_LAYER if layer >= PAPER_OBJECT_LAYER else layer

    def signal_layers(self, layer: int) -> frozenset[int]:
        """The object layer, when it is not the stage's own: a vision tower keeps its attention."""
        return frozenset({self.object_layer(layer)} - {layer})

    def select(self, view: TokenView) -> Tensor:
        budget, groups = view.quota()
        deep = view.signals.attention("mean")
        object_layer = self.object_layer(view.layer)
        shallow = (
            deep
            if object_layer == view.layer
            else view.signals.get("attention", query="mean", layer=object_layer)
        )
        n_anchors = torch.round(budget.double() * self.params.alpha / 5).long()
        anchors = top_k_mask(shallow, view.candidates, n_anchors, groups)
        length = view.candidates.shape[1]  # anchors per row: at most L * alpha / 5, plus 1/2 per group
        bound = min(length, int(length * self.params.alpha / 5) + 1 + budget.shape[1])
        buffers = neighbours(anchors, view.coords, view.segment, bound) & view.candidates & ~anchors
        tier = torch.where(anchors, 4.0, torch.where(buffers, 2.0, 0.0))
        score = tier + torch.where(anchors | buffers, shallow, deep)
        return top_k_mask(score, view.candidates, budget, groups)
