"""V2Drop: the variation signal, its ranking, no attention recomputed, the paper's progressive schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_qwen2_vl import MIXED, assert_matches_oracle

import tokenprune as tp
from tokenprune.contracts.reducer import top_k_mask
from tokenprune.registry import STRATEGIES
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, toy_llava, toy_qwen2_vl
from tokenprune.testing.oracles import Prompt, hooked, llava_inputs, oracle_masks, removed_positions
from tokenprune.testing.qwen_inputs import qwen_inputs

CONFIGS = Path(__file__).parents[1] / "configs"
TOL = 1e-5


@pytest.fixture
def variation():
    """Registers `record_variation`: keeps the first candidates and records `variation` at every stage."""
    seen: list[torch.Tensor] = []

    @tp.register_strategy("record_variation")
    class RecordVariation(tp.Reducer):
        requires = frozenset({"variation"})

        def select(self, view: tp.TokenView) -> torch.Tensor:
            seen.append(view.signals.get("variation"))
            return top_k_mask(torch.zeros(view.valid.shape), view.candidates, *view.quota())

    yield seen
    STRATEGIES.unregister("record_variation")


def layer_change(model, inputs, layer: int, trace=None) -> torch.Tensor:
    """[B, N] L2 norm of what decoder layer `layer - 1` adds to each token, from output_hidden_states.

    With a trace, under the mask oracle (the trace's removed tokens hidden as keys from their stage on).
    """
    valid = inputs["attention_mask"].bool()
    handles = [] if trace is None else oracle_masks(model, removed_positions(trace, valid), valid)
    with hooked(handles):
        states = model(**inputs, use_cache=False, output_hidden_states=True).hidden_states
    return (states[layer] - states[layer - 1]).norm(dim=-1)


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_variation_is_the_change_across_the_layer_before_the_site(llava_sdpa, variation, layer):
    inputs = llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    real = inputs["attention_mask"].bool()
    expected = layer_change(llava_sdpa, inputs, layer)
    with tp.attach(llava_sdpa, tp.ReductionConfig(strategy="record_variation", layer=layer, ratio=0.5)):
        llava_sdpa(**inputs, use_cache=False)
    (got,) = variation
    assert (got - expected)[real].abs().max() <= TOL


@torch.no_grad()
def test_at_a_later_stage_variation_is_measured_on_the_shortened_sequence(llava_sdpa, variation):
    """Stage 2 before layer 3 measures layer 2 on the kept tokens: the mask oracle's change there."""
    inputs = llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    config = tp.ReductionConfig(
        strategy="record_variation", stages=[{"layer": 2, "ratio": 0.5}, {"layer": 3, "ratio": 0.8}]
    )
    with tp.attach(llava_sdpa, config) as handle:
        llava_sdpa(**inputs, use_cache=False)
        trace = handle.trace
    expected = layer_change(llava_sdpa, inputs, 3, trace[:1])
    got, kept = variation[1], trace[0].kept
    for b in range(2):
        row = kept[b] >= 0
        assert (got[b, row] - expected[b, kept[b, row]]).abs().max() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 3])
def test_v2drop_keeps_the_tokens_that_vary_most(llava_sdpa, layer):
    inputs = llava_inputs([Prompt([3, 2], 1)])
    change = layer_change(llava_sdpa, inputs, layer)[0]
    with tp.attach(llava_sdpa, tp.ReductionConfig(strategy="v2drop", layer=layer, keep=9)) as handle:
        llava_sdpa(**inputs, use_cache=False)
        kept = handle.trace[0].kept[0]
    visual = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
    expected = visual[change[visual].topk(9).indices].sort().values
    assert torch.equal(kept[inputs["input_ids"][0, kept] == IMAGE_TOKEN_ID], expected)


@torch.no_grad()
def test_no_attention_is_recomputed(llava_sdpa):
    """Every query projection runs once per layer and forward, as without tokenprune: no probe rows."""
    inputs = llava_inputs([Prompt([3, 2], 1), Prompt([1, 4], 1)])
    layers = llava_sdpa.model.language_model.layers
    calls = {"q": 0}

    def count(*_):
        calls["q"] += 1

    config = tp.ReductionConfig(
        strategy="v2drop", stages=[{"layer": 1, "ratio": 0.5}, {"layer": 3, "ratio": 0.8}]
    )
    counters = [layer.self_attn.q_proj.register_forward_hook(count) for layer in layers]
    with hooked(counters), tp.attach(llava_sdpa, config) as handle:
        llava_sdpa(**inputs, use_cache=False)
        assert [e.visual_after for e in handle.trace] == [[18, 18], [7, 7]]
    assert calls["q"] == len(layers)
    assert llava_sdpa.config.text_config._attn_implementation == "sdpa"


def test_layer_0_is_refused_at_attach():
    """V2Drop reads the change of the layer before its site: `layer: 0` has none, refused up front."""
    model = toy_llava()
    config = tp.ReductionConfig(strategy="v2drop", layer=0, ratio=0.5)
    with pytest.raises(tp.ConfigError, match="variation"):
        tp.attach(model, config)
    assert not model.model.language_model.layers[0]._forward_pre_hooks  # nothing was left attached


@torch.no_grad()
def test_the_paper_schedule_keeps_half_a_quarter_then_one_token():
    """configs/v2drop-llava.yaml (layers 3, 17, 22) on a LLaVA with 576 tokens per image: 288, 144, 1."""
    config = tp.load_config(CONFIGS / "v2drop-llava.yaml")
    assert [(s.layer, s.ratio, s.keep) for s in config.stages] == [
        (3, 0.5, None),
        (17, 0.75, None),
        (22, None, 1),
    ]
    model = toy_llava(ToySize(layers=23, grid=24, heads=2, kv_heads=1))
    inputs = llava_inputs([Prompt([5, 3], 1), Prompt([2, 1], 1)], tokens_per_image=576)
    inputs["pixel_values"] = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with tp.attach(model, config) as handle:
        model(**inputs, use_cache=False)
        trace = handle.trace
    assert [e.layer for e in trace] == [3, 17, 22]
    assert [e.visual_after for e in trace] == [[288, 288], [144, 144], [1, 1]]


@torch.no_grad()
@pytest.mark.parametrize("budget", ["sample", "per_frame"])
def test_qwen2_vl_matches_the_mask_oracle_over_stages(budget):
    model = toy_qwen2_vl()
    config = tp.ReductionConfig(
        strategy="v2drop", budget=budget, stages=[{"layer": 1, "ratio": 0.4}, {"layer": 3, "ratio": 0.7}]
    )
    assert_matches_oracle(model, qwen_inputs(model, MIXED), config)
