"""FastV prefill through tokenprune against the ideal on pre-selected tokens, at batch 1 and 8 left-padded.

    python benchmarks/prefill.py                          # LLaVA-shaped, R 0.5 0.75, batch 1 and 8
    python benchmarks/prefill.py --batches 1 --ratios 0.5 --repeats 15 --sections prefill
    python benchmarks/prefill.py --smoke                  # tiny sizes: proves the script runs

A LLaVA-1.5-shaped model with random weights (576 visual tokens, a Llama decoder; see
`common.LLAVA_SHAPE`) runs in one process. Per batch and per ratio R, paired and order-alternating
(`tokenprune.lab.timing.paired_ratio`):

- `tokenprune / ideal`: FastV at layer K through `tokenprune.attach` (attached and detached around
  each run, untimed) against the ideal handed the kept indices of that same run (`common.ideal_hooks`),
  whose last-token logits are checked against tokenprune's first. Target (issue 11): at most 1.02.
- `tokenprune / unreduced`: the speed-up, printed beside the FLOPs bound.
- `unreduced / unreduced`: the noise floor, once per batch (the ratio should be 1.000).

Then (`--sections`): where tokenprune's own time goes (every hook it registers timed, and a profile
of its functions), and the KV cache after a reduced prefill (every layer's length checked).
Only the language model is timed: image features are passed as `mm_encoder_outputs`, and the LM
head sees the last token (`logits_to_keep=1`). docs/benchmarks.md has a run and reads it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tokenprune as tp

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    ROW_HEADER,
    SMOKE_SHAPE,
    apply_smoke,
    check_close,
    compare,
    elapsed,
    flops_bound,
    ideal_logits,
    ideal_run,
    kept_tokens,
    llava_arguments,
    llava_description,
    llava_model,
    llava_prompt,
    load,
    machine,
    paired_description,
    prefill_logits,
    quiet_run,
    timed_attachment,
    timing_arguments,
    tokenprune_run,
)

SECTIONS = ("prefill", "breakdown", "cache")
TARGET_VS_IDEAL = 1.02
PROFILE_ROWS = 12


def parse_args() -> argparse.Namespace:
    """Command-line options: sizes, ratios, batches, sections, repeats, threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_arguments(parser)
    llava_arguments(parser)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="FastV R values")
    parser.add_argument("--layer", type=int, default=2, help="FastV K")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch > 1: left-padded")
    parser.add_argument("--breakdown-runs", type=int, default=3, help="prefills timed hook by hook")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    return apply_smoke(parser.parse_args(), **SMOKE_SHAPE, batches=[1, 3], breakdown_runs=1)


def fastv(args: argparse.Namespace, ratio: float) -> tp.ReductionConfig:
    """FastV at the benchmark's layer K and ratio `ratio`."""
    return tp.ReductionConfig(strategy="fastv", layer=args.layer, ratio=ratio)


def report_prefill(model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace) -> None:
    """Paired ratios at one batch: the noise floor, then per R tokenprune against the ideal and unreduced."""
    n = inputs["input_ids"].shape[1]

    def unreduced() -> float:
        return elapsed(lambda: prefill_logits(model, inputs))

    print(ROW_HEADER)
    compare("unreduced / unreduced (noise floor)", unreduced, unreduced, args)
    for ratio in args.ratios:
        config = fastv(args, ratio)
        kept, reduced_logits = kept_tokens(model, inputs, config)
        expected = ideal_logits(model, inputs, args.layer, kept)
        check_close(f"ideal R={ratio} vs tokenprune", expected, reduced_logits, model.dtype)
        tokenprune = tokenprune_run(model, inputs, config)
        ideal = ideal_run(model, inputs, args.layer, kept)
        compare(f"tokenprune R={ratio} / ideal", ideal, tokenprune, args, target=TARGET_VS_IDEAL)
        result = compare(f"tokenprune R={ratio} / unreduced", unreduced, tokenprune, args)
        bound = flops_bound(model.config.text_config, args.layer, n, kept.shape[1])
        print(
            f"{'':<4}speed-up {result.speedup:.2f}x; FLOPs bound {bound:.2f}x "
            f"({kept.shape[1]} of {n} slots kept)"
        )


def report_breakdown(model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace) -> None:
    """Where tokenprune's time goes in one reduced prefill: its hooks timed, then its functions profiled.

    Every hook tokenprune places is timed, whatever the core calls it, so this section cannot rot
    with a refactoring; the hooks are all the work tokenprune adds besides the shortened mask and
    the attention over it, which run inside the model's layers.
    """
    ratio = args.ratios[0]
    config = fastv(args, ratio)
    kept, _ = kept_tokens(model, inputs, config)
    ideal_s = statistics.median(
        ideal_run(model, inputs, args.layer, kept)() for _ in range(args.breakdown_runs)
    )
    per_run: list[dict[str, float]] = []
    for _ in range(args.breakdown_runs):
        totals: dict[str, float] = {}
        with timed_attachment(model, config, totals), torch.inference_mode():
            prefill_logits(model, inputs)
        per_run.append(totals)
    print(f"tokenprune's hooks, FastV R={ratio}, median ms per prefill over {args.breakdown_runs} runs:")
    for label in per_run[0]:
        print(f"  {label:<56}{1e3 * statistics.median(run[label] for run in per_run):9.2f}")
    own = statistics.median(sum(run.values()) for run in per_run)
    print(
        f"  = {1e3 * own:.1f} ms per prefill, {100 * own / ideal_s:.1f}% of the ideal's "
        f"{1e3 * ideal_s:.0f} ms"
    )
    profile_tokenprune(model, inputs, config)


def profile_tokenprune(model: nn.Module, inputs: dict[str, Any], config: tp.ReductionConfig) -> None:
    """cProfile of one reduced prefill, tokenprune's own functions only, by cumulative time.

    The profiler slows every Python call, so these times are inflated; read them as shares.
    """
    profiler = cProfile.Profile()
    with tp.attach(model, config), torch.inference_mode():
        profiler.runcall(prefill_logits, model, inputs)
    roots = tuple(str(Path(module.__file__).parent) for module in _tokenprune_packages())
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, _, own s, cumulative s, _)
    ours = [(key, value) for key, value in stats.items() if key[0].startswith(roots)]
    ours.sort(key=lambda item: item[1][3], reverse=True)
    print(f"tokenprune's functions under cProfile (inflated), top {PROFILE_ROWS} by cumulative ms:")
    for (path, line, name), (calls, _, own, cumulative, _) in ours[:PROFILE_ROWS]:
        where = f"{Path(path).parent.name}/{Path(path).name}:{line} {name}"
        print(f"  {where:<56}{1e3 * cumulative:9.2f}  ({calls} calls, own {1e3 * own:.2f})")


def _tokenprune_packages() -> list[Any]:
    """The packages whose code is tokenprune's: the library, its strategies and its adapters."""
    import tokenprune.adapters
    import tokenprune.strategies

    return [tp, tokenprune.strategies, tokenprune.adapters]


def cached_lengths(model: nn.Module, inputs: dict[str, Any]) -> tuple[list[int], int]:
    """(key/value length of each layer's cache, bytes of it all) after one prefill with a cache."""
    with torch.inference_mode():
        cache = model(**inputs, use_cache=True, logits_to_keep=1).cache
    lengths, total = [], 0
    for layer in cache.layers:
        if layer.keys.shape[-2] != layer.values.shape[-2]:
            raise RuntimeError(f"keys hold {layer.keys.shape[-2]} tokens, values {layer.values.shape[-2]}")
        lengths.append(layer.keys.shape[-2])
        total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return lengths, total


def report_cache(model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace) -> None:
    """KV-cache bytes after a prefill, unreduced and per R; layers < K hold every slot, others the kept."""
    n = inputs["input_ids"].shape[1]
    lengths, full = cached_lengths(model, inputs)
    print(f"KV cache after prefill: unreduced {full / 2**20:.2f} MiB, every layer {lengths[0]} slots")
    for ratio in args.ratios:
        config = fastv(args, ratio)
        kept, _ = kept_tokens(model, inputs, config)
        with tp.attach(model, config):
            lengths, size = cached_lengths(model, inputs)
        expected = [n] * args.layer + [kept.shape[1]] * (args.layers - args.layer)
        if lengths != expected:
            raise RuntimeError(f"FastV R={ratio}: cached lengths {lengths}, expected {expected}")
        print(
            f"  FastV R={ratio}: {size / 2**20:.2f} MiB, {100 * size / full:.1f}% "
            f"(layer lengths {expected}: checked)"
        )


SECTION_REPORTS = {"prefill": report_prefill, "breakdown": report_breakdown, "cache": report_cache}


def main() -> None:
    """Build the model once, then run each section at each batch size."""
    args = parse_args()
    quiet_run(args)
    model = llava_model(args)
    print(f"{machine()}\n{llava_description(args)}; FastV K={args.layer}")
    print(f"{paired_description(args)}\n")
    for batch in args.batches:
        inputs = llava_prompt(model, args, batch)
        padded = ", left-padded" if batch > 1 else ""
        print(f"== batch {batch}{padded}: {inputs['input_ids'].shape[1]} tokens per sample")
        for section in args.sections:
            SECTION_REPORTS[section](model, inputs, args)
            print()
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
