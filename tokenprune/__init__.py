"""tokenprune: visual-token reduction for unmodified vision-language models.

import tokenprune as tp
handle = tp.attach(model, tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.5))
model.generate(**inputs)
handle.trace[0].kept
handle.detach()
"""

# The built-in subpackages share their names with the listing functions `adapters` and
# `strategies`: import them first, so the functions bound below stay the package's attributes.
from tokenprune import adapters as _builtin_adapters  # noqa: F401
from tokenprune import strategies as _builtin_strategies  # noqa: F401
from tokenprune.adapter import Adapter
from tokenprune.api import (
    Handle,
    SelectionTimer,
    adapter_for,
    adapters,
    attach,
    register_adapter,
    register_strategy,
    strategies,
    strategy_class,
)
from tokenprune.config import ReductionConfig, Stage, load_config
from tokenprune.errors import (
    AttachError,
    ConfigError,
    InputError,
    PluginError,
    StrategyError,
    TokenPruneError,
    UnknownNameError,
)
from tokenprune.layout import Segment, VisualLayout
from tokenprune.reducer import Merge, NoParams, Reducer, ScoreReducer, Signals, SignalUnavailable, TokenView
from tokenprune.schedule import removals_per_layer, schedule_stages
from tokenprune.session import ReductionEvent

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
    "adapters",
    "attach",
    "load_config",
    "register_adapter",
    "register_strategy",
    "removals_per_layer",
    "schedule_stages",
    "strategies",
    "strategy_class",
]
