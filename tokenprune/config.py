"""Pydantic configuration of a reduction: which strategy, where, how much, with which parameters."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tokenprune.contracts.reducer import PositionPolicy
from tokenprune.errors import ConfigError, UnknownNameError, describe_errors
from tokenprune.registry import strategy_class

DEFAULT_STRATEGY = "fastv"
DEFAULT_LAYER = 2  # FastV's K: layers 0 and 1 see every token
CACHE_ONLY_FIELDS = ("every", "window", "restore")  # Stage fields of `site: cache` stages alone


class Stage(BaseModel):
    """One reduction site: before decoder layer `layer`, keep a budget of visual tokens.

    `ratio` is the fraction of the sample's *original* visual tokens removed once this stage has
    run (the paper's R); `keep` is an absolute number of visual tokens kept per sample. Exactly one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int = Field(DEFAULT_LAYER, ge=0, description="K: the stage reduces the input of decoder layer K")
    ratio: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of visual tokens removed")
    keep: int | None = Field(None, ge=0, description="visual tokens kept per sample")
    site: Literal["language", "vision", "cache"] = Field(
        "language",
        description="where `layer` counts: the language model's decoder layers (the stage reduces the "
        "input of layer K), the vision encoder's (it reduces the output of layer K, per image), or the "
        "KV cache of decoder layers K and later between decode steps (`docs/cache-site.md`)",
    )
    positions: PositionPolicy | None = Field(
        None,
        description="rotary positions from this stage on: `original` (kept tokens keep theirs) or "
        "`renumbered` (the surviving sequence numbered contiguously); None: the config's `positions`",
    )
    every: int | None = Field(
        None,
        ge=1,
        description="`site: cache` only: None prunes once, before the first decode step; N also before "
        "every N-th decode step after it (steps 1, 1 + N, 1 + 2N, ...)",
    )
    window: int = Field(
        1,
        ge=1,
        description="`site: cache` only: how many most recent query tokens' attention ranks the entries",
    )
    restore: bool = Field(
        False,
        description="`site: cache` only: False removes entries from the cache for good (compacted); True "
        "sets them aside, each selection choosing again among the visual entries of the first one (DyCoke)",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> Self:
        if (self.ratio is None) == (self.keep is None):
            raise ValueError("give exactly one of `ratio` (fraction removed) or `keep` (tokens kept)")
        if self.site != "cache":
            for name in CACHE_ONLY_FIELDS:
                if name in self.model_fields_set:
                    raise ValueError(
                        f"`{name}` applies to `site: cache` stages only, not `site: {self.site}`"
                    )
        return self

    def kept_count(self, n_visual: int) -> int:
        """Visual tokens this stage keeps out of a sample's `n_visual` original ones.

        `round(n_visual * (1 - ratio))` with Python's round (half to even), as FastV's reference does.
        """
        if self.keep is not None:
            return min(self.keep, n_visual)
        return round(n_visual * (1.0 - self.ratio))


class ReductionConfig(BaseModel):
    """A complete reduction: a strategy, its parameters, and one or more stages.

    The one-stage shorthand `ReductionConfig(strategy="fastv", layer=2, ratio=0.5)` is the same as
    `stages=[{"layer": 2, "ratio": 0.5}]`. Stages run in increasing layer order, each one seeing
    the tokens the previous one kept (PyramidDrop-style schedules). A strategy with a schedule of
    its own (ToMe's `r` on a ViT) needs no budget: `ReductionConfig(strategy="tome", params={"r": 8})`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = DEFAULT_STRATEGY
    layer: int | None = Field(None, ge=0)
    ratio: float | None = Field(None, ge=0.0, lt=1.0)
    keep: int | None = Field(None, ge=0)
    stages: tuple[Stage, ...] = ()
    budget: Literal["sample", "per_frame"] = Field(
        "sample",
        description="one budget over all visual tokens of a sample (FastV), or one per frame: "
        "each video frame, image or sub-grid keeps its own share",
    )
    params: dict[str, Any] = Field(default_factory=dict)
    positions: PositionPolicy | None = Field(
        None,
        description="the position policy of every stage that sets none: `original` or `renumbered`; "
        "None: the strategy's own default (its paper's reference code)",
    )
    token_order: Literal["reference", "spatial"] = Field(
        "reference",
        description="ViT sites, where order is free: survivors in the strategy's order (ToMe's reference "
        "order) or by original position; language models always keep sequence order",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        short = {k: data[k] for k in ("layer", "ratio", "keep") if data.get(k) is not None}
        if short and data.get("stages"):
            raise ValueError(
                "give either `stages` or the one-stage shorthand `layer`/`ratio`/`keep`, not both"
            )
        if short:
            return {**data, "stages": [short]}
        return data

    @field_validator("stages")
    @classmethod
    def _increasing(cls, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
        for before, after in itertools.pairwise(stages):
            if before.site == "cache" and after.site != "cache":
                raise ValueError("`site: cache` stages come after every prefill stage (language or vision)")
            if before.site == after.site == "cache":
                raise ValueError("give at most one `site: cache` stage")
            if (before.site, after.site) == ("language", "vision"):
                raise ValueError("`site: vision` stages come before the language model's stages")
            if after.site == before.site and after.layer <= before.layer:
                raise ValueError(f"stage layers must increase: {before.layer} then {after.layer}")
            if before.ratio is not None and after.ratio is not None and after.ratio < before.ratio:
                raise ValueError(f"stage ratios cannot decrease: {before.ratio} then {after.ratio}")
        return stages

    @model_validator(mode="after")
    def _fill_shorthand_and_params(self) -> Self:
        reducer = strategy_class(self.strategy)
        try:
            params = reducer.Params.model_validate(self.params)
        except ValidationError as exc:
            problems = describe_errors(exc, known_fields=reducer.Params.model_fields)
            raise ValueError(f"params of strategy {self.strategy!r}: {problems}") from None
        object.__setattr__(self, "params", params.model_dump())
        own_schedule = reducer(params).removals(1) is not None
        if own_schedule and self.stages:
            raise ValueError(
                f"give either the params' own schedule of {self.strategy!r} (e.g. `r`) or a budget "
                "(`ratio`/`keep`/`stages`), not both"
            )
        if not self.stages and not own_schedule:
            raise ValueError("give a budget: `ratio` (fraction of visual tokens removed) or `keep`")
        if self.stages:
            first = self.stages[0]
            object.__setattr__(self, "layer", first.layer)
            object.__setattr__(self, "ratio", first.ratio)
            object.__setattr__(self, "keep", first.keep)
        return self

    def position_policy(self, stage: Stage) -> PositionPolicy:
        """The position policy of `stage`: its own, else the config's, else the strategy's default."""
        return stage.positions or self.positions or strategy_class(self.strategy).positions

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        try:
            strategy_class(name)
        except UnknownNameError as exc:  # a field error, with the known names; a broken plug-in's
            raise ValueError(str(exc)) from None  # PluginError passes through pydantic as it is
        return name


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a JSON (.json) or YAML (any other suffix) file holds: the one loader of config files.

    Raises ConfigError naming the file, and the line and column of a syntax error.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}, line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}{_yaml_place(exc)}: invalid YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: expected a mapping of fields, found {found}")
    return data


def _yaml_place(exc: yaml.YAMLError) -> str:
    """Where the YAML parser stopped, as `, line L, column C` (1-based), or "" if it does not say."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return "" if mark is None else f", line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's own words, without its position (already given) or a copy of the offending line."""
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    return ", ".join(p for p in parts if p) or str(exc).splitlines()[0]


def load_config(path: str | Path) -> ReductionConfig:
    """Read a ReductionConfig from a YAML or JSON file (`read_mapping`), alone or under `reduction:`.

    Every problem is a ConfigError naming the file (and the line and column of a syntax error),
    except a strategy plug-in that fails to load: a PluginError.
    """
    path = Path(path)
    data = read_mapping(path)
    data = data.get("reduction", data)
    try:
        return ReductionConfig.model_validate(data)
    except ValidationError as exc:
        fields = {*ReductionConfig.model_fields, *Stage.model_fields}
        problems = describe_errors(exc, known_fields=fields)
        raise ConfigError(f"{path}: invalid reduction config: {problems}") from exc
