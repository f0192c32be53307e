"""Core contract fixes: a vision site installs all or nothing, selection errors name the registered
strategy at every kind of site, and a `Merge` from a strategy not declaring `merges` is refused.

Oracle for the converse (a `merges = True` strategy returning a plain mask): the logits equal those of
the registered strategy whose mask it returns, bit for bit (float32, tolerance 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_attach import hook_state
from torch import Tensor, nn
from transformers import LlamaConfig

import tokenprune as tp
from tokenprune.core.language import ledger as ledger_module
from tokenprune.core.language.ledger import RECORD_ATTRIBUTE, CachedStage, CacheLedger, CacheRecord
from tokenprune.core.masks import build_causal_mask
from tokenprune.core.vision_site import VisionSite
from tokenprune.registry import STRATEGIES
from tokenprune.testing.models import toy_llava
from tokenprune.testing.oracles import Prompt, generation_positions, llava_inputs

SITES = {
    "language": lambda name: tp.ReductionConfig(strategy=name, layer=1, ratio=0.5),
    "vision": lambda name: tp.ReductionConfig(
        strategy=name, stages=[{"site": "vision", "layer": 0, "ratio": 0.5}]
    ),
}


def run(model: nn.Module) -> Tensor:
    """The logits of a fixed two-sample batch with images, without the cache."""
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    return model(
        **inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False
    ).logits


def uniform_keep(view: tp.TokenView) -> Tensor:
    return tp.strategy_class("uniform")().select(view)


class KeepsNothing(tp.Reducer):
    """Breaks the budget: keeps no candidate."""

    def select(self, view: tp.TokenView) -> Tensor:
        return torch.zeros_like(view.candidates)


class UndeclaredMerge(tp.Reducer):
    """Returns a valid `Merge` (each removed candidate joins the nearest kept one before it) without
    declaring `merges = True`."""

    def select(self, view: tp.TokenView) -> tp.Merge:
        keep = uniform_keep(view)
        positions = torch.arange(keep.shape[1], device=keep.device)
        nearest = torch.where(keep, positions, -1).cummax(dim=1).values
        return tp.Merge(keep, torch.where(view.candidates & ~keep, nearest, -1))


class DeclaredMergeReturningMask(tp.Reducer):
    """Declares `merges = True` but returns uniform's plain mask: harmless."""

    merges = True

    def select(self, view: tp.TokenView) -> Tensor:
        return uniform_keep(view)


@pytest.fixture
def registered() -> Iterator[Callable[[str, type[tp.Reducer]], str]]:
    """Registers strategies under test names for one test, and unregisters them after it."""
    names: list[str] = []

    def register(name: str, cls: type[tp.Reducer]) -> str:
        tp.register_strategy(name)(type(cls.__name__, (cls,), {}))
        names.append(name)
        return name

    yield register
    for name in names:
        STRATEGIES.unregister(name)


@torch.no_grad()
def test_a_vision_site_failing_half_way_through_its_install_leaves_no_hook(monkeypatch):
    model = toy_llava(seed=3)
    run(model)  # transformers adds its own output recorders at the first forward
    before = hook_state(model)

    def failing(self: VisionSite, index: int) -> Callable:  # after the tower's start hook and watchers
        raise RuntimeError("no room for a reducer hook")

    monkeypatch.setattr(VisionSite, "_reducer_hook", failing)
    with pytest.raises(tp.AttachError, match="RuntimeError: no room for a reducer hook"):
        tp.attach(model, SITES["vision"]("fastv"))
    assert hook_state(model) == before
    monkeypatch.undo()
    tp.attach(model, SITES["vision"]("fastv")).detach()  # not marked attached


BROKEN_SELECTIONS = {  # a strategy breaking the contract, and how its error begins after its label
    "off budget": (KeepsNothing, "select kept ["),
    "undeclared merge": (
        UndeclaredMerge,
        "select returned a Merge, but the class does not declare `merges = True`",
    ),
}


@torch.no_grad()
@pytest.mark.parametrize("site", list(SITES))
@pytest.mark.parametrize("broken", list(BROKEN_SELECTIONS))
def test_a_broken_selection_is_refused_naming_the_registered_strategy(site, broken, registered):
    cls, message = BROKEN_SELECTIONS[broken]
    name = registered("test_broken_selection", cls)
    model = toy_llava(seed=3)
    with tp.attach(model, SITES[site](name)), pytest.raises(tp.StrategyError) as caught:
        run(model)
    assert str(caught.value).startswith(f"strategy {name!r} ({cls.__name__}): {message}")


@torch.no_grad()
@pytest.mark.parametrize("site", list(SITES))
def test_a_strategy_declaring_merges_may_return_a_plain_mask(site, registered):
    name = registered("test_declared_merge_mask", DeclaredMergeReturningMask)
    model = toy_llava(seed=3)
    with tp.attach(model, SITES[site]("uniform")):
        expected = run(model)
    with tp.attach(model, SITES[site](name)):
        got = run(model)
    assert torch.equal(got, expected)


@torch.no_grad()
def test_a_selection_that_is_not_a_tensor_names_the_strategy(registered):
    class ReturnsList(tp.Reducer):
        def select(self, view: tp.TokenView) -> list:
            return view.candidates.tolist()

    name = registered("test_returns_list", ReturnsList)
    model = toy_llava(seed=3)
    with tp.attach(model, SITES["language"](name)), pytest.raises(tp.StrategyError) as caught:
        run(model)
    assert str(caught.value).startswith(
        f"strategy {name!r} (ReturnsList): select returned list, expected bool"
    )


# -- decode: the mask SDPA does not need is not built ---------------------------------------------


class FakeCache:
    """A cache of `length` entries per layer, carrying a reduction record."""

    def __init__(self, length: int, record: CacheRecord) -> None:
        self.length = length
        setattr(self, RECORD_ATTRIBUTE, record)

    def get_seq_length(self, layer: int = 0) -> int:
        return self.length


@given(
    kept=st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=2),
    new=st.lists(st.booleans(), min_size=3, max_size=3),
    q_length=st.integers(1, 2),
    padded=st.booleans(),
)
def test_the_decode_mask_is_skipped_exactly_when_sdpa_would_get_none(kept, new, q_length, padded):
    config = LlamaConfig()
    config._attn_implementation = "sdpa"
    key_valid = torch.tensor(kept)
    batch = key_valid.shape[0]
    new_valid = torch.tensor(new)[None].expand(batch, -1)
    ledger = CacheLedger(first_layer=1)
    record = CacheRecord(ledger.owner, original_length=6, stages=[CachedStage(1, key_valid, None)])
    cache = FakeCache(4 + 3 - q_length, record)
    padding = torch.cat([torch.ones(batch, 6, dtype=torch.long), new_valid.long()], dim=1) if padded else None
    hidden = torch.zeros(batch, q_length, 8)
    got = ledger.continuation_mask(cache, 1, hidden, padding, config)
    keys = torch.cat([key_valid, new_valid if padded else torch.ones_like(new_valid)], dim=1)
    expected = build_causal_mask(config, keys, q_length, hidden.dtype)  # the mask built the long way
    assert (got is None) == (expected is None)
    assert got is None or torch.equal(got, expected)


@torch.no_grad()
@pytest.mark.parametrize("params", [{}, {"proportional_attention": False}], ids=["fastv", "tome"])
def test_decoding_without_the_skipped_mask_is_bit_identical(params, monkeypatch):
    """One sample, no padding, no key bias: greedy tokens and every step's logits (tolerance 0) match
    those of the same run building every decode mask."""
    model = toy_llava(seed=3, attn_implementation="sdpa")
    inputs = llava_inputs([Prompt([3, 4], 1)])
    config = tp.ReductionConfig(strategy="tome" if params else "fastv", layer=1, ratio=0.5, params=params)
    skippable = ledger_module._needs_no_mask
    decisions: list[bool] = []

    def recorded(*args: object) -> bool:
        decisions.append(skippable(*args))
        return decisions[-1]

    def generate() -> Any:
        with tp.attach(model, config):
            return model.generate(
                **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
            )

    monkeypatch.setattr(ledger_module, "_needs_no_mask", lambda *args: False)
    built = generate()
    monkeypatch.setattr(ledger_module, "_needs_no_mask", recorded)
    skipped = generate()
    assert decisions and all(decisions)
    assert torch.equal(skipped.sequences, built.sequences)
    assert all(torch.equal(a, b) for a, b in zip(skipped.logits, built.logits, strict=True))
