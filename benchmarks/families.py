"""FastV prefill on Qwen2-VL- and Video-LLaVA-shaped models: unreduced, tokenprune, ideal, FLOPs bound.

    python benchmarks/families.py                           # both families, 2 threads
    python benchmarks/families.py --family video_llava --ratios 0.5 --repeats 5

Random-weight models sized for 2 CPU cores (vision towers tiny and not timed: their features are
computed once and passed as `mm_encoder_outputs`), one sample, last-token logits, no cache:

- `qwen2_vl`: one image of 576 merged tokens (a 48 x 48 patch grid, 2 x 2 merger), 3-D M-RoPE;
- `video_llava`: one 8-frame video, 257 tokens per frame (16 x 16 patches and the class token).

Variants, interleaved in one process (round-robin, after a warm-up round): the model as it is,
FastV at layer K through tokenprune, and an "ideal" that is handed tokenprune's kept indices:
pre-hooks on layers >= K give them the kept hidden states and rotary tables, gathered once, and
no mask (SDPA's causal kernel), with no scoring, checks or output restoration. The ideal's
last-token logits are checked against tokenprune's before anything is timed. See
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.utils import logging as hf_logging

import tokenprune as tp
from tokenprune.flops import tokens_per_layer, trace_flops
from tokenprune.testing.models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, ToySize, toy_qwen2_vl, toy_video_llava

sys.path.insert(0, str(Path(__file__).parent))
from prefill import Variant, _check_close, _load, report_pairs, report_prefill, time_round_robin


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=("qwen2_vl", "video_llava", "all"), default="all")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--layer", type=int, default=2, help="FastV's K")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=8, help="tokenprune/ideal back-to-back pairs (0: off)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--text", type=int, default=40, help="prompt tokens around the visual ones")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def size(args: argparse.Namespace, **vision: int) -> ToySize:
    return ToySize(
        hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.heads,
        intermediate=args.intermediate, vocab=32000, vision_hidden=32, vision_layers=1, **vision,
    )  # fmt: skip


def prompt(visual: Tensor, n_text: int) -> Tensor:
    """[1, n] ids: half the text, the visual placeholders, the other half."""
    text = torch.randint(10, 32000, (n_text,), generator=torch.Generator().manual_seed(0))
    return torch.cat([text[: n_text // 2], visual, text[n_text // 2 :]])[None]


def qwen2_vl(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Qwen2-VL-shaped: one image of 48 x 48 patches, merged 2 x 2 into 576 tokens."""
    model = toy_qwen2_vl(size(args, patch=14))
    grid = torch.tensor([[1, 48, 48]])
    pixels = torch.randn(48 * 48, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    ids = prompt(torch.full((576,), IMAGE_TOKEN_ID), args.text)
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
    """Video-LLaVA-shaped: one video of `frames` frames of 224px (16 x 16 patches + class token each)."""
    model = toy_video_llava(size(args, grid=16, patch=14))
    video = torch.randn(1, args.frames, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ids = prompt(torch.full((args.frames * 257,), VIDEO_TOKEN_ID), args.text)
    with torch.inference_mode():
        features = model.model.get_video_features(pixel_values_videos=video, return_dict=True)
    return model, {"input_ids": ids, "mm_encoder_outputs": {"video": features}}


FAMILIES: dict[str, Callable[[argparse.Namespace], tuple[nn.Module, dict[str, Any]]]] = {
    "qwen2_vl": qwen2_vl,
    "video_llava": video_llava,
}


def prefill(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    return model(**inputs, use_cache=False, logits_to_keep=1).logits


def ideal_hooks(layers: list[nn.Module], k: int, kept: Tensor) -> list[Any]:
    """Pre-hooks giving layers >= k the kept tokens and their rotary tables (gathered once), no mask."""
    gathered: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        hidden = args[0]
        if module is layers[k]:
            hidden = hidden[:, kept]
            gathered["position_embeddings"] = tuple(t[:, kept] for t in kwargs["position_embeddings"])
            if kwargs.get("position_ids") is not None:
                gathered["position_ids"] = kwargs["position_ids"][..., kept]
        return (hidden, *args[1:]), {**kwargs, **gathered, "attention_mask": None}

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers[k:]]


def ideal_variant(model: nn.Module, inputs: dict[str, Any], k: int, kept: Tensor, **info: Any) -> Variant:
    layers = list(tp.adapter_for(model).decoder_layers())
    handles: list[Any] = []
    return Variant(
        f"ideal R={info['ratio']}",
        lambda: prefill(model, inputs),
        setup=lambda: handles.extend(ideal_hooks(layers, k, kept)),
        teardown=lambda: [handles.pop().remove() for _ in range(len(handles))],
        **info,
    )


def tokenprune_variant(
    model: nn.Module, inputs: dict[str, Any], config: tp.ReductionConfig, **info: Any
) -> Variant:
    handles: list[tp.Handle] = []
    return Variant(
        f"tokenprune R={info['ratio']}",
        lambda: prefill(model, inputs),
        setup=lambda: handles.append(tp.attach(model, config)),
        teardown=lambda: handles.pop().detach(),
        **info,
    )


def variants(model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace) -> list[Variant]:
    n = inputs["input_ids"].shape[1]
    out = [Variant("unreduced", lambda: prefill(model, inputs), tokens=[n] * args.layers)]
    for ratio in args.ratios:
        config = tp.ReductionConfig(strategy="fastv", layer=args.layer, ratio=ratio)
        with tp.attach(model, config) as handle, torch.inference_mode():
            reduced = prefill(model, inputs)
            trace = handle.trace
        kept = trace[0].kept[0]
        info = {"tokens": tokens_per_layer(args.layers, trace, n)[0], "ratio": ratio}
        ideal = ideal_variant(model, inputs, args.layer, kept, **info)
        ideal.setup()
        with torch.inference_mode():
            _check_close(f"ideal R={ratio} vs tokenprune", prefill(model, inputs), reduced)
        ideal.teardown()
        out += [tokenprune_variant(model, inputs, config, **info), ideal]
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    families = list(FAMILIES) if args.family == "all" else [args.family]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; start: {_load()}")
    for family in families:
        model, inputs = FAMILIES[family](args)
        n = inputs["input_ids"].shape[1]
        text_config = model.config.text_config
        all_variants = variants(model, inputs, args)
        time_round_robin(all_variants, args.repeats, args.warmup)
        gflop = trace_flops(text_config, [], n)[0] / 1e9
        print(
            f"\n{family}: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}; "
            f"prompt {n} tokens ({n - args.text} visual); FastV K={args.layer}; {gflop:.1f} GFLOP unreduced; "
            f"{args.repeats} rounds after {args.warmup} warm-up"
        )
        report_prefill(all_variants, text_config)
        if args.pairs:
            ratio = args.ratios[0]
            report_pairs(*[v for v in all_variants if v.ratio == ratio], args.pairs)
    print(f"\nend: {_load()}")


if __name__ == "__main__":
    main()
