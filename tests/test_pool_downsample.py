"""`pool` and `downsample`: their defining properties on crafted grids, and a run on the toy model.

Pool on a grid whose strides divide it is exactly average pooling (torch's `avg_pool2d`); downsample
is exactly area interpolation (`F.interpolate(mode="area")`, fractional weights included on grids
the budget does not divide).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from tokenprune.strategies.downsample import Downsample
from tokenprune.strategies.pool import Pool
from tokenprune.strategies.uniform import lattice_counts

import tokenprune as tp
from tokenprune.core.merging import merge_tokens
from tokenprune.core.selection import check_selection
from tokenprune.testing.models import IMAGE_TOKEN_ID
from tokenprune.testing.oracles import Prompt, llava_inputs

WIDTH = 5
TOL = 1e-5


def grid_view(frames: int, rows: int, cols: int, keep: int, per_frame: bool = False) -> tp.TokenView:
    """One sample: 2 text tokens, a (frames, rows, cols) image in row-major order, 1 text token."""
    n_image = frames * rows * cols
    length = n_image + 3
    visual = torch.zeros(1, length, dtype=torch.bool)
    visual[0, 2 : 2 + n_image] = True
    coords = torch.full((1, length, 3), -1)
    coords[visual] = torch.cartesian_prod(torch.arange(frames), torch.arange(rows), torch.arange(cols))
    extent = torch.zeros(1, length, 3, dtype=torch.long)
    extent[visual] = torch.tensor([frames, rows, cols])
    frame = torch.where(visual, coords[..., 0], -1)
    hidden = torch.randn(1, length, WIDTH, generator=torch.Generator().manual_seed(rows * cols))
    return tp.TokenView(
        hidden=hidden,
        candidates=visual,
        valid=torch.ones(1, length, dtype=torch.bool),
        segment=torch.where(visual, 0, -1),
        coords=coords,
        extent=extent,
        positions=torch.arange(length)[None],
        budget=torch.tensor([keep]),
        layer=0,
        frame=frame,
        frame_budget=torch.full((1, frames), keep // frames) if per_frame else None,
    )


def image_of(view: tp.TokenView, x: torch.Tensor) -> torch.Tensor:
    """[T, D, H, W]: the image tokens of `x` [1, L, D] on their grid."""
    t, h, w = view.extent[view.candidates][0].tolist()
    return x[0, view.candidates[0]].view(t, h, w, -1).permute(0, 3, 1, 2)


def merged(view: tp.TokenView, selection: tp.Merge) -> tuple[torch.Tensor, torch.Tensor]:
    """(the survivors' merged features [n, D] in sequence order, their sizes [n])."""
    x, sizes = merge_tokens(view.hidden, view.token_sizes(), selection)
    return x[selection.keep], sizes[selection.keep]


@pytest.mark.parametrize(
    ("rows", "cols", "keep", "window"), [(6, 6, 9, 2), (12, 12, 16, 3), (24, 24, 64, 3), (4, 8, 8, 2)]
)
def test_pool_on_a_divided_grid_is_average_pooling(rows, cols, keep, window):
    view = grid_view(1, rows, cols, keep)
    selection = Pool().select(view)
    features, sizes = merged(view, selection)
    expected = F.avg_pool2d(image_of(view, view.hidden), window)  # [1, D, h, w]
    assert torch.allclose(features, expected.flatten(2)[0].T, atol=TOL)
    assert sizes.tolist() == [window * window] * keep
    assert not selection.proportional_attention and Pool.positions == "renumbered"


def test_pool_of_a_video_pools_each_frame_with_per_frame_budgets():
    view = grid_view(2, 6, 6, 18, per_frame=True)
    features, _ = merged(view, Pool().select(view))
    expected = F.avg_pool2d(image_of(view, view.hidden), 2)  # [T, D, 3, 3]
    assert torch.allclose(features, expected.flatten(2).permute(0, 2, 1).reshape(-1, WIDTH), atol=TOL)


def test_pool_on_any_budget_partitions_the_image_into_exactly_the_budget():
    for keep in range(1, 36):
        view = grid_view(1, 6, 6, keep)
        selection = Pool().select(view)
        _, sizes = merged(view, selection)
        assert int(selection.keep.sum()) == keep
        assert sizes.sum() == 36  # every image token lives on in exactly one pooled token


@torch.no_grad()
def test_pool_before_the_language_model_keeps_the_budget_per_image(llava_sdpa):
    inputs = llava_inputs([Prompt([2, 3, 1], 2), Prompt([4, 1], 1)])
    with tp.attach(llava_sdpa, tp.ReductionConfig(strategy="pool", layer=0, keep=9)) as handle:
        out = llava_sdpa.generate(**inputs, max_new_tokens=2, do_sample=False)
        (event,) = handle.trace
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert event.visual_after == [9, 9]
    visual = inputs["input_ids"] == IMAGE_TOKEN_ID
    for b in range(2):
        kept = event.kept[b][event.kept[b] >= 0]
        held = event.sizes[b][event.kept[b] >= 0][visual[b, kept]]
        assert held.sum() == visual[b].sum()  # each pooled token holds its window


@pytest.mark.parametrize(
    ("frames", "rows", "cols", "keep"),
    [(1, 6, 6, 9), (1, 6, 6, 16), (1, 5, 5, 9), (1, 7, 5, 12), (2, 6, 6, 18)],
)
def test_downsample_is_area_interpolation(frames, rows, cols, keep):
    view = grid_view(frames, rows, cols, keep)
    selection = Downsample().select(view)
    features, _ = merged(view, selection)
    counts = lattice_counts(view.extent[view.candidates][:1], torch.tensor([keep]), 8)[0].tolist()
    assert math.prod(counts) == keep
    image = image_of(view, view.hidden).permute(1, 0, 2, 3)[None]  # [1, D, T, H, W]
    expected = F.interpolate(image, size=tuple(counts), mode="area")[0]  # [D, t, h, w]
    assert torch.allclose(features, expected.flatten(1).T, atol=TOL)
    assert Downsample.positions == "renumbered" and not selection.proportional_attention


def test_downsample_to_a_non_divisor_grid_shares_tokens_between_neighbouring_cells():
    view = grid_view(1, 5, 5, 9)  # 5 rows into 3: bins 0-1, 1-3, 3-4
    selection = Downsample().select(view)
    _, sizes = merged(view, selection)
    assert sizes.view(3, 3).tolist() == [[4, 6, 4], [6, 9, 6], [4, 6, 4]]
    weights = selection.weights[0][selection.keep[0]][:, view.candidates[0]]  # [9 cells, 25 tokens]
    assert weights.sum(0).view(5, 5)[1].tolist() == [2, 4, 2, 4, 2]  # row 1 feeds two rows of cells


def test_downsample_of_a_budget_that_is_no_grid_keeps_the_uniform_cells_of_the_next_grid():
    view = grid_view(1, 6, 6, 18)  # 4 x 5 = 20 cells: the 18 that uniform keeps of them
    selection = Downsample().select(view)
    assert torch.equal(selection.keep, tp.strategy_class("uniform")().select(view))
    assert int(selection.keep.sum()) == 18


def test_weights_of_a_merge_are_checked():
    view = grid_view(1, 4, 4, 4)
    selection = Downsample().select(view)
    wrong = dataclasses.replace(selection, weights=selection.weights.transpose(1, 2))  # rows at removed slots
    with pytest.raises(tp.StrategyError, match=r"Merge\.weights"):
        check_selection("downsample", selection.keep, view, wrong)
    with pytest.raises(tp.StrategyError, match="combine='average'"):
        check_selection(
            "downsample", selection.keep, view, dataclasses.replace(selection, combine="target_plus_mean")
        )


@torch.no_grad()
def test_downsample_before_the_language_model_resamples_each_image(llava_sdpa):
    inputs = llava_inputs([Prompt([2, 3, 1], 2), Prompt([4, 1], 1)])
    with tp.attach(
        llava_sdpa, tp.ReductionConfig(strategy="downsample", layer=0, keep=4, budget="per_frame")
    ) as handle:
        out = llava_sdpa.generate(**inputs, max_new_tokens=2, do_sample=False)
        (event,) = handle.trace
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert event.visual_after == [8, 4]  # 2 x 2 cells of each 6 x 6 image
    visual = inputs["input_ids"] == IMAGE_TOKEN_ID
    for b in range(2):
        kept = event.kept[b][event.kept[b] >= 0]
        assert event.sizes[b][event.kept[b] >= 0][visual[b, kept]].tolist() == [9.0] * event.visual_after[b]
