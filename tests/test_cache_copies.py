"""Calls on a reduced KV cache that transformers supports: copies of a prompt's cache, assisted
decoding (which crops the cache), shortened attentions; and the caches tokenprune refuses, clearly.

Copies and assisted decoding are compared with the original run token for token and score for
score (greedy, float32, exact: both run the same kernels on the same cache contents).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import tokenprune as tp
from tokenprune.core.language.forward import cache_of, with_cache
from tokenprune.testing.models import IMAGE_TOKEN_ID
from tokenprune.testing.oracles import Prompt, llava_inputs

GREEDY = {"do_sample": False, "return_dict_in_generate": True, "output_scores": True}


def continued(inputs: dict, new: list[list[int]]) -> dict:
    """The prompt followed by new tokens (a second turn), without the images the cache already holds."""
    tokens = torch.tensor(new)
    return {
        "input_ids": torch.cat([inputs["input_ids"], tokens], 1),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1),
    }


def assert_same_run(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))


@torch.no_grad()
def test_a_deep_copy_of_a_reduced_cache_continues_like_the_original(llava_sdpa):
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    turn = continued(inputs, [[20, 21], [22, 23]])
    with tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.5)):
        prompt_cache = cache_of(llava_sdpa(**inputs, use_cache=True))
        first = llava_sdpa.generate(
            **turn, **with_cache(copy.deepcopy(prompt_cache)), max_new_tokens=4, **GREEDY
        )
        second = llava_sdpa.generate(
            **turn, **with_cache(copy.deepcopy(prompt_cache)), max_new_tokens=4, **GREEDY
        )
        original = llava_sdpa.generate(**turn, **with_cache(prompt_cache), max_new_tokens=4, **GREEDY)
    assert_same_run(first, original)
    assert_same_run(second, original)


@torch.no_grad()
def test_a_copy_of_a_cache_reduced_by_a_detached_attachment_is_refused(llava_sdpa):
    inputs = llava_inputs([Prompt([2, 3], 1)])
    with tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.5)):
        cache = cache_of(llava_sdpa(**inputs, use_cache=True))
    step = {"input_ids": torch.tensor([[20]]), **with_cache(copy.deepcopy(cache)), "use_cache": True}
    with (
        tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.5)),
        pytest.raises(tp.InputError, match="another tokenprune attachment"),
    ):
        llava_sdpa(**step)


def assistant_for(model) -> LlamaForCausalLM:
    """A text-only assistant with the VLM's own language model weights, drafting 3 tokens every step."""
    assistant = LlamaForCausalLM(model.model.language_model.config).eval()
    assistant.model.load_state_dict(model.model.language_model.state_dict())
    assistant.lm_head.load_state_dict(model.lm_head.state_dict())
    assistant.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]
    assistant.generation_config.num_assistant_tokens = 3
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    return assistant


@torch.no_grad()
def test_assisted_decoding_equals_unassisted_reduced_greedy(llava_sdpa):
    """The assistant's drafts are verified on the reduced cache, rejected ones cropped from every layer.

    DivPrune selects from the visual tokens alone: the draft tokens that the prefill also holds under
    assisted decoding cannot change its selection (FastV ranks from the last token: a draft one).
    """
    inputs = llava_inputs([Prompt([3, 4, 5], 2)])
    lengths: list[int] = []
    watch = llava_sdpa.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        with tp.attach(llava_sdpa, tp.ReductionConfig(strategy="divprune", layer=2, ratio=0.5)) as handle:
            plain = llava_sdpa.generate(**inputs, max_new_tokens=10, min_new_tokens=10, **GREEDY)
            plain_kept = handle.trace[0].kept
            del lengths[:]
            assisted = llava_sdpa.generate(
                **inputs,
                max_new_tokens=10,
                min_new_tokens=10,
                assistant_model=assistant_for(llava_sdpa),
                **GREEDY,
            )
            assert torch.equal(handle.trace[0].kept[:, : plain_kept.shape[1]], plain_kept)
    finally:
        watch.remove()
    assert lengths[0] > inputs["input_ids"].shape[1] and max(lengths[1:]) > 1  # drafts were verified
    assert torch.equal(assisted.sequences, plain.sequences)


@torch.no_grad()
def test_attentions_from_the_site_on_come_back_shortened(llava_eager):
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    with tp.attach(llava_eager, tp.ReductionConfig(layer=2, ratio=0.5)) as handle:
        out = llava_eager(**inputs, output_attentions=True, use_cache=False)
        kept = handle.trace[0].kept.shape[1]
    batch, length = inputs["input_ids"].shape
    heads = llava_eager.config.text_config.num_attention_heads
    assert [tuple(a.shape) for a in out.attentions] == [(batch, heads, length, length)] * 2 + [
        (batch, heads, kept, kept)
    ] * 2


@torch.no_grad()
def test_a_static_cache_is_refused_naming_it(llava_sdpa):
    inputs = llava_inputs([Prompt([3, 4], 1)])
    with (
        tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.5)),
        pytest.raises(tp.InputError, match=r"StaticCache.*DynamicCache") as refused,
    ):
        llava_sdpa.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    assert "4-D" not in str(refused.value)
