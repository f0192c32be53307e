"""CDPruner's defining property: greedy MAP of a DPP conditioned on relevance to the instruction."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_qwen2_vl import MIXED, assert_matches_oracle
from tokenprune.strategies.cdpruner import CDPruner, CDPrunerParams, conditional_kernel, greedy_map

import tokenprune as tp
from tokenprune.testing.models import IMAGE_TOKEN_ID, toy_qwen2_vl
from tokenprune.testing.oracles import (
    Prompt,
    assert_kept_logits_match,
    assert_same_greedy,
    generation_positions,
    hooked,
    llava_inputs,
    oracle_greedy,
    oracle_logits,
)
from tokenprune.testing.qwen_inputs import qwen_inputs, qwen_oracle_logits

LOGIT_TOL = 1e-4


def naive_greedy_log_det(kernel: torch.Tensor, members: list[int], k: int) -> set[int]:
    """Greedy MAP written out naively (float64, every determinant recomputed): the oracle."""
    kernel = kernel.double()
    chosen: list[int] = []
    for _ in range(k):
        gains = {
            i: torch.linalg.det(kernel[[*chosen, i]][:, [*chosen, i]]) for i in members if i not in chosen
        }
        chosen.append(max(gains, key=lambda i: (gains[i], -i)))
    return set(chosen)


def line_view(features: torch.Tensor, text: int, budget: int) -> tp.TokenView:
    """One sample: `features` [n, D] visual tokens (a 1 x n grid) followed by `text` instruction tokens."""
    n, width = features.shape
    hidden = torch.cat([features, torch.zeros(text, width)])[None]
    visual = torch.tensor([True] * n + [False] * text)[None]
    coords = torch.full((1, n + text, 3), -1)
    coords[0, :n] = torch.stack([torch.zeros(n), torch.zeros(n), torch.arange(n)], dim=1).long()
    extent = torch.zeros(1, n + text, 3, dtype=torch.long)
    extent[0, :n] = torch.tensor([1, 1, n])
    return tp.TokenView(
        hidden=hidden,
        candidates=visual,
        valid=torch.ones_like(visual),
        segment=torch.where(visual, 0, -1),
        coords=coords,
        extent=extent,
        positions=torch.arange(n + text)[None],
        budget=torch.tensor([budget]),
        layer=0,
    )


@given(
    st.lists(st.integers(2, 9), min_size=1, max_size=3),
    st.integers(0, 2**16),
    st.data(),
)
def test_greedy_map_takes_the_largest_log_det_gain_in_each_group_of_a_ragged_batch(sizes, seed, data):
    """Batched over rows and groups, each pick equals the naive greedy's on that group alone."""
    generator = torch.Generator().manual_seed(seed)
    batch, length, groups_per_row = len(sizes), max(sizes) + 2, 2
    features = torch.randn(batch, length, 12, generator=generator)
    weight = torch.rand(batch, length, generator=generator) + 0.1
    groups = torch.full((batch, length), -1)
    budget = torch.zeros(batch, groups_per_row, dtype=torch.long)
    for b, size in enumerate(sizes):
        groups[b, 1 : 1 + size] = torch.arange(size) % groups_per_row  # slot 0 and the tail: not ranked
        for g in range(groups_per_row):
            budget[b, g] = data.draw(st.integers(0, int((groups[b] == g).sum())))
    kernel = conditional_kernel(features, weight, groups)
    keep = greedy_map(kernel, groups, budget)
    for b in range(batch):
        for g in range(groups_per_row):
            members = (groups[b] == g).nonzero().squeeze(1).tolist()
            expected = naive_greedy_log_det(kernel[b], members, int(budget[b, g]))
            assert set(keep[b].nonzero().squeeze(1).tolist()) & set(members) == expected
        assert not bool(keep[b][groups[b] < 0].any())


def test_past_the_kernels_rank_the_earliest_tokens_fill_the_budget_whatever_the_float_noise():
    """Ten tokens in three dimensions: three picks span the kernel, the other five are the earliest left,
    the same when the features move by float noise (a sample in a padded batch vs alone)."""
    features = torch.randn(1, 10, 3, generator=torch.Generator().manual_seed(0))
    weight, groups = torch.linspace(1, 2, 10)[None], torch.zeros(1, 10, dtype=torch.long)

    def picks(x: torch.Tensor, k: int) -> set[int]:
        keep = greedy_map(conditional_kernel(x, weight, groups), groups, torch.tensor([[k]]))
        return set(keep[0].nonzero().squeeze(1).tolist())

    spanning = picks(features, 3)
    assert picks(features, 8) == spanning | set([i for i in range(10) if i not in spanning][:5])
    for seed in range(20):
        noise = torch.randn(1, 10, 3, generator=torch.Generator().manual_seed(seed)) * 1e-6
        assert picks(features + noise, 8) == picks(features, 8)


def test_among_equally_diverse_tokens_relevance_decides():
    """Orthogonal tokens: the kernel is diagonal, so the most relevant to the instruction are kept."""
    features = torch.eye(6)
    view = line_view(features, text=2, budget=2)
    view.hidden[0, 6:] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.3, 0.0])  # the instruction points at 3, then 4
    keep = CDPruner().select(view)
    assert keep[0].nonzero().squeeze(1).tolist() == [3, 4]
    opposite = CDPruner(CDPrunerParams(negate=True)).select(view)  # the reference's sign: the least similar
    assert 3 not in opposite[0].nonzero().squeeze(1).tolist()


def test_among_equally_relevant_tokens_the_most_diverse_are_kept():
    """Three copies of one direction and one other: a duplicate adds nothing to the determinant."""
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1e-4], [0.0, 1.0]])
    view = line_view(features, text=1, budget=2)
    view.hidden[0, 4] = torch.tensor([1.0, 1.0])  # equally relevant to every token
    keep = CDPruner().select(view)[0].nonzero().squeeze(1).tolist()
    assert 3 in keep and len(keep) == 2


def naive_cdpruner(visual: torch.Tensor, instruction: torch.Tensor, k: int) -> set[int]:
    """The method written out naively on one sample: relevance, kernel, greedy log det (float64)."""
    unit = torch.nn.functional.normalize(visual.double(), dim=-1)
    text = torch.nn.functional.normalize(instruction.double(), dim=-1)
    relevance = (unit @ text.T).mean(dim=1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    return naive_greedy_log_det(kernel, list(range(len(visual))), k)


@torch.no_grad()
def test_before_the_language_model_it_keeps_the_naive_conditional_dpp_set(llava_sdpa):
    """End to end at layer 0: projector outputs against the instruction's input embeddings, per sample."""
    inputs = llava_inputs([Prompt([2, 3], 1), Prompt([4, 5], 1)])
    embeddings = llava_sdpa.get_input_embeddings()(inputs["input_ids"])
    features = []
    with hooked(
        [llava_sdpa.model.multi_modal_projector.register_forward_hook(lambda m, a, out: features.append(out))]
    ):
        config = tp.ReductionConfig(strategy="cdpruner", layer=0, keep=6)
        with tp.attach(llava_sdpa, config) as handle:
            llava_sdpa(**inputs, use_cache=False)
            (event,) = handle.trace
    (projected,) = features
    for b in range(2):
        ids = inputs["input_ids"][b]
        visual = (ids == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        instruction = embeddings[b, visual[-1] + 1 :][inputs["attention_mask"][b, visual[-1] + 1 :].bool()]
        expected = naive_cdpruner(projected[b], instruction, 6)
        kept = event.kept[b]
        assert {int(p) - int(visual[0]) for p in kept if ids[p] == IMAGE_TOKEN_ID} == expected


@torch.no_grad()
@pytest.mark.parametrize("budget", ["sample", "per_frame"])
def test_layer_0_matches_the_mask_oracle_with_original_positions(llava, budget):
    inputs = llava_inputs([Prompt([2, 3, 1], 2), Prompt([5, 1], 1)])
    config = tp.ReductionConfig(strategy="cdpruner", layer=0, ratio=0.7, budget=budget, positions="original")
    with tp.attach(llava, config) as handle:
        logits = llava(
            **inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False
        ).logits
        out = llava.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        trace = handle.trace
    expected = oracle_logits(llava, inputs, trace)
    for b, row in enumerate(trace[-1].kept):
        row = row[row >= 0]
        assert (logits[b, row] - expected[b, row]).abs().max() <= LOGIT_TOL
    assert_same_greedy(out[:, -4:], *oracle_greedy(llava, inputs, trace, 4))


@torch.no_grad()
def test_the_default_renumbers_like_the_unreduced_model_on_the_shortened_inputs(llava_sdpa):
    """The reference feeds the kept tokens as a shorter sequence: contiguous positions from layer 0 on."""
    assert CDPruner.positions == "renumbered"
    inputs = llava_inputs([Prompt([2, 3], 1), Prompt([4, 1, 2], 2)])
    config = tp.ReductionConfig(strategy="cdpruner", layer=0, keep=9)
    with tp.attach(llava_sdpa, config) as handle:
        logits = llava_sdpa(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        trace = handle.trace
    expected = oracle_logits(llava_sdpa, inputs, trace, config=config)
    for b, row in enumerate(trace[-1].kept):
        row = row[row >= 0]
        assert (logits[b, row] - expected[b, row]).abs().max() <= LOGIT_TOL


@torch.no_grad()
@pytest.mark.parametrize("budget", ["sample", "per_frame"])
def test_qwen2_vl_layer_0_matches_the_mask_oracle(budget):
    model = toy_qwen2_vl()
    config = tp.ReductionConfig(strategy="cdpruner", layer=0, ratio=0.6, budget=budget, positions="original")
    assert_matches_oracle(model, qwen_inputs(model, MIXED), config)


@torch.no_grad()
def test_qwen2_vl_default_renumbers_as_the_rope_index_of_the_shortened_inputs():
    model = toy_qwen2_vl()
    inputs = qwen_inputs(model, MIXED)
    config = tp.ReductionConfig(strategy="cdpruner", layer=0, ratio=0.6)
    with tp.attach(model, config) as handle:
        logits = model(**inputs, use_cache=False).logits
        trace = handle.trace
    assert_kept_logits_match(logits, qwen_oracle_logits(model, inputs, trace, config=config), trace[-1].kept)
