"""Random: a seeded, reproducible random subset of each sample's visual tokens.

A strong baseline (Wen et al., "Token Pruning in Multimodal LLMs: Are We Solving the Right
Problem?", arXiv:2502.11501). The i-th visual token of a sample always draws the same number for
a given seed, so a sample keeps the same tokens alone or anywhere in a batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.contracts.reducer import ScoreReducer, TokenView


class RandomParams(BaseModel):
    """`seed`: the random stream shared by every sample (default 0)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="seed of the per-sample random scores")


class RandomSelection(ScoreReducer):
    """Uniformly random subset, reproducible per sample."""

    Params: ClassVar[type[BaseModel]] = RandomParams
    sites: ClassVar[frozenset[str]] = frozenset({"language", "vision", "cache"})
    positions: ClassVar[str] = "original"  # the position policy of the paper's reference code

    def score(self, view: TokenView) -> Tensor:
        ordinal = view.candidates.long().cumsum(dim=1) - 1  # i-th candidate of its sample
        draws = torch.rand(
            view.candidates.shape[1], generator=torch.Generator().manual_seed(self.params.seed)
        )
        return draws.to(view.hidden.device)[ordinal.clamp(min=0)]
