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

from tokenprune.contracts.reducer import Reducer, TokenView, split_budget


class DartParams(BaseModel):
    """`image_pivots` (default 4) and `text_pivots` (default 4): pivots chosen by key L1 norm."""

    model_config = ConfigDict(extra="forbid")

    image_pivots: int = Field(4, ge=1, description="visual pivots (kept), by the L1 norm of their keys")
    text_pivots: int = Field(4, ge=0, description="text pivots after the image, by the L1 norm of their keys")


def top_indices(values: Tensor, k: int) -> list[int]:
    """Indices of the k largest entries of `values` [n] (ties: the earlier index), in sequence order."""
    order = torch.sort(values, descending=True, stable=True).indices
    return sorted(order[: min(k, len(values))].tolist())


def least_duplicated(
    visual: Tensor, norms: Tensor, text_pivots: Tensor, k: int, image_pivots: int
) -> list[int]:
    """k row indices of `visual` [n, D] float32: the visual pivots, then each pivot's least similar tokens.

    `norms` [n]: the key L1 norm of each visual token (the `image_pivots` largest are pivots);
    `text_pivots` [m, D]: features of the text pivots. Similarity is cosine; each pivot, visual ones
    first, takes its share of `k - len(visual pivots)` from the tokens nobody took yet, lowest
    similarity first (ties: the earlier token).
    """
    if k == 0:
        return []
    pivots = top_indices(norms, min(image_pivots, k))
    unit = torch.nn.functional.normalize(visual, dim=-1)
    anchors = torch.cat([unit[pivots], torch.nn.functional.normalize(text_pivots, dim=-1)])
    free = torch.ones(len(visual), dtype=torch.bool, device=visual.device)
    free[pivots] = False
    chosen = list(pivots)
    for anchor, share in zip(anchors, split_budget(k - len(pivots), [1] * len(anchors)), strict=True):
        similarity = (unit @ anchor).masked_fill(~free, float("inf"))
        picked = torch.sort(similarity, stable=True).indices[:share]
        free[picked] = False
        chosen += picked.tolist()
    return chosen


class Dart(Reducer):
    """Duplication-aware selection around key-norm pivots (DART), per sample or per frame."""

    Params: ClassVar[type[BaseModel]] = DartParams
    requires: ClassVar[frozenset[str]] = frozenset({"keys", "normed_output"})
    sites: ClassVar[frozenset[str]] = frozenset({"language"})  # signals of a language model

    def select(self, view: TokenView) -> Tensor:
        keep = torch.zeros_like(view.candidates)
        if not bool(view.budget.any()):
            return keep
        norms = view.signals.get("keys", rope=True, heads="concat").abs().sum(dim=-1)  # [B, L] L1 norm
        features = view.signals.get("normed_output")  # [B, L, D]
        visual = view.valid & (view.coords[..., 0] >= 0)
        budget, groups = view.quota()
        position = torch.arange(keep.shape[1], device=keep.device)
        for b in range(keep.shape[0]):
            last_visual = int(position[visual[b]].max()) if bool(visual[b].any()) else -1
            text = (view.valid[b] & ~visual[b] & (position > last_visual)).nonzero().squeeze(1)
            text = text[top_indices(norms[b, text], self.params.text_pivots)]
            for group, k in enumerate(budget[b].tolist()):
                members = (view.candidates[b] & (groups[b] == group)).nonzero().squeeze(1)
                picked = least_duplicated(
                    features[b, members], norms[b, members], features[b, text], k, self.params.image_pivots
                )
                keep[b, members[picked]] = True
        return keep
