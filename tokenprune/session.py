"""Driving an unmodified model through a reduction: hooks in, hooks out, state per forward and per cache.

Data flow of one prefill: the entry pre-hook asks the adapter for the visual layout; the layers
before a site run untouched (a pre-hook keeps a reference to the inputs of the attention module
just before the site); at the site the Reducer picks tokens, and the core gathers hidden states,
rotary tables and position ids by original position and builds the mask of the shortened
sequence; every later layer gets those instead of the full-length ones. The KV cache fills itself
with the kept tokens only, and decode steps get masks sized for each layer's shorter cache.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenprune.adapter import Adapter
from tokenprune.config import ReductionConfig, Stage
from tokenprune.errors import InputError, StrategyError
from tokenprune.layout import VisualLayout
from tokenprune.probe import AttentionInputs
from tokenprune.reducer import Reducer, Signals, TokenView, group_counts
from tokenprune.sequence import (
    build_causal_mask,
    compose,
    gather_tokens,
    left_aligned_index,
    scatter_tokens,
)


@dataclass
class ReductionEvent:
    """One stage of the most recent reducing forward; lists hold one entry per sample.

    `kept` [B, L']: original sequence positions that survive the stage, sorted, text included.
    Original padding is never kept; a row keeping fewer tokens than the longest row is
    left-filled with -1.
    """

    layer: int
    tokens_before: list[int]
    tokens_after: list[int]
    visual_before: list[int]
    visual_after: list[int]
    kept: Tensor


@dataclass
class _Shortened:
    """The sequence as the layers from one stage on see it during one forward."""

    index: Tensor | None  # [B, L] original positions, -1 for filler (None on a cached continuation)
    overrides: dict[str, Any]  # layer keyword inputs replaced: mask, rotary tables, position ids


@dataclass
class _CacheRecord:
    """What later forwards on one KV cache need: per stage, its first layer and its key slots."""

    original_length: int
    stages: list[tuple[int, Tensor]] = field(default_factory=list)


@dataclass
class _Pass:
    """State of one forward of the entry module."""

    layout: VisualLayout | None  # None: no visual tokens (decode steps, text-only prompts)
    padding_mask: Tensor | None  # the caller's 2-D attention mask, if any
    mode: str | None = None  # "prefill" (reduce), "cached" (continue on a reduced cache) or "off"
    current: _Shortened | None = None
    cache: Any = None
    probe_inputs: dict[int, Any] = field(default_factory=dict)
    restore: Tensor | None = None
    events: list[ReductionEvent] = field(default_factory=list)


# Every cache shortened by any attachment, so another one (after a detach and re-attach) refuses it.
_REDUCED_CACHES: weakref.WeakSet[Any] = weakref.WeakSet()


def _cache_of(kwargs: dict[str, Any]) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


class Session:
    """The hooks and state of one attachment; `tokenprune.attach` returns its public handle."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: ReductionConfig, reducer: Reducer) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config
        self.reducer = reducer
        self.stages: dict[int, Stage] = {stage.layer: stage for stage in config.stages}
        self.first_layer = config.stages[0].layer
        self.trace: list[ReductionEvent] = []
        self._pass: _Pass | None = None
        self._caches: weakref.WeakKeyDictionary[Any, _CacheRecord] = weakref.WeakKeyDictionary()
        self._handles: list[RemovableHandle] = []
        self._entry_params = list(_forward_parameters(adapter.entry_module()))

    # -- attaching -------------------------------------------------------------------------

    def install(self) -> None:
        entry = self.adapter.entry_module()
        self._hook_pre(entry, self._on_entry)
        self._handles.append(entry.register_forward_hook(self._on_exit, always_call=True))
        layers = self.adapter.decoder_layers()
        for layer in self.stages:
            if layer > 0:
                self._handles += self._watch(layer - 1)
        for index in range(self.first_layer, len(layers)):
            self._hook_pre(layers[index], self._layer_hook(index))
        self._handles.append(layers[-1].register_forward_hook(self._on_last_layer))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pass = None
        self._caches = weakref.WeakKeyDictionary()

    def _hook_pre(self, module: nn.Module, hook: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    # -- entry and exit of one forward ---------------------------------------------------------

    def _on_entry(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        inputs = {**dict(zip(self._entry_params, args, strict=False)), **kwargs}
        layout = self.adapter.visual_layout(inputs)
        reference = inputs.get("input_ids")
        length = (reference if reference is not None else inputs["inputs_embeds"]).shape[1]
        padding = inputs.get("attention_mask")
        if padding is not None and padding.ndim != 2:
            raise InputError("tokenprune needs a 2-D attention mask [batch, length] (or none), not a 4-D one")
        self._pass = _Pass(layout=layout, padding_mask=padding)
        continued = self._continued_positions(inputs, length)
        return None if continued is None else (args, {**kwargs, "position_ids": continued})

    def _continued_positions(self, inputs: dict[str, Any], q_length: int) -> Tensor | None:
        """Position ids for a forward on a cache whose first layer was shortened (a layer-0 site).

        The language model would count them from layer 0's cache length; they must continue from the
        original length instead. Generation passes them explicitly; a hand-written loop may not.
        """
        cache = _cache_of(inputs)
        record = self._caches.get(cache) if cache is not None else None
        if record is None or self.first_layer != 0 or inputs.get("position_ids") is not None:
            return None
        first_layer, key_valid = record.stages[0]
        past = cache.get_seq_length(first_layer) - key_valid.shape[1] + record.original_length
        positions = torch.arange(past, past + q_length, device=key_valid.device)[None]
        return self.adapter.continued_position_ids(positions, inputs)

    def _on_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        finished = self._pass
        self._pass = None
        if finished is not None and finished.mode == "prefill":
            self.trace = finished.events

    # -- decoder layers -------------------------------------------------------------------------

    def _watch(self, layer: int) -> list[RemovableHandle]:
        """Let the probe of `layer` keep references to what that layer computes, for lazy signals."""
        probe = self.adapter.probe(layer)

        def store(inputs: AttentionInputs) -> None:
            if self._pass is not None:
                self._pass.probe_inputs[layer] = (probe, inputs)

        return probe.watch(store)

    def _layer_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            state = self._pass
            if state is None:
                return None
            positional = bool(args)
            hidden = args[0] if positional else kwargs["hidden_states"]
            if layer == self.first_layer:
                state.mode = self._mode(state, kwargs)
            if layer in self.stages and state.mode == "prefill":
                hidden = self._reduce(state, self.stages[layer], hidden, kwargs)
            elif layer in self.stages and state.mode == "cached":
                state.current = self._cached_sequence(state, layer, hidden, kwargs)
            if state.current is None:
                return None
            kwargs = {**kwargs, **state.current.overrides}
            if positional:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _mode(self, state: _Pass, kwargs: dict[str, Any]) -> str:
        cache = _cache_of(kwargs)
        state.cache = cache
        if cache is None or cache.get_seq_length(self.first_layer) == 0:
            return "prefill"
        if cache in self._caches:
            return "cached"
        if cache in _REDUCED_CACHES:
            raise InputError(
                "this KV cache was shortened by another tokenprune attachment (one since detached?): "
                "continue it under that attachment, or start a new cache"
            )
        return "off"

    def _on_last_layer(self, module: nn.Module, args: tuple, output: Tensor):
        """Give the final norm and LM head a full-length sequence again (removed tokens: last state)."""
        state = self._pass
        if state is None or state.mode != "prefill" or state.current is None:
            return None
        length = state.restore.shape[1] - 1
        return scatter_tokens(state.restore, state.current.index, output)[:, :length]

    # -- the reduction itself ----------------------------------------------------------------

    def _reduce(self, state: _Pass, stage: Stage, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        batch, length = hidden.shape[:2]
        if state.current is None:
            if state.layout is None:
                state.layout = VisualLayout.from_segments(batch, length, [], hidden.device)
            index = torch.arange(length, device=hidden.device).expand(batch, length)
            valid = _padding_valid(state.padding_mask, batch, length, hidden.device)
            state.restore = torch.cat([hidden, hidden.new_zeros(batch, 1, hidden.shape[-1])], dim=1)
            index = index.masked_fill(~valid, -1)
        else:
            index = state.current.index
            valid = index >= 0
            state.restore = scatter_tokens(state.restore, index, hidden)
        view = self._view(state, stage, hidden, index, valid)
        keep = self.reducer.select(view)
        _check_selection(type(self.reducer).__name__, keep, view)
        inner = left_aligned_index((valid & ~view.candidates) | keep)
        kept = compose(index, inner)
        state.current = _Shortened(kept, self._overrides(kept, kwargs, hidden.dtype))
        state.events.append(_event(stage.layer, view, kept, state.layout.visual))
        self._remember(state, stage.layer, kept, state.restore.shape[1] - 1)
        return gather_tokens(hidden, inner, 1)

    def _view(self, state: _Pass, stage: Stage, hidden: Tensor, index: Tensor, valid: Tensor) -> TokenView:
        layout = state.layout
        last_real = torch.zeros_like(valid).scatter_(1, _last_true(valid)[:, None], True)
        candidates = gather_tokens(layout.visual, index, 1) & valid & ~last_real
        segment = gather_tokens(layout.segment, index, 1).masked_fill(~candidates, -1)
        frame = gather_tokens(layout.frame, index, 1)
        protected = gather_tokens(layout.visual, index, 1) & valid & ~candidates  # a visual last token
        frame, protected_frame = frame.masked_fill(~candidates, -1), frame.masked_fill(~protected, -1)
        budgets = self._budgets(state, stage, (candidates, frame), (protected, protected_frame))
        return TokenView(
            hidden=hidden,
            candidates=candidates,
            valid=valid,
            segment=segment,
            coords=gather_tokens(layout.coords, index, 1),
            extent=gather_tokens(layout.extent, index, 1),
            positions=index,
            budget=budgets.sum(dim=1),
            layer=stage.layer,
            signals=self._signals(state, stage.layer, valid),
            frame=frame,
            frame_budget=budgets if self.config.budget == "per_frame" else None,
        )

    def _budgets(
        self, state: _Pass, stage: Stage, candidates: tuple[Tensor, Tensor], protected: tuple[Tensor, Tensor]
    ) -> Tensor:
        """[B, G] candidates to keep: one budget per sample (G = 1) or one per frame.

        Counted from the group's original visual tokens (a schedule's ratios all refer to the input),
        less the visual tokens kept anyway (a visual last token), capped by the candidates present.
        Each of `candidates` and `protected` is (mask [B, L], frame [B, L]).
        """
        layout = state.layout
        device = candidates[0].device
        original = layout.visual & _padding_valid(state.padding_mask, *layout.visual.shape, device)
        per_frame = self.config.budget == "per_frame"
        n_groups = max(layout.frames, 1) if per_frame else 1

        def counts(mask: Tensor, frame: Tensor) -> Tensor:
            return group_counts(mask, frame if per_frame else torch.zeros_like(frame), n_groups)

        then, fixed, now = counts(original, layout.frame), counts(*protected), counts(*candidates)
        rows = torch.stack([then, fixed, now]).tolist()  # one host sync per stage
        budgets = [
            [min(max(stage.kept_count(n) - f, 0), c) for n, f, c in zip(*sample, strict=True)]
            for sample in zip(*rows, strict=True)
        ]
        return torch.tensor(budgets, dtype=torch.long, device=device)

    def _signals(self, state: _Pass, layer: int, valid: Tensor) -> Signals:
        captured = state.probe_inputs.get(layer - 1)
        if captured is None:
            return Signals()
        probe, inputs = captured
        return Signals(attention=lambda query: probe.received(inputs, valid, query))

    def _overrides(self, kept: Tensor, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Layer inputs for the shortened sequence: tokens keep their original rotary positions."""
        overrides: dict[str, Any] = {
            "attention_mask": build_causal_mask(self.adapter.text_config(), kept >= 0, kept.shape[1], dtype)
        }
        rotary = kwargs.get("position_embeddings")
        if rotary is not None:
            overrides["position_embeddings"] = tuple(gather_tokens(t, kept, -2) for t in rotary)
        if kwargs.get("position_ids") is not None:
            overrides["position_ids"] = gather_tokens(kwargs["position_ids"], kept, -1)
        return overrides

    def _remember(self, state: _Pass, layer: int, kept: Tensor, original_length: int) -> None:
        if state.cache is None:
            return
        record = self._caches.get(state.cache)
        if record is None or layer == self.first_layer:
            record = self._caches[state.cache] = _CacheRecord(original_length)
            _REDUCED_CACHES.add(state.cache)
        record.stages.append((layer, kept >= 0))

    # -- forwards that continue a reduced cache (decode steps) -----------------------------------

    def _cached_sequence(
        self, state: _Pass, layer: int, hidden: Tensor, kwargs: dict[str, Any]
    ) -> _Shortened:
        """Mask for new tokens attending to the kept cache entries of the stage starting at `layer`."""
        record = self._caches[state.cache]
        key_valid = dict(record.stages)[layer]
        batch, q_length = hidden.shape[:2]
        new_total = state.cache.get_seq_length(layer) - key_valid.shape[1] + q_length
        if state.padding_mask is None:
            new_valid = torch.ones(batch, new_total, dtype=torch.bool, device=hidden.device)
        else:
            new_valid = state.padding_mask[:, record.original_length :].bool()
            if new_valid.shape[1] != new_total:
                raise InputError(
                    f"attention_mask covers {state.padding_mask.shape[1]} tokens, but the cache holds "
                    f"{record.original_length} prompt tokens and {new_total} since, this call included"
                )
        keys = torch.cat([key_valid, new_valid], dim=1)
        mask = build_causal_mask(self.adapter.text_config(), keys, q_length, hidden.dtype)
        return _Shortened(index=None, overrides={"attention_mask": mask})


def _padding_valid(mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return mask[:, -length:].to(device=device, dtype=torch.bool)


def _last_true(mask: Tensor) -> Tensor:
    return mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)


def _check_selection(name: str, keep: Tensor, view: TokenView) -> None:
    if keep.shape != view.candidates.shape or keep.dtype != torch.bool:
        raise StrategyError(
            f"{name}.select returned {tuple(keep.shape)} {keep.dtype}, "
            f"expected bool {tuple(view.candidates.shape)}"
        )
    counts = keep.sum(dim=1)
    budget, groups = view.quota()
    if groups is None:
        per_group, budget = counts[:, None], budget[:, None]
    else:
        per_group = group_counts(keep, groups, budget.shape[1])
    outside, off_budget = torch.stack([(keep & ~view.candidates).any(), (per_group != budget).any()]).tolist()
    if outside:
        raise StrategyError(f"{name}.select kept tokens that are not candidates (text, padding or filler)")
    if off_budget:
        unit = "sample" if groups is None else "frame"
        raise StrategyError(
            f"{name}.select kept {per_group.tolist()} per {unit}, the budget is {budget.tolist()}"
        )


def _event(layer: int, view: TokenView, kept: Tensor, visual: Tensor) -> ReductionEvent:
    """The trace entry of one stage: real and visual tokens before and after it, per sample."""
    before = gather_tokens(visual, view.positions, 1) & view.valid
    after = gather_tokens(visual, kept, 1) & (kept >= 0)
    counts = torch.stack([view.valid.sum(1), (kept >= 0).sum(1), before.sum(1), after.sum(1)]).tolist()
    return ReductionEvent(layer, *counts, kept=kept)


def _forward_parameters(module: nn.Module) -> list[str]:
    return [
        name
        for name, p in inspect.signature(module.forward).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
