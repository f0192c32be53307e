"""Small LLaVA-family models built from configs with seeded random weights (no download).

Used by the CLI's built-in default, the tests and the benchmarks. The shapes are those of the
real models (CLIP-style vision tower, projector, Llama decoder with RoPE, GQA and a gated MLP),
scaled down to run on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
)

M = TypeVar("M", bound=PreTrainedModel)

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0


@dataclass(frozen=True)
class ToySize:
    """Sizes of a toy LLaVA: hidden width, decoder depth, heads, vision grid side and vocabulary."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    grid: int = 6
    patch: int = 4
    vocab: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2


def decoder_sizes(size: ToySize) -> dict[str, int]:
    """The decoder sizes every toy's text config shares (Llama, Qwen2 and Qwen-VL spell them alike)."""
    return {
        "vocab_size": size.vocab,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "max_position_embeddings": 4096,
        "pad_token_id": PAD_TOKEN_ID,
    }


def vision_tower_sizes(size: ToySize) -> dict[str, int]:
    """The ViT sizes the CLIP, SigLIP and InternVL toy towers share: 2 heads, an MLP twice as wide."""
    return {
        "hidden_size": size.vision_hidden,
        "intermediate_size": size.vision_hidden * 2,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": 2,
    }


def text_config(size: ToySize, attn_implementation: str) -> LlamaConfig:
    """The toy LLaVAs' Llama decoder."""
    return LlamaConfig(**decoder_sizes(size), attn_implementation=attn_implementation)


def vision_config(size: ToySize) -> CLIPVisionConfig:
    """The toy LLaVAs' CLIP tower: `size.grid ** 2` patches per image."""
    return CLIPVisionConfig(
        **vision_tower_sizes(size),
        image_size=size.grid * size.patch,
        patch_size=size.patch,
        projection_dim=size.vision_hidden,
    )


def toy_llava(
    size: ToySize = ToySize(), attn_implementation: str = "sdpa", seed: int = 0
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model with `size.grid ** 2` tokens per image, in eval mode, float32."""
    config = LlavaConfig(
        vision_config=vision_config(size),
        text_config=text_config(size, attn_implementation),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation=attn_implementation,
    )
    return seeded_model(LlavaForConditionalGeneration, config, seed)


def toy_llava_next(
    size: ToySize = ToySize(), attn_implementation: str = "sdpa", seed: int = 0
) -> LlavaNextForConditionalGeneration:
    """A LLaVA-NeXT-shaped model: anyres tiles of the base grid, unpadding and row newlines."""
    tile = size.grid * size.patch
    config = LlavaNextConfig(
        vision_config=vision_config(size),
        text_config=text_config(size, attn_implementation),
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation=attn_implementation,
    )
    return seeded_model(LlavaNextForConditionalGeneration, config, seed)


def seeded_model(
    model_class: type[M], config: PretrainedConfig, seed: int, placeholders: Sequence[int] = (IMAGE_TOKEN_ID,)
) -> M:
    """`model_class(config)` with weights drawn from `seed`, in eval mode, never generating `placeholders`
    (random weights may favour a placeholder id; a real model never generates one)."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.suppress_tokens = list(placeholders)
    return model


VIDEO_TOKEN_ID = 4


def toy_video_llava(
    size: ToySize = ToySize(), attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    """A Video-LLaVA-shaped model: `size.grid ** 2` tokens per image, `1 + size.grid ** 2` per video frame."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    config = VideoLlavaConfig(
        vision_config=vision_config(size),
        text_config=text_config(size, attn_implementation),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation=attn_implementation,
    )
    return seeded_model(VideoLlavaForConditionalGeneration, config, seed, (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID))


VISION_START_TOKEN_ID = 5
VISION_END_TOKEN_ID = 6


def qwen_text_config(size: ToySize, attn_implementation: str) -> dict:
    """A Qwen2-VL text config: the Llama-like sizes plus M-RoPE sections (t, h, w) in the real 2:3:3 split."""
    half = size.hidden // size.heads // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return {
        **decoder_sizes(size),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [temporal, height, half - temporal - height],
        },
        "attn_implementation": attn_implementation,
    }


def qwen_token_ids() -> dict[str, int]:
    """The placeholder and vision-span token ids of the Qwen toys (within the toy vocabulary)."""
    return {
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_TOKEN_ID,
        "vision_end_token_id": VISION_END_TOKEN_ID,
    }


def merger_vision_config(size: ToySize, depth: int) -> dict:
    """A Qwen2.5-VL or Qwen3-VL vision tower of `depth` layers: 2-frame patches merged 2 x 2 into the
    decoder's width."""
    return {
        "depth": depth,
        "hidden_size": size.vision_hidden,
        "intermediate_size": size.vision_hidden * 2,
        "out_hidden_size": size.hidden,
        "num_heads": 2,
        "patch_size": size.patch,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def toy_qwen2_vl(
    size: ToySize = ToySize(), attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    """A Qwen2-VL-shaped model: dynamic-resolution vision tower with a 2 x 2 patch merger, 3-D M-RoPE.

    Pixel inputs are the processor's flattened patches: [sum(t * h * w), 3 * 2 * patch * patch] rows
    for grids (t, h, w) of even h and w; each image or video gets t * h * w / 4 placeholder tokens.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=qwen_text_config(size, attn_implementation),
        vision_config={
            "depth": size.vision_layers,
            "embed_dim": size.vision_hidden,
            "hidden_size": size.hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": size.patch,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        attn_implementation=attn_implementation,
        **qwen_token_ids(),
    )
    return seeded_model(Qwen2VLForConditionalGeneration, config, seed, (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID))


def toy_qwen2_5_vl(
    size: ToySize = ToySize(), attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    """A Qwen2.5-VL-shaped model: as `toy_qwen2_vl`, with windowed vision attention and timed videos."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=qwen_text_config(size, attn_implementation),
        vision_config={
            **merger_vision_config(size, depth=size.vision_layers),
            "window_size": size.patch * 2 * 2,  # windows of 2 x 2 merged tokens
            "fullatt_block_indexes": [size.vision_layers - 1],
            "tokens_per_second": 2,
        },
        attn_implementation=attn_implementation,
        **qwen_token_ids(),
    )
    return seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed, (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID))
