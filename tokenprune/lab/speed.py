"""What a reduction does to speed and memory, measured against the unreduced model on the same batch.

`paired_generation` is the method of every timing the lab prints (`tokenprune run` and
`tokenprune ablate`): greedy generations of the baseline and the reduced model, back to back in
order-alternating pairs (`timing.alternate`), each timed step by step (`timing.time_generation`);
prefill and decode each report the median of the per-pair ratios and its interquartile range.
`footprint` adds the ablation's memory columns (KV cache, CUDA peak) and the strategy's own time,
each from one untimed pass; `flags` names what makes a measurement not fit to print.
`paired_generation` and `footprint` run alone (`machine_lock.timing_alone`: no other tokenprune
process computes meanwhile), and the pairs measure what other processes used all the same
(`timing.others_during`), flagged above `OTHERS_CORES_LIMIT`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.core.language.forward import CACHE_KEYWORD
from tokenprune.lab.loading import attached
from tokenprune.lab.machine_lock import timing_alone
from tokenprune.lab.timing import (
    NOISY_SPREAD,
    OTHERS_CORES_LIMIT,
    GenerationTimes,
    OthersLoad,
    PairedRatio,
    alternate,
    others_during,
    summarize,
    synchronizer,
    time_generation,
)


@dataclass(frozen=True)
class PairedSpeed:
    """Prefill and decode of a reduced model against the baseline, as paired ratios (reduced / baseline)."""

    prefill: PairedRatio
    decode: PairedRatio
    steps: list[int]  # tokens each timed generation produced (all equal the tokens asked for when valid)
    others: OthersLoad | None = None  # other processes' CPU use during the pairs; None: not measured


@torch.no_grad()
def paired_generation(
    model: nn.Module,
    inputs: dict[str, Tensor],
    reduction: tp.ReductionConfig | None,
    new_tokens: int,
    repeats: int,
    warmup: int = 1,
    adapter: str | None = None,
) -> PairedSpeed:
    """Time the baseline and `reduction` (None: the baseline against itself) in alternating pairs."""
    sync = synchronizer(next(model.parameters()).device)

    def run(config: tp.ReductionConfig | None) -> GenerationTimes:
        """One timed generation with `config` attached (None: the baseline)."""
        with attached(model, config, adapter):
            return time_generation(model, inputs, new_tokens, sync)

    with timing_alone():
        (base, cell), others = others_during(
            lambda: alternate(lambda: run(None), lambda: run(reduction), repeats, warmup)
        )
    return PairedSpeed(
        prefill=summarize([t.prefill_s for t in base], [t.prefill_s for t in cell]),
        decode=summarize([t.decode_s_per_token for t in base], [t.decode_s_per_token for t in cell]),
        steps=[t.steps for t in base + cell],
        others=others,
    )


def flags(speed: PairedSpeed, new_tokens: int) -> list[str]:
    """Why a row's times should not be printed as they are: noisy pairs, invalid measurements, or
    other processes busy during the timing (or no way to tell, off Linux)."""
    found = []
    for name, ratio in (("prefill", speed.prefill), ("decode", speed.decode)):
        if not (ratio.baseline_s > 0 and ratio.variant_s > 0 and math.isfinite(ratio.ratio)):
            found.append(f"{name}: a time that is not positive and finite")
        elif ratio.noisy:
            found.append(f"{name}: spread {ratio.spread:.0%} > {NOISY_SPREAD:.0%}")
    if any(steps != new_tokens for steps in speed.steps):
        found.append(f"decode: a generation made {min(speed.steps)} of {new_tokens} tokens")
    return found + _load_flags(speed.others)


def _load_flags(others: OthersLoad | None) -> list[str]:
    """The flag of a timing that other processes competed with, or whose machine could not be read."""
    if others is None:
        return []
    if others.cores is None:
        return ["timing: other processes' CPU use cannot be read here (no /proc/stat)"]
    if others.cores > OTHERS_CORES_LIMIT:
        return [f"timing: other processes used {others.cores:.2f} cores > {OTHERS_CORES_LIMIT}"]
    return []


@dataclass(frozen=True)
class Footprint:
    """Memory and selection cost of one configuration, from one untimed prefill and generation."""

    kv_cache_bytes: int  # per sample, after the prefill
    peak_memory_bytes: int | None  # CUDA only
    overhead_s: float | None  # seconds in the strategy's selection during one prefill; None: unreduced
    kv_cache_bytes_decoded: int | None = None  # per sample, after the generation (`site: cache` stages act)


@torch.no_grad()
def footprint(
    model: nn.Module,
    inputs: dict[str, Tensor],
    reduction: tp.ReductionConfig | None,
    new_tokens: int,
    adapter: str | None = None,
) -> Footprint:
    """KV-cache bytes per sample, the CUDA peak of a generation, and the strategy's selection time."""
    device = next(model.parameters()).device
    sync = synchronizer(device)
    with timing_alone(), attached(model, reduction, adapter) as handle:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = model(**inputs, use_cache=True)
        kv_bytes = cache_bytes(getattr(out, CACHE_KEYWORD)) // inputs["input_ids"].shape[0]
        del out
        decoded = generated_cache_bytes(model, inputs, new_tokens)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        overhead = None
        if handle is not None:
            with handle.time_selections(sync) as timer:  # its syncs would slow a timed run: apart
                model(**inputs, use_cache=True)
            overhead = timer.seconds
    return Footprint(kv_bytes, peak, overhead, decoded)


def generated_cache_bytes(model: nn.Module, inputs: dict[str, Tensor], new_tokens: int) -> int:
    """KV-cache bytes per sample once a greedy generation of `new_tokens` is over (under whatever is
    attached: `site: cache` stages shrink the cache between decode steps, not at the prefill)."""
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
    )
    return cache_bytes(getattr(out, CACHE_KEYWORD)) // inputs["input_ids"].shape[0]


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
