"""The YAML schema of `tokenprune ablate`: model, dataset, generation, timing and the grid of cells.

`load_ablation_config(path)` reads and validates a file; every error is a `ConfigError` naming the
file and the field (or the line and column of a syntax error).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

import tokenprune as tp
from tokenprune.config import read_mapping
from tokenprune.errors import ConfigError, UnknownNameError, describe_errors
from tokenprune.lab.datasets import LMMS_EVAL_SOURCE
from tokenprune.lab.loading import DEFAULT_MAX_NEW_TOKENS, DType

MIN_DECODE_TOKENS = 32  # decode is timed over at least this many new tokens (one step is too short to time)


class ModelSpec(BaseModel):
    """Which model answers, on which device, and how a question becomes its prompt."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "builtin:toy-llava", description="builtin:toy-llava, a local checkpoint folder or a hub id"
    )
    dtype: DType = "float32"
    device: str = Field("cpu", description="cpu, cuda, cuda:1 ... (ignored with device_map)")
    device_map: str | dict[str, int | str] | None = Field(
        None, description="accelerate's placement for models larger than one GPU, e.g. auto"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    adapter: str | None = Field(None, description="tokenprune adapter; None: chosen from the model type")
    prompt: str | None = Field(
        None,
        description="template with {question}; <image> marks where the images go. "
        "None: the builtin model's own, or LLaVA-1.5's 'USER: <image>\\n{question} ASSISTANT:'",
    )

    @field_validator("prompt")
    @classmethod
    def _has_question(cls, prompt: str | None) -> str | None:
        """A template must place the question."""
        if prompt is not None and "{question}" not in prompt:
            raise ValueError("the prompt template needs a {question} field")
        return prompt


class DatasetSpec(BaseModel):
    """Which samples are asked: a builtin task, a JSONL file, a `datasets` folder or lmms-eval's tasks."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "builtin:toy-vqa",
        description="builtin:toy-vqa, a .jsonl file or a save_to_disk folder (relative to the config "
        f"file's folder), or {LMMS_EVAL_SOURCE} (its `tasks`)",
    )
    split: str = Field("test", description="split of a builtin task or of a DatasetDict folder")
    limit: int | None = Field(64, ge=1, description="the first `limit` samples; None: all (not for builtins)")
    seed: int = Field(0, description="seed of a generated builtin task")
    tasks: list[str] = Field(
        default_factory=list, description="lmms-eval tasks, with `source: lmms-eval` (`limit` per task)"
    )

    @model_validator(mode="after")
    def _tasks_with_lmms_eval(self) -> DatasetSpec:
        """lmms-eval's tasks are named with its source, and only with it."""
        if self.source == LMMS_EVAL_SOURCE and not self.tasks:
            raise ValueError(f"source {LMMS_EVAL_SOURCE} runs lmms-eval tasks: list them in `tasks`")
        if self.tasks and self.source != LMMS_EVAL_SOURCE:
            raise ValueError(f"`tasks` are lmms-eval's: give them with `source: {LMMS_EVAL_SOURCE}`")
        return self


class GenerationSpec(BaseModel):
    """Greedy generation of the answers."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(
        None, ge=1, description=f"None: the builtin model's answer length, else {DEFAULT_MAX_NEW_TOKENS}"
    )


class TimingSpec(BaseModel):
    """How the timing batch is timed: `repeats` paired, order-alternating rounds of cell and baseline.

    Each round times the baseline and the cell back to back (which one goes first alternates) and
    yields one ratio per measure; a row reports the median ratio and its interquartile range
    (`tokenprune.lab.timing`).
    """

    model_config = ConfigDict(extra="forbid")

    warmup: int = Field(1, ge=0, description="unrecorded rounds first")
    repeats: int = Field(5, ge=1, description="recorded rounds: the ratios' median and IQR")
    decode_tokens: int = Field(
        MIN_DECODE_TOKENS,
        ge=MIN_DECODE_TOKENS,
        description=f"new tokens generated to time decoding (at least {MIN_DECODE_TOKENS})",
    )
    batch_size: int | None = Field(None, ge=1, description="samples timed; None: the whole first batch")


class StrategySite(BaseModel):
    """Where one strategy's cells reduce, when not at the grid's decoder `layers`."""

    model_config = ConfigDict(extra="forbid")

    site: Literal["language", "vision"] = Field(
        "language", description="language: decoder layers; vision: vision-tower layers (per image)"
    )
    layers: list[int] | None = Field(
        None, min_length=1, description="None: the grid's `layers` (decoder layers: language sites only)"
    )

    @model_validator(mode="after")
    def _vision_layers_given(self) -> StrategySite:
        """Layers are indices; a vision site needs its own (tower layers are not decoder layers)."""
        if self.layers is not None and min(self.layers) < 0:
            raise ValueError(f"layers are layer indices (>= 0), got {self.layers}")
        if self.site == "vision" and self.layers is None:
            raise ValueError("a vision site counts layers in the vision tower: give its `layers`")
        return self


class ExtraCell(tp.ReductionConfig):
    """A cell outside the grid's product, written as any ReductionConfig.

    It remembers whether its params set `seed`: a cell that does not gets one cell per entry of
    the config's `seeds` (for strategies with a seed), as the product's cells do.
    """

    _sets_seed: bool = PrivateAttr(True)

    @model_validator(mode="wrap")
    @classmethod
    def _note_seed(cls, data: Any, handler: ModelWrapValidatorHandler[ExtraCell]) -> ExtraCell:
        """Validate as a ReductionConfig, noting whether the written params name a seed."""
        cell = handler(data)
        if isinstance(data, Mapping):
            cell._sets_seed = "seed" in (data.get("params") or {})
        return cell

    @property
    def sets_seed(self) -> bool:
        """Whether the config gave this cell's seed (else each of the config's `seeds` runs)."""
        return self._sets_seed


class GridSpec(BaseModel):
    """The cells: strategies x sites x layers x budgets x params (each param a list of values), plus `extra`.

    Budgets are `ratios` (fractions of visual tokens removed) and `keeps` (visual tokens kept per
    sample, the literature's 64 / 128 / 192 of 576); a grid with neither runs R = 0.5.
    """

    model_config = ConfigDict(extra="forbid")

    strategies: list[str] = Field(min_length=1)
    if_installed: list[str] = Field(
        default_factory=list, description="strategies run only when registered (skipped with a notice)"
    )
    layers: list[int] = Field([2], min_length=1)
    ratios: list[float] = Field(default_factory=list)
    keeps: list[int] = Field(default_factory=list, description="visual tokens kept per sample")
    sites: dict[str, Annotated[list[StrategySite], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="per strategy: its site and layers instead of `layers`; a list: cells at each site",
    )
    params: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="per strategy, per parameter: the values to try"
    )
    budget: Literal["sample", "per_frame"] = "sample"
    extra: list[ExtraCell] = Field(default_factory=list, description="cells outside the product")

    @field_validator("strategies")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        """Every strategy is registered (unknown names get a did-you-mean)."""
        for name in names:
            try:
                tp.strategy_class(name)
            except UnknownNameError as exc:  # a field error, with the known names; a broken plug-in's
                raise ValueError(str(exc)) from None  # PluginError passes through pydantic as it is
        return names

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[int]) -> list[int]:
        """Decoder layers are indices from 0."""
        if min(layers) < 0:
            raise ValueError(f"layers are decoder layer indices (>= 0), got {layers}")
        return layers

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        """Ratios are fractions removed, in [0, 1)."""
        if not all(0.0 <= r < 1.0 for r in ratios):
            raise ValueError(f"ratios are fractions of visual tokens removed, in [0, 1): got {ratios}")
        return ratios

    @field_validator("keeps")
    @classmethod
    def _keeps(cls, keeps: list[int]) -> list[int]:
        """Keeps are token counts."""
        if not all(k >= 0 for k in keeps):
            raise ValueError(f"keeps are counts of visual tokens kept per sample (>= 0): got {keeps}")
        return keeps

    @field_validator("params", mode="before")
    @classmethod
    def _listed(cls, params: Any) -> Any:
        """A single parameter value stands for a list of one."""
        if not isinstance(params, dict):
            return params
        return {
            name: {k: _as_list(v) for k, v in values.items()} if isinstance(values, dict) else values
            for name, values in params.items()
        }

    @field_validator("sites", mode="before")
    @classmethod
    def _site_lists(cls, sites: Any) -> Any:
        """A single site stands for a list of one."""
        if not isinstance(sites, dict):
            return sites
        return {name: _as_list(where) for name, where in sites.items()}

    @model_validator(mode="after")
    def _cells_valid(self) -> GridSpec:
        """Every product and extra cell validates as a ReductionConfig before anything runs."""
        if not self.ratios and not self.keeps:
            self.ratios = [0.5]
        for field in ("params", "sites"):
            for name in getattr(self, field):
                if name not in self.strategies and name not in self.if_installed:
                    raise ValueError(f"{field}.{name}: {name!r} is not one of the grid's strategies")
        for name in self.active_strategies():
            for stage, params in self.combinations(name):
                try:
                    reduction = tp.ReductionConfig(
                        strategy=name, stages=[stage], params=params, budget=self.budget
                    )
                except ValidationError as exc:
                    raise ValueError(f"params.{name}: {describe_errors(exc)}") from None
                _check_layer_zero(reduction, f"layers: {name} at layer 0")
        for number, reduction in enumerate(self.extra):
            _check_layer_zero(reduction, f"extra.{number}")
        return self

    def active_strategies(self) -> list[str]:
        """`strategies`, then those of `if_installed` that are registered in this process."""
        installed = set(tp.list_strategies())
        return [
            *self.strategies,
            *(n for n in self.if_installed if n in installed and n not in self.strategies),
        ]

    def missing(self) -> list[str]:
        """The `if_installed` strategies this process does not have."""
        return [name for name in self.if_installed if name not in tp.list_strategies()]

    def budgets(self) -> list[dict[str, float | int]]:
        """Each budget of the grid as Stage fields: `{"ratio": R}` then `{"keep": n}`."""
        return [{"ratio": r} for r in self.ratios] + [{"keep": k} for k in self.keeps]

    def sites_of(self, strategy: str) -> list[StrategySite]:
        """Where the product cells of `strategy` reduce: its `sites`, else the decoder `layers`."""
        return self.sites.get(strategy, [StrategySite()])

    def combinations(self, strategy: str) -> Iterator[tuple[tp.Stage, dict[str, Any]]]:
        """(stage, params) of every product cell of `strategy`: per site, layer, budget and params."""
        places = [
            (where.site, layer) for where in self.sites_of(strategy) for layer in where.layers or self.layers
        ]
        grid = self.params.get(strategy, {})
        for (site, layer), budget, values in itertools.product(
            places, self.budgets(), itertools.product(*grid.values())
        ):
            yield tp.Stage(layer=layer, site=site, **budget), dict(zip(grid, values, strict=True))

    def named_layers(self, site: Literal["language", "vision"]) -> dict[str, set[int]]:
        """The layers of `site` each field of the grid names (`grid.layers`, `grid.sites.<name>.<i>.layers`,
        `grid.extra`), for checks against the model's depth that name the field to fix."""
        named: dict[str, set[int]] = {}
        for name in self.active_strategies():
            for number, where in enumerate(self.sites_of(name)):
                if where.site == site:
                    field = "grid.layers" if where.layers is None else f"grid.sites.{name}.{number}.layers"
                    named.setdefault(field, set()).update(where.layers or self.layers)
        extra = {stage.layer for cell in self.extra for stage in cell.stages if stage.site == site}
        return named | ({"grid.extra": extra} if extra else {})


def _as_list(value: Any) -> list[Any]:
    """A list as it is; any other value as a list of one."""
    return value if isinstance(value, list) else [value]


def _check_layer_zero(reduction: tp.ReductionConfig, where: str) -> None:
    """Refuse an attention-ranked strategy at decoder layer 0, where no layer has produced attention."""
    requires = tp.strategy_class(reduction.strategy).requires
    at_zero = any(stage.layer == 0 and stage.site == "language" for stage in reduction.stages)
    if "attention" in requires and at_zero:
        raise ValueError(
            f"{where}: strategy {reduction.strategy!r} ranks tokens by attention, which needs a decoder "
            "layer before the site: use layers >= 1 for it (layer-0 cells of other strategies go in `extra`)"
        )


class AblationConfig(BaseModel):
    """Everything `tokenprune ablate` reads from its YAML file."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="run folder under `output`; None: the config file's name")
    output: str = Field("runs", description="folder of the run folders (relative to the working directory)")
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    batch_size: int = Field(16, ge=1)
    seeds: list[int] = Field(
        [0], min_length=1, description="one cell per seed for strategies with a seed (unless a cell sets it)"
    )
    timing: TimingSpec = Field(default_factory=TimingSpec)
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's default")
    grid: GridSpec

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        """The run name is a plain folder name."""
        if name is not None and (not name or "/" in name or name.startswith(".")):
            raise ValueError(f"the run name is a folder name (no '/', not hidden): got {name!r}")
        return name


def load_ablation_config(path: str | Path) -> AblationConfig:
    """Read and validate an ablation YAML file; errors name the file and the field."""
    path = Path(path)
    try:
        config = AblationConfig.model_validate(read_mapping(path))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc)}") from None
    if config.name is None:
        config.name = path.stem
    return config
