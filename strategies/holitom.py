"""HoliTom: global temporal segmentation and merging before the language model, token merging inside it.

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (2025),
arXiv:2505.21334, https://arxiv.org/abs/2505.21334 (reference: github.com/cokeshao/HoliTom).
One config, two stages; the reducer branches on the stage's layer:
- layer 0 (outer-LLM merging): each video is split into the windows of frames that, over the whole
  video, let the most tokens be merged (a dynamic programme: a window of W frames saves W - 1 tokens
  per cell whose consecutive frames all stay above cosine `tau`); each such static cell merges into one
  token (its mean over time), then the static tokens of each window and the dynamic ones of each frame
  are clustered by density peaks (DPC-KNN) and each cluster merged into its centre (a plain mean);
- layer K > 0 (inner-LLM merging, the reference's layer 18 of 28 with r = 0.5): the visual tokens the
  last token attends to most at layer K-1 (head-averaged, FastV's score) are kept, and each other one
  merges into the kept token whose hidden state is most similar (cosine).
`configs/holitom-video-llava.yaml` is the paper's setting.

Budgets: each stage keeps exactly its `keep`/`ratio` budget (the reference: `RETAIN_RATIO` outside,
`round(n * (1 - r))` inside). Static cells merge most similar first while the budget allows; the budget
is shared over the clusters of each window's static tokens and each frame's dynamic ones in proportion
to their sizes (largest remainder), as the reference's retain ratio rescaled after static merging.

Deviations from the reference: the DPC-KNN neighbourhood is the group's cluster count (the shared
`density_peaks`), the reference's 7; ties in density go to the earlier token; the reference's
attention-weighted dominant tokens of dynamic frames (`D`, 0 by default) and its `Beta` mix (off by
default) are not offered; inside the language model a kept token becomes the size-weighted mean of
itself and the tokens that join it, where the reference averages it pairwise with each in turn.
`requires` stays empty so that the layer-0 stage is accepted (see `prunevid`).
Positions: `renumbered` (the reference feeds the merged sequence to the language model); its inner
stage keeps that sequence's positions, set `positions: original` on that stage.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenprune.strategies.prunevid import (
    VideoSizes,
    capped_merges,
    cell_keys,
    cluster_merge,
    frame_table,
    latest_starts,
    refuse_per_frame_budget,
    video_sizes,
)
from torch import Tensor

from tokenprune.contracts.reducer import Merge, PositionPolicy, Reducer, Site, TokenView, top_k_mask


class HoliTomParams(BaseModel):
    """`tau` (0.8) and `proportional_attention` (False): the reference's defaults."""

    model_config = ConfigDict(extra="forbid")

    tau: float = Field(0.8, ge=-1.0, le=1.0, description="cosine to the previous frame to stay static")
    proportional_attention: bool = Field(False, description="add log(size) to merged keys (reference: no)")


def previous_in_time(view: TokenView, sizes: VideoSizes) -> Tensor:
    """[B, L] long: the slot of the same (segment, row, col) candidate one frame earlier, -1 if none."""
    t, row, column = view.coords.clamp(min=0).unbind(-1)
    key = ((view.segment.clamp(min=0) * sizes.rows + row) * sizes.columns + column) * sizes.steps + t
    spare = sizes.videos * sizes.rows * sizes.columns * sizes.steps
    table = torch.full((key.shape[0], spare + 1), -1, dtype=torch.long, device=key.device)
    slots = torch.arange(key.shape[1], device=key.device).expand_as(key)
    own = key.masked_fill(~view.candidates, spare)
    table = table.scatter(1, own, slots.masked_fill(~view.candidates, -1))
    return table.gather(1, (key - 1).masked_fill(~view.candidates | (t == 0), spare))


def window_starts(view: TokenView, similar: Tensor, previous: Tensor, sizes: VideoSizes) -> Tensor:
    """[B, F] bool: the frames starting a window of the segmentation that saves the most tokens.

    similar [B, L]: a candidate stays above `tau` against `previous` [B, L], its slot one frame earlier.
    Per video, the best split of its frames 0..T-1 into windows maximises the sum over windows [s, e] of
    (e - s) x (cells whose frames s..e all stay); ties go to the shorter last window (the reference).
    """
    _, video, t, _ = frame_table(view, sizes.frames)
    stays = similar & (previous >= 0)
    streak = stays.long()
    for _ in range(sizes.steps):  # frames a cell has stayed up to a candidate's own: one more per round
        streak = torch.where(stays, 1 + streak.gather(1, previous.clamp(min=0)) * stays, 0)
    run_start = (view.coords[..., 0] - streak).clamp(min=0)
    frame = view.frame.masked_fill(~view.candidates, sizes.frames).clamp(min=0)
    counts = torch.zeros(video.shape[0], (sizes.frames + 1) * sizes.steps, dtype=torch.long, device=t.device)
    counts.scatter_add_(1, frame * sizes.steps + run_start, view.candidates.long())
    staying = counts.view(video.shape[0], -1, sizes.steps)[:, : sizes.frames].cumsum(dim=-1)
    begin = torch.arange(sizes.steps, device=t.device)
    gain = (t[..., None] - begin).clamp(min=0) * staying  # [B, f, s]: window [s, t_f] of f's video
    return best_windows(video, t, gain, sizes.videos)


def best_windows(video: Tensor, t: Tensor, gain: Tensor, videos: int) -> Tensor:
    """[B, F] bool: window starts of the best segmentation of each video (dynamic programme over time).

    video, t [B, F]; gain [B, F, S]: what a window from time s to frame f of f's video saves.
    """
    batch, frames, steps = gain.shape
    spare = videos * steps
    at = torch.full((batch, spare + 1), frames, dtype=torch.long, device=video.device)
    cell = (video * steps + t).masked_fill(video < 0, spare)
    at = at.scatter(1, cell, torch.arange(frames, device=video.device).expand_as(cell))[:, :spare]
    padded = torch.cat([gain, gain.new_zeros(batch, 1, steps)], dim=1)
    table = padded.gather(1, at[..., None].expand(-1, -1, steps)).view(batch, videos, steps, steps)
    best = torch.zeros(batch, videos, steps + 1, dtype=torch.float64, device=video.device)
    chosen = torch.zeros(batch, videos, steps, dtype=torch.long, device=video.device)
    for end in range(steps):  # best[e + 1]: the most frames 0..e can save
        windows = (best[..., :end] + table[:, :, end, :end]).flip(-1)  # starts end - 1, ..., 0
        best[..., end + 1], choice = torch.cat([best[..., end : end + 1], windows], dim=-1).max(dim=-1)
        chosen[..., end] = end - choice
    length = torch.zeros(batch, videos, dtype=torch.long, device=video.device)
    length = length.scatter_reduce(1, video.clamp(min=0), (t + 1).masked_fill(video < 0, 0), "amax")
    cursor, starts = length - 1, torch.zeros_like(chosen)
    for _ in range(steps):  # back from each video's last frame, one window per round
        live = cursor >= 0
        begin = chosen.gather(2, cursor.clamp(min=0)[..., None]).squeeze(-1)
        starts.scatter_add_(2, begin.clamp(min=0)[..., None], live.long()[..., None])
        cursor = torch.where(live, begin - 1, -1)
    flat = starts.view(batch, -1).gather(1, video.clamp(min=0) * steps + t.clamp(min=0))
    return (flat > 0) & (video >= 0)


def static_windows(view: TokenView, tau: float, sizes: VideoSizes) -> Tensor:
    """[B, L] long: each candidate of a static cell of its window -> its representative's slot (else -1)."""
    previous = previous_in_time(view, sizes)
    unit = torch.nn.functional.normalize(view.features(), dim=-1)
    cosine = (unit * unit.gather(1, previous.clamp(min=0)[..., None].expand_as(unit))).sum(-1)
    similar = (cosine > tau) & (previous >= 0)
    _, video, t, _ = frame_table(view, sizes.frames)
    starts = latest_starts(video, t, window_starts(view, similar, previous, sizes))
    cell, first = cell_keys(view, starts, sizes)
    spare = cell.shape[1]
    slot = cell.masked_fill((cell < 0) | first | (previous < 0), spare)  # the cell's later frames
    weakest = torch.ones(cell.shape[0], spare + 1, device=cell.device)
    weakest = weakest.scatter_reduce(1, slot, cosine, "amin")[:, :spare]
    return capped_merges(view, cell, first, weakest, weakest > tau)


class HoliTom(Reducer):
    """Global temporal merging and spatial clustering before the language model, similarity merging in it."""

    Params: ClassVar[type[BaseModel]] = HoliTomParams
    merges: ClassVar[bool] = True
    sites: ClassVar[frozenset[Site]] = frozenset({"language"})
    positions: ClassVar[PositionPolicy] = "renumbered"

    def select(self, view: TokenView) -> Merge:
        if view.layer > 0:
            return self.merge_inside(view)
        refuse_per_frame_budget(view, "holitom")
        sizes = video_sizes(view)
        temporal = static_windows(view, self.params.tau, sizes)
        return cluster_merge(view, temporal, self.params.proportional_attention, sizes.frames)

    def merge_inside(self, view: TokenView) -> Merge:
        """The most attended candidates kept; each other one joins its most similar kept candidate."""
        budget, groups = view.quota()
        keep = top_k_mask(view.signals.attention("last"), view.candidates, budget, groups)
        unit = torch.nn.functional.normalize(view.features(), dim=-1)
        allowed = keep[:, None, :] & (groups[:, :, None] == groups[:, None, :])
        best, match = (unit @ unit.transpose(1, 2)).masked_fill(~allowed, float("-inf")).max(dim=-1)
        into = torch.where(view.candidates & ~keep & (best > float("-inf")), match, -1)
        return Merge(keep, into, proportional_attention=self.params.proportional_attention)
