"""Video prefill and decode: the video methods, FastV, random, uniform and a pruned KV cache, paired.

    python benchmarks/video.py                              # 8 and 32 frames, Video-LLaVA-shaped, R 0.75
    python benchmarks/video.py --frames 32 --methods evs fastv cache --repeats 15
    python benchmarks/video.py --methods cache --cache-layers 0 2 4   # the cache site at K = 0, 2, 4
    python benchmarks/video.py --smoke                      # tiny widths, 8 and 32 frames: proves it runs

A Video-LLaVA-shaped model with random weights (`families.video_llava`: one video, 257 tokens per
frame at full size, 16 x 16 patches and the class token; a Llama decoder of width 512, 8 layers, MLP
1408) runs one prompt per frame count (`--frames`, default 8 and 32: 2,096 and 8,264 tokens). The
vision tower is not timed: its features are computed once and passed as `mm_encoder_outputs`.
Full size takes minutes per method at 32 frames on 2 CPU cores (a prefill of 8,264 tokens); `--smoke`
(width 64, 4 layers, 5 tokens per frame: 2 x 2 patches and the class token) runs both frame
counts in seconds.

Each method removes the fraction `--ratio` of the visual tokens: `evs`, `vidcom2`, `fastvid`, `random`
and `uniform` before the language model (layer 0), `fastv` at layer K (`--layer`), and `cache`: FastV's
ranking applied to the KV cache once after prefill (`site: cache`, the prefill unreduced), one row per
layer K in `--cache-layers` (default 0, as VL-Cache's config prunes every layer, and 2, FastV's K).
Per method, paired and order-alternating against the unreduced run (`common.compare`):

- `prefill / unreduced`: one prefill (last-token logits, no cache), attached around each run;
- `decode step / unreduced`: mean seconds per greedy step over `--steps` steps on the cache the method
  left (the lab's `time_generation`: the prefill is not in it).

Then where its time goes: its own selection (`Handle.time_selections`, ms and share of its prefill), the
shortened layers (the rest of its prefill against the unreduced one, beside the FLOPs bound), and the
pruned cache (KV-cache MiB after generating, against unreduced). docs/benchmarks.md has a run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

import tokenprune as tp
from tokenprune.lab.timing import synchronizer

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    ROW_HEADER,
    apply_smoke,
    compare,
    elapsed,
    flops_bound,
    load,
    machine,
    paired_description,
    prefill_logits,
    quiet_run,
    timing_arguments,
    tokenprune_run,
)
from decode import decode_seconds, generate
from families import video_llava

SMOKE = {"hidden": 64, "layers": 4, "heads": 4, "intermediate": 128, "video_grid": 2, "text": 8, "steps": 3}
PRE_LLM = ("evs", "vidcom2", "fastvid", "random", "uniform")
METHODS = (*PRE_LLM, "fastv", "cache")


def parse_args() -> argparse.Namespace:
    """Command-line options: frame counts, methods, ratio, sizes, decode steps, repeats, threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_arguments(parser, repeats=5)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32], help="video lengths to run")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--ratio", type=float, default=0.75, help="fraction of visual tokens removed")
    parser.add_argument("--layer", type=int, default=2, help="K of fastv")
    parser.add_argument(
        "--cache-layers", type=int, nargs="+", default=[0, 2], help="K of the cache site: a row each"
    )
    parser.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--video-grid", type=int, default=16, help="patch grid side per frame")
    parser.add_argument("--text", type=int, default=40, help="prompt tokens around the video")
    return apply_smoke(parser.parse_args(), **SMOKE)


def rows_of(method: str, args: argparse.Namespace) -> list[tuple[str, int, tp.ReductionConfig]]:
    """(row label, layer, reduction) of each row a method names, at the benchmark's ratio."""
    if method == "cache":
        return [
            (
                f"cache K={layer}",
                layer,
                tp.ReductionConfig(
                    strategy="fastv", stages=[{"site": "cache", "layer": layer, "ratio": args.ratio}]
                ),
            )
            for layer in args.cache_layers
        ]
    layer = 0 if method in PRE_LLM else args.layer
    return [(method, layer, tp.ReductionConfig(strategy=method, layer=layer, ratio=args.ratio))]


def reduced_decode(
    model: nn.Module, inputs: dict[str, Any], config: tp.ReductionConfig, args
) -> Callable[[], float]:
    """Seconds per decode step with `config` attached around the `generate` (attaching is not timed)."""

    def run() -> float:
        with tp.attach(model, config):
            return decode_seconds(model, inputs, args)

    return run


def kv_mib(model: nn.Module, inputs: dict[str, Any], steps: int) -> float:
    """MiB of keys and values the cache holds after generating `steps` tokens."""
    cache = generate(model, inputs, steps)
    return (
        sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        / 2**20
    )


def selection_seconds(
    model: nn.Module, inputs: dict[str, Any], config: tp.ReductionConfig, args: argparse.Namespace
) -> tuple[float, int]:
    """(median seconds in the strategy's own `select` per `generate` of `--steps` tokens, slots its last
    stage kept), over `--repeats` runs: a cache-site stage selects during decoding, the others at prefill."""
    seconds, slots = [], 0
    for _ in range(max(args.repeats, 1)):
        with tp.attach(model, config) as handle, handle.time_selections(synchronizer(model.device)) as timer:
            generate(model, inputs, args.steps)
            seconds.append(timer.seconds)
            slots = handle.trace[-1].kept.shape[1]
    return statistics.median(seconds), slots


def report_row(
    row: tuple[str, int, tp.ReductionConfig],
    model: nn.Module,
    inputs: dict[str, Any],
    args: argparse.Namespace,
    unreduced: dict[str, Any],
) -> None:
    """A row's paired prefill and decode ratios, then where its time goes."""
    label, layer, config = row
    prefill = compare(
        f"{label} prefill / unreduced", unreduced["prefill"], tokenprune_run(model, inputs, config), args
    )
    decode = compare(
        f"{label} decode step / unreduced",
        unreduced["decode"],
        reduced_decode(model, inputs, config, args),
        args,
    )
    select_s, slots = selection_seconds(model, inputs, config, args)
    n = inputs["input_ids"].shape[1]
    at_prefill = config.stages[0].site != "cache"  # a cache-site stage selects between decode steps
    bound = flops_bound(model.config.text_config, layer, n, slots) if at_prefill else 1.0
    with tp.attach(model, config):
        cache = kv_mib(model, inputs, args.steps)
    layers_ms = 1e3 * (prefill.variant_s - (select_s if at_prefill else 0.0))
    share = (
        f"{100 * select_s / prefill.variant_s:.1f}% of its prefill" if at_prefill else "between decode steps"
    )
    print(
        f"{'':<4}selection {1e3 * select_s:.2f} ms ({share}); layers {layers_ms:.1f} ms "
        f"vs {1e3 * prefill.baseline_s:.1f} unreduced ({slots} of {n} slots, FLOPs bound {bound:.2f}x); "
        f"KV cache {cache:.2f} of {unreduced['kv']:.2f} MiB, decode {decode.speedup:.2f}x"
    )


def report_frames(frames: int, args: argparse.Namespace) -> None:
    """The noise floor and every method at one video length."""
    sized = argparse.Namespace(**{**vars(args), "frames": frames})
    model, inputs = video_llava(sized)
    n = inputs["input_ids"].shape[1]
    print(
        f"\n== {frames} frames: Video-LLaVA-shaped, {args.layers} layers, hidden {args.hidden}, MLP "
        f"{args.intermediate}; prompt {n} tokens ({n - args.text} visual); R={args.ratio}, "
        f"fastv at K={args.layer}"
    )
    unreduced = {
        "prefill": lambda: elapsed(lambda: prefill_logits(model, inputs)),
        "decode": lambda: decode_seconds(model, inputs, args),
        "kv": kv_mib(model, inputs, args.steps),
    }
    print(ROW_HEADER)
    compare("unreduced / unreduced (noise floor)", unreduced["prefill"], unreduced["prefill"], args)
    for method in args.methods:
        for row in rows_of(method, args):
            report_row(row, model, inputs, args, unreduced)


def main() -> None:
    """Every frame count: the noise floor, then every method."""
    args = parse_args()
    quiet_run(args)
    print(machine())
    print(f"{paired_description(args)}; decode: mean per step over {args.steps} greedy steps")
    for frames in args.frames:
        report_frames(frames, args)
    print(f"\nend: {load()}")


if __name__ == "__main__":
    main()
