"""`site: vision` stages on Video-LLaVA: its image tower and its video tower, one shared projector.

Images lose their class token before the projector; video frames keep theirs, and it is never
reduced. Oracle for pruning: the *unreduced* model where each tower's later layers hide the tokens
its stage removed as keys, and the language model hides their placeholders as keys from layer 0 on;
kept tokens' logits must match (max abs diff <= 1e-4, float32). Ratio 0 equals no attachment
(<= 1e-5); a sample in a padded batch equals the sample alone; generate() on the reduced cache
equals recomputation.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracles import (
    assert_kept_logits_match,
    generation_positions,
    greedy,
    hooked,
    oracle_masks,
    recomputed_greedy,
    tower_mask_hooks,
)
from test_video_llava import FRAME_TOKENS, IMAGE_TOKENS, SIDE, encoded, media_inputs, prompts_with

import tokenprune as tp

LOGIT_TOL = 1e-4
IDENTITY_TOL = 1e-5
VISION = [name for name in tp.strategies() if "vision" in tp.strategy_class(name).sites]
PRUNING = [name for name in VISION if not tp.strategy_class(name).merges]


def vision(strategy: str, layer: int, ratio: float) -> tp.ReductionConfig:
    return tp.ReductionConfig(strategy=strategy, stages=[{"site": "vision", "layer": layer, "ratio": ratio}])


def forward(model, inputs):
    return model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)


def tower_events(trace, inputs) -> dict[str, tp.ReductionEvent]:
    """The vision events by tower: the image tower's first, then the video tower's (when each ran)."""
    media = (("image", "pixel_values"), ("video", "pixel_values_videos"))
    return dict(zip([name for name, key in media if key in inputs], trace[:-1], strict=True))


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
@given(
    batch=st.lists(prompts_with(1), min_size=1, max_size=2),
    layer=st.integers(0, 1),
    ratio=st.floats(0.1, 0.9),
)
def test_pruning_in_both_towers_matches_the_mask_oracle(video_llava3, strategy, batch, layer, ratio):
    inputs = media_inputs(batch, frames=2)
    with tp.attach(video_llava3, vision(strategy, layer, ratio)) as handle:
        logits = forward(video_llava3, inputs).logits
        trace = handle.trace
    events, language = tower_events(trace, inputs), trace[-1]
    assert {event.site for event in events.values()} == {"vision"}
    assert (language.site, language.layer) == ("language", 0)
    kept = round(SIDE * SIDE * (1 - ratio))
    for event in events.values():  # the class token leads every item and is never reduced
        assert event.tokens_after == [1 + kept] * event.groups.shape[0]
        assert bool((event.kept[:, 0] == 0).all())
    valid = inputs["attention_mask"].bool()
    removed = valid.clone()
    for b, row in enumerate(language.kept):
        removed[b, row[row >= 0]] = False
    model = video_llava3.model
    towers = {"image": model.image_tower.encoder.layers, "video": model.video_tower.encoder.layers}
    handles = [h for name, event in events.items() for h in tower_mask_hooks(towers[name], event)]
    with hooked(handles + oracle_masks(video_llava3, [(0, removed)], valid)):
        expected = forward(video_llava3, inputs).logits
    assert_kept_logits_match(logits, expected, language.kept, LOGIT_TOL)


@torch.no_grad()
def test_each_item_keeps_its_budget_and_frames_keep_their_class_token(video_llava3):
    inputs = media_inputs([[2, "video", 1, "image", 2], [1, "image", 3]], frames=2)
    with tp.attach(video_llava3, vision("uniform", 1, 0.75)) as handle:
        forward(video_llava3, inputs)
        language = handle.trace[-1]
    kept = round(IMAGE_TOKENS * 0.25)
    assert language.visual_after == [2 * (1 + kept) + kept, kept]  # two frames and an image; an image
    video = (inputs["input_ids"][0] == video_llava3.config.video_token_id).nonzero().flatten()
    assert set(video.view(2, FRAME_TOKENS)[:, 0].tolist()) <= set(language.kept[0].tolist())


@torch.no_grad()
@pytest.mark.parametrize("strategy", VISION)
def test_ratio_zero_in_the_towers_is_identity(video_llava3, strategy):
    inputs = media_inputs([[2, "video", 1, "image", 2], [1, "image", 2, "image", 3]], frames=2)
    reference = forward(video_llava3, inputs).logits
    with tp.attach(video_llava3, vision(strategy, 1, 0.0)):
        logits = forward(video_llava3, inputs).logits
    real = inputs["attention_mask"].bool()
    assert (logits - reference)[real].abs().max() <= IDENTITY_TOL


@torch.no_grad()
@pytest.mark.parametrize("strategy", VISION)
def test_a_sample_in_a_batch_equals_the_sample_alone(video_llava3, strategy):
    batch = [[2, "video", 3], [1, "image", 2, "video", 1], [4, "image", 1]]
    inputs = media_inputs(batch, frames=2)
    pad = (1 - inputs["attention_mask"]).sum(1)
    with tp.attach(video_llava3, vision(strategy, 0, 0.6)) as handle:
        together, _ = greedy(video_llava3, inputs, 4)
        kept_together = handle.trace[-1].kept
        for b, prompt in enumerate(batch):
            alone, _ = greedy(video_llava3, media_inputs([prompt], frames=2, seed=b), 4)
            row, kept_alone = kept_together[b], handle.trace[-1].kept[0]
            assert torch.equal(row[row >= 0] - pad[b], kept_alone[kept_alone >= 0])
            assert torch.equal(together[b], alone[0])


@torch.no_grad()
@pytest.mark.parametrize("strategy", VISION)
def test_generate_on_a_tower_reduced_cache_equals_recomputation(video_llava3, strategy):
    """A left-padded batch (one sample without media) decodes on the reduced cache as recomputed."""
    inputs = media_inputs([[3, "image", 4], [1, "video", 2, "image", 5], [6]], frames=2)
    with tp.attach(video_llava3, vision(strategy, 1, 0.7)):
        cached, _ = greedy(video_llava3, inputs, 4)
        recomputed = recomputed_greedy(video_llava3, inputs, 4)
    assert torch.equal(cached, recomputed)


@torch.no_grad()
def test_features_encoded_before_attaching_are_refused(video_llava3):
    inputs = media_inputs([[2, "video", 1, "image", 2]], frames=2)
    outside = encoded(video_llava3, inputs)  # the towers ran without the vision site
    with tp.attach(video_llava3, vision("random", 1, 0.5)):
        with pytest.raises(tp.InputError, match="pass pixel values"):
            forward(video_llava3, outside)
        forward(video_llava3, encoded(video_llava3, inputs))  # encoded while attached: fine
