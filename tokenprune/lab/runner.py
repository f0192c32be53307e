"""`tokenprune ablate CONFIG`: a grid of reductions on one model and one VQA dataset, a row per cell.

The YAML file (`AblationConfig`) names the model, the dataset, the generation settings and a grid
(strategies x layers x ratios x strategy params, plus explicit extra cells); the unreduced
baseline is always the grid's first cell. For each cell, on every sample:

- accuracy: the greedy answer against the sample's answers, after `normalize_answer`: exact match,
  and contains-match (an answer appears in it as whole words);
- fidelity against the unreduced model on the same inputs: first-token top-1 agreement, KL of the
  first-token distribution (unreduced || reduced), exact match of the greedy continuation;
- prefill FLOPs per sample (`trace_flops`: the model's own shapes, the token counts of the trace);

and on the first batch, interleaved with the baseline (warm-up rounds first, medians of repeats):
prefill time, decode time per token, peak memory (CUDA only), KV-cache bytes after the prefill
and the time spent in the strategy's `select`.

Rows go to `runs/<name>/results.jsonl` (`tokenprune.lab.results`): a killed run loses at most the cell
in flight and the same command resumes it. `tokenprune.lab.report` turns the rows into tables and plots.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
import transformers
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.builtin.models import load_builtin_model
from tokenprune.builtin.toyvqa import normalize_answer
from tokenprune.errors import ConfigError, TokenPruneError, describe_errors
from tokenprune.flops import trace_flops
from tokenprune.lab.datasets import BUILTIN_PREFIX, Sample, load_samples
from tokenprune.lab.report import SAMPLE_IMAGE
from tokenprune.lab.results import ResultStore

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's conversation format
DEFAULT_MAX_NEW_TOKENS = 16
IMAGE_MARK = "<image>"

# -- the configuration ------------------------------------------------------------------------------


class ModelSpec(BaseModel):
    """Which model answers, on which device, and how a question becomes its prompt."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "builtin:toy-llava", description="builtin:toy-llava, a local checkpoint folder or a hub id"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
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
        if prompt is not None and "{question}" not in prompt:
            raise ValueError("the prompt template needs a {question} field")
        return prompt


class DatasetSpec(BaseModel):
    """Which samples are asked: a builtin task, a JSONL file or a `datasets` folder, and how many."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "builtin:toy-vqa", description="builtin:toy-vqa, a .jsonl file or a save_to_disk folder"
    )
    split: str = Field("test", description="split of a builtin task or of a DatasetDict folder")
    limit: int | None = Field(64, ge=1, description="the first `limit` samples; None: all (not for builtins)")
    seed: int = Field(0, description="seed of a generated builtin task")


class GenerationSpec(BaseModel):
    """Greedy generation of the answers."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(
        None, ge=1, description=f"None: the builtin model's answer length, else {DEFAULT_MAX_NEW_TOKENS}"
    )


class TimingSpec(BaseModel):
    """How the first batch is timed: warm-up rounds, then medians of `repeats` interleaved rounds."""

    model_config = ConfigDict(extra="forbid")

    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)
    decode_tokens: int = Field(8, ge=2, description="tokens generated to time decoding")
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
        if self.layers is not None and min(self.layers) < 0:
            raise ValueError(f"layers are layer indices (>= 0), got {self.layers}")
        if self.site == "vision" and self.layers is None:
            raise ValueError("a vision site counts layers in the vision tower: give its `layers`")
        return self


class GridSpec(BaseModel):
    """The cells: strategies x layers x budgets x params (each param a list of values), plus `extra`.

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
    sites: dict[str, StrategySite] = Field(
        default_factory=dict, description="per strategy: its site and layers, instead of `layers`"
    )
    params: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="per strategy, per parameter: the values to try"
    )
    budget: Literal["sample", "per_frame"] = "sample"
    extra: list[tp.ReductionConfig] = Field(default_factory=list, description="cells outside the product")

    @field_validator("strategies")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                tp.strategy_class(name)
            except TokenPruneError as exc:
                raise ValueError(str(exc)) from None
        return names

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[int]) -> list[int]:
        if min(layers) < 0:
            raise ValueError(f"layers are decoder layer indices (>= 0), got {layers}")
        return layers

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        if not all(0.0 <= r < 1.0 for r in ratios):
            raise ValueError(f"ratios are fractions of visual tokens removed, in [0, 1): got {ratios}")
        return ratios

    @field_validator("keeps")
    @classmethod
    def _keeps(cls, keeps: list[int]) -> list[int]:
        if not all(k >= 0 for k in keeps):
            raise ValueError(f"keeps are counts of visual tokens kept per sample (>= 0): got {keeps}")
        return keeps

    @field_validator("params", mode="before")
    @classmethod
    def _listed(cls, params: Any) -> Any:
        if not isinstance(params, dict):
            return params
        return {
            name: {k: v if isinstance(v, list) else [v] for k, v in values.items()}
            if isinstance(values, dict)
            else values
            for name, values in params.items()
        }

    @model_validator(mode="after")
    def _cells_valid(self) -> GridSpec:
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

    def combinations(self, strategy: str) -> Iterator[tuple[tp.Stage, dict[str, Any]]]:
        """(stage, params) of every product cell of `strategy`."""
        where = self.sites.get(strategy, StrategySite())
        grid = self.params.get(strategy, {})
        for layer, budget, values in itertools.product(
            where.layers or self.layers, self.budgets(), itertools.product(*grid.values())
        ):
            stage = tp.Stage(layer=layer, site=where.site, **budget)
            yield stage, dict(zip(grid, values, strict=True))


def _check_layer_zero(reduction: tp.ReductionConfig, where: str) -> None:
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
    seeds: list[int] = Field([0], min_length=1, description="one cell per seed for strategies with a seed")
    timing: TimingSpec = Field(default_factory=TimingSpec)
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's default")
    grid: GridSpec

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        if name is not None and (not name or "/" in name or name.startswith(".")):
            raise ValueError(f"the run name is a folder name (no '/', not hidden): got {name!r}")
        return name


def load_ablation_config(path: str | Path) -> AblationConfig:
    """Read and validate an ablation YAML file; errors name the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read ablation config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    try:
        config = AblationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc)}") from None
    if config.name is None:
        config.name = path.stem
    return config


# -- the grid ---------------------------------------------------------------------------------------


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


# -- model, data and batches ------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model ready to answer: its processor, prompt template and answer length."""

    model: nn.Module
    processor: Any
    prompt: str
    max_new_tokens: int
    adapter: tp.Adapter


def load_model(spec: ModelSpec, generation: GenerationSpec) -> Loaded:
    """A builtin model, or a checkpoint through `from_pretrained` (device_map through accelerate)."""
    if spec.source.startswith(BUILTIN_PREFIX):
        builtin = load_builtin_model(spec.source, spec.attn_implementation)
        model = builtin.model.to(spec.device, DTYPES[spec.dtype])
        processor, prompt, answer_length = builtin.processor, builtin.prompt, builtin.max_new_tokens
    else:
        model, processor = _from_pretrained(spec)
        prompt, answer_length = DEFAULT_PROMPT, DEFAULT_MAX_NEW_TOKENS
    return Loaded(
        model.eval(),
        processor,
        spec.prompt or prompt,
        generation.max_new_tokens or answer_length,
        tp.adapter_for(model, spec.adapter),
    )


def _from_pretrained(spec: ModelSpec) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if spec.source.startswith(("/", ".", "~")) and not Path(spec.source).expanduser().is_dir():
        raise ConfigError(f"model.source {spec.source!r}: no such checkpoint folder")
    extra: dict[str, Any] = {}
    if spec.device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ConfigError(
                "model.device_map needs the `accelerate` package: pip install accelerate"
            ) from None
        extra["device_map"] = spec.device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            spec.source, dtype=DTYPES[spec.dtype], attn_implementation=spec.attn_implementation, **extra
        )
        processor = AutoProcessor.from_pretrained(spec.source)
    except (OSError, ValueError) as exc:  # not found, not a checkpoint, no processor saved
        raise ConfigError(
            f"model.source {spec.source!r}: cannot load it with from_pretrained: {exc}"
        ) from exc
    return (model if spec.device_map is not None else model.to(spec.device)), processor


@dataclass
class Batch:
    """Processor outputs of a few samples (left-padded), their answers and real token counts."""

    inputs: dict[str, Tensor]
    answers: list[list[str]]
    tokens: list[int]


def make_batches(loaded: Loaded, samples: Sequence[Sample], batch_size: int) -> list[Batch]:
    """The samples as model inputs, `batch_size` at a time, on the model's (first) device."""
    device = next(loaded.model.parameters()).device
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs = loaded.processor(
            images=[image for s in chunk for image in s.images],
            text=[_prompt(loaded, s) for s in chunk],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        inputs = {k: v.to(device) for k, v in inputs.items()}
        tokens = inputs["attention_mask"].sum(dim=1).tolist()
        batches.append(Batch(inputs, [s.answers for s in chunk], tokens))
    return batches


def _prompt(loaded: Loaded, sample: Sample) -> str:
    """The template with the question, and one image token per image of the sample where `<image>` is.

    The processor's own image token (Qwen2-VL's `<|image_pad|>`) marks the place as well as `<image>`;
    a template with neither gets `<image>\\n` in front.
    """
    image_token = getattr(loaded.processor, "image_token", None) or IMAGE_MARK
    text = loaded.prompt.format(question=sample.question)
    mark = IMAGE_MARK if IMAGE_MARK in text or image_token not in text else image_token
    if mark not in text:
        text = f"{mark}\n{text}"
    return text.replace(mark, image_token * len(sample.images), 1)


# -- measuring a cell -------------------------------------------------------------------------------


@dataclass
class Outputs:
    """What the model produced on every sample under one cell (per-sample lists, in dataset order)."""

    logprobs: Tensor  # [N, V] float32 log-softmax of the first generated token's logits
    continuations: list[list[int]]
    predictions: list[str]
    flops: list[int]
    visual_before: list[int]
    visual_after: list[int]
    survival: dict[str, Any] | None


@torch.no_grad()
def evaluate(loaded: Loaded, batches: Sequence[Batch], reduction: tp.ReductionConfig | None) -> Outputs:
    """Greedy answers to every batch with `reduction` attached, and what each sample cost."""
    parts: list[Outputs] = []
    for number, batch in enumerate(batches):
        handle = (
            None if reduction is None else tp.attach(loaded.model, reduction, adapter=loaded.adapter.name)
        )
        try:
            out = loaded.model.generate(
                **batch.inputs,
                max_new_tokens=loaded.max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            trace = [] if handle is None else handle.trace
        finally:
            if handle is not None:
                handle.detach()
        parts.append(_batch_outputs(loaded, batch, out, trace, survival=number == 0 and handle is not None))
    return _concat(parts)


def _batch_outputs(loaded: Loaded, batch: Batch, out: Any, trace: list, survival: bool) -> Outputs:
    new = out.sequences[:, batch.inputs["input_ids"].shape[1] :]
    n_visual = [] if trace else _visual_counts(loaded.adapter, batch.inputs)
    return Outputs(
        logprobs=torch.log_softmax(out.logits[0].float(), dim=-1).cpu(),
        continuations=[_until_end(row, _end_ids(loaded.model)) for row in new.tolist()],
        predictions=loaded.processor.batch_decode(new, skip_special_tokens=True),
        flops=trace_flops(loaded.adapter.text_config(), trace, batch.tokens),
        visual_before=trace[0].visual_before if trace else n_visual,
        visual_after=trace[-1].visual_after if trace else n_visual,
        survival=survival_map(loaded.adapter, batch.inputs, trace) if survival else None,
    )


def _visual_counts(adapter: tp.Adapter, inputs: dict[str, Tensor]) -> list[int]:
    """Visual tokens per sample as the adapter lays them out (the candidates a reduction sees).

    Whatever the placeholder ids (images, videos) and whichever tokens are not candidates (LLaVA-NeXT's
    row newlines), the unreduced count is the one a reduced cell's trace starts from.
    """
    layout = adapter.visual_layout(inputs)
    if layout is None:
        return [0] * inputs["input_ids"].shape[0]
    return layout.visual.sum(dim=1).tolist()


def _end_ids(model: nn.Module) -> set[int]:
    config = model.generation_config
    ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    return {i for i in [*ids, config.pad_token_id] if i is not None}


def _until_end(tokens: list[int], end: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in end:
            return tokens[:i]
    return tokens


def _concat(parts: list[Outputs]) -> Outputs:
    return Outputs(
        logprobs=torch.cat([p.logprobs for p in parts]),
        continuations=[c for p in parts for c in p.continuations],
        predictions=[x for p in parts for x in p.predictions],
        flops=[x for p in parts for x in p.flops],
        visual_before=[x for p in parts for x in p.visual_before],
        visual_after=[x for p in parts for x in p.visual_after],
        survival=parts[0].survival,
    )


def survival_map(adapter: tp.Adapter, inputs: dict[str, Tensor], trace: list) -> dict[str, Any] | None:
    """The first image (first frame) of the first sample as a grid: per cell, where its token ended.

    `state[row * W + col]`: -1 when pruned; else the grid index of the token it survives in (itself
    when kept alone; a merge group's surviving token when the event has `groups`).
    """
    layout = adapter.visual_layout(inputs)
    if layout is None or not trace:
        return None
    first = (layout.segment[0] == 0) & (layout.coords[0, :, 0] == 0)
    positions = first.nonzero().flatten().tolist()
    if not positions:
        return None
    _, height, width = layout.extent[0, positions[0]].tolist()
    coords = layout.coords[0, positions].tolist()
    cell_of = {p: row * width + col for p, (_, row, col) in zip(positions, coords, strict=True)}
    event = trace[-1]
    if event.groups is not None:
        target = dict(zip(positions, event.groups[0, positions].tolist(), strict=True))
    else:
        kept = set(event.kept[0].tolist())
        target = {p: p if p in kept else -1 for p in positions}
    state = [-1] * (height * width)
    for p, cell in cell_of.items():
        state[cell] = cell_of.get(target[p], -1)
    return {"grid": [height, width], "state": state}


def accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and contains-match (an answer's words appear together) after `normalize_answer`."""
    exact = contains = 0
    for prediction, accepted in zip(predictions, answers, strict=True):
        said = normalize_answer(prediction)
        wanted = {normalize_answer(a) for a in accepted}
        exact += said in wanted
        contains += any(f" {w} " in f" {said} " for w in wanted if w)
    return {"accuracy_exact": exact / len(answers), "accuracy_contains": contains / len(answers)}


def fidelity(outputs: Outputs, reference: Outputs) -> dict[str, float]:
    """Agreement with the unreduced model: first-token top-1, first-token KL(ref || cell), continuation."""
    top1 = outputs.logprobs.argmax(dim=-1) == reference.logprobs.argmax(dim=-1)
    kl = torch.nn.functional.kl_div(outputs.logprobs, reference.logprobs, log_target=True, reduction="none")
    same = [a == b for a, b in zip(outputs.continuations, reference.continuations, strict=True)]
    return {
        "top1_agreement": top1.float().mean().item(),
        "first_token_kl": kl.sum(dim=-1).mean().item(),
        "continuation_match": sum(same) / len(same),
    }


# -- timing -----------------------------------------------------------------------------------------


def _sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


@dataclass
class Timing:
    """Medians of one configuration on the timing batch."""

    prefill_s: float
    decode_s_per_token: float
    overhead_s: float | None
    kv_cache_bytes: int
    peak_memory_bytes: int | None


@torch.no_grad()
def time_cells(
    loaded: Loaded, batch: Batch, reduction: tp.ReductionConfig | None, spec: TimingSpec
) -> tuple[Timing, Timing]:
    """(baseline, cell) timings, measured interleaved round by round so a noisy machine hits both alike."""
    configs = [None] if reduction is None else [None, reduction]
    rounds: dict[int, list[tuple[float, float, float | None]]] = {i: [] for i in range(len(configs))}
    memory: dict[int, tuple[int, int | None]] = {}
    for repeat in range(spec.warmup + spec.repeats):
        for i, config in enumerate(configs):
            measured, memory[i] = _one_round(loaded, batch, config, spec.decode_tokens)
            if repeat >= spec.warmup:
                rounds[i].append(measured)
    timings = [_medians(rounds[i], *memory[i], spec.decode_tokens) for i in range(len(configs))]
    return timings[0], timings[-1]


def _one_round(
    loaded: Loaded, batch: Batch, reduction: tp.ReductionConfig | None, tokens: int
) -> tuple[tuple[float, float, float | None], tuple[int, int | None]]:
    """One prefill and one generation of `tokens` tokens: times, select time, KV bytes, peak memory."""
    model = loaded.model
    device = next(model.parameters()).device
    sync = _sync_for(device)
    handle = None if reduction is None else tp.attach(model, reduction, adapter=loaded.adapter.name)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill, out = _timed(lambda: model(**batch.inputs, use_cache=True), sync)
        kv_bytes = cache_bytes(out.cache) // len(batch.tokens)
        del out
        generate, _ = _timed(
            lambda: model.generate(
                **batch.inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            ),
            sync,
        )
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        overhead = None if handle is None else _selection_seconds(model, batch, handle, sync)
    finally:
        if handle is not None:
            handle.detach()
    return (prefill, generate, overhead), (kv_bytes, peak)


def _selection_seconds(model: nn.Module, batch: Batch, handle: tp.Handle, sync: Callable[[], None]) -> float:
    """The strategy's own time in one more prefill, apart from the timed one (its syncs would slow it)."""
    with handle.time_selections(sync) as timer:
        model(**batch.inputs, use_cache=True)
    return timer.seconds


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def _medians(
    rounds: list[tuple[float, float, float | None]], kv_bytes: int, peak: int | None, tokens: int
) -> Timing:
    prefill = statistics.median(r[0] for r in rounds)
    generate = statistics.median(r[1] for r in rounds)
    overheads = [r[2] for r in rounds if r[2] is not None]
    return Timing(
        prefill_s=prefill,
        decode_s_per_token=max(generate - prefill, 0.0) / (tokens - 1),
        overhead_s=statistics.median(overheads) if overheads else None,
        kv_cache_bytes=kv_bytes,
        peak_memory_bytes=peak,
    )


def cache_bytes(cache: Any) -> int:
    """Bytes held by a KV cache's tensors (transformers' `Cache` layers, or legacy tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [
            t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        ]
    else:
        tensors = [t for pair in cache for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything the cells share: the loaded model, the batches, and the unreduced reference outputs."""

    config: AblationConfig
    config_file: Path
    loaded: Loaded
    batches: list[Batch]
    timed: Batch  # the first samples, timed
    reference: Outputs

    @classmethod
    def open(cls, config: AblationConfig, config_file: Path) -> Bench:
        loaded = load_model(config.model, config.generation)
        _check_layers(config, config_file, loaded)
        samples = load_samples(
            config.dataset.source, config.dataset.split, config.dataset.limit, config.dataset.seed
        )
        batches = make_batches(loaded, samples, config.batch_size)
        timed = make_batches(loaded, samples[: config.timing.batch_size or config.batch_size], len(samples))[
            0
        ]
        return cls(config, config_file, loaded, batches, timed, evaluate(loaded, batches, None))

    def measure(self, cell: Cell) -> dict[str, Any]:
        """The results row of one cell."""
        start = time.perf_counter()
        torch.manual_seed(cell.seed)
        outputs = (
            self.reference if cell.reduction is None else evaluate(self.loaded, self.batches, cell.reduction)
        )
        base, timing = time_cells(self.loaded, self.timed, cell.reduction, self.config.timing)
        answers = [a for batch in self.batches for a in batch.answers]
        return {
            **_identity(cell),
            "run": self.config.name,
            "config_file": str(self.config_file),
            "samples": len(answers),
            **accuracy(outputs.predictions, answers),
            **fidelity(outputs, self.reference),
            **_costs(outputs, self.reference),
            **_timing_fields(timing, base),
            "survival": outputs.survival,
            "environment": environment(self.loaded.model),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - start,
        }

    def save_sample_image(self, folder: Path) -> None:
        """The first image of the dataset as the model sees it (the survival maps' background)."""
        image = model_view(self.loaded.processor, self.batches[0].inputs)
        if image is not None:
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{SAMPLE_IMAGE}.{os.getpid()}.partial"  # shards may write it at once
            image.save(partial, format="PNG")
            partial.replace(folder / SAMPLE_IMAGE)


def _check_layers(config: AblationConfig, config_file: Path, loaded: Loaded) -> None:
    """Refuse decoder layers the model does not have, before any cell runs (vision layers: at attach)."""
    depth = len(loaded.adapter.decoder_layers())
    grid = config.grid
    fields: dict[str, set[int]] = {}
    for name in grid.active_strategies():
        where = grid.sites.get(name, StrategySite())
        if where.site == "language":
            field = "grid.layers" if where.layers is None else f"grid.sites.{name}.layers"
            fields.setdefault(field, set()).update(where.layers or grid.layers)
    fields["grid.extra"] = {
        stage.layer for reduction in grid.extra for stage in reduction.stages if stage.site == "language"
    }
    for field, layers in fields.items():
        too_deep = sorted(layer for layer in layers if layer >= depth)
        if too_deep:
            raise ConfigError(
                f"{config_file}: {field}: layer(s) {too_deep} past the model's last decoder layer "
                f"({depth} layers: 0..{depth - 1})"
            )


def _identity(cell: Cell) -> dict[str, Any]:
    reduction = cell.reduction
    stage = None if reduction is None else reduction.stages[0]
    return {
        "key": cell.key,
        "index": cell.index,
        "label": cell.label,
        "strategy": "baseline" if reduction is None else reduction.strategy,
        "layer": None if stage is None else stage.layer,
        "site": None if stage is None else stage.site,
        "ratio": 0.0 if stage is None else stage.ratio,
        "keep": None if stage is None else stage.keep,
        "params": {} if reduction is None else reduction.params,
        "seed": cell.seed,
        "cell": cell.config(),
    }


def _costs(outputs: Outputs, reference: Outputs) -> dict[str, float]:
    flops, base = statistics.mean(outputs.flops), statistics.mean(reference.flops)
    return {
        "visual_tokens_before": statistics.mean(outputs.visual_before),
        "visual_tokens_after": statistics.mean(outputs.visual_after),
        "prefill_flops": flops,
        "baseline_prefill_flops": base,
        "flops_ratio": flops / base,
    }


def _timing_fields(timing: Timing, base: Timing) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("prefill_s", "decode_s_per_token", "kv_cache_bytes", "peak_memory_bytes"):
        fields[name], fields[f"baseline_{name}"] = getattr(timing, name), getattr(base, name)
    fields["overhead_s"] = timing.overhead_s
    fields["prefill_speedup"] = base.prefill_s / timing.prefill_s
    fields["decode_speedup"] = (
        base.decode_s_per_token / timing.decode_s_per_token if timing.decode_s_per_token else None
    )
    return fields


def environment(model: nn.Module) -> dict[str, Any]:
    """Library versions and the device a row was measured on."""
    device = next(model.parameters()).device
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    return {
        "tokenprune": tp.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
    }


def model_view(processor: Any, inputs: dict[str, Tensor]) -> Image.Image | None:
    """The first image of a batch as the vision tower sees it: pixel values, un-normalised.

    Pixels [images, C, H, W] or [images, tiles, C, H, W]: the first (tile). Flattened patch rows with
    their grids (Qwen2-VL's processors): the first image put back together. Else None (the survival
    maps are then drawn on a plain background).
    """
    pixels = inputs.get("pixel_values")
    image_processor = getattr(processor, "image_processor", None)
    if pixels is None:
        return None
    if pixels.ndim in (4, 5):
        first = pixels.reshape(-1, *pixels.shape[-3:])[0].float().cpu()
    elif pixels.ndim == 2:
        unflattened = _unpatchify(pixels, inputs.get("image_grid_thw"), image_processor)
        if unflattened is None:
            return None
        first = unflattened.float().cpu()
    else:
        return None
    mean = torch.tensor(getattr(image_processor, "image_mean", None) or [0.0, 0.0, 0.0])
    std = torch.tensor(getattr(image_processor, "image_std", None) or [1.0, 1.0, 1.0])
    rgb = (first * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def _unpatchify(rows: Tensor, grids: Tensor | None, image_processor: Any) -> Tensor | None:
    """[C, H, W] of the first image of flattened patch rows [sum(t * h * w), C * T * p * p].

    The layout of Qwen2-VL's image processors: per image, blocks of `merge x merge` patches in
    row-major order, the patches of a block in row-major order, each row (channel, time, y, x) with
    the image copied over the `T` time steps. None without the grids or the processor's sizes.
    """
    names = ("patch_size", "merge_size", "temporal_patch_size")
    sizes = [getattr(image_processor, name, None) for name in names]
    if grids is None or not all(isinstance(size, int) for size in sizes):
        return None
    patch, merge, temporal = sizes
    _, height, width = (int(x) for x in grids[0])
    channels = rows.shape[-1] // (temporal * patch * patch)
    if height % merge or width % merge or channels * temporal * patch * patch != rows.shape[-1]:
        return None
    blocks = rows[: height * width].reshape(
        height // merge, width // merge, merge, merge, channels, temporal, patch, patch
    )[..., 0, :, :]  # [H/m, W/m, m, m, C, p, p], first time step
    return blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, height * patch, width * patch)


# -- the command ------------------------------------------------------------------------------------


class Progress:
    """One stderr line per cell: `[i/n] label  elapsed  ETA` (the ETA from this run's mean cell time)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.started = time.perf_counter()
        self.done = 0

    def start(self, cell: Cell) -> None:
        elapsed = time.perf_counter() - self.started
        eta = "?" if not self.done else _clock(elapsed / self.done * (self.total - self.done))
        print(
            f"[{self.done + 1}/{self.total}] {cell.label}  elapsed {_clock(elapsed)}  ETA {eta}",
            file=self.stream,
            flush=True,
        )

    def finish(self) -> None:
        self.done += 1


def _clock(seconds: float) -> str:
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}:{secs:02d}"


def run_folder(config: AblationConfig, output: str | Path | None = None) -> Path:
    """`<output>/<name>`: where a run's results, tables and figures go."""
    return Path(output or config.output) / str(config.name)


def describe(cells: Sequence[Cell], finished: set[str]) -> str:
    """The `--dry-run` listing: index, key, state and label of each cell."""
    lines = [f"{len(cells)} cells ({sum(c.key in finished for c in cells)} finished)"]
    for cell in cells:
        state = "done" if cell.key in finished else "todo"
        lines.append(f"{cell.index:>4}  {cell.key}  {state}  {cell.label}")
    return "\n".join(lines)


def run_ablation(
    config_file: str | Path,
    shard: tuple[int, int] | None = None,
    dry_run: bool = False,
    output: str | Path | None = None,
    threads: int | None = None,
    stream: TextIO | None = None,
) -> Path:
    """Run (or resume) the unfinished cells of a shard, progress on `stream` (stderr); returns the folder."""
    stream = stream or sys.stderr
    config_file = Path(config_file)
    config = load_ablation_config(config_file)
    cells = shard_cells(expand_grid(config), shard)
    folder = run_folder(config, output)
    store = ResultStore(folder, shard)
    finished = store.finished()
    for name in config.grid.missing():
        print(f"skipping strategy {name!r}: not installed (grid.if_installed)", file=stream)
    if dry_run:
        print(describe(cells, finished), file=sys.stdout)
        return folder
    todo = [cell for cell in cells if cell.key not in finished]
    print(f"{folder}: {len(cells)} cells, {len(cells) - len(todo)} already finished", file=stream)
    if not todo:
        return folder
    with torch_threads(threads or config.threads):
        _run_cells(Bench.open(config, config_file), folder, store, todo, stream)
    return folder


def _run_cells(bench: Bench, folder: Path, store: ResultStore, todo: list[Cell], stream: TextIO) -> None:
    """Measure and record each cell in turn; failed cells are reported, not recorded."""
    bench.save_sample_image(folder)
    progress = Progress(len(todo), stream)
    failed = []
    for cell in todo:
        progress.start(cell)
        try:
            store.append(bench.measure(cell))
        except TokenPruneError as exc:  # a cell this model or strategy cannot run: the others still can
            print(f"cell {cell.index} ({cell.label}) failed: {exc}", file=stream)
            failed.append(cell.label)
        progress.finish()
    if failed:
        raise TokenPruneError(f"{len(failed)} cell(s) failed and were not recorded: {', '.join(failed)}")


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with `count` torch CPU threads (None: as they are), restored afterwards."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
