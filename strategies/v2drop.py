"""V2Drop: drop the visual tokens whose hidden states change least across the layer before the site.

Chen et al., "Variation-aware Vision Token Dropping for Faster Large Vision-Language Models"
(CVPR 2026), arXiv:2509.01552. A token's variation is the L2 norm of what decoder layer K-1 adds to
it (its output minus its input); the tokens that vary most are kept. No attention map is needed,
so every layer keeps its SDPA or FlashAttention backend and nothing is recomputed. The method is
progressive: the released LLaVA-1.5 code drops at layers 3, 17 and 22, keeping half of the visual
tokens, then half of those, then one (`configs/v2drop-llava.yaml`). Kept tokens keep their original
positions, as in the reference code.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from tokenprune.contracts.reducer import PositionPolicy, ScoreReducer, Site, TokenView


class V2Drop(ScoreReducer):
    """Variation-rank pruning (V2Drop): the tokens layer K-1 changed most survive."""

    requires: ClassVar[frozenset[str]] = frozenset({"variation"})
    sites: ClassVar[frozenset[Site]] = frozenset({"language"})  # variation between decoder layers
    positions: ClassVar[PositionPolicy] = "original"

    def score(self, view: TokenView) -> Tensor:
        return view.signals.get("variation")
