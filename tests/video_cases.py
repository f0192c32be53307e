"""Shared by the video strategies' tests: crafted frame sequences as a TokenView, and end-to-end exactness
on the video families through the oracles of tokenprune.testing (float32, SDPA)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_batched_selection import host_reads
from torch import Tensor

import tokenprune as tp
from tokenprune.contracts.reducer import Site
from tokenprune.testing.exactness import forward, merge_oracle_greedy, recomputed_greedy
from tokenprune.testing.families import llava_onevision, qwen2_vl, qwen3_vl, video_llava
from tokenprune.testing.family import Family, Sample
from tokenprune.testing.oracles import assert_kept_logits_match, greedy
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs
from tokenprune.testing.suite import AdapterConformance, merges_returned

LOGIT_TOL = 1e-4  # kept logits against the oracle (max abs diff)
STEPS = 3  # greedy decode steps
TEXT = 2  # text tokens before and after the visual ones of a crafted view
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

VIDEO_FAMILIES = {
    "video_llava": video_llava.FAMILY,
    "qwen2_vl": qwen2_vl.FAMILY,
    "llava_onevision_video": llava_onevision.VIDEO_FAMILY,
    "qwen3_vl": qwen3_vl.FAMILY,
}


def video_view(
    videos: list[Tensor],
    budget: list[int],
    frame_budget: list[list[int]] | None = None,
    site: Site = "language",
) -> tp.TokenView:
    """A left-padded view of one sample per video [T, H, W, D] at `site`: TEXT text tokens (zeros), the
    video frame by frame (row-major), TEXT text tokens; every video token a candidate."""
    lengths = [2 * TEXT + v.shape[:3].numel() for v in videos]
    batch, length = len(videos), max(lengths)
    hidden = torch.zeros(batch, length, videos[0].shape[-1])
    candidates = torch.zeros(batch, length, dtype=torch.bool)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    coords = torch.full((batch, length, 3), -1)
    extent = torch.zeros(batch, length, 3, dtype=torch.long)
    positions = torch.full((batch, length), -1)
    for b, (video, n) in enumerate(zip(videos, lengths, strict=True)):
        start, (t, h, w, _) = length - n, video.shape
        cells = slice(start + TEXT, length - TEXT)
        valid[b, start:], positions[b, start:], candidates[b, cells] = True, torch.arange(n), True
        coords[b, cells] = torch.cartesian_prod(torch.arange(t), torch.arange(h), torch.arange(w))
        extent[b, cells] = torch.tensor([t, h, w])
        hidden[b, cells] = video.reshape(t * h * w, -1)
    return tp.TokenView(
        hidden=hidden,
        candidates=candidates,
        valid=valid,
        segment=torch.where(candidates, 0, -1),
        coords=coords,
        extent=extent,
        positions=positions,
        budget=torch.tensor(budget),
        layer=0,
        frame=torch.where(candidates, coords[..., 0], -1),
        frame_budget=None if frame_budget is None else torch.tensor(frame_budget),
        site=site,
        frame_size=max(v.shape[1:3].numel() for v in videos),  # the bounds the core's views carry
        max_budget=max(budget),
    )


def kept_cells(view: tp.TokenView, keep: Tensor, b: int = 0) -> set[tuple[int, int, int]]:
    """The (t, row, col) cells of sample b's kept tokens."""
    return {tuple(c) for c in view.coords[b][keep[b]].tolist()}


def longer_qwen_video(model: torch.nn.Module) -> dict[str, Tensor]:
    """A Qwen batch with 4-frame videos: a video alone, and an image then a video (left-padded)."""
    video = Item((4, 4, 4), video=True)
    prompts = [QwenPrompt((3, 2), [video]), QwenPrompt((1, 2, 2), [Item((1, 4, 6)), video])]
    return qwen_inputs(model, prompts, 5)


@torch.no_grad()
def assert_exact(
    family: Family, model: torch.nn.Module, inputs: dict[str, Tensor], config: tp.ReductionConfig
) -> None:
    """The run's kept logits equal its oracle's (the mask oracle for pruning, the merge oracle for merges),
    and greedy decoding on the reduced cache equals its oracle (the merge oracle replayed, or recomputing)."""
    with tp.attach(model, config, adapter=family.adapter) as handle:
        with merges_returned(handle.reducer) as merges:
            logits = forward(family, model, inputs)
            cached, _ = greedy(model, inputs, STEPS)
        trace = handle.trace
        recomputed = None if merges else recomputed_greedy(family, model, inputs, STEPS)
    assert trace[0].visual_after == [config.stages[0].kept_count(n) for n in trace[0].visual_before]
    expected = AdapterConformance.oracle(family, model, inputs, trace, config, merges[:1], (), [])
    assert_kept_logits_match(logits, expected, trace[-1].kept, LOGIT_TOL)
    if merges:
        proportional = merges[0].proportional_attention
        recomputed = merge_oracle_greedy(family, model, inputs, trace[0], proportional, STEPS, config)
    assert torch.equal(cached, recomputed)


def family_cases() -> list:
    """pytest params: each video family's name, at two ratios."""
    return [
        pytest.param(name, ratio, id=f"{name}-{ratio}") for name in VIDEO_FAMILIES for ratio in (0.25, 0.6)
    ]


def family_batch(name: str) -> tuple[Family, torch.nn.Module, dict[str, Tensor]]:
    """A video family's tiny SDPA model and a two-sample batch (its most items, and one fewer)."""
    family = VIDEO_FAMILIES[name]
    model = family.model("sdpa")
    most = family.max_items
    samples = [Sample((2, 1, 3, 2, 1)[: most + 1], most), Sample((4, 2, 1, 3, 2)[:most], most - 1)]
    return family, model, family.inputs(model, samples, 3)


class VideoStrategyCases:
    """The tests every layer-0 video strategy passes; a test file subclasses it as `Test...` and names
    the strategy, its reducer and its four-frame Qwen2-VL configs."""

    strategy: str
    reducer: Callable[[], tp.Reducer]
    qwen_configs: tuple[tp.ReductionConfig, ...]

    def test_selection_reads_nothing_back_to_the_host(self) -> None:
        gen = torch.Generator().manual_seed(6)
        view = video_view([torch.randn(4, 3, 3, 8, generator=gen) for _ in range(2)], [14, 27])
        reducer = self.reducer()
        assert host_reads(lambda: reducer.select(view)) == 0

    @pytest.mark.parametrize(("family", "ratio"), family_cases())
    def test_exact_on_the_video_families(self, family: str, ratio: float) -> None:
        family, model, inputs = family_batch(family)
        assert_exact(family, model, inputs, tp.ReductionConfig(strategy=self.strategy, layer=0, ratio=ratio))

    def test_exact_on_four_frame_qwen2_vl_videos(self) -> None:
        model = qwen2_vl.FAMILY.model("sdpa")
        for config in self.qwen_configs:
            assert_exact(qwen2_vl.FAMILY, model, longer_qwen_video(model), config)

    def test_the_shipped_config_loads_and_runs_exactly(self) -> None:
        config = tp.load_config(CONFIGS / f"{self.strategy}-video-llava.yaml")
        assert config.strategy == self.strategy and config.stages[0].layer == 0
        family, model, inputs = family_batch("video_llava")
        assert_exact(family, model, inputs, config)
