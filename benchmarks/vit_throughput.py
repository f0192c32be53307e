"""ViT-B/16 throughput with ToMe through tokenprune, against the unpatched timm model, beside the paper.

    python benchmarks/vit_throughput.py                    # batch 8, 2 threads, r in {8, 13, 16} and (16, -1)
    python benchmarks/vit_throughput.py --batch 16 --repeats 9

A timm `vit_base_patch16_224` with random weights (speed does not depend on them) runs in one
process, interleaved (every round times every variant once, after warm-up rounds): the unpatched
model (fused SDPA) and `tome` at each r schedule, attached and detached around each run
(attaching is not timed). Printed per variant: median images/s, the speed-up over unpatched, the
FLOPs ratio from the tokens each block processed (attention on the block's input, the MLP on its
merged output, as ToMe merges between them), the time spent in ToMe's matching and merging, and
the paper's V100 speed-up where it gives one (r=13 on AugReg ViT-B/16: 309 -> 511 im/s, 1.65x).
docs/benchmarks.md has a run and reads it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import Tensor, nn

import tokenprune as tp

PAPER_SPEEDUP = {"r=13": 1.65}
SCHEDULES = {"r=8": {"r": 8}, "r=13": {"r": 13}, "r=16": {"r": 16}, "r=(16,-1)": {"r": 16, "inflect": -1.0}}


def parse_args() -> argparse.Namespace:
    """Command-line options: batch, repeats, threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds over all variants")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def block_flops(tokens_in: int, tokens_out: int, width: int) -> float:
    """Multiply-adds x 2 of one pre-norm block: attention on `tokens_in`, the MLP on `tokens_out`."""
    projections = 4 * tokens_in * width * width  # q, k, v, output
    attention = 2 * tokens_in * tokens_in * width  # q k^T and attn v
    mlp = 8 * tokens_out * width * width  # two layers of width 4D
    return 2.0 * (projections + attention + mlp)


def model_flops(counts: list[tuple[int, int]], width: int) -> float:
    return sum(block_flops(n_in, n_out, width) for n_in, n_out in counts)


def token_counts(model: nn.Module, params: dict | None, images: Tensor) -> list[tuple[int, int]]:
    """(tokens entering, tokens leaving) each block, from the trace of one reduced forward."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    if params is None:
        return [(n, n)] * len(model.blocks)
    with tp.attach(model, tp.ReductionConfig(strategy="tome", params=params)) as handle, torch.no_grad():
        model(images[:1])
        after = {event.layer: event.tokens_after[0] for event in handle.trace}
    counts = []
    for layer in range(len(model.blocks)):
        counts.append((n, after.get(layer, n)))
        n = after.get(layer, n)
    return counts


class MatchingTimer:
    """Wraps a handle's reducer to add up the time of its `select` (ToMe's matching) per forward."""

    def __init__(self, handle: tp.Handle) -> None:
        self.seconds = 0.0
        reducer = handle.reducer
        select = reducer.select

        def timed(view):
            start = time.perf_counter()
            out = select(view)
            self.seconds += time.perf_counter() - start
            return out

        reducer.select = timed


def timed_run(model: nn.Module, images: Tensor, params: dict | None) -> tuple[float, float]:
    """(seconds of one forward, seconds of it in the reducer)."""
    if params is None:
        start = time.perf_counter()
        model(images)
        return time.perf_counter() - start, 0.0
    with tp.attach(model, tp.ReductionConfig(strategy="tome", params=params)) as handle:
        timer = MatchingTimer(handle)
        start = time.perf_counter()
        model(images)
        return time.perf_counter() - start, timer.seconds


def interleaved(variants: dict[str, Callable[[], tuple[float, float]]], repeats: int, warmup: int) -> dict:
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for round_index in range(warmup + repeats):
        for name, run in variants.items():
            result = run()
            if round_index >= warmup:
                times[name].append(result)
    return times


@torch.no_grad()
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    images = torch.randn(args.batch, 3, 224, 224)
    width = model.embed_dim
    settings = {"unpatched": None, **SCHEDULES}
    variants = {name: (lambda p=params: timed_run(model, images, p)) for name, params in settings.items()}
    times = interleaved(variants, args.repeats, args.warmup)
    base_time = statistics.median(t for t, _ in times["unpatched"])
    base_flops = model_flops(token_counts(model, None, images), width)
    print(
        f"timm vit_base_patch16_224, batch {args.batch}, {args.threads} threads, "
        f"median of {args.repeats} interleaved rounds, torch {torch.__version__}, timm {timm.__version__}"
    )
    print("| variant | tokens at the end | im/s | speed-up | FLOPs ratio | ToMe matching | paper (V100) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, params in settings.items():
        seconds = statistics.median(t for t, _ in times[name])
        matching = statistics.median(m for _, m in times[name])
        counts = token_counts(model, params, images)
        ratio = base_flops / model_flops(counts, width)
        paper = f"{PAPER_SPEEDUP[name]:.2f}x" if name in PAPER_SPEEDUP else ""
        print(
            f"| {name} | {counts[-1][1]} | {args.batch / seconds:.1f} | {base_time / seconds:.2f}x "
            f"| {ratio:.2f}x | {100 * matching / seconds:.1f}% | {paper} |"
        )


if __name__ == "__main__":
    main()
