"""ViT-B/16 with ToMe: tokenprune's `tome` against the unpatched timm model and the reference patch, paired.

    python benchmarks/vit_throughput.py --reference /tmp/tome-ref     # batch 8, r=13, beside the reference
    python benchmarks/vit_throughput.py --schedules r=8 r=13 r=16 "r=(16,-1)" --repeats 15
    python benchmarks/vit_throughput.py --smoke                        # tiny ViT: proves the script runs

A timm `vit_base_patch16_224` with random weights (speed does not depend on them), batch 8 of seeded
random images. Per r schedule, paired and order-alternating (`tokenprune.lab.timing.paired_ratio`):
`tome` through `tokenprune.attach` (attached and detached around each run, untimed) against the
unpatched model (fused SDPA), and with `--reference DIR` the reference patch against the unpatched
model and tokenprune against the reference. DIR is a checkout of facebookresearch/ToMe kept outside
this tree (`git clone https://github.com/facebookresearch/ToMe /tmp/tome-ref`; none of its code is
copied here): its `tome.patch.timm` patches a deep copy of the same model, same weights, same images.
It was written for timm 0.4.12 (docs/benchmarks.md lists what that means under timm 1.x).

Printed per schedule: the paired ratios and speed-ups, the FLOPs ratio from the tokens each block
processed (attention on the block's input, the MLP on its merged output), the share of tokenprune's
forward spent in ToMe's matching, and the largest logit difference from the reference.
The paper's V100 speed-up for r=13 on ViT-B/16 (AugReg) is 1.65x (309 -> 511 im/s).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

import tokenprune as tp

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    ROW_HEADER,
    apply_smoke,
    compare,
    elapsed,
    load,
    machine,
    paired_description,
    quiet_run,
    timing_arguments,
)

SCHEDULES: dict[str, dict[str, Any]] = {
    "r=8": {"r": 8},
    "r=13": {"r": 13},
    "r=16": {"r": 16},
    "r=(16,-1)": {"r": 16, "inflect": -1.0},
    "r=2": {"r": 2},  # for --smoke's tiny ViT
}
SMOKE_VIT = {"img_size": 64, "depth": 3, "embed_dim": 64, "num_heads": 2}


def parse_args() -> argparse.Namespace:
    """Command-line options: batch, schedules, the reference checkout, repeats, threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_arguments(parser, repeats=11, warmup=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=["r=13"])
    parser.add_argument("--reference", type=Path, default=None, help="a facebookresearch/ToMe checkout")
    args = parser.parse_args()
    args.vit = {}
    return apply_smoke(args, batch=2, schedules=["r=2"], vit=SMOKE_VIT)


def reference_patch(checkout: Path) -> Callable[[nn.Module], None]:
    """`tome.patch.timm` (the reference's `apply_patch`) imported from a ToMe checkout outside this tree."""
    if not (checkout / "tome" / "patch" / "timm.py").is_file():
        raise SystemExit(
            f"--reference {checkout}: no tome/patch/timm.py there; clone "
            f"https://github.com/facebookresearch/ToMe into it (outside this repository)"
        )
    sys.path.insert(0, str(checkout.resolve()))
    from tome.patch.timm import apply_patch

    return apply_patch


def reference_r(params: dict[str, Any]) -> int | tuple[int, float]:
    """The reference's `model.r` for a schedule: r, or (r, inflect)."""
    return (params["r"], params["inflect"]) if "inflect" in params else params["r"]


def block_flops(tokens_in: int, tokens_out: int, width: int) -> float:
    """FLOPs (2 per multiply-add) of one pre-norm block: attention on `tokens_in`, the MLP on `tokens_out`."""
    projections = 4 * tokens_in * width * width  # q, k, v, output
    attention = 2 * tokens_in * tokens_in * width  # q k^T and attn v
    mlp = 8 * tokens_out * width * width  # two layers of width 4D
    return 2.0 * (projections + attention + mlp)


def model_flops(counts: list[tuple[int, int]], width: int) -> float:
    """FLOPs of every block, each given as (tokens entering, tokens leaving)."""
    return sum(block_flops(n_in, n_out, width) for n_in, n_out in counts)


def token_counts(model: nn.Module, trace: list[Any]) -> list[tuple[int, int]]:
    """(tokens entering, tokens leaving) each block, from the trace of one reduced forward (sample 0)."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    after = {event.layer: event.tokens_after[0] for event in trace}
    counts = []
    for layer in range(len(model.blocks)):
        counts.append((n, after.get(layer, n)))
        n = after.get(layer, n)
    return counts


def tome_config(params: dict[str, Any]) -> tp.ReductionConfig:
    """tokenprune's `tome` with the schedule `params`."""
    return tp.ReductionConfig(strategy="tome", params=params)


def reduced_once(model: nn.Module, images: Tensor, params: dict[str, Any]) -> tuple[Tensor, list[Any], float]:
    """(logits, trace, share of the forward spent in ToMe's matching) of one forward with `tome` attached."""
    with tp.attach(model, tome_config(params)) as handle, torch.inference_mode():
        with handle.time_selections() as timer:
            seconds = elapsed(lambda: model(images))
        logits = model(images)
        return logits, handle.trace, timer.seconds / seconds


def report_schedule(
    model: nn.Module, images: Tensor, name: str, args: argparse.Namespace, patch: Callable | None
) -> None:
    """Paired ratios of one schedule against the unpatched model (and the reference, when given)."""
    params = SCHEDULES[name]
    handles: list[tp.Handle] = []

    def unpatched() -> float:
        return elapsed(lambda: model(images))

    def tokenprune() -> float:
        return elapsed(
            lambda: model(images),
            setup=lambda: handles.append(tp.attach(model, tome_config(params))),
            teardown=lambda: handles.pop().detach(),
        )

    logits, trace, matching = reduced_once(model, images, params)
    counts = token_counts(model, trace)
    flops_ratio = model_flops(token_counts(model, []), model.embed_dim) / model_flops(counts, model.embed_dim)
    print(f"== {name}: {counts[-1][1]} tokens leave the last block; FLOPs ratio {flops_ratio:.2f}x; "
          f"ToMe matching {100 * matching:.1f}% of tokenprune's forward")  # fmt: skip
    print(ROW_HEADER)
    compare("unpatched / unpatched (noise floor)", unpatched, unpatched, args)
    ours = compare(f"tokenprune {name} / unpatched", unpatched, tokenprune, args)
    print(f"{'':<4}tokenprune speed-up {ours.speedup:.2f}x")
    if patch is None:
        return
    reference = copy.deepcopy(model)
    patch(reference)
    reference.r = reference_r(params)
    with torch.inference_mode():
        difference = (reference(images) - logits).abs().max().item()

    def patched() -> float:
        return elapsed(lambda: reference(images))

    theirs = compare(f"reference {name} / unpatched", unpatched, patched, args)
    compare(f"tokenprune {name} / reference {name}", patched, tokenprune, args)
    print(
        f"{'':<4}reference speed-up {theirs.speedup:.2f}x; "
        f"largest logit difference from tokenprune {difference:.2e}"
    )


def main() -> None:
    """Build the model and images once, then every schedule."""
    args = parse_args()
    quiet_run(args)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **args.vit).eval()
    size = model.patch_embed.img_size
    images = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(1))
    patch = None if args.reference is None else reference_patch(args.reference)
    print(machine())
    print(
        f"timm {timm.__version__} vit_base_patch16_224 {args.vit or ''}, "
        f"batch {args.batch}; {paired_description(args)}; "
        f"reference: {args.reference or 'not given (--reference DIR)'}\n"
    )
    for name in args.schedules:
        report_schedule(model, images, name, args, patch)
        print()
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
