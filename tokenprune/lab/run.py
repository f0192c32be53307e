"""`tokenprune run CONFIG`: one reduction on one model, measured against the unreduced model.

Prints the tokens kept, the language model's prefill FLOPs from its own shapes, and prefill and
decode times with and without the reduction: paired, order-alternating repeats in one process
(`tokenprune.lab.speed.paired_generation`, the ablation's method), so the ratios hold on a busy
machine, with their spread and a flag when the pairs disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

import tokenprune as tp
from tokenprune.config import read_mapping
from tokenprune.errors import ConfigError, describe_errors
from tokenprune.flops import decode_flops, trace_flops
from tokenprune.lab.loading import DType, load_model
from tokenprune.lab.speed import PairedSpeed, flags, generated_cache_bytes, paired_generation


class RunConfig(BaseModel):
    """What `tokenprune run` loads, feeds and measures."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "builtin:tiny-llava",
        description="a builtin name (tokenprune.lab.loading) or a local LLaVA checkpoint",
    )
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    dtype: DType = "float32"
    device: str = "cpu"
    reduction: tp.ReductionConfig
    text_tokens: int = Field(40, ge=1, description="prompt tokens around the images")
    images: int = Field(1, ge=0, description="images per sample")
    batch_size: int = Field(1, ge=1)
    max_new_tokens: int = Field(32, ge=2, description="tokens generated; decode is timed over them")
    repeats: int = Field(5, ge=1, description="paired rounds (after one warm-up round)")
    seed: int = 0


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run config; errors name the file and the field."""
    path = Path(path)
    try:
        return RunConfig.model_validate(read_mapping(path))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc)}") from exc


def load_run_model(config: RunConfig) -> nn.Module:
    """The config's model through the lab's one loader (`tokenprune.lab.loading.load_model`)."""
    return load_model(
        config.model,
        dtype=config.dtype,
        device=config.device,
        attn_implementation=config.attn_implementation,
        processor=False,
    ).model


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


@torch.no_grad()
def measure(model: nn.Module, config: RunConfig) -> dict[str, Any]:
    """Tokens, FLOPs, KV-cache bytes and paired prefill and decode ratios, reduced vs unreduced, on
    synthetic inputs. The trace and the reduced cache come from one untimed generation (a `site: cache`
    stage acts between its decode steps)."""
    inputs = synthetic_inputs(model, config)
    new_tokens = config.max_new_tokens
    kv_full = generated_cache_bytes(model, inputs, new_tokens)
    with tp.attach(model, config.reduction) as handle:
        kv_reduced = generated_cache_bytes(model, inputs, new_tokens)
        trace = handle.trace
    speed = paired_generation(model, inputs, config.reduction, new_tokens, config.repeats)
    text_config = model.config.text_config
    n_tokens = inputs["input_ids"].shape[1]
    full = [n_tokens] * config.batch_size
    return {
        "trace": trace,
        "tokens": n_tokens,
        "flops": (sum(trace_flops(text_config, [], full)), sum(trace_flops(text_config, trace, full))),
        "decode_flops": (
            sum(decode_flops(text_config, [], full, new_tokens)),
            sum(decode_flops(text_config, trace, full, new_tokens, _restores(config.reduction))),
        ),
        "kv_bytes": (kv_full, kv_reduced),
        "speed": speed,
        "flags": flags(speed, config.max_new_tokens),
    }


def _restores(reduction: tp.ReductionConfig) -> bool:
    """Whether the config's `site: cache` stage sets entries aside (`restore`) rather than dropping them."""
    return any(stage.site == "cache" and stage.restore for stage in reduction.stages)


def _trace_line(event: tp.ReductionEvent) -> str:
    """One reduction of the trace: its site and layer, and the tokens of its first sample or image.

    A `site: vision` event counts one image's tokens at a tower layer; a language one a sample's.
    """
    unit = "image" if event.site == "vision" else "sample"
    step = "" if event.step is None else f" before decode step {event.step}"
    return (
        f"{event.site} layer {event.layer:<4}{step} tokens {event.tokens_before[0]} -> "
        f"{event.tokens_after[0]} per {unit} (visual {event.visual_before[0]} -> {event.visual_after[0]})"
    )


def report(model: nn.Module, config: RunConfig, result: dict[str, Any]) -> str:
    """The table `tokenprune run` prints: time ratios are medians of per-pair ratios, with their spread."""
    text = model.config.text_config
    flops_full, flops_reduced = result["flops"]
    speed: PairedSpeed = result["speed"]
    stages = [stage.model_dump(exclude_none=True) for stage in config.reduction.stages]
    lines = [
        f"model      {config.model}: {type(model).__name__}, {text.num_hidden_layers} layers, hidden "
        f"{text.hidden_size}, {config.device} {config.dtype}, {config.attn_implementation}",
        f"reduction  {config.reduction.strategy} {stages} params={config.reduction.params}",
    ]
    lines += [_trace_line(event) for event in result["trace"]]
    prefill, decode = speed.prefill, speed.decode
    lines += [
        "",
        f"{'':24}{'unreduced':>12}{'reduced':>12}{'ratio':>9}{'spread':>9}",
        _row(
            "prefill FLOPs (G)", flops_full / 1e9, flops_reduced / 1e9, flops_reduced / flops_full, "{:.2f}"
        ),
        _row("prefill time (ms)", prefill.baseline_s * 1e3, prefill.variant_s * 1e3, prefill.ratio, "{:.1f}")
        + f"{prefill.spread:>9.1%}",
        _row(
            "decode time (ms/token)", decode.baseline_s * 1e3, decode.variant_s * 1e3, decode.ratio, "{:.2f}"
        )
        + f"{decode.spread:>9.1%}",
        _row("decode FLOPs (G)", *_scaled(result["decode_flops"], 1e9), "{:.3f}"),
        _row("KV cache bytes (MiB)", *_scaled(result["kv_bytes"], 2**20), "{:.2f}"),
        "",
        f"FLOPs bound speed-up {flops_full / flops_reduced:.2f}x, measured prefill speed-up "
        f"{prefill.speedup:.2f}x (median of {prefill.repeats} paired, order-alternating rounds after one "
        f"warm-up round; decode over {config.max_new_tokens} new tokens)",
        *(f"flag: {flag}" for flag in result["flags"]),
    ]
    return "\n".join(lines)


def _scaled(pair: tuple[int, int], unit: float) -> tuple[float, float, float]:
    """(unreduced, reduced) in `unit`s, and their ratio (reduced / unreduced)."""
    full, reduced = pair
    return full / unit, reduced / unit, reduced / full if full else float("nan")


def _row(name: str, full: float, reduced: float, ratio: float, fmt: str) -> str:
    """One line of the table: the unreduced and reduced values and their ratio."""
    return f"{name:<24}{fmt.format(full):>12}{fmt.format(reduced):>12}{ratio:>9.2f}"
