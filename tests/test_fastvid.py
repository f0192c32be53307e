"""FastVID's defining properties on crafted frame sequences (segments at scene changes, salient tokens per
frame, dense static regions merged into anchor frames), and exactness end to end (the merge oracle)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.strategies import fastvid
from tokenprune.strategies.fastvid import FastVID, FastVIDParams, temporal_segments
from video_cases import (
    VideoStrategyCases,
    video_view,
)

import tokenprune as tp
from tokenprune.core.frames import frame_groups, group_extreme, video_groups

VISUAL = slice(2, -2)  # the video tokens of a `video_view`


def two_scenes(frames: int = 12, cut: int = 6, seed: int = 0) -> torch.Tensor:
    """A [frames, 3, 3, 16] video: one static scene, then (from `cut`) another, with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    first, second = torch.randn(2, 1, 3, 3, 16, generator=gen)
    video = torch.cat([first.expand(cut, -1, -1, -1), second.expand(frames - cut, -1, -1, -1)])
    return video + 0.05 * torch.randn(video.shape, generator=gen)


def segments_of(view: tp.TokenView, **params) -> list[int]:
    """The temporal segment of each frame of sample 0 (one id per frame)."""
    scenes = temporal_segments(view, frame_groups(view), video_groups(view), FastVIDParams(**params))
    t = view.extent[0, 2, 0]
    return scenes[0, VISUAL].view(int(t), -1)[:, 0].tolist()


def test_segments_start_at_the_scene_change():
    view = video_view([two_scenes()], [27])
    assert segments_of(view, segments=1, threshold=0.5) == [0] * 6 + [1] * 6
    # c - 1 = 2 cuts by lowest similarity: the scene change and the next least similar transition
    cuts = segments_of(view, segments=3, threshold=-1)
    assert cuts[5] != cuts[6] and len(set(cuts)) == 3
    # the paper's c = 8 on 8 frames: every transition is among the 7 lowest
    assert segments_of(video_view([two_scenes(8, 4)], [18])) == list(range(8))


def test_static_regions_merge_into_anchor_frames_and_never_across_scenes():
    view = video_view([two_scenes()], [27])
    merge = FastVID(FastVIDParams(segments=1, threshold=0.5)).select(view)
    t = view.coords[0, :, 0]
    assert int(merge.keep.sum()) == 27
    merged = (merge.into[0] >= 0).nonzero().squeeze(1)
    targets = merge.into[0, merged]
    assert len(merged) > 0 and bool(merge.keep[0, targets].all())
    assert bool(((t[merged] < 6) == (t[targets] < 6)).all()), "a merge crossed the scene change"
    # anchors lie on anchor frames: every 4th frame of a segment, counted from its first (0, 4; 6, 10)
    assert set(t[targets].tolist()) <= {0, 4, 6, 10}
    # a static cell merges into an anchor at the same cell (its near copy) whenever that cell is an anchor
    cell = view.coords[0, :, 1:]
    same_cell = (cell[merged] == cell[targets]).all(-1)
    anchored = {(int(s), *c) for s, c in zip(t[targets] >= 6, cell[targets].tolist(), strict=True)}
    has_copy = torch.tensor(
        [(int(s), *c) in anchored for s, c in zip(t[merged] >= 6, cell[merged].tolist(), strict=True)]
    )
    assert bool(same_cell[has_copy].all())


def test_each_merge_goes_to_the_most_similar_anchor_and_salient_tokens_lead_each_frame():
    video = torch.randn(5, 3, 4, 16, generator=torch.Generator().manual_seed(3))
    view = video_view([video], [30])
    merge = FastVID().select(view)
    x = view.hidden[0]
    unit = torch.nn.functional.normalize(x, dim=-1)
    anchors = set(merge.into[0][merge.into[0] >= 0].tolist())
    for i in (merge.into[0] >= 0).nonzero().squeeze(1).tolist():
        same = [a for a in anchors if view.coords[0, a, 0] == view.coords[0, i, 0]]  # c = 8: a frame each
        best = max(same, key=lambda a: float(unit[i] @ unit[a]))
        assert float(unit[i] @ unit[merge.into[0, i]]) >= float(unit[i] @ unit[best]) - 1e-6
    # ATS: each frame's floor(0.4 k) tokens with the largest dot product with its mean token are kept (k = 6)
    for t in range(5):
        tokens = x[VISUAL].view(5, 12, 16)[t]
        salient = torch.topk(tokens @ tokens.mean(0), 2).indices + 2 + 12 * t
        assert bool(merge.keep[0, salient].all())


@given(budget=st.integers(1, 60), seed=st.integers(0, 1000))
def test_the_budget_is_met_and_a_batch_equals_each_sample_alone(budget, seed):
    gen = torch.Generator().manual_seed(seed)
    videos = [torch.randn(5, 3, 4, 8, generator=gen) for _ in range(2)]
    budgets = [budget, 60 - budget]
    batched = FastVID().select(video_view(videos, budgets))
    assert batched.keep.sum(1).tolist() == budgets
    for b, (video, own) in enumerate(zip(videos, budgets, strict=True)):
        alone = FastVID().select(video_view([video], [own]))
        assert torch.equal(batched.keep[b], alone.keep[0]) and torch.equal(batched.into[b], alone.into[0])


def test_per_frame_budgets_make_every_frame_an_anchor_frame_of_its_own_share():
    view = video_view([two_scenes(4, 2)], [22], frame_budget=[[3, 5, 6, 8]])
    merge = FastVID().select(view)
    assert merge.keep[0, VISUAL].view(4, 9).sum(-1).tolist() == [3, 5, 6, 8]
    targets = merge.into[0][merge.into[0] >= 0]
    assert len(targets) > 0 and bool(merge.keep[0, targets].all())


def dense_density_scores(features, members, groups, neighbours):
    """The DPC-kNN score by its definition, every pair compared elementwise (the oracle of the fused form)."""
    distance = torch.cdist(features, features) / features.shape[-1] ** 0.5
    pair = members[:, :, None] & members[:, None, :] & (groups[:, :, None] == groups[:, None, :])
    nearest = distance.masked_fill(~pair, float("inf"))
    nearest = nearest.topk(min(neighbours, distance.shape[-1]), dim=-1, largest=False).values
    finite = torch.isfinite(nearest)
    mean_square = nearest.square().masked_fill(~finite, 0).sum(-1) / finite.sum(-1).clamp(min=1)
    density = torch.exp(-mean_square).masked_fill(~members, 0.0)
    slot = torch.arange(members.shape[1])
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (slot[None, :] < slot[:, None])
    )
    farthest = group_extreme(
        distance.masked_fill(~pair, 0.0).amax(dim=-1), groups.masked_fill(~members, -1), "amax"
    )
    separation = distance.masked_fill(~(pair & denser), float("inf")).amin(dim=-1)
    separation = torch.where(torch.isinf(separation), farthest, separation)
    return (separation * density).masked_fill(~members, 0.0)


def dense_merge_targets(features, merged, anchors, scenes):
    """Each merged token's most cosine-similar anchor of its segment, by elementwise pair masks (oracle)."""
    unit = torch.nn.functional.normalize(features, dim=-1)
    allowed = anchors[:, None, :] & (scenes[:, :, None] == scenes[:, None, :])
    similarity = (unit @ unit.transpose(1, 2)).masked_fill(~allowed, float("-inf"))
    return torch.where(merged & allowed.any(dim=-1), similarity.argmax(dim=-1), -1)


@given(
    frames=st.integers(1, 9),
    levels=st.integers(1, 4),
    budget=st.integers(1, 40),
    per_frame=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_the_fused_pair_masks_select_what_the_dense_definition_selects(
    frames, levels, budget, per_frame, seed
):
    """Features on a few integer levels make density and similarity ties common: the tie rules must agree."""
    gen = torch.Generator().manual_seed(seed)
    videos = [torch.randint(-levels, levels + 1, (frames, 3, 2, 6), generator=gen).float() for _ in range(2)]
    shares = [[1 + (t + b) % 6 for t in range(frames)] for b in range(2)] if per_frame else None
    budgets = [sum(s) for s in shares] if shares else [min(budget, 6 * frames), max(6 * frames - budget, 1)]
    view = video_view(videos, budgets, shares)
    params = FastVIDParams(segments=1 + seed % 4, threshold=0.5, anchor_step=1 + seed % 3)
    fused = FastVID(params).select(view)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastvid, "density_scores", dense_density_scores)
        patch.setattr(fastvid, "merge_targets", dense_merge_targets)
        dense = FastVID(params).select(view)
    assert torch.equal(fused.keep, dense.keep) and torch.equal(fused.into, dense.into)


class TestFastVID(VideoStrategyCases):
    """FastVID passes what every layer-0 video strategy passes."""

    strategy = "fastvid"
    reducer = FastVID
    qwen_configs = (tp.ReductionConfig(strategy="fastvid", layer=0, ratio=0.6, params={"segments": 2}),)
