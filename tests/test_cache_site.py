"""`site: cache` stages: visual entries leave the KV cache of layers >= K between decode steps.

The oracle is the unreduced model decoding on its own full cache, with the removed entries masked as
keys in layers >= K from the step of their removal on (and a prefill stage's removed tokens masked from
its layer on, in every forward). Logits of EVERY generated token must equal the oracle's within 1e-4
(float32, SDPA), on LLaVA and Qwen2-VL, in padded batches, with `restore` false and true, `every` None
and 2, alone and after a prefill FastV stage.
"""

from __future__ import annotations

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from test_cli import write_config

import tokenprune as tp
from tokenprune.errors import ConfigError, TokenPruneError
from tokenprune.flops import cached_entries, decode_flops
from tokenprune.lab.cli import main
from tokenprune.lab.speed import footprint
from tokenprune.testing.cache_oracle import (
    CacheOracle,
    assert_steps_match,
    cache_oracle_run,
    generate,
    largest_step_difference,
)
from tokenprune.testing.models import toy_qwen2_vl
from tokenprune.testing.oracles import Prompt, hooked, llava_inputs, tower_mask_hooks
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs

STEPS = 6
LLAVA_BATCH = [Prompt([3, 4], 1), Prompt([2, 1, 2], 2)]
QWEN_BATCH = [
    QwenPrompt([2, 1, 3], [Item((1, 4, 6)), Item((2, 4, 4), video=True)]),
    QwenPrompt([1, 2], [Item((1, 2, 4))]),
]


def cache_stage(layer: int, ratio: float, every: int | None = None, restore: bool = False, window: int = 1):
    return {
        "site": "cache",
        "layer": layer,
        "ratio": ratio,
        "every": every,
        "restore": restore,
        "window": window,
    }


CONFIGS = {
    "once": [cache_stage(2, 0.5)],
    "every-2-restore": [cache_stage(1, 0.6, every=2, restore=True, window=2)],
    "every-2-compacted": [cache_stage(3, 0.7, every=2, window=3)],
    "at-layer-0": [cache_stage(0, 0.5, every=2)],
    "after-fastv-below": [{"layer": 2, "ratio": 0.3}, cache_stage(1, 0.6, every=2)],
    "after-fastv-above": [{"layer": 1, "ratio": 0.3}, cache_stage(3, 0.6, every=2, restore=True)],
}


@pytest.fixture(scope="module")
def qwen():
    return toy_qwen2_vl()


def assert_matches_oracle(model, inputs: dict, stages: list[dict], strategy: str = "fastv") -> list:
    """Generate under the config; each step's logits equal the masked unreduced decode's. The trace."""
    config = tp.ReductionConfig(strategy=strategy, stages=stages)
    with tp.attach(model, config) as handle:
        tokens, logits, _ = generate(model, inputs)
        trace = list(handle.trace)
    expected_tokens, expected, _ = cache_oracle_run(model, inputs, trace)
    assert_steps_match(logits, expected)
    assert torch.equal(tokens, expected_tokens)
    return trace


def expected_steps(every: int | None, steps: int) -> list[int]:
    """The steps a cache stage selects at, over `steps` generated tokens."""
    return [1] if every is None else list(range(1, steps, every))


@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
def test_llava_matches_the_masked_decode(llava_sdpa, name):
    stages = CONFIGS[name]
    trace = assert_matches_oracle(llava_sdpa, llava_inputs(LLAVA_BATCH), stages)
    cache = stages[-1]
    events = [e for e in trace if e.site == "cache"]
    assert [e.step for e in events] == expected_steps(cache["every"], STEPS)
    assert all(e.layer == cache["layer"] for e in events)


@torch.no_grad()
@pytest.mark.parametrize("name", ["once", "every-2-restore", "after-fastv-below", "after-fastv-above"])
def test_qwen2_vl_matches_the_masked_decode(qwen, name):
    assert_matches_oracle(qwen, qwen_inputs(qwen, QWEN_BATCH), CONFIGS[name])


@torch.no_grad()
@pytest.mark.parametrize("name", ["every-2-restore", "after-fastv-below"])
def test_eager_attention_matches_the_masked_decode(llava_eager, name):
    """The eager backend (its own masks and softmax) against the same oracle, run eagerly too."""
    assert_matches_oracle(llava_eager, llava_inputs(LLAVA_BATCH), CONFIGS[name])


@torch.no_grad()
def test_random_matches_the_masked_decode(llava_sdpa):
    assert_matches_oracle(llava_sdpa, llava_inputs(LLAVA_BATCH), [cache_stage(1, 0.5, every=1)], "random")


@torch.no_grad()
def test_ratio_zero_is_identity(llava_sdpa):
    """A cache stage removing nothing changes no logit (<= 1e-5)."""
    inputs = llava_inputs(LLAVA_BATCH)
    _, reference, _ = generate(llava_sdpa, inputs)
    with tp.attach(llava_sdpa, tp.ReductionConfig(stages=[cache_stage(1, 0.0, every=1)])):
        _, logits, _ = generate(llava_sdpa, inputs)
    assert largest_step_difference(logits, reference) <= 1e-5


def two_turns(model: torch.nn.Module, inputs: dict) -> list[torch.Tensor]:
    """Each step's logits of two `generate` turns: 3 steps on `inputs`, then 4 continuing the returned
    cache with the whole conversation as `input_ids` and three text tokens appended (plain text in the
    LLaVA and Qwen2-VL toys; no images: they are in the cache)."""
    ids, first, cache = generate(model, inputs, steps=3)
    ids = torch.cat([ids, torch.tensor([[9, 10, 11]] * len(ids))], dim=1)
    mask = torch.cat(
        [inputs["attention_mask"], torch.ones(len(ids), ids.shape[1] - inputs["attention_mask"].shape[1])], 1
    )
    _, second, _ = generate(model, {"input_ids": ids, "attention_mask": mask.long()}, steps=4, cache=cache)
    return first + second


@torch.no_grad()
@pytest.mark.parametrize("layer", [2, 0])
def test_a_second_turn_continues_the_cache(llava_sdpa, layer):
    """Multi-turn: a second `generate` on the returned cache, new text appended. The new prompt tokens
    are text (never candidates); the stage keeps counting forwards on the cache (the second turn's
    first forward is the next step) and the trace keeps growing. Both turns equal the masked decode,
    K = 0 included (layer 0's compacted cache no longer tells `generate` how many tokens it holds)."""
    inputs = llava_inputs(LLAVA_BATCH)
    config = tp.ReductionConfig(stages=[cache_stage(layer, 0.5, every=2)])
    with tp.attach(llava_sdpa, config) as handle:
        got = two_turns(llava_sdpa, inputs)
        trace = list(handle.trace)
    assert [e.step for e in trace] == [1, 3, 5]  # turn 1: forwards 0..2; turn 2: forwards 3..6
    oracle = CacheOracle(llava_sdpa, trace, inputs)
    try:
        expected = two_turns(llava_sdpa, inputs)
    finally:
        oracle.remove()
    assert_steps_match(got, expected)


@torch.no_grad()
@pytest.mark.parametrize("strategy", ["fastv", "random"])
@pytest.mark.parametrize(
    ("cache", "positions"),
    [
        (cache_stage(0, 0.7, every=2), "original"),
        (cache_stage(2, 0.7, every=1, restore=True), "original"),
        (cache_stage(1, 0.7, every=2), "renumbered"),
    ],
)
def test_a_tower_stage_then_the_cache_stage_match_the_masked_decode(llava3, strategy, cache, positions):
    """`site: vision` in the CLIP tower, then `site: cache` while decoding: the oracle hides the tower's
    removed patches as keys in the later tower layers and, in the language model, their placeholders from
    layer 0 on (the hand-off event, in its position policy) and each cache event's entries from its
    step on."""
    tower = {"site": "vision", "layer": 0, "ratio": 0.5, "positions": positions}  # tower layer 1 sees it
    config = tp.ReductionConfig(strategy=strategy, stages=[tower, cache])
    inputs = llava_inputs(LLAVA_BATCH)
    with tp.attach(llava3, config) as handle:
        tokens, logits, _ = generate(llava3, inputs)
        trace = list(handle.trace)
    assert [e.site for e in trace[:2]] == ["vision", "language"] and trace[2].site == "cache"
    tower_event = trace[0]
    with hooked(tower_mask_hooks(llava3.model.vision_tower.encoder.layers, tower_event)):
        expected_tokens, expected, _ = cache_oracle_run(llava3, inputs, trace, config=config)
    assert_steps_match(logits, expected)
    assert torch.equal(tokens, expected_tokens)


@torch.no_grad()
@settings(max_examples=8, deadline=None)
@given(
    layer=st.integers(0, 3),
    ratio=st.floats(0.1, 0.9),
    every=st.sampled_from([None, 1, 2, 3]),
    restore=st.booleans(),
    layout=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 2)), min_size=1, max_size=3),
)
def test_cache_lengths_and_kept_counts(llava_sdpa, layer, ratio, every, restore, layout):
    """Per layer, the cache holds the prompt less the removed entries (layers >= K, compacted) or all of
    it (restore, and layers < K); each sample keeps round(visual * (1 - ratio)) visual entries."""
    prompts = [Prompt([text] * (items + 1), items) for text, items in layout]
    inputs = llava_inputs(prompts)
    steps = 4
    config = tp.ReductionConfig(stages=[cache_stage(layer, ratio, every=every, restore=restore)])
    with tp.attach(llava_sdpa, config) as handle:
        _, _, cache = generate(llava_sdpa, inputs, steps=steps)
        trace = list(handle.trace)
    assert [e.step for e in trace] == expected_steps(every, steps)
    length = inputs["input_ids"].shape[1]
    visual = (inputs["input_ids"] == llava_sdpa.config.image_token_id).sum(1).tolist()
    for event in trace:
        assert event.visual_after == [min(round(n * (1 - ratio)), n) for n in visual]
    last = trace[-1]
    compacted = max(last.tokens_after) if not restore else length
    for index, cached in enumerate(cache.layers):
        expected = (length if index < layer else compacted) + steps - 1
        assert cached.keys.shape[2] == expected, f"layer {index}"


def test_cache_only_fields_are_refused_elsewhere():
    with pytest.raises(ValidationError, match="`every` applies to `site: cache` stages only"):
        tp.ReductionConfig(stages=[{"layer": 2, "ratio": 0.5, "every": 2}])
    with pytest.raises(ValidationError, match="after every prefill stage"):
        tp.ReductionConfig(stages=[cache_stage(1, 0.5), {"layer": 2, "ratio": 0.5}])


@pytest.mark.parametrize(
    ("stages", "strategy", "message"),
    [
        ([cache_stage(9, 0.5)], "fastv", "the model has 4 decoder layers"),
        ([cache_stage(1, 0.5)], "divprune", "not at a cache site"),
    ],
)
def test_bad_cache_stages_are_refused(llava_sdpa, stages, strategy, message):
    with pytest.raises(ConfigError, match=message):
        tp.attach(llava_sdpa, tp.ReductionConfig(strategy=strategy, stages=stages))


def test_an_encoder_has_no_cache_site():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    with pytest.raises(TokenPruneError, match="no KV cache"):
        tp.attach(vit, tp.ReductionConfig(stages=[cache_stage(1, 0.5)]))


@torch.no_grad()
@pytest.mark.parametrize("restore", [False, True])
def test_decode_flops_count_the_held_cache(llava_sdpa, restore):
    """`cached_entries` equals each layer's cache at the last step. Compacted, decode FLOPs drop with
    the stage; set aside (`restore`), the entries stay held and a dense kernel computes over them, so
    the count is the prefill stage's alone."""
    inputs = llava_inputs([Prompt([2, 3], 1)])
    stages = [{"layer": 2, "ratio": 0.3}, cache_stage(1, 0.6, every=2, restore=restore)]
    with tp.attach(llava_sdpa, tp.ReductionConfig(stages=stages)) as handle:
        _, _, cache = generate(llava_sdpa, inputs)
        trace = list(handle.trace)
    text, full = llava_sdpa.config.text_config, [inputs["input_ids"].shape[1]]
    held = cached_entries(text.num_hidden_layers, trace, full, STEPS - 1, restore)[0]
    assert [layer.keys.shape[2] for layer in cache.layers] == [n + STEPS - 1 for n in held]
    assert held[0] == full[0] and (held[1] == full[0]) == restore
    prefill_only = decode_flops(text, trace[:1], full, STEPS)[0]
    assert (decode_flops(text, trace, full, STEPS, restore)[0] == prefill_only) == restore


def test_run_reports_the_kv_cache_and_decode(tmp_path, capsys):
    """`tokenprune run` with a cache stage: the trace names its steps, KV bytes and decode FLOPs drop."""
    reduction = {"strategy": "fastv", "stages": [cache_stage(1, 0.75, every=4)]}
    assert main(["run", str(write_config(tmp_path / "run.yaml", reduction=reduction)), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "cache layer 1    before decode step 1 tokens 582 -> 150 per sample (visual 576 -> 144)" in out
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines()}
    for name in ("KV cache bytes (MiB)", "decode FLOPs (G)"):
        assert float(rows[name][2]) < 1.0, name


def test_footprint_reads_the_cache_on_this_transformers(llava_sdpa):
    """`footprint` finds the cache under either keyword (5.19's `past_key_values`, 5.23's `cache`): the
    prefill's bytes are the unreduced ones, those after the generation drop with a cache stage."""
    inputs = llava_inputs(LLAVA_BATCH)
    full = footprint(llava_sdpa, inputs, None, 3)
    reduced = footprint(llava_sdpa, inputs, tp.ReductionConfig(stages=[cache_stage(1, 0.5)]), 3)
    assert reduced.kv_cache_bytes == full.kv_cache_bytes > 0
    assert reduced.kv_cache_bytes_decoded < full.kv_cache_bytes_decoded


@torch.no_grad()
@pytest.mark.parametrize("cache_layer", [2, 3])
def test_renumbered_prefill_positions_carry_through_the_cache_stage(llava_sdpa, cache_layer):
    """Under a `renumbered` prefill stage (layer 2), a cache stage removing nothing (before every step,
    keeping the prefill stage's count, at its layer or above it) changes no logit of any step
    (<= 1e-5): decode positions of the layers from K on keep the prefill stage's shift."""
    inputs = llava_inputs(LLAVA_BATCH)
    prefill = {"layer": 2, "ratio": 0.5, "positions": "renumbered"}
    with tp.attach(llava_sdpa, tp.ReductionConfig(stages=[prefill])):
        _, reference, _ = generate(llava_sdpa, inputs)
    config = tp.ReductionConfig(stages=[prefill, cache_stage(cache_layer, 0.5, every=1)])
    with tp.attach(llava_sdpa, config) as handle:
        _, logits, _ = generate(llava_sdpa, inputs)
        assert handle.trace[-1].step == STEPS - 1
    assert largest_step_difference(logits, reference) <= 1e-5
