"""VL-Cache: one pruning of the KV cache after prefill, ranked by the post-vision window's attention."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from test_cache_site import QWEN_BATCH, assert_matches_oracle, cache_stage, generate
from tokenprune.strategies.vlcache import VLCache

import tokenprune as tp
from tokenprune.testing.models import IMAGE_TOKEN_ID, toy_qwen2_vl
from tokenprune.testing.oracles import Prompt, llava_inputs
from tokenprune.testing.qwen_inputs import qwen_inputs

BATCH = [Prompt([3, 5], 1), Prompt([2, 1, 6], 2)]  # at least WINDOW text tokens after the last image


def cache_view(attention: torch.Tensor, candidates: torch.Tensor, budget: list[int]) -> tp.TokenView:
    """A cache-site view over [B, L] entries whose window paid them `attention`."""
    batch, length = candidates.shape
    return tp.TokenView(
        hidden=torch.zeros(batch, length, 4),
        candidates=candidates,
        valid=torch.ones(batch, length, dtype=torch.bool),
        segment=torch.where(candidates, 0, -1),
        coords=torch.full((batch, length, 3), -1),
        extent=torch.zeros(batch, length, 3, dtype=torch.long),
        positions=torch.arange(length).expand(batch, -1),
        budget=torch.tensor(budget),
        layer=2,
        signals=tp.Signals({"attention": lambda query: attention}),
        site="cache",
    )


def test_the_entries_the_post_vision_window_attends_to_most_stay():
    """Per sample, the budget's most attended visual entries; text entries, however attended, are no
    candidates (the budget counts visual entries only), and ties go to the earlier entry."""
    attention = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.5, 0.0], [0.0, 0.4, 0.1, 0.2, 0.3, 0.9]])
    candidates = torch.tensor([[False, True, True, True, True, False]] * 2)
    keep = VLCache().select(cache_view(attention, candidates, [2, 3]))
    assert keep.tolist() == [
        [False, False, True, False, True, False],
        [False, True, False, True, True, False],
    ]


# -- end to end: the post-vision window's attention, once after prefill ------------------------------

WINDOW = 3
LAYER = 1
RATIO = 0.75


def post_vision_scores(model, inputs: dict) -> torch.Tensor:
    """[B, N] attention the prompt's last WINDOW tokens pay each token in decoder layer LAYER (eager maps
    of the unreduced model, mean over heads and those queries)."""
    attentions = model(**inputs, output_attentions=True, use_cache=False).attentions
    return attentions[LAYER][:, :, -WINDOW:, :].mean(dim=(1, 2))


@torch.no_grad()
def test_the_kept_entries_are_the_top_of_the_post_vision_attention(llava_sdpa, llava_eager):
    """Once, right after prefill (step 1): per sample, the round(n (1 - ratio)) visual entries the last
    WINDOW prompt tokens attend to most in layer LAYER (eager attention maps), ranked with SDPA running."""
    inputs = llava_inputs(BATCH)
    config = tp.ReductionConfig(strategy="vlcache", stages=[cache_stage(LAYER, RATIO, window=WINDOW)])
    with tp.attach(llava_sdpa, config) as handle:
        generate(llava_sdpa, inputs)
        (event,) = handle.trace
    assert event.site == "cache" and event.step == 1 and event.layer == LAYER
    scores = post_vision_scores(llava_eager, inputs)
    visual = inputs["input_ids"] == IMAGE_TOKEN_ID
    for b in range(len(BATCH)):
        budget = round(int(visual[b].sum()) * (1 - RATIO))
        top = torch.topk(scores[b].masked_fill(~visual[b], -1), budget).indices
        kept = event.kept[b][event.kept[b] >= 0]
        assert set(kept[visual[b, kept]].tolist()) == set(top.tolist())


@torch.no_grad()
def test_llava_and_qwen2_vl_equal_the_masked_decode(llava_sdpa):
    """Every generated token's logits equal the unreduced decode with the pruned entries masked from
    layer LAYER on after prefill (1e-4): LLaVA images, Qwen2-VL images and videos, padded batches."""
    stages = [cache_stage(LAYER, RATIO, window=WINDOW)]
    assert_matches_oracle(llava_sdpa, llava_inputs(BATCH), stages, "vlcache")
    qwen = toy_qwen2_vl()
    assert_matches_oracle(qwen, qwen_inputs(qwen, QWEN_BATCH), stages, "vlcache")


def test_the_example_config_prunes_once_by_the_post_vision_window():
    """configs/vlcache-llava.yaml: every layer's cache, 10% of the visual entries, once after prefill, the
    window the text after the image (`tokenprune run` puts half of `text_tokens` there)."""
    run = yaml.safe_load((Path(__file__).parents[1] / "configs" / "vlcache-llava.yaml").read_text())
    (stage,) = tp.ReductionConfig.model_validate(run["reduction"]).stages
    assert (stage.site, stage.layer, stage.ratio, stage.every, stage.restore) == (
        "cache",
        0,
        0.9,
        None,
        False,
    )
    assert stage.window == run["text_tokens"] // 2
