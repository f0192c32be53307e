"""SparseVLM: text raters, their attention in the language model, recycling by density peaks, merge oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_tome import merge_oracle_hooks
from tokenprune.strategies.sparsevlm import density_peaks, recycled_counts, text_raters

import tokenprune as tp
from tokenprune.contracts.reducer import top_k_mask
from tokenprune.registry import STRATEGIES
from tokenprune.testing.models import IMAGE_TOKEN_ID, toy_qwen2_vl
from tokenprune.testing.oracles import (
    Prompt,
    assert_kept_logits_match,
    generation_positions,
    hooked,
    llava_inputs,
)
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs

TOL = 1e-5
LOGIT_TOL = 1e-4

prompts = st.builds(
    lambda text, images: Prompt(text[: images + 1], images),
    st.lists(st.integers(1, 6), min_size=3, max_size=3),
    st.integers(0, 2),
)


def naive_raters(embeddings: torch.Tensor, visual: list[int], instruction: list[int]) -> set[int]:
    """Raters written out per visual token: softmax over the instruction, mean over the image, above mean."""
    relevance = torch.zeros(len(instruction))
    for v in visual:
        relevance += torch.softmax(embeddings[instruction] @ embeddings[v], dim=0) / len(visual)
    return {t for t, r in zip(instruction, relevance, strict=True) if r > relevance.mean()}


def test_raters_are_the_instruction_tokens_most_relevant_to_the_image():
    """Visual tokens along e1; of the instruction, the tokens along e1 are raters, the others are not."""
    e1 = torch.tensor([1.0, 0.0])
    embeddings = torch.stack([-e1, e1, e1, e1, 5 * e1, 0 * e1, -e1, 4 * e1])  # text, 3 visual, instruction
    visual = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    instruction = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    raters = text_raters(embeddings[None], visual, instruction)
    assert raters[0].nonzero().squeeze(1).tolist() == [4, 7]  # the text before the image never rates


@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 6))
def test_raters_equal_the_naive_rule_row_by_row(seed, n_visual, n_text):
    generator = torch.Generator().manual_seed(seed)
    length = n_visual + n_text + 2
    embeddings = torch.randn(2, length, 8, generator=generator)
    visual = torch.zeros(2, length, dtype=torch.bool)
    instruction = torch.zeros(2, length, dtype=torch.bool)
    visual[0, 1 : 1 + n_visual], instruction[0, 1 + n_visual : 1 + n_visual + n_text] = True, True
    visual[1, 2 : 2 + n_visual], instruction[1, 2 + n_visual :] = True, True
    raters = text_raters(embeddings, visual, instruction)
    for b in range(2):
        expected = naive_raters(
            embeddings[b],
            visual[b].nonzero().squeeze(1).tolist(),
            instruction[b].nonzero().squeeze(1).tolist(),
        )
        assert set(raters[b].nonzero().squeeze(1).tolist()) == expected


@pytest.fixture
def rows_attention():
    """Registers `record_rows`: records `attention_from` the last two real tokens of each sample."""
    seen: list[torch.Tensor] = []

    @tp.register_strategy("record_rows")
    class RecordRows(tp.Reducer):
        requires = frozenset({"attention_from"})

        def select(self, view: tp.TokenView) -> torch.Tensor:
            last_two = view.valid & (view.valid.flip(1).cumsum(1).flip(1) <= 2)
            seen.append(view.signals.get("attention_from", rows=last_two))
            return top_k_mask(torch.zeros(view.valid.shape), view.candidates, *view.quota())

    yield seen
    STRATEGIES.unregister("record_rows")


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 3])
def test_attention_from_rows_equals_eager_attention_of_layer_k_minus_1(llava_eager, rows_attention, layer):
    inputs = llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    real = inputs["attention_mask"].bool()
    maps = llava_eager(**inputs, use_cache=False, output_attentions=True).attentions[layer - 1]
    expected = maps.mean(dim=1)[:, -2:].mean(dim=1)  # both samples end at the last column
    with tp.attach(llava_eager, tp.ReductionConfig(strategy="record_rows", layer=layer, ratio=0.5)):
        llava_eager(**inputs, use_cache=False)
    (got,) = rows_attention
    assert (got - expected)[real].abs().max() <= TOL


@torch.no_grad()
def test_without_recycling_it_keeps_the_tokens_the_raters_attend_to_most(llava_eager):
    inputs = llava_inputs([Prompt([3, 5], 1)])
    ids = inputs["input_ids"][0]
    out = llava_eager(**inputs, use_cache=False, output_attentions=True, output_hidden_states=True)
    visual = (ids == IMAGE_TOKEN_ID).nonzero().squeeze(1)
    instruction = list(range(int(visual[-1]) + 1, len(ids)))
    raters = sorted(naive_raters(out.hidden_states[0][0], visual.tolist(), instruction))
    score = out.attentions[1].mean(dim=1)[0, raters].mean(dim=0)
    expected = visual[score[visual].topk(9).indices].sort().values
    config = tp.ReductionConfig(strategy="sparsevlm", layer=2, keep=9, params={"merge": False})
    with tp.attach(llava_eager, config) as handle:
        llava_eager(**inputs, use_cache=False)
        kept = handle.trace[0].kept[0]
    assert torch.equal(kept[ids[kept] == IMAGE_TOKEN_ID], expected)


@pytest.mark.parametrize(("n", "budget"), [(576, 300), (300, 200), (200, 110), (576, 66), (36, 35), (36, 1)])
def test_the_recycled_tokens_count_inside_the_budget_as_the_reference_counts_them(n, budget):
    clusters, recycled = recycled_counts(torch.tensor([[n]]), torch.tensor([[budget]]), 0.3, 10)
    reference = (int(0.3 * (n - budget)) + 1) // 10 + 1  # cluster_num of the released code
    assert int(clusters) == min(reference, budget - 1)
    pruned = n - (budget - int(clusters))
    expected = min(int(0.3 * pruned) + 1, pruned) if int(clusters) else 0  # a budget of 1 recycles nothing
    assert int(recycled) == expected and int(recycled) >= int(clusters)


def test_density_peaks_puts_one_centre_in_each_blob_and_never_across_groups():
    """Two tight blobs per group: each gets one centre, and every member joins the centre of its blob."""
    generator = torch.Generator().manual_seed(0)
    blob = torch.randn(5, 3, generator=generator) * 0.05
    points = torch.cat([blob, blob + 10, blob + 20, blob + 30])[None]  # groups 0: blobs 0, 1; group 1: 2, 3
    groups = torch.tensor([[0] * 10 + [1] * 10])
    members = torch.ones(1, 20, dtype=torch.bool)
    centres, nearest = density_peaks(points, members, groups, torch.tensor([[2, 2]]))
    blob_of = torch.arange(20) // 5
    assert sorted(blob_of[centres[0]].tolist()) == [0, 1, 2, 3]
    assert bool(centres[0, nearest[0]].all()) and torch.equal(blob_of[nearest[0]], blob_of)


def test_layer_0_is_refused_at_attach(llava):
    """The raters' attention is layer K-1's: `layer: 0` has no layer before it, refused up front."""
    with pytest.raises(tp.ConfigError, match="attention_from"):
        tp.attach(llava, sparsevlm(0, 0.5))
    assert not llava.model.language_model.layers[0]._forward_pre_hooks  # nothing was left attached


def sparsevlm(layer: int, ratio: float) -> tp.ReductionConfig:
    return tp.ReductionConfig(strategy="sparsevlm", layer=layer, ratio=ratio, positions="original")


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=1, max_size=3), layer=st.integers(1, 3), ratio=st.floats(0.1, 0.9))
def test_merge_oracle_prefill(llava, batch, layer, ratio):
    """Kept positions' logits equal the unreduced model with each survivor replaced by its group's average."""
    inputs = llava_inputs(batch)
    positions = generation_positions(inputs["attention_mask"])
    with tp.attach(llava, sparsevlm(layer, ratio)) as handle:
        logits = llava(**inputs, position_ids=positions, use_cache=False).logits
        (event,) = handle.trace
    assert event.visual_after == [round(n * (1 - ratio)) for n in event.visual_before]
    with hooked(merge_oracle_hooks(llava, event, inputs["attention_mask"].bool(), proportional=False)):
        expected = llava(**inputs, position_ids=positions, use_cache=False).logits
    assert_kept_logits_match(logits, expected, event.kept, LOGIT_TOL)


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 3])
def test_merge_oracle_on_qwen2_vl_with_3d_positions(layer):
    model = toy_qwen2_vl()
    batch = [
        QwenPrompt([2, 1, 3], [Item((1, 4, 6)), Item((2, 4, 4), video=True)]),
        QwenPrompt([1, 2], [Item((1, 2, 4))]),
    ]
    inputs = qwen_inputs(model, batch)
    with tp.attach(model, sparsevlm(layer, 0.6)) as handle:
        logits = model(**inputs, use_cache=False).logits
        (event,) = handle.trace
    assert event.sizes is not None and float(event.sizes.max()) > 1  # something was recycled
    with hooked(merge_oracle_hooks(model, event, inputs["attention_mask"].bool(), proportional=False)):
        expected = model(**inputs, use_cache=False).logits
    assert_kept_logits_match(logits, expected, event.kept, LOGIT_TOL)
