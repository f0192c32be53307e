"""FEATHER: attention ranking without RoPE's distance decay, united with a uniform grid.

Endo et al., "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model
Acceleration" (ICCV 2025), arXiv:2412.13180. FastV-style scores favour the bottom of the image
because RoPE decays attention with distance from the last token; FEATHER scores with the last
token's query and layer K-1's projections *without* the rotary embedding, softmax over the visual
keys only, averaged over heads, and at its first stage also keeps a uniform grid (every 3rd row and
column) so that every region stays covered. The released script prunes twice: at layer 8 the top
floor((1 - R) N) tokens united with the grid, at layer 16 floor((1 - R)^2 N1) of the survivors by the
same score, R = 0.7 (`configs/feather-llava.yaml`).

A composition of two reducers: the `uniform` strategy lays the grid, a score reducer ranks.

Budget: exact, where the paper's union varies with the overlap. At a grid stage the grid is kept
first, then the best-scoring other tokens fill the budget: the union of the grid with the top tokens
outside it, the paper's union when the budget is the grid plus its top-k count outside the grid. A
budget smaller than the grid keeps the best-scoring grid cells.

Parameters (defaults are the paper's):
- `stride` (3): the grid has as many cells per frame as every `stride`-th row and column; it is the
  `uniform` strategy's evenly spread lattice (exactly every `stride`-th row and column, centred,
  when the side is a multiple of `stride`).
- `grid_layers` (None): the sites whose selection includes the grid. None: the first site that
  removes tokens of a sample (the paper's first stage), recognised by the sample still being whole.
- `rope` (False): score without the rotary embedding (True gives FastV's scores, for ablations).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenprune.strategies.uniform import UniformGrid, dense_groups
from torch import Tensor

from tokenprune.contracts.reducer import Reducer, ScoreReducer, TokenView, group_counts, top_k_mask


class FeatherParams(BaseModel):
    """`stride` (3), `grid_layers` (None: the first reducing site), `rope` (False)."""

    model_config = ConfigDict(extra="forbid")

    stride: int = Field(3, ge=1, description="grid: as many cells as every stride-th row and column")
    grid_layers: list[int] | None = Field(
        None, description="sites that also keep the grid; None: the first site that removes tokens"
    )
    rope: bool = Field(False, description="score with the rotary embedding (FastV) instead of without")


def whole(positions: Tensor, valid: Tensor) -> Tensor:
    """Bool [B]: rows whose real tokens are still every position of their span (nothing removed yet)."""
    count = valid.sum(dim=1)
    first = positions.masked_fill(~valid, positions.shape[1] * 2**20).amin(dim=1)
    last = positions.masked_fill(~valid, -1).amax(dim=1)
    return last - first + 1 == count


def grid_quota(frames: Tensor, extent: Tensor, stride: int) -> Tensor:
    """[B, F] long: cells per frame of a grid on every `stride`-th row and column, capped by its tokens.

    `frames` [B, L]: each candidate's frame numbered densely from 0 (-1 otherwise), so F = L columns
    hold them all (the unused ones 0, with no host read); `extent` [B, L, 3]: its (T, H, W). A frame
    of H x W tokens gets ceil(H / s) * ceil(W / s) cells.
    """
    n_frames = frames.shape[1]
    cells = (extent[..., 1] + stride - 1) // stride * ((extent[..., 2] + stride - 1) // stride)
    slot = frames.masked_fill(frames < 0, n_frames)
    per_frame = torch.zeros(frames.shape[0], n_frames + 1, dtype=torch.long, device=frames.device)
    per_frame.scatter_reduce_(1, slot, cells, "amax")
    return torch.minimum(per_frame[:, :n_frames], group_counts(frames >= 0, frames, n_frames))


def grid_first(scores: Tensor, grid: Tensor, candidates: Tensor, budget: Tensor, groups: Tensor) -> Tensor:
    """Bool [B, L]: the grid cells of each group (its best-scoring ones if the budget is smaller), then
    the best-scoring other candidates up to `budget` [B, G] per group (`groups` [B, L]).
    """
    n_groups = budget.shape[1]
    first = top_k_mask(
        scores, grid & candidates, torch.minimum(group_counts(grid, groups, n_groups), budget), groups
    )
    rest = budget - group_counts(first, groups, n_groups)
    return first | top_k_mask(scores, candidates & ~first, rest, groups)


class FeatherScore(ScoreReducer):
    """The last token's attention at layer K-1 without RoPE, softmax over the visual keys only."""

    Params: ClassVar[type[BaseModel]] = FeatherParams
    requires: ClassVar[frozenset[str]] = frozenset({"attention"})
    sites: ClassVar[frozenset[str]] = frozenset({"language"})  # signals of a language model

    def score(self, view: TokenView) -> Tensor:
        return view.signals.get("attention", query="last", rope=self.params.rope, over="visual")


class Feather(Reducer):
    """RoPE-free attention ranking united with a uniform grid at the first stage (FEATHER)."""

    positions: ClassVar[str] = "original"  # the position policy of the paper's reference code

    Params: ClassVar[type[BaseModel]] = FeatherParams
    requires: ClassVar[frozenset[str]] = frozenset({"attention"})
    sites: ClassVar[frozenset[str]] = frozenset({"language"})  # signals of a language model

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self.ranker = FeatherScore(self.params)
        self.grid = UniformGrid()

    def select(self, view: TokenView) -> Tensor:
        budget, groups = view.quota()
        layers = self.params.grid_layers
        with_grid = (
            whole(view.positions, view.valid)
            if layers is None
            else torch.full_like(view.budget, view.layer in layers, dtype=torch.bool)
        )
        grid = self.grid.select(self._grid_view(view)) & with_grid[:, None]
        return grid_first(self.ranker.score(view), grid, view.candidates, budget, groups)

    def _grid_view(self, view: TokenView) -> TokenView:
        """The view with a per-frame budget of grid cells: what the uniform reducer lays out."""
        frames = dense_groups(view.segment if view.frame is None else view.frame, view.candidates)
        cells = grid_quota(frames, view.extent, self.params.stride)
        return dataclasses.replace(  # new frames and budgets: the core's bounds no longer hold
            view, frame=frames, budget=cells.sum(dim=1), frame_budget=cells, frame_size=None, max_budget=None
        )
