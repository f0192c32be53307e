"""Each strategy's own selection time beside its prefill, at LLaVA-1.5's shape (issue 14).

    python benchmarks/selection.py                          # batch 8, 576 visual tokens, width 4096, 3 layers
    python benchmarks/selection.py --hidden 1024 --intermediate 2816 --heads 16 --kv-heads 16
    python benchmarks/selection.py --strategies divprune dart --repeats 5
    python benchmarks/selection.py --smoke                  # tiny sizes: proves the script runs

Every installed strategy (or `--strategies`) is attached where it acts: a language-model strategy
that needs no attention signal before the language model (layer 0), one that does at `--layer`,
a vision-only one at the last layer of the vision tower (`site: vision`), each keeping `--keep`
visual tokens per image (192 of 576 by default: the largest of the literature's 64/128/192, where
a greedy selection takes the most steps). A LLaVA-1.5-shaped model with random weights (576 visual
tokens, a Llama decoder, a 2-layer vision tower) runs a batch of `--batch` left-padded prompts.

Per strategy, paired and order-alternating against the unreduced prefill (`common.compare`), each
reduced prefill also reads the seconds spent inside the strategy's `select` (`Handle.time_selections`,
CUDA synchronised): the selection's share of the prefill it ran in, median over the repeats.
Target (issue 14): at most 2% of the prefill on the CPU.

How the 2% is read at LLaVA-1.5-7B's 32 layers: a 32-layer prefill at width 4096, batch 8, takes
minutes per forward on a CPU, so the default runs `--layers 3` (the fewest with FastV's K=2 and one
reduced layer). The selection costs the same whatever the depth, while the prefill grows with every
layer: the share measured on 3 layers bounds the 32-layer share from above (by about 32/3). A
narrower model (`--hidden`) bounds it again, the prefill growing with the square of the width and
the selections at most linearly. docs/benchmarks.md has a run and reads it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

import tokenprune as tp
from tokenprune.lab.loading import DTYPES
from tokenprune.lab.timing import synchronizer
from tokenprune.testing.models import toy_llava

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    ROW_HEADER,
    SMOKE_SHAPE,
    apply_smoke,
    compare,
    elapsed,
    llava_arguments,
    llava_description,
    llava_prompt,
    llava_size,
    load,
    machine,
    prefill_logits,
    timing_arguments,
)

LLAVA_7B_WIDTH = {"hidden": 4096, "layers": 3, "heads": 32, "kv_heads": 32, "intermediate": 11008}
VISION_LAYERS = 2
TARGET_SHARE = 0.02


def parse_args() -> argparse.Namespace:
    """Sizes (LLaVA-1.5-7B's width, 3 layers by default), the batch, the budget and the strategies."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_arguments(parser, repeats=5)
    llava_arguments(parser, **LLAVA_7B_WIDTH)
    parser.add_argument("--batch", type=int, default=8, help="left-padded prompts of one image each")
    parser.add_argument("--keep", type=int, default=192, help="visual tokens kept per image")
    parser.add_argument("--layer", type=int, default=2, help="K of the strategies that need a signal")
    parser.add_argument("--vision-hidden", type=int, default=64, help="width of the (untimed-size) tower")
    parser.add_argument("--strategies", nargs="+", help="default: every installed strategy")
    return apply_smoke(parser.parse_args(), **SMOKE_SHAPE, batch=3, keep=4)


def selection_model(args: argparse.Namespace, device: str = "cpu") -> nn.Module:
    """The LLaVA-shaped model of `args` with a 2-layer vision tower (vision-site strategies act there),
    built on `device`."""
    size = llava_size(args, vision_hidden=args.vision_hidden, vision_layers=VISION_LAYERS)
    with torch.device(device):
        return toy_llava(size, attn_implementation="sdpa").to(DTYPES[args.dtype])


def with_pixels(inputs: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """`common.llava_prompt`'s inputs with pixels instead of its precomputed features, on `device`:
    the tower runs in every prefill (vision-site strategies act inside it)."""
    inputs = {key: value for key, value in inputs.items() if key != "mm_encoder_outputs"}
    side = 2 * args.grid  # patch 2
    pixels = torch.randn(
        inputs["input_ids"].shape[0], 3, side, side, generator=torch.Generator().manual_seed(1)
    )
    inputs["pixel_values"] = pixels.to(DTYPES[args.dtype])
    return {key: value.to(device) for key, value in inputs.items()}


def where_it_acts(name: str, keep: int, layer: int) -> tp.ReductionConfig:
    """One stage where strategy `name` acts: layer 0 without signals, `layer` with them, or the
    tower's last layer."""
    strategy = tp.strategy_class(name)
    if "language" in strategy.sites:
        return tp.ReductionConfig(strategy=name, layer=layer if strategy.requires else 0, keep=keep)
    return tp.ReductionConfig(
        strategy=name, stages=[{"site": "vision", "layer": VISION_LAYERS - 2, "keep": keep}]
    )


def reduced_run(
    model: nn.Module, inputs: dict[str, Any], config: tp.ReductionConfig, shares: list[tuple[float, float]]
) -> Callable[[], float]:
    """Seconds of one prefill with `config` attached and its selections timed (attach and detach
    outside the clock); appends (selection seconds, prefill seconds) of each run to `shares`."""
    sync = synchronizer(model.device)

    def run() -> float:
        with tp.attach(model, config) as handle, handle.time_selections(sync) as timer:
            seconds = elapsed(lambda: prefill_logits(model, inputs))
            shares.append((timer.seconds, seconds))
        return seconds

    return run


def measure(
    model: nn.Module,
    inputs: dict[str, Any],
    name: str,
    args: argparse.Namespace,
    unreduced: Callable[[], float],
) -> tuple[float, float] | str:
    """(median selection seconds, median share of its prefill) of strategy `name`, its paired row
    printed; or the reason it cannot run here (a refusal, e.g. no vision tower layer to act at)."""
    config = where_it_acts(name, args.keep, args.layer)
    try:
        tp.attach(model, config).detach()
    except tp.TokenPruneError as refusal:
        return f"not attached here: {str(refusal)[:120]}"
    shares: list[tuple[float, float]] = []
    compare(f"{name} / unreduced", unreduced, reduced_run(model, inputs, config, shares), args)
    recorded = shares[args.warmup :]
    return (
        statistics.median(selection for selection, _ in recorded),
        statistics.median(selection / prefill for selection, prefill in recorded),
    )


def verdict(name: str, result: tuple[float, float] | str) -> str:
    """One line: the selection's milliseconds and share of its prefill, against the 2% target."""
    if isinstance(result, str):
        return f"  {name:<12} {result}"
    seconds, share = result
    met = "met" if share <= TARGET_SHARE else "MISSED"
    share_text = f"{100 * share:6.2f}% of its prefill"
    return f"  {name:<12} selection {1e3 * seconds:9.2f} ms = {share_text}; target <= 2%: {met}"


def main() -> None:
    """Build the model once, then measure every strategy against the unreduced prefill."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    model = selection_model(args)
    inputs = with_pixels(llava_prompt(model, args, args.batch), args, model.device)
    names = args.strategies or tp.list_strategies()
    tower = f"vision tower {VISION_LAYERS} layers, width {args.vision_hidden}"
    print(f"{machine()}\n{llava_description(args)}; {tower}")
    print(
        f"batch {args.batch} (left-padded), keep {args.keep} visual tokens per image, "
        f"signals at K={args.layer}; paired ratios: median of {args.repeats} order-alternating repeats "
        f"after {args.warmup} warm-up\n"
    )

    def unreduced() -> float:
        return elapsed(lambda: prefill_logits(model, inputs))

    print(ROW_HEADER)
    compare("unreduced / unreduced (noise floor)", unreduced, unreduced, args)
    results = {name: measure(model, inputs, name, args, unreduced) for name in names}
    print(f"\nselection inside each reduced prefill (median of {args.repeats}), share of that prefill:")
    for name, result in results.items():
        print(verdict(name, result))
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
