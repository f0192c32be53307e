"""Property tests of the shape, count, position and cache invariants over random batches and settings."""

from __future__ import annotations

import torch
from conftest import BUILT_IN_STRATEGIES
from hypothesis import given
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.testing.models import IMAGE_TOKEN_ID
from tokenprune.testing.oracles import Prompt, llava_inputs

prompts = st.builds(
    lambda text, images: Prompt(text[: images + 1], images),
    st.lists(st.integers(1, 5), min_size=3, max_size=3),
    st.integers(0, 2),
)
budgets = st.one_of(
    st.floats(0.0, 0.95).map(lambda r: {"ratio": r}),
    st.integers(0, 80).map(lambda k: {"keep": k}),
)


def layer_inputs(model, layers):
    """Pre-hooks recording the keyword inputs of the given decoder layers at every forward."""
    seen = {i: [] for i in layers}
    handles = [
        model.model.language_model.layers[i].register_forward_pre_hook(
            lambda m, a, kw, i=i: seen[i].append({**kw, "hidden": a[0] if a else kw["hidden_states"]}),
            with_kwargs=True,
        )
        for i in layers
    ]
    return seen, handles


@torch.no_grad()
@given(
    batch=st.lists(prompts, min_size=1, max_size=3),
    layer=st.integers(0, 3),
    budget=budgets,
    strategy=st.sampled_from(BUILT_IN_STRATEGIES),
)
def test_kept_sets(llava_sdpa, batch, layer, budget, strategy):
    if layer == 0 and tp.strategy_class(strategy).requires:  # signals of the layer before the site
        layer = 1
    inputs = llava_inputs(batch)
    with tp.attach(llava_sdpa, tp.ReductionConfig(strategy=strategy, layer=layer, **budget)) as handle:
        llava_sdpa(**inputs, use_cache=False)
        (event,) = handle.trace
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    for b in range(len(batch)):
        row = event.kept[b]
        assert bool((row[: (row < 0).sum()] == -1).all()), "filler only on the left"
        kept = row[row >= 0]
        assert bool((kept[1:] > kept[:-1]).all()), "strictly increasing"
        assert bool(real[b, kept].all()), "a subset of the real tokens"
        text = (real[b] & (ids[b] != IMAGE_TOKEN_ID)).nonzero().squeeze(1)
        assert set(text.tolist()) <= set(kept.tolist()), "every text token kept"
        n_visual = int((ids[b] == IMAGE_TOKEN_ID).sum())
        expected = (
            min(budget["keep"], n_visual) if "keep" in budget else round(n_visual * (1 - budget["ratio"]))
        )
        assert event.visual_before[b] == n_visual
        assert event.visual_after[b] == expected
        assert int((ids[b, kept] == IMAGE_TOKEN_ID).sum()) == expected
        assert event.tokens_after[b] == len(kept) == len(text) + expected
    assert event.kept.shape[1] == max(event.tokens_after)


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=1, max_size=3), layer=st.integers(0, 3), budget=budgets)
def test_cache_lengths_and_decode_positions(llava_sdpa, batch, layer, budget):
    inputs = llava_inputs(batch)
    steps = 3
    seen, handles = layer_inputs(llava_sdpa, [0, 3])
    reference = llava_sdpa.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    for h in handles:
        h.remove()
    unreduced = seen
    with tp.attach(llava_sdpa, tp.ReductionConfig(strategy="random", layer=layer, **budget)) as handle:
        seen, handles = layer_inputs(llava_sdpa, [0, 3])
        out = llava_sdpa.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            return_dict_in_generate=True,
        )
        for h in handles:
            h.remove()
        (event,) = handle.trace
    length = inputs["input_ids"].shape[1]
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    for i in range(len(llava_sdpa.model.language_model.layers)):
        expected = (length if i < layer else event.kept.shape[1]) + steps - 1
        assert cache.get_seq_length(i) == expected
    # decode steps take the positions of the unreduced run, for the first layer and past the site
    for i in (0, 3):
        for step in range(1, steps):
            assert torch.equal(seen[i][step]["position_ids"], unreduced[i][step]["position_ids"])
            for got, want in zip(
                seen[i][step]["position_embeddings"], unreduced[i][step]["position_embeddings"], strict=True
            ):
                assert torch.equal(got, want)
    assert out.sequences.shape == reference.shape


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=1, max_size=3), layer=st.integers(1, 3), ratio=st.floats(0.0, 0.9))
def test_kept_tokens_keep_their_original_rotary_positions(llava_sdpa, batch, layer, ratio):
    inputs = llava_inputs(batch)
    seen, handles = layer_inputs(llava_sdpa, [layer])
    llava_sdpa(**inputs, use_cache=False)
    for h in handles:
        h.remove()
    (full,) = seen[layer]
    with tp.attach(llava_sdpa, tp.ReductionConfig(strategy="uniform", layer=layer, ratio=ratio)) as handle:
        seen, handles = layer_inputs(llava_sdpa, [layer])  # after attaching: sees what the layer gets
        logits = llava_sdpa(**inputs, use_cache=False).logits
        for h in handles:
            h.remove()
        (event,) = handle.trace
    (short,) = seen[layer]
    assert logits.shape[:2] == inputs["input_ids"].shape  # outputs keep the caller's length
    for b, row in enumerate(event.kept):
        real = row >= 0
        for got, want in zip(short["position_embeddings"], full["position_embeddings"], strict=True):
            want = want.expand(len(event.kept), -1, -1)
            assert torch.equal(got[b, real], want[b, row[real]])
        assert torch.equal(short["hidden"][b, real], full["hidden"][b, row[real]])


@torch.no_grad()
def test_text_only_inputs_are_recorded_not_reduced(llava_sdpa):
    inputs = llava_inputs([Prompt([5], 0), Prompt([3], 0)])
    reference = llava_sdpa(**inputs, use_cache=False).logits
    with tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.5)) as handle:
        logits = llava_sdpa(**inputs, use_cache=False).logits
        (event,) = handle.trace
    assert event.visual_before == event.visual_after == [0, 0]
    assert event.tokens_before == event.tokens_after == [5, 3]
    real = inputs["attention_mask"].bool()
    assert (logits - reference)[real].abs().max() <= 1e-5


@torch.no_grad()
def test_a_visual_last_token_is_kept_within_the_budget(llava_sdpa):
    ids = torch.tensor([[1, 11, 12] + [IMAGE_TOKEN_ID] * 36])
    with tp.attach(llava_sdpa, tp.ReductionConfig(strategy="random", layer=1, ratio=0.5)) as handle:
        llava_sdpa(input_ids=ids, pixel_values=torch.randn(1, 3, 24, 24))
        (event,) = handle.trace
    kept = event.kept[0]
    assert 38 in kept.tolist()  # generation reads the last token's logits
    assert event.visual_before == [36] and event.visual_after == [18]
    assert int((ids[0, kept] == IMAGE_TOKEN_ID).sum()) == 18
