"""VidCom2's defining property on crafted frame sequences (distinctive frames get more of the budget, each
frame keeps its least typical tokens), against the reference's formulas written out, and exactness."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.strategies.vidcom2 import VidCom2
from video_cases import (
    VideoStrategyCases,
    video_view,
)

import tokenprune as tp


def reference(video: torch.Tensor, base: float) -> tuple[list[int], torch.Tensor]:
    """The reference code's per-frame counts round(base * scale * n) (>= 1) and token scores v + f [T, n],
    written out for one video [T, H, W, D] (float64)."""
    t, n = video.shape[0], video.shape[1] * video.shape[2]
    x = video.reshape(t * n, -1).double()
    channels = torch.topk(x.var(dim=0, unbiased=False), x.shape[1] // 2, largest=False).indices
    frames = torch.nn.functional.normalize(x[:, channels], dim=-1).view(t, n, -1)

    def kernel(centre: torch.Tensor) -> torch.Tensor:
        distance = ((frames - centre) ** 2).sum(-1)
        return sum(torch.exp(-distance / (2 * 2.0**k)) for k in range(-3, 2))

    v, f = kernel(frames.mean(dim=(0, 1), keepdim=True)), kernel(frames.mean(dim=1, keepdim=True))
    score = -v.mean(dim=-1)
    p = torch.softmax((score - score.max()) / 0.01, dim=0)
    scales = (base * (1 + p - p.mean())).clamp(max=1.0)
    return (scales * n).round().long().clamp(min=1).tolist(), v + f


def per_frame(keep: torch.Tensor, t: int) -> list[int]:
    """Kept tokens of each frame of a video laid out by `video_view` (one sample)."""
    return keep[0, 2:-2].view(t, -1).sum(-1).tolist()


def test_a_distinctive_frame_gets_more_of_the_budget():
    gen = torch.Generator().manual_seed(0)
    scene = torch.randn(1, 4, 4, 16, generator=gen)
    video = scene + 0.05 * torch.randn(6, 4, 4, 16, generator=gen)
    video[4] = torch.randn(4, 4, 16, generator=gen)  # a cut-away frame
    keep = VidCom2().select(video_view([video], [24]))
    counts = per_frame(keep, 6)
    assert sum(counts) == 24
    assert counts[4] > max(counts[:4] + counts[5:])


@given(seed=st.integers(0, 10_000), frames=st.integers(2, 6), base=st.sampled_from([0.25, 0.4]))
def test_counts_and_tokens_follow_the_reference(seed, frames, base):
    """At the reference's own total, each frame keeps the reference's count (within one: rounding versus
    exact sharing) and, within a frame, the tokens with the lowest v + f."""
    video = torch.randn(frames, 3, 4, 16, generator=torch.Generator().manual_seed(seed))
    counts, scores = reference(video, base)
    keep = VidCom2().select(video_view([video], [sum(counts)]))
    got = per_frame(keep, frames)
    assert sum(got) == sum(counts)
    assert all(abs(a - b) <= 1 for a, b in zip(got, counts, strict=True))
    for t, k in enumerate(got):
        kept = set(keep[0, 2:-2].view(frames, -1)[t].nonzero().squeeze(1).tolist())
        assert kept == set(torch.topk(scores[t], k, largest=False).indices.tolist())


def test_per_frame_budgets_keep_each_frames_least_typical_tokens():
    video = torch.randn(3, 3, 3, 16, generator=torch.Generator().manual_seed(4))
    _, scores = reference(video, 0.5)
    keep = VidCom2().select(video_view([video], [9], frame_budget=[[2, 3, 4]]))
    for t, k in enumerate([2, 3, 4]):
        kept = set(keep[0, 2:-2].view(3, -1)[t].nonzero().squeeze(1).tolist())
        assert kept == set(torch.topk(scores[t], k, largest=False).indices.tolist())


def test_a_batch_equals_each_sample_alone():
    gen = torch.Generator().manual_seed(5)
    videos = [torch.randn(4, 3, 3, 8, generator=gen) for _ in range(3)]
    batched = VidCom2().select(video_view(videos, [7, 12, 20]))
    for b, (video, budget) in enumerate(zip(videos, [7, 12, 20], strict=True)):
        assert torch.equal(batched[b], VidCom2().select(video_view([video], [budget]))[0])


class TestVidCom2(VideoStrategyCases):
    """VidCom2 passes what every layer-0 video strategy passes."""

    strategy = "vidcom2"
    reducer = VidCom2
    qwen_configs = (tp.ReductionConfig(strategy="vidcom2", layer=0, ratio=0.6),)
