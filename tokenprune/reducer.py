"""The strategy contract: a Reducer sees the candidate tokens of one site and says which to keep.

A strategy never sees a model. It receives a `TokenView` (hidden states, which tokens are
visual, which image/frame and grid cell each belongs to, original positions, the budget) and
may ask `view.signals` for model-derived signals, computed by the core only when asked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from tokenprune.errors import TokenPruneError

QueryRows = Literal["last", "mean"]


class SignalUnavailable(TokenPruneError):
    """A strategy asked for a signal this site cannot provide (e.g. attention before the first layer)."""


class NoParams(BaseModel):
    """Parameters of a strategy that takes none."""

    model_config = ConfigDict(extra="forbid")


class Signals:
    """Model-derived signals for one site, computed lazily and at most once per forward.

    `attention(query)`: [B, L] float32 head-averaged attention each token of the current sequence
    receives at the layer before the site, from the last real query token (`"last"`, FastV's
    reference code) or averaged over all real query tokens (`"mean"`, FastV's paper text).
    """

    def __init__(self, attention: Callable[[QueryRows], Tensor] | None = None) -> None:
        self._attention = attention
        self._cache: dict[tuple[str, str], Tensor] = {}

    def attention(self, query: QueryRows = "last") -> Tensor:
        if self._attention is None:
            raise SignalUnavailable("attention scores need a decoder layer before the site (layer >= 1)")
        key = ("attention", query)
        if key not in self._cache:
            self._cache[key] = self._attention(query)
        return self._cache[key]


@dataclass
class TokenView:
    """The tokens entering one reduction site, batch-first, in current sequence order.

    Shapes: B samples, L tokens (left-filled with invalid slots when samples differ in length).
    - hidden    [B, L, D]  hidden states entering the site
    - candidates[B, L] bool  visual tokens that may be removed
    - valid     [B, L] bool  real tokens (False: padding or filler)
    - segment   [B, L] long  image/frame index of a visual token within its sample, -1 otherwise
    - coords    [B, L, 3] long  (t, row, col) of a visual token in its segment's grid, -1 otherwise
    - extent    [B, L, 3] long  (T, H, W) of that grid, 0 for non-visual tokens
    - positions [B, L] long  original sequence position (index into the input ids), -1 for filler
    - budget    [B] long   how many candidates to keep in each sample
    - frame     [B, L] long  index of a candidate's frame in its sample: one per (segment, t) pair,
                so a video frame, an image, a sub-grid; -1 otherwise
    - frame_budget [B, F] long or None  with `budget: per_frame`, how many to keep in each frame
                (`budget` is then their sum per sample)
    """

    hidden: Tensor
    candidates: Tensor
    valid: Tensor
    segment: Tensor
    coords: Tensor
    extent: Tensor
    positions: Tensor
    budget: Tensor
    layer: int
    signals: Signals = field(default_factory=Signals)
    frame: Tensor | None = None
    frame_budget: Tensor | None = None

    def quota(self) -> tuple[Tensor, Tensor | None]:
        """(budgets, groups) for `top_k_mask`: per sample, or per frame with `budget: per_frame`."""
        if self.frame_budget is None:
            return self.budget, None
        return self.frame_budget, self.frame


class Reducer(ABC):
    """Base class of every strategy: fill in `select`.

    Class attributes: `Params`, the pydantic model of the strategy's parameters (validated from
    the config's `params`); `requires`, the signals it asks for (a site that cannot provide them
    is refused when attaching).
    """

    Params: ClassVar[type[BaseModel]] = NoParams
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()

    @abstractmethod
    def select(self, view: TokenView) -> Tensor:
        """Bool [B, L]: the candidates to keep, exactly `view.budget[b]` of them in row b."""


class ScoreReducer(Reducer):
    """A strategy that ranks candidates: fill in `score`; the highest `budget` candidates are kept."""

    @abstractmethod
    def score(self, view: TokenView) -> Tensor:
        """Float [B, L]: higher is kept first; ties go to the earlier position."""

    def select(self, view: TokenView) -> Tensor:
        return top_k_mask(self.score(view), view.candidates, *view.quota())


def top_k_mask(scores: Tensor, candidates: Tensor, budget: Tensor, groups: Tensor | None = None) -> Tensor:
    """Bool [B, L]: the best-scoring candidates, `budget[b]` per row, or `budget[b, g]` per group.

    `groups` [B, L] gives each candidate's group (e.g. its segment) when `budget` is [B, G].
    Sorting is stable, so among equal scores the earlier token wins.
    """
    if groups is None:
        budget, groups = budget[:, None], torch.zeros_like(candidates, dtype=torch.long)
    n_groups = budget.shape[1]
    groups = groups.masked_fill(~candidates, n_groups)  # non-candidates: an extra group with no budget
    budget = torch.nn.functional.pad(budget, (0, 1))
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    in_order = torch.nn.functional.one_hot(groups.gather(1, order), n_groups + 1)
    rank = (in_order.cumsum(dim=1) * in_order).sum(-1) - 1  # rank within its group, best first
    keep_in_order = rank < budget.gather(1, groups.gather(1, order))
    return torch.zeros_like(candidates).scatter(1, order, keep_in_order) & candidates


def group_counts(mask: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """[B, G] number of True entries of `mask` [B, L] in each group (`groups` [B, L], -1: none)."""
    slot = groups.clamp(min=0).masked_fill(~mask | (groups < 0), n_groups)
    counts = torch.zeros(mask.shape[0], n_groups + 1, dtype=torch.long, device=mask.device)
    return counts.scatter_add_(1, slot, torch.ones_like(slot))[:, :n_groups]


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """Share `budget` over groups proportionally to `sizes` (largest remainder, ties to earlier groups)."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [budget * s / total for s in sizes]
    shares = [int(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: budget - sum(shares)]:
        shares[i] += 1
    return shares
