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

from tokenprune.config import ReductionConfig, Stage
from tokenprune.contracts.adapter import Adapter
from tokenprune.contracts.layout import VisualLayout
from tokenprune.contracts.probe import AttentionInputs
from tokenprune.contracts.reducer import Reducer, Signals, TokenView, group_counts
from tokenprune.core.masks import build_causal_mask
from tokenprune.core.merging import follow_groups, initial_groups, key_bias, merge_tokens
from tokenprune.core.selection import (
    ReductionEvent,
    check_selection,
    check_strategy_site,
    reduction_event,
    selection_parts,
)
from tokenprune.core.vision_site import VisionSite
from tokenprune.errors import AttachError, ConfigError, InputError
from tokenprune.indexing import compose, gather_tokens, left_aligned_index, scatter_tokens


@dataclass
class _Shortened:
    """The sequence as the layers from one stage on see it during one forward."""

    index: Tensor | None  # [B, L] original positions, -1 for filler (None on a cached continuation)
    overrides: dict[str, Any]  # layer keyword inputs replaced: mask, rotary tables, position ids
    sizes: Tensor | None = None  # [B, L] original tokens per token once something merged


@dataclass
class _CachedStage:
    """The key slots a stage left in the cache of its layers, and their proportional-attention bias."""

    layer: int
    key_valid: Tensor
    key_bias: Tensor | None


@dataclass
class _CacheRecord:
    """What later forwards on one KV cache need: per stage, its first layer and its key slots."""

    original_length: int
    stages: list[_CachedStage] = field(default_factory=list)


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
    groups: Tensor | None = None  # [B, N] source map (see ReductionEvent.groups)
    vision_slots: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per vision site: (item, token)
    vision_events: list[ReductionEvent] = field(default_factory=list)  # of the towers handed off
    proportional: bool = False  # a merge asked for proportional attention
    events: list[ReductionEvent] = field(default_factory=list)


# The layer-0 site that applies `site: vision` stages to the language model's input.
HANDOFF = Stage(layer=0, ratio=0.0)

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
        self.stages: dict[int, Stage] = {s.layer: s for s in config.stages if s.site == "language"}
        if self.stages:
            check_strategy_site(reducer, "language")
        self.visions = self._vision_sites([s for s in config.stages if s.site == "vision"])
        self.first_layer = min(self.stages)
        self.trace: list[ReductionEvent] = []
        self._pass: _Pass | None = None
        self._caches: weakref.WeakKeyDictionary[Any, _CacheRecord] = weakref.WeakKeyDictionary()
        self._handles: list[RemovableHandle] = []
        self._entry_params = list(_forward_parameters(adapter.entry_module()))

    def _vision_sites(self, stages: list[Stage]) -> list[VisionSite]:
        """Stages in each vision tower, handed to the language model at layer 0."""
        if not stages:
            return []
        towers = self.adapter.vision_towers()
        if not towers:
            name, why = self.adapter.name, self.adapter.no_vision_tower
            raise AttachError(f"adapter {name!r} exposes no vision tower for `site: vision` stages: {why}")
        if 0 in self.stages:
            raise ConfigError("`site: vision` stages hand their result to layer 0: no language stage there")
        self.stages[0] = HANDOFF
        return [VisionSite(tower, stages, self.reducer, self.config.token_order) for tower in towers]

    # -- attaching -------------------------------------------------------------------------

    def install(self) -> None:
        entry = self.adapter.entry_module()
        self._hook_pre(entry, self._on_entry)
        self._handles.append(entry.register_forward_hook(self._on_exit, always_call=True))
        layers = self.adapter.decoder_layers()
        for layer in self.stages:  # before the layer hooks: the site's input is seen unreduced
            self._handles += self._watch(layer)
        for index in range(self.first_layer, len(layers)):
            self._hook_pre(layers[index], self._layer_hook(index))
        self._handles.append(layers[-1].register_forward_hook(self._on_last_layer))
        for site in self.visions:
            self._handles += site.install()

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
        if layout is not None:
            for site in self.visions:
                site.expect(inputs)
                self._pass.vision_slots.append(site.tower.slots(inputs["input_ids"]))
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
        first = record.stages[0]
        past = cache.get_seq_length(first.layer) - first.key_valid.shape[1] + record.original_length
        positions = torch.arange(past, past + q_length, device=first.key_valid.device)[None]
        return self.adapter.continued_position_ids(positions, inputs)

    def _on_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        finished = self._pass
        self._pass = None
        if finished is not None and finished.mode == "prefill":
            self.trace = finished.vision_events + finished.events

    # -- decoder layers -------------------------------------------------------------------------

    def _watch(self, site: int) -> list[RemovableHandle]:
        """Keep references to what the model computes around the site at `site`, for lazy signals.

        Per forward, `probe_inputs[site]` holds `"before"`: the probe of layer `site - 1` and what its
        attention saw, and `"entering"`: the hidden states entering layer `site` and the rotary
        tables the model passes it (full length), as they are before the site reduces anything.
        """

        def captured() -> dict[str, Any] | None:
            return None if self._pass is None else self._pass.probe_inputs.setdefault(site, {})

        def entering(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            slot = captured()
            if slot is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                slot["entering"] = (hidden, kwargs.get("position_embeddings"))

        layer = self.adapter.decoder_layers()[site]
        handles = [layer.register_forward_pre_hook(entering, with_kwargs=True)]
        if site > 0:
            probe = self.adapter.probe(site - 1)

            def store(inputs: AttentionInputs) -> None:
                slot = captured()
                if slot is not None:
                    slot["before"] = (probe, inputs)

            handles += probe.watch(store)
        return handles

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
            index, sizes = index.masked_fill(~valid, -1), None
            state.groups = initial_groups(valid)
        else:
            index, sizes = state.current.index, state.current.sizes
            valid = index >= 0
            state.restore = scatter_tokens(state.restore, index, hidden)
        view = self._view(state, stage, hidden, index, valid, sizes)
        if stage is HANDOFF:
            keep, into, sizes = self._handoff(state, view)
        else:
            keep, merge = selection_parts(self.reducer.select(view))
            check_selection(type(self.reducer).__name__, keep, view, merge)
            into = None if merge is None else merge.into
            if merge is not None:
                hidden, sizes = merge_tokens(hidden, view.token_sizes(), merge)
                state.proportional = merge.proportional_attention
        survive = (valid & ~view.candidates) | keep
        inner = left_aligned_index(survive)
        kept = compose(index, inner)
        state.groups = follow_groups(state.groups, index, survive, into)
        sizes = None if sizes is None else gather_tokens(sizes, inner, 1).masked_fill(kept < 0, 1.0)
        bias = key_bias(sizes) if state.proportional else None
        state.current = _Shortened(kept, self._overrides(kept, kwargs, hidden.dtype, bias), sizes)
        state.events.append(
            reduction_event(stage.layer, view, kept, state.layout.visual, state.groups, sizes)
        )
        self._remember(state, stage.layer, kept, state.restore.shape[1] - 1, bias)
        return gather_tokens(hidden, inner, 1)

    def _handoff(self, state: _Pass, view: TokenView) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(keep, into, sizes) at layer 0 from the vision towers' reductions of this forward's items.

        Layer 0 sees the input sequence, so slots are original positions; the merged features already
        sit at their destination's slot, so nothing is averaged again here.
        """
        keep, into, sizes = view.candidates, torch.full_like(view.positions, -1), None
        for site, (item, token) in zip(self.visions, state.vision_slots, strict=False):  # none: no media
            placed = (item >= 0) & view.valid
            if not bool(placed.any()):
                continue
            handoff = site.handoff()
            if handoff is None or int(item.max()) >= handoff.survive.shape[0]:
                raise InputError(
                    "`site: vision` stages need the features the vision tower encoded while attached, "
                    "one set per sample: pass pixel values (not features encoded before attaching), and "
                    "no beam search or num_return_sequences > 1, which repeat the encoded features"
                )
            state.vision_events += site.events
            selection = handoff.select(item, token, placed, view.candidates, view.positions)
            keep = torch.where(placed, selection[0], keep)
            into = torch.where(placed, selection[1], into)
            if selection[2] is not None:
                sizes = torch.where(placed, selection[2], 1.0 if sizes is None else sizes)
                state.proportional = state.proportional or handoff.proportional
        return keep, into, sizes

    def _view(
        self, state: _Pass, stage: Stage, hidden: Tensor, index: Tensor, valid: Tensor, sizes: Tensor | None
    ) -> TokenView:
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
            sizes=sizes,
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
        """The lazy signals of the site before decoder layer `layer`, on the sequence entering it.

        - `attention(query="last", rope=True, over="all")` [B, L]: head-averaged attention received
          at layer K-1 (needs K >= 1); `rope=False` drops the rotary embedding from queries and keys;
          `over="visual"` takes the softmax over the visual keys only.
        - `keys(rope=False, heads="mean")`: layer K-1's keys, float32 [B, L, d] averaged over heads or
          [B, L, Hkv*d] (`heads="concat"`), before (`rope=False`) or after the rotary embedding.
        - `next_attention(query="last", rope=True, over="all")` [B, L]: the same attention row computed
          with layer K's own input norm, projections and rotary tables on the hidden states entering
          it (PyramidDrop); available at every site, layer 0 included.
        - `normed_output()` [B, L, D] float32: the hidden states entering the site through the
          language model's final norm (DART's "outputs of layer K-1").
        """
        captured = state.probe_inputs.get(layer, {})
        current, layout = state.current, state.layout  # the sequence before this stage reduces it

        def visual_keys(over: str) -> Tensor | None:
            if over not in ("all", "visual"):
                raise ValueError(f"signal option over={over!r}: expected 'all' or 'visual'")
            if over == "all":
                return None
            return layout.visual if current is None else gather_tokens(layout.visual, current.index, 1)

        providers: dict[str, Callable[..., Tensor]] = {}
        before = captured.get("before")
        if before is not None:
            probe, inputs = before
            providers["attention"] = lambda query="last", rope=True, over="all": probe.received(
                inputs, valid, query, rope, visual_keys(over)
            )
            providers["keys"] = lambda rope=False, heads="mean": probe.keys(inputs, rope, heads)
        hidden, rotary = captured.get("entering", (None, None))
        norm = self.adapter.final_norm()
        if hidden is not None and norm is not None:

            def normed_output() -> Tensor:
                with torch.no_grad():
                    return norm(hidden).float()

            providers["normed_output"] = normed_output
        if hidden is not None and rotary is not None:
            if before is not None and current is not None:  # the tables layer K-1 ran with: layer K's too
                rotary = before[1].rotary
            elif current is not None:
                rotary = tuple(gather_tokens(t, current.index, -2) for t in rotary)

            def next_attention(query: str = "last", rope: bool = True, over: str = "all") -> Tensor:
                probe = self.adapter.probe(layer)
                with torch.no_grad():
                    inputs = probe.project(self.adapter.input_norm(layer)(hidden), rotary)
                return probe.received(inputs, valid, query, rope, visual_keys(over))

            providers["next_attention"] = next_attention
        return Signals(providers)

    def _overrides(
        self, kept: Tensor, kwargs: dict[str, Any], dtype: torch.dtype, bias: Tensor | None
    ) -> dict[str, Any]:
        """Layer inputs for the shortened sequence: tokens keep their original rotary positions.

        A merged token keeps the position of the token it was merged into (the survivor's own).
        """
        config = self.adapter.text_config()
        overrides: dict[str, Any] = {
            "attention_mask": build_causal_mask(config, kept >= 0, kept.shape[1], dtype, key_bias=bias)
        }
        rotary = kwargs.get("position_embeddings")
        if rotary is not None:
            overrides["position_embeddings"] = tuple(gather_tokens(t, kept, -2) for t in rotary)
        if kwargs.get("position_ids") is not None:
            overrides["position_ids"] = gather_tokens(kwargs["position_ids"], kept, -1)
        return overrides

    def _remember(
        self, state: _Pass, layer: int, kept: Tensor, original_length: int, bias: Tensor | None
    ) -> None:
        if state.cache is None:
            return
        record = self._caches.get(state.cache)
        if record is None or layer == self.first_layer:
            record = self._caches[state.cache] = _CacheRecord(original_length)
            _REDUCED_CACHES.add(state.cache)
        record.stages.append(_CachedStage(layer, kept >= 0, bias))

    # -- forwards that continue a reduced cache (decode steps) -----------------------------------

    def _cached_sequence(
        self, state: _Pass, layer: int, hidden: Tensor, kwargs: dict[str, Any]
    ) -> _Shortened:
        """Mask for new tokens attending to the kept cache entries of the stage starting at `layer`."""
        record = self._caches[state.cache]
        cached = next(stage for stage in record.stages if stage.layer == layer)
        key_valid = cached.key_valid
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
        bias = None
        if cached.key_bias is not None:
            bias = torch.cat([cached.key_bias, cached.key_bias.new_zeros(new_valid.shape)], dim=1)
        mask = build_causal_mask(self.adapter.text_config(), keys, q_length, hidden.dtype, key_bias=bias)
        return _Shortened(index=None, overrides={"attention_mask": mask})


def _padding_valid(mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return mask[:, -length:].to(device=device, dtype=torch.bool)


def _last_true(mask: Tensor) -> Tensor:
    return mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)


def _forward_parameters(module: nn.Module) -> list[str]:
    return [
        name
        for name, p in inspect.signature(module.forward).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
