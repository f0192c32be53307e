"""FasterVLM: keep the patches the vision encoder's class token attends to most, before the language model.

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (arXiv:2412.01818). At the vision encoder layer whose output feeds the projector
(LLaVA's `vision_feature_layer=-2`: layer 22 of CLIP-L's 24), the attention from the [CLS] token to
each patch, averaged over heads, ranks the patches; the top T are kept in their original order and
the rest never reach the language model. T is the stage's budget, absolute (`keep`: 144, 58, 29 of
576 for 75%, 90%, 95% reduction) or as a `ratio` of the patches; ties go to the earlier patch. The
class token is protected (LLaVA drops it before the projector).

Parameters: none (the budget and the layer come from the config's stage).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from tokenprune.contracts.reducer import ScoreReducer, TokenView


class FasterVLM(ScoreReducer):
    """[CLS]-attention pruning in the vision encoder (FasterVLM)."""

    requires: ClassVar[frozenset[str]] = frozenset({"attention"})
    sites: ClassVar[frozenset[str]] = frozenset({"vision"})  # the class token of a vision encoder
    positions: ClassVar[str] = "renumbered"  # the position policy of the paper's reference code

    def score(self, view: TokenView) -> Tensor:
        return view.signals.attention("class")  # [B, L], head-averaged, from the class token's row
