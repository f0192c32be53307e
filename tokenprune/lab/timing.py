"""Timings a paper can print: paired, order-alternating ratios of a variant against its baseline.

A time alone means little on a shared machine; a ratio of two times taken side by side does. Each
repeat measures the baseline and the variant back to back, alternating which goes first (so a
drift or a warm cache favours neither), and yields one ratio; the report is the median of those
ratios with their interquartile range. A spread (IQR / median) above `NOISY_SPREAD` flags the row.
`now` is the one clock: it waits for the device's queued work (CUDA) before reading the time.
`time_generation` times one `generate` call step by step with it (prefill, then decode per token),
so that decode is measured directly and never as a difference of two noisy totals; `elapsed` times
one plain call with it. `others_during` measures what a ratio cannot cancel: the CPU other processes
used while a timing ran (`tokenprune.lab.machine_lock` keeps tokenprune's own shards out of it).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

T = TypeVar("T")

NOISY_SPREAD = 0.10  # a paired ratio whose IQR exceeds 10% of its median is flagged, not trusted
# The version of the timing method, recorded in each ablation row: rows timed otherwise are re-measured.
# /2: timed alone (`machine_lock`), other processes' CPU use measured and flagged.
TIMING_METHOD = "paired-alternating-generation/2"
OTHERS_CORES_LIMIT = 0.25  # other processes' CPU use during a timing, in cores on average, that flags it
PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class PairedRatio:
    """Variant time over baseline time: the median of per-repeat ratios and its interquartile range."""

    ratio: float
    iqr: float
    baseline_s: float  # median seconds of the baseline over the repeats
    variant_s: float  # median seconds of the variant over the repeats
    repeats: int

    @property
    def spread(self) -> float:
        """The IQR relative to the median ratio (0.05: the middle half of the repeats lies within 5%)."""
        return self.iqr / self.ratio if self.ratio > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        """Whether the repeats disagree by more than `NOISY_SPREAD`: rerun on a quieter machine."""
        return self.spread > NOISY_SPREAD

    @property
    def speedup(self) -> float:
        """Baseline time over variant time (1.5: the variant takes two thirds of the time)."""
        return 1.0 / self.ratio if self.ratio > 0 else float("inf")


def now(synchronize: Callable[[], None]) -> float:
    """The clock (`perf_counter` seconds) once the device's queued work is done (`synchronizer`)."""
    synchronize()
    return time.perf_counter()


def elapsed(run: Callable[[], object], synchronize: Callable[[], None]) -> float:
    """Seconds of one `run()`, the device synchronised before and after it."""
    start = now(synchronize)
    run()
    return now(synchronize) - start


def paired_ratio(
    baseline: Callable[[], float], variant: Callable[[], float], repeats: int = 7, warmup: int = 1
) -> PairedRatio:
    """Measure `variant` against `baseline`, each a callable returning one measurement in seconds.

    `warmup` unrecorded pairs run first; then `repeats` pairs, the baseline first in even repeats
    and the variant first in odd ones. Callables that time a plain call can use `elapsed`; those
    that must set something up around the timed part (attach, prefill a cache) time it themselves.
    """
    return summarize(*alternate(baseline, variant, repeats, warmup))


def alternate(
    baseline: Callable[[], T], variant: Callable[[], T], repeats: int, warmup: int = 1
) -> tuple[list[T], list[T]]:
    """The results of `repeats` paired calls (after `warmup` unrecorded pairs), baseline first in even ones.

    The pairing under `paired_ratio`, for measurements that give more than one number per call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        baseline(), variant()
    base_results, variant_results = [], []
    for repeat in range(repeats):
        if repeat % 2 == 0:
            base, var = baseline(), variant()
        else:
            var, base = variant(), baseline()
        base_results.append(base)
        variant_results.append(var)
    return base_results, variant_results


def summarize(baseline_times: list[float], variant_times: list[float]) -> PairedRatio:
    """The `PairedRatio` of measurements already paired up (the i-th of each taken side by side)."""
    if len(baseline_times) != len(variant_times) or not baseline_times:
        raise ValueError("paired timings need the same, non-zero number of baseline and variant times")
    ratios = [v / b if b > 0 else float("inf") for b, v in zip(baseline_times, variant_times, strict=True)]
    return PairedRatio(
        ratio=statistics.median(ratios),
        iqr=_iqr(ratios),
        baseline_s=statistics.median(baseline_times),
        variant_s=statistics.median(variant_times),
        repeats=len(ratios),
    )


def _iqr(values: list[float]) -> float:
    """Interquartile range (inclusive quartiles, so two or three repeats still give a spread)."""
    if len(values) < 2:
        return 0.0
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return high - low


@dataclass(frozen=True)
class GenerationTimes:
    """One greedy generation, timed step by step."""

    prefill_s: float  # from the call to the first token's logits (vision tower and prefill)
    decode_s_per_token: float  # from the first token's logits to the last's, per decode step
    steps: int  # tokens generated


class _StepClock(LogitsProcessor):
    """Reads the clock each time `generate` has a step's logits (after synchronising the device)."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(now(self.synchronize))
        return scores


def time_generation(
    model: nn.Module, inputs: dict[str, Any], new_tokens: int, synchronize: Callable[[], None]
) -> GenerationTimes:
    """Greedy `generate` of exactly `new_tokens` tokens: prefill seconds and decode seconds per token.

    The clock is read at every step's logits, so decode is the time between the first and the last
    step, divided by the steps between them: no subtraction of a separately timed prefill.
    """
    if new_tokens < 2:
        raise ValueError(f"timing decode needs at least 2 new tokens, got {new_tokens}")
    clock = _StepClock(synchronize)
    start = now(synchronize)
    model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    stamps = clock.stamps
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return GenerationTimes(stamps[0] - start, decode, len(stamps))


def synchronizer(device: torch.device | None = None) -> Callable[[], None]:
    """What waits for a device's queued work before a clock reading: `cuda.synchronize`, or nothing.

    None: the current CUDA device when there is one (for callers that time whatever they are given).
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class OthersLoad:
    """The CPU that other processes used during a timed section, in cores on average."""

    cores: float | None  # None: the machine's CPU time cannot be read here (no /proc/stat)
    wall_s: float  # the section's length


def others_during(run: Callable[[], T]) -> tuple[T, OthersLoad]:
    """The result of `run()` and the CPU every other process of the machine used meanwhile.

    The machine's busy CPU time (`/proc/stat`) minus this process's own (`os.times`, children it
    waited for included), over the wall-clock time. Both count in clock ticks (10 ms) per core: the
    average is sound over sections of a second or more. Linux only: elsewhere `cores` is None.
    """
    machine_before, own_before, start = machine_cpu_s(), own_cpu_s(), time.perf_counter()
    result = run()
    machine_after, own_after, wall = machine_cpu_s(), own_cpu_s(), time.perf_counter() - start
    if machine_before is None or machine_after is None or wall <= 0:
        return result, OthersLoad(None, wall)
    others = (machine_after - machine_before) - (own_after - own_before)
    return result, OthersLoad(others / wall, wall)


def machine_cpu_s() -> float | None:
    """CPU seconds every process has used since boot (None: no `/proc/stat`, not Linux).

    Busy time: user, nice, system, interrupts, and steal (a hypervisor running other machines on
    our cores); not idle or I/O wait. Guest time is inside user and nice already.
    """
    try:
        first_line = PROC_STAT.read_text().split("\n", 1)[0]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first_line.split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds this process has used, with those of the children it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system
