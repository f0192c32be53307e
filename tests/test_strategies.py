"""Each built-in strategy's defining property, on crafted inputs and on the toy model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import BUILT_IN_STRATEGIES
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.strategies.uniform import lattice, strided

import tokenprune as tp
from tokenprune.contracts.reducer import split_budget, strategy_label, top_k_mask
from tokenprune.registry import STRATEGIES
from tokenprune.testing.oracles import Prompt, class_token_view, llava_inputs


def test_top_k_breaks_ties_towards_earlier_tokens():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]])
    candidates = torch.tensor([[True, True, True, True, False]])
    keep = top_k_mask(scores, candidates, torch.tensor([3]))
    assert keep.tolist() == [[True, True, True, False, False]]


@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=6), frac=st.floats(0, 1))
def test_split_budget_is_exact_and_proportional(sizes, frac):
    budget = int(sum(sizes) * frac)
    shares = split_budget(budget, sizes)
    assert sum(shares) == budget
    assert all(0 <= s <= n for s, n in zip(shares, sizes, strict=True))
    if sum(sizes):
        assert all(abs(s - budget * n / sum(sizes)) < 1 for s, n in zip(shares, sizes, strict=True))


@given(t=st.integers(1, 4), h=st.integers(1, 12), w=st.integers(1, 12), data=st.data())
def test_lattice_is_exact_and_inside_the_grid(t, h, w, data):
    k = data.draw(st.integers(0, t * h * w))
    cells = lattice((t, h, w), k)
    assert len(cells) == len(set(cells)) == k
    assert all(0 <= a < t and 0 <= b < h and 0 <= c < w for a, b, c in cells)


def test_uniform_is_a_strided_2d_grid():
    assert lattice((1, 6, 6), 9) == [(0, r, c) for r in (1, 3, 5) for c in (1, 3, 5)]
    assert strided(24, 12) == list(range(1, 24, 2))
    cells = lattice((1, 24, 24), 144)
    assert sorted({r for _, r, _ in cells}) == list(range(1, 24, 2))
    assert sorted({c for _, _, c in cells}) == list(range(1, 24, 2))


@torch.no_grad()
def test_uniform_on_the_model_spreads_each_image(llava_sdpa):
    inputs = llava_inputs([Prompt([2, 3, 1], 2)])
    with tp.attach(llava_sdpa, tp.ReductionConfig(strategy="uniform", layer=1, keep=18)) as handle:
        llava_sdpa(**inputs, use_cache=False)
        kept = handle.trace[0].kept[0]
    starts = (inputs["input_ids"][0] == 3).nonzero().squeeze(1)
    for first in (starts[0], starts[36]):  # two 6x6 images, 9 tokens each
        cells = [int(p - first) for p in kept if 0 <= p - first < 36]
        assert sorted(cells) == [6 * r + c for r in (1, 3, 5) for c in (1, 3, 5)]


@torch.no_grad()
def test_random_is_seeded_and_position_independent(llava_sdpa):
    inputs = llava_inputs([Prompt([2, 3], 1)])
    kept = {}
    for seed in (0, 0, 1):
        with tp.attach(
            llava_sdpa, tp.ReductionConfig(strategy="random", layer=1, ratio=0.5, params={"seed": seed})
        ) as h:
            llava_sdpa(**inputs, use_cache=False)
            kept.setdefault(seed, []).append(h.trace[0].kept)
    assert torch.equal(kept[0][0], kept[0][1])
    assert not torch.equal(kept[0][0], kept[1][0])


@pytest.fixture
def recorded_signals():
    """A strategy that records the attention signal it is given (registered for this test only)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    @tp.register_strategy("recording")
    class Recording(tp.ScoreReducer):
        requires = frozenset({"attention"})

        def score(self, view: tp.TokenView) -> torch.Tensor:
            seen.append((view.signals.attention("last"), view.signals.attention("mean")))
            return torch.zeros_like(view.valid, dtype=torch.float32)

    yield seen
    tp.registry.STRATEGIES.unregister("recording")


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_attention_signal_equals_eager_attention_maps(llava_eager, recorded_signals, layer):
    """The probe's scores equal the head-averaged weights eager attention returns at layer K-1."""
    inputs = llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    real = inputs["attention_mask"].bool()
    maps = llava_eager(**inputs, use_cache=False, output_attentions=True).attentions[layer - 1].mean(dim=1)
    with tp.attach(llava_eager, tp.ReductionConfig(strategy="recording", layer=layer, ratio=0.5)):
        llava_eager(**inputs, use_cache=False)
    (last, mean) = recorded_signals[-1]
    for b in range(2):
        assert (last[b][real[b]] - maps[b, -1][real[b]]).abs().max() <= 1e-5
        expected_mean = maps[b][real[b]][:, real[b]].sum(0) / real[b].sum()
        assert (mean[b][real[b]] - expected_mean).abs().max() <= 1e-5


@torch.no_grad()
def test_fastv_keeps_the_most_attended_tokens(llava_eager):
    inputs = llava_inputs([Prompt([3, 2], 1)])
    maps = llava_eager(**inputs, use_cache=False, output_attentions=True).attentions[1].mean(dim=1)[0, -1]
    with tp.attach(llava_eager, tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.75)) as handle:
        llava_eager(**inputs, use_cache=False)
        kept = handle.trace[0].kept[0]
    visual = (inputs["input_ids"][0] == 3).nonzero().squeeze(1)
    expected = visual[maps[visual].topk(9).indices].sort().values
    assert torch.equal(kept[(inputs["input_ids"][0, kept] == 3)], expected)


def test_grouped_top_k_keeps_each_groups_budget():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.5]])
    candidates = torch.tensor([[True, True, True, True, True, True, False]])
    groups = torch.tensor([[0, 0, 0, 1, 1, 1, -1]])
    keep = top_k_mask(scores, candidates, torch.tensor([[1, 2]]), groups)
    assert keep.tolist() == [[True, False, False, False, True, True, False]]


@torch.no_grad()
@pytest.mark.parametrize("strategy", BUILT_IN_STRATEGIES)
@given(ratio=st.floats(0.0, 0.95), layer=st.integers(1, 3))
def test_per_frame_budgets_keep_each_segments_share(llava_sdpa, strategy, ratio, layer):
    inputs = llava_inputs([Prompt([2, 3, 1], 2), Prompt([4, 1], 1)])
    config = tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio, budget="per_frame")
    with tp.attach(llava_sdpa, config) as handle:
        llava_sdpa(**inputs, use_cache=False)
        kept = handle.trace[0].kept
    for b, row in enumerate(kept):
        starts = (inputs["input_ids"][b] == 3).nonzero().squeeze(1)[::36]
        for first in starts:
            in_image = [p for p in row.tolist() if 0 <= p - first < 36]
            assert len(in_image) == round(36 * (1 - ratio))


def test_quota_is_always_a_budget_per_group():
    """[B, G] budgets and [B, L] groups (non-candidates -1), with one budget per sample or per frame."""
    view = class_token_view(2, (2, 3), budget=4, signals={})
    budget, groups = view.quota()
    assert budget.tolist() == [[4], [4]]
    assert groups.tolist() == [[-1, 0, 0, 0, 0, 0, 0]] * 2
    frame = torch.tensor([[5, 0, 0, 0, 1, 1, 1]] * 2)  # slot 0 is no candidate: its frame is ignored
    per_frame = dataclasses.replace(view, frame=frame, frame_budget=torch.tensor([[1, 3], [2, 2]]))
    budget, groups = per_frame.quota()
    assert budget.tolist() == [[1, 3], [2, 2]]
    assert groups.tolist() == [[-1, 0, 0, 0, 1, 1, 1]] * 2


@torch.no_grad()
def test_a_score_of_the_wrong_shape_names_the_strategy_and_the_expected_shape(llava_sdpa):
    @tp.register_strategy("test_one_score_per_sample")
    class PerSample(tp.ScoreReducer):
        def score(self, view: tp.TokenView) -> torch.Tensor:
            return view.hidden.sum(dim=(1, 2))  # [B], not [B, L]

    inputs = llava_inputs([Prompt([2, 3], 1), Prompt([4, 1], 1)])
    length = inputs["input_ids"].shape[1]
    try:
        config = tp.ReductionConfig(strategy="test_one_score_per_sample", layer=2, ratio=0.5)
        with tp.attach(llava_sdpa, config), pytest.raises(tp.StrategyError) as caught:
            llava_sdpa(**inputs)
    finally:
        STRATEGIES.unregister("test_one_score_per_sample")
    assert str(caught.value) == (
        f"strategy 'test_one_score_per_sample' ({PerSample.__qualname__}): score returned (2,), expected one "
        f"score per token of the view: [B, L] = (2, {length}) (batch, tokens entering the site)"
    )


def test_errors_name_a_strategy_by_its_registered_name():
    fastv = tp.strategy_class("fastv")
    assert strategy_label(fastv()) == "strategy 'fastv' (FastV)"

    class Unregistered(fastv):
        pass

    assert strategy_label(Unregistered()) == f"strategy {Unregistered.__qualname__}"  # not 'fastv'
