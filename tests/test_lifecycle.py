"""The attach lifecycle: all or nothing, nothing pinned after the model is dropped, nothing kept from a
forward, and backends that cannot carry a reduction's attention bias refused when attaching."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import timm
import torch
from test_attach import hook_state
from tokenprune.adapters.vit import VitAdapter
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention

import tokenprune as tp
from tokenprune.core.language.session import Session
from tokenprune.testing.models import ToySize, toy_llava
from tokenprune.testing.oracles import Prompt, llava_inputs

VIT_SIZE = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 4}


def toy_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_SIZE).eval()


def llava_forward(model: nn.Module) -> None:
    model(**llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)]))


def vit_forward(model: nn.Module) -> None:
    model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


CASES: dict[str, tuple[Callable[[], nn.Module], tp.ReductionConfig, Callable[[nn.Module], None]]] = {
    "llava": (lambda: toy_llava(seed=3), tp.ReductionConfig(layer=2, ratio=0.5), llava_forward),
    "vit": (toy_vit, tp.ReductionConfig(strategy="tome", params={"r": 2}), vit_forward),
}


@torch.no_grad()
@pytest.mark.parametrize("case", list(CASES))
def test_a_model_dropped_while_attached_is_freed(case):
    build, config, forward = CASES[case]
    model = build()
    handle = tp.attach(model, config)
    forward(model)
    assert handle.trace
    dropped = weakref.ref(model)
    del model, handle  # no detach()
    gc.collect()
    assert dropped() is None


class ForeignAttention(LlamaAttention):
    """A Llama attention defined in a module (this one) without an `apply_rotary_pos_emb`."""


@torch.no_grad()
def test_an_attach_failing_half_way_leaves_nothing_and_says_what_is_missing():
    model = toy_llava(seed=3)
    llava_forward(model)  # transformers adds its own output recorders at the first forward
    before = hook_state(model)
    attention = model.model.language_model.layers[1].self_attn
    attention.__class__ = ForeignAttention  # the probe of a site at layer 2 reads layer 1
    with pytest.raises(tp.AttachError, match=r"apply_rotary_pos_emb.*ForeignAttention"):
        tp.attach(model, tp.ReductionConfig(layer=2, ratio=0.5))  # the entry hooks are placed first
    assert hook_state(model) == before
    attention.__class__ = LlamaAttention
    tp.attach(model, tp.ReductionConfig(layer=2, ratio=0.5)).detach()  # not marked attached


@torch.no_grad()
def test_any_failure_while_placing_hooks_is_an_attach_error_and_rolls_back(monkeypatch):
    model = toy_llava(seed=3)
    llava_forward(model)
    before = hook_state(model)
    layer_hook = Session._layer_hook

    def failing(self: Session, index: int) -> Callable:
        if index == 3:  # after the entry hooks, the site's watchers and layer 2's hook
            raise RuntimeError("no room for a hook")
        return layer_hook(self, index)

    monkeypatch.setattr(Session, "_layer_hook", failing)
    with pytest.raises(tp.AttachError, match="RuntimeError: no room for a hook"):
        tp.attach(model, tp.ReductionConfig(layer=2, ratio=0.5))
    assert hook_state(model) == before
    monkeypatch.undo()
    tp.attach(model, tp.ReductionConfig(layer=2, ratio=0.5)).detach()


@torch.no_grad()
def test_a_vit_attach_failing_half_way_leaves_nothing(monkeypatch):
    model = toy_vit()
    before = hook_state(model)

    def failing(self: VitAdapter, sizes: Callable) -> Callable:  # the install's last step, blocks replaced
        raise RuntimeError("pooling cannot be weighted")

    monkeypatch.setattr(VitAdapter, "size_weighted_pooling", failing)
    with pytest.raises(tp.AttachError, match="pooling cannot be weighted"):
        tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": 2}))
    assert hook_state(model) == before
    monkeypatch.undo()
    tp.attach(model, tp.ReductionConfig(strategy="tome", params={"r": 2})).detach()


def forward_tensors(model: nn.Module, inputs: dict) -> tuple[list[weakref.ref], Callable[[], None]]:
    """Weak references to every tensor the modules of `model` receive or return from now on (its
    parameters, buffers and the caller's `inputs` aside), and the function that stops recording."""
    kept_by_model = {id(t) for t in [*model.parameters(), *model.buffers(), *inputs.values()]}
    seen: list[weakref.ref] = []

    def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        values = [*args, *kwargs.values(), output]
        while values:
            value = values.pop()
            if isinstance(value, (tuple, list)):
                values += value
            elif hasattr(value, "to_tuple"):  # a transformers ModelOutput
                values += value.to_tuple()
            elif isinstance(value, torch.Tensor) and id(value) not in kept_by_model:
                seen.append(weakref.ref(value))

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in model.modules()]
    return seen, lambda: [h.remove() for h in handles]


FORWARD_CONFIGS = {
    "fastv": {"layer": 2, "ratio": 0.5},
    "pdrop": {"strategy": "pdrop", "stages": [{"layer": 1, "ratio": 0.3}, {"layer": 2, "ratio": 0.6}]},
    "dart": {"strategy": "dart", "layer": 2, "ratio": 0.5},
    "tome": {"strategy": "tome", "layer": 2, "ratio": 0.5},
    "vision_site": {"strategy": "tome", "stages": [{"site": "vision", "layer": 0, "ratio": 0.5}]},
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(FORWARD_CONFIGS))
def test_nothing_from_a_forward_outlives_it(name):
    """Captured attention inputs, queries, keys, restore buffers: all freed when the forward returns."""
    model = toy_llava(ToySize(vision_layers=3), seed=3)
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    with tp.attach(model, tp.ReductionConfig.model_validate(FORWARD_CONFIGS[name])) as handle:
        seen, stop = forward_tensors(model, inputs)
        model(**inputs, use_cache=False)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        stop()
        gc.collect()
        assert handle.trace and len(seen) > 100
        alive = [ref() for ref in seen if ref() is not None]
        assert [tuple(t.shape) for t in alive] == []


def flash_attention(model: nn.Module, *configs: object) -> nn.Module:
    """Declare FlashAttention-2 in the given configs (flash-attn is not installed: attach only)."""
    for config in configs:
        config._attn_implementation = "flash_attention_2"
    return model


def test_a_key_bias_under_flash_attention_is_refused_when_attaching():
    model = toy_llava(ToySize(vision_layers=3))
    flash_attention(model, model.model.language_model.config)
    with pytest.raises(
        tp.AttachError, match=r"language model.*flash_attention_2.*sdpa.*proportional_attention: false"
    ):
        tp.attach(model, tp.ReductionConfig(strategy="tome", layer=2, ratio=0.5))
    tp.attach(
        model,
        tp.ReductionConfig(strategy="tome", layer=2, ratio=0.5, params={"proportional_attention": False}),
    ).detach()
    tp.attach(model, tp.ReductionConfig(layer=2, ratio=0.5)).detach()  # pruning adds no bias


def test_a_key_bias_for_a_flash_attention_vision_tower_is_refused_when_attaching():
    model = toy_llava(ToySize(vision_layers=3))
    flash_attention(model, model.model.vision_tower.config)
    vision = {"strategy": "tome", "stages": [{"site": "vision", "layer": 0, "ratio": 0.5}]}
    with pytest.raises(
        tp.AttachError, match=r"image tower.*flash_attention_2.*proportional_attention: false"
    ):
        tp.attach(model, tp.ReductionConfig.model_validate(vision))
    tp.attach(
        model, tp.ReductionConfig.model_validate({**vision, "params": {"proportional_attention": False}})
    ).detach()


@torch.no_grad()
def test_nothing_from_a_failed_forward_outlives_it():
    """A forward that fails inside the attention the probe watches leaves no captured input behind."""
    model = toy_llava(seed=3)
    inputs = llava_inputs([Prompt([3, 4], 1)])

    def fail(module: nn.Module, args: tuple) -> None:  # after the probe's pre-hook, before k_proj
        raise RuntimeError("query projection failed")

    with tp.attach(model, tp.ReductionConfig(layer=2, ratio=0.5)):
        seen, stop = forward_tensors(model, inputs)
        failing = model.model.language_model.layers[1].self_attn.q_proj.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="query projection failed"):
            model(**inputs)
        failing.remove()
        stop()
        gc.collect()
        assert len(seen) > 10
        assert [tuple(t.shape) for t in (ref() for ref in seen) if t is not None] == []
