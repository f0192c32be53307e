"""Norm: keep the visual tokens whose hidden state has the largest (or smallest) L2 norm.

An example strategy, not a published method: it shows the smallest complete `ScoreReducer`
(a Params model, a `score`, no model signal). The core keeps the `budget` best-scoring
candidates of each sample; text tokens are never candidates, so they are always kept.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune import ScoreReducer, TokenView


class NormParams(BaseModel):
    """`largest`: keep the largest norms (default True) or the smallest ones (False)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is an error, not a silent default

    largest: bool = Field(True, description="keep the visual tokens with the largest hidden-state norm")


class NormRanked(ScoreReducer):
    """Rank visual tokens by the L2 norm of their hidden state entering the site."""

    Params: ClassVar[type[BaseModel]] = NormParams

    def score(self, view: TokenView) -> Tensor:
        norms = view.hidden.float().norm(dim=-1)  # [B, L]; scores of non-candidates are ignored
        return norms if self.params.largest else -norms
