"""Decode steps on a FastV-reduced KV cache against steps on an unreduced one, paired.

    python benchmarks/decode.py                           # small and LLaVA shapes, batch 1 and 8
    python benchmarks/decode.py --shapes small --batches 1 --steps 64 --repeats 15
    python benchmarks/decode.py --smoke                   # tiny sizes: proves the script runs

One measurement is the mean seconds per greedy decode step over `--steps` steps of one `generate`
call, timed by the lab's `tokenprune.lab.timing.time_generation` (the clock read at every step's
logits, so the prefill is not in it), with FastV at layer K, ratio R, attached around the call for
the reduced side. Shapes (576 visual tokens each):

- `small`: d=256, 4 layers, 8 heads / 4 kv, MLP 704, vocab 1000. Target (issue 11): a step on the
  reduced cache costs at most 1.03x an unreduced one (K=2, R=0.5);
- `llava`: the LLaVA-shaped model of benchmarks/prefill.py. Target: faster than unreduced (< 1.00).

Before timing, one reduced decode checks the cache: layers < K hold the prompt, layers >= K the
kept slots, each plus the new tokens. docs/benchmarks.md has a run and reads it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

import tokenprune as tp
from tokenprune.lab.loading import DTYPES
from tokenprune.lab.timing import synchronizer, time_generation

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    LLAVA_SHAPE,
    ROW_HEADER,
    SMOKE_SHAPE,
    apply_smoke,
    compare,
    llava_description,
    llava_model,
    llava_prompt,
    load,
    machine,
    paired_description,
    quiet_run,
    timed_attachment,
    timing_arguments,
)

SHAPES: dict[str, dict[str, int]] = {
    "small": {
        **LLAVA_SHAPE,
        "hidden": 256,
        "layers": 4,
        "heads": 8,
        "kv_heads": 4,
        "intermediate": 704,
        "vocab": 1000,
    },
    "llava": LLAVA_SHAPE,
}
TARGETS = {"small": 1.03, "llava": 1.0}


def parse_args() -> argparse.Namespace:
    """Command-line options: shapes, batches, steps, FastV's K and R, repeats, threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_arguments(parser)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch > 1: left-padded")
    parser.add_argument("--steps", type=int, default=32, help="new tokens per measurement")
    parser.add_argument("--layer", type=int, default=2, help="FastV K")
    parser.add_argument("--ratio", type=float, default=0.5, help="FastV R")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    return apply_smoke(parser.parse_args(), batches=[1, 3], steps=3)


def fastv(args: argparse.Namespace) -> tp.ReductionConfig:
    """FastV at the benchmark's K and R."""
    return tp.ReductionConfig(strategy="fastv", layer=args.layer, ratio=args.ratio)


def decode_seconds(model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace) -> float:
    """Seconds per greedy decode step over `args.steps` steps, by the lab's `time_generation`.

    The clock is read at each step's logits, so the prefill (first logits) is not in it.
    """
    with torch.inference_mode():
        times = time_generation(model, inputs, args.steps + 1, synchronizer(model.device))
    return times.decode_s_per_token


def reduced_decode_seconds(model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace) -> float:
    """`decode_seconds` with FastV attached (attaching is outside the clock)."""
    with tp.attach(model, fastv(args)):
        return decode_seconds(model, inputs, args)


class AfterPrefill(LogitsProcessor):
    """Calls `action` once, at the prefill's logits: what `generate` runs after that is decode steps."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.action: Callable[[], object] | None = action

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.action is not None:
            self.action()
            self.action = None
        return scores


def generate(model: nn.Module, inputs: dict[str, Any], new_tokens: int, *processors: LogitsProcessor) -> Any:
    """Greedy generation of exactly `new_tokens` tokens; returns the cache it leaves."""
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList(processors),
            return_dict_in_generate=True,
        )
    return out.cache


def check_reduced_cache(model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace) -> int:
    """Generate once with FastV attached and check each layer's cache length; returns the kept slots.

    The cache holds the prompt (layers < K) or the kept slots (layers >= K), plus every new token
    but the last (whose keys no step has needed yet).
    """
    n, new = inputs["input_ids"].shape[1], args.steps
    with tp.attach(model, fastv(args)) as handle:
        cache = generate(model, inputs, new + 1)
        kept = handle.trace[0].kept.shape[1]
    layers, k = model.config.text_config.num_hidden_layers, args.layer
    expected = [n + new] * k + [kept + new] * (layers - k)
    held = [layer.keys.shape[-2] for layer in cache.layers]
    if held != expected:
        raise RuntimeError(f"reduced cache holds {held} key slots per layer, expected {expected}")
    return kept


def hooks_per_step(model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Milliseconds per reduced decode step spent in each hook tokenprune places (by the hook's name)."""
    totals: dict[str, float] = {}
    with timed_attachment(model, fastv(args), totals):
        generate(model, inputs, args.steps + 1, AfterPrefill(totals.clear))
    return {label: 1e3 * seconds / args.steps for label, seconds in totals.items()}


def report_shape(shape: str, args: argparse.Namespace) -> None:
    """Paired decode ratios of one shape at every batch size."""
    sized = argparse.Namespace(**{**vars(args), **(SMOKE_SHAPE if args.smoke else SHAPES[shape])})
    model = llava_model(sized)
    print(f"== {shape}: {llava_description(sized)}")
    for batch in args.batches:
        report_batch(model, llava_prompt(model, sized, batch), args, TARGETS[shape])


def report_batch(model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace, target: float) -> None:
    """The noise floor, then a step on the reduced cache against an unreduced step, at one batch."""
    batch, n = inputs["input_ids"].shape
    kept = check_reduced_cache(model, inputs, args)
    padded = ", left-padded" if batch > 1 else ""
    print(
        f"batch {batch}{padded}: FastV K={args.layer} R={args.ratio} keeps {kept} of {n} slots "
        "(cache checked)"
    )

    def unreduced() -> float:
        return decode_seconds(model, inputs, args)

    def reduced() -> float:
        return reduced_decode_seconds(model, inputs, args)

    print(ROW_HEADER)
    compare("unreduced / unreduced (noise floor)", unreduced, unreduced, args)
    result = compare(f"reduced step / unreduced step, batch {batch}", unreduced, reduced, args, target)
    print(f"{'':<4}speed-up {result.speedup:.2f}x per decode step")
    hooks = hooks_per_step(model, inputs, args)
    named = ", ".join(f"{label} {ms:.3f}" for label, ms in hooks.items() if ms >= 0.001)
    print(f"{'':<4}tokenprune's hooks: {sum(hooks.values()):.3f} ms per reduced step ({named})\n")


def main() -> None:
    """Every shape at every batch size."""
    args = parse_args()
    quiet_run(args)
    print(machine())
    print(
        f"decode: mean per step over {args.steps} greedy steps after an untimed prefill; "
        f"{paired_description(args)}\n"
    )
    for shape in args.shapes:
        report_shape(shape, args)
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
