"""`site: vision` stages: reductions inside LLaVA's CLIP tower, handed to the language model at layer 0.

The last tests run on LLaVA and Video-LLaVA alike: text-only prompts, generate() without the cache,
features the towers did not encode while attached, and beam search (refused with the reason).

Oracle for pruning: the *unreduced* model where the later vision layers hide the removed patches
as keys and the language model hides their placeholder tokens as keys from layer 0 on; the kept
tokens' logits must match (max abs diff <= 1e-4, float32). ToMe in the tower: identity at ratio 0,
sources and sizes, batch equivalence and the cache against recomputation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_video_llava import encoded, media_inputs
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, toy_llava
from tokenprune.testing.oracles import (
    Prompt,
    assert_kept_logits_match,
    generation_positions,
    greedy,
    hooked,
    llava_inputs,
    oracle_masks,
    recomputed_greedy,
    renumbering_hooks,
    tower_mask_hooks,
)

LOGIT_TOL = 1e-4
# Every installed strategy that acts in a vision encoder goes through these tests.
VISION = [name for name in tp.list_strategies() if "vision" in tp.strategy_class(name).sites]
PRUNING = [name for name in VISION if not tp.strategy_class(name).merges]

prompts = st.builds(
    lambda text, images: Prompt(text[: images + 1], images),
    st.lists(st.integers(1, 6), min_size=3, max_size=3),
    st.integers(1, 2),
)


def vision(strategy: str, layer: int, ratio: float) -> tp.ReductionConfig:
    return tp.ReductionConfig(strategy=strategy, stages=[{"site": "vision", "layer": layer, "ratio": ratio}])


def forward(model, inputs):
    return model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
@given(batch=st.lists(prompts, min_size=1, max_size=3), layer=st.integers(0, 1), ratio=st.floats(0.1, 0.9))
def test_pruning_in_the_tower_matches_the_mask_oracle(llava3, strategy, batch, layer, ratio):
    inputs, config = llava_inputs(batch), vision(strategy, layer, ratio)
    with tp.attach(llava3, config) as handle:
        logits = forward(llava3, inputs).logits
        tower_event, language_event = handle.trace
    assert (tower_event.site, language_event.site, language_event.layer) == ("vision", "language", 0)
    valid = inputs["attention_mask"].bool()
    removed = valid.clone()
    for b, row in enumerate(language_event.kept):
        removed[b, row[row >= 0]] = False
    tower = llava3.model.vision_tower.encoder.layers
    handles = tower_mask_hooks(tower, tower_event) + oracle_masks(llava3, [(0, removed)], valid)
    handles += renumbering_hooks(llava3, inputs, [language_event], config)  # the hand-off's position policy
    with hooked(handles):
        expected = forward(llava3, inputs).logits
    assert_kept_logits_match(logits, expected, language_event.kept, LOGIT_TOL)
    per_image = round(36 * (1 - ratio))
    assert tower_event.tokens_after == [1 + per_image] * tower_event.groups.shape[0]


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=1, max_size=3), layer=st.integers(0, 1), ratio=st.floats(0.1, 0.9))
def test_tome_in_the_tower_carries_sources_and_sizes_to_the_language_model(llava3, batch, layer, ratio):
    inputs = llava_inputs(batch)
    with tp.attach(llava3, vision("tome", layer, ratio)) as handle:
        forward(llava3, inputs)
        tower_event, language_event = handle.trace
    assert torch.all(tower_event.sizes.sum(dim=1) == 37)  # class token + 36 patches, none dropped
    visual = (inputs["input_ids"] == IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()
    for b in range(len(batch)):
        kept = language_event.kept[b]
        holders = language_event.groups[b, visual[b]]
        assert bool(visual[b, holders].all())  # every patch lives on in a visual token
        kept_visual = kept[(kept >= 0)][visual[b, kept[kept >= 0]]]
        assert set(holders.tolist()) == set(kept_visual.tolist())
        sizes = language_event.sizes[b][kept >= 0][visual[b, kept[kept >= 0]]]
        assert float(sizes.sum()) == int(visual[b].sum())


def test_vision_sites_are_refused_where_they_do_not_apply(llava3, llava_next):
    with pytest.raises(tp.AttachError, match="no vision tower"):
        tp.attach(llava_next, vision("random", 0, 0.5))
    with pytest.raises(tp.ConfigError, match="past the last vision layer"):
        tp.attach(llava3, vision("random", 2, 0.5))
    both = [{"site": "vision", "layer": 0, "ratio": 0.3}, {"layer": 0, "ratio": 0.5}]
    with pytest.raises(tp.ConfigError, match="layer 0"):
        tp.attach(llava3, tp.ReductionConfig(strategy="random", stages=both))
    with pytest.raises(tp.ConfigError, match="language sites"):
        tp.attach(llava3, vision("dart", 0, 0.5))
    with pytest.raises(ValueError, match="come before"):
        tp.ReductionConfig(stages=[{"layer": 2, "ratio": 0.3}, {"site": "vision", "layer": 0, "ratio": 0.5}])


# -- both VLMs with vision towers: LLaVA (one tower) and Video-LLaVA (two, one shared projector) ---------


@dataclass
class Case:
    """A VLM with vision towers and its inputs: media (a text-only sample among them), a text-only
    batch, other media of the same shapes, and each media sample alone with the same pixels."""

    model: nn.Module
    media: dict[str, Tensor]
    text: dict[str, Tensor]
    other: dict[str, Tensor]
    alone: Callable[[int], dict[str, Tensor]]


def llava_case(model: nn.Module) -> Case:
    batch = [Prompt([3, 4], 1), Prompt([1, 2, 5], 2), Prompt([6], 0)]
    media = llava_inputs(batch)

    def alone(b: int) -> dict[str, Tensor]:
        first = sum(prompt.images for prompt in batch[:b])
        single = llava_inputs([batch[b]], seed=b)
        if batch[b].images:
            single["pixel_values"] = media["pixel_values"][first : first + batch[b].images]
        return single

    text = llava_inputs([Prompt([5], 0), Prompt([2, 3], 0)])
    return Case(model, media, text, llava_inputs(batch, seed=7), alone)


def video_llava_case(model: nn.Module) -> Case:
    batch = [[2, "video", 1, "image", 2], [1, "image", 3], [6]]
    media, text = media_inputs(batch, frames=2), media_inputs([[5], [2, 3]])
    alone = lambda b: media_inputs([batch[b]], frames=2, seed=b)  # noqa: E731 - sample b draws from seed b
    return Case(model, media, text, media_inputs(batch, frames=2, seed=7), alone)


@pytest.fixture(params=["llava3", "video_llava3"])
def vlm(request) -> Case:
    """LLaVA (one tower) and Video-LLaVA (an image and a video tower, one shared projector)."""
    make = llava_case if request.param == "llava3" else video_llava_case
    return make(request.getfixturevalue(request.param))


@torch.no_grad()
@pytest.mark.parametrize("strategy", VISION)
def test_ratio_zero_in_the_towers_is_identity(vlm, strategy):
    reference = forward(vlm.model, vlm.media).logits
    with tp.attach(vlm.model, vision(strategy, 1, 0.0)):
        logits = forward(vlm.model, vlm.media).logits
    real = vlm.media["attention_mask"].bool()
    assert (logits - reference)[real].abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("strategy", VISION)
def test_a_sample_in_a_batch_equals_the_sample_alone(vlm, strategy):
    pad = (1 - vlm.media["attention_mask"]).sum(1)
    with tp.attach(vlm.model, vision(strategy, 0, 0.6)) as handle:
        together, _ = greedy(vlm.model, vlm.media, 4)
        kept_together = handle.trace[-1].kept
        for b in range(len(pad)):
            alone, _ = greedy(vlm.model, vlm.alone(b), 4)
            row, kept_alone = kept_together[b], handle.trace[-1].kept[0]
            assert torch.equal(row[row >= 0] - pad[b], kept_alone[kept_alone >= 0])
            assert torch.equal(together[b], alone[0])


@torch.no_grad()
@pytest.mark.parametrize("strategy", VISION)
def test_generate_on_a_tower_reduced_cache_equals_recomputation(vlm, strategy):
    """A left-padded batch (one sample without media) decodes on the reduced cache as recomputed."""
    with tp.attach(vlm.model, vision(strategy, 1, 0.7)):
        cached, _ = greedy(vlm.model, vlm.media, 4)
        recomputed = recomputed_greedy(vlm.model, vlm.media, 4)
    assert torch.equal(cached, recomputed)


@torch.no_grad()
def test_text_only_prompts_generate_as_without_the_attachment(vlm):
    model, text = vlm.model, vlm.text
    expected, _ = greedy(model, text, 3)
    with tp.attach(model, vision("random", 1, 0.5)) as handle:
        got, _ = greedy(model, text, 3)
        assert [event.site for event in handle.trace] == ["language"]  # the handoff, nothing to drop
    assert torch.equal(got, expected)


@torch.no_grad()
def test_generate_without_the_cache_applies_the_same_selection_at_every_step(vlm):
    model, media = vlm.model, vlm.media
    with tp.attach(model, vision("fastervlm", 1, 0.6)):
        cached, _ = greedy(model, media, 3)
        uncached = model.generate(**media, max_new_tokens=3, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, uncached[:, -3:])


@torch.no_grad()
def test_features_the_towers_did_not_encode_while_attached_are_refused(vlm):
    model, media, other = vlm.model, vlm.media, vlm.other
    outside = encoded(model, media)  # encoded before attaching
    with tp.attach(model, vision("random", 1, 0.5)):
        encoded(model, other)  # the towers run on other media in between
        with pytest.raises(tp.InputError, match="encoded while attached"):
            forward(model, outside)
        forward(model, encoded(model, media))  # encoded while attached: its own selection


@torch.no_grad()
def test_repeated_features_of_beam_search_are_refused_with_the_reason(vlm):
    model, media = vlm.model, vlm.media
    with tp.attach(model, vision("random", 1, 0.5)), pytest.raises(tp.InputError, match="num_return_seq"):
        model.generate(**media, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
def test_with_the_full_feature_strategy_the_class_token_stays_and_the_oracle_holds(strategy):
    model = toy_llava(ToySize(vision_layers=3))
    model.config.vision_feature_select_strategy = "full"  # the class token leads each image's 37 tokens
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)], tokens_per_image=37)
    config = vision(strategy, 0, 0.5)
    with tp.attach(model, config) as handle:
        logits = forward(model, inputs).logits
        tower_event, language_event = handle.trace
    valid = inputs["attention_mask"].bool()
    removed = valid.clone()
    for b, row in enumerate(language_event.kept):
        removed[b, row[row >= 0]] = False
    image = (inputs["input_ids"] == IMAGE_TOKEN_ID).int()
    first_of_image = image.diff(dim=1, prepend=torch.zeros_like(image[:, :1])) == 1
    assert not bool((removed & first_of_image).any())  # each image's class token is kept
    assert language_event.visual_after == [1 + 18, 2 * (1 + 18)]
    tower = model.model.vision_tower.encoder.layers
    handles = tower_mask_hooks(tower, tower_event) + oracle_masks(model, [(0, removed)], valid)
    with hooked(handles + renumbering_hooks(model, inputs, [language_event], config)):
        expected = forward(model, inputs).logits
    assert_kept_logits_match(logits, expected, language_event.kept, LOGIT_TOL)
