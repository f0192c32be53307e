"""Attaching keeps the model intact; detaching restores it exactly; errors are clear."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tokenprune.adapters.llava import LlavaAdapter
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

import tokenprune as tp
from tokenprune.core.language.forward import cache_of, with_cache
from tokenprune.registry import ADAPTERS
from tokenprune.testing.models import toy_llava
from tokenprune.testing.oracles import Prompt, assert_same_greedy, greedy, llava_inputs, oracle_greedy

HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def hook_state(model: torch.nn.Module) -> dict[str, dict]:
    """Per module: every hook dict's items (the hook objects themselves) and each instance attribute's
    identity, so that a hook left behind, a swapped hook or a replaced `forward` all show."""
    return {
        name: {
            **{hooks: list(getattr(m, hooks).items()) for hooks in HOOK_DICTS},
            "attributes": {key: id(value) for key, value in vars(m).items()},
        }
        for name, m in model.named_modules()
    }


def weight_state(model: torch.nn.Module) -> dict[str, tuple]:
    """Each parameter and buffer: its bytes, storage, dtype, device and `requires_grad`."""
    return {
        name: (tensor.detach().clone(), tensor.data_ptr(), tensor.dtype, tensor.device, tensor.requires_grad)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }


def assert_same_weights(model: torch.nn.Module, before: dict[str, tuple]) -> None:
    """Bit-identical (compared as raw bytes, so NaN or -0.0 could not hide a change), in place."""
    now = weight_state(model)
    assert now.keys() == before.keys()
    for name, (tensor, *where) in before.items():
        assert torch.equal(now[name][0].view(torch.uint8), tensor.view(torch.uint8)), name
        assert list(now[name][1:]) == where, name


@torch.no_grad()
def test_attach_leaves_weights_and_detach_restores_everything():
    model = toy_llava(seed=3)
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([2, 1, 2], 2)])
    weights = weight_state(model)
    before = model(**inputs, use_cache=False).logits
    model.generate(**inputs, max_new_tokens=3)
    before_hooks = hook_state(model)  # after a first forward: transformers adds its own output recorders then
    handle = tp.attach(model, tp.ReductionConfig(layer=2, ratio=0.75))
    assert hook_state(model) != before_hooks  # the comparison sees hooks
    reduced = model(**inputs, use_cache=False).logits
    model.generate(**inputs, max_new_tokens=3)
    assert not torch.equal(reduced, before)
    assert_same_weights(model, weights)
    handle.detach()
    assert torch.equal(model(**inputs, use_cache=False).logits, before)
    assert hook_state(model) == before_hooks
    assert_same_weights(model, weights)
    handle.detach()  # idempotent
    with pytest.raises(tp.AttachError, match="detached"):
        _ = handle.trace
    tp.attach(model, tp.ReductionConfig(layer=1, ratio=0.5)).detach()  # attachable again


@torch.no_grad()
def test_selection_timer_counts_each_selection_and_synchronizes_around_it():
    model = toy_llava(seed=3)
    inputs = llava_inputs([Prompt([3, 4], 1)])
    synced: list[int] = []
    with tp.attach(model, tp.ReductionConfig(layer=1, ratio=0.5)) as handle:
        timer = handle.time_selections(lambda: synced.append(1))
        model(**inputs)
        assert timer.seconds > 0.0 and len(synced) == 2  # one stage: a reading before and after
        first = timer.seconds
        model(**inputs)
        assert timer.seconds > first and len(synced) == 4
        timer.reset()
        assert timer.seconds == 0.0
        with pytest.raises(tp.AttachError, match="already running"):
            handle.time_selections()
        timer.stop()
        model(**inputs)
        assert timer.seconds == 0.0 and len(synced) == 4  # stopped: the reducer's own select again
        assert "select" not in vars(handle.reducer)
        with handle.time_selections() as second:
            model(**inputs)
        assert second.seconds > 0.0 and "select" not in vars(handle.reducer)


@torch.no_grad()
def test_from_pretrained_checkpoint_saved_locally(tmp_path):
    """A checkpoint loaded from disk reduces as the model it was saved from: same kept tokens, and
    greedy generation with the cache equals the mask oracle's greedy run (near-ties aside)."""
    original = toy_llava(seed=5)
    original.save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    model.generation_config.suppress_tokens = original.generation_config.suppress_tokens
    inputs = llava_inputs([Prompt([2, 3], 1)])
    config = tp.ReductionConfig.model_validate({"strategy": "fastv", "layer": 2, "ratio": 0.5})
    with tp.attach(original, config) as handle:
        original(**inputs)
        kept = handle.trace[0].kept
    with tp.attach(model, config) as handle:
        tokens, _ = greedy(model, inputs, steps=4)
        trace = handle.trace
    assert trace[0].visual_after == [18]
    assert torch.equal(trace[0].kept, kept)
    assert_same_greedy(tokens, *oracle_greedy(model, inputs, trace, steps=4))


def test_errors_are_clear(llava_sdpa):
    with pytest.raises(ValidationError, match="fastv"):
        tp.ReductionConfig(strategy="fastvv", ratio=0.5)
    with pytest.raises(ValidationError, match="ratio"):
        tp.ReductionConfig(ratio=1.0)
    with pytest.raises(ValidationError, match="exactly one"):
        tp.ReductionConfig(stages=[{"layer": 2, "ratio": 0.5, "keep": 3}])
    with pytest.raises(ValidationError, match="exactly one"):
        tp.ReductionConfig(layer=2)
    with pytest.raises(ValidationError, match="budget"):
        tp.ReductionConfig(strategy="random")
    with pytest.raises(ValidationError, match="scor"):
        tp.ReductionConfig(ratio=0.5, params={"scor": "last"})
    with pytest.raises(ValidationError, match="increase"):
        tp.ReductionConfig(stages=[{"layer": 3, "ratio": 0.5}, {"layer": 2, "ratio": 0.7}])
    with pytest.raises(tp.ConfigError, match="past the last decoder layer"):
        tp.attach(llava_sdpa, tp.ReductionConfig(layer=4, ratio=0.5))
    with pytest.raises(tp.ConfigError, match="layer >= 1"):
        tp.attach(llava_sdpa, tp.ReductionConfig(layer=0, ratio=0.5))
    with pytest.raises(tp.UnknownNameError, match="llava"):
        tp.attach(llava_sdpa, tp.ReductionConfig(ratio=0.5), adapter="lava")
    with tp.attach(llava_sdpa, tp.ReductionConfig(ratio=0.5)), pytest.raises(tp.AttachError, match="already"):
        tp.attach(llava_sdpa, tp.ReductionConfig(ratio=0.5))
    text_only = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(tp.AttachError, match="no adapter for LlamaForCausalLM"):
        tp.attach(text_only, tp.ReductionConfig(ratio=0.5))


@torch.no_grad()
def test_placeholder_count_mismatch_is_an_input_error(llava_sdpa):
    inputs = llava_inputs([Prompt([2, 3], 1)])
    inputs["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)
    with (
        tp.attach(llava_sdpa, tp.ReductionConfig(ratio=0.5)),
        pytest.raises(tp.InputError, match="placeholder"),
    ):
        llava_sdpa(**inputs)


def test_load_config_yaml_and_json(tmp_path):
    (tmp_path / "c.yaml").write_text("strategy: random\nlayer: 1\nkeep: 12\nparams:\n  seed: 7\n")
    (tmp_path / "c.json").write_text('{"stages": [{"layer": 2, "ratio": 0.5}, {"layer": 3, "ratio": 0.75}]}')
    assert tp.load_config(tmp_path / "c.yaml") == tp.ReductionConfig(
        strategy="random", layer=1, keep=12, params={"seed": 7}
    )
    assert [s.layer for s in tp.load_config(tmp_path / "c.json").stages] == [2, 3]
    (tmp_path / "bad.yaml").write_text("strategy: fastv\nratio: 2\n")
    with pytest.raises(tp.ConfigError, match=r"bad\.yaml.*ratio"):
        tp.load_config(tmp_path / "bad.yaml")


def test_kept_count_rounds_like_the_reference():
    stage = tp.Stage(layer=2, ratio=0.5)
    assert stage.kept_count(576) == 288
    assert tp.Stage(layer=2, ratio=0.75).kept_count(576) == 144
    assert tp.Stage(layer=2, ratio=0.5).kept_count(5) == round(2.5) == 2  # half to even, as Python
    assert tp.Stage(layer=2, ratio=0.5).kept_count(7) == 4
    assert tp.Stage(layer=2, keep=100).kept_count(36) == 36


@torch.no_grad()
def test_an_adapter_reading_only_input_ids_refuses_images_in_inputs_embeds(llava_sdpa):
    """The contract's default `Adapter.input_ids` needs `input_ids`: images given as `inputs_embeds`
    are an InputError naming the way out (the built-ins recover the ids instead: test_inputs_embeds.py)."""

    @tp.register_adapter("test_ids_only")
    class IdsOnly(LlavaAdapter):
        name = "test_ids_only"
        model_types = ()  # only when named
        input_ids = tp.Adapter.input_ids

    inputs = llava_inputs([Prompt([2, 3], 1)])
    embeds = llava_sdpa.get_input_embeddings()(inputs.pop("input_ids"))
    try:
        with (
            tp.attach(llava_sdpa, tp.ReductionConfig(ratio=0.5), adapter="test_ids_only"),
            pytest.raises(tp.InputError, match="pass them, not `inputs_embeds`"),
        ):
            llava_sdpa(inputs_embeds=embeds, **inputs)
    finally:
        ADAPTERS.unregister("test_ids_only")


@torch.no_grad()
def test_a_cache_reduced_by_a_detached_attachment_is_refused(llava_sdpa):
    inputs = llava_inputs([Prompt([2, 3], 1)])
    with tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.5)):
        cache = cache_of(llava_sdpa(**inputs, use_cache=True))
    step = {"input_ids": torch.tensor([[20]]), **with_cache(cache), "use_cache": True}
    with (
        tp.attach(llava_sdpa, tp.ReductionConfig(layer=2, ratio=0.5)),
        pytest.raises(tp.InputError, match="another"),
    ):
        llava_sdpa(**step)


def test_a_sliding_window_is_refused_under_flex_attention_only():
    """The window is kept in original positions by a 4-D mask: flex attention's block mask cannot carry it."""
    model = toy_llava()
    text = model.model.language_model.config
    text.sliding_window = 16
    config = tp.ReductionConfig(strategy="random", ratio=0.5)  # needs no attention probe
    with tp.attach(model, config):
        pass  # SDPA takes the 4-D mask
    text._attn_implementation = "flex_attention"
    with pytest.raises(tp.AttachError, match="slides a window"):
        tp.attach(model, config)


def test_chunked_attention_layers_are_refused():
    model = toy_llava()
    model.model.language_model.config.attention_chunk_size = 8
    with pytest.raises(tp.AttachError, match="chunked"):
        tp.attach(model, tp.ReductionConfig(ratio=0.5))
