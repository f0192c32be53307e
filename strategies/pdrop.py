"""PyramidDrop: at each stage, keep the visual tokens the last instruction token attends to most.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (CVPR 2025), arXiv:2410.17247. The model is split into stages; at the end of
each, a share of the visual tokens is dropped, ranked by the attention the last instruction token
pays them, computed with the projections of the layer the site feeds (layer K's input norm, query
and key projections and rotary embedding on the hidden states entering it), averaged over heads.
The schedule is the config's: the paper's LLaVA-1.5 setting is stages at layers 8, 16 and 24
keeping 50%, 25% and 12.5% of the original visual tokens (`configs/pdrop-llava.yaml`).

Positions: as in the reference, the surviving sequence is renumbered after each drop (the default
policy, `renumbered`; decoding continues from the shortened sequence); `positions: original` keeps
each kept token's own rotary position (FastV's convention).

Parameters: `query` = `"last"` (default, the paper's last instruction token) or `"mean"` (the mean
over every real token's attention row).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.contracts.reducer import ScoreReducer, TokenView


class PyramidDropParams(BaseModel):
    """`query`: which attention rows rank the tokens (default `"last"`, the last instruction token)."""

    model_config = ConfigDict(extra="forbid")

    query: Literal["last", "mean"] = Field("last", description="query rows that rank the visual tokens")


class PyramidDrop(ScoreReducer):
    """Attention-rank drop with the next layer's projections, at every stage of a schedule (PyramidDrop)."""

    Params: ClassVar[type[BaseModel]] = PyramidDropParams
    requires: ClassVar[frozenset[str]] = frozenset({"next_attention"})
    sites: ClassVar[frozenset[str]] = frozenset({"language"})  # signals of a language model
    positions: ClassVar[str] = "renumbered"  # the position policy of the paper's reference code

    def score(self, view: TokenView) -> Tensor:
        return view.signals.get("next_attention", query=self.params.query)
