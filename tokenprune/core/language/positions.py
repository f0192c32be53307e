"""The `renumbered` position policy: the surviving sequence numbered as the model would number it.

Positions come as the model's rotary module receives them: 1-D ids [B|1, N] (Llama) or rows of
M-RoPE ids [R, B|1, N] (Qwen2-VL: temporal, height, width). The rule (docs/positions.md):

- 1-D: each sample's real kept tokens are numbered contiguously from the sample's first position;
- M-RoPE: walking the kept tokens in order, a text token takes `next` in every row (then `next` + 1);
  the kept tokens of one visual item take `next + offset`, the offset of each being its (t, h, w)
  offset inside its item's grid in the model's own ids, and the text after the item continues from
  `next` + its largest kept height or width offset + 1, as the model's own rope index advances by
  max(h, w) of the grid (the temporal row does not advance it). An item's grid is each contiguous
  run of its tokens in the original sequence: Qwen3-VL writes a timestamp before each temporal
  patch of a video and numbers every patch as a grid of its own. With nothing removed this is the
  model's own rope index; with tokens removed it is vLLM's EVS rule on the kept grid cells.

Decode steps continue from the shortened sequence: new tokens take the model's own ids less the
sample's `shift` (its largest original id, any row, less its largest renumbered one: the model's
`rope_deltas` count from the largest id too), which each stage's record on the KV cache carries, so
a copy of the cache continues alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokenprune.indexing import gather_tokens

# The attribute of a cache object that holds each renumbering stage's shift (copied along with the cache).
SHIFT_ATTRIBUTE = "_tokenprune_position_shifts"


def as_rows(positions: Tensor, batch: int) -> Tensor:
    """[R, B, N] position ids: 1-D ids [B|1, N] become one row; M-RoPE rows [R, B|1, N] stay as they are."""
    rows = positions if positions.ndim == 3 else positions[None]
    return rows.expand(rows.shape[0], batch, rows.shape[2])


def like_model(rows: Tensor, model_positions: Tensor) -> Tensor:
    """`rows` [R, B, L] in the layout the model used for `model_positions` (1-D ids lose the row axis)."""
    return rows if model_positions.ndim == 3 else rows[0]


def renumbered(positions: Tensor, segment: Tensor, real: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """(positions [R, B, L] of the kept tokens, shift [B]) under the renumbering rule.

    `positions` [R, B, N]: the model's own ids of the whole input; `segment` [B, N]: each token's visual
    item (-1: text); `real` [B, N]: real tokens; `kept` [B, L]: original positions kept, -1 filler.
    Filler slots take the sample's first position.
    """
    grid = positions.shape[0] > 1  # M-RoPE places an item's tokens on its grid; 1-D ids number tokens
    low = positions.amin(0)
    limit = torch.iinfo(positions.dtype).max
    start = low.masked_fill(~real, limit).amin(1)
    end = positions.amax(0).masked_fill(~real, -limit).amax(1)
    valid = kept >= 0
    run = _runs(segment, real)
    item = gather_tokens(run, kept, 1).masked_fill(~valid, -1) if grid else torch.full_like(kept, -1)
    offsets = gather_tokens(_grid_offsets(positions, low, run), kept, -1) * (item >= 0)
    unit = _units(item, valid)
    advancing = offsets[1:] if grid else offsets  # rows that advance the text after an item: h and w
    span = torch.where(valid, advancing.amax(0) + 1, 0)
    extent = torch.zeros_like(span).scatter_reduce(1, unit, span, "amax")
    unit_start = start[:, None] + extent.cumsum(1) - extent
    new = unit_start.gather(1, unit)[None] + offsets
    new = torch.where(valid[None], new, start[None, :, None])
    shift = end - new.masked_fill(~valid[None], -limit).amax(0).amax(1)
    return new, shift


def _runs(segment: Tensor, real: Tensor) -> Tensor:
    """[B, N] each real visual token's run (consecutive tokens of one item), numbered per sample; -1 else."""
    visual = (segment >= 0) & real
    item = segment.masked_fill(~visual, -1)
    previous = torch.cat([torch.full_like(item[:, :1], -1), item[:, :-1]], dim=1)
    begins = visual & (item != previous)
    return torch.where(visual, begins.long().cumsum(1) - 1, -1)


def _grid_offsets(positions: Tensor, low: Tensor, run: Tensor) -> Tensor:
    """[R, B, N] each visual token's offset from its run's origin (the run's smallest id); 0 for text."""
    visual = run >= 0
    limit = torch.iinfo(low.dtype).max
    slot = run.clamp(min=0)
    origin = torch.full_like(low, limit).scatter_reduce(1, slot, low.masked_fill(~visual, limit), "amin")
    return (positions - origin.gather(1, slot)[None]) * visual[None]


def _units(item: Tensor, valid: Tensor) -> Tensor:
    """[B, L] the unit of each token: a text token is one, the consecutive kept tokens of an item one."""
    previous = torch.cat([torch.full_like(item[:, :1], -1), item[:, :-1]], dim=1)
    begins = valid & ((item < 0) | (item != previous))
    return (begins.long().cumsum(1) - 1).clamp(min=0)


def continued(positions: Tensor, shift: Tensor) -> Tensor:
    """The model's own ids of new tokens, [B|1, q] or [R, B|1, q], less each sample's `shift` [B]."""
    shift = shift.to(positions.device)
    return positions - (shift[:, None] if positions.ndim == 2 else shift[None, :, None])


def remember_shift(cache: Any, layer: int, shift: Tensor | None, first: bool) -> None:
    """Record on `cache` the shift from which decode positions of the layers from `layer` on continue."""
    if cache is None:
        return
    shifts = {} if first else getattr(cache, SHIFT_ATTRIBUTE, {})
    if shift is not None:
        shifts[layer] = shift
    setattr(cache, SHIFT_ATTRIBUTE, shifts)


def shift_of(cache: Any, layer: int) -> Tensor | None:
    """The shift the stage at `layer` recorded on `cache`, or None (original positions)."""
    return getattr(cache, SHIFT_ATTRIBUTE, {}).get(layer)
