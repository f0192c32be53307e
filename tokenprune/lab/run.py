"""`tokenprune run CONFIG`: one reduction on one model, measured against the unreduced model.

Prints the tokens kept, the language model's prefill FLOPs from its own shapes, and prefill and
decode times with and without the reduction, measured interleaved in one process (medians after
a warm-up), so the ratios hold on a busy machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

import tokenprune as tp
from tokenprune.errors import ConfigError, describe_errors
from tokenprune.flops import trace_flops
from tokenprune.testing.models import ToySize, toy_llava

BUILTIN_MODELS: dict[str, Callable[[str], nn.Module]] = {
    "builtin:tiny-llava": lambda attn: toy_llava(
        ToySize(
            hidden=256,
            layers=8,
            heads=8,
            kv_heads=4,
            intermediate=704,
            grid=24,
            patch=14,
            vocab=1000,
            vision_hidden=64,
            vision_layers=2,
        ),
        attn_implementation=attn,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RunConfig(BaseModel):
    """What `tokenprune run` loads, feeds and measures."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("builtin:tiny-llava", description="a builtin name or a local LLaVA checkpoint folder")
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    reduction: tp.ReductionConfig
    text_tokens: int = Field(40, ge=1, description="prompt tokens around the images")
    images: int = Field(1, ge=0, description="images per sample")
    batch_size: int = Field(1, ge=1)
    max_new_tokens: int = Field(16, ge=2)
    repeats: int = Field(5, ge=1)
    seed: int = 0


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        return RunConfig.model_validate(yaml.safe_load(path.read_text()))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc)}") from exc


def load_model(config: RunConfig) -> nn.Module:
    """A builtin model (seeded random weights) or a local checkpoint through `from_pretrained`."""
    if config.model.startswith("builtin:"):
        if config.model not in BUILTIN_MODELS:
            raise ConfigError(f"unknown builtin model {config.model!r}; known: {', '.join(BUILTIN_MODELS)}")
        model = BUILTIN_MODELS[config.model](config.attn_implementation)
    else:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            config.model, attn_implementation=config.attn_implementation
        )
    return model.to(config.device, DTYPES[config.dtype]).eval()


def synthetic_inputs(model: nn.Module, config: RunConfig) -> dict[str, torch.Tensor]:
    """A batch of prompts with `images` images each: placeholders and random pixels of the model's size."""
    vision = model.config.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2
    gen = torch.Generator().manual_seed(config.seed)
    vocab = model.config.text_config.vocab_size
    rows = []
    for _ in range(config.batch_size):
        text = torch.randint(10, vocab, (config.text_tokens,), generator=gen)
        head, tail = text[: config.text_tokens // 2], text[config.text_tokens // 2 :]
        image_ids = torch.full((per_image * config.images,), model.config.image_token_id)
        rows.append(torch.cat([head, image_ids, tail]))
    inputs = {
        "input_ids": torch.stack(rows),
        "attention_mask": torch.ones(len(rows), len(rows[0]), dtype=torch.long),
    }
    if config.images:
        size = (config.batch_size * config.images, 3, vision.image_size, vision.image_size)
        inputs["pixel_values"] = torch.randn(*size, generator=gen)
    return {k: v.to(config.device) for k, v in inputs.items()}


def _timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def measure(model: nn.Module, config: RunConfig) -> dict[str, object]:
    """Interleaved medians of prefill and decode time, unreduced vs reduced, plus tokens and FLOPs."""
    inputs = synthetic_inputs(model, config)
    generate = {
        "max_new_tokens": config.max_new_tokens,
        "min_new_tokens": config.max_new_tokens,
        "do_sample": False,
    }
    samples: dict[str, list[float]] = {
        k: [] for k in ("prefill", "prefill_reduced", "generate", "generate_reduced")
    }
    trace = []
    for repeat in range(config.repeats + 1):  # the first round warms up and is not counted
        for reduced in (False, True):
            handle = tp.attach(model, config.reduction) if reduced else None
            suffix = "_reduced" if reduced else ""
            prefill = _timed(lambda: model(**inputs, use_cache=True), config.device)
            total = _timed(lambda: model.generate(**inputs, **generate), config.device)
            if handle is not None:
                trace = handle.trace
                handle.detach()
            if repeat:
                samples["prefill" + suffix].append(prefill)
                samples["generate" + suffix].append(total)
    med = {k: statistics.median(v) for k, v in samples.items()}
    steps = config.max_new_tokens - 1
    text_config = model.config.text_config
    n_tokens = inputs["input_ids"].shape[1]
    return {
        "trace": trace,
        "tokens": n_tokens,
        "flops": (
            sum(trace_flops(text_config, [], [n_tokens] * config.batch_size)),
            sum(trace_flops(text_config, trace, n_tokens)),
        ),
        "prefill": (med["prefill"], med["prefill_reduced"]),
        "decode": (
            (med["generate"] - med["prefill"]) / steps,
            (med["generate_reduced"] - med["prefill_reduced"]) / steps,
        ),
    }


def report(model: nn.Module, config: RunConfig, result: dict[str, object]) -> str:
    """The table `tokenprune run` prints."""
    text = model.config.text_config
    trace = result["trace"]
    flops_full, flops_reduced = result["flops"]
    (p0, p1), (d0, d1) = result["prefill"], result["decode"]
    stages = [stage.model_dump(exclude_none=True) for stage in config.reduction.stages]
    lines = [
        f"model      {config.model}: {type(model).__name__}, {text.num_hidden_layers} layers, hidden "
        f"{text.hidden_size}, {config.device} {config.dtype}, {config.attn_implementation}",
        f"reduction  {config.reduction.strategy} {stages} params={config.reduction.params}",
    ]
    for event in trace:
        lines.append(
            f"layer {event.layer:<4} tokens {event.tokens_before[0]} -> {event.tokens_after[0]} per sample "
            f"(visual {event.visual_before[0]} -> {event.visual_after[0]})"
        )
    lines += [
        "",
        f"{'':24}{'unreduced':>12}{'reduced':>12}{'ratio':>9}",
        _row("prefill FLOPs (G)", flops_full / 1e9, flops_reduced / 1e9, "{:.2f}"),
        _row("prefill time (ms)", p0 * 1e3, p1 * 1e3, "{:.1f}"),
        _row("decode time (ms/token)", d0 * 1e3, d1 * 1e3, "{:.2f}"),
        "",
        f"FLOPs bound speed-up {flops_full / flops_reduced:.2f}x, measured prefill speed-up {p0 / p1:.2f}x "
        f"(medians of {config.repeats}, interleaved, after one warm-up round)",
    ]
    return "\n".join(lines)


def _row(name: str, full: float, reduced: float, fmt: str) -> str:
    return f"{name:<24}{fmt.format(full):>12}{fmt.format(reduced):>12}{reduced / full:>9.2f}"
