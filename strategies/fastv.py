"""FastV: keep the visual tokens that receive the most attention at the layer before the site.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (ECCV 2024), arXiv:2403.06764.
Scores are the head-averaged attention of layer K-1, recomputed from that layer's own query and
key projections (the layer itself keeps its SDPA/FlashAttention backend). Text is always kept;
ties go to the earlier token.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.contracts.reducer import ScoreReducer, TokenView

DEFAULT_QUERY = {"language": "last", "vision": "class", "cache": "last"}  # cache: the window decides


class FastVParams(BaseModel):
    """`score`: which query rows rank the tokens; None (default): `last` in a language model,
    `class` in a vision encoder.

    - `last`: the last token's row, as the reference code (`attn[-1]`).
    - `mean`: the mean over all query rows, as the paper's text ("attention received from all tokens").
    - `class`: the class token's row, in a vision encoder (the ViT analogue of FastV).
    """

    model_config = ConfigDict(extra="forbid")

    score: Literal["last", "mean", "class"] | None = Field(None, description="query rows ranking the tokens")

    def resolved(self, site: str) -> FastVParams:
        """These params as they run at `site`: a None `score` is `last` in a decoder, `class` in a tower."""
        return self.model_copy(update={"score": self.score or DEFAULT_QUERY[site]})


class FastV(ScoreReducer):
    """Attention-rank pruning (FastV)."""

    Params: ClassVar[type[BaseModel]] = FastVParams
    requires: ClassVar[frozenset[str]] = frozenset({"attention"})
    sites: ClassVar[frozenset[str]] = frozenset({"language", "vision", "cache"})
    positions: ClassVar[str] = "original"  # the position policy of the paper's reference code

    def score(self, view: TokenView) -> Tensor:
        return view.signals.attention(self.params.score or DEFAULT_QUERY[view.site])
