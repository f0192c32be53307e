"""`site: vision` on LLaVA: the features handed to the language model are tied to the tower run that
encoded them even through a dtype cast, and nothing of a forward outlives it.

Oracle for the cast: `generate` (the features pre-encoded, then cast, reach the model through
`mm_encoder_outputs`) must equal the greedy loop that recomputes every step from the pixels (the tower
runs inside each forward), token for token. Stale features must still be refused. Under accelerate's
dispatch (weights offloaded to disk, on this CPU machine), the reduction equals the plain model's:
logits exactly, greedy tokens equal.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from accelerate import dispatch_model
from test_video_llava import encoded
from test_vision_site import forward, vision

import tokenprune as tp
from tokenprune.testing.models import ToySize, toy_llava
from tokenprune.testing.oracles import Prompt, greedy, llava_inputs, recomputed_greedy

STEPS = 3
CONFIG = vision("fastervlm", 1, 0.6)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return toy_llava(ToySize(vision_layers=3))


def media(seed: int = 0) -> dict[str, torch.Tensor]:
    return llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)], seed=seed)


@contextmanager
def cast_projection(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The projector's output reaches the model as a copy in `dtype` (a mixed-precision wrapper's cast).

    bfloat16: the projector's float32 output is cast to bfloat16; float32: the projector runs in
    bfloat16 and its output is cast to float32. The cast hook runs after tokenprune's own.
    """
    projector = model.model.multi_modal_projector
    weights = {name: value.clone() for name, value in projector.state_dict().items()}
    handles = []
    if dtype == torch.float32:
        projector.to(torch.bfloat16)
        handles.append(projector.register_forward_pre_hook(lambda m, args: (args[0].to(torch.bfloat16),)))
    handles.append(projector.register_forward_hook(lambda m, args, out: out.to(dtype)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        projector.to(torch.float32).load_state_dict(weights)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_features_cast_after_the_projector_keep_their_selection(model, dtype):
    inputs = media()
    with tp.attach(model, CONFIG) as handle, cast_projection(model, dtype):
        cached, _ = greedy(model, inputs, STEPS)
        in_the_tower = handle.trace[0].kept
        recomputed = recomputed_greedy(model, inputs, STEPS)
        assert torch.equal(handle.trace[0].kept, in_the_tower)
        assert torch.equal(forward(model, encoded(model, inputs)).logits, forward(model, inputs).logits)
    assert torch.equal(cached, recomputed)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cast_features_the_tower_did_not_encode_while_attached_are_refused(model, dtype):
    with cast_projection(model, dtype):
        outside = encoded(model, media())  # encoded before attaching
        with tp.attach(model, CONFIG):
            encoded(model, media(seed=7))  # the tower runs on other images in between
            with pytest.raises(tp.InputError, match="encoded while attached"):
                forward(model, outside)
            forward(model, encoded(model, media()))


def watched(module: torch.nn.Module, refs: list[weakref.ref]) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda m, args, out: refs.append(weakref.ref(out)))


@pytest.mark.parametrize("grad", [False, True])
def test_nothing_of_a_forward_outlives_it(model, grad):
    """The tower's queries and keys, and the projector's output, die with the forward (and generate)."""
    tower = model.model.vision_tower.encoder.layers[1].self_attn
    refs: list[weakref.ref] = []
    with tp.attach(model, CONFIG) as handle, torch.set_grad_enabled(grad):
        handles = [watched(m, refs) for m in (tower.q_proj, tower.k_proj, model.model.multi_modal_projector)]
        logits = forward(model, media()).logits
        generated = model.generate(**media(seed=3), max_new_tokens=2, do_sample=False)
        for hook in handles:
            hook.remove()
        del logits, generated
        gc.collect()
        assert len(refs) == 6
        assert [ref() for ref in refs] == [None] * 6
        assert [event.site for event in handle.trace] == ["vision", "language"]  # the trace stays


def offloaded(model: torch.nn.Module, directory: str) -> torch.nn.Module:
    """The model dispatched by accelerate, the reduced tower layer and the projector offloaded to disk:
    their weights load at each call, inside the hooks accelerate wraps around their forwards."""
    tower = "model.vision_tower"
    placement = {
        f"{tower}.embeddings": "cpu",
        f"{tower}.pre_layrnorm": "cpu",
        **{f"{tower}.encoder.layers.{i}": "disk" if i == 1 else "cpu" for i in range(3)},
        f"{tower}.post_layernorm": "cpu",
        "model.multi_modal_projector": "disk",
        "model.language_model": "cpu",
        "lm_head": "cpu",
    }
    return dispatch_model(model, device_map=placement, offload_dir=directory, main_device="cpu")


@torch.no_grad()
def test_a_dispatched_model_reduces_in_its_tower_as_the_plain_one(model, tmp_path):
    config = vision("tome", 1, 0.5)
    inputs = media()
    with tp.attach(model, config):
        expected = forward(model, inputs).logits
        expected_tokens, _ = greedy(model, inputs, STEPS)
    dispatched = offloaded(toy_llava(ToySize(vision_layers=3)), str(tmp_path))
    assert dispatched.model.multi_modal_projector.linear_1.weight.device.type == "meta"
    with tp.attach(dispatched, config) as handle:
        logits = forward(dispatched, inputs).logits
        tokens, _ = greedy(dispatched, inputs, STEPS)
        assert [event.site for event in handle.trace] == ["vision", "language"]
    assert torch.equal(logits, expected)
    assert torch.equal(tokens, expected_tokens)
