"""Gemma 3: sliding-window and global layers, each image attended both ways, kept on shortened layers.

The tiny model (tokenprune.testing.families.gemma3: 6 layers, a 6-token window at layers 3 and 5,
global attention elsewhere, 9 tokens per image) runs prompts of 20-40 tokens, so both rules matter. Tolerances
(float32): ratio 0 equals no attachment at real tokens (max abs diff <= 1e-5); kept logits equal the
mask oracle's (the model's own sliding/bidirectional pattern minus the removed keys, <= 1e-4); greedy
tokens with the cache equal the oracle's without one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BUILT_IN_STRATEGIES, assert_every_paper_grid_cell_reduces

import tokenprune as tp
from tokenprune.errors import AttachError, ConfigError, InputError
from tokenprune.testing import exactness
from tokenprune.testing.families.gemma3 import FAMILY, toy_gemma3
from tokenprune.testing.family import Family, Sample

LOGIT_TOL = 1e-4
IDENTITY_TOL = 1e-5
SAMPLES = [Sample((3, 2, 4), 2), Sample((5,), 0), Sample((2, 6), 1)]
# Strategies ranking with attention rows or keys: they read them through Gemma 3's own probe.
PROBED = [
    name
    for name in BUILT_IN_STRATEGIES
    if not tp.strategy_class(name).merges
    and tp.strategy_class(name).requires & {"attention", "next_attention", "attention_from", "keys"}
]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def gemma(request):
    return toy_gemma3(request.param)


@pytest.fixture(scope="module")
def gemma_sdpa():
    return toy_gemma3("sdpa")


SITE = 2  # layers 1 and 2 attend globally: attention-ranked signals at this site are the probe's


def run(model, inputs, config: tp.ReductionConfig):
    with tp.attach(model, config) as handle:
        return exactness.forward(FAMILY, model, inputs), handle.trace


def assert_kept_match(logits, expected, trace) -> None:
    for b, row in enumerate(trace[-1].kept):
        row = row[row >= 0]
        assert (logits[b, row] - expected[b, row]).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_mask_oracle_at_sliding_and_global_sites(gemma, layer):
    inputs = FAMILY.inputs(gemma, SAMPLES, 0)
    logits, trace = run(gemma, inputs, tp.ReductionConfig(strategy="random", layer=layer, ratio=0.6))
    assert_kept_match(logits, exactness.mask_oracle_logits(FAMILY, gemma, inputs, trace), trace)


@pytest.mark.parametrize("stages", [[1, 3], [3, 4]])
def test_mask_oracle_of_stages_at_layers_of_both_kinds(gemma_sdpa, stages):
    """Each layer after a stage takes its own kind's mask and rotary tables (local and global bases)."""
    inputs = FAMILY.inputs(gemma_sdpa, SAMPLES, 3)
    config = tp.ReductionConfig(strategy="random", stages=[{"layer": k, "ratio": 0.4} for k in stages])
    logits, trace = run(gemma_sdpa, inputs, config)
    assert_kept_match(logits, exactness.mask_oracle_logits(FAMILY, gemma_sdpa, inputs, trace), trace)


@pytest.mark.parametrize("strategy", PROBED)
def test_attention_ranked_strategies_meet_the_mask_oracle(gemma_sdpa, strategy):
    inputs = FAMILY.inputs(gemma_sdpa, SAMPLES, 2)
    config = tp.ReductionConfig(strategy=strategy, layer=SITE, ratio=0.5, positions="original")
    logits, trace = run(gemma_sdpa, inputs, config)
    assert_kept_match(logits, exactness.mask_oracle_logits(FAMILY, gemma_sdpa, inputs, trace), trace)


def test_both_rules_matter_to_the_oracle(gemma_sdpa):
    """Against a plain causal oracle the same reduction disagrees: windows and blocks are really kept."""
    inputs = FAMILY.inputs(gemma_sdpa, SAMPLES[:1], 0)
    logits, trace = run(gemma_sdpa, inputs, tp.ReductionConfig(strategy="random", layer=2, ratio=0.5))
    causal = Family(adapter="gemma3", model=toy_gemma3, inputs=FAMILY.inputs)
    expected = exactness.mask_oracle_logits(causal, gemma_sdpa, inputs, trace)
    row = trace[-1].kept[0]
    assert (logits[0, row] - expected[0, row]).abs().max() > 1e-2


@pytest.mark.parametrize("layer", [0, 2])
def test_ratio_zero_is_identity(gemma, layer):
    inputs = FAMILY.inputs(gemma, SAMPLES, 0)
    expected = exactness.forward(FAMILY, gemma, inputs)
    logits, _ = run(gemma, inputs, tp.ReductionConfig(strategy="random", layer=layer, ratio=0.0))
    real = inputs["attention_mask"].bool()
    assert (logits - expected)[real].abs().max() <= IDENTITY_TOL


def test_batch_equals_each_sample_alone(gemma_sdpa):
    """Samples with 2, 0 and 1 images keep the same tokens and logits alone as in the padded batch."""
    config = tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.5)
    inputs = FAMILY.inputs(gemma_sdpa, SAMPLES, 0)
    logits, trace = run(gemma_sdpa, inputs, config)
    width = inputs["input_ids"].shape[1]
    for b, sample in enumerate(SAMPLES):
        alone = FAMILY.inputs(gemma_sdpa, [sample], b)
        own, own_trace = run(gemma_sdpa, alone, config)
        offset = width - alone["input_ids"].shape[1]
        kept = trace[-1].kept[b]
        assert torch.equal(kept[kept >= 0] - offset, own_trace[-1].kept[0])
        assert (logits[b, offset:] - own[0]).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("layer", [0, 2])
def test_generate_with_the_cache_equals_the_oracle_without_one(gemma, layer):
    """Decode steps on the reduced cache (sliding layers keep their last 5 entries) equal the mask
    oracle recomputed without a cache, the window shorter than the prompt."""
    inputs = FAMILY.inputs(gemma, SAMPLES, 1)
    assert inputs["input_ids"].shape[1] > 3 * gemma.config.text_config.sliding_window
    with tp.attach(
        gemma, tp.ReductionConfig(strategy="fastv" if layer else "random", layer=layer, ratio=0.5)
    ) as h:
        out = gemma.generate(**inputs, max_new_tokens=6, do_sample=False)[:, -6:]
        trace = h.trace
    tokens, _ = exactness.mask_oracle_greedy(FAMILY, gemma, inputs, trace, 6)
    assert torch.equal(out, tokens)


def test_fastv_scores_equal_the_eager_attention_map():
    """The probe reproduces Gemma 3's q/k norms and scaling: FastV's scores at a global layer equal
    the head-averaged attention row of the last token that eager attention returns."""
    model = toy_gemma3("eager")
    inputs = FAMILY.inputs(model, SAMPLES[:1], 0)
    seen = {}

    class Recording(tp.strategy_class("fastv")):
        def score(self, view):
            seen["scores"] = view.signals.attention()
            return super().score(view)

    tp.register_strategy("gemma3-recording")(Recording)
    try:
        run(model, inputs, tp.ReductionConfig(strategy="gemma3-recording", layer=2, ratio=0.5))
    finally:
        tp.registry.STRATEGIES.unregister("gemma3-recording")
    with torch.no_grad():
        maps = model(**inputs, output_attentions=True, use_cache=False).attentions[1]
    assert torch.allclose(seen["scores"], maps.mean(dim=1)[:, -1], atol=1e-5)


def test_the_probe_refuses_logit_soft_capping():
    """Soft-capped logits are not what the probe recomputes: attaching says so and leaves nothing behind."""
    model = toy_gemma3()
    layers = model.model.language_model.layers
    layers[1].self_attn.attn_logit_softcapping = 50.0
    with pytest.raises(AttachError, match="soft-capping"):
        tp.attach(model, tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.5))
    assert not any(layer._forward_pre_hooks for layer in layers)


def test_refusals_say_why(gemma_sdpa):
    with pytest.raises(AttachError, match="average-pools"):
        tp.attach(
            gemma_sdpa,
            tp.ReductionConfig(strategy="random", stages=[{"site": "vision", "layer": 0, "ratio": 0.5}]),
        )
    with pytest.raises(ConfigError, match="sliding-window layer"):
        tp.attach(gemma_sdpa, tp.ReductionConfig(strategy="fastv", layer=4, ratio=0.5))
    inputs = FAMILY.inputs(gemma_sdpa, SAMPLES[:1], 0)
    config = tp.ReductionConfig(strategy="random", layer=2, ratio=0.5)
    with tp.attach(gemma_sdpa, config), pytest.raises(InputError, match="token_type_ids"):
        gemma_sdpa(**{k: v for k, v in inputs.items() if k != "token_type_ids"})


@torch.no_grad()
def test_every_cell_of_the_gemma3_paper_grid_reduces_a_model_of_its_depth():
    """configs/paper-grid-gemma3.yaml on a Gemma 3 with Gemma-3-4B's 34 layers (5 sliding : 1 global)."""
    kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)]
    model = toy_gemma3(seed=2, layer_types=kinds, hidden=32)
    inputs = FAMILY.inputs(model, [Sample((3, 2, 4), 2), Sample((2, 5), 1)], 0)  # 18 and 9 visual tokens
    assert_every_paper_grid_cell_reduces("paper-grid-gemma3.yaml", model, inputs, [18, 9])
