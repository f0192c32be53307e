"""`site: cache` stages after a `positions: renumbered` prefill stage, against the masked decode.

The oracle (`CacheOracle` with `config=`): the unreduced model decoding on its own full cache, the prefill
stage's removed tokens masked as keys from its layer on and each cache event's entries from its step on in
layers >= K, and the layers from the renumbered stage on given the rotary tables of the renumbered ids: the
prompt's by the token-by-token rule, each new token's the model's own less the sample's shift (decode
continues from the renumbered length). Every step's logits within 1e-4 (float32) on LLaVA and Qwen2-VL
(M-RoPE) padded batches, the cache stage's K below, at and above the prefill stage's layer (0 and 2),
`restore` on and off, SDPA and eager; each case checks that the renumbering matters (the `original`
oracle differs). Hypothesis tests check, against the oracle, LLaVA batches with every layer's cache length
and the kept counts (either policy, any layers) and Qwen2-VL batches of random images and videos. A second
turn on the returned cache continues from the renumbered length too.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cache_site import LLAVA_BATCH, STEPS, cache_stage, expected_steps, two_turns
from test_positions import qwen_prompts

import tokenprune as tp
from tokenprune.errors import ConfigError
from tokenprune.testing.cache_oracle import (
    LOGIT_TOL,
    CacheOracle,
    assert_steps_match,
    cache_oracle_run,
    generate,
    largest_step_difference,
)
from tokenprune.testing.models import toy_qwen2_vl
from tokenprune.testing.oracles import Prompt, llava_inputs
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs

# single-token items (a 2 x 2 patch grid merged to one token) vanish whole when removed, so the M-RoPE
# ids of what follows move: renumbering matters at moderate ratios
QWEN_BATCH = [
    QwenPrompt([2, 1, 1, 2], [Item((1, 2, 2)), Item((1, 4, 4)), Item((2, 2, 4), video=True)]),
    QwenPrompt([1, 1, 2], [Item((1, 2, 2)), Item((1, 2, 4))]),
]


def renumbered(layer: int, ratio: float = 0.4) -> dict:
    return {"layer": layer, "ratio": ratio, "positions": "renumbered"}


CASES = {  # strategy, prefill stages, the cache stage
    "layer-2-cache-below": ("fastv", [renumbered(2)], cache_stage(1, 0.7, every=2)),
    "layer-2-cache-below-restore": (
        "fastv",
        [renumbered(2)],
        cache_stage(1, 0.7, every=2, restore=True, window=2),
    ),
    "layer-2-cache-at": ("fastv", [renumbered(2)], cache_stage(2, 0.7, every=1)),
    "layer-2-cache-above": ("fastv", [renumbered(2)], cache_stage(3, 0.7, every=2)),
    "layer-2-cache-above-restore": ("fastv", [renumbered(2)], cache_stage(3, 0.7, every=2, restore=True)),
    "layer-0-cache-at-restore": ("random", [renumbered(0)], cache_stage(0, 0.7, every=2, restore=True)),
    "layer-0-cache-above": ("random", [renumbered(0)], cache_stage(2, 0.7, every=2)),
    "mixed-schedule": (
        "fastv",
        [renumbered(1, 0.3), {"layer": 2, "ratio": 0.5, "positions": "original"}],
        cache_stage(3, 0.7, every=2),
    ),
}


@pytest.fixture(scope="module")
def qwen():
    return toy_qwen2_vl()


def assert_matches_renumbered_oracle(model, inputs: dict, name: str) -> None:
    """Each step's logits equal the renumbered masked decode's, and not the `original` one's."""
    strategy, prefill, cache = CASES[name]
    config = tp.ReductionConfig(strategy=strategy, stages=[*prefill, cache])
    with tp.attach(model, config) as handle:
        tokens, logits, _ = generate(model, inputs)
        trace = list(handle.trace)
    assert [e.step for e in trace if e.site == "cache"] == expected_steps(cache["every"], STEPS)
    expected_tokens, expected, _ = cache_oracle_run(model, inputs, trace, config=config)
    assert_steps_match(logits, expected)
    assert torch.equal(tokens, expected_tokens)
    _, unrenumbered, _ = cache_oracle_run(model, inputs, trace)
    assert largest_step_difference(logits, unrenumbered) > LOGIT_TOL  # the case exercises the renumbering


@torch.no_grad()
@pytest.mark.parametrize("name", list(CASES))
def test_llava_matches_the_renumbered_masked_decode(llava_sdpa, name):
    assert_matches_renumbered_oracle(llava_sdpa, llava_inputs(LLAVA_BATCH), name)


@torch.no_grad()
@pytest.mark.parametrize(
    "name",
    ["layer-2-cache-below", "layer-2-cache-above-restore", "layer-0-cache-at-restore", "layer-0-cache-above"],
)
def test_qwen2_vl_matches_the_renumbered_masked_decode(qwen, name):
    """M-RoPE: kept visual tokens keep their grid offsets, decode continues from the largest renumbered id."""
    assert_matches_renumbered_oracle(qwen, qwen_inputs(qwen, QWEN_BATCH), name)


@torch.no_grad()
@pytest.mark.parametrize("name", ["layer-2-cache-below-restore", "layer-0-cache-above"])
def test_eager_attention_matches_the_renumbered_masked_decode(llava_eager, name):
    assert_matches_renumbered_oracle(llava_eager, llava_inputs(LLAVA_BATCH), name)


@torch.no_grad()
@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("llava", "layer-2-cache-below"),
        ("llava", "layer-2-cache-above-restore"),
        ("llava", "layer-0-cache-above"),
        ("qwen2_vl", "layer-2-cache-below"),
        ("qwen2_vl", "layer-0-cache-at-restore"),
    ],
)
def test_a_second_turn_continues_from_the_renumbered_length(llava_sdpa, qwen, family, name):
    """A second `generate` on the returned cache: its new text tokens, like the first turn's decode,
    continue from the renumbered length (M-RoPE: from the largest renumbered id), and every step of
    both turns equals the masked decode."""
    if family == "llava":
        model, inputs = llava_sdpa, llava_inputs(LLAVA_BATCH)
    else:
        model, inputs = qwen, qwen_inputs(qwen, QWEN_BATCH)
    strategy, prefill, cache = CASES[name]
    config = tp.ReductionConfig(strategy=strategy, stages=[*prefill, cache])
    with tp.attach(model, config) as handle:
        got = two_turns(model, inputs)
        trace = list(handle.trace)
    expected = []
    for oracle_config in (config, None):  # the renumbered oracle, then the `original` one
        oracle = CacheOracle(model, trace, inputs, config=oracle_config)
        try:
            expected.append(two_turns(model, inputs))
        finally:
            oracle.remove()
    renumbered_oracle, original_oracle = expected
    assert_steps_match(got, renumbered_oracle)
    assert largest_step_difference(got[3:], original_oracle[3:]) > LOGIT_TOL  # the renumbering matters


@torch.no_grad()
@settings(deadline=None)
@given(
    batch=st.lists(qwen_prompts, min_size=1, max_size=2),
    prefill_layer=st.integers(0, 3),
    cache_layer=st.integers(0, 3),
    ratios=st.tuples(st.floats(0.1, 0.9), st.floats(0.1, 0.9)).map(sorted),  # ratios never decrease
    restore=st.booleans(),
)
def test_qwen2_vl_random_batches_match_the_renumbered_masked_decode(
    qwen, batch, prefill_layer, cache_layer, ratios, restore
):
    """Random images and videos (temporal extents past the spatial ones included), items removed whole."""
    inputs = qwen_inputs(qwen, batch)
    cache = cache_stage(cache_layer, ratios[1], every=2, restore=restore)
    config = tp.ReductionConfig(strategy="random", stages=[renumbered(prefill_layer, ratios[0]), cache])
    with tp.attach(qwen, config) as handle:
        _, logits, _ = generate(qwen, inputs, steps=4)
        trace = list(handle.trace)
    assert_steps_match(logits, cache_oracle_run(qwen, inputs, trace, config=config, steps=4)[1])


def test_renumbered_positions_on_the_cache_stage_are_refused(llava_sdpa):
    """Kept cache entries keep their rotated keys: a cache stage cannot renumber, and says so at attach.
    The config-wide policy reaches the prefill stages only, so it is accepted."""
    stages = [renumbered(2), {**cache_stage(3, 0.7), "positions": "renumbered"}]
    with pytest.raises(ConfigError, match="`positions: renumbered` cannot apply to it"):
        tp.attach(llava_sdpa, tp.ReductionConfig(stages=stages))
    config = tp.ReductionConfig(
        stages=[{"layer": 2, "ratio": 0.4}, cache_stage(3, 0.7)], positions="renumbered"
    )
    tp.attach(llava_sdpa, config).detach()


def held_lengths(trace: list, n_layers: int, length: int, cache: dict) -> list[int]:
    """Prompt entries each layer's cache holds: the prompt less what the prefill stage removed (from its
    layer on) and, compacted (no `restore`), less what the last cache event removed (from K on); the widest
    sample sets a layer's length (shorter rows are left-filled)."""
    prefill, last = trace[0], trace[-1]
    widths = []
    for layer in range(n_layers):
        held = [set(range(length))] * len(prefill.kept)
        if layer >= prefill.layer:
            held = [h & set(row[row >= 0].tolist()) for h, row in zip(held, prefill.kept, strict=True)]
        if layer >= cache["layer"] and not cache["restore"]:
            held = [h & set(row[row >= 0].tolist()) for h, row in zip(held, last.kept, strict=True)]
        restricted = layer >= prefill.layer or (layer >= cache["layer"] and not cache["restore"])
        widths.append(max(len(h) for h in held) if restricted else length)
    return widths


@torch.no_grad()
@settings(deadline=None)
@given(
    prefill_layer=st.integers(0, 3),
    cache_layer=st.integers(0, 3),
    ratios=st.tuples(st.floats(0.1, 0.9), st.floats(0.1, 0.9)).map(sorted),  # ratios never decrease
    policy=st.sampled_from(["original", "renumbered"]),
    every=st.sampled_from([None, 1, 2]),
    restore=st.booleans(),
    layout=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 2)), min_size=1, max_size=3),
)
def test_cache_lengths_and_kept_counts_after_a_prefill_stage(
    llava_sdpa, prefill_layer, cache_layer, ratios, policy, every, restore, layout
):
    """After a prefill stage (either policy) and a cache stage: every step equals the masked decode; each
    layer's cache holds the prompt less what applies to it; the prefill stage keeps round(n (1 - ratio))
    visual tokens per sample, each cache event round(n (1 - ratio)) of the n original ones, capped by the
    entries layer K still had."""
    prompts = [Prompt([text] * (items + 1), items) for text, items in layout]
    inputs = llava_inputs(prompts)
    steps = 4
    cache = cache_stage(cache_layer, ratios[1], every=every, restore=restore)
    stages = [{"layer": prefill_layer, "ratio": ratios[0], "positions": policy}, cache]
    config = tp.ReductionConfig(strategy="random", stages=stages)
    with tp.attach(llava_sdpa, config) as handle:
        _, logits, kv = generate(llava_sdpa, inputs, steps=steps)
        trace = list(handle.trace)
    assert_steps_match(logits, cache_oracle_run(llava_sdpa, inputs, trace, config=config, steps=steps)[1])
    assert [e.step for e in trace[1:]] == expected_steps(every, steps)
    visual = (inputs["input_ids"] == llava_sdpa.config.image_token_id).sum(1).tolist()
    prefill_kept = [round(n * (1 - ratios[0])) for n in visual]
    assert trace[0].visual_after == prefill_kept
    present = prefill_kept if cache_layer >= prefill_layer else visual
    for event in trace[1:]:
        assert event.visual_after == [
            min(round(n * (1 - ratios[1])), p) for n, p in zip(visual, present, strict=True)
        ]
    length = inputs["input_ids"].shape[1]
    expected = held_lengths(trace, len(kv.layers), length, cache)
    assert [layer.keys.shape[2] - (steps - 1) for layer in kv.layers] == expected
