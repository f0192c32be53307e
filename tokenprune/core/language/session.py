"""Driving an unmodified model through a reduction: the hooks of one attachment and what they share.

Data flow of one prefill: the entry pre-hook asks the adapter for the visual layout; the layers
before a site run untouched (a pre-hook keeps a reference to the inputs of the attention module
just before the site: `signals`); at the site the reduction step (`reduction`) picks tokens and
gathers what the later layers need; every later layer gets those instead of the full-length ones;
the last layer's hook restores the full length. The KV cache fills itself with the kept tokens only,
and decode steps get masks sized for each layer's shorter cache (`ledger`). The state of one
forward (`forward.Pass`) is dropped when the entry module returns. A `site: cache` stage
(`cache_site`) acts at the entry of decode forwards instead, on the cache the prefill left.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.config import ReductionConfig, Stage
from tokenprune.contracts.adapter import Adapter
from tokenprune.contracts.reducer import PositionPolicy, Reducer
from tokenprune.core.language.cache_site import CacheSite
from tokenprune.core.language.forward import Pass, Shortened, cache_of
from tokenprune.core.language.injections import follow_side_inputs
from tokenprune.core.language.layer_kinds import layer_inputs
from tokenprune.core.language.ledger import CacheLedger
from tokenprune.core.language.lifecycle import Hooks
from tokenprune.core.language.positions import continued, shift_of
from tokenprune.core.language.reduction import HANDOFF, ReductionStep
from tokenprune.core.language.signals import CaptureSlot, watch_site
from tokenprune.core.masks import has_local_rules, layer_types
from tokenprune.core.selection import ReductionEvent, check_strategy_site
from tokenprune.core.vision_site import VisionSite
from tokenprune.errors import AttachError, ConfigError, InputError
from tokenprune.indexing import scatter_tokens


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
        cache_stage = next((s for s in config.stages if s.site == "cache"), None)
        if cache_stage is not None:
            _check_cache_stage(adapter, reducer, cache_stage)
        self.first_layer = min([*self.stages, *([] if cache_stage is None else [cache_stage.layer])])
        self.trace: list[ReductionEvent] = []
        self._pass: Pass | None = None
        self._hooks = Hooks()
        self._ledger = CacheLedger(self.first_layer)
        self.policies = self._position_policies([s for s in config.stages if s.site == "vision"])
        self._step = ReductionStep(adapter, config, reducer, self.visions, self._ledger, self.policies)
        self.cache_site = None
        if cache_stage is not None:
            self.cache_site = CacheSite(adapter, config, reducer, cache_stage, self._ledger)
        # layers whose cached keys a decode step masks anew: each stage's first (the cache stage's too)
        self._continued = {*self.stages, *([] if cache_stage is None else [cache_stage.layer])}
        self._entry_params = _forward_parameters(adapter.entry_module())

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

    def _position_policies(self, vision_stages: list[Stage]) -> dict[int, PositionPolicy]:
        """The position policy of the stage at each layer (the hand-off follows the last vision stage's),
        refusing `renumbered` where the rotary tables cannot be recomputed."""
        policies = {layer: self.config.position_policy(stage) for layer, stage in self.stages.items()}
        if vision_stages:
            policies[0] = self.config.position_policy(vision_stages[-1])
        if "renumbered" in policies.values():
            why = None
            if self.adapter.rotary_embedding() is None:
                why = "its adapter names no rotary module (`Adapter.rotary_embedding`) for the tables"
            elif len(set(layer_types(self.adapter.text_config()))) > 1:
                why = "its decoder layers come in kinds (sliding and global) with tables of their own"
            if why is not None:
                raise AttachError(
                    f"`positions: renumbered` is not available on adapter {self.adapter.name!r}: {why}; "
                    "use `positions: original`"
                )
        return policies

    # -- attaching -------------------------------------------------------------------------------

    def install(self) -> None:
        """Place every hook; each is recorded as placed, so `remove` undoes a failed install too."""
        hooks = self._hooks
        entry = self.adapter.entry_module()
        hooks.pre(entry, self._on_entry)
        hooks.post(entry, self._on_exit, always_call=True)
        layers = self.adapter.decoder_layers()
        for layer in self.stages:  # before the layer hooks: the site's input is seen unreduced
            watch_site(self.adapter, layer, self._capture_slot(layer), hooks)
        for index in range(self.first_layer, len(layers)):
            hooks.pre(layers[index], self._layer_hook(index))
        hooks.post(layers[-1], self._on_last_layer)
        if "renumbered" in self.policies.values():
            hooks.pre(self.adapter.rotary_embedding(), self._on_rotary)
        follow_side_inputs(self.adapter, lambda: self._pass, layers, hooks)  # after the restore above
        for site in self.visions:
            site.install(hooks)
        if self.cache_site is not None:
            self.cache_site.install(hooks, lambda: self._pass is not None)

    def remove(self) -> None:
        """Take every hook off and drop the state of a forward in progress."""
        self._hooks.remove()
        self._pass = None

    def _capture_slot(self, layer: int) -> CaptureSlot:
        """Where the watchers of the site at `layer` leave their captures during a forward."""
        return lambda: None if self._pass is None else self._pass.probe_inputs.setdefault(layer, {})

    # -- entry and exit of one forward ---------------------------------------------------------

    def _on_entry(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        """A forward begins: refuse what cannot be reduced, find the visual tokens, start its state."""
        inputs = {**dict(zip(self._entry_params, args, strict=False)), **kwargs}
        _check_cache_kind(cache_of(inputs))
        padding = inputs.get("attention_mask")
        if padding is not None and padding.ndim != 2:
            raise InputError("tokenprune needs a 2-D attention mask [batch, length] (or none), not a 4-D one")
        trimmed = self._unseen_only(inputs, padding)
        if trimmed is not None:
            args, kwargs, inputs = (), trimmed, trimmed
        layout = self.adapter.visual_layout(inputs)
        reference = _fed(inputs)
        self._pass = Pass(layout=layout, padding_mask=padding)
        if self.cache_site is not None and self._ledger.mode(cache_of(inputs)) == "cached":
            event = self.cache_site.before_forward(cache_of(inputs), padding)
            if event is not None:
                self.trace.append(event)
        if layout is not None:
            for site in self.visions:
                site.expect(inputs)
                self._pass.vision_slots.append(site.tower.slots(self.adapter.input_ids(inputs)))
        continued = self._continued_positions(inputs, reference)
        if continued is not None:
            return args, {**kwargs, "position_ids": continued}
        return None if trimmed is None else (args, kwargs)

    def _unseen_only(self, inputs: dict[str, Any], padding: Tensor | None) -> dict[str, Any] | None:
        """The inputs of a forward continuing a cache whose layer 0 was shortened, cut to the tokens the
        cache has not seen (None: nothing to cut). `generate` counts the tokens a continued cache holds
        by layer 0's length, so on a second turn it feeds again the tail of what is cached already; the
        attention mask, which covers the whole conversation, says how many tokens are new."""
        past = self._ledger.past_length(cache_of(inputs))
        if past is None or padding is None:
            return None
        new, fed = padding.shape[1] - past, _fed(inputs).shape[1]
        if not 0 < new < fed:
            return None
        cut = {}
        for name in ("input_ids", "inputs_embeds", "position_ids"):
            value = inputs.get(name)
            if value is not None:
                index = 1 if name != "position_ids" else value.ndim - 1
                cut[name] = value.narrow(index, value.shape[index] - new, new)
        return {**inputs, **cut}

    def _continued_positions(self, inputs: dict[str, Any], reference: Tensor) -> Tensor | None:
        """Position ids for a forward on a cache whose first layer was shortened (a layer-0 site).

        The language model would count them from layer 0's cache length; they must continue from the
        original length instead. Generation passes them explicitly; a hand-written loop may not.
        """
        if inputs.get("position_ids") is not None:
            return None
        past = self._ledger.past_length(cache_of(inputs))
        if past is None:
            return None
        positions = torch.arange(past, past + reference.shape[1], device=reference.device)[None]
        return self.adapter.continued_position_ids(positions, inputs)

    def _on_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The forward is over: publish its trace and drop everything it held."""
        finished = self._pass
        self._pass = None
        if finished is not None and finished.mode == "prefill":
            self.trace = finished.vision_events + finished.events
            if self.cache_site is not None:
                self.cache_site.after_prefill(finished)
        if finished is not None and self.cache_site is not None:
            self.cache_site.after_forward(finished.cache)

    def _on_rotary(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Keep the position ids the model first asks its rotary module for in a forward (later calls are
        the core's own, for renumbered tables): renumbering counts from them."""
        if self._pass is not None and self._pass.positions is None:
            self._pass.positions = kwargs["position_ids"] if "position_ids" in kwargs else args[1]

    # -- decoder layers -------------------------------------------------------------------------

    def _layer_hook(self, layer: int) -> Callable:
        """The pre-hook of decoder layer `layer`: reduce at a site, then hand the shortened inputs on."""

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            state = self._pass
            if state is None:
                return None
            positional = bool(args)
            hidden = args[0] if positional else kwargs["hidden_states"]
            if layer == self.first_layer:
                state.cache = cache_of(kwargs)
                state.mode = self._ledger.mode(state.cache)
            if layer in self.stages and state.mode == "prefill":
                hidden = self._step.reduce(state, self.stages[layer], hidden, kwargs)
            elif layer in self._continued and state.mode == "cached":
                mask = self._ledger.continuation_mask(
                    state.cache, layer, hidden, state.padding_mask, self.adapter.text_config()
                )
                before = {} if state.current is None or layer in self.stages else state.current.overrides
                state.current = Shortened(index=None, overrides={**before, "attention_mask": mask})
                shift = shift_of(state.cache, layer)
                if shift is not None:  # decode positions continue from the renumbered prompt
                    tables = self._step.rotary_tables(hidden, continued(state.positions, shift))
                    state.current.overrides["position_embeddings"] = tables
            if state.current is None:
                return None
            config = self.adapter.text_config()
            overrides = layer_inputs(state.current, layer, kwargs, config, self._blocks(state))
            kwargs = {**kwargs, **overrides}
            if positional:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _blocks(self, state: Pass) -> Callable[[], Tensor | None]:
        """The bidirectional blocks of this prefill by original position (None: causal), asked lazily."""
        if state.mode != "prefill" or state.layout is None:
            return lambda: None
        return lambda: self.adapter.bidirectional_blocks(state.layout.visual)

    def _on_last_layer(self, module: nn.Module, args: tuple, output: Tensor):
        """Give the final norm and LM head a full-length sequence again (removed tokens: last state)."""
        state = self._pass
        if state is None or state.mode != "prefill" or state.current is None:
            return None
        device = output.device  # the buffer is this forward's own: written in place, not copied
        restore, index = state.restore.to(device), state.current.index.to(device)
        return scatter_tokens(restore, index, output, in_place=True)[:, : restore.shape[1] - 1]


def _fed(inputs: dict[str, Any]) -> Tensor:
    """The token ids (or embeddings) a forward runs."""
    ids = inputs.get("input_ids")
    return ids if ids is not None else inputs["inputs_embeds"]


def _check_cache_stage(adapter: Adapter, reducer: Reducer, stage: Stage) -> None:
    """Refuse a `site: cache` stage this strategy or model cannot run: a clear reason, before any forward."""
    check_strategy_site(reducer, "cache")
    n_layers = len(adapter.decoder_layers())
    if stage.layer >= n_layers:
        raise ConfigError(
            f"`site: cache` stage at layer {stage.layer}: the model has {n_layers} decoder layers "
            f"(0..{n_layers - 1})"
        )
    if has_local_rules(adapter.text_config()):
        raise AttachError(
            f"adapter {adapter.name!r}: `site: cache` stages are not available on a language model with "
            "sliding-window layers or bidirectional image blocks (their caches keep their own windows)"
        )


def _check_cache_kind(cache: Any) -> None:
    """Refuse caches of fixed per-layer length (StaticCache): layers from a site on hold fewer entries."""
    if cache is not None and getattr(cache, "is_compileable", False):
        raise InputError(
            f"tokenprune cannot reduce into a {type(cache).__name__}: its layers have one fixed length, "
            "while layers from a site on hold fewer entries. Use the default DynamicCache (drop "
            '`cache_implementation="static"` from generate, or pass a DynamicCache)'
        )


def _forward_parameters(module: nn.Module) -> list[str]:
    """The names of `module.forward`'s positional parameters, to name positional entry inputs."""
    return [
        name
        for name, p in inspect.signature(module.forward).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
