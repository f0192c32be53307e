"""tokenprune: visual-token reduction for unmodified vision-language models.

import tokenprune as tp
handle = tp.attach(model, tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.5))
model.generate(**inputs)
handle.trace[0].kept
handle.detach()

Rooms, each importing only those listed after it: `api` (attach) -> `core` (the mechanics) ->
`config` -> `registry` -> `contracts` (what strategies and adapters implement) -> `indexing`,
`errors`. `lab` (ablations, CLI), `builtin` (the toy model and task) and `testing` (tiny models,
oracles) sit on top; `import tokenprune` loads none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenprune.api import Handle, SelectionTimer, attach
    from tokenprune.config import ReductionConfig, Stage, load_config
    from tokenprune.contracts.adapter import Adapter
    from tokenprune.contracts.layout import Segment, VisualLayout
    from tokenprune.contracts.reducer import (
        Merge,
        NoParams,
        Reducer,
        ScoreReducer,
        Signals,
        SignalUnavailable,
        TokenView,
    )
    from tokenprune.core.schedule import removals_per_layer, schedule_stages
    from tokenprune.core.selection import ReductionEvent
    from tokenprune.errors import (
        AttachError,
        ConfigError,
        InputError,
        PluginError,
        StrategyError,
        TokenPruneError,
        UnknownNameError,
    )
    from tokenprune.registry import (
        adapter_for,
        list_adapters,
        list_strategies,
        register_adapter,
        register_strategy,
        strategy_class,
    )

# Where each public name lives: resolved on first use (PEP 562), so importing a strategy or a
# contract (e.g. inside vLLM, next to an older transformers) loads none of the Hugging Face hook
# machinery of `tokenprune.api`.
_HOMES = {
    "tokenprune.api": ("Handle", "SelectionTimer", "attach"),
    "tokenprune.config": ("ReductionConfig", "Stage", "load_config"),
    "tokenprune.contracts.adapter": ("Adapter",),
    "tokenprune.contracts.layout": ("Segment", "VisualLayout"),
    "tokenprune.contracts.reducer": (
        "Merge",
        "NoParams",
        "Reducer",
        "ScoreReducer",
        "Signals",
        "SignalUnavailable",
        "TokenView",
    ),
    "tokenprune.core.schedule": ("removals_per_layer", "schedule_stages"),
    "tokenprune.core.selection": ("ReductionEvent",),
    "tokenprune.errors": (
        "AttachError",
        "ConfigError",
        "InputError",
        "PluginError",
        "StrategyError",
        "TokenPruneError",
        "UnknownNameError",
    ),
    "tokenprune.registry": (
        "adapter_for",
        "list_adapters",
        "list_strategies",
        "register_adapter",
        "register_strategy",
        "strategy_class",
    ),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (module attributes stay ordinary)."""
    if name not in _HOME_OF:
        raise AttributeError(f"module 'tokenprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names and the lazily imported public ones."""
    return sorted(set(globals()) | set(_HOME_OF))


__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AttachError",
    "ConfigError",
    "Handle",
    "InputError",
    "Merge",
    "NoParams",
    "PluginError",
    "Reducer",
    "ReductionConfig",
    "ReductionEvent",
    "ScoreReducer",
    "Segment",
    "SelectionTimer",
    "SignalUnavailable",
    "Signals",
    "Stage",
    "StrategyError",
    "TokenPruneError",
    "TokenView",
    "UnknownNameError",
    "VisualLayout",
    "adapter_for",
    "attach",
    "list_adapters",
    "list_strategies",
    "load_config",
    "register_adapter",
    "register_strategy",
    "removals_per_layer",
    "schedule_stages",
    "strategy_class",
]
