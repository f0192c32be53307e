"""DyCoke: temporal token merging on crafted frame sequences, and its dynamic cache pruning.

The defining properties on hand-built views: static frames merge away while a moving object
survives; every window's first frame stays whole; the kept set equals a per-sample, per-frame
rendering of the method (the reference code's pairs-then-window loops) on random ragged batches; the
cache stage keeps the entries the recent queries attend to most and re-selects among all of them.
End to end on 8-frame videos: the temporal stage against the merge oracle (Video-LLaVA, Qwen2-VL,
LLaVA-OneVision, Qwen3-VL), both stages against the masked decode of tests/test_cache_site.py.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from test_cache_site import STEPS as CACHE_STEPS
from test_cache_site import assert_matches_oracle, cache_stage
from tokenprune.strategies.dycoke import DyCoke, reference_frame
from torch import nn
from video_cases import TEXT, video_view

import tokenprune as tp
from tokenprune.contracts.reducer import split_budget
from tokenprune.testing.exactness import forward, merge_oracle_greedy, merge_oracle_logits
from tokenprune.testing.families import llava_onevision, qwen2_vl, qwen3_vl, video_llava
from tokenprune.testing.family import Family
from tokenprune.testing.models import VIDEO_TOKEN_ID
from tokenprune.testing.oracles import TEXT_IDS, assert_kept_logits_match, greedy, left_padded
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs
from tokenprune.testing.suite_inputs import seeded_pixels

WIDTH = 6


def moving_square(frames: int, side: int, seed: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """[T, side, side, D] features of a static random background with one object moving a cell a frame
    along the first row, and the object's (row, col) in each frame."""
    gen = torch.Generator().manual_seed(seed)
    background = torch.randn(side, side, WIDTH, generator=gen)
    thing = torch.randn(WIDTH, generator=gen)
    video = background.expand(frames, -1, -1, -1).clone()
    path = [(0, t % side) for t in range(frames)]
    for t, (row, col) in enumerate(path):
        video[t, row, col] = thing
    return video, path


def kept_cells(view: tp.TokenView, keep: torch.Tensor, b: int, t: int) -> set[tuple[int, int]]:
    """The (row, col) cells of frame t that sample b keeps."""
    mine = keep[b] & (view.coords[b, :, 0] == t) & view.candidates[b]
    return {tuple(cell) for cell in view.coords[b, mine, 1:].tolist()}


def test_each_frame_is_compared_with_its_pair_then_its_windows_first_frame():
    """Odd frames with the one before; a window's third frame with its first; each window's first: none."""
    assert reference_frame(torch.arange(9)).tolist() == [-1, 0, 0, 2, -1, 4, 4, 6, -1]


def test_static_frames_merge_away_and_a_moving_object_survives():
    """With two tokens kept in each compared frame, exactly the cells the object left and entered stay."""
    video, path = moving_square(frames=8, side=4)
    compared = [t for t in range(8) if t % 4]
    view = video_view([video], [2 * 16 + 2 * len(compared)])
    selection = DyCoke().select(view)
    for t in range(8):
        cells = kept_cells(view, selection.keep, 0, t)
        if t % 4 == 0:
            assert len(cells) == 16  # a window's first frame stays whole
        else:
            assert cells == {path[t], path[int(reference_frame(torch.tensor(t)))]}
    assert (selection.into == -1).all()  # the reference drops redundant tokens outright


def test_a_static_video_keeps_only_the_first_frames_when_told_to():
    """Nothing moves: every compared frame repeats its reference, so its whole budget can go."""
    video, _ = moving_square(frames=4, side=3)
    video[:] = video[0]
    keep = DyCoke().select(video_view([video], [9])).keep
    assert keep.sum() == 9 and kept_cells(video_view([video], [9]), keep, 0, 0) == {
        (r, c) for r in range(3) for c in range(3)
    }


def test_average_folds_each_removed_token_into_a_kept_counterpart():
    """`merge: average`: a removed token joins its counterpart, or that one's own when it left too."""
    video, _ = moving_square(frames=8, side=3, seed=2)
    video = video + 0.3 * torch.randn(video.shape, generator=torch.Generator().manual_seed(5))
    view = video_view([video], [2 * 9 + 6 * 2])
    selection = DyCoke(DyCoke.Params(merge="average")).select(view)
    removed = view.candidates & ~selection.keep
    into = selection.into
    assert ((into >= 0) == removed).all()
    assert selection.keep.gather(1, into.clamp(min=0))[removed].all()
    same_cell = (
        view.coords.gather(1, into.clamp(min=0)[..., None].expand(-1, -1, 3))[..., 1:] == view.coords[..., 1:]
    )
    assert same_cell.all(-1)[removed].all()  # it joins the same (row, col) of an earlier frame


def reference_ttm(video: torch.Tensor, shares: list[int]) -> set[tuple[int, int, int]]:
    """Per sample, frame by frame: the paper's pairs-then-window comparison, `shares[t]` least similar
    tokens kept in each compared frame t (each window's first frame whole)."""
    t, h, w, _ = video.shape
    flat = torch.nn.functional.normalize(video.reshape(t, h * w, -1), dim=-1)
    kept = set()
    for frame in range(t):
        if frame % 4 == 0:
            kept |= {(frame, i // w, i % w) for i in range(h * w)}
            continue
        earlier = frame - 1 if frame % 2 else frame - 2
        similarity = (flat[frame] * flat[earlier]).sum(-1)
        order = torch.sort(similarity, stable=True).indices[: shares[frame]]
        kept |= {(frame, i // w, i % w) for i in order.tolist()}
    return kept


@st.composite
def ragged_videos(draw):
    """1-3 samples, each a video of 1-9 frames of its own grid, with a budget the compared frames allow."""
    videos, budgets = [], []
    for b in range(draw(st.integers(1, 3))):
        t, h, w = draw(st.integers(1, 9)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
        features = torch.randn(t, h, w, WIDTH, generator=torch.Generator().manual_seed(b + 10 * t + h))
        anchors = len(range(0, t, 4)) * h * w
        videos.append(features)
        budgets.append(draw(st.integers(anchors, t * h * w)))
    return videos, budgets


@given(ragged_videos())
def test_batched_ttm_keeps_what_the_per_sample_form_keeps(case):
    """Random ragged batches: exactly the budget, compared frames sharing it by size (largest remainder)."""
    videos, budgets = case
    view = video_view(videos, budgets)
    keep = DyCoke().select(view).keep
    for b, (video, budget) in enumerate(zip(videos, budgets, strict=True)):
        t, h, w, _ = video.shape
        compared = [frame for frame in range(t) if frame % 4]
        anchors = (t - len(compared)) * h * w
        shares = dict(zip(compared, split_budget(budget - anchors, [h * w] * len(compared)), strict=True))
        got = {tuple(c) for c in view.coords[b, keep[b]].tolist()}
        assert got == reference_ttm(video, shares)


def test_a_budget_below_the_whole_frames_keeps_their_least_redundant_tokens():
    """An image (no later frame) or too high a ratio: the whole frames share the budget by size and keep
    their tokens farthest (cosine) from their frame's mean token; the compared frames keep nothing."""
    gen = torch.Generator().manual_seed(3)
    video = torch.randn(5, 2, 2, WIDTH, generator=gen)  # whole frames 0 and 4, 4 tokens each
    video[0, 1, 1] = video[0, :, :].reshape(4, -1)[:3].mean(0)  # the most typical token of frame 0
    view = video_view([video, torch.randn(1, 3, 3, WIDTH, generator=gen)], [6, 4])
    keep = DyCoke().select(view).keep
    assert [len(kept_cells(view, keep, 0, t)) for t in range(5)] == [3, 0, 0, 0, 3]
    assert (1, 1) not in kept_cells(view, keep, 0, 0)
    image = view.features()[1, view.candidates[1]]
    unit = torch.nn.functional.normalize(image, dim=-1)
    distance = 1 - unit @ torch.nn.functional.normalize(unit.mean(0), dim=0)
    expected = {(i // 3, i % 3) for i in torch.topk(distance, 4).indices.tolist()}
    assert kept_cells(view, keep, 1, 0) == expected


def test_a_per_frame_budget_is_kept_frame_by_frame():
    """`budget: per_frame`: each frame keeps its own share, compared frames their least redundant tokens."""
    video, path = moving_square(frames=4, side=3)
    view = dataclasses.replace(video_view([video], [9]), frame_budget=torch.tensor([[3, 2, 2, 2]]))
    keep = DyCoke().select(view).keep
    assert [len(kept_cells(view, keep, 0, t)) for t in range(4)] == [3, 2, 2, 2]
    assert kept_cells(view, keep, 0, 1) == {path[0], path[1]}


def test_the_cache_stage_keeps_the_most_attended_entries_and_reselects_each_step():
    """At the cache site: the top entries by the window's attention; a later step re-ranks all of them,
    so an entry left out at one step returns when the recent queries attend to it again."""
    view = video_view([torch.randn(2, 2, 2, WIDTH)], [3], site="cache")
    first = torch.zeros(view.candidates.shape)
    first[0, TEXT : TEXT + 8] = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.0, 0.05])
    second = first.clone()
    second[0, TEXT + 1] = 1.0  # the recent queries now look at an entry the first step removed
    kept = []
    for attention in (first, second):
        step = dataclasses.replace(view, signals=tp.Signals({"attention": lambda query, a=attention: a}))
        kept.append(DyCoke().select(step)[0].nonzero().squeeze(1).tolist())
    assert kept[0] == [TEXT, TEXT + 2, TEXT + 4]
    assert kept[1] == [TEXT, TEXT + 1, TEXT + 2]


# -- end to end: the temporal stage on 8-frame videos of four tiny model families -------------------

FRAMES = 8
STEPS = 3
LOGIT_TOL = 1e-4
Texts = list[tuple[int, int]]  # (text tokens before, after) the video of each sample
Batch = dict[str, torch.Tensor]


def video_llava_batch(model: nn.Module, texts: Texts, seed: int) -> Batch:
    """A left-padded batch of one FRAMES-frame video per sample between (before, after) text tokens."""
    vision = model.config.vision_config
    side, grid = vision.image_size, (vision.image_size // vision.patch_size) ** 2
    rows, videos = [], []
    for i, (before, after) in enumerate(texts):
        gen = torch.Generator().manual_seed(seed + i)
        text = torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (before + after,), generator=gen).tolist()
        rows.append(text[:before] + [VIDEO_TOKEN_ID] * FRAMES * (1 + grid) + text[before:])
        videos.append(seeded_pixels((FRAMES, 3, side, side), 1000 * (seed + i)))
    ids, mask = left_padded(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": torch.stack(videos)}


def qwen2_vl_batch(model: nn.Module, texts: Texts, seed: int) -> Batch:
    video = Item((FRAMES, 4, 4), video=True)
    return qwen_inputs(model, [QwenPrompt(text, [video]) for text in texts], seed)


def llava_onevision_batch(
    model: nn.Module, texts: list[tuple[int, int]], seed: int
) -> dict[str, torch.Tensor]:
    return llava_onevision.media_inputs(
        model, [[before, "video", after] for before, after in texts], seed, FRAMES
    )


def qwen3_vl_batch(model: nn.Module, texts: Texts, seed: int) -> Batch:
    video = Item((FRAMES, 4, 4), video=True)
    return qwen_inputs(model, [qwen3_vl.TimedPrompt(text, [video]) for text in texts], seed)


BATCHES = {
    "video_llava": (video_llava.FAMILY, video_llava_batch),
    "qwen2_vl": (qwen2_vl.FAMILY, qwen2_vl_batch),
    "llava_onevision": (llava_onevision.VIDEO_FAMILY, llava_onevision_batch),
    "qwen3_vl": (qwen3_vl.FAMILY, qwen3_vl_batch),
}
TEXTS = [(3, 4), (5, 2)]


@pytest.fixture(scope="module", params=sorted(BATCHES))
def video_model(request) -> tuple[Family, nn.Module, Callable]:
    family, batch = BATCHES[request.param]
    return family, family.model("sdpa"), batch


def ttm(merge: str = "drop", ratio: float = 0.5) -> tp.ReductionConfig:
    return tp.ReductionConfig(strategy="dycoke", layer=0, ratio=ratio, params={"merge": merge})


@torch.no_grad()
@pytest.mark.parametrize("merge", ["drop", "average"])
def test_the_temporal_stage_equals_the_merge_oracle_with_the_cache(video_model, merge):
    """Layer 0 on 8-frame videos of four families: kept logits equal the merge oracle's (1e-4, renumbered
    positions), and greedy decoding on the reduced cache equals the oracle's greedy continuation."""
    family, model, build = video_model
    batch, config = build(model, TEXTS, 0), ttm(merge)
    with tp.attach(model, config, adapter=family.adapter) as handle:
        logits = forward(family, model, batch)
        trace = handle.trace
        tokens, _ = greedy(model, batch, STEPS)
    assert trace[0].visual_after == [round(n * 0.5) for n in trace[0].visual_before]
    assert (trace[0].sizes is not None and bool((trace[0].sizes > 1).any())) == (merge == "average")
    expected = merge_oracle_logits(family, model, batch, trace[0], False, config)
    assert_kept_logits_match(logits, expected, trace[0].kept, LOGIT_TOL)
    assert torch.equal(tokens, merge_oracle_greedy(family, model, batch, trace[0], False, STEPS, config))


@torch.no_grad()
def test_a_sample_alone_equals_the_same_sample_in_a_batch(video_model):
    family, model, build = video_model
    batch, alone_inputs = build(model, TEXTS, 0), build(model, TEXTS[1:], 1)
    with tp.attach(model, ttm(), adapter=family.adapter) as handle:
        batched, kept = forward(family, model, batch), handle.trace[0].kept
        alone, kept_alone = forward(family, model, alone_inputs), handle.trace[0].kept
    offset = batch["input_ids"].shape[1] - alone_inputs["input_ids"].shape[1]
    row, row_alone = kept[1][kept[1] >= 0], kept_alone[0][kept_alone[0] >= 0]
    assert torch.equal(row - offset, row_alone)
    assert (batched[1, row] - alone[0, row_alone]).abs().max() <= LOGIT_TOL


# -- end to end: both stages, the cache pruned before every decode step -------------------------------


def both_stages(cache_ratio: float = 0.8) -> list[dict]:
    """TTM (positions kept: the masked-decode oracle holds positions), then the cache re-chosen each step."""
    temporal = {"layer": 0, "ratio": 0.5, "positions": "original"}
    return [temporal, cache_stage(2, cache_ratio, every=1, restore=True, window=1)]


@torch.no_grad()
@pytest.mark.parametrize("name", ["video_llava", "qwen2_vl"])
def test_both_stages_equal_the_masked_decode_and_pruned_entries_return(name):
    """Every generated token's logits equal the unreduced decode with TTM's tokens masked from layer 0 and
    each step's removed entries masked from layer 2 at that step (1e-4); the cache stage selects before
    every step among all the visual entries TTM left, so an entry out at one step is back at a later one."""
    family, build = BATCHES[name]
    model = family.model("sdpa")
    trace = assert_matches_oracle(model, build(model, TEXTS, 0), both_stages(), "dycoke")
    temporal, steps = trace[0], [event for event in trace if event.site == "cache"]
    assert [event.step for event in steps] == list(range(1, CACHE_STEPS))
    left = [set(row[row >= 0].tolist()) for row in temporal.kept]
    kept = [[set(row[row >= 0].tolist()) for row in event.kept] for event in steps]
    assert all(row <= left[b] for rows in kept for b, row in enumerate(rows))
    pairs = itertools.combinations(kept, 2)
    assert any(
        later - earlier for before, after in pairs for earlier, later in zip(before, after, strict=True)
    )


def test_the_example_config_is_the_papers_setting():
    """configs/dycoke-video-llava.yaml: K = 0.7 on 6 of 8 frames, then P = 0.7 of what TTM left, from layer
    3, re-chosen before every step by the latest token's attention."""
    run = yaml.safe_load((Path(__file__).parents[1] / "configs" / "dycoke-video-llava.yaml").read_text())
    temporal, cache = tp.ReductionConfig.model_validate(run["reduction"]).stages
    assert (temporal.site, temporal.layer, temporal.ratio) == ("language", 0, pytest.approx(0.7 * 6 / 8))
    assert (cache.site, cache.layer, cache.every, cache.window, cache.restore) == ("cache", 3, 1, 1, True)
    assert cache.ratio == pytest.approx(1 - 0.3 * (1 - temporal.ratio))
