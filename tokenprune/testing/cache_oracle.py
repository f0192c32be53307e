"""The oracle of `site: cache` stages: the unreduced decode with the removed entries masked as keys.

`CacheOracle` places pre-hooks on a bare model (its adapter's entry module and decoder layers) that hide,
in every forward a `generate` runs on the model's own full cache, what a trace removed: a prefill stage's
tokens from its layer on (every forward), a cache event's entries in layers >= its layer from its step on
(the forwards on the cache counted from the prefill, 0). Query rows attend causally over real keys.
Under a `renumbered` prefill stage (`config=`), the layers from it on (until the next such stage) get the
rotary tables of the renumbered ids: at the prefill `renumbered_ids` (token by token), then the model's own
ids of each new token less the sample's shift (its largest own prompt id less its largest renumbered one).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.core.language.forward import CACHE_KEYWORD, with_cache
from tokenprune.core.selection import ReductionEvent
from tokenprune.registry import adapter_for
from tokenprune.testing.oracles import (
    greedy_output,
    placeholder_items,
    removed_positions,
    renumbered_ids,
    stage_policies,
)

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
    every forward from their layer on, cache events' entries from their step on in layers >= K; the
    rotary tables of a `renumbered` prefill stage's ids in its layers (`config`: the stages' policies)."""

    def __init__(
        self,
        model: nn.Module,
        trace: list[ReductionEvent],
        inputs: dict[str, Tensor],
        adapter: str | None = None,
        config: tp.ReductionConfig | None = None,
    ) -> None:
        self.valid = inputs["attention_mask"].bool()
        prefill = [e for e in trace if e.site == "language"]
        self.prefill = removed_positions(prefill, self.valid)
        self.events = [e for e in trace if e.site == "cache"]
        self.forward, self.seen = -1, 0
        driven = adapter_for(model, adapter)
        renumbered = [
            (layer, self.valid & ~removed)
            for (layer, removed), policy in zip(self.prefill, stage_policies(config, prefill), strict=True)
            if policy == "renumbered"
        ]
        self.renumbering = Renumbering(driven.rotary_embedding(), inputs, renumbered)
        self.handles = [driven.entry_module().register_forward_pre_hook(self.count, with_kwargs=True)]
        if self.renumbering.stages:
            self.handles.append(self.renumbering.install())
        for index, layer in enumerate(driven.decoder_layers()):
            self.handles.append(layer.register_forward_pre_hook(self.masking(index), with_kwargs=True))

    def count(self, module, args, kwargs) -> None:
        self.seen += 0 if self.forward < 0 else self.length
        self.forward += 1
        self.renumbering.own = None
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
            hidden = args[0] if args else kwargs["hidden_states"]
            dtype = hidden.dtype
            additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            overrides = {"attention_mask": additive[:, None]}  # eager adds it; SDPA takes it too
            tables = self.renumbering.tables(layer, hidden, prefill=self.forward == 0)
            if tables is not None:
                overrides["position_embeddings"] = tables
            return args, {**kwargs, **overrides}

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Renumbering:
    """The rotary tables of `renumbered` prefill stages (layer, kept [B, N]), for a decode on a full cache.

    The prefill's ids are `renumbered_ids` of the model's own ones; a later forward's are the model's own
    less the sample's shift: its largest own prompt id (any row) less its largest renumbered one.
    """

    def __init__(
        self, rotary: nn.Module | None, inputs: dict[str, Tensor], stages: list[tuple[int, Tensor]]
    ) -> None:
        self.rotary, self.inputs, self.stages = rotary, inputs, stages
        self.own: Tensor | None = None  # the ids the model asked its rotary module for, this forward
        self.prompt: dict[int, tuple[Tensor, Tensor]] = {}  # stage layer: (renumbered ids, shift [B])

    def install(self):
        """Capture the ids of each forward's first rotary call (the model's; later ones are the oracle's)."""

        def capture(module, args, kwargs):
            if self.own is None:
                self.own = kwargs["position_ids"] if "position_ids" in kwargs else args[1]

        return self.rotary.register_forward_pre_hook(capture, with_kwargs=True)

    def tables(self, layer: int, hidden: Tensor, prefill: bool) -> tuple[Tensor, Tensor] | None:
        """(cos, sin) of the last renumbered stage at or below `layer` for this forward, or None."""
        active = [stage for stage in self.stages if stage[0] <= layer]
        if not active:
            return None
        at, kept = active[-1]
        own = self.own if self.own.ndim == 3 else self.own[None]
        own = own.expand(own.shape[0], kept.shape[0], own.shape[-1])
        if prefill and at not in self.prompt:
            self.prompt[at] = self._numbered(own, kept)
        ids, shift = self.prompt[at]
        rows = ids if prefill else own - shift[None, :, None]
        return self.rotary(hidden, rows if self.own.ndim == 3 else rows[0])

    def _numbered(self, own: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        """The prompt's renumbered ids [R, B, N] and each sample's shift [B] under one stage's `kept`."""
        valid = self.inputs["attention_mask"].bool()
        ids = renumbered_ids(own, placeholder_items(self.inputs["input_ids"]), valid, kept)
        low = torch.iinfo(own.dtype).min
        largest_own = own.masked_fill(~valid[None], low).amax(dim=(0, 2))
        largest_new = ids.masked_fill(~kept[None], low).amax(dim=(0, 2))
        return ids, largest_own - largest_new


def largest_step_difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The largest max abs difference between two runs' logits, over their steps."""
    return max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True))


def assert_steps_match(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Every step's logits within LOGIT_TOL (max abs difference), the step named on failure."""
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        diff = (a - b).abs().max().item()
        assert diff <= LOGIT_TOL, f"step {step}: max |logit diff| {diff:.2e} > {LOGIT_TOL}"


def cache_oracle_run(
    model: nn.Module,
    inputs: dict,
    trace: list[ReductionEvent],
    adapter: str | None = None,
    config: tp.ReductionConfig | None = None,
    **kwargs,
):
    """`generate(model, inputs, **kwargs)` of the bare model under the trace's `CacheOracle` (`config`: the
    prefill stages' position policies; None: `original`)."""
    oracle = CacheOracle(model, trace, inputs, adapter, config)
    try:
        return generate(model, inputs, **kwargs)
    finally:
        oracle.remove()
