"""The oracle of `site: cache` stages: the unreduced decode with the removed entries masked as keys.

`CacheOracle` places pre-hooks on a bare model (its adapter's entry module and decoder layers) that hide,
in every forward a `generate` runs on the model's own full cache, what a trace removed: a prefill stage's
tokens from its layer on (every forward), a cache event's entries in layers >= its layer from its step on
(the forwards on the cache counted from the prefill, 0). Query rows attend causally over real keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenprune.core.language.forward import CACHE_KEYWORD, with_cache
from tokenprune.core.selection import ReductionEvent
from tokenprune.registry import adapter_for
from tokenprune.testing.oracles import greedy_output, removed_positions

LOGIT_TOL = 1e-4  # each step's logits against the oracle (float32)
DEFAULT_STEPS = 6


def generate(
    model, inputs: dict, steps: int = DEFAULT_STEPS, cache: object | None = None
) -> tuple[torch.Tensor, list[torch.Tensor], object]:
    """Greedy tokens, each step's logits and the cache, from `generate` (end-of-sequence not special),
    continuing `cache` when given (under this transformers' name for it)."""
    out = greedy_output(model, inputs, steps, **({} if cache is None else with_cache(cache)))
    return out.sequences, list(out.logits), getattr(out, CACHE_KEYWORD)


def kept_mask(event, length: int) -> torch.Tensor:
    """[B, length] bool: the original positions an event keeps."""
    mask = torch.zeros(event.kept.shape[0], length + 1, dtype=torch.bool)
    mask.scatter_(1, event.kept.clamp(min=-1) % (length + 1), True)
    return mask[:, :length]


class CacheOracle:
    """Pre-hooks masking, in the unreduced model, what the trace removed: prefill stages' tokens in
    every forward from their layer on, cache events' entries from their step on in layers >= K."""

    def __init__(
        self, model: nn.Module, trace: list[ReductionEvent], valid: Tensor, adapter: str | None = None
    ) -> None:
        self.valid = valid
        self.prefill = removed_positions([e for e in trace if e.site == "language"], valid)
        self.events = [e for e in trace if e.site == "cache"]
        self.forward, self.seen = -1, 0
        driven = adapter_for(model, adapter)
        self.handles = [driven.entry_module().register_forward_pre_hook(self.count, with_kwargs=True)]
        for index, layer in enumerate(driven.decoder_layers()):
            self.handles.append(layer.register_forward_pre_hook(self.masking(index), with_kwargs=True))

    def count(self, module, args, kwargs) -> None:
        self.seen += 0 if self.forward < 0 else self.length
        self.forward += 1
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        self.length = (embeds if embeds is not None else ids if ids is not None else args[0]).shape[1]

    def removed(self, layer: int) -> torch.Tensor:
        removed = torch.zeros_like(self.valid)
        for stage_layer, stage_removed in self.prefill:
            if layer >= stage_layer:
                removed |= stage_removed
        due = [e for e in self.events if e.step <= self.forward and layer >= e.layer]
        if due:
            removed |= self.valid & ~kept_mask(due[-1], self.valid.shape[1])
        return removed

    def masking(self, layer: int):
        def hook(module, args, kwargs):
            batch, length = self.valid.shape
            total, q = self.seen + self.length, self.length
            keys = torch.cat(
                [self.valid & ~self.removed(layer), torch.ones(batch, total - length, dtype=torch.bool)], 1
            )
            rows = torch.arange(total - q, total)[:, None] >= torch.arange(total)[None]
            allowed = keys[:, None, :] & rows[None]
            allowed |= torch.arange(total)[None, None] == torch.arange(total - q, total)[None, :, None]
            dtype = (args[0] if args else kwargs["hidden_states"]).dtype
            additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            return args, {**kwargs, "attention_mask": additive[:, None]}  # eager adds it; SDPA takes it too

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def assert_steps_match(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Every step's logits within LOGIT_TOL (max abs difference), the step named on failure."""
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        diff = (a - b).abs().max().item()
        assert diff <= LOGIT_TOL, f"step {step}: max |logit diff| {diff:.2e} > {LOGIT_TOL}"


def cache_oracle_run(
    model: nn.Module, inputs: dict, trace: list[ReductionEvent], adapter: str | None = None, **kwargs
):
    """`generate(model, inputs, **kwargs)` of the bare model under the trace's `CacheOracle`."""
    oracle = CacheOracle(model, trace, inputs["attention_mask"].bool(), adapter)
    try:
        return generate(model, inputs, **kwargs)
    finally:
        oracle.remove()
