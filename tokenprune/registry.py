"""Name -> class registries for strategies and adapters, filled from entry points and decorators.

Names come from package metadata without importing anything; a plug-in is imported the first
time its name is asked for, so a broken plug-in breaks only its own name.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import entrypoints
from torch import nn

from tokenprune.contracts.adapter import BaseAdapter
from tokenprune.contracts.reducer import Reducer
from tokenprune.errors import AttachError, PluginError, UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class _Source:
    """Where a name comes from: an entry point (lazy) or an in-process registration."""

    origin: str
    load: Callable[[], object]


class Registry(Generic[T]):
    """Names of one kind of plug-in (strategies or adapters), resolved lazily."""

    def __init__(self, kind: str, group: str, base: type[T]) -> None:
        self.kind = kind
        self.group = group
        self.base = base
        self._registered: dict[str, _Source] = {}
        self._discovered: dict[str, _Source] | None = None
        self._loaded: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator registering a class under `name` in this process."""

        def decorate(cls: type[T]) -> type[T]:
            origin = f"{getattr(cls, '__module__', '?')}:{getattr(cls, '__qualname__', cls)}"
            self._check(name, origin, cls)
            known = self._sources().get(name)
            if known is not None and known.origin != origin and not known.origin.startswith(origin + " "):
                raise PluginError(
                    f"{self.kind} name {name!r} is taken twice: by {known.origin} and by {origin}"
                )
            self._registered[name] = _Source(origin, lambda: cls)
            self._remember(name, cls)
            return cls

        return decorate

    def unregister(self, name: str) -> None:
        """Forget a name registered in this process (entry points stay)."""
        self._registered.pop(name, None)
        self._loaded.pop(name, None)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard pattern."""
        return sorted(n for n in self._sources() if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._sources()

    def get(self, name: str) -> type[T]:
        """The class registered under `name`, importing its plug-in if needed."""
        if name in self._loaded:
            return self._loaded[name]
        source = self._sources().get(name)
        if source is None:
            raise UnknownNameError(self._unknown_message(name))
        try:
            cls = source.load()
        except Exception as exc:
            raise PluginError(f"{self.kind} {name!r} from {source.origin} failed to load: {exc!r}") from exc
        self._check(name, source.origin, cls)
        self._remember(name, cls)
        return cls

    def _remember(self, name: str, cls: type[T]) -> None:
        """Keep a loaded class, and tell a class naming none of its own the name it is registered under."""
        self._loaded[name] = cls
        if vars(cls).get("name") is None:
            cls.name = name

    def _check(self, name: str, origin: str, cls: object) -> None:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(
                f"{self.kind} {name!r} from {origin} is not a {self.base.__name__} subclass: {cls!r}"
            )

    def _unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(known) or "(none)"
        return f"unknown {self.kind} {name!r}.{hint} Known {_plural(self.kind)}: {listing}"

    def _sources(self) -> dict[str, _Source]:
        if self._discovered is None:
            self._discovered = self._discover()
        return {**self._discovered, **self._registered}

    def _discover(self) -> dict[str, _Source]:
        found: dict[str, _Source] = {}
        for ep in entrypoints.get_group_all(self.group):
            target = f"{ep.module_name}:{ep.object_name}"
            origin = f"{target} ({ep.distro.name if ep.distro else 'unknown package'})"
            known = found.get(ep.name)
            if known is not None:
                if not known.origin.startswith(target + " "):
                    clash = _conflict(self.kind, ep.name, known, origin)
                    found[ep.name] = _Source(f"{known.origin} and {origin}", clash)
                continue  # the same target declared again: keep what is known (a conflict stays one)
            found[ep.name] = _Source(origin, ep.load)
        return found


def _plural(noun: str) -> str:
    """English plural of a registry's kind: strategy -> strategies, adapter -> adapters."""
    return noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else noun + "s"


def _conflict(kind: str, name: str, first: _Source, second: str) -> Callable[[], object]:
    def fail() -> object:
        raise PluginError(f"{kind} name {name!r} is declared twice: by {first.origin} and by {second}")

    return fail


STRATEGIES: Registry[Reducer] = Registry("strategy", "tokenprune.strategies", Reducer)
ADAPTERS: Registry[BaseAdapter] = Registry("adapter", "tokenprune.adapters", BaseAdapter)

register_strategy = STRATEGIES.register
register_adapter = ADAPTERS.register


def list_strategies(pattern: str = "*") -> list[str]:
    """Names of the strategies available (built-in and installed plug-ins), filtered by a wildcard."""
    return STRATEGIES.names(pattern)


def list_adapters(pattern: str = "*") -> list[str]:
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
        f"adapters available: {', '.join(list_adapters())}. "
        "Pass adapter=... or write one (docs/writing-an-adapter.md)"
    )
