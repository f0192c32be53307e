"""Strategies and contracts import without the Hugging Face hook machinery (as inside vLLM's process).

`import tokenprune` resolves its public names lazily, so a serving integration that imports a
strategy, the registry or the config loads neither transformers nor `tokenprune.api`; and every
public name still resolves.
"""

from __future__ import annotations

import subprocess
import sys

import tokenprune as tp

PRE_LLM_STRATEGIES = ("divprune", "random", "uniform", "pool", "visionzip", "fastervlm", "vispruner")

LIGHT_IMPORTS = f"""
import sys
import tokenprune.config, tokenprune.registry, tokenprune.contracts.reducer
for name in {PRE_LLM_STRATEGIES!r}:
    tokenprune.registry.strategy_class(name)
heavy = sorted(m for m in ("transformers", "tokenprune.api", "tokenprune.core.masks") if m in sys.modules)
print(",".join(heavy))
"""


def test_strategies_config_and_registry_load_no_transformers() -> None:
    """A fresh process imports the pre-LLM strategies, the config and the registry without transformers."""
    done = subprocess.run(
        [sys.executable, "-c", LIGHT_IMPORTS], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "", f"loaded: {done.stdout.strip()}"


def test_every_public_name_resolves() -> None:
    """Each name of `tokenprune.__all__` has a home and resolves to an object."""
    assert set(tp._HOME_OF) == set(tp.__all__)
    for name in tp.__all__:
        assert getattr(tp, name) is not None
