"""The cells of an ablation: the unreduced baseline, the grid's product per strategy, the extra cells.

Each cell has a key, the hash of its exact config and of what it is measured on (model, prompt,
data, generation, batch size): the results store resumes a run by these keys, and shards split a
grid by cell index.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import tokenprune as tp
from tokenprune.errors import ConfigError
from tokenprune.lab.config import AblationConfig


@dataclass(frozen=True)
class Cell:
    """One configuration to measure: a reduction (None: the unreduced baseline) and a seed."""

    index: int
    reduction: tp.ReductionConfig | None
    seed: int
    label: str
    key: str

    def config(self) -> dict[str, Any]:
        """The exact cell config, as recorded in its row and hashed into its key."""
        reduction = None if self.reduction is None else self.reduction.model_dump(mode="json")
        return {"reduction": reduction, "seed": self.seed}


def expand_grid(config: AblationConfig) -> list[Cell]:
    """Every cell in grid order, once: the baseline, the product per strategy, then the extra cells."""
    grid = config.grid
    specs: list[tuple[tp.ReductionConfig | None, dict[str, Any], int]] = [(None, {}, config.seeds[0])]
    for name in grid.active_strategies():
        for stage, params in grid.combinations(name):
            reduction = tp.ReductionConfig(strategy=name, stages=[stage], params=params, budget=grid.budget)
            specs += _seeded(reduction, params, config.seeds)
    for reduction in grid.extra:  # as written: one cell, its seed (if any) in its params
        specs.append((reduction, _changed_params(reduction), reduction.params.get("seed", config.seeds[0])))
    context = _context(config)
    cells: dict[str, Cell] = {}
    for reduction, shown, seed in specs:
        draft = Cell(len(cells), reduction, seed, _label(reduction, shown, seed), "")
        key = _hash({"cell": draft.config(), "context": context})
        if key not in cells:
            cells[key] = Cell(draft.index, reduction, seed, draft.label, key)
    return list(cells.values())


def _seeded(
    reduction: tp.ReductionConfig, shown: dict[str, Any], seeds: list[int]
) -> list[tuple[tp.ReductionConfig, dict[str, Any], int]]:
    """One cell per seed when the strategy has a `seed` parameter the grid leaves free, else one."""
    fields = tp.strategy_class(reduction.strategy).Params.model_fields
    if "seed" not in fields or "seed" in shown:
        return [(reduction, shown, seeds[0])]
    return [
        (reduction.model_copy(update={"params": {**reduction.params, "seed": seed}}), shown, seed)
        for seed in seeds
    ]


def _changed_params(reduction: tp.ReductionConfig) -> dict[str, Any]:
    """The params of an extra cell that differ from the strategy's defaults (those its label shows)."""
    defaults = tp.strategy_class(reduction.strategy).Params().model_dump()
    return {k: v for k, v in reduction.params.items() if defaults.get(k, object()) != v}


def _label(reduction: tp.ReductionConfig | None, shown: dict[str, Any], seed: int) -> str:
    """A short name: `fastv K=2 R=0.75 score=mean`, `random K=2 keep=64 seed=1`, `baseline`.

    Vision-tower stages show as `K=v22` (the output of vision layer 22).
    """
    if reduction is None:
        return "baseline"
    layers = ",".join(str(s.layer) if s.site == "language" else f"v{s.layer}" for s in reduction.stages)
    parts = [reduction.strategy, f"K={layers}", _budgets(reduction.stages)]
    parts += [f"{k}={v}" for k, v in shown.items()]
    if "seed" in tp.strategy_class(reduction.strategy).Params.model_fields and "seed" not in shown:
        parts.append(f"seed={seed}")
    if reduction.budget != "sample":
        parts.append(reduction.budget)
    if reduction.token_order != "reference":
        parts.append(f"order={reduction.token_order}")
    return " ".join(parts)


def _budgets(stages: Sequence[tp.Stage]) -> str:
    """`R=0.5`, `keep=64`, `keep=43,21,11` (one name when every stage has the same kind of budget)."""
    ratios = [f"{s.ratio:g}" for s in stages if s.ratio is not None]
    keeps = [str(s.keep) for s in stages if s.keep is not None]
    if not keeps:
        return f"R={','.join(ratios)}"
    if not ratios:
        return f"keep={','.join(keeps)}"
    return ",".join(f"R={s.ratio:g}" if s.ratio is not None else f"keep={s.keep}" for s in stages)


def _context(config: AblationConfig) -> dict[str, Any]:
    """What else changes a cell's results: model, prompt, data, generation, batch size."""
    model = config.model.model_dump(include={"source", "dtype", "attn_implementation", "adapter", "prompt"})
    return {
        "model": model,
        "dataset": config.dataset.model_dump(),
        "generation": config.generation.model_dump(),
        "batch_size": config.batch_size,
    }


def _hash(data: dict[str, Any]) -> str:
    """A short stable hash of JSON-able data (16 hex digits of SHA-256)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` -> (i, n): shard i (0-based) of n."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard takes i/n (shard i of n, 0 <= i < n), got {text!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return index, count


def shard_cells(cells: Sequence[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Every n-th cell from the i-th: the shards of one grid are disjoint and cover it."""
    if shard is None:
        return list(cells)
    index, count = shard
    return list(cells[index::count])
