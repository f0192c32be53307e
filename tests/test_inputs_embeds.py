"""Images with `inputs_embeds`: each adapter finds the placeholders as its model does, by comparing
embeddings with the placeholder token's embedding, so a call with `inputs_embeds` reduces exactly as
the same call with `input_ids`.

Oracle: the same reduced call with `input_ids`, float32. The layouts and the traces are equal, and so
are the logits (exact: max abs diff 0, both calls run the same operations on the same values) and
the greedy tokens of `generate`. Qwen2-VL computes its 3-D M-RoPE positions only from `input_ids`, so
both of its calls take the same explicit position ids and no `generate` is compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache

import pytest
import torch
from test_llava_next import next_inputs
from test_video_llava import media_inputs
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.registry import adapter_for
from tokenprune.testing.models import ToySize, toy_llava, toy_llava_next, toy_qwen2_vl, toy_video_llava
from tokenprune.testing.oracles import Prompt, generation_positions, llava_inputs
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs

STEPS = 4
LANGUAGE = tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.5)
TOWER = tp.ReductionConfig(strategy="fastervlm", stages=[{"site": "vision", "layer": 1, "ratio": 0.6}])


@dataclass
class Case:
    """A VLM, a batch with media and input ids, and the position ids both calls take."""

    model: nn.Module
    inputs: dict[str, Tensor]
    positions: Callable[[dict[str, Tensor]], Tensor]


def left_padded_positions(inputs: dict[str, Tensor]) -> Tensor:
    return generation_positions(inputs["attention_mask"])


def llava_case() -> Case:
    model = toy_llava(ToySize(vision_layers=3))
    return Case(model, llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)]), left_padded_positions)


def llava_next_case() -> Case:
    model = toy_llava_next()
    inputs = next_inputs(model, [Prompt([2, 3], 1), Prompt([4, 1], 1)], [(30, 50), (40, 20)])
    return Case(model, inputs, left_padded_positions)


def video_llava_case() -> Case:
    model = toy_video_llava(ToySize(vision_layers=3))
    inputs = media_inputs([[2, "video", 1, "image", 2], [1, "image", 3]], frames=2)
    return Case(model, inputs, left_padded_positions)


def qwen2_vl_case() -> Case:
    model = toy_qwen2_vl()
    prompts = [
        QwenPrompt([2, 1, 3], [Item((1, 4, 6)), Item((2, 4, 4), video=True)]),
        QwenPrompt([1, 2], [Item((1, 2, 4))]),
    ]
    inputs = qwen_inputs(model, prompts)

    def rope_positions(inputs: dict[str, Tensor]) -> Tensor:
        keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
        return model.model.get_rope_index(**{key: inputs.get(key) for key in keys})[0]

    return Case(model, inputs, rope_positions)


CASES = {
    "llava": (llava_case, [LANGUAGE, TOWER]),
    "llava_next": (llava_next_case, [LANGUAGE]),
    "video_llava": (video_llava_case, [LANGUAGE, TOWER]),
    "qwen2_vl": (qwen2_vl_case, [LANGUAGE]),
}
# Qwen2-VL computes its M-RoPE positions in generate() from input_ids only: from embeddings it has none.
GENERATING = ["llava", "llava_next", "video_llava"]


@cache
def built(name: str) -> Case:
    return CASES[name][0]()


def embedded(case: Case) -> dict[str, Tensor]:
    """The same inputs with `inputs_embeds` in place of `input_ids`."""
    inputs = dict(case.inputs)
    inputs["inputs_embeds"] = case.model.get_input_embeddings()(inputs.pop("input_ids"))
    return inputs


@torch.no_grad()
@pytest.mark.parametrize("name", list(CASES))
def test_the_layout_from_embeddings_is_the_layout_from_ids(name):
    case = built(name)
    adapter = adapter_for(case.model, None)
    from_ids, from_embeds = adapter.visual_layout(case.inputs), adapter.visual_layout(embedded(case))
    for field in fields(from_ids):
        expected, got = getattr(from_ids, field.name), getattr(from_embeds, field.name)
        assert torch.equal(got, expected) if isinstance(got, Tensor) else got == expected, field.name


@torch.no_grad()
@pytest.mark.parametrize("name", list(CASES))
def test_a_reduced_forward_from_embeddings_equals_the_one_from_ids(name):
    case = built(name)
    positions = case.positions(case.inputs)
    for config in CASES[name][1]:
        with tp.attach(case.model, config) as handle:
            expected = case.model(**case.inputs, position_ids=positions, use_cache=False).logits
            expected_trace = handle.trace
            got = case.model(**embedded(case), position_ids=positions, use_cache=False).logits
            trace = handle.trace
        assert [event.site for event in trace] == [event.site for event in expected_trace]
        assert all(torch.equal(a.kept, b.kept) for a, b in zip(trace, expected_trace, strict=True))
        assert torch.equal(got, expected)


@torch.no_grad()
@pytest.mark.parametrize("name", GENERATING)
def test_generate_from_embeddings_equals_generate_from_ids(name):
    case = built(name)
    options = {"max_new_tokens": STEPS, "do_sample": False, "eos_token_id": None}
    for config in CASES[name][1]:
        with tp.attach(case.model, config) as handle:
            expected = case.model.generate(**case.inputs, **options)[:, -STEPS:]
            expected_trace = handle.trace
            got = case.model.generate(**embedded(case), **options)
            trace = handle.trace
        assert all(torch.equal(a.kept, b.kept) for a, b in zip(trace, expected_trace, strict=True))
        assert torch.equal(got, expected)
