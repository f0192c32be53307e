"""Reductions under accelerate's device maps: every tensor the core makes follows the hidden states.

A layer's pre-hooks run before accelerate moves its inputs, so a site meets the hidden states where
the previous layer left them, while the rotary tables, the layout and the caller's mask sit where
they were made. On CPU, layers offloaded to disk keep their weights on `meta` between calls: the
probe and the norms that signals call outside a layer's forward must go through accelerate's hooks.
With a GPU, layers split between it and the CPU put every one of those tensors on another device.

Reduced logits and greedy tokens equal the undispatched reduced run (float32; max abs diff <= 1e-5
on one device, <= 1e-4 across devices, whose kernels differ).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from transformers import LlavaForConditionalGeneration

import tokenprune as tp
from tokenprune.testing.models import toy_llava
from tokenprune.testing.oracles import Prompt, llava_inputs

SAME_DEVICE_TOL = 1e-5
CROSS_DEVICE_TOL = 1e-4
STEPS = 4

CONFIGS = {
    "fastv": {"layer": 2, "ratio": 0.5},
    "fastv_two_stages": {"stages": [{"layer": 1, "ratio": 0.3}, {"layer": 3, "ratio": 0.6}]},
    "pdrop": {"strategy": "pdrop", "stages": [{"layer": 1, "ratio": 0.3}, {"layer": 2, "ratio": 0.6}]},
    "dart": {"strategy": "dart", "layer": 2, "ratio": 0.5},
    "tome": {"strategy": "tome", "layer": 2, "ratio": 0.5},
    "vision_site": {"strategy": "tome", "stages": [{"site": "vision", "layer": 0, "ratio": 0.5}]},
}


def device_map(first: str, offloaded: str, last: str) -> dict[str, str | int]:
    """The vision side, embeddings, rotary tables and layer 0 on `first`; layers 1-2 and the final norm
    on `offloaded`; layer 3 and the LM head on `last` (sites at layers 1, 2 and 3 all meet a change)."""
    language = "model.language_model"
    return {
        "model.vision_tower": first,
        "model.multi_modal_projector": first,
        f"{language}.embed_tokens": first,
        f"{language}.rotary_emb": first,
        f"{language}.layers.0": first,
        f"{language}.layers.1": offloaded,
        f"{language}.layers.2": offloaded,
        f"{language}.norm": offloaded,
        f"{language}.layers.3": last,
        "lm_head": last,
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy_llava")
    toy_llava(seed=1).save_pretrained(path)
    return path


def load(path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()


@torch.no_grad()
def reduced_run(model, config: tp.ReductionConfig) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(prefill logits, greedy tokens, kept positions per stage) with `config` attached."""
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    with tp.attach(model, config) as handle:
        logits = model(**inputs, use_cache=False).logits
        kept = [event.kept.cpu() for event in handle.trace]
        tokens = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    return logits.cpu(), tokens.cpu(), kept


def assert_same_reduction(run, expected, tolerance: float) -> None:
    logits, tokens, kept = run
    assert all(torch.equal(a, b) for a, b in zip(kept, expected[2], strict=True))
    assert (logits - expected[0]).abs().max() <= tolerance
    assert torch.equal(tokens, expected[1])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layers_offloaded_to_disk_reduce_as_the_undispatched_model(checkpoint, tmp_path, name):
    config = tp.ReductionConfig.model_validate(CONFIGS[name])
    offloaded = LlavaForConditionalGeneration.from_pretrained(
        checkpoint,
        attn_implementation="sdpa",
        device_map=device_map("cpu", "disk", "cpu"),
        offload_folder=tmp_path / "offload",
    ).eval()
    assert offloaded.model.language_model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert_same_reduction(
        reduced_run(offloaded, config), reduced_run(load(checkpoint), config), SAME_DEVICE_TOL
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="layers split over two devices need a GPU")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layers_split_between_gpu_and_cpu_reduce_as_one_device(checkpoint, name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions, as on CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    config = tp.ReductionConfig.model_validate(CONFIGS[name])
    split = dispatch_model(
        load(checkpoint), device_map=device_map("cuda:0", "cpu", "cuda:0"), main_device="cpu"
    )
    assert split.model.language_model.layers[1].self_attn.q_proj.weight.device.type == "cpu"
    assert split.model.language_model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    assert_same_reduction(reduced_run(split, config), reduced_run(load(checkpoint), config), CROSS_DEVICE_TOL)
