"""`site: vision` stages on Video-LLaVA: its image tower and its video tower, one shared projector.

Images lose their class token before the projector; video frames keep theirs, and it is never
reduced. Oracle for pruning: the *unreduced* model where each tower's later layers hide the tokens
its stage removed as keys, and the language model hides their placeholders as keys from layer 0 on;
kept tokens' logits must match (max abs diff <= 1e-4, float32). Ratio 0, a sample in a padded
batch against the sample alone, generate() against recomputation and refused features run on
LLaVA and Video-LLaVA alike in test_vision_site.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_video_llava import FRAME_TOKENS, IMAGE_TOKENS, SIDE, media_inputs, prompts_with
from test_vision_site import PRUNING, forward, vision

import tokenprune as tp
from tokenprune.testing.oracles import (
    assert_kept_logits_match,
    hooked,
    oracle_masks,
    renumbering_hooks,
    tower_mask_hooks,
)

LOGIT_TOL = 1e-4


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
    inputs, config = media_inputs(batch, frames=2), vision(strategy, layer, ratio)
    with tp.attach(video_llava3, config) as handle:
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
    handles += renumbering_hooks(video_llava3, inputs, trace, config)  # the hand-off's position policy
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
