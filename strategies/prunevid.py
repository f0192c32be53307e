"""PruneVid: merge static tokens across time and cluster in space, then prune with the question's attention.

Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language Models" (ACL 2025),
arXiv:2412.16117, https://arxiv.org/abs/2412.16117 (reference: github.com/Visual-AI/PruneVid).
One config, two stages; the reducer branches on the stage's layer:
- layer 0 (before the language model): each video is cut into temporal segments (about
  `segment_ratio` x T of them); within a segment, a cell (row, col) whose tokens stay similar over the
  segment's frames (mean pairwise cosine > `tau`) is static and its tokens merge into one (their mean
  over time); then the static tokens of each segment and the dynamic tokens of each frame are
  clustered by density peaks (DPC-KNN) and each cluster merged into its centre (a plain mean);
- layer K > 0 (inside it, the reference's layer 10 with `positions: original`): the visual tokens are
  ranked by the attention the question (the text after the last visual token) pays them at layer K-1,
  averaged over heads and question tokens, and the best kept.
`configs/prunevid-video-llava.yaml` is the paper's setting.

Budgets: each stage keeps exactly its `keep`/`ratio` budget, where the reference's count follows from
`tau`, `cluster_ratio` and `alpha`. Static cells merge most-similar first while the budget allows; the
budget is shared over the clusters of each group (a segment's static tokens, a frame's dynamic ones) in
proportion to their sizes (largest remainder), `cluster_ratio` x the group's tokens in the reference.

Deviations from the reference: temporal segments are cut at the lowest similarities between
consecutive frame means (the reference clusters frame means by DPC-KNN and keeps each cluster's longest
run); the DPC-KNN neighbourhood is the group's cluster count (the shared `density_peaks`), the
reference's is 7, and it clusters only groups of more than 14 tokens; ties in density go to the earlier
token (the reference adds noise); the question's attention is averaged over heads and question tokens
(the reference takes the maximum of both) and ranked per sample (the reference keeps `alpha` per static
set and per frame); the reference prunes the cache of the layers before K too, here they keep every
token. `requires` stays empty so that the layer-0 stage is accepted: the layer-K stage reads layer K-1's
attention (refused with `SignalUnavailable` where a site has none; not checked against sliding-window
layers at attach time, as declared signals are). Positions: `renumbered` (the reference feeds the
merged sequence to the language model); its second stage keeps the merged sequence's positions, set
`positions: original` on that stage. Batched; one host read per layer-0 selection (the table sizes).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenprune.strategies.cdpruner import instruction_tokens
from tokenprune.strategies.sparsevlm import density_peaks
from torch import Tensor

from tokenprune.contracts.reducer import (
    Merge,
    PositionPolicy,
    Reducer,
    Site,
    TokenView,
    proportional_shares,
    top_k_mask,
)
from tokenprune.core.merging import merge_average
from tokenprune.errors import StrategyError


class PruneVidParams(BaseModel):
    """`tau` (0.8), `segment_ratio` (0.25), `proportional_attention` (False): the paper's defaults."""

    model_config = ConfigDict(extra="forbid")

    tau: float = Field(
        0.8, ge=-1.0, le=1.0, description="mean cosine over a segment above which a cell is static"
    )
    segment_ratio: float = Field(0.25, gt=0.0, le=1.0, description="temporal segments per frame of a video")
    proportional_attention: bool = Field(
        False, description="add log(size) to merged keys (the reference: no)"
    )


class VideoSizes(NamedTuple):
    """Bounds of a view's indices: frames and videos per sample, and the largest (T, H, W) grid."""

    frames: int
    videos: int
    steps: int
    rows: int
    columns: int


def video_sizes(view: TokenView) -> VideoSizes:
    """The sizes every table of a selection is built with: its one host read."""
    bounds = torch.stack([view.frame.max() + 1, view.segment.max() + 1, *view.extent.amax(dim=(0, 1))])
    return VideoSizes(*bounds.clamp(min=1).tolist())


def frame_table(view: TokenView, frames: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per frame of each sample: (mean features of its candidates [B, F, D], video, t, T [B, F]).

    A frame is a `view.frame` unit (one (segment, t) pair); video is its segment, -1 for absent frames.
    """
    slot = view.frame.masked_fill(~view.candidates, frames).clamp(min=0)
    features = view.features()
    total = features.new_zeros(features.shape[0], frames + 1, features.shape[-1])
    total.scatter_add_(1, slot[..., None].expand_as(features), features)
    count = torch.zeros_like(total[..., 0]).scatter_add_(1, slot, torch.ones_like(slot, dtype=total.dtype))

    def per_frame(values: Tensor) -> Tensor:
        table = torch.full_like(count, -1, dtype=torch.long)
        return table.scatter(1, slot, values)[:, :frames]

    video = per_frame(view.segment).masked_fill(count[:, :frames] == 0, -1)
    mean = total[:, :frames] / count[:, :frames, None].clamp(min=1)
    return mean, video, per_frame(view.coords[..., 0]), per_frame(view.extent[..., 0])


def segment_starts(view: TokenView, segment_ratio: float, sizes: VideoSizes) -> Tensor:
    """[B, F] long: the frame starting each frame's temporal segment (-1 for absent frames).

    A video of T frames gets max(1, int(T * segment_ratio)) segments, cut before the frames least
    similar (cosine of frame means) to their previous frame; its first frame always starts one.
    """
    mean, video, t, extent = frame_table(view, sizes.frames)
    present = video >= 0
    same_video = (video[:, :, None] == video[:, None, :]) & present[:, :, None] & present[:, None, :]
    previous = same_video & (t[:, None, :] == t[:, :, None] - 1)  # [B, f, g]: g is f's previous frame
    unit = torch.nn.functional.normalize(mean, dim=-1)
    similarity = ((unit @ unit.transpose(1, 2)) * previous).sum(-1)
    has_previous = previous.any(-1)
    cuts = (extent.double() * segment_ratio).long().clamp(min=1) - 1
    budget = torch.zeros(video.shape[0], sizes.videos + 1, dtype=torch.long, device=video.device)
    budget = budget.scatter(1, video.masked_fill(~present, sizes.videos), cuts)[:, : sizes.videos]
    cut = top_k_mask(-similarity, has_previous, budget, video.masked_fill(~present, -1))
    return latest_starts(video, t, present & (cut | ~has_previous))


def latest_starts(video: Tensor, t: Tensor, start: Tensor) -> Tensor:
    """[B, F] long: for each frame, the latest frame of its video at or before it that starts a segment
    (`start` [B, F] bool; video, t [B, F] from `frame_table`); -1 for absent frames."""
    present = video >= 0
    same_video = (video[:, :, None] == video[:, None, :]) & present[:, :, None] & present[:, None, :]
    earlier_start = same_video & start[:, None, :] & (t[:, None, :] <= t[:, :, None])
    latest = torch.where(earlier_start, t[:, None, :], -1).argmax(dim=-1)
    return latest.masked_fill(~present, -1)


def cell_keys(view: TokenView, starts: Tensor, sizes: VideoSizes) -> tuple[Tensor, Tensor]:
    """(cell [B, L], first [B, L] bool): the slot of each candidate's representative, the candidate at its
    (row, col) in its segment's first frame (-1: none), and whether it is one (its segment starts there)."""
    start = starts.gather(1, view.frame.clamp(min=0))
    first = view.candidates & (start == view.frame)
    _, row, column = view.coords.clamp(min=0).unbind(-1)

    def key(frame: Tensor) -> Tensor:
        return (frame * sizes.rows + row) * sizes.columns + column

    spare = sizes.frames * sizes.rows * sizes.columns
    table = torch.full((start.shape[0], spare + 1), -1, dtype=torch.long, device=start.device)
    slots = torch.arange(start.shape[1], device=start.device).expand_as(start)
    table = table.scatter(1, key(view.frame).masked_fill(~first, spare), slots.masked_fill(~first, -1))
    cell = table.gather(1, key(start.clamp(min=0)).masked_fill(~view.candidates, spare))
    return cell, first


def static_merges(view: TokenView, tau: float, segment_ratio: float, sizes: VideoSizes) -> Tensor:
    """[B, L] long: for each candidate merged across time, the slot of its cell's representative (else -1).

    A cell of W > 1 candidates is static when their mean pairwise cosine exceeds `tau`.
    """
    cell, first = cell_keys(view, segment_starts(view, segment_ratio, sizes), sizes)
    spare = cell.shape[1]
    slot = cell.masked_fill(cell < 0, spare)
    unit = torch.nn.functional.normalize(view.features(), dim=-1)
    summed = unit.new_zeros(unit.shape[0], spare + 1, unit.shape[-1])
    summed.scatter_add_(1, slot[..., None].expand_as(unit), unit * (cell >= 0)[..., None])
    size = torch.zeros_like(summed[..., 0]).scatter_add_(1, slot, (cell >= 0).to(summed.dtype))
    pairs = (size * (size - 1)).clamp(min=1)
    similarity = ((summed.square().sum(-1) - size) / pairs)[:, :spare]
    return capped_merges(view, cell, first, similarity, similarity > tau)


def capped_merges(view: TokenView, cell: Tensor, first: Tensor, similarity: Tensor, static: Tensor) -> Tensor:
    """[B, L] long: each candidate of a merged static cell -> its representative's slot (else -1).

    cell [B, L] from `cell_keys`; similarity and static [B, L] read at the representatives. Static cells
    of more than one candidate merge most similar first, as long as the tokens left stay at least the
    budget.
    """
    spare = cell.shape[1]
    slot = cell.masked_fill(cell < 0, spare)
    saving = torch.zeros(cell.shape[0], spare + 1, dtype=torch.long, device=cell.device)
    saving = saving.scatter_add_(1, slot, (cell >= 0).long())[:, :spare] - 1
    static = first & static & (saving > 0)
    ranked = similarity.masked_fill(~static, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    spent = (saving * static).gather(1, order).cumsum(dim=1)
    slack = view.candidates.sum(1, keepdim=True) - view.budget[:, None]
    merged = torch.zeros_like(static).scatter(1, order, spent <= slack) & static
    joins = (cell >= 0) & ~first & merged.gather(1, cell.clamp(min=0))
    return cell.masked_fill(~joins, -1)


def spatial_clusters(
    view: TokenView, features: Tensor, members: Tensor, groups: Tensor, n_groups: int
) -> tuple[Tensor, Tensor]:
    """DPC-KNN per group: (centres [B, L] bool, each member's centre's slot [B, L], -1: none in its group)."""
    slot = groups.masked_fill(~members, n_groups).clamp(min=0)
    counts = torch.zeros(groups.shape[0], n_groups + 1, dtype=torch.long, device=groups.device)
    counts = counts.scatter_add_(1, slot, torch.ones_like(slot))[:, :n_groups]
    clusters = proportional_shares(view.budget, counts)
    centres, nearest = density_peaks(features, members, groups.masked_fill(~members, -1), clusters)
    centre = nearest.clamp(min=0)
    found = members & centres.gather(1, centre) & (groups.gather(1, centre) == groups)
    return centres, torch.where(found & ~centres, nearest, -1)


def cluster_merge(view: TokenView, temporal: Tensor, proportional_attention: bool, frames: int) -> Merge:
    """After the static merges `temporal` [B, L], the static tokens of each segment and the dynamic ones
    of each frame clustered in space (DPC-KNN, clusters shared by size); every removed token joins its
    final survivor in one hop, so a survivor is the plain mean of the original tokens it holds."""
    features, _ = merge_average(view.features(), view.token_sizes(), temporal)
    remaining = view.candidates & (temporal < 0)
    received = torch.zeros_like(remaining).scatter(1, temporal.clamp(min=0), temporal >= 0)
    groups = torch.where(received, view.frame + frames, view.frame)  # static sets after the frames
    centres, to_centre = spatial_clusters(view, features, remaining, groups, 2 * frames)
    survivor = torch.where(centres, torch.arange(centres.shape[1], device=centres.device), to_centre)
    joined = survivor.gather(1, temporal.clamp(min=0))
    into = torch.where(temporal >= 0, joined, torch.where(centres, -1, to_centre))
    return Merge(centres, into, proportional_attention=proportional_attention)


def refuse_per_frame_budget(view: TokenView, strategy: str) -> None:
    """A stage merging across frames has no per-frame budget to keep: say so instead of breaking it."""
    if view.frame_budget is not None:
        raise StrategyError(
            f"{strategy} merges tokens across frames before the language model: a per-frame budget does "
            "not apply to that stage; give it a per-sample `ratio` or `keep`"
        )


class PruneVid(Reducer):
    """Static merging and spatial clustering before the language model, question-attention pruning in it."""

    Params: ClassVar[type[BaseModel]] = PruneVidParams
    merges: ClassVar[bool] = True
    sites: ClassVar[frozenset[Site]] = frozenset({"language"})
    positions: ClassVar[PositionPolicy] = "renumbered"

    def select(self, view: TokenView) -> Tensor | Merge:
        if view.layer > 0:
            question = instruction_tokens(view)
            return top_k_mask(
                view.signals.get("attention_from", rows=question), view.candidates, *view.quota()
            )
        refuse_per_frame_budget(view, "prunevid")
        return self.merge_video(view)

    def merge_video(self, view: TokenView) -> Merge:
        """Static cells of PruneVid's segments merged over time, then clustered in space."""
        sizes = video_sizes(view)
        temporal = static_merges(view, self.params.tau, self.params.segment_ratio, sizes)
        return cluster_merge(view, temporal, self.params.proportional_attention, sizes.frames)
