"""FastV prefill on Qwen2-VL- and Video-LLaVA-shaped models, against the ideal and unreduced, paired.

    python benchmarks/families.py                           # both families, R 0.5 0.75, 2 threads
    python benchmarks/families.py --family video_llava --ratios 0.5 --repeats 15
    python benchmarks/families.py --smoke                   # tiny sizes: proves the script runs

Random-weight models sized for 2 CPU cores (vision towers tiny and not timed: their features are
computed once and passed as `mm_encoder_outputs`), one sample, last-token logits, no cache:

- `qwen2_vl`: one image of 576 merged tokens (a 48 x 48 patch grid, 2 x 2 merger), 3-D M-RoPE;
- `video_llava`: one 8-frame video, 257 tokens per frame (16 x 16 patches and the class token).

Per ratio, paired and order-alternating (`tokenprune.lab.timing.paired_ratio`): FastV at layer K
through tokenprune against the ideal handed its kept indices (`common.ideal_hooks`, 3-D positions
included; its logits checked against tokenprune's first), and against the unreduced model beside
the FLOPs bound. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.testing.models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, ToySize, toy_qwen2_vl, toy_video_llava

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    ROW_HEADER,
    apply_smoke,
    check_close,
    compare,
    elapsed,
    flops_bound,
    ideal_logits,
    ideal_run,
    kept_tokens,
    load,
    machine,
    paired_description,
    prefill_logits,
    quiet_run,
    timing_arguments,
    tokenprune_run,
)

SMOKE = {
    "hidden": 64,
    "layers": 4,
    "heads": 4,
    "intermediate": 128,
    "frames": 2,
    "text": 8,
    "qwen_grid": 8,
    "video_grid": 4,
}


def parse_args() -> argparse.Namespace:
    """Command-line options: family, ratios, sizes, repeats, threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_arguments(parser)
    parser.add_argument("--family", choices=("qwen2_vl", "video_llava", "all"), default="all")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--layer", type=int, default=2, help="FastV's K")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--text", type=int, default=40, help="prompt tokens around the visual ones")
    parser.add_argument("--qwen-grid", type=int, default=48, help="Qwen2-VL patch grid side (merged 2 x 2)")
    parser.add_argument("--video-grid", type=int, default=16, help="Video-LLaVA patch grid side per frame")
    return apply_smoke(parser.parse_args(), **SMOKE)


def size(args: argparse.Namespace, **vision: int) -> ToySize:
    """The decoder sizes of `args` with a one-layer vision tower."""
    return ToySize(
        hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.heads,
        intermediate=args.intermediate, vocab=32000, vision_hidden=32, vision_layers=1, **vision,
    )  # fmt: skip


def prompt(visual: Tensor, n_text: int) -> Tensor:
    """[1, n] ids: half the text, the visual placeholders, the other half."""
    text = torch.randint(10, 32000, (n_text,), generator=torch.Generator().manual_seed(0))
    return torch.cat([text[: n_text // 2], visual, text[n_text // 2 :]])[None]


def qwen2_vl(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Qwen2-VL-shaped: one image of `qwen_grid`^2 patches of 14 px, merged 2 x 2."""
    model = toy_qwen2_vl(size(args, patch=14))
    side = args.qwen_grid
    grid = torch.tensor([[1, side, side]])
    pixels = torch.randn(side * side, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    ids = prompt(torch.full((side * side // 4,), IMAGE_TOKEN_ID), args.text)
    with torch.inference_mode():
        image = model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid, return_dict=True)
    types = (ids == IMAGE_TOKEN_ID).int()
    return model, {
        "input_ids": ids,
        "image_grid_thw": grid,
        "mm_token_type_ids": types,
        "mm_encoder_outputs": {"image": image},
    }


def video_llava(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Video-LLaVA-shaped: one video of `frames` frames (`video_grid`^2 patches of 14 px + class token)."""
    side = args.video_grid
    model = toy_video_llava(size(args, grid=side, patch=14))
    pixels = 14 * side
    video = torch.randn(1, args.frames, 3, pixels, pixels, generator=torch.Generator().manual_seed(1))
    ids = prompt(torch.full((args.frames * (side * side + 1),), VIDEO_TOKEN_ID), args.text)
    with torch.inference_mode():
        features = model.model.get_video_features(pixel_values_videos=video, return_dict=True)
    return model, {"input_ids": ids, "mm_encoder_outputs": {"video": features}}


FAMILIES: dict[str, Callable[[argparse.Namespace], tuple[nn.Module, dict[str, Any]]]] = {
    "qwen2_vl": qwen2_vl,
    "video_llava": video_llava,
}


def report_ratio(
    model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace, ratio: float, unreduced: Callable
) -> None:
    """tokenprune at `ratio` against the ideal handed its indices, then against the unreduced model."""
    config = tp.ReductionConfig(strategy="fastv", layer=args.layer, ratio=ratio)
    kept, reduced = kept_tokens(model, inputs, config)
    ideal = ideal_logits(model, inputs, args.layer, kept)
    check_close(f"ideal R={ratio} vs tokenprune", ideal, reduced, model.dtype)
    tokenprune = tokenprune_run(model, inputs, config)
    compare(
        f"tokenprune R={ratio} / ideal", ideal_run(model, inputs, args.layer, kept), tokenprune, args, 1.02
    )
    result = compare(f"tokenprune R={ratio} / unreduced", unreduced, tokenprune, args)
    n, slots = inputs["input_ids"].shape[1], kept.shape[1]
    bound = flops_bound(model.config.text_config, args.layer, n, slots)
    print(f"{'':<4}speed-up {result.speedup:.2f}x; FLOPs bound {bound:.2f}x ({slots} of {n} tokens kept)")


def main() -> None:
    """Each family: the noise floor, then every ratio."""
    args = parse_args()
    quiet_run(args)
    print(machine())
    print(paired_description(args))
    for family in list(FAMILIES) if args.family == "all" else [args.family]:
        model, inputs = FAMILIES[family](args)
        n = inputs["input_ids"].shape[1]
        print(
            f"\n== {family}: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}; prompt {n} "
            f"tokens ({n - args.text} visual); FastV K={args.layer}"
        )

        def unreduced(model: nn.Module = model, inputs: dict[str, Any] = inputs) -> float:
            return elapsed(lambda: prefill_logits(model, inputs))

        print(ROW_HEADER)
        compare("unreduced / unreduced (noise floor)", unreduced, unreduced, args)
        for ratio in args.ratios:
            report_ratio(model, inputs, args, ratio, unreduced)
    print(f"\nend: {load()}")


if __name__ == "__main__":
    main()
