"""The cells of an ablation: the unreduced baseline, the grid's product per strategy, the extra cells.

Each cell has a key, the hash of its exact config and of what it is measured on (model, prompt,
data, generation, batch size): the results store resumes a run by these keys, and shards split a
grid by cell index.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import tokenprune as tp
from tokenprune.config import CACHE_ONLY_FIELDS
from tokenprune.errors import ConfigError
from tokenprune.lab.config import AblationConfig
from tokenprune.lab.datasets import contents_digest, load_samples

SITE_PREFIX = {"language": "", "vision": "v", "cache": "c"}  # a stage's K in labels: `2`, `v22`, `c3`


@dataclass(frozen=True)
class Cell:
    """One configuration to measure: a reduction, its params as they run (None: the unreduced baseline)."""

    index: int
    reduction: tp.ReductionConfig | None
    label: str
    key: str

    @property
    def seed(self) -> int | None:
        """The strategy's `seed` parameter; None for the baseline and strategies without one."""
        return None if self.reduction is None else self.reduction.params.get("seed")

    def config(self) -> dict[str, Any]:
        """The exact cell config, as recorded in its row and hashed into its key."""
        reduction = None if self.reduction is None else _stable_dump(self.reduction)
        return {"reduction": reduction, "seed": self.seed}


def _stable_dump(reduction: tp.ReductionConfig) -> dict[str, Any]:
    """The reduction as JSON, its stages' cache-only fields left out at their defaults: the keys of
    cells without a `site: cache` stage stay those of runs recorded before these fields existed, and
    the dump builds the same config back (a non-cache stage refuses them when given)."""
    dumped = reduction.model_dump(mode="json")
    for stage in dumped["stages"]:
        for name in CACHE_ONLY_FIELDS:
            if stage[name] == tp.Stage.model_fields[name].default:
                del stage[name]
    return dumped


def expand_grid(config: AblationConfig, dataset: str | None = None) -> list[Cell]:
    """Every cell in grid order, once: the baseline, the product per strategy, then the extra cells.

    `dataset` is the digest of the samples' contents (`datasets.contents_digest`), part of every
    key; None: the samples are loaded here to take it.
    """
    grid = config.grid
    specs: list[tuple[tp.ReductionConfig | None, list[str]]] = [(None, [])]  # (reduction, params shown)
    for name in grid.active_strategies():
        for stage, params in grid.combinations(name):
            reduction = tp.ReductionConfig(strategy=name, stages=[stage], params=params, budget=grid.budget)
            specs += _seeded(_resolved(reduction), list(params), config.seeds)
    for extra in grid.extra:  # as written; one cell per seed unless its params set the seed
        reduction = _resolved(extra)
        shown = _changed_params(reduction)
        specs += [(reduction, shown)] if extra.sets_seed else _seeded(reduction, shown, config.seeds)
    shared = context(config, dataset)
    cells: dict[str, Cell] = {}
    for reduction, shown in specs:
        draft = Cell(len(cells), reduction, _label(reduction, shown), "")
        key = digest({"cell": draft.config(), "context": shared})
        if key not in cells:
            cells[key] = replace(draft, key=key)
    return list(cells.values())


def _resolved(reduction: tp.ReductionConfig) -> tp.ReductionConfig:
    """The reduction with its params as they run (what rows record, labels show and keys hash)."""
    return reduction.model_copy(
        update={"params": _resolve_params(reduction.strategy, reduction.params, reduction.stages)}
    )


def _resolve_params(strategy: str, params: dict[str, Any], stages: Sequence[tp.Stage]) -> dict[str, Any]:
    """Every parameter of `strategy` as it runs: the Params model's defaults filled in and, when all
    `stages` share one site and the model has `resolved(site)`, each None that stands for a default
    of that site replaced by it (the model's own word on what its None means)."""
    model = tp.strategy_class(strategy).Params(**params)
    sites = {stage.site for stage in stages}
    if len(sites) == 1 and hasattr(model, "resolved"):
        model = model.resolved(*sites)
    return model.model_dump()


def _seeded(
    reduction: tp.ReductionConfig, shown: list[str], seeds: list[int]
) -> list[tuple[tp.ReductionConfig, list[str]]]:
    """One cell per seed when the strategy has a `seed` parameter the grid leaves free, else one."""
    if "seed" not in reduction.params or "seed" in shown:
        return [(reduction, shown)]
    return [(reduction.model_copy(update={"params": {**reduction.params, "seed": s}}), shown) for s in seeds]


def _changed_params(reduction: tp.ReductionConfig) -> list[str]:
    """The params of an extra cell that differ from the strategy's defaults at its site (the label's)."""
    defaults = _resolve_params(reduction.strategy, {}, reduction.stages)
    return [k for k, v in reduction.params.items() if defaults.get(k, object()) != v]


def _label(reduction: tp.ReductionConfig | None, shown: list[str]) -> str:
    """A short name: `fastv K=2 R=0.75 score=mean`, `random K=2 keep=64 seed=1`, `baseline`.

    Vision-tower stages show as `K=v22` (the output of vision layer 22), cache stages as `K=c3` (the
    caches of decoder layers 3 and later) with their schedule (`every=2 window=4 restore`) where it
    differs from the defaults (one pruning after the prefill); then the params in `shown`
    and the seed (of strategies with one), with the values they run with; then what differs from
    the defaults (budget, position policy, token order).
    """
    if reduction is None:
        return "baseline"
    layers = ",".join(SITE_PREFIX[s.site] + str(s.layer) for s in reduction.stages)
    stages = reduction.stages
    parts = [reduction.strategy, f"K={layers}", _budgets(stages), *_cache_schedule(stages)]
    parts += [f"{k}={reduction.params[k]}" for k in shown]
    if "seed" in reduction.params and "seed" not in shown:
        parts.append(f"seed={reduction.params['seed']}")
    if reduction.budget != "sample":
        parts.append(reduction.budget)
    parts += _positions(reduction)
    if reduction.token_order != "reference":
        parts.append(f"order={reduction.token_order}")
    return " ".join(parts)


def _cache_schedule(stages: Sequence[tp.Stage]) -> list[str]:
    """`every=N`, `window=W`, `restore` of a cache stage where they differ from the defaults."""
    parts: list[str] = []
    for stage in stages:
        for name in CACHE_ONLY_FIELDS:
            value = getattr(stage, name)
            if value != tp.Stage.model_fields[name].default:
                parts.append(name if value is True else f"{name}={value}")
    return parts


def _positions(reduction: tp.ReductionConfig) -> list[str]:
    """`[positions=original]` (per stage: `positions=original,renumbered`) when a stage's policy is not
    the strategy's default; else nothing."""
    policies = [reduction.position_policy(stage) for stage in reduction.stages]
    if all(policy == tp.strategy_class(reduction.strategy).positions for policy in policies):
        return []
    shown = policies[:1] if len(set(policies)) == 1 else policies
    return [f"positions={','.join(shown)}"]


def _budgets(stages: Sequence[tp.Stage]) -> str:
    """`R=0.5`, `keep=64`, `keep=43,21,11` (one name when every stage has the same kind of budget)."""
    ratios = [f"{s.ratio:g}" for s in stages if s.ratio is not None]
    keeps = [str(s.keep) for s in stages if s.keep is not None]
    if not keeps:
        return f"R={','.join(ratios)}"
    if not ratios:
        return f"keep={','.join(keeps)}"
    return ",".join(f"R={s.ratio:g}" if s.ratio is not None else f"keep={s.keep}" for s in stages)


def context(config: AblationConfig, dataset: str | None = None) -> dict[str, Any]:
    """What else changes a cell's results: model, prompt, the data's contents, generation, batch size.

    The data enters by the digest of its samples as loaded (None: loaded here), never by its path.
    """
    if dataset is None:
        spec = config.dataset
        dataset = contents_digest(load_samples(spec.source, spec.split, spec.limit, spec.seed))
    model = config.model.model_dump(include={"source", "dtype", "attn_implementation", "adapter", "prompt"})
    return {
        "model": model,
        "dataset": dataset,
        "generation": config.generation.model_dump(),
        "batch_size": config.batch_size,
    }


def digest(data: Any) -> str:
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
