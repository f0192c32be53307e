"""FastVID's defining properties on crafted frame sequences (segments at scene changes, salient tokens per
frame, dense static regions merged into anchor frames), its blocked pair comparisons against the former
[L, L] ones and the elementwise definition, and exactness end to end (the merge oracle)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_batched_selection import host_reads
from tokenprune.strategies import fastvid
from tokenprune.strategies.fastvid import FastVID, FastVIDParams, temporal_segments
from torch.utils._python_dispatch import TorchDispatchMode
from video_cases import (
    VideoStrategyCases,
    family_batch,
    video_view,
)

import tokenprune as tp
from tokenprune.contracts.reducer import group_counts
from tokenprune.core.frames import frame_groups, group_extreme, group_mean, rank_within, video_groups
from tokenprune.testing.exactness import forward

VISUAL = slice(2, -2)  # the video tokens of a `video_view`


def two_scenes(frames: int = 12, cut: int = 6, seed: int = 0) -> torch.Tensor:
    """A [frames, 3, 3, 16] video: one static scene, then (from `cut`) another, with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    first, second = torch.randn(2, 1, 3, 3, 16, generator=gen)
    video = torch.cat([first.expand(cut, -1, -1, -1), second.expand(frames - cut, -1, -1, -1)])
    return video + 0.05 * torch.randn(video.shape, generator=gen)


def segments_of(view: tp.TokenView, **params) -> list[int]:
    """The temporal segment of each frame of sample 0 (one id per frame)."""
    frames = frame_groups(view)
    means = group_mean(view.features(), frames)
    scenes = temporal_segments(view, frames, video_groups(view), means, FastVIDParams(**params))
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


def cosines_up_to_row_norms(features):
    """[B, i, j]: cos(i, j) times |i| (the dot product over |j|): ranks j for token i as the cosine does,
    exactly on integer features, so equal cosines tie whatever shape the product has."""
    return (features @ features.transpose(1, 2)) / features.norm(dim=-1).clamp(min=1e-12)[:, None, :]


def dense_merge_targets(features, merged, anchors, scenes):
    """Each merged token's most cosine-similar anchor of its segment, by elementwise pair masks (oracle)."""
    allowed = anchors[:, None, :] & (scenes[:, :, None] == scenes[:, None, :])
    similarity = cosines_up_to_row_norms(features).masked_fill(~allowed, float("-inf"))
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
        patch.setattr(fastvid, "density_scores", lambda f, m, g, k, _size: dense_density_scores(f, m, g, k))
        patch.setattr(fastvid, "merge_targets", lambda f, m, a, s, _most: dense_merge_targets(f, m, a, s))
        dense = FastVID(params).select(view)
    assert torch.equal(fused.keep, dense.keep) and torch.equal(fused.into, dense.into)


# -- the former [L, L] pair matrices, kept as the oracle of the blocked ones ----------------------------


def square_density_scores(features, members, groups, neighbours):
    """The DPC-kNN score over [B, L, L] pair matrices of the whole sequence (FastVID's former form)."""
    distance = torch.cdist(features, features) / features.shape[-1] ** 0.5
    pair = same_group(groups.masked_fill(~members, -1), members)
    count = min(neighbours, distance.shape[-1])
    nearest = distance.masked_fill(~pair, float("inf")).topk(count, dim=-1, largest=False).values
    finite = torch.isfinite(nearest)
    mean_square = nearest.square().masked_fill(~finite, 0).sum(-1) / finite.sum(-1).clamp(min=1)
    density = torch.exp(-mean_square).masked_fill(~members, 0.0)
    order = rank_within(density, torch.zeros_like(groups))
    denser = order[:, None, :] < order[:, :, None]
    farthest = group_extreme(
        distance.masked_fill(~pair, 0.0).amax(dim=-1), groups.masked_fill(~members, -1), "amax"
    )
    separation = distance.masked_fill(~(pair & denser), float("inf")).amin(dim=-1)
    separation = torch.where(torch.isinf(separation), farthest, separation)
    return (separation * density).masked_fill(~members, 0.0)


def square_merge_targets(features, merged, anchors, scenes):
    """Each merged token's most similar anchor of its segment over [B, L, L] (FastVID's former form)."""
    allowed = same_group(scenes, anchors)
    best = cosines_up_to_row_norms(features).masked_fill_(~allowed, float("-inf")).max(dim=-1)
    return torch.where(merged & (best.values > float("-inf")), best.indices, -1)


def same_group(groups, columns):
    """[B, i, j] bool: token j is in `columns` and in token i's group (-1: none)."""
    keys = groups.masked_fill(~columns | (groups < 0), -2)
    return groups[:, :, None] == keys[:, None, :]


@st.composite
def ragged_videos(draw: st.DrawFn) -> tp.TokenView:
    """Samples of 1-3 videos each (a one-frame video: an image) of their own (T, H, W), text around them,
    frames of the videos of a sample interleaved in time or not (Video-LLaVA: class tokens beside patches),
    left padding, a few candidates removed by an earlier stage, budgets per sample or per frame, and the
    view's bounds exact, loose or absent. Features on a few integer levels: distances are exact, so ties
    (common: a frame of two tokens scores both alike) go by the rule, not by how a product rounds."""
    batch, per_frame = draw(st.integers(1, 3)), draw(st.booleans())
    grid = st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 4))  # (T, H, W)
    grids = [draw(st.lists(grid, min_size=1, max_size=3)) for _ in range(batch)]
    rows = [video_tokens(grid, draw(st.booleans())) for grid in grids]
    length = 2 + max(len(r) for r in rows)
    fields = {name: torch.full((batch, length), -1) for name in ("segment", "frame", "positions")}
    fields |= {"coords": torch.full((batch, length, 3), -1), "extent": torch.zeros(batch, length, 3).long()}
    fields["candidates"] = torch.zeros(batch, length, dtype=torch.bool)
    for b, tokens in enumerate(rows):
        start = length - len(tokens) - 1  # 1 text token before, 1 after
        fields["positions"][b, start - 1 :] = torch.arange(len(tokens) + 2)
        for slot, (segment, frame, cell, extent) in enumerate(tokens, start):
            present = draw(st.integers(0, 9)) > 0  # else: an earlier stage removed it
            fields["candidates"][b, slot] = present
            fields["positions"][b, slot] = fields["positions"][b, slot] if present else -1
            if present:
                fields["segment"][b, slot], fields["frame"][b, slot] = segment, frame
                fields["coords"][b, slot] = torch.tensor(cell)
                fields["extent"][b, slot] = torch.tensor(extent)
    count = int(fields["frame"].max()) + 2  # and one empty frame
    frames = group_counts(fields["candidates"], fields["frame"], count)
    shares = torch.stack([torch.tensor([draw(st.integers(0, int(c))) for c in row]) for row in frames])
    totals = frames.sum(1)
    budget = shares.sum(1) if per_frame else torch.tensor([draw(st.integers(0, int(c))) for c in totals])
    bounds = draw(st.sampled_from(["exact", "loose", "none"]))
    slack = 3 if bounds == "loose" else 0
    gen = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    return tp.TokenView(
        hidden=torch.randint(-2, 3, (batch, length, 6), generator=gen).float(),
        valid=fields["positions"] >= 0,
        budget=budget,
        layer=0,
        frame_budget=shares if per_frame else None,
        frame_size=None if bounds == "none" else int(frames.max()) + slack,
        max_budget=None if bounds == "none" else int(budget.max()) + slack,
        **fields,
    )


def video_tokens(grids: list[tuple[int, int, int]], interleaved: bool) -> list[tuple]:
    """(segment, frame of the sample, (t, row, col), (T, H, W)) of each visual token of one sample, video by
    video, or frame by frame across its videos in time (`interleaved`)."""
    tokens, first = [], 0
    for segment, (t, h, w) in enumerate(grids):
        cells = torch.cartesian_prod(torch.arange(t), torch.arange(h), torch.arange(w)).view(-1, 3).tolist()
        tokens += [(segment, first + c[0], tuple(c), (t, h, w)) for c in cells]
        first += t
    return sorted(tokens, key=lambda token: (token[2][0], token[0])) if interleaved else tokens


@given(view=ragged_videos(), seed=st.integers(0, 1000))
def test_the_blocked_pairs_select_what_the_former_square_pair_matrices_select(view, seed):
    """Frame blocks (density) and anchor columns (merge targets) against [L, L] over the whole sequence."""
    params = FastVIDParams(
        segments=1 + seed % 4, threshold=0.5, anchor_step=1 + seed % 3, neighbours=1 + seed % 5
    )
    blocked = []
    assert host_reads(lambda: blocked.append(FastVID(params).select(view))) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastvid, "density_scores", lambda f, m, g, k, _size: square_density_scores(f, m, g, k))
        patch.setattr(fastvid, "merge_targets", lambda f, m, a, s, _most: square_merge_targets(f, m, a, s))
        square = FastVID(params).select(view)
    assert torch.equal(blocked[0].keep, square.keep) and torch.equal(blocked[0].into, square.into)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation returns while it is active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("bounds", [True, False])
def test_the_views_bounds_keep_every_pair_table_below_the_square_of_the_sequence(bounds):
    """Frame blocks and anchor columns: no [L, L] table; a view without bounds falls back to one."""
    view = video_view([torch.randn(16, 4, 4, 8, generator=torch.Generator().manual_seed(1))], [64])
    if not bounds:
        view = dataclasses.replace(view, frame_size=None, max_budget=None)
    with LargestTensor() as seen:
        FastVID().select(view)
    assert (seen.largest < view.candidates.shape[1] ** 2) == bounds


@pytest.mark.parametrize("budget", ["sample", "per_frame"])
def test_the_core_gives_the_view_its_exact_bounds(budget):
    """The largest frame's candidates and the largest budget as Python ints: what FastVID's blocks rely on."""
    family, model, inputs = family_batch("video_llava")
    seen = []
    select = FastVID.select
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FastVID, "select", lambda self, view: seen.append(view) or select(self, view))
        config = tp.ReductionConfig(strategy="fastvid", layer=0, ratio=0.6, budget=budget)
        with tp.attach(model, config, adapter=family.adapter):
            forward(family, model, inputs)
    (view,) = seen
    frames = group_counts(view.candidates, view.frame, int(view.frame.max()) + 1)
    assert view.frame_size == int(frames.max()) and view.max_budget == int(view.budget.max())


class TestFastVID(VideoStrategyCases):
    """FastVID passes what every layer-0 video strategy passes."""

    strategy = "fastvid"
    reducer = FastVID
    qwen_configs = (tp.ReductionConfig(strategy="fastvid", layer=0, ratio=0.6, params={"segments": 2}),)
