"""VidCom2: more of the budget to distinctive frames, then each frame's most distinctive tokens.

Liu et al., "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large
Language Models" (EMNLP 2025), arXiv:2505.14454; reference code github.com/xuyang-liu16/VidCom2
(`llava/model/vidcom2.py`). Before the language model (`layer: 0`), on the projector outputs, per
video (segment):

1. keep the half of the channels (`channel_ratio`) varying least over the video's tokens, and
   L2-normalise each token on them;
2. a token's similarity to a centre c is sum over a in {1/8, 1/4, 1/2, 1, 2} of exp(-|x - c|^2 / 2a),
   to the video's centre (v) and to its frame's centre (f);
3. frame budgets: frame t's scale is 1 + p_t - mean(p), p = softmax over the video's frames of
   -mean(v) / `temperature` (0.01): frames unlike the video get more;
4. in each frame, the tokens with the lowest v + f (least like their video and frame) are kept.

Deviations: the reference keeps round(base * scale_t * tokens_per_frame) per frame (at least 1, at most
all), so its total drifts from base; here the sample's budget is met exactly by sharing it over all its
frames in proportion to tokens_per_frame * scale_t (Sainte-Lague: a frame's j-th kept token has
priority (j + 1/2) / weight, the budget's smallest priorities win, never more than a frame holds).
Several videos and images in a sample share the budget in proportion to their tokens; an image is a
one-frame video (scale 1: its least typical tokens). With `budget: per_frame` the frames' shares are
given, and only step 4 applies. Positions: `renumbered` (the reference feeds a shorter sequence).
Batched, with no host reads.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.contracts.reducer import PositionPolicy, Reducer, Site, TokenView, top_k_mask
from tokenprune.core.frames import (
    frame_groups,
    group_extreme,
    group_mean,
    group_sum,
    rank_within,
    video_groups,
)

KERNEL_WIDTHS = tuple(2.0**k for k in range(-3, 2))  # the reference's Gaussian scales a


class VidCom2Params(BaseModel):
    """`temperature` of the frame softmax (0.01) and `channel_ratio`, the share of channels kept (0.5)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.01, gt=0, description="softmax temperature of the frame budgets")
    channel_ratio: float = Field(0.5, gt=0, le=1, description="share of least-varying channels compared")


def low_variance_channels(features: Tensor, videos: Tensor, ratio: float) -> Tensor:
    """[B, L, D] float32: each token on its video's `ratio` least-varying channels (others 0), unit norm."""
    mean = group_mean(features, videos)
    variance = group_mean((features - mean).square(), videos)
    kept = int(features.shape[-1] * ratio)
    chosen = torch.topk(variance, kept, dim=-1, largest=False).indices
    mask = torch.zeros_like(features).scatter_(-1, chosen, 1.0)
    return torch.nn.functional.normalize(features * mask, dim=-1)


def kernel_similarity(tokens: Tensor, centre: Tensor) -> Tensor:
    """[B, L]: sum over the reference's widths a of exp(-|x - c|^2 / 2a), tokens [B, L, D] to centres."""
    distance = (tokens - centre).square().sum(dim=-1)
    return sum(torch.exp(-distance / (2 * width)) for width in KERNEL_WIDTHS)


def frame_weights(video_similarity: Tensor, frames: Tensor, videos: Tensor, temperature: float) -> Tensor:
    """[B, L]: at each token, its frame's share weight tokens_per_frame * (1 + p_t - mean p) (see module)."""
    ones = torch.ones_like(video_similarity)[..., None]
    frame_size = group_sum(ones, frames)[..., 0]
    distinct = -group_mean(video_similarity[..., None], frames)[..., 0]  # the frame's -mean(v)
    logits = (distinct - group_extreme(distinct, videos, "amax")) / temperature
    per_token = torch.exp(logits) / frame_size.clamp(min=1)  # a frame's exp counted once over its tokens
    p = torch.exp(logits) / group_sum(per_token[..., None], videos)[..., 0].clamp(min=1e-30)
    n_frames = group_sum((1 / frame_size.clamp(min=1))[..., None], videos)[..., 0]
    return frame_size * (1 + p - 1 / n_frames.clamp(min=1))


class VidCom2(Reducer):
    """Frame budgets by distinctiveness, then each frame's least typical tokens (VidCom2)."""

    Params: ClassVar[type[BaseModel]] = VidCom2Params
    sites: ClassVar[frozenset[Site]] = frozenset({"language"})
    positions: ClassVar[PositionPolicy] = "renumbered"  # the reference feeds a shorter sequence

    def select(self, view: TokenView) -> Tensor:
        frames, videos = frame_groups(view), video_groups(view)
        tokens = low_variance_channels(view.features(), videos, self.params.channel_ratio)
        video_similarity = kernel_similarity(tokens, group_mean(tokens, videos))
        typical = video_similarity + kernel_similarity(tokens, group_mean(tokens, frames))
        if view.frame_budget is not None:
            return top_k_mask(-typical, view.candidates, *view.quota())
        weight = frame_weights(video_similarity, frames, videos, self.params.temperature)
        priority = (rank_within(-typical, frames) + 0.5) / weight
        return top_k_mask(-priority, view.candidates, view.budget)
