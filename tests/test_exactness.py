"""Exactness of the in-place reduction against independent oracles (float32, tolerances stated).

- ratio 0 equals no attachment (max abs diff <= 1e-5);
- the mask oracle: kept positions' prefill logits equal the unreduced model with the removed
  tokens masked out as keys from layer K on (max abs diff <= 1e-4), and greedy generation with
  the KV cache equals the oracle's greedy run without a cache;
- batch equivalence: a sample in a left-padded batch keeps the same tokens and generates the same
  greedy continuation as alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BUILT_IN_STRATEGIES
from hypothesis import given
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.core.language.forward import cache_of, with_cache
from tokenprune.testing.oracles import (
    Prompt,
    assert_same_greedy,
    generation_positions,
    greedy,
    hooked,
    llava_inputs,
    oracle_greedy,
    oracle_logits,
    oracle_masks,
    removed_positions,
)

STRATEGIES = list(BUILT_IN_STRATEGIES)
# The mask oracle is the claim of pruning; merging strategies have their own oracle (test_tome.py).
PRUNING = [name for name in STRATEGIES if not tp.strategy_class(name).merges]
LOGIT_TOL = 1e-4
IDENTITY_TOL = 1e-5

prompts = st.builds(
    lambda text, images: Prompt(text[: images + 1], images),
    st.lists(st.integers(1, 6), min_size=3, max_size=3),
    st.integers(0, 2),
)


def run(model, inputs, **kw):
    return model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False, **kw)


def assert_matches_mask_oracle(model, inputs, config):
    """Prefill logits at every kept position equal the mask oracle's (max abs diff <= LOGIT_TOL)."""
    with tp.attach(model, config) as handle:
        logits = run(model, inputs).logits
        trace = handle.trace
    expected = oracle_logits(model, inputs, trace, config=config)  # each stage's position policy
    for b, row in enumerate(trace[-1].kept):
        row = row[row >= 0]
        assert (logits[b, row] - expected[b, row]).abs().max() <= LOGIT_TOL
    return trace


@torch.no_grad()
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ratio_zero_is_identity(llava, strategy):
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    reference = run(llava, inputs).logits
    reference_tokens = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
    with tp.attach(llava, tp.ReductionConfig(strategy=strategy, layer=1, ratio=0.0)):
        logits = run(llava, inputs).logits
        tokens = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
    real = inputs["attention_mask"].bool()
    assert (logits - reference)[real].abs().max() <= IDENTITY_TOL
    assert torch.equal(tokens, reference_tokens)


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
@given(batch=st.lists(prompts, min_size=1, max_size=3), layer=st.integers(1, 3), ratio=st.floats(0.1, 0.9))
def test_mask_oracle_prefill(llava, strategy, batch, layer, ratio):
    assert_matches_mask_oracle(
        llava, llava_inputs(batch), tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio)
    )


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
def test_mask_oracle_multi_stage(llava, strategy):
    inputs = llava_inputs([Prompt([2, 3, 1], 2), Prompt([5, 1], 1)])
    config = tp.ReductionConfig(
        strategy=strategy, stages=[{"layer": 1, "ratio": 0.4}, {"layer": 3, "ratio": 0.7}]
    )
    trace = assert_matches_mask_oracle(llava, inputs, config)
    assert [e.layer for e in trace] == [1, 3]


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
@given(batch=st.lists(prompts, min_size=1, max_size=3), layer=st.integers(1, 3), ratio=st.floats(0.1, 0.9))
def test_generate_with_cache_matches_oracle_without_cache(llava, strategy, batch, layer, ratio):
    inputs = llava_inputs(batch)
    steps = 5
    config = tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio)
    with tp.attach(llava, config) as handle:
        out = llava.generate(**inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
        trace = handle.trace
    expected, logits = oracle_greedy(llava, inputs, trace, steps, config=config)
    assert_same_greedy(out[:, -steps:], expected, logits)


@torch.no_grad()
def test_generate_multi_stage_matches_oracle(llava):
    inputs = llava_inputs([Prompt([2, 3, 1], 2), Prompt([5, 1], 1)])
    config = tp.ReductionConfig(stages=[{"layer": 1, "keep": 20}, {"layer": 2, "keep": 8}])
    with tp.attach(llava, config) as handle:
        out = llava.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
        trace = handle.trace
    expected, logits = oracle_greedy(llava, inputs, trace, 5)
    assert_same_greedy(out[:, -5:], expected, logits)


@torch.no_grad()
@pytest.mark.parametrize("strategy", STRATEGIES)
@given(batch=st.lists(prompts, min_size=2, max_size=3), layer=st.integers(1, 3), ratio=st.floats(0.0, 0.9))
def test_batch_equals_each_sample_alone(llava, strategy, batch, layer, ratio):
    inputs = llava_inputs(batch)
    pad = (1 - inputs["attention_mask"]).sum(1)
    first_image = [sum(p.images for p in batch[:b]) for b in range(len(batch))]
    with tp.attach(llava, tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio)) as handle:
        together, _ = greedy(llava, inputs, 4)
        kept_together = handle.trace[0].kept
        for b, prompt in enumerate(batch):
            alone_inputs = llava_inputs([prompt], seed=b)
            if prompt.images:
                alone_inputs["pixel_values"] = inputs["pixel_values"][
                    first_image[b] : first_image[b] + prompt.images
                ]
            alone, logits = greedy(llava, alone_inputs, 4)
            kept_alone = handle.trace[0].kept[0]
            row = kept_together[b]
            assert torch.equal(row[row >= 0] - pad[b], kept_alone[kept_alone >= 0])
            assert_same_greedy(together[b : b + 1], alone, logits)


@torch.no_grad()
def test_sdpa_and_eager_keep_the_same_tokens(llava_sdpa, llava_eager):
    inputs = llava_inputs([Prompt([3, 2, 4], 2), Prompt([1, 6], 1)])
    kept = []
    for model in (llava_sdpa, llava_eager):
        for score in ("last", "mean"):
            with tp.attach(model, tp.ReductionConfig(layer=2, ratio=0.5, params={"score": score})) as handle:
                run(model, inputs)
                kept.append(handle.trace[0].kept)
    assert torch.equal(kept[0], kept[2]) and torch.equal(kept[1], kept[3])


@torch.no_grad()
def test_sampled_generation_ratio_zero_equals_unattached_and_is_reproducible(llava_sdpa):
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    sample = {"max_new_tokens": 6, "do_sample": True, "top_k": 20, "temperature": 1.5}
    torch.manual_seed(11)
    reference = llava_sdpa.generate(**inputs, **sample)
    with tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.0)):
        torch.manual_seed(11)
        identity = llava_sdpa.generate(**inputs, **sample)
    with tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.5)):
        runs = []
        for _ in range(2):
            torch.manual_seed(11)
            runs.append(llava_sdpa.generate(**inputs, **sample))
    assert torch.equal(identity, reference)
    assert torch.equal(runs[0], runs[1])


@torch.no_grad()
def test_a_multi_token_continuation_on_a_reduced_cache_matches_the_oracle(llava_sdpa):
    """A chat turn appended after the prefill (several tokens at once) sees the kept prompt tokens only."""
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    new = torch.randint(10, 120, (2, 3), generator=torch.Generator().manual_seed(4))
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)
    positions = generation_positions(mask)
    length = inputs["input_ids"].shape[1]
    with tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.6)) as handle:
        first = llava_sdpa(**inputs, position_ids=positions[:, :length], use_cache=True)
        trace = handle.trace
        second = llava_sdpa(
            input_ids=new,
            attention_mask=mask,
            position_ids=positions[:, length:],
            **with_cache(cache_of(first)),
            use_cache=True,
        )
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], new], 1), "attention_mask": mask}
    expected = oracle_logits(llava_sdpa, full, trace, appended=new.shape[1])
    assert (second.logits - expected[:, length:]).abs().max() <= LOGIT_TOL


BEAM_SEARCH = {
    "max_new_tokens": 4,
    "num_beams": 3,
    "num_return_sequences": 3,
    "do_sample": False,
    "length_penalty": 0.0,  # a beam's score is then the plain sum of its tokens' log-probabilities
    "eos_token_id": None,
    "output_scores": True,
    "return_dict_in_generate": True,
}


@torch.no_grad()
def test_beam_search_scores_equal_the_mask_oracle_and_ratio_0_equals_the_bare_model(llava_sdpa):
    """Every returned beam's score equals the mask oracle's log-probability of that beam (teacher
    forced, no cache; max abs diff <= LOGIT_TOL per token); at ratio 0 beams and scores are bit-identical."""
    # One image per sample: `generate` repeats pixel_values per beam, which pairs rows and images only then.
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 5], 1)])
    bare = llava_sdpa.generate(**inputs, **BEAM_SEARCH)
    with tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.0)):
        unreduced = llava_sdpa.generate(**inputs, **BEAM_SEARCH)
    assert torch.equal(unreduced.sequences, bare.sequences)
    assert torch.equal(unreduced.sequences_scores, bare.sequences_scores)
    with tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.5)) as handle:
        beams = llava_sdpa.generate(**inputs, **BEAM_SEARCH)
        trace = handle.trace  # prefill of the beams: one row per beam, in the returned order
    beam_rows = {k: v.repeat_interleave(BEAM_SEARCH["num_beams"], dim=0) for k, v in inputs.items()}
    length, steps = inputs["input_ids"].shape[1], BEAM_SEARCH["max_new_tokens"]
    generated = beams.sequences[:, length:]
    mask = torch.cat([beam_rows["attention_mask"], generated.new_ones(len(generated), steps)], dim=1)
    teacher_forced = {**beam_rows, "input_ids": beams.sequences, "attention_mask": mask}
    logits = oracle_logits(llava_sdpa, teacher_forced, trace, appended=steps)[:, length - 1 : -1]
    expected = logits.log_softmax(-1).gather(-1, generated[..., None]).squeeze(-1).sum(-1)
    assert (beams.sequences_scores - expected).abs().max() <= LOGIT_TOL * steps
    assert not torch.equal(beams.sequences_scores, bare.sequences_scores)  # the reduction did act


@torch.no_grad()
def test_hidden_states_at_kept_positions_equal_the_mask_oracle(llava_sdpa):
    """Every layer's hidden state at a kept position equals the mask oracle's (max abs diff <= 1e-4);
    from layer K on they come in the shortened layout, the final one at full length again."""
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    positions = generation_positions(inputs["attention_mask"])
    with tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.5)) as handle:
        out = llava_sdpa(**inputs, position_ids=positions, output_hidden_states=True, use_cache=False)
        trace = handle.trace
    valid = inputs["attention_mask"].bool()
    with hooked(oracle_masks(llava_sdpa, removed_positions(trace, valid), valid)):
        expected = llava_sdpa(**inputs, position_ids=positions, output_hidden_states=True, use_cache=False)
    full, short = inputs["input_ids"].shape[1], trace[0].kept.shape[1]
    assert [h.shape[1] for h in out.hidden_states] == [full, full, full, short, full]
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    for got, want in zip(out.hidden_states, expected.hidden_states, strict=True):
        for b, row in enumerate(trace[0].kept):
            at = row >= 0
            slots = at.nonzero().squeeze(1) if got.shape[1] == short else row[at]
            assert (got[b, slots] - want[b, row[at]]).abs().max() <= LOGIT_TOL
