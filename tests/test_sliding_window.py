"""Masks of shortened layers that keep sliding windows and bidirectional blocks, in original positions.

Property tests hold `build_mask` (SDPA's boolean and eager's additive format) to a brute-force mask
written from original positions; a tiny Qwen2-VL with `use_sliding_window` and a 3-token window
(shorter than every prompt) holds reductions to the mask oracle (max abs diff <= 1e-4) and greedy
generation with the cache to recomputation without one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig, Qwen2VLForConditionalGeneration

import tokenprune as tp
from tokenprune.core.masks import SLIDING, LayerMasks, build_mask, layer_types
from tokenprune.errors import AttachError, ConfigError
from tokenprune.testing import exactness
from tokenprune.testing.families.gemma3 import pattern
from tokenprune.testing.families.qwen2_vl import FAMILY as QWEN
from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import toy_qwen2_vl

WINDOW = 3
LOGIT_TOL = 1e-4


def backend_config(backend: str) -> LlamaConfig:
    config = LlamaConfig(num_hidden_layers=2)
    config._attn_implementation = backend
    return config


def allowed(mask, backend: str, shape: tuple[int, int, int]):
    """bool [B, q, kv] of a backend mask (SDPA: True = attend, None = causal; eager: 0 = attend)."""
    if mask is None:
        batch, q_length, kv_length = shape
        return (
            torch.ones(q_length, kv_length, dtype=torch.bool).tril(kv_length - q_length).expand(batch, -1, -1)
        )
    return mask[:, 0] if backend == "sdpa" else mask[:, 0] == 0


@st.composite
def shortened(draw):
    """(kept positions [B, kv] with left filler -1, blocks [B, N], window, q_length)."""
    length = draw(st.integers(4, 14))
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        kept = draw(st.lists(st.booleans(), min_size=length, max_size=length))
        kept[-1] = True  # the last token is never removed
        rows.append([i for i, k in enumerate(kept) if k])
    width = max(len(r) for r in rows)
    positions = torch.tensor([[-1] * (width - len(r)) + r for r in rows])
    blocks = torch.full((len(rows), length), -1)
    for b in range(len(rows)):
        start = draw(st.integers(0, length - 1))
        blocks[b, start : start + draw(st.integers(1, 5))] = draw(st.integers(0, 2))
    window = draw(st.one_of(st.none(), st.integers(1, length + 1)))
    return positions, blocks, window, draw(st.integers(1, width))


@given(case=shortened(), backend=st.sampled_from(["sdpa", "eager"]), with_blocks=st.booleans())
def test_the_mask_keeps_window_and_blocks_in_original_positions(case, backend, with_blocks):
    positions, blocks, window, q_length = case
    blocks = blocks if with_blocks else None
    valid = positions >= 0
    mask = build_mask(backend_config(backend), valid, q_length, torch.float32, positions, window, blocks)
    # brute force: the unreduced pattern over original positions, read at the kept ones
    length = blocks.shape[1] if blocks is not None else int(positions.max()) + 1
    full = pattern(
        torch.ones(len(positions), length, dtype=torch.bool), _blocks_or_none(blocks, positions), window
    )
    expected = torch.zeros(len(positions), q_length, positions.shape[1], dtype=torch.bool)
    for b, row in enumerate(positions.tolist()):
        for qi, q in enumerate(row[-q_length:]):
            for ki, k in enumerate(row):
                expected[b, qi, ki] = q >= 0 and k >= 0 and bool(full[b, q, k])
    got = allowed(mask, backend, expected.shape)
    real_queries = valid[:, -q_length:, None]
    assert torch.equal(got & real_queries, expected)


def _blocks_or_none(blocks, positions):
    if blocks is not None:
        return blocks
    return torch.full((len(positions), int(positions.max()) + 1), -1)


@given(
    kept=st.lists(st.booleans(), min_size=8, max_size=8),
    generated=st.integers(1, 6),
    window=st.integers(2, 6),
)
def test_decode_masks_window_the_entries_a_sliding_cache_returns(kept, generated, window):
    """At a decode step a sliding layer's cache returns its last `window - 1` entries and the new token:
    the mask keeps, of those, the ones within the window in original positions."""
    kept[-1] = True
    prompt = [i for i, k in enumerate(kept) if k]
    entries = prompt + list(
        range(len(kept), len(kept) + generated)
    )  # the layer's cached slots, the new one last
    config = backend_config("sdpa")
    config.layer_types, config.sliding_window = ["full_attention", SLIDING], window

    class Cache:
        def get_mask_sizes(self, q_length: int, layer: int) -> tuple[int, int]:
            cumulative = len(entries) - q_length
            if layer_types(config)[layer] != SLIDING:
                return cumulative + q_length, 0
            return min(cumulative, window - 1) + q_length, max(cumulative - window + 1, 0)

    positions = torch.tensor([entries])
    masks = LayerMasks(config, positions, positions >= 0, 1, torch.float32, cache=Cache())
    sliding, full = masks.for_layer(1), masks.for_layer(0)
    seen = entries[-min(len(entries) - 1, window - 1) - 1 :]
    query = entries[-1]
    assert sliding[0, 0, 0].tolist() == [query - k < window for k in seen]
    assert full is None or bool(full.all())


# -- a Qwen2-VL whose language model slides a window from layer 1 on --------------------------------


def sliding_qwen(attn_implementation: str) -> torch.nn.Module:
    """The toy Qwen2-VL with `use_sliding_window`: layer 0 global, layers 1-3 a 3-token window."""
    config = copy.deepcopy(toy_qwen2_vl(attn_implementation=attn_implementation).config)
    text = config.text_config
    text.use_sliding_window, text.sliding_window, text.max_window_layers = True, WINDOW, 1
    text.layer_types = ["full_attention"] + [SLIDING] * (text.num_hidden_layers - 1)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = toy_qwen2_vl().generation_config.suppress_tokens
    return model


def sliding_attention(model, inputs, layer: int):
    """Qwen2's own pattern: causal over real tokens, within the window in sliding layers."""
    text = model.config.text_config
    window = text.sliding_window if text.layer_types[layer] == SLIDING else None
    valid = inputs["attention_mask"].bool()
    return pattern(valid, torch.full(valid.shape, -1), window)


SLIDING_QWEN = Family(
    adapter="qwen2_vl",
    model=sliding_qwen,
    inputs=QWEN.inputs,
    attention=sliding_attention,
    model_positions=True,
)
SAMPLES = [Sample((2, 1, 3), 2), Sample((3, 2), 1)]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def qwen(request):
    return sliding_qwen(request.param)


def reduced_logits(model, inputs, config: tp.ReductionConfig):
    with tp.attach(model, config) as handle:
        return exactness.forward(SLIDING_QWEN, model, inputs), handle.trace


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_qwen_with_a_sliding_window_equals_the_mask_oracle(qwen, layer):
    inputs = SLIDING_QWEN.inputs(qwen, SAMPLES, 0)
    assert inputs["input_ids"].shape[1] > 4 * WINDOW
    logits, trace = reduced_logits(
        qwen, inputs, tp.ReductionConfig(strategy="random", layer=layer, ratio=0.6)
    )
    expected = exactness.mask_oracle_logits(SLIDING_QWEN, qwen, inputs, trace)
    for b, row in enumerate(trace[-1].kept):
        row = row[row >= 0]
        assert (logits[b, row] - expected[b, row]).abs().max() <= LOGIT_TOL


def test_the_window_matters_to_the_oracle(qwen):
    """The same reduction against a causal oracle without the window disagrees: the test can fail."""
    inputs = SLIDING_QWEN.inputs(qwen, SAMPLES, 0)
    logits, trace = reduced_logits(qwen, inputs, tp.ReductionConfig(strategy="random", layer=1, ratio=0.6))
    causal = Family(adapter="qwen2_vl", model=sliding_qwen, inputs=QWEN.inputs, model_positions=True)
    expected = exactness.mask_oracle_logits(causal, qwen, inputs, trace)
    row = trace[-1].kept[0]
    assert (logits[0, row[row >= 0]] - expected[0, row[row >= 0]]).abs().max() > 1e-2


@pytest.mark.parametrize("layer", [0, 2])
def test_qwen_with_a_sliding_window_generates_as_recomputation(qwen, layer):
    """Greedy decoding on the reduced cache (sliding layers keep their last entries) equals the mask
    oracle run without a cache."""
    inputs = SLIDING_QWEN.inputs(qwen, SAMPLES, 1)
    config = tp.ReductionConfig(strategy="random", layer=layer, ratio=0.5)
    with tp.attach(qwen, config) as handle:
        out = qwen.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)[:, -5:]
        trace = handle.trace
    tokens, _ = exactness.mask_oracle_greedy(SLIDING_QWEN, qwen, inputs, trace, 5)
    assert torch.equal(out, tokens)


def test_attention_ranked_sites_after_a_sliding_layer_are_refused():
    """FastV reads layer K-1's attention: a sliding layer there is refused, naming the global layers."""
    model = sliding_qwen("sdpa")
    with pytest.raises(ConfigError, match="sliding-window layer"):
        tp.attach(model, tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.5))


def test_flash_attention_with_a_sliding_window_is_refused():
    model = sliding_qwen("sdpa")
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(AttachError, match="slides a window"):
        tp.attach(model, tp.ReductionConfig(strategy="random", layer=1, ratio=0.5))
