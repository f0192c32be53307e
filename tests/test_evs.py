"""EVS's defining property on crafted frame sequences (vLLM's retention rule), and exactness end to end."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.strategies.evs import EVS
from video_cases import (
    VideoStrategyCases,
    kept_cells,
    video_view,
)

import tokenprune as tp


def vllm_retention(video: torch.Tensor, kept: int) -> set[tuple[int, int, int]]:
    """vLLM's `compute_retention_mask` written out naively: frame 0 scores 255, a later cell 1 - cosine to
    the same cell one frame earlier; the `kept` best cells of a stable descending order."""
    t, h, w, _ = video.shape
    cells = [(i, r, c) for i in range(t) for r in range(h) for c in range(w)]

    def score(cell: tuple[int, int, int]) -> float:
        i, r, c = cell
        if i == 0:
            return 255.0
        return 1 - float(torch.nn.functional.cosine_similarity(video[i, r, c], video[i - 1, r, c], dim=0))

    return set(sorted(cells, key=lambda cell: -score(cell))[:kept])


def static_video_with_changes(changed: list[tuple[int, int, int]], seed: int = 0) -> torch.Tensor:
    """A 4 x 3 x 3 video whose frames repeat the previous one except at the `changed` cells (new vectors)."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(1, 3, 3, 16, generator=gen).repeat(4, 1, 1, 1)
    for t, r, c in sorted(changed):
        video[t:, r, c] = torch.randn(16, generator=gen)  # the change persists in later frames
    return video


def test_keeps_the_whole_first_frame_and_exactly_the_changed_cells():
    changed = [(1, 0, 2), (2, 1, 1), (3, 2, 0), (3, 0, 0)]
    view = video_view([static_video_with_changes(changed)], [9 + len(changed)])
    keep = EVS().select(view)
    first = {(0, r, c) for r in range(3) for c in range(3)}
    assert kept_cells(view, keep) == first | set(changed)


@given(seed=st.integers(0, 10_000), extra=st.integers(0, 27), samples=st.integers(1, 3))
def test_equals_vllms_retention_mask_on_random_videos(seed, extra, samples):
    """Each sample of a batch keeps what vLLM's rule keeps alone (budget >= a frame: vLLM's own minimum)."""
    gen = torch.Generator().manual_seed(seed)
    videos = [torch.randn(4, 3, 3, 8, generator=gen) for _ in range(samples)]
    view = video_view(videos, [9 + extra] * samples)
    keep = EVS().select(view)
    for b, video in enumerate(videos):
        assert kept_cells(view, keep, b) == vllm_retention(video, 9 + extra)


def test_a_budget_below_the_first_frame_keeps_its_least_redundant_tokens():
    """An image (a lone first frame): the tokens least like the frame's mean token are kept."""
    image = torch.randn(1, 3, 3, 8, generator=torch.Generator().manual_seed(2))
    image[0, :2] = image[0, 0, 0] + 0.01 * image[0, :2]  # six near-copies: the frame's mean leans to them
    view = video_view([image], [3])
    keep = EVS().select(view)
    assert kept_cells(view, keep) == {(0, 2, 0), (0, 2, 1), (0, 2, 2)}


def test_per_frame_budgets_rank_each_later_frame_by_its_change():
    changed = [(1, 0, 2), (2, 1, 1), (3, 2, 0)]
    view = video_view([static_video_with_changes(changed)], [9 + 3], frame_budget=[[9, 1, 1, 1]])
    keep = EVS().select(view)
    assert kept_cells(view, keep) == {(0, r, c) for r in range(3) for c in range(3)} | set(changed)


class TestEVS(VideoStrategyCases):
    """EVS passes what every layer-0 video strategy passes."""

    strategy = "evs"
    reducer = EVS
    qwen_configs = (
        tp.ReductionConfig(strategy="evs", layer=0, ratio=0.5, positions="renumbered"),
        tp.ReductionConfig(strategy="evs", layer=0, ratio=0.5, positions="original"),
    )
