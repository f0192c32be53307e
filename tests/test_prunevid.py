"""PruneVid: static cells merge over time, changing ones survive, the question's attention prunes; oracles."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import video_cases
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.strategies.prunevid import (
    PruneVid,
    PruneVidParams,
    proportional_shares,
    segment_starts,
    video_sizes,
)
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.contracts.reducer import Signals, TokenView
from tokenprune.core.selection import checked_select
from tokenprune.registry import adapter_for
from tokenprune.testing.exactness import extended, forward, merge_oracle_logits
from tokenprune.testing.families import llava_onevision, qwen2_vl, qwen3_vl, video_llava
from tokenprune.testing.family import Family
from tokenprune.testing.oracles import assert_kept_logits_match, greedy, hooked
from tokenprune.testing.suite import samples

LOGIT_TOL = 1e-4
STEPS = 3
FAMILIES = {
    "video_llava": video_llava.FAMILY,
    "qwen2_vl": qwen2_vl.FAMILY,
    "llava_onevision_video": llava_onevision.VIDEO_FAMILY,
    "qwen3_vl": qwen3_vl.FAMILY,
}


def video_view(frames: Tensor, budget: int, layer: int = 0) -> TokenView:
    """A one-sample view of a video `frames` [T, H, W, D] between text tokens (`video_cases`), at `layer`."""
    return dataclasses.replace(video_cases.video_view([frames], [budget]), layer=layer)


def static_video(steps: int, rows: int, columns: int, width: int = 16, seed: int = 0) -> Tensor:
    """[T, H, W, D]: one random feature per cell, the same in every frame (plus a little noise)."""
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randn(1, rows, columns, width, generator=generator)
    return cells + 1e-3 * torch.randn(steps, rows, columns, width, generator=generator)


def run(view: TokenView, **params) -> tp.Merge:
    """The layer-0 selection, checked against the contract (budget, candidates, merge targets)."""
    _, merge = checked_select(PruneVid(PruneVidParams(**params)), view)
    assert merge is not None
    return merge


def cell_slots(view: TokenView, row: int, column: int) -> list[int]:
    """The slots of cell (row, column) in every frame."""
    at = (view.coords[0, :, 1] == row) & (view.coords[0, :, 2] == column)
    return at.nonzero().squeeze(1).tolist()


def assert_every_cell_collapses_to_its_first_token(view: TokenView, merge: tp.Merge) -> None:
    """In a 2 x 3 grid of 4 frames, each cell keeps its first frame's token and the rest merge into it."""
    for row in range(2):
        for column in range(3):
            first, *later = cell_slots(view, row, column)
            assert merge.keep[0, first]
            assert merge.into[0, later].tolist() == [first] * 3


def test_a_static_video_collapses_to_one_token_per_cell():
    """Every cell static over one segment: its frames merge into its first frame's token."""
    view = video_view(static_video(4, 2, 3), budget=6)
    merge = run(view, segment_ratio=0.25)
    assert_every_cell_collapses_to_its_first_token(view, merge)


def test_a_changing_region_survives_while_the_static_rest_collapses():
    """Cell (0, 0) changes in every frame: its four tokens stay; the five static cells keep one each."""
    frames = static_video(4, 2, 3)
    frames[:, 0, 0] = 3 * torch.eye(16)[:4]
    view = video_view(frames, budget=5 + 4)
    merge = run(view, segment_ratio=0.25)
    assert merge.keep[0, cell_slots(view, 0, 0)].all()
    assert int(merge.keep.sum()) == 9


def test_segments_are_cut_where_the_scene_changes():
    """Two scenes of four frames: with two segments per eight frames, the cut falls at frame 4."""
    frames = torch.cat([static_video(4, 2, 2, seed=0), static_video(4, 2, 2, seed=1)])
    view = video_view(frames, budget=1)
    starts = segment_starts(view, 0.25, video_sizes(view))
    assert starts[0].tolist() == [0, 0, 0, 0, 4, 4, 4, 4]


def test_static_cells_do_not_merge_across_a_scene_cut():
    """The same static cells in two scenes: each scene keeps its own token per cell."""
    frames = torch.cat([static_video(4, 2, 2, seed=0), static_video(4, 2, 2, seed=1)])
    view = video_view(frames, budget=8)
    merge = run(view, segment_ratio=0.25)
    assert (
        merge.keep[0].nonzero().squeeze(1).tolist()
        == view.positions[0, [2, 3, 4, 5, 18, 19, 20, 21]].tolist()
    )


def test_the_budget_limits_temporal_merging_to_the_most_static_cells():
    """A budget above the cell count: the least static cells stay unmerged, the budget is exact."""
    frames = static_video(4, 2, 2)
    frames[:, 1, 1] += 0.3 * torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    view = video_view(frames, budget=7)
    merge = run(view, segment_ratio=0.25, tau=0.5)
    assert merge.keep[0, cell_slots(view, 1, 1)].all()


@given(
    st.integers(0, 2**16),
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(1, 3),
    st.floats(0.0, 1.0),
    st.floats(0.1, 1.0),
)
def test_any_budget_is_met_exactly_by_one_hop_merges(seed, steps, rows, columns, keep, tau):
    """Random videos, budgets and thresholds: the contract holds (`checked_select`), and each removed
    candidate joins a survivor or is dropped outright."""
    frames = static_video(steps, rows, columns, seed=seed)
    frames = frames + tau * torch.randn(frames.shape, generator=torch.Generator().manual_seed(seed + 1))
    view = video_view(frames, budget=round(keep * steps * rows * columns))
    merge = run(view, tau=tau)
    joined = merge.into[merge.into >= 0]
    assert merge.keep[0, joined].all()


@given(st.lists(st.integers(0, 9), min_size=1, max_size=6), st.integers(0, 60))
def test_proportional_shares_sum_to_the_total_within_each_group(counts, total):
    counts_tensor = torch.tensor([counts])
    total = min(total, sum(counts))
    shares = proportional_shares(torch.tensor([total]), counts_tensor)
    assert int(shares.sum()) == total
    assert bool((shares <= counts_tensor).all())


def test_the_question_stage_keeps_what_the_question_attends_to():
    """At layer K the rows are the text after the video, and the best-attended visual tokens are kept."""
    view = video_view(static_video(2, 2, 2), budget=3, layer=2)
    asked: dict[str, Tensor] = {}
    scores = torch.zeros(1, view.hidden.shape[1])
    scores[0, [3, 6, 9]] = torch.tensor([0.5, 0.9, 0.7])

    def attention_from(rows: Tensor) -> Tensor:
        asked["rows"] = rows
        return scores

    view.signals = Signals({"attention_from": attention_from})
    keep, merge = checked_select(PruneVid(), view)
    assert merge is None
    assert asked["rows"][0].nonzero().squeeze(1).tolist() == [10, 11]
    assert keep[0].nonzero().squeeze(1).tolist() == [3, 6, 9]


def assert_refuses_a_per_frame_budget(reducer: tp.Reducer) -> None:
    """Selecting with a per-frame budget raises a StrategyError naming it."""
    view = video_view(static_video(2, 2, 2), budget=4)
    view.frame_budget = torch.tensor([[2, 2]])
    with pytest.raises(tp.StrategyError, match="per-frame budget"):
        reducer.select(view)


def test_a_per_frame_budget_is_refused_before_the_language_model():
    assert_refuses_a_per_frame_budget(PruneVid())


# -- end to end: the merge oracle, and the mask of the question stage on top ------------------------------


def staged(strategy: str, *stages: dict) -> tp.ReductionConfig:
    """`strategy` applied at each of `stages` (layer, ratio, positions)."""
    return tp.ReductionConfig(strategy=strategy, stages=list(stages))


MERGE = {"layer": 0, "ratio": 0.5}
QUESTION = {"layer": 2, "ratio": 0.75, "positions": "original"}  # the paper's second stage


def question_mask_hooks(family: Family, model: nn.Module, inputs: dict, trace, prompt: int) -> list:
    """Pre-hooks on the attention modules from the question stage's layer on hiding the keys it pruned
    (of the prompt), over the merge oracle's mask; each query still sees itself."""
    merged, pruned = trace
    length = inputs["input_ids"].shape[1]
    removed = torch.zeros(len(pruned.kept), length, dtype=torch.bool)
    for b in range(len(pruned.kept)):
        before, after = merged.kept[b], pruned.kept[b]
        removed[b, before[before >= 0]] = True
        removed[b, after[after >= 0]] = False
    hidden = removed[:, None, None, :] & ~torch.eye(length, dtype=torch.bool)[None, None]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs["attention_mask"].masked_fill(hidden, torch.finfo(torch.float32).min)
        return args, {**kwargs, "attention_mask": mask}

    adapter = adapter_for(model, family.adapter)
    layers = range(pruned.layer, len(adapter.decoder_layers()))
    return [adapter.attention_module(i).register_forward_pre_hook(hook, with_kwargs=True) for i in layers]


@torch.no_grad()
def two_stage_oracle(family: Family, model: nn.Module, inputs: dict, trace, config, prompt: int) -> Tensor:
    """Logits of the merge oracle of the layer-0 stage with the question stage's removed keys hidden."""
    with hooked(question_mask_hooks(family, model, inputs, trace, prompt)):
        return merge_oracle_logits(family, model, inputs, trace[0], False, config)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request) -> tuple[Family, nn.Module, dict]:
    family = FAMILIES[request.param]
    model = family.model("sdpa")
    return family, model, family.inputs(model, samples(family), 0)


def assert_greedy_follows(model: nn.Module, batch: dict, tokens: Tensor, oracle) -> None:
    """Greedy tokens on the reduced cache equal the cache-free greedy continuation under `oracle`."""
    grown = batch
    for _ in range(STEPS):
        last = oracle(grown)[:, -1]
        last[:, list(model.generation_config.suppress_tokens or [])] = float("-inf")
        grown = extended(grown, last.argmax(-1, keepdim=True))
    assert torch.equal(tokens, grown["input_ids"][:, -STEPS:])


def assert_alone_equals_batched(family: Family, model: nn.Module, batch: dict, config) -> None:
    """The second sample of the batch, run alone: the same kept positions and logits (1e-4)."""
    with tp.attach(model, config, adapter=family.adapter) as handle:
        batched = forward(family, model, batch)
        kept = handle.trace[-1].kept
        alone_inputs = family.inputs(model, samples(family)[1:], 1)
        alone = forward(family, model, alone_inputs)
        kept_alone = handle.trace[-1].kept
    offset = batch["input_ids"].shape[1] - alone_inputs["input_ids"].shape[1]
    row, row_alone = kept[1][kept[1] >= 0], kept_alone[0][kept_alone[0] >= 0]
    assert torch.equal(row - offset, row_alone)
    assert (batched[1, row] - alone[0, row_alone]).abs().max() <= LOGIT_TOL


TwoStageOracle = Callable[[Family, nn.Module, dict, list, tp.ReductionConfig, int], Tensor]


@torch.no_grad()
def assert_follows_oracle(
    family_model: tuple[Family, nn.Module, dict], config: tp.ReductionConfig, two_stage: TwoStageOracle | None
) -> None:
    """Kept logits equal the oracle's (1e-4) and greedy decoding on the reduced cache follows it: with one
    stage the merge oracle (something merged), with two `two_stage` (the second stage keeps fewer)."""
    family, model, batch = family_model
    with tp.attach(model, config, adapter=family.adapter) as handle:
        logits = forward(family, model, batch)
        trace = handle.trace
        tokens, _ = greedy(model, batch, STEPS)
    prompt = batch["input_ids"].shape[1]
    if two_stage is None:
        assert trace[0].sizes is not None and bool((trace[0].sizes > 1).any())
    else:
        assert len(trace) == 2
        assert all(a < b for a, b in zip(trace[1].visual_after, trace[0].visual_after, strict=True))

    def oracle(inputs: dict) -> Tensor:
        if two_stage is None:
            return merge_oracle_logits(family, model, inputs, trace[0], False, config)
        return two_stage(family, model, inputs, trace, config, prompt)

    assert_kept_logits_match(logits, oracle(batch), trace[-1].kept, LOGIT_TOL)
    assert_greedy_follows(model, batch, tokens, oracle)


def test_the_merge_stage_equals_the_merge_oracle_with_the_cache(family_model):
    """Layer 0 alone: kept logits equal the merge oracle's (1e-4), and greedy decoding on the merged cache
    equals the oracle's greedy continuation."""
    assert_follows_oracle(family_model, staged("prunevid", MERGE), None)


def test_both_stages_equal_the_merge_oracle_with_the_question_stage_masked(family_model):
    """Merge at layer 0, question-attention pruning at layer 2: kept logits equal the merge oracle with the
    pruned keys hidden from layer 2 on (1e-4), and greedy decoding follows that oracle."""
    assert_follows_oracle(family_model, staged("prunevid", MERGE, QUESTION), two_stage_oracle)


@torch.no_grad()
def test_a_sample_alone_equals_the_same_sample_in_a_batch(family_model):
    family, model, batch = family_model
    assert_alone_equals_batched(family, model, batch, staged("prunevid", MERGE, QUESTION))
