"""ToMe inside a language model: the merge oracle, the cache, the merge contract (float32).

The merge oracle runs the *unreduced* model; at layer K it replaces each surviving token's hidden
state by the mean of its group (the trace's sources) and, from layer K on, hides merged-away
tokens as keys and adds log(group size) to every query's logit of each key. The kept tokens'
logits must equal tokenprune's shortened run (max abs diff <= 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import tokenprune as tp
from tokenprune.testing.models import toy_qwen2_vl
from tokenprune.testing.oracles import (
    Prompt,
    assert_kept_logits_match,
    generation_positions,
    hooked,
    llava_inputs,
    recomputed_greedy,
)
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs

LOGIT_TOL = 1e-4

prompts = st.builds(
    lambda text, images: Prompt(text[: images + 1], images),
    st.lists(st.integers(1, 6), min_size=3, max_size=3),
    st.integers(0, 2),
)


def tome(layer: int, ratio: float, proportional: bool = True) -> tp.ReductionConfig:
    return tp.ReductionConfig(
        strategy="tome", layer=layer, ratio=ratio, params={"proportional_attention": proportional}
    )


def merge_oracle_hooks(model, event, valid: Tensor, proportional: bool) -> list:
    """Hooks on the unreduced model reproducing one merge stage by hand (see the module docstring).

    Positions are the model's own: a survivor keeps its original (1-D or 3-D) position.
    """
    layers = model.model.language_model.layers
    length = valid.shape[1]
    positions = torch.arange(length)
    members = event.groups[:, None, :] == positions[None, :, None]  # [B, rep, N]
    size = members.sum(-1).float()
    survivor = valid & (event.groups == positions)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & survivor[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool)[None]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    if proportional:
        mask = mask + size.clamp(min=1).log()[:, None, :]
    mask = mask[:, None]  # an additive float mask works for eager and SDPA alike

    def merge(module, args, kwargs):
        hidden = kwargs["hidden_states"] if not args else args[0]
        averaged = (members.float() @ hidden) / size.clamp(min=1)[..., None]
        hidden = torch.where(survivor[..., None], averaged, hidden)
        kwargs = {**kwargs, "attention_mask": mask}
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    def masked(module, args, kwargs):
        return args, {**kwargs, "attention_mask": mask}

    return [
        layer.register_forward_pre_hook(merge if index == event.layer else masked, with_kwargs=True)
        for index, layer in enumerate(layers)
        if index >= event.layer
    ]


def forward(model, inputs):
    return model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)


@torch.no_grad()
@pytest.mark.parametrize("proportional", [True, False])
@given(batch=st.lists(prompts, min_size=1, max_size=3), layer=st.integers(1, 3), ratio=st.floats(0.1, 0.9))
def test_merge_oracle_prefill(llava, proportional, batch, layer, ratio):
    inputs = llava_inputs(batch)
    with tp.attach(llava, tome(layer, ratio, proportional)) as handle:
        logits = forward(llava, inputs).logits
        (event,) = handle.trace
    handles = merge_oracle_hooks(llava, event, inputs["attention_mask"].bool(), proportional)
    with hooked(handles):
        expected = forward(llava, inputs).logits
    assert_kept_logits_match(logits, expected, event.kept, LOGIT_TOL)


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=1, max_size=3), layer=st.integers(1, 3), ratio=st.floats(0.1, 0.9))
def test_merge_contract(llava_sdpa, batch, layer, ratio):
    """Exact budgets; every removed visual token lives on in exactly one kept visual token; sizes add up."""
    inputs = llava_inputs(batch)
    valid = inputs["attention_mask"].bool()
    with tp.attach(llava_sdpa, tome(layer, ratio)) as handle:
        forward(llava_sdpa, inputs)
        (event,) = handle.trace
    visual = inputs["input_ids"] == 3
    for b in range(len(batch)):
        n_visual = int(visual[b].sum())
        assert event.visual_after[b] == round(n_visual * (1 - ratio)) or n_visual == 0
        groups, kept = event.groups[b], event.kept[b]
        assert bool((groups[valid[b]] >= 0).all()) and bool((groups[~valid[b]] == -1).all())
        assert set(groups[valid[b]].tolist()) == set(kept[kept >= 0].tolist())
        assert bool(visual[b, groups[visual[b]]].all())  # visual tokens merge into visual tokens only
        text = valid[b] & ~visual[b]
        assert torch.equal(groups[text], text.nonzero().squeeze(1))
        sizes = event.sizes[b][kept >= 0] if event.sizes is not None else torch.ones(int((kept >= 0).sum()))
        assert float(sizes.sum()) == int(valid[b].sum())


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=1, max_size=3), layer=st.integers(1, 3), ratio=st.floats(0.1, 0.9))
def test_generate_with_the_cache_equals_recomputing_without_it(llava_sdpa, batch, layer, ratio):
    """Decode steps on a merged cache (key biases carried) equal full recomputation of every step."""
    inputs = llava_inputs(batch)
    steps = 4
    with tp.attach(llava_sdpa, tome(layer, ratio)):
        cached = llava_sdpa.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None
        )[:, -steps:]
        recomputed = recomputed_greedy(llava_sdpa, inputs, steps)
    assert torch.equal(cached, recomputed)


def test_tome_r_alone_is_refused_in_a_language_model(llava_sdpa):
    with pytest.raises(tp.ConfigError, match="vision transformers"):
        tp.attach(llava_sdpa, tp.ReductionConfig(strategy="tome", params={"r": 4}))


def test_r_and_a_budget_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        tp.ReductionConfig(strategy="tome", ratio=0.5, params={"r": 4})


@pytest.mark.parametrize(
    ("into_text", "combine", "message"),
    [(True, "average", r"Merge\.into"), (False, "sum", r"Merge\.combine 'sum' is not one of")],
)
def test_a_broken_merge_is_refused(llava_sdpa, into_text, combine, message):
    class Broken(tp.Reducer):
        merges = True

        def select(self, view):
            keep = tp.strategy_class("uniform")().select(view)
            nearest = torch.where(keep, torch.arange(keep.shape[1]), -1).cummax(dim=1).values
            into = torch.where(view.candidates & ~keep, 0 if into_text else nearest, -1)  # slot 0 is text
            return tp.Merge(keep, into, combine=combine)

    tp.register_strategy("broken_merge_test")(Broken)
    try:
        with (
            tp.attach(llava_sdpa, tp.ReductionConfig(strategy="broken_merge_test", layer=1, ratio=0.5)),
            pytest.raises(tp.StrategyError, match=message),
        ):
            forward(llava_sdpa, llava_inputs([Prompt([2, 2], 1)]))
    finally:
        tp.registry.STRATEGIES.unregister("broken_merge_test")


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 3])
def test_merge_oracle_on_qwen2_vl_with_3d_positions(layer):
    """Merged tokens keep their destination's (t, h, w) M-RoPE position: the oracle runs unreduced."""
    model = toy_qwen2_vl()
    batch = [
        QwenPrompt([2, 1, 3], [Item((1, 4, 6)), Item((2, 4, 4), video=True)]),
        QwenPrompt([1, 2], [Item((1, 2, 4))]),
    ]
    inputs = qwen_inputs(model, batch)
    with tp.attach(model, tome(layer, 0.6)) as handle:
        logits = model(**inputs, use_cache=False).logits
        (event,) = handle.trace
    handles = merge_oracle_hooks(model, event, inputs["attention_mask"].bool(), proportional=True)
    with hooked(handles):
        expected = model(**inputs, use_cache=False).logits
    assert_kept_logits_match(logits, expected, event.kept, LOGIT_TOL)
