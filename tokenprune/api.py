"""The public entry points: registries, `attach`, and the handle it returns."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from tokenprune.adapter import Adapter, BaseAdapter
from tokenprune.errors import AttachError, ConfigError, PluginError
from tokenprune.reducer import Merge, Reducer, TokenView
from tokenprune.registry import Registry

if TYPE_CHECKING:
    from tokenprune.config import ReductionConfig
    from tokenprune.session import ReductionEvent, Session

STRATEGIES: Registry[Reducer] = Registry("strategy", "tokenprune.strategies", Reducer)
ADAPTERS: Registry[BaseAdapter] = Registry("adapter", "tokenprune.adapters", BaseAdapter)

register_strategy = STRATEGIES.register
register_adapter = ADAPTERS.register

_attached: weakref.WeakKeyDictionary[nn.Module, Handle] = weakref.WeakKeyDictionary()


def strategies(pattern: str = "*") -> list[str]:
    """Names of the strategies available (built-in and installed plug-ins), filtered by a wildcard."""
    return STRATEGIES.names(pattern)


def adapters(pattern: str = "*") -> list[str]:
    """Names of the model adapters available, filtered by a wildcard."""
    return ADAPTERS.names(pattern)


def strategy_class(name: str) -> type[Reducer]:
    """The Reducer class registered as `name` (errors list the known names)."""
    return STRATEGIES.get(name)


def adapter_for(model: nn.Module, name: str | None = None) -> BaseAdapter:
    """The adapter named `name`, or the one whose `model_types` include the model's type."""
    if name is not None:
        return ADAPTERS.get(name)(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    for candidate in ADAPTERS.names():
        try:
            cls = ADAPTERS.get(candidate)
        except PluginError:
            continue  # a broken plug-in only loses its own models
        if cls.supports(model):
            return cls(model)
    raise AttachError(
        f"no adapter for {type(model).__name__} (model_type {model_type!r}); "
        f"adapters available: {', '.join(adapters())}. "
        "Pass adapter=... or write one (docs/writing-an-adapter.md)"
    )


class Handle:
    """A reduction attached to a model: read `trace`, call `detach()` (or use it as a context manager)."""

    def __init__(self, session: Session) -> None:
        self._session: Session | None = session

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

    def _live(self) -> Session:
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
    if model in _attached:
        raise AttachError("this model already has a reduction attached: detach it first (handle.detach())")
    chosen = adapter_for(model, adapter)
    reducer_cls = strategy_class(config.strategy)
    if isinstance(chosen, Adapter):
        _check_sites(chosen, config, reducer_cls)
    session = chosen.session(config, reducer_cls(reducer_cls.Params.model_validate(config.params)))
    session.install()
    handle = Handle(session)
    _attached[model] = handle
    return handle


def _check_sites(adapter: Adapter, config: ReductionConfig, reducer_cls: type[Reducer]) -> None:
    from tokenprune.probe import unavailable_at

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
    sliding = "sliding_attention" in (getattr(text, "layer_types", None) or []) or (
        getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    )
    if sliding:
        raise AttachError(
            "the language model uses sliding-window attention, which the masks of shortened layers "
            "do not reproduce yet: use a full-attention checkpoint (sliding_window=None)"
        )
    backend = text._attn_implementation
    if backend not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise AttachError(
            f"attention implementation {backend!r} has no mask function registered in transformers; "
            f"supported: {', '.join(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)}"
        )
