"""EVS: keep each video's first frame, then the tokens that changed most since the previous frame.

Bagrov et al., "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM
Inference", arXiv:2510.14624, as served by vLLM (`vllm/multimodal/evs.py`: `compute_retention_mask`).
Before the language model (`layer: 0`), on the projector outputs: a token's dissimilarity is
1 - cosine to the token at the same grid cell of the previous frame of its video; every token of a
video's first frame ranks first (vLLM gives them 255), then one ranking over all the sample's tokens
keeps the most dissimilar (stable: ties to the earlier token). The pruning rate q is the config's
`ratio`. An image is a first frame: kept whole, as vLLM leaves images unpruned.

Deviations: vLLM keeps `max(tokens_per_frame, int(n (1 - q)))` per video; here the config's budget
(`round(n (1 - ratio))` per sample, all videos together) is met exactly. A budget below the first
frames' tokens (images, a high ratio, `budget: per_frame`) cannot keep them all: first-frame tokens are
then ranked among themselves by 1 - cosine to their frame's mean token (a first frame has no previous
frame; the same criterion within the frame keeps its least redundant tokens). A token whose previous-frame
cell an earlier stage removed counts as fully changed (dissimilarity 2).
Positions: `renumbered`, vLLM's rule (kept tokens keep their grid cell, the text continues after them;
docs/positions.md). Batched, with no host reads.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.nn.functional import cosine_similarity

from tokenprune.contracts.reducer import PositionPolicy, Reducer, Site, TokenView, top_k_mask
from tokenprune.core.frames import frame_groups, group_mean, previous_frame_slots

FIRST_FRAME = 3.0  # first-frame scores start above any dissimilarity (vLLM: 255)
VANISHED = 2.0  # the largest cosine dissimilarity: a cell an earlier stage removed counts as all new


def dissimilarity(view: TokenView) -> Tensor:
    """[B, L] float32: 1 - cosine to the same cell one frame earlier; in first frames (and images) 3 plus
    1 - cosine to the frame's mean token, so they rank first and, among themselves, least redundant first."""
    features = view.features()
    previous = previous_frame_slots(view)
    before = features.gather(1, previous.clamp(min=0)[..., None].expand_as(features))
    change = torch.where(previous >= 0, 1 - cosine_similarity(features, before, dim=-1), VANISHED)
    own_frame = 1 - cosine_similarity(features, group_mean(features, frame_groups(view)), dim=-1)
    first = view.candidates & (view.coords[..., 0] == 0)
    return torch.where(first, FIRST_FRAME + own_frame, change)


class EVS(Reducer):
    """Efficient Video Sampling: first frames whole, then the tokens most changed since the previous frame."""

    sites: ClassVar[frozenset[Site]] = frozenset({"language"})
    positions: ClassVar[PositionPolicy] = "renumbered"  # vLLM: the grid cells kept, the sequence shortened

    def select(self, view: TokenView) -> Tensor:
        return top_k_mask(dissimilarity(view), view.candidates, *view.quota())
