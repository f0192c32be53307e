"""Attaching: `attach` checks a config against a model, picks the core driver for its adapter, and
returns the `Handle` that reads the trace and detaches."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from tokenprune.config import ReductionConfig
from tokenprune.contracts.adapter import Adapter, BaseAdapter, EncoderAdapter
from tokenprune.contracts.probe import unavailable_at
from tokenprune.contracts.reducer import Merge, Reducer, TokenView
from tokenprune.core.encoder_session import EncoderSession
from tokenprune.core.language.session import Session
from tokenprune.core.masks import FULL, SLIDING, has_local_rules, layer_types, takes_key_bias
from tokenprune.core.selection import ReductionEvent
from tokenprune.errors import AttachError, ConfigError, TokenPruneError
from tokenprune.registry import adapter_for, strategy_class

Driver = Session | EncoderSession

# Attached models, each to its driver, both weakly: the driver lives as long as its hooks on the
# model do, so a model dropped without `detach()` is freed with them.
_attached: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Driver]] = weakref.WeakKeyDictionary()


class Handle:
    """A reduction attached to a model: read `trace`, call `detach()` (or use it as a context manager)."""

    def __init__(self, session: Driver) -> None:
        self._session: Driver | None = session

    @property
    def trace(self) -> list[ReductionEvent]:
        """The reductions of the most recent reducing forward (one event per stage)."""
        return self._live().trace

    @property
    def adapter(self) -> BaseAdapter:
        return self._live().adapter

    @property
    def reducer(self) -> Reducer:
        return self._live().reducer

    @property
    def config(self) -> ReductionConfig:
        return self._live().config

    @property
    def attached(self) -> bool:
        return self._session is not None

    def time_selections(self, synchronize: Callable[[], None] | None = None) -> SelectionTimer:
        """From now on, add up the seconds the strategy spends choosing tokens: its own overhead.

        `synchronize` (e.g. `torch.cuda.synchronize`) runs before each clock reading, so that
        asynchronous kernels are counted where they are launched; on a GPU those syncs slow the
        forward down, so time the model without a timer. One timer at a time per handle.
        """
        return SelectionTimer(self.reducer, synchronize or (lambda: None))

    def detach(self) -> None:
        """Remove every hook and piece of state; the model is exactly as before `attach`.

        A KV cache filled while attached stays shortened: continue it before detaching. Another
        attachment refuses it with `InputError`; the bare model has no hook left to notice it.
        """
        if self._session is None:
            return
        self._session.remove()
        _attached.pop(self._session.model, None)
        self._session = None

    def _live(self) -> Driver:
        if self._session is None:
            raise AttachError("this handle was detached")
        return self._session

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


class SelectionTimer:
    """Seconds spent in a reducer's `select` since it started or `reset` (`Handle.time_selections`).

    A context manager: `stop()` (or leaving the `with` block) puts the reducer's own `select` back.
    """

    def __init__(self, reducer: Reducer, synchronize: Callable[[], None]) -> None:
        if "select" in vars(reducer):
            raise AttachError("a selection timer is already running on this handle: stop it first")
        self.seconds = 0.0
        self._reducer = reducer
        select = reducer.select

        def timed(view: TokenView) -> Tensor | Merge:
            synchronize()
            start = time.perf_counter()
            chosen = select(view)
            synchronize()
            self.seconds += time.perf_counter() - start
            return chosen

        reducer.select = timed  # an instance attribute over the class's method, removed by `stop`

    def reset(self) -> None:
        self.seconds = 0.0

    def stop(self) -> None:
        """Stop timing: the reducer selects as before, without the clock readings (or their syncs)."""
        vars(self._reducer).pop("select", None)

    def __enter__(self) -> SelectionTimer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def attach(model: nn.Module, config: ReductionConfig, adapter: str | None = None) -> Handle:
    """Attach the reduction `config` to `model` through hooks; the model's weights are untouched."""
    if _is_attached(model):
        raise AttachError("this model already has a reduction attached: detach it first (handle.detach())")
    chosen = adapter_for(model, adapter)
    reducer_cls = strategy_class(config.strategy)
    if isinstance(chosen, Adapter):
        _check_sites(chosen, config, reducer_cls)
    reducer = reducer_cls(reducer_cls.Params.model_validate(config.params))
    if isinstance(chosen, Adapter):
        _check_key_bias(chosen, config, reducer)
    session = _driver(chosen, config, reducer)
    _install(session, config)
    _attached[model] = weakref.ref(session)
    return Handle(session)


def _is_attached(model: nn.Module) -> bool:
    """Whether a reduction is attached to `model` (through any handle, kept or dropped)."""
    reference = _attached.get(model)
    return reference is not None and reference() is not None


def _install(session: Driver, config: ReductionConfig) -> None:
    """Place the driver's hooks, all or none: a failure removes what was placed, then says what failed."""
    try:
        session.install()
    except BaseException as exc:
        session.remove()
        if isinstance(exc, TokenPruneError) or not isinstance(exc, Exception):
            raise
        raise AttachError(
            f"attaching {config.strategy!r} through adapter {session.adapter.name!r} failed while placing "
            f"its hooks ({type(exc).__name__}: {exc}); the hooks placed before were removed: check that "
            "the adapter describes this model's modules"
        ) from exc


def _driver(adapter: BaseAdapter, config: ReductionConfig, reducer: Reducer) -> Driver:
    """The core mechanics that drive this kind of adapter (each refuses configs it cannot run)."""
    if isinstance(adapter, EncoderAdapter):
        return EncoderSession(adapter, config, reducer)
    if isinstance(adapter, Adapter):
        return Session(adapter.model, adapter, config, reducer)
    raise AttachError(
        f"adapter {type(adapter).__name__} is neither an `Adapter` (a vision-language model) nor an "
        "`EncoderAdapter` (a vision transformer): subclass one of them"
    )


def _check_sites(adapter: Adapter, config: ReductionConfig, reducer_cls: type[Reducer]) -> None:
    if not config.stages:
        raise ConfigError(
            f"strategy {config.strategy!r} has a per-block schedule of its own (e.g. ToMe's `r`), which "
            "applies to vision transformers; in a language model give `layer` and `ratio` or `keep`"
        )
    n_layers = len(adapter.decoder_layers())
    for stage in config.stages:
        if stage.site != "language":  # vision towers check their own stages
            continue
        if stage.layer >= n_layers:
            raise ConfigError(
                f"layer {stage.layer} is past the last decoder layer: "
                f"the model has {n_layers} (0..{n_layers - 1})"
            )
        missing = unavailable_at(stage.layer, reducer_cls.requires)
        if missing:
            raise ConfigError(
                f"strategy {config.strategy!r} needs the signals {', '.join(sorted(missing))} of the layer "
                f"before its site, which layer {stage.layer} does not have: use layer >= 1 "
                "(layer 0 is before the language model)"
            )
    text = adapter.text_config()
    backend = text._attn_implementation
    if backend not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise AttachError(
            f"attention implementation {backend!r} has no mask function registered in transformers; "
            f"supported: {', '.join(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)}"
        )
    _check_layer_kinds(text)
    _check_windowed_signals(text, config, reducer_cls)


def _check_layer_kinds(text: PretrainedConfig) -> None:
    """Refuse layer kinds whose masks tokenprune cannot keep on a shortened sequence.

    Sliding windows are kept in original positions by a 4-D mask: a backend without one (FlashAttention,
    flex attention) would slide its window over the shortened sequence instead.
    """
    unknown = set(layer_types(text)) - {FULL, SLIDING}
    if unknown:
        raise AttachError(
            f"the language model has layers of kind {', '.join(sorted(unknown))}, whose masks tokenprune "
            f"does not reproduce on a shortened sequence (it keeps {FULL} and {SLIDING} layers)"
        )
    if has_local_rules(text) and not takes_key_bias(text):
        raise AttachError(
            "the language model slides a window over its keys, which tokenprune keeps in original "
            f"positions with a 4-D mask; attention {text._attn_implementation!r} takes none and would slide "
            'it over the shortened sequence: load the model with attn_implementation="sdpa" (or eager)'
        )


# Attention rows a signal recomputes, and the layer (relative to the site) whose attention they are.
_ATTENTION_SIGNALS = {"attention": -1, "attention_from": -1, "next_attention": 0}


def _check_windowed_signals(
    text: PretrainedConfig, config: ReductionConfig, reducer_cls: type[Reducer]
) -> None:
    """Refuse attention signals of a sliding-window layer: the probe recomputes rows over every causal key."""
    kinds = layer_types(text)
    offsets = {offset for signal, offset in _ATTENTION_SIGNALS.items() if signal in reducer_cls.requires}
    for stage in config.stages:
        for offset in offsets:
            layer = stage.layer + offset
            if stage.site == "language" and layer >= 0 and kinds[layer] == SLIDING:
                raise ConfigError(
                    f"strategy {config.strategy!r} ranks with the attention of decoder layer {layer}, a "
                    "sliding-window layer, whose window tokenprune's attention probe does not reproduce: "
                    f"choose a layer whose {'own' if offset == 0 else 'previous'} layer attends globally ("
                    f"{', '.join(str(i) for i, kind in enumerate(kinds) if kind != SLIDING)})"
                )


def _check_key_bias(adapter: Adapter, config: ReductionConfig, reducer: Reducer) -> None:
    """Refuse, now rather than at the first forward, a key bias that an attention backend cannot carry.

    Merges with proportional attention (ToMe's default) add log(size) to the attention logits of
    merged keys: in the language model, and in the vision towers of `site: vision` stages. A backend
    whose mask is not an additive 4-D tensor (FlashAttention, flex attention) has no place for it.
    """
    if not (type(reducer).merges and getattr(reducer.params, "proportional_attention", True)):
        return
    configs = {"the language model": adapter.text_config()}
    if any(stage.site == "vision" for stage in config.stages):
        for tower in adapter.vision_towers():
            configs[f"the {tower.modality} tower"] = getattr(tower.layers[0].self_attn, "config", None)
    for where, backend_config in configs.items():
        if backend_config is not None and not takes_key_bias(backend_config):
            raise AttachError(
                f"strategy {config.strategy!r} merges with proportional attention, a float bias on the "
                f"attention logits, which {where}'s attention {backend_config._attn_implementation!r} "
                'cannot take: load the model with attn_implementation="sdpa" (or eager), or set '
                "`proportional_attention: false` in the params"
            )
