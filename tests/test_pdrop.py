"""PyramidDrop: the next layer's attention signal, its ranking, and the paper's schedule of token counts."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import tokenprune as tp
from tokenprune.contracts.reducer import top_k_mask
from tokenprune.registry import STRATEGIES
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, toy_llava, toy_qwen2_vl
from tokenprune.testing.oracles import Prompt, llava_inputs, oracle_masks, removed_positions
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs

CONFIGS = Path(__file__).parents[1] / "configs"
TOL = 1e-5


@pytest.fixture
def next_attention():
    """Registers `record_next`: keeps the first candidates and records `next_attention` at every stage."""
    seen: list[torch.Tensor] = []

    @tp.register_strategy("record_next")
    class RecordNext(tp.Reducer):
        requires = frozenset({"next_attention"})

        def select(self, view: tp.TokenView) -> torch.Tensor:
            seen.append(view.signals.get("next_attention", query="last"))
            return top_k_mask(torch.zeros(view.valid.shape), view.candidates, *view.quota())

    yield seen
    STRATEGIES.unregister("record_next")


def eager_rows(model, inputs, layer: int, trace=None) -> torch.Tensor:
    """[B, N] head-averaged attention row of each sample's last token at `layer`, from eager maps.

    With a trace, under the mask oracle: the trace's removed tokens are hidden as keys from their stage on.
    """
    handles = (
        []
        if trace is None
        else oracle_masks(
            model, removed_positions(trace, inputs["attention_mask"].bool()), inputs["attention_mask"].bool()
        )
    )
    try:
        maps = model(**inputs, use_cache=False, output_attentions=True).attentions[layer]
    finally:
        for h in handles:
            h.remove()
    return maps.mean(dim=1)[:, -1]


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_next_attention_equals_eager_attention_of_layer_k(llava_eager, next_attention, layer):
    """At a site before layer K: layer K's own attention row of the last token (eager, output_attentions)."""
    inputs = llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    real = inputs["attention_mask"].bool()
    expected = eager_rows(llava_eager, inputs, layer)
    with tp.attach(llava_eager, tp.ReductionConfig(strategy="record_next", layer=layer, ratio=0.5)):
        llava_eager(**inputs, use_cache=False)
    (got,) = next_attention
    assert (got - expected)[real].abs().max() <= TOL
    assert bool((got[~real] == 0).all())


@torch.no_grad()
def test_next_attention_at_a_later_stage_is_on_the_shortened_sequence(llava_eager, next_attention):
    """At stage 2 the row covers the kept tokens only and equals the mask oracle's eager row there."""
    inputs = llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    config = tp.ReductionConfig(
        strategy="record_next", stages=[{"layer": 1, "ratio": 0.5}, {"layer": 3, "ratio": 0.8}]
    )
    with tp.attach(llava_eager, config) as handle:
        llava_eager(**inputs, use_cache=False)
        trace = handle.trace
    expected = eager_rows(llava_eager, inputs, 3, trace[:1])
    got, kept = next_attention[1], trace[0].kept
    for b in range(2):
        row = kept[b] >= 0
        assert (got[b, row] - expected[b, kept[b, row]]).abs().max() <= TOL
        assert bool((got[b, ~row] == 0).all())


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_pdrop_keeps_the_tokens_layer_k_attends_to_most(llava_eager, layer):
    inputs = llava_inputs([Prompt([3, 2], 1)])
    row = eager_rows(llava_eager, inputs, layer)[0]
    with tp.attach(llava_eager, tp.ReductionConfig(strategy="pdrop", layer=layer, keep=9)) as handle:
        llava_eager(**inputs, use_cache=False)
        kept = handle.trace[0].kept[0]
    visual = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
    expected = visual[row[visual].topk(9).indices].sort().values
    assert torch.equal(kept[inputs["input_ids"][0, kept] == IMAGE_TOKEN_ID], expected)


@torch.no_grad()
def test_the_paper_schedule_keeps_half_a_quarter_and_an_eighth():
    """configs/pdrop-llava.yaml (layers 8, 16, 24) on a LLaVA with 576 tokens per image: 288, 144, 72 kept."""
    config = tp.load_config(CONFIGS / "pdrop-llava.yaml")
    assert [(s.layer, s.ratio) for s in config.stages] == [(8, 0.5), (16, 0.75), (24, 0.875)]
    model = toy_llava(ToySize(layers=25, grid=24, heads=2, kv_heads=1))
    inputs = llava_inputs([Prompt([5, 3], 1), Prompt([2, 1], 1)], tokens_per_image=576)
    inputs["pixel_values"] = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with tp.attach(model, config) as handle:
        model(**inputs, use_cache=False)
        trace = handle.trace
    assert [e.layer for e in trace] == [8, 16, 24]
    assert [e.visual_before for e in trace] == [[576, 576], [288, 288], [144, 144]]
    assert [e.visual_after for e in trace] == [[288, 288], [144, 144], [72, 72]]
    assert [e.tokens_after for e in trace] == [[296, 291], [152, 147], [80, 75]]
    for before, after in itertools.pairwise(trace):  # each stage ranks the survivors of the last
        for b in range(2):
            assert set(after.kept[b].tolist()) - {-1} <= set(before.kept[b].tolist())


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_next_attention_on_qwen2_vl_uses_its_3d_rotary_positions(next_attention, layer):
    """M-RoPE: the row equals Qwen2-VL's own eager attention of layer K (an image and a video)."""
    model = toy_qwen2_vl(attn_implementation="eager")
    inputs = qwen_inputs(model, [QwenPrompt([2, 1, 3], [Item((1, 4, 6)), Item((2, 4, 4), video=True)])])
    expected = model(**inputs, output_attentions=True).attentions[layer].mean(dim=1)[:, -1]
    with tp.attach(model, tp.ReductionConfig(strategy="record_next", layer=layer, ratio=0.5)):
        model(**inputs)
    (got,) = next_attention
    assert (got - expected).abs().max() <= TOL
